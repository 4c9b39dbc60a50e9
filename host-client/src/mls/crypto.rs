//! The primitives openmls runs on: RustCrypto, with Ed25519 verification made cheaper and
//! AES-128-GCM from ring.
//!
//! Every application message carries a signature its readers verify with the sender's leaf
//! key; that verification is most of the cost of reading a message. RustCrypto calls
//! `verify_strict` with a key decoded from its 32 bytes on every call. Strict verification
//! stays (no small-order keys, no small-order `R`, no malleable signatures), as in RustCrypto
//! and in `syncra-core`, but two field exponentiations per message go:
//!
//! - **Keys are kept decoded.** Decoding is a point decompression (a square root). The keys of
//!   a group are few and stable; a key of small order is refused when it is decoded and never
//!   kept.
//! - **A sender's key gets precomputed tables.** A verification computes `[s]B - [k]A`.
//!   ed25519-dalek builds a small table of multiples of `A` for every call and walks `A`'s
//!   scalar in a window of 5; a key checked a third time (a member who writes, rather than a
//!   KeyPackage, whose leaf and package are two checks, or a leaf checked once when a group is
//!   joined) gets tables of 64 multiples of `B` and of `-A`, walked in a window of 8
//!   ([`VartimeEdwardsPrecomputation`]), for at most [`MAX_TABLES`] keys. Only where
//!   curve25519-dalek runs its AVX2 or AVX-512 code (x86_64 with AVX2), where building them
//!   costs about a third of a verification; its portable code builds them with a field
//!   inversion per entry, which a key's messages would take long to repay, so there keys keep
//!   ed25519-dalek's path. The equation and its checks are ed25519-dalek's own (`s`
//!   canonical, `k = SHA-512(R || A || M)` over the key's bytes as given, the result
//!   compressed and compared with `R`'s bytes); only the way the same point is computed
//!   differs, and the tests hold each path to RustCrypto's answers.
//! - **`R` is checked without decompressing it.** `verify_strict` decompresses the signature's
//!   `R` (a second square root) to test that it is not of small order, then checks that
//!   `[s]B - [k]A` compresses to `R`'s bytes. Once that check has passed, `R`'s bytes are the
//!   canonical encoding of a point, and a point is of small order exactly when its canonical
//!   encoding is one of the eight of the small-order points ([`small_order_encodings`]):
//!   comparing 32 bytes against eight decides the same thing. The accepted signatures are
//!   exactly those `verify_strict` accepts; the tests hold the two side by side.
//!
//! **AES-128-GCM comes from ring** (BoringSSL's AES-NI/VAES and carry-less-multiply code, the
//! same crate rustls already brings into the client). Every application message is sealed and
//! opened twice (its content, padded to 512 bytes for a 256-byte text, and its sender data),
//! each under a fresh key; ring does the content in about 60 % of RustCrypto's time
//! (docs/BENCHMARKS.md). The bytes are the same (the tests hold the two side by side, and a
//! known answer from the GCM specification); errors keep RustCrypto's kinds, and a wrong nonce
//! length is an error rather than a panic.
//!
//! Everything else is delegated to RustCrypto unchanged.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
use curve25519_dalek::edwards::{EdwardsPoint, VartimeEdwardsPrecomputation};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::VartimePrecomputedMultiscalarMul;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use openmls::prelude::tls_codec::SecretVLBytes;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeCiphertext, HpkeConfig,
    HpkeKeyPair, KemOutput, SignatureScheme,
};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sha2::{Digest, Sha512};

/// Decoded keys kept at most; past it the cache starts over. A group holds one key per
/// member, so this bounds memory, not the group.
const MAX_KEYS: usize = 4096;
/// Keys with precomputed tables at most (20 KiB each with the AVX-512 or AVX2 backend, so
/// 5 MiB in all); further keys are verified with their decoded point alone until the cache
/// starts over.
const MAX_TABLES: usize = 256;
/// Checks with a key before it gets its tables (failed checks count): a KeyPackage is two
/// (its leaf and itself) and a leaf in a Welcome one, so only a key that signs messages pays
/// for tables.
const USES_BEFORE_TABLES: u32 = 2;

