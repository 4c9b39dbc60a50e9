//! Secrets at rest: a passphrase-protected key file.
//!
//! The passphrase goes through Argon2id (salted, parameters stored in the file) to a 32-byte
//! key-encryption key; each secret is wrapped under it with AES-256-KWP (RFC 5649), whose
//! integrity check tells a wrong passphrase apart from a good one without any extra verifier.
//! One file holds several named secrets under one derivation, so unlocking costs one Argon2id
//! run however many secrets there are.
//!
//! The file is JSON so that a person can see what it holds (names, parameters, public keys)
//! without being able to read any secret. It is written 0600 in a 0700 directory, atomically.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use aes_kw::KwpAes256;
use aes_kw::cipher::KeyInit;
use argon2::{Algorithm, Argon2, Params, Version};
use data_encoding::BASE64;
use rand::CryptoRng;
use zeroize::Zeroizing;

use crate::error::KeyFileError;

/// The key file format version.
pub const KEYFILE_VERSION: u32 = 1;

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Parallelism.
    pub p: u32,
}

impl KdfParams {
    /// The production default: 64 MiB, 3 passes, 1 lane (about 130 ms on a laptop core).
    pub const DEFAULT: KdfParams = KdfParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };

    /// Cheap parameters for tests only: never use these for real secrets.
    pub const INSECURE_FOR_TESTS: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    /// The weakest parameters a file may claim. A file asking for less is refused as corrupt
    /// (or tampered with to make brute force cheap), unless the caller allows test parameters.
    pub const MINIMUM: KdfParams = KdfParams {
        m_kib: 19 * 1024,
        t: 2,
        p: 1,
    };

    /// The most a file may ask for, so a hostile file cannot make us allocate without bound.
    const MAXIMUM_M_KIB: u32 = 1024 * 1024;

    fn argon2(&self) -> Result<Argon2<'static>, KeyFileError> {
        if self.m_kib > Self::MAXIMUM_M_KIB || self.t > 16 || self.p > 16 {
            return Err(KeyFileError::Corrupt("kdf parameters out of range".into()));
        }
        let params = Params::new(self.m_kib, self.t, self.p, Some(32))
            .map_err(|e| KeyFileError::Corrupt(format!("kdf parameters: {e}")))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    fn is_weaker_than_minimum(&self) -> bool {
        self.m_kib < Self::MINIMUM.m_kib || self.t < Self::MINIMUM.t || self.p < Self::MINIMUM.p
    }
}

/// The on-disk form.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Format version.
    pub version: u32,
    /// Always `argon2id`.
    pub kdf: String,
    /// Argon2id parameters.
    pub params: KdfParams,
    /// Base64 salt (16 bytes).
    pub salt: String,
    /// Base64 KWP-wrapped secrets by name.
    pub secrets: BTreeMap<String, String>,
    /// Public, unencrypted facts kept beside the secrets (e.g. the user id), for display.
    #[serde(default)]
    pub public: BTreeMap<String, String>,
}

/// A key file opened with its passphrase: the secrets and the key to re-seal them.
pub struct UnlockedKeyFile {
    params: KdfParams,
    salt: [u8; 16],
    kek: Zeroizing<[u8; 32]>,
    secrets: BTreeMap<String, Zeroizing<Vec<u8>>>,
    /// Public facts, as in the file.
    pub public: BTreeMap<String, String>,
}

impl std::fmt::Debug for UnlockedKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnlockedKeyFile")
            .field("params", &self.params)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

fn derive_kek(
    passphrase: &[u8],
    salt: &[u8; 16],
    params: &KdfParams,
) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    let mut kek = Zeroizing::new([0u8; 32]);
    params
        .argon2()?
        .hash_password_into(passphrase, salt, kek.as_mut())
        .map_err(|e| KeyFileError::Corrupt(format!("kdf: {e}")))?;
    Ok(kek)
}

