//! Key pairs and identity records for tests.

use syncra_core::crypto::fill_random;
use syncra_core::crypto::keys::{IdentityKeyPair, PrekeySecret};
use syncra_core::{Handle, IdentityRecord};

/// The creation time (seconds since the Unix epoch) of the prekey in [`test_identity`]. Fixed,
/// so that tests can make a prekey that is clearly newer or older than the registered one.
pub const FIXTURE_PREKEY_CREATED_AT: u64 = 1_700_000_000;

/// A fresh identity, its signed prekey (created at [`FIXTURE_PREKEY_CREATED_AT`]) and the
/// record that registers it under `handle`.
///
/// # Panics
///
/// If `handle` is not a valid handle: a fixture with a bad handle is a bug in the test.
pub fn test_identity(handle: &str) -> (IdentityKeyPair, PrekeySecret, IdentityRecord) {
    let identity = IdentityKeyPair::generate();
    let prekey = PrekeySecret::generate(&identity, FIXTURE_PREKEY_CREATED_AT);
    let handle = Handle::parse(handle)
        .unwrap_or_else(|e| panic!("test fixture: handle {handle:?} is invalid: {e}"));
    let record = IdentityRecord {
        user_id: identity.user_id(),
        handle,
        identity_key: identity.public(),
        prekey: prekey.signed().clone(),
    };
    (identity, prekey, record)
}

/// `prefix` followed by `_` and 12 random hex digits: a handle or topic name that no other test
/// uses, so suites can run against a backend shared between tests (one Postgres database, one
/// Redis server) without seeing each other's data. Handle-safe if `prefix` is: the result is
/// lower case and at most 32 characters for a prefix of up to 19.
pub fn unique_name(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    fill_random(&mut bytes);
    let mut name = String::with_capacity(prefix.len() + 13);
    name.push_str(prefix);
    name.push('_');
    for b in bytes {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_records_verify_and_names_are_handles() {
        let (identity, prekey, record) = test_identity(&unique_name("alice"));
        record.verify().unwrap();
        assert_eq!(record.user_id, identity.user_id());
        assert_eq!(prekey.signed().created_at, FIXTURE_PREKEY_CREATED_AT);
        let long = unique_name("abcdefghijklmnopqrs");
        assert_eq!(long.len(), 32);
        Handle::parse(&long).unwrap();
        assert_ne!(unique_name("x"), unique_name("x"));
    }
}
