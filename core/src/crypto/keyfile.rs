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
//!
//! Version 2 authenticates the whole file: an HMAC-SHA256 (`mac`), under a key derived from the
//! key-encryption key, over the parameters, the salt, every wrapped secret *with its name* and
//! every public fact. KWP alone protects each secret but not which name it sits under, nor the
//! public section — and the public section holds facts that control erasure (when a prekey was
//! retired). Someone who can write the file but does not know the passphrase can no longer move
//! a secret to another name or change a retirement time: the unlock fails as tampered.
//! A version 1 file (no `mac`) still opens; it is rewritten as version 2 at its next save, and
//! until then nothing in its public section may be trusted ([`UnlockedKeyFile::authenticated`]).

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

use hmac::Mac;
use subtle::ConstantTimeEq;

use crate::crypto::transcript::Transcript;
use crate::error::KeyFileError;

/// The key file format version written today (version 1, without `mac`, is still read).
pub const KEYFILE_VERSION: u32 = 2;

/// Wrapped secrets by name, decoded from base64.
type Wrapped = BTreeMap<String, Vec<u8>>;

/// The last version without a `mac`.
const UNAUTHENTICATED_VERSION: u32 = 1;

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
    /// Base64 HMAC-SHA256 over everything above (version 2 on; see the module docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A key file opened with its passphrase: the secrets and the key to re-seal them.
