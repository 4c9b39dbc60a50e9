//! Resume tokens: short-lived EdDSA JWTs that any node of the cluster accepts.
//!
//! A token says "this connection proved possession of user X's identity key at time T". It
//! carries T itself (`auth`), unchanged through resumes, so the relay can end a chain of resumes
//! after an absolute lifetime, and the user's registration generation (`gen`), so deleting a
//! user revokes every token issued to it. It lets a client reconnect without a new challenge round trip. Tokens are bound to the relay id
//! (issuer and audience), expire quickly, and are signed with a key every node shares (a file
//! in the data directory, created 0600 on first start).
//!
//! The format is a compact JWS (RFC 7515) with `alg: EdDSA` (RFC 8037), so any JWT tool can
//! read one, but it is made and checked here with ed25519-dalek directly rather than through a
//! JWT library: the relay needs exactly one algorithm, and a general library brings every
//! other (RSA among them) along. Verification accepts only `EdDSA` in the header (no algorithm
//! negotiation, no `none`), uses strict Ed25519 verification, bounds the token's length before
//! decoding anything, and checks issuer, audience and expiry against our own clock.

use std::path::Path;

use anyhow::{Context, bail};
use data_encoding::{BASE64, BASE64URL_NOPAD};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use syncra_core::UserId;
use syncra_core::crypto::keyfile::write_private;
use zeroize::Zeroizing;

/// The protected header of every token: `{"alg":"EdDSA","typ":"JWT"}`.
const HEADER_JSON: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;
/// Longer tokens are refused before any decoding (ours are about 300 bytes).
const MAX_TOKEN_LEN: usize = 1024;

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
    /// When the user last proved possession of the identity key with a challenge-response
    /// (seconds). A resume carries it over unchanged, so a chain of resumes cannot outlive the
    /// relay's absolute session lifetime.
    auth: u64,
    /// The user's registration generation in the identity store when the token was issued.
    /// Deleting the user (and registering again) changes it, which revokes every token.
    #[serde(rename = "gen")]
    generation: u64,
}

/// What a valid token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenGrant {
    /// The user it was issued to.
    pub user: UserId,
    /// When the user last logged in with a challenge-response (seconds since the epoch).
    pub auth_time_secs: u64,
    /// The user's registration generation it names.
    pub generation: u64,
}