fn wrap(kek: &[u8; 32], secret: &[u8]) -> Result<Vec<u8>, KeyFileError> {
    let kwp = KwpAes256::new(kek.into());
    let mut buf = vec![0u8; secret.len().div_ceil(8) * 8 + 8];
    let wrapped = kwp
        .wrap_key(secret, &mut buf)
        .map_err(|_| KeyFileError::Corrupt("secret cannot be wrapped".into()))?;
    Ok(wrapped.to_vec())
}

fn unwrap(kek: &[u8; 32], wrapped: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let kwp = KwpAes256::new(kek.into());
    let mut buf = Zeroizing::new(vec![0u8; wrapped.len()]);
    let len = kwp.unwrap_key(wrapped, &mut buf).ok()?.len();
    buf.truncate(len);
    Some(buf)
}

impl UnlockedKeyFile {
    /// A new, empty key file protected by `passphrase`.
    pub fn create<R: CryptoRng + ?Sized>(
        passphrase: &[u8],
        params: KdfParams,
        rng: &mut R,
    ) -> Result<Self, KeyFileError> {
        if passphrase.is_empty() {
            return Err(KeyFileError::EmptyPassphrase);
        }
        let mut salt = [0u8; 16];
        rng.fill_bytes(&mut salt);
        let kek = derive_kek(passphrase, &salt, &params)?;
        Ok(UnlockedKeyFile {
            params,
            salt,
            kek,
            secrets: BTreeMap::new(),
            public: BTreeMap::new(),
        })
    }

    /// Stores (or replaces) a named secret.
    pub fn put(&mut self, name: &str, secret: &[u8]) {
        self.secrets
            .insert(name.to_owned(), Zeroizing::new(secret.to_vec()));
    }

    /// Removes a named secret, so the next save erases it from disk.
    pub fn remove(&mut self, name: &str) -> bool {
        self.secrets.remove(name).is_some()
    }

    /// A named secret.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.secrets.get(name).map(|s| s.as_slice())
    }

    /// Names of the stored secrets.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.secrets.keys().map(String::as_str)
    }

    /// The sealed, serialisable form.
    pub fn seal(&self) -> Result<KeyFile, KeyFileError> {
        let mut secrets = BTreeMap::new();
        for (name, secret) in &self.secrets {
            secrets.insert(name.clone(), BASE64.encode(&wrap(&self.kek, secret)?));
        }
        Ok(KeyFile {
            version: KEYFILE_VERSION,
            kdf: "argon2id".into(),
            params: self.params,
            salt: BASE64.encode(&self.salt),
            secrets,
            public: self.public.clone(),
        })
    }

    /// Seals and writes the file atomically with mode 0600, creating the parent directory 0700.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let file = self.seal()?;
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| KeyFileError::Corrupt(format!("serialise: {e}")))?;
        write_private(path, &json)
    }
}

impl KeyFile {
    /// Parses a key file's bytes; anything unexpected is [`KeyFileError::Corrupt`].
    pub fn parse(bytes: &[u8]) -> Result<Self, KeyFileError> {
        let file: KeyFile = serde_json::from_slice(bytes)
            .map_err(|e| KeyFileError::Corrupt(format!("not a key file: {e}")))?;
        if file.version != KEYFILE_VERSION {
            return Err(KeyFileError::UnsupportedVersion(file.version));
        }
        if file.kdf != "argon2id" {
            return Err(KeyFileError::Corrupt(format!("unknown kdf {:?}", file.kdf)));
        }
        Ok(file)
    }

    /// Reads and parses a key file.
    pub fn read(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = fs::read(path).map_err(|source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes)
    }