/// Whether curve25519-dalek runs its vector code here, where tables are cheap to build.
fn tables_pay() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: LazyLock<bool> = LazyLock::new(|| std::is_x86_feature_detected!("avx2"));
        *AVX2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The canonical encodings of the eight points of small order (the 8-torsion subgroup).
/// Compression is one-to-one from points to canonical encodings, so these are all of them.
fn small_order_encodings() -> &'static [[u8; 32]; 8] {
    static ENCODINGS: LazyLock<[[u8; 32]; 8]> =
        LazyLock::new(|| EIGHT_TORSION.map(|point| point.compress().to_bytes()));
    &ENCODINGS
}

/// RustCrypto with a cache of decoded Ed25519 verification keys (none of small order).
#[derive(Default)]
pub(crate) struct Crypto {
    inner: RustCrypto,
    keys: Mutex<Keys>,
}

/// The decoded keys, and how many of them have tables.
#[derive(Default)]
struct Keys {
    known: HashMap<[u8; 32], Known>,
    tables: usize,
}

/// A decoded key (never of small order).
struct Known {
    key: VerifyingKey,
    uses: u32,
    /// Multiples of `B` and `-A`, once the key has been used often enough.
    tables: Option<Arc<VartimeEdwardsPrecomputation>>,
}

/// How a signature is checked: with the decoded key, or with its tables.
enum Check {
    Key(VerifyingKey),
    Tables(Arc<VartimeEdwardsPrecomputation>),
}

impl Keys {
    /// How to check a signature by `pk`; `Err` for bytes that are not a point.
    fn check_for(&mut self, pk: &[u8; 32]) -> Result<Check, CryptoError> {
        if !self.known.contains_key(pk) {
            let key = VerifyingKey::from_bytes(pk).map_err(|_| CryptoError::CryptoLibraryError)?;
            // `verify_strict` refuses every signature under a small-order key.
            if key.is_weak() {
                return Err(CryptoError::InvalidSignature);
            }
            // Only a valid key starts the cache over.
            if self.known.len() >= MAX_KEYS {
                *self = Keys::default();
            }
            self.known.insert(
                *pk,
                Known {
                    key,
                    uses: 0,
                    tables: None,
                },
            );
        }
        let known = self
            .known
            .get_mut(pk)
            .ok_or(CryptoError::CryptoLibraryError)?;
        if let Some(tables) = &known.tables {
            return Ok(Check::Tables(Arc::clone(tables)));
        }
        if known.uses < USES_BEFORE_TABLES || self.tables >= MAX_TABLES || !tables_pay() {
            known.uses = known.uses.saturating_add(1);
            return Ok(Check::Key(known.key));
        }
        let minus_a = -known.key.to_edwards();
        let tables = Arc::new(VartimeEdwardsPrecomputation::new([
            ED25519_BASEPOINT_POINT,
            minus_a,
        ]));
        known.tables = Some(Arc::clone(&tables));
        self.tables += 1;
        Ok(Check::Tables(tables))
    }
}

/// ed25519-dalek's verification equation (`VerifyingKey::verify`) with the tables of `A`:
/// `s` canonical, `k = SHA-512(R || A || M)`, and `[s]B + [k](-A)` compresses to `R`'s bytes.
fn verify_with_tables(
    tables: &VartimeEdwardsPrecomputation,
    pk: &[u8; 32],
    data: &[u8],
    signature: &Signature,
) -> bool {
    let r = signature.r_bytes();
    let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(*signature.s_bytes())) else {
        return false;
    };
    let k = Scalar::from_hash(
        Sha512::new()
            .chain_update(r)
            .chain_update(pk)
            .chain_update(data),
    );
    let expected: EdwardsPoint = tables.vartime_multiscalar_mul([s, k]);
    expected.compress().as_bytes() == r
}

