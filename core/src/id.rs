//! Identifiers: the self-certifying [`UserId`] and the human-friendly [`Handle`].
//!
//! A user id is a hash of the Ed25519 identity key, so anyone holding a key can check that it
//! belongs to an id without trusting whoever handed it over. Handles are only a lookup
//! convenience on top and are never the trust anchor.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use sha2::{Digest, Sha256};

use crate::error::IdError;

/// Domain separation for deriving a user id from an identity key.
const USER_ID_DOMAIN: &[u8] = b"syncra/v1/user-id";

/// The number of bytes in a [`UserId`].
pub const USER_ID_LEN: usize = 20;

/// A user id: the first 20 bytes of `SHA-256("syncra/v1/user-id" || ed25519_public_key)`.
///
/// 160 bits keeps second preimages (making a different key for somebody's id) far out of reach
/// while the printed form stays short: 32 lowercase base32 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId([u8; USER_ID_LEN]);

impl UserId {
    /// Derives the id that belongs to an Ed25519 public key.
    pub fn from_identity_key(public_key: &[u8; 32]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(USER_ID_DOMAIN);
        hasher.update(public_key);
        let digest = hasher.finalize();
        let mut id = [0u8; USER_ID_LEN];
        id.copy_from_slice(&digest[..USER_ID_LEN]);
        UserId(id)
    }

    /// Wraps raw id bytes, as read from the wire. Nothing is checked: an id is only meaningful
    /// once compared with the key it claims to belong to.
    pub const fn from_bytes(bytes: [u8; USER_ID_LEN]) -> Self {
        UserId(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; USER_ID_LEN] {
        &self.0
    }

    /// Appends the printed form (32 lowercase base32 characters) to `out` without allocating
    /// anything else: the relay builds a broker topic from it for every message.
    pub fn push_to(&self, out: &mut String) {
        out.push_str(std::str::from_utf8(&self.printed()).unwrap_or_default());
    }

    /// The printed form as bytes (base32 output is ASCII).
    fn printed(&self) -> [u8; 32] {
        let mut buf = [0u8; 32];
        BASE32_NOPAD.encode_mut(&self.0, &mut buf);
        buf.make_ascii_lowercase();
        buf
    }

    /// A short prefix of the printed form, for logs and status bars.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.printed()).unwrap_or_default())
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({self})")
    }
}

impl FromStr for UserId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.trim().to_ascii_uppercase();
        let bytes = BASE32_NOPAD
            .decode(upper.as_bytes())
            .map_err(|_| IdError::BadUserId(s.to_owned()))?;
        let bytes: [u8; USER_ID_LEN] = bytes
            .try_into()
            .map_err(|_| IdError::BadUserId(s.to_owned()))?;
        Ok(UserId(bytes))
    }
}

impl serde::Serialize for UserId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The shortest handle allowed.
pub const HANDLE_MIN_LEN: usize = 3;
/// The longest handle allowed.
pub const HANDLE_MAX_LEN: usize = 32;

/// Handles nobody may register, because people would read them as the service speaking.
const RESERVED_HANDLES: &[&str] = &[
    "admin",
    "administrator",
    "root",
    "syncra",
    "relay",
    "system",
    "support",
    "security",
];

/// A handle such as `alice`: 3 to 32 characters of `a-z`, `0-9` and `_`, starting with a letter.
///
/// The alphabet is deliberately ASCII-only and lower case so that two handles that look alike
/// are the same handle (no homoglyphs, no case games). Upper-case input is folded to lower case
/// before checking, so `Alice` and `alice` name the same person.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(String);

impl Handle {
    /// Checks and normalises a handle.
    pub fn parse(input: &str) -> Result<Self, IdError> {
        let folded = input.trim().to_ascii_lowercase();
        let invalid = |why: &'static str| IdError::BadHandle {
            handle: input.to_owned(),
            why,
        };
        if folded.len() < HANDLE_MIN_LEN {
            return Err(invalid("it is shorter than 3 characters"));
        }
        if folded.len() > HANDLE_MAX_LEN {
            return Err(invalid("it is longer than 32 characters"));
        }
        if !folded.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(invalid("it must start with a letter"));
        }
        if !folded
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(invalid("only a-z, 0-9 and _ are allowed"));
        }
        if RESERVED_HANDLES.contains(&folded.as_str()) {
            return Err(invalid("it is reserved"));
        }
        Ok(Handle(folded))
    }

    /// The normalised handle.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({})", self.0)
    }
}

impl FromStr for Handle {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Handle::parse(s)
    }
}

impl serde::Serialize for Handle {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Handle {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Handle::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: Result<&str, &str>) {
        let got = Handle::parse(input);
        match (got, expect) {
            (Ok(h), Ok(want)) => assert_eq!(h.as_str(), want, "input {input:?}"),
            (Err(IdError::BadHandle { why, .. }), Err(want)) => {
                assert!(why.contains(want), "input {input:?}: {why:?} vs {want:?}")
            }
            (got, want) => panic!("input {input:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn handle_rules() {
        check("alice", Ok("alice"));
        check("Alice", Ok("alice"));
        check("  bob_2 ", Ok("bob_2"));
        check("ab", Err("shorter"));
        check(&"a".repeat(33), Err("longer"));
        check(&"a".repeat(32), Ok(&"a".repeat(32)));
        check("1alice", Err("start with a letter"));
        check("_alice", Err("start with a letter"));
        check("al-ice", Err("only a-z"));
        check("alicé", Err("only a-z"));
        check("al ice", Err("only a-z"));
        check("admin", Err("reserved"));
        check("Root", Err("reserved"));
    }

    #[test]
    fn user_id_round_trips_and_is_stable() {
        let id = UserId::from_identity_key(&[7u8; 32]);
        let printed = id.to_string();
        assert_eq!(printed.len(), 32);
        assert_eq!(printed.parse::<UserId>().unwrap(), id);
        assert_eq!(printed.to_uppercase().parse::<UserId>().unwrap(), id);
        assert_ne!(UserId::from_identity_key(&[8u8; 32]), id);
        assert!("not-an-id".parse::<UserId>().is_err());
        assert!("aaaa".parse::<UserId>().is_err());
    }
}