    /// Unlocks with the passphrase. Parameters below [`KdfParams::MINIMUM`] are refused unless
    /// `allow_weak_kdf` (tests only), so a tampered file cannot downgrade the protection.
    pub fn unlock(
        &self,
        passphrase: &[u8],
        allow_weak_kdf: bool,
    ) -> Result<UnlockedKeyFile, KeyFileError> {
        if !allow_weak_kdf && self.params.is_weaker_than_minimum() {
            return Err(KeyFileError::WeakKdf);
        }
        let salt: [u8; 16] = BASE64
            .decode(self.salt.as_bytes())
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| KeyFileError::Corrupt("salt is not 16 base64 bytes".into()))?;
        if self.secrets.is_empty() {
            // With nothing to unwrap, any passphrase would "work": refuse instead.
            return Err(KeyFileError::Corrupt("the file holds no secrets".into()));
        }
        let mut wrapped = BTreeMap::new();
        for (name, value) in &self.secrets {
            let bytes = BASE64
                .decode(value.as_bytes())
                .map_err(|_| KeyFileError::Corrupt(format!("secret {name:?} is not base64")))?;
            if bytes.len() < 16 || bytes.len() % 8 != 0 {
                return Err(KeyFileError::Corrupt(format!(
                    "secret {name:?} has an impossible length"
                )));
            }
            wrapped.insert(name.clone(), bytes);
        }
        let kek = derive_kek(passphrase, &salt, &self.params)?;
        let mut secrets = BTreeMap::new();
        let mut failed = Vec::new();
        for (name, bytes) in &wrapped {
            match unwrap(&kek, bytes) {
                Some(secret) => {
                    secrets.insert(name.clone(), secret);
                }
                None => failed.push(name.clone()),
            }
        }
        if !failed.is_empty() {
            // If nothing opens, the passphrase is wrong; if some secrets open and others do
            // not, the passphrase is right and the file was damaged.
            return Err(if secrets.is_empty() {
                KeyFileError::WrongPassphrase
            } else {
                KeyFileError::Corrupt(format!("secrets {failed:?} fail their integrity check"))
            });
        }
        Ok(UnlockedKeyFile {
            params: self.params,
            salt,
            kek,
            secrets,
            public: self.public.clone(),
        })
    }
}

/// Writes `bytes` to `path` atomically with mode 0600, creating the parent directory with mode
/// 0700 if needed. Used for every file that holds secret material.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(dir).map_err(io)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keyfile".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Creates a directory (and its parents) readable only by its owner.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> impl CryptoRng {
        crate::crypto::os_rng()
    }

    #[test]
    fn round_trip_and_wrong_passphrase() {
        let mut f =
            UnlockedKeyFile::create(b"correct horse", KdfParams::INSECURE_FOR_TESTS, &mut rng())
                .unwrap();
        f.put("identity", &[7u8; 32]);
        f.put("history", &[9u8; 32]);
        f.public.insert("user_id".into(), "abc".into());
        let sealed = f.seal().unwrap();
        let json = serde_json::to_vec(&sealed).unwrap();
        let parsed = KeyFile::parse(&json).unwrap();
        let opened = parsed.unlock(b"correct horse", true).unwrap();
        assert_eq!(opened.get("identity"), Some(&[7u8; 32][..]));
        assert_eq!(opened.get("history"), Some(&[9u8; 32][..]));
        assert_eq!(
            opened.public.get("user_id").map(String::as_str),
            Some("abc")
        );
        assert!(matches!(
            parsed.unlock(b"wrong horse", true),
            Err(KeyFileError::WrongPassphrase)
        ));
    }

    #[test]
    fn weak_parameters_are_refused_unless_allowed() {
        let f = UnlockedKeyFile::create(b"pw", KdfParams::INSECURE_FOR_TESTS, &mut rng()).unwrap();
        let sealed = f.seal().unwrap();
        assert!(matches!(
            sealed.unlock(b"pw", false),
            Err(KeyFileError::WeakKdf)
        ));
    }

    #[test]
    fn empty_passphrase_is_refused() {
        assert!(matches!(
            UnlockedKeyFile::create(b"", KdfParams::INSECURE_FOR_TESTS, &mut rng()),
            Err(KeyFileError::EmptyPassphrase)
        ));
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("home").join("identity.key");
        let mut f =
            UnlockedKeyFile::create(b"pw", KdfParams::INSECURE_FOR_TESTS, &mut rng()).unwrap();
        f.put("identity", &[1u8; 32]);
        f.save(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let back = KeyFile::read(&path).unwrap().unlock(b"pw", true).unwrap();
        assert_eq!(back.get("identity"), Some(&[1u8; 32][..]));
    }
}