impl Crypto {
    fn verify_ed25519(&self, data: &[u8], pk: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        // The same errors as RustCrypto: a bad key or length is a library error, a signature
        // that does not verify is invalid.
        let pk: [u8; 32] = pk.try_into().map_err(|_| CryptoError::CryptoLibraryError)?;
        let signature = Signature::from_bytes(
            &signature
                .try_into()
                .map_err(|_| CryptoError::CryptoLibraryError)?,
        );
        // A poisoned lock only means another thread panicked while it held it; the cache
        // still holds only valid keys and their tables.
        let check = self
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check_for(&pk)?;
        // `verify_strict`, in the order the module docs explain: the ordinary check first
        // (canonical `s`, and `[s]B - [k]A` compresses to exactly `R`'s bytes), then `R` not
        // of small order, decided on its now canonical bytes.
        let verified = match check {
            Check::Key(key) => key.verify(data, &signature).is_ok(),
            Check::Tables(tables) => verify_with_tables(&tables, &pk, data, &signature),
        };
        if !verified {
            return Err(CryptoError::InvalidSignature);
        }
        if small_order_encodings()
            .iter()
            .any(|r| signature.r_bytes() == r)
        {
            return Err(CryptoError::InvalidSignature);
        }
        Ok(())
    }
}

/// The AES-128-GCM key and 96-bit nonce of one seal or open. A key of the wrong length is a
/// library error, as in RustCrypto; so is a nonce of the wrong length (RustCrypto would panic).
fn aes128gcm(key: &[u8], nonce: &[u8]) -> Result<(LessSafeKey, Nonce), CryptoError> {
    let key = UnboundKey::new(&AES_128_GCM, key).map_err(|_| CryptoError::CryptoLibraryError)?;
    let nonce =
        Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::CryptoLibraryError)?;
    Ok((LessSafeKey::new(key), nonce))
}

fn aes128gcm_seal(
    key: &[u8],
    data: &[u8],
    nonce: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let (key, nonce) = aes128gcm(key, nonce)?;
    let mut sealed = Vec::with_capacity(data.len() + AES_128_GCM.tag_len());
    sealed.extend_from_slice(data);
    key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut sealed)
        .map_err(|_| CryptoError::CryptoLibraryError)?;
    Ok(sealed)
}

fn aes128gcm_open(
    key: &[u8],
    ct_tag: &[u8],
    nonce: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let (key, nonce) = aes128gcm(key, nonce)?;
    let mut buffer = ct_tag.to_vec();
    // On a wrong tag ring zeroes what it decrypted before returning the error; the buffer
    // then holds only zeros and the received tag, and is dropped.
    let len = key
        .open_in_place(nonce, Aad::from(aad), &mut buffer)
        .map_err(|_| CryptoError::AeadDecryptionError)?
        .len();
    buffer.truncate(len);
    Ok(buffer)
}

impl OpenMlsCrypto for Crypto {
    fn supports(&self, ciphersuite: Ciphersuite) -> Result<(), CryptoError> {
        self.inner.supports(ciphersuite)
    }

    fn supported_ciphersuites(&self) -> Vec<Ciphersuite> {
        self.inner.supported_ciphersuites()
    }

    fn hkdf_extract(
        &self,
        hash_type: HashType,
        salt: &[u8],
        ikm: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        self.inner.hkdf_extract(hash_type, salt, ikm)
    }

    fn hmac(
        &self,
        hash_type: HashType,
        key: &[u8],
        message: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        self.inner.hmac(hash_type, key, message)
    }

    fn hkdf_expand(
        &self,
        hash_type: HashType,
        prk: &[u8],
        info: &[u8],
        okm_len: usize,
    ) -> Result<SecretVLBytes, CryptoError> {
        self.inner.hkdf_expand(hash_type, prk, info, okm_len)
    }

    fn hash(&self, hash_type: HashType, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.hash(hash_type, data)
    }

