//! Resume tokens: short-lived EdDSA JWTs that any node of the cluster accepts.
//!
//! A token says "this connection proved possession of user X's identity key at time T". It
//! lets a client reconnect without a new challenge round trip. Tokens are bound to the relay id
//! (issuer and audience), expire quickly, and are signed with a key every node shares (a file
//! in the data directory, created 0600 on first start).

use std::path::Path;

use anyhow::Context;
use data_encoding::BASE64;
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use syncra_core::UserId;
use syncra_core::crypto::keyfile::write_private;
use zeroize::Zeroizing;

/// Claims inside a resume token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user id.
    sub: String,
    /// The relay id that issued it.
    iss: String,
    /// The relay id it is for.
    aud: String,
    /// Issued at (seconds).
    iat: u64,
    /// Expires at (seconds).
    exp: u64,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// It was valid once and has expired.
    Expired,
    /// It is not a token we issued (bad signature, wrong relay, malformed).
    Invalid,
}

/// Issues and checks resume tokens.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    relay_id: String,
    ttl_secs: u64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("relay_id", &self.relay_id)
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

/// PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410), as jsonwebtoken expects.
fn pkcs8_from_seed(seed: &[u8; 32]) -> Zeroizing<Vec<u8>> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = Zeroizing::new(Vec::with_capacity(48));
    der.extend_from_slice(&PREFIX);
    der.extend_from_slice(seed);
    der
}

impl TokenKeys {
    /// Keys from a seed.
    pub fn from_seed(seed: &[u8; 32], relay_id: &str, ttl_secs: u64) -> Self {
        let public = SigningKey::from_bytes(seed).verifying_key().to_bytes();
        TokenKeys {
            encoding: EncodingKey::from_ed_der(&pkcs8_from_seed(seed)),
            decoding: DecodingKey::from_ed_der(&public),
            relay_id: relay_id.to_owned(),
            ttl_secs,
        }
    }

    /// Loads the signing seed from `path`, creating it (0600) if it does not exist.
    pub fn load_or_create(path: &Path, relay_id: &str, ttl_secs: u64) -> anyhow::Result<Self> {
        let seed: Zeroizing<[u8; 32]> = if path.exists() {
            let text = Zeroizing::new(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading token key {}", path.display()))?,
            );
            let bytes = Zeroizing::new(BASE64.decode(text.trim().as_bytes()).map_err(|_| {
                anyhow::anyhow!(
                    "token key {} is corrupt (expected base64 of 32 bytes); delete it to make a \
                     new one (existing resume tokens become invalid)",
                    path.display()
                )
            })?);
            let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "token key {} is corrupt (expected 32 bytes)",
                    path.display()
                )
            })?;
            Zeroizing::new(arr)
        } else {
            let mut seed = Zeroizing::new([0u8; 32]);
            syncra_core::crypto::fill_random(seed.as_mut());
            let text = Zeroizing::new(BASE64.encode(seed.as_ref()) + "\n");
            write_private(path, text.as_bytes())
                .with_context(|| format!("creating token key {}", path.display()))?;
            seed
        };
        Ok(Self::from_seed(&seed, relay_id, ttl_secs))
    }

    /// Issues a token for a user; returns it with its expiry in milliseconds.
    pub fn issue(&self, user: &UserId, now_ms: u64) -> anyhow::Result<(String, u64)> {
        let iat = now_ms / 1000;
        let exp = iat + self.ttl_secs;
        let claims = Claims {
            sub: user.to_string(),
            iss: self.relay_id.clone(),
            aud: self.relay_id.clone(),
            iat,
            exp,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
            .context("signing resume token")?;
        Ok((token, exp * 1000))
    }

    /// Checks a token and returns the user it was issued to.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<UserId, TokenError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.relay_id]);
        validation.set_audience(&[&self.relay_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Expiry is checked below against our clock (testable, no leeway).
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|_| TokenError::Invalid)?;
        if data.claims.exp.saturating_mul(1000) <= now_ms {
            return Err(TokenError::Expired);
        }
        data.claims.sub.parse().map_err(|_| TokenError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_expire_and_forge() {
        let keys = TokenKeys::from_seed(&[1u8; 32], "relay-a", 60);
        let user = UserId::from_identity_key(&[5u8; 32]);
        let (token, exp) = keys.issue(&user, 1_000_000).unwrap();
        assert_eq!(exp, 1_000_000 + 60_000);
        assert_eq!(keys.verify(&token, 1_000_000), Ok(user));
        assert_eq!(keys.verify(&token, exp), Err(TokenError::Expired));

        let other_key = TokenKeys::from_seed(&[2u8; 32], "relay-a", 60);
        assert_eq!(
            other_key.verify(&token, 1_000_000),
            Err(TokenError::Invalid)
        );
        let other_relay = TokenKeys::from_seed(&[1u8; 32], "relay-b", 60);
        assert_eq!(
            other_relay.verify(&token, 1_000_000),
            Err(TokenError::Invalid)
        );
        assert_eq!(keys.verify("garbage", 1_000_000), Err(TokenError::Invalid));
        let mut tampered = token.clone();
        tampered.insert(token.len() / 2, 'x');
        assert_eq!(keys.verify(&tampered, 1_000_000), Err(TokenError::Invalid));
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("token.key");
        let a = TokenKeys::load_or_create(&path, "r", 60).unwrap();
        let user = UserId::from_identity_key(&[5u8; 32]);
        let (token, _) = a.issue(&user, 0).unwrap();
        let b = TokenKeys::load_or_create(&path, "r", 60).unwrap();
        assert_eq!(b.verify(&token, 0), Ok(user));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::write(&path, "not base64!").unwrap();
        let err = TokenKeys::load_or_create(&path, "r", 60).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
