//! The key file refuses a wrong passphrase and every kind of damage with its own error, and
//! never loses the secret on a failed attempt.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use syncra_core::crypto::keyfile::{KdfParams, KeyFile, UnlockedKeyFile};
use syncra_core::crypto::os_rng;
use syncra_core::error::KeyFileError;

fn sealed() -> KeyFile {
    let mut f =
        UnlockedKeyFile::create(b"passphrase", KdfParams::INSECURE_FOR_TESTS, &mut os_rng())
            .unwrap();
    f.put("identity", &[1u8; 32]);
    f.put("history", &[2u8; 32]);
    f.seal().unwrap()
}

#[test]
fn wrong_passphrase_is_its_own_error() {
    let file = sealed();
    assert!(matches!(
        file.unlock(b"Passphrase", true),
        Err(KeyFileError::WrongPassphrase)
    ));
    // The right one still works afterwards.
    assert!(file.unlock(b"passphrase", true).is_ok());
}

#[test]
fn corrupt_files_are_refused_as_corrupt() {
    for garbage in [&b""[..], b"{", b"not json", b"{}", b"[1,2,3]"] {
        assert!(
            matches!(KeyFile::parse(garbage), Err(KeyFileError::Corrupt(_))),
            "{garbage:?}"
        );
    }
    let json = serde_json::to_string(&sealed()).unwrap();
    let truncated = &json[..json.len() / 2];
    assert!(matches!(
        KeyFile::parse(truncated.as_bytes()),
        Err(KeyFileError::Corrupt(_))
    ));
    let unknown_field = json.replacen('{', "{\"surprise\":1,", 1);
    assert!(matches!(
        KeyFile::parse(unknown_field.as_bytes()),
        Err(KeyFileError::Corrupt(_))
    ));
}

#[test]
fn damaged_secret_is_corrupt_not_wrong_passphrase() {
    let mut file = sealed();
    let wrapped = file.secrets.get_mut("history").unwrap();
    let mut bytes = data_encoding::BASE64.decode(wrapped.as_bytes()).unwrap();
    bytes[3] ^= 0x40;
    *wrapped = data_encoding::BASE64.encode(&bytes);
    assert!(matches!(
        file.unlock(b"passphrase", true),
        Err(KeyFileError::Corrupt(_))
    ));
}

#[test]
fn bad_salt_and_lengths_are_corrupt() {
    let mut file = sealed();
    file.salt = "AAAA".into();
    assert!(matches!(
        file.unlock(b"passphrase", true),
        Err(KeyFileError::Corrupt(_))
    ));
    let mut file = sealed();
    file.secrets.insert("x".into(), "AAAAAAAA".into());
    assert!(matches!(
        file.unlock(b"passphrase", true),
        Err(KeyFileError::Corrupt(_))
    ));
}

#[test]
fn future_version_and_hostile_parameters_are_refused() {
    let mut file = sealed();
    file.version = 3;
    let json = serde_json::to_vec(&file).unwrap();
    assert!(matches!(
        KeyFile::parse(&json),
        Err(KeyFileError::UnsupportedVersion(3))
    ));
    let mut file = sealed();
    file.params.m_kib = u32::MAX;
    assert!(matches!(
        file.unlock(b"passphrase", true),
        Err(KeyFileError::Corrupt(_))
    ));
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.key");
    let err = KeyFile::read(&path).unwrap_err();
    assert!(matches!(err, KeyFileError::Io { .. }));
    assert!(err.to_string().contains("nope.key"), "{err}");
}

#[test]
fn a_file_without_secrets_does_not_accept_any_passphrase() {
    let empty = UnlockedKeyFile::create(b"pw", KdfParams::INSECURE_FOR_TESTS, &mut os_rng())
        .unwrap()
        .seal()
        .unwrap();
    assert!(matches!(
        empty.unlock(b"anything", true),
        Err(KeyFileError::Corrupt(_))
    ));
}