    fn aead_encrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        data: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        match alg {
            AeadType::Aes128Gcm => aes128gcm_seal(key, data, nonce, aad),
            other => self.inner.aead_encrypt(other, key, data, nonce, aad),
        }
    }

    fn aead_decrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        ct_tag: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        match alg {
            AeadType::Aes128Gcm => aes128gcm_open(key, ct_tag, nonce, aad),
            other => self.inner.aead_decrypt(other, key, ct_tag, nonce, aad),
        }
    }

    fn signature_key_gen(&self, alg: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        self.inner.signature_key_gen(alg)
    }

    fn verify_signature(
        &self,
        alg: SignatureScheme,
        data: &[u8],
        pk: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        match alg {
            SignatureScheme::ED25519 => self.verify_ed25519(data, pk, signature),
            other => self.inner.verify_signature(other, data, pk, signature),
        }
    }

    fn sign(&self, alg: SignatureScheme, data: &[u8], key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.sign(alg, data, key)
    }

    fn hpke_seal(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        aad: &[u8],
        ptxt: &[u8],
    ) -> Result<HpkeCiphertext, CryptoError> {
        self.inner.hpke_seal(config, pk_r, info, aad, ptxt)
    }

    fn hpke_open(
        &self,
        config: HpkeConfig,
        input: &HpkeCiphertext,
        sk_r: &[u8],
        info: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.inner.hpke_open(config, input, sk_r, info, aad)
    }

    fn hpke_setup_sender_and_export(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<(KemOutput, ExporterSecret), CryptoError> {
        self.inner.hpke_setup_sender_and_export(
            config,
            pk_r,
            info,
            exporter_context,
            exporter_length,
        )
    }

    fn hpke_setup_receiver_and_export(
        &self,
        config: HpkeConfig,
        enc: &[u8],
        sk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<ExporterSecret, CryptoError> {
        self.inner.hpke_setup_receiver_and_export(
            config,
            enc,
            sk_r,
            info,
            exporter_context,
            exporter_length,
        )
    }

    fn derive_hpke_keypair(
        &self,
        config: HpkeConfig,
        ikm: &[u8],
    ) -> Result<HpkeKeyPair, CryptoError> {
        self.inner.derive_hpke_keypair(config, ikm)
    }
}

#[cfg(test)]
mod tests {
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    use curve25519_dalek::scalar::{Scalar, clamp_integer};
    use sha2::{Digest, Sha512};
    use syncra_core::crypto::keys::IdentityKeyPair;

    use super::*;

    type Verify<'a> = dyn Fn(&[u8], &[u8], &[u8]) -> Result<(), CryptoError> + 'a;

    /// The workspace compiles curve25519-dalek's AVX-512 IFMA backend in for x86_64
    /// (`.cargo/config.toml`); the crate picks it at run time on a CPU that has IFMA. A
    /// `RUSTFLAGS` variable replaces the config file's flags, which would silently leave
    /// verification at the AVX2 speed: this test notices on any x86_64 build.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx512_ifma_backend_is_compiled_in_on_x86_64() {
        // Read through black_box: a constant in an assert is a lint, and this one is the point.
        let compiled_in = std::hint::black_box(cfg!(curve25519_dalek_backend = "avx512"));
        assert!(
            compiled_in,
            "built without --cfg curve25519_dalek_backend=\"avx512\" (.cargo/config.toml); \
             was RUSTFLAGS set without it?"
        );
    }

    fn unhex(hex: &str) -> Vec<u8> {
        data_encoding::HEXLOWER.decode(hex.as_bytes()).expect("hex")
    }

    /// Test case 4 of the GCM specification (McGrew and Viega): a known answer, with
    /// associated data and a plaintext that is not a whole number of blocks.
    #[test]
    fn aes128gcm_gives_the_specifications_known_answer() {
        let ours = Crypto::default();
        let key = unhex("feffe9928665731c6d6a8f9467308308");
        let nonce = unhex("cafebabefacedbaddecaf888");
        let aad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let plaintext = unhex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let expected = unhex(
            "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e\
             21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091\
             5bc94fbc3221a5db94fae95ae7121a47",
        );
        let sealed = ours
            .aead_encrypt(AeadType::Aes128Gcm, &key, &plaintext, &nonce, &aad)
            .unwrap();
        assert_eq!(sealed, expected);
        let opened = ours
            .aead_decrypt(AeadType::Aes128Gcm, &key, &sealed, &nonce, &aad)
            .unwrap();
        assert_eq!(opened, plaintext);
    }

    /// ring and RustCrypto seal to the same bytes, open each other's, and refuse the same
    /// tampering with the same errors, at every length an MLS message has.
    #[test]
    fn aes128gcm_agrees_with_rustcrypto() {
        use rand::random;

        let ours = Crypto::default();
        let theirs = RustCrypto::default();
        let gcm = AeadType::Aes128Gcm;
        let lengths = [0usize, 1, 12, 15, 16, 17, 255, 256, 496, 512, 1000];
        for (len, aad_len) in lengths.iter().flat_map(|&n| [(n, 0), (n, n % 41 + 1)]) {
            let key: [u8; 16] = random();
            let nonce: [u8; 12] = random();
            let aad: Vec<u8> = (0..aad_len).map(|_| random()).collect();
            let data: Vec<u8> = (0..len).map(|_| random()).collect();
            let sealed = ours.aead_encrypt(gcm, &key, &data, &nonce, &aad).unwrap();
            assert_eq!(
                sealed,
                theirs.aead_encrypt(gcm, &key, &data, &nonce, &aad).unwrap(),
                "length {len}"
            );
            assert_eq!(
                ours.aead_decrypt(gcm, &key, &sealed, &nonce, &aad).unwrap(),
                data
            );
            // Tampered: the first byte (ciphertext, or the tag when there is none) and the
            // tag's last bit, the associated data, the key, the nonce; too short to hold a
            // tag, and nothing at all.
            let mut first = sealed.clone();
            first[0] ^= 0x01;
            let mut last = sealed.clone();
            *last.last_mut().expect("a tag") ^= 0x80;
            let mut other_key = key;
            other_key[0] ^= 1;
            let mut other_nonce = nonce;
            other_nonce[11] ^= 0x80;
            let other_aad = [aad.as_slice(), b"x"].concat();
            // (key, ciphertext and tag, nonce, associated data)
            let cases: [[&[u8]; 4]; 7] = [
                [&key, &first, &nonce, &aad],
                [&key, &last, &nonce, &aad],
                [&key, &sealed, &nonce, &other_aad],
                [&other_key, &sealed, &nonce, &aad],
                [&key, &sealed, &other_nonce, &aad],
                [&key, &sealed[..sealed.len().min(15)], &nonce, &aad],
                [&key, &[], &nonce, &aad],
            ];
            for [k, ct, n, a] in cases {
                assert_eq!(
                    ours.aead_decrypt(gcm, k, ct, n, a),
                    Err(CryptoError::AeadDecryptionError),
                    "length {len}, {aad_len} bytes of associated data"
                );
                assert_eq!(
                    theirs.aead_decrypt(gcm, k, ct, n, a),
                    Err(CryptoError::AeadDecryptionError)
                );
            }
        }
        // A key of the wrong length is the caller's mistake, in both; a nonce of the wrong
        // length too (RustCrypto would panic on it).
        let (key, nonce) = ([7u8; 16], [1u8; 12]);
        assert_eq!(
            ours.aead_encrypt(gcm, &key[..15], b"m", &nonce, b""),
            theirs.aead_encrypt(gcm, &key[..15], b"m", &nonce, b"")
        );
        assert_eq!(
            ours.aead_encrypt(gcm, &key[..15], b"m", &nonce, b""),
            Err(CryptoError::CryptoLibraryError)
        );
        assert_eq!(
            ours.aead_decrypt(gcm, &key[..15], &[0; 32], &nonce, b""),
            theirs.aead_decrypt(gcm, &key[..15], &[0; 32], &nonce, b"")
        );
        assert_eq!(
            ours.aead_decrypt(gcm, &key[..15], &[0; 32], &nonce, b""),
            Err(CryptoError::CryptoLibraryError)
        );
        assert_eq!(
            ours.aead_encrypt(gcm, &key, b"m", &nonce[..11], b""),
            Err(CryptoError::CryptoLibraryError)
        );
        assert_eq!(
            ours.aead_decrypt(gcm, &key, &[0; 32], &nonce[..11], b""),
            Err(CryptoError::CryptoLibraryError)
        );
    }

    #[test]
    fn verification_agrees_with_rustcrypto_and_stays_strict() {
        let ours = Crypto::default();
        let theirs = RustCrypto::default();
        let key = IdentityKeyPair::generate();
        let msg = b"MLS 1.0 test payload";
        let sig = key.sign(msg);
        // The identity point, compressed: a small-order key strict verification refuses.
        let mut small_order = [0u8; 32];
        small_order[0] = 1;
        let check = |c: &Verify<'_>| {
            (
                c(msg, &key.public(), &sig),
                c(b"another message", &key.public(), &sig),
                c(msg, &key.public()[..31], &sig),
                c(msg, &key.public(), &sig[..63]),
                c(msg, &small_order, &sig),
            )
        };
        let a = check(&|d, p, s| ours.verify_signature(SignatureScheme::ED25519, d, p, s));
        let b = check(&|d, p, s| theirs.verify_signature(SignatureScheme::ED25519, d, p, s));
        assert_eq!(a, b);
        assert_eq!(a.0, Ok(()));
        assert_eq!(a.1, Err(CryptoError::InvalidSignature));
        // Twice: the second time from the cache.
        assert_eq!(
            ours.verify_signature(SignatureScheme::ED25519, msg, &key.public(), &sig),
            Ok(())
        );
    }

    /// The order of the base point, little-endian: `s + L` is the same scalar in a
    /// non-canonical encoding, which strict verification refuses.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];

    /// `signature` with `L` added to its `s`.
    fn with_s_plus_l(signature: &[u8; 64]) -> [u8; 64] {
        let mut out = *signature;
        let mut carry = 0u16;
        for (i, l) in L.iter().enumerate() {
            let sum = u16::from(signature[32 + i]) + u16::from(*l) + carry;
            out[32 + i] = sum.to_le_bytes()[0];
            carry = sum >> 8;
        }
        assert_eq!(carry, 0, "s < L, so s + L < 2^256");
        out
    }

    /// The path a key's next verification takes: `true` once it has tables.
    fn has_tables(c: &Crypto, pk: &[u8; 32]) -> bool {
        c.keys
            .lock()
            .unwrap()
            .known
            .get(pk)
            .is_some_and(|k| k.tables.is_some())
    }

    /// Every answer of the decoded-key path and of the tables path is RustCrypto's: genuine
    /// signatures over messages of several lengths, another message, another key's signature,
    /// a bit flipped in `R` (its sign bit too) or in `s`, `s + L`, `s = L`, and `R` or `s`
    /// zeroed. Each case is asked first of a fresh cache (the decoded key), then twice of a
    /// cache whose key has its tables.
    #[test]
    fn tables_verify_exactly_as_the_decoded_key_does() {
        let theirs = RustCrypto::default();
        let key = IdentityKeyPair::generate();
        let other = IdentityKeyPair::generate();
        let pk = key.public();
        let mut cases: Vec<(String, Vec<u8>, [u8; 64])> = Vec::new();
        for len in [0usize, 1, 64, 200, 5000] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let sig = key.sign(&msg);
            cases.push((format!("genuine, {len} bytes"), msg.clone(), sig));
            let mut longer = msg.clone();
            longer.push(1);
            cases.push((format!("another message, {len} bytes"), longer, sig));
            cases.push((
                format!("another key's signature, {len} bytes"),
                msg.clone(),
                other.sign(&msg),
            ));
            for (name, byte, bit) in [
                ("R's first bit", 0, 0x01),
                ("R's last byte", 31, 0x01),
                ("R's sign bit", 31, 0x80),
                ("s's first bit", 32, 0x01),
                ("s's last byte", 63, 0x01),
            ] {
                let mut flipped = sig;
                flipped[byte] ^= bit;
                cases.push((format!("{name} flipped, {len} bytes"), msg.clone(), flipped));
            }
            cases.push((
                format!("s + L, {len} bytes"),
                msg.clone(),
                with_s_plus_l(&sig),
            ));
            let mut s_is_l = sig;
            s_is_l[32..].copy_from_slice(&L);
            cases.push((format!("s = L, {len} bytes"), msg.clone(), s_is_l));
            let mut zero_r = sig;
            zero_r[..32].fill(0);
            cases.push((format!("R zeroed, {len} bytes"), msg.clone(), zero_r));
            let mut zero_s = sig;
            zero_s[32..].fill(0);
            cases.push((format!("s zeroed, {len} bytes"), msg, zero_s));
        }
        let want = |msg: &[u8], sig: &[u8; 64]| {
            theirs.verify_signature(SignatureScheme::ED25519, msg, &pk, sig)
        };
        for (name, msg, sig) in &cases {
            let fresh = Crypto::default();
            let got = fresh.verify_signature(SignatureScheme::ED25519, msg, &pk, sig);
            assert!(!has_tables(&fresh, &pk));
            assert_eq!(got, want(msg, sig), "{name}, with the decoded key");
            assert_eq!(got.is_ok(), name.starts_with("genuine"), "{name}");
        }
        let warm = Crypto::default();
        let (msg, sig) = (&cases[0].1, &cases[0].2);
        for _ in 0..=USES_BEFORE_TABLES {
            assert_eq!(
                warm.verify_signature(SignatureScheme::ED25519, msg, &pk, sig),
                Ok(())
            );
        }
        assert_eq!(has_tables(&warm, &pk), tables_pay());
        for round in ["with the tables", "with the tables again"] {
            for (name, msg, sig) in &cases {
                let got = warm.verify_signature(SignatureScheme::ED25519, msg, &pk, sig);
                assert_eq!(got, want(msg, sig), "{name}, {round}");
            }
        }
    }

    /// A key gets its tables on its check after [`USES_BEFORE_TABLES`]; at most
    /// [`MAX_TABLES`] keys do, and the keys after them keep verifying with their decoded
    /// point. When the cache starts over at [`MAX_KEYS`], the count of tables does too.
    #[test]
    fn tables_are_kept_for_at_most_max_tables_keys() {
        let ours = Crypto::default();
        let msg = b"bounded";
        let verify = |key: &[u8; 32], sig: &[u8; 64]| {
            ours.verify_signature(SignatureScheme::ED25519, msg, key, sig)
        };
        let keys: Vec<_> = (0..MAX_TABLES + 3)
            .map(|_| IdentityKeyPair::generate())
            .collect();
        for key in &keys {
            let sig = key.sign(msg);
            for check in 0..=USES_BEFORE_TABLES {
                assert!(!has_tables(&ours, &key.public()), "check {check}");
                assert_eq!(verify(&key.public(), &sig), Ok(()));
            }
        }
        let expected = if tables_pay() { MAX_TABLES } else { 0 };
        assert_eq!(ours.keys.lock().unwrap().tables, expected);
        let with_tables = keys
            .iter()
            .filter(|k| has_tables(&ours, &k.public()))
            .count();
        assert_eq!(with_tables, expected);
        let last = keys.last().unwrap();
        assert!(!has_tables(&ours, &last.public()));
        let mut altered = last.sign(msg);
        altered[40] ^= 0x80;
        assert_eq!(
            verify(&last.public(), &altered),
            Err(CryptoError::InvalidSignature)
        );
        // Fill the cache with keys checked once, then one more: it starts over.
        let filler = ours.keys.lock().unwrap().known.len()..MAX_KEYS;
        for _ in filler {
            let key = IdentityKeyPair::generate();
            assert_eq!(
                verify(&key.public(), &[0; 64]),
                Err(CryptoError::InvalidSignature)
            );
        }
        assert_eq!(ours.keys.lock().unwrap().known.len(), MAX_KEYS);
        let newcomer = IdentityKeyPair::generate();
        let sig = newcomer.sign(msg);
        for _ in 0..=USES_BEFORE_TABLES {
            assert_eq!(verify(&newcomer.public(), &sig), Ok(()));
        }
        let keys_after = ours.keys.lock().unwrap();
        assert_eq!(keys_after.known.len(), 1);
        assert_eq!(keys_after.tables, usize::from(tables_pay()));
    }

    /// `R` the identity point encoded with its sign bit set: a second encoding of a
    /// small-order point, which the check of `R`'s canonical bytes cannot name. The honest
    /// key's `s = k·a` makes `[s]B - [k]A` that very point, so only comparing compressed bytes
    /// (never points) refuses it, as `verify_strict` does; asked three times, so the tables
    /// refuse it too.
    #[test]
    fn a_second_encoding_of_a_small_order_r_is_refused_on_both_paths() {
        let a = Scalar::from_bytes_mod_order(clamp_integer([0x33; 32]));
        let public = (ED25519_BASEPOINT_POINT * a).compress().to_bytes();
        let mut r = [0u8; 32];
        r[0] = 1;
        r[31] = 0x80;
        let decoded = curve25519_dalek::edwards::CompressedEdwardsY(r).decompress();
        assert_eq!(
            decoded,
            Some(EIGHT_TORSION[0]),
            "the identity, sign bit set"
        );
        let msg = b"a second encoding";
        let k = Scalar::from_hash(
            Sha512::new()
                .chain_update(r)
                .chain_update(public)
                .chain_update(msg),
        );
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&r);
        sig[32..].copy_from_slice((k * a).as_bytes());
        let theirs = RustCrypto::default();
        assert_eq!(
            theirs.verify_signature(SignatureScheme::ED25519, msg, &public, &sig),
            Err(CryptoError::InvalidSignature)
        );
        let ours = Crypto::default();
        for _ in 0..=USES_BEFORE_TABLES + 1 {
            assert_eq!(
                ours.verify_signature(SignatureScheme::ED25519, msg, &public, &sig),
                Err(CryptoError::InvalidSignature)
            );
        }
        assert_eq!(has_tables(&ours, &public), tables_pay());
    }

    /// A signature whose `R` is the small-order point `EIGHT_TORSION[target]`, by a key
    /// `A = [a]B + EIGHT_TORSION[1]` (of mixed order, so not weak) or, for `target` 0, by the
    /// honest key `A = [a]B`: with `s = k·a`, `[s]B - [k]A` is `-[k]` times the torsion part,
    /// so messages are tried until that lands on the target. Only the holder of `a` can do
    /// this, and the ordinary check accepts it; strict verification must not.
    fn small_order_r_signature(target: usize) -> ([u8; 32], Vec<u8>, [u8; 64]) {
        let a = Scalar::from_bytes_mod_order(clamp_integer([0x5a; 32]));
        let torsion = if target == 0 {
            EIGHT_TORSION[0]
        } else {
            EIGHT_TORSION[1]
        };
        let public = (ED25519_BASEPOINT_POINT * a + torsion)
            .compress()
            .to_bytes();
        let r = EIGHT_TORSION[target].compress().to_bytes();
        for counter in 0u32.. {
            let msg = counter.to_be_bytes().to_vec();
            let k = Scalar::from_bytes_mod_order_wide(
                &Sha512::new()
                    .chain_update(r)
                    .chain_update(public)
                    .chain_update(&msg)
                    .finalize()
                    .into(),
            );
            if -(torsion * k) == EIGHT_TORSION[target] {
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&r);
                sig[32..].copy_from_slice((k * a).as_bytes());
                return (public, msg, sig);
            }
        }
        unreachable!("one message in eight lands on the target")
    }

    #[test]
    fn small_order_r_is_refused_like_verify_strict() {
        let ours = Crypto::default();
        let theirs = RustCrypto::default();
        let mut seen = Vec::new();
        for target in 0..8 {
            let (public, msg, sig) = small_order_r_signature(target);
            // The ordinary check accepts it: what refuses it below is the check of `R`.
            let key = VerifyingKey::from_bytes(&public).expect("a point");
            assert!(!key.is_weak());
            assert!(key.verify(&msg, &Signature::from_bytes(&sig)).is_ok());
            let verify = |c: &dyn OpenMlsCrypto| {
                c.verify_signature(SignatureScheme::ED25519, &msg, &public, &sig)
            };
            assert_eq!(verify(&theirs), Err(CryptoError::InvalidSignature));
            // With the decoded key, then with its tables (the key of targets 1 to 7 is the
            // same, of mixed order).
            for _ in 0..=USES_BEFORE_TABLES + 1 {
                assert_eq!(verify(&ours), Err(CryptoError::InvalidSignature));
            }
            seen.push(sig[..32].to_vec());
        }
        // All eight encodings were reached, and they are the table's.
        seen.sort();
        let mut table: Vec<Vec<u8>> = small_order_encodings().iter().map(|r| r.to_vec()).collect();
        table.sort();
        table.dedup();
        assert_eq!(seen, table);
    }
}