/// The header fields we look at; anything else in it is ignored.
#[derive(Deserialize)]
struct Header {
    alg: String,
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
    signing: SigningKey,
    verifying: VerifyingKey,
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

impl TokenKeys {
    /// Keys from a seed.
    pub fn from_seed(seed: &[u8; 32], relay_id: &str, ttl_secs: u64) -> Self {
        let signing = SigningKey::from_bytes(seed);
        TokenKeys {
            verifying: signing.verifying_key(),
            signing,
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
            if bytes.len() != 32 {
                bail!(
                    "token key {} is corrupt (expected 32 bytes)",
                    path.display()
                );
            }
            let mut seed = Zeroizing::new([0u8; 32]);
            seed.copy_from_slice(&bytes);
            seed
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

    /// The key that authenticates payloads between the nodes of the cluster (see
    /// `router::ClusterMac`). Derived from the token signing seed, which every node already
    /// shares, so a cluster needs no second secret: HMAC-SHA256 keyed with the seed over a
    /// fixed label, so the MAC key reveals nothing about the signing key.
    pub fn cluster_key(&self) -> Zeroizing<[u8; 32]> {
        use hmac::{KeyInit, Mac};
        let seed = Zeroizing::new(self.signing.to_bytes());
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(seed.as_ref())
            .expect("HMAC takes keys of any length");
        mac.update(b"syncra/v1/cluster-mac");
        Zeroizing::new(mac.finalize().into_bytes().into())
    }

    /// Issues a token for a grant; returns it with its expiry in milliseconds.
    pub fn issue(&self, grant: &TokenGrant, now_ms: u64) -> anyhow::Result<(String, u64)> {
        let iat = now_ms / 1000;
        let exp = iat + self.ttl_secs;
        let claims = Claims {
            sub: grant.user.to_string(),
            iss: self.relay_id.clone(),
            aud: self.relay_id.clone(),
            iat,
            exp,
            auth: grant.auth_time_secs,
            generation: grant.generation,
        };
        let claims = serde_json::to_vec(&claims).context("encoding resume token claims")?;
        let mut token = BASE64URL_NOPAD.encode(HEADER_JSON.as_bytes());
        token.push('.');
        BASE64URL_NOPAD.encode_append(&claims, &mut token);
        let signature = self.signing.sign(token.as_bytes());
        token.push('.');
        BASE64URL_NOPAD.encode_append(&signature.to_bytes(), &mut token);
        Ok((token, exp * 1000))
    }

    /// Checks a token's signature, relay and expiry and returns what it grants. The caller
    /// checks the grant against the session lifetime and the store's generation.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<TokenGrant, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Invalid);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Invalid);
        };
        let decode = |part: &str| {
            BASE64URL_NOPAD
                .decode(part.as_bytes())
                .map_err(|_| TokenError::Invalid)
        };
        let header: Header =
            serde_json::from_slice(&decode(header)?).map_err(|_| TokenError::Invalid)?;
        if header.alg != "EdDSA" {
            return Err(TokenError::Invalid);
        }
        let signature: [u8; 64] = decode(signature)?
            .try_into()
            .map_err(|_| TokenError::Invalid)?;
        let signed = &token[..token.len() - signature_part_len(token)];
        self.verifying
            .verify_strict(signed.as_bytes(), &Signature::from_bytes(&signature))
            .map_err(|_| TokenError::Invalid)?;
        let claims: Claims =
            serde_json::from_slice(&decode(claims)?).map_err(|_| TokenError::Invalid)?;
        if claims.iss != self.relay_id || claims.aud != self.relay_id {
            return Err(TokenError::Invalid);
        }
        if claims.exp.saturating_mul(1000) <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(TokenGrant {
            user: claims.sub.parse().map_err(|_| TokenError::Invalid)?,
            auth_time_secs: claims.auth,
            generation: claims.generation,
        })
    }
}

/// The length of the `.signature` suffix of a compact JWS.
fn signature_part_len(token: &str) -> usize {
    token.rfind('.').map_or(0, |dot| token.len() - dot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(user: UserId) -> TokenGrant {
        TokenGrant {
            user,
            auth_time_secs: 900,
            generation: 7,
        }
    }

    #[test]
    fn issue_verify_expire_and_forge() {
        let keys = TokenKeys::from_seed(&[1u8; 32], "relay-a", 60);
        let user = UserId::from_identity_key(&[5u8; 32]);
        let (token, exp) = keys.issue(&grant(user), 1_000_000).unwrap();
        assert_eq!(exp, 1_000_000 + 60_000);
        assert_eq!(keys.verify(&token, 1_000_000), Ok(grant(user)));
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

    /// Re-signs `header.claims` with `keys`, as a forger holding the key could.
    fn forge(keys: &TokenKeys, header: &str, claims: &str) -> String {
        let mut t = BASE64URL_NOPAD.encode(header.as_bytes());
        t.push('.');
        t.push_str(&BASE64URL_NOPAD.encode(claims.as_bytes()));
        let sig = keys.signing.sign(t.as_bytes());
        t.push('.');
        t.push_str(&BASE64URL_NOPAD.encode(&sig.to_bytes()));
        t
    }

    #[test]
    fn only_eddsa_well_formed_bounded_tokens_verify() {
        let keys = TokenKeys::from_seed(&[1u8; 32], "relay-a", 60);
        let user = UserId::from_identity_key(&[5u8; 32]);
        let (token, _) = keys.issue(&grant(user), 1_000_000).unwrap();
        // A standard compact JWS: three base64url parts, the header as documented.
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(
            BASE64URL_NOPAD.decode(parts[0].as_bytes()).unwrap(),
            HEADER_JSON.as_bytes()
        );
        let claims = format!(
            r#"{{"sub":"{user}","iss":"relay-a","aud":"relay-a","iat":1000,"exp":1060,"auth":900,"gen":7}}"#
        );
        assert_eq!(
            keys.verify(&forge(&keys, HEADER_JSON, &claims), 1_000_000),
            Ok(grant(user))
        );
        // Any other algorithm is refused even with a valid Ed25519 signature over it.
        for header in [
            r#"{"alg":"none"}"#,
            r#"{"alg":"HS256"}"#,
            r#"{"typ":"JWT"}"#,
            "[]",
        ] {
            assert_eq!(
                keys.verify(&forge(&keys, header, &claims), 1_000_000),
                Err(TokenError::Invalid),
                "{header}"
            );
        }
        // Unsigned, truncated, extra parts, oversized, missing claims, wrong audience.
        let unsigned = format!("{}.{}.", parts[0], parts[1]);
        let extra = format!("{token}.{}", parts[2]);
        let huge = format!("{token}{}", "A".repeat(MAX_TOKEN_LEN));
        let no_exp = format!(
            r#"{{"sub":"{user}","iss":"relay-a","aud":"relay-a","iat":1,"auth":1,"gen":7}}"#
        );
        // A token from before sessions had an absolute lifetime names no login time.
        let no_auth_time =
            format!(r#"{{"sub":"{user}","iss":"relay-a","aud":"relay-a","iat":1,"exp":1060}}"#);
        let wrong_aud = format!(
            r#"{{"sub":"{user}","iss":"relay-a","aud":"relay-b","iat":1,"exp":1060,"auth":1,"gen":7}}"#
        );
        for bad in [
            unsigned,
            format!("{}.{}", parts[0], parts[1]),
            extra,
            huge,
            forge(&keys, HEADER_JSON, &no_exp),
            forge(&keys, HEADER_JSON, &no_auth_time),
            forge(&keys, HEADER_JSON, &wrong_aud),
            forge(&keys, HEADER_JSON, "not json"),
        ] {
            assert_eq!(
                keys.verify(&bad, 1_000_000),
                Err(TokenError::Invalid),
                "{bad}"
            );
        }
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("token.key");
        let a = TokenKeys::load_or_create(&path, "r", 60).unwrap();
        let user = UserId::from_identity_key(&[5u8; 32]);
        let (token, _) = a.issue(&grant(user), 0).unwrap();
        let b = TokenKeys::load_or_create(&path, "r", 60).unwrap();
        assert_eq!(b.verify(&token, 0), Ok(grant(user)));
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
