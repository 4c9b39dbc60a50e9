//! Fuzzes `KeyFile::parse` and `KeyFile::unlock` (test KDF parameters allowed) on arbitrary
//! bytes: no panic, no unbounded allocation (libFuzzer's malloc and RSS limits catch that).
//!
//! Parameters dearer than 8x the test cost are replaced with `KdfParams::INSECURE_FOR_TESTS`
//! before unlocking, so an iteration stays cheap (the product's own ceiling is in
//! docs/SECURITY.md). Oracles: a file that unlocks with the passphrase never unlocks with
//! another one, and sealing what was unlocked gives a file that parses and unlocks to the same
//! secrets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncra_core::crypto::keyfile::KeyFile;
use syncra_fuzz::keyfile::{PASSPHRASE, WRONG_PASSPHRASE, clamp};

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = KeyFile::parse(data) else {
        return;
    };
    clamp(&mut file);
    let Ok(unlocked) = file.unlock(PASSPHRASE, true) else {
        return;
    };
    assert!(
        file.unlock(WRONG_PASSPHRASE, true).is_err(),
        "a key file unlocked with two different passphrases"
    );
    let resealed = unlocked.seal().expect("an unlocked file seals again");
    let json = serde_json::to_vec(&resealed).expect("a sealed file serialises");
    let reparsed = KeyFile::parse(&json).expect("a sealed file parses");
    let again = reparsed
        .unlock(PASSPHRASE, true)
        .expect("a resealed file unlocks with the same passphrase");
    let names: Vec<&str> = unlocked.names().collect();
    assert_eq!(
        names,
        again.names().collect::<Vec<_>>(),
        "secret names changed"
    );
    for name in names {
        assert_eq!(
            unlocked.get(name),
            again.get(name),
            "secret {name:?} changed"
        );
    }
    assert_eq!(unlocked.public, again.public, "public facts changed");
});
