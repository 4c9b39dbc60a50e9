//! The primitives openmls runs on: RustCrypto, with members' Ed25519 keys kept decoded.
//!
//! Every application message carries a signature its readers verify with the sender's leaf
//! key. RustCrypto decodes that key from its 32 bytes on every call, which is a point
//! decompression (a field exponentiation) per message. The keys of a group are few and stable,
//! so this provider keeps them decoded and delegates everything else to RustCrypto unchanged.
//! Verification stays strict (`verify_strict`: no small-order keys, no malleable signatures),
//! as in RustCrypto and in `syncra-core`.

use std::collections::HashMap;
use std::sync::Mutex;

use ed25519_dalek::{Signature, VerifyingKey};
use openmls::prelude::tls_codec::SecretVLBytes;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeCiphertext, HpkeConfig,
    HpkeKeyPair, KemOutput, SignatureScheme,
};

/// Decoded keys kept at most; past it the cache starts over. A group holds one key per
/// member, so this bounds memory, not the group.
const MAX_KEYS: usize = 4096;

/// RustCrypto with a cache of decoded Ed25519 verification keys.
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
                    if keys.len() >= MAX_KEYS {
                        keys.clear();
                    }
                    keys.insert(pk, key);
                    key
                }
            }
        };
        key.verify_strict(data, &Signature::from_bytes(&signature))
            .map_err(|_| CryptoError::InvalidSignature)
    }
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
        self.inner.aead_encrypt(alg, key, data, nonce, aad)
    }

    fn aead_decrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        ct_tag: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.inner.aead_decrypt(alg, key, ct_tag, nonce, aad)
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
    use syncra_core::crypto::keys::IdentityKeyPair;

    use super::*;

    type Verify<'a> = dyn Fn(&[u8], &[u8], &[u8]) -> Result<(), CryptoError> + 'a;

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
}
