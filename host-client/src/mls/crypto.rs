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
use std::sync::{LazyLock, Mutex};

use curve25519_dalek::constants::EIGHT_TORSION;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use openmls::prelude::tls_codec::SecretVLBytes;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeCiphertext, HpkeConfig,
    HpkeKeyPair, KemOutput, SignatureScheme,
};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Decoded keys kept at most; past it the cache starts over. A group holds one key per
/// member, so this bounds memory, not the group.
const MAX_KEYS: usize = 4096;

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
    keys: Mutex<HashMap<[u8; 32], VerifyingKey>>,
}

impl Crypto {
    fn verify_ed25519(&self, data: &[u8], pk: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        // The same errors as RustCrypto: a bad key or length is a library error, a signature
        // that does not verify is invalid.
        let pk: [u8; 32] = pk.try_into().map_err(|_| CryptoError::CryptoLibraryError)?;
        let signature: [u8; 64] = signature
            .try_into()
            .map_err(|_| CryptoError::CryptoLibraryError)?;
        let key = {
            // A poisoned lock only means another thread panicked mid-insert of a decoded key;
            // the map is still a map of valid keys.
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            match keys.get(&pk) {
                Some(key) => *key,
                None => {
                    let key = VerifyingKey::from_bytes(&pk)
                        .map_err(|_| CryptoError::CryptoLibraryError)?;
                    // `verify_strict` refuses every signature under a small-order key.
                    if key.is_weak() {
                        return Err(CryptoError::InvalidSignature);
                    }
                    if keys.len() >= MAX_KEYS {
                        keys.clear();
                    }
                    keys.insert(pk, key);
                    key
                }
            }
        };
        // `verify_strict`, in the order the module docs explain: the ordinary check first
        // (canonical `s`, and `[s]B - [k]A` compresses to exactly `R`'s bytes), then `R` not
        // of small order, decided on its now canonical bytes.
        key.verify(data, &Signature::from_bytes(&signature))
            .map_err(|_| CryptoError::InvalidSignature)?;
        if small_order_encodings()
            .iter()
            .any(|r| signature[..32] == r[..])
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
            assert_eq!(verify(&ours), Err(CryptoError::InvalidSignature));
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