pub struct UnlockedKeyFile {
    params: KdfParams,
    salt: [u8; 16],
    kek: Zeroizing<[u8; 32]>,
    secrets: BTreeMap<String, Zeroizing<Vec<u8>>>,
    /// Public facts, as in the file.
    pub public: BTreeMap<String, String>,
    /// Whether the file was authenticated (version 2) when it was opened.
    authenticated: bool,
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

/// The file's MAC: HMAC-SHA256 under `HMAC(kek, "syncra/v2/keyfile-mac")`, over a transcript of
/// every field with lengths, so no two different files share an input.
fn file_mac(
    kek: &[u8; 32],
    params: &KdfParams,
    salt: &[u8; 16],
    secrets: &BTreeMap<String, String>,
    public: &BTreeMap<String, String>,
) -> [u8; 32] {
    type HmacSha256 = hmac::Hmac<sha2::Sha256>;
    let mut derive = <HmacSha256 as KeyInit>::new_from_slice(kek).expect("any key length");
    derive.update(b"syncra/v2/keyfile-mac");
    let mac_key = Zeroizing::new(derive.finalize().into_bytes());
    let mut t = Transcript::new("syncra/v2/keyfile");
    t.u32(KEYFILE_VERSION)
        .u32(params.m_kib)
        .u32(params.t)
        .u32(params.p)
        .fixed(salt)
        .u32(u32::try_from(secrets.len()).unwrap_or(u32::MAX));
    for (name, value) in secrets {
        t.bytes(name.as_bytes()).bytes(value.as_bytes());
    }
    t.u32(u32::try_from(public.len()).unwrap_or(u32::MAX));
    for (name, value) in public {
        t.bytes(name.as_bytes()).bytes(value.as_bytes());
    }
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(mac_key.as_slice()).expect("any key length");
    mac.update(t.as_bytes());
    mac.finalize().into_bytes().into()
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
            authenticated: true,
        })
    }

    /// Whether what was read is authenticated: true for a version 2 file (and a new one), false
    /// for a version 1 file, whose public section anyone with write access could have changed.
    /// Callers must not let an unauthenticated public fact shorten or stretch a key's life.
    pub fn authenticated(&self) -> bool {
        self.authenticated
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
        let mac = file_mac(&self.kek, &self.params, &self.salt, &secrets, &self.public);
        Ok(KeyFile {
            version: KEYFILE_VERSION,
            kdf: "argon2id".into(),
            params: self.params,
            salt: BASE64.encode(&self.salt),
            secrets,
            public: self.public.clone(),
            mac: Some(BASE64.encode(&mac)),
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
        if file.version != KEYFILE_VERSION && file.version != UNAUTHENTICATED_VERSION {
            return Err(KeyFileError::UnsupportedVersion(file.version));
        }
        if (file.version == KEYFILE_VERSION) != file.mac.is_some() {
            return Err(KeyFileError::Corrupt(format!(
                "a version {} file {} a mac",
                file.version,
                if file.mac.is_some() {
                    "cannot have"
                } else {
                    "must have"
                }
            )));
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
        let (salt, wrapped) = self.checked_parts()?;
        let kek = derive_kek(passphrase, &salt, &self.params)?;
        self.open_with(kek, salt, wrapped)
    }

    /// The salt and the decoded wrapped secrets, checked for shape.
    fn checked_parts(&self) -> Result<([u8; 16], Wrapped), KeyFileError> {
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
        Ok((salt, wrapped))
    }

    /// Reads the file again with the key of an already unlocked copy — no passphrase, no
    /// Argon2id run — so a process can take in what another process saved. Refused if the file
    /// was re-keyed (another salt or parameters: its passphrase changed).
    pub fn unlock_again(
        &self,
        unlocked: &UnlockedKeyFile,
    ) -> Result<UnlockedKeyFile, KeyFileError> {
        let (salt, wrapped) = self.checked_parts()?;
        if salt != unlocked.salt || self.params != unlocked.params {
            return Err(KeyFileError::Corrupt(
                "the key file was re-keyed by another process; unlock it again".into(),
            ));
        }
        self.open_with(unlocked.kek.clone(), salt, wrapped)
    }

    /// Unwraps every secret with `kek` and checks the file's MAC.
    fn open_with(
        &self,
        kek: Zeroizing<[u8; 32]>,
        salt: [u8; 16],
        wrapped: Wrapped,
    ) -> Result<UnlockedKeyFile, KeyFileError> {
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
        // The passphrase is right (the secrets opened); now the file as a whole must be the
        // one that passphrase sealed.
        if let Some(mac) = &self.mac {
            let expected = file_mac(&kek, &self.params, &salt, &self.secrets, &self.public);
            let given = BASE64.decode(mac.as_bytes()).unwrap_or_default();
            if !bool::from(given.as_slice().ct_eq(&expected)) {
                return Err(KeyFileError::Corrupt(
                    "the file fails its authentication check: it was changed outside Syncra \
                     (a secret moved or a public fact edited)"
                        .into(),
                ));
            }
        }
        Ok(UnlockedKeyFile {
            params: self.params,
            salt,
            kek,
            secrets,
            public: self.public.clone(),
            authenticated: self.mac.is_some(),
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
    // A temporary file of this write's own (a random name, created new): two writes of one
    // file at once — two threads, two processes, two containers whose processes share a pid —
    // each rename a whole file into place, the last one standing, never a mix.
    let mut suffix = [0u8; 8];
    crate::crypto::fill_random(&mut suffix);
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}",
        data_encoding::HEXLOWER.encode(&suffix)
    ));
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io(e)
    })?;
    // The rename itself is made durable with the directory (some file systems refuse to sync
    // a directory; the file is in place either way).
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
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

    fn two_secrets() -> KeyFile {
        let mut f =
            UnlockedKeyFile::create(b"pw", KdfParams::INSECURE_FOR_TESTS, &mut rng()).unwrap();
        f.put("prekey.current", &[1u8; 32]);
        f.put("prekey.retired.0", &[2u8; 32]);
        f.public
            .insert("prekey.retired.0.retired_at".into(), "1000".into());
        f.seal().unwrap()
    }

    #[test]
    fn an_edited_public_fact_is_refused_as_tampered() {
        let mut file = two_secrets();
        assert!(file.unlock(b"pw", true).unwrap().authenticated());
        // Pushing a retirement into the future would keep a prekey from being erased.
        file.public
            .insert("prekey.retired.0.retired_at".into(), "99999999999".into());
        let err = file.unlock(b"pw", true).unwrap_err();
        assert!(
            matches!(&err, KeyFileError::Corrupt(why) if why.contains("authentication")),
            "{err}"
        );
    }

    #[test]
    fn a_secret_moved_to_another_name_is_refused_as_tampered() {
        let mut file = two_secrets();
        let current = file.secrets["prekey.current"].clone();
        let retired = file.secrets["prekey.retired.0"].clone();
        file.secrets.insert("prekey.current".into(), retired);
        file.secrets.insert("prekey.retired.0".into(), current);
        assert!(matches!(
            file.unlock(b"pw", true),
            Err(KeyFileError::Corrupt(_))
        ));
        // A wrong passphrase is still told apart from tampering.
        assert!(matches!(
            two_secrets().unlock(b"nope", true),
            Err(KeyFileError::WrongPassphrase)
        ));
    }

    #[test]
    fn a_version_1_file_opens_but_is_not_authenticated() {
        let mut file = two_secrets();
        file.version = UNAUTHENTICATED_VERSION;
        file.mac = None;
        let json = serde_json::to_vec(&file).unwrap();
        let opened = KeyFile::parse(&json).unwrap().unlock(b"pw", true).unwrap();
        assert!(!opened.authenticated());
        // Saved again, it is version 2 and authenticated.
        let resealed = opened.seal().unwrap();
        assert_eq!(resealed.version, KEYFILE_VERSION);
        assert!(resealed.unlock(b"pw", true).unwrap().authenticated());
        // A version 2 file without its mac is not a version 2 file.
        let mut stripped = two_secrets();
        stripped.mac = None;
        let json = serde_json::to_vec(&stripped).unwrap();
        assert!(matches!(
            KeyFile::parse(&json),
            Err(KeyFileError::Corrupt(_))
        ));
    }

    #[test]
    fn unlock_again_reads_another_process_save_without_the_passphrase() {
        let file = two_secrets();
        let mine = file.unlock(b"pw", true).unwrap();
        let mut theirs = file.unlock(b"pw", true).unwrap();
        theirs.put("prekey.retired.1", &[3u8; 32]);
        let saved = theirs.seal().unwrap();
        let again = saved.unlock_again(&mine).unwrap();
        assert_eq!(again.get("prekey.retired.1"), Some(&[3u8; 32][..]));
        // A file re-keyed under another passphrase is not read with the old key.
        let other =
            UnlockedKeyFile::create(b"pw2", KdfParams::INSECURE_FOR_TESTS, &mut rng()).unwrap();
        let mut other = other;
        other.put("x", &[0u8; 32]);
        assert!(other.seal().unwrap().unlock_again(&mine).is_err());
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

    /// Two threads writing one file at once: every write succeeds, and the file is always one
    /// of the two contents whole, never a mix, and no temporary file is left. (Before, both
    /// wrote one temporary file named after the process: one truncated what the other was
    /// writing, the torn file was renamed into place, and the other's rename failed.)
    #[test]
    fn writes_of_one_file_at_once_never_mix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let contents = &[vec![1u8; 300_000], vec![2u8; 100_000]];
        std::thread::scope(|scope| {
            for content in contents {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..50 {
                        write_private(path, content).unwrap();
                        let now = fs::read(path).unwrap();
                        assert!(
                            contents.contains(&now),
                            "a mixed file of {} bytes",
                            now.len()
                        );
                    }
                });
            }
        });
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
