//! The client's secrets: identity, prekeys (current and retired) and the local storage key,
//! all in one passphrase-protected key file (`identity.key`).
//!
//! One Argon2id derivation unlocks everything. Public facts (user id, signed prekeys, retirement
//! times) sit beside the secrets in the file's public section so that rotation bookkeeping does
//! not need the passphrase to be read.

use std::path::Path;

use anyhow::{Context, bail};
use data_encoding::BASE64;
use syncra_core::UserId;
use syncra_core::crypto::keyfile::{KdfParams, KeyFile, UnlockedKeyFile};
use syncra_core::crypto::keys::{IdentityKeyPair, PrekeyRing, PrekeySecret, SignedPrekey};
use syncra_core::crypto::local_box::LocalKey;
use syncra_core::error::KeyFileError;
use zeroize::Zeroizing;

const IDENTITY: &str = "identity";
const STORAGE: &str = "storage";
const CURRENT: &str = "prekey.current";
const RETIRED_PREFIX: &str = "prekey.retired.";

/// Unlocked keys, and the means to save changes to them.
pub struct KeyStore {
    file: UnlockedKeyFile,
    /// The identity.
    pub identity: IdentityKeyPair,
    /// Current and retired prekeys.
    pub ring: PrekeyRing,
    /// The key that encrypts history and the outbox.
    pub storage: LocalKey,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("user_id", &self.identity.user_id())
            .finish_non_exhaustive()
    }
}

/// What went wrong unlocking, in words a person can act on.
pub fn explain(e: KeyFileError, path: &Path) -> anyhow::Error {
    match e {
        KeyFileError::WrongPassphrase => anyhow::anyhow!(
            "wrong passphrase for {}; nothing was changed, try again",
            path.display()
        ),
        KeyFileError::Corrupt(why) => anyhow::anyhow!(
            "the key file {} is damaged ({why}); it was left untouched — restore it from a \
             backup",
            path.display()
        ),
        other => anyhow::anyhow!("{}: {other}", path.display()),
    }
}

fn signed_to_json(s: &SignedPrekey) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

impl KeyStore {
    /// Creates a new identity with a first prekey and a storage key.
    pub fn create(passphrase: &[u8], params: KdfParams, now_secs: u64) -> anyhow::Result<Self> {
        let file = UnlockedKeyFile::create(passphrase, params, &mut syncra_core::crypto::os_rng())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let identity = IdentityKeyPair::generate();
        let ring = PrekeyRing::new(PrekeySecret::generate(&identity, now_secs));
        let storage = LocalKey::generate();
        let mut ks = KeyStore {
            file,
            identity,
            ring,
            storage,
        };
        ks.sync_file();
        Ok(ks)
    }

    /// Reads and unlocks the key file.
    pub fn unlock(path: &Path, passphrase: &[u8], allow_weak_kdf: bool) -> anyhow::Result<Self> {
        let file = KeyFile::read(path).map_err(|e| explain(e, path))?;
        let file = file
            .unlock(passphrase, allow_weak_kdf)
            .map_err(|e| explain(e, path))?;
        Self::from_file(file, path)
    }

    /// Takes in what another process saved since (a rotation, an erasure), with the key already
    /// in memory: no passphrase, no Argon2id run. The identity must be the same one.
    pub fn reload(&mut self, path: &Path) -> anyhow::Result<()> {
        let file = KeyFile::read(path).map_err(|e| explain(e, path))?;
        let file = file
            .unlock_again(&self.file)
            .map_err(|e| explain(e, path))?;
        let fresh = Self::from_file(file, path)?;
        if fresh.user_id() != self.user_id() {
            bail!(
                "{} now holds another identity; refusing to mix them (restart this process)",
                path.display()
            );
        }
        *self = fresh;
        Ok(())
    }

    /// Changes the keys with no update lost to another process on the same home: under an
    /// exclusive lock on `<key file>.lock`, the file is read again, `change` runs on what it
    /// holds, and the file is saved if `change` says it changed something. Two processes that
    /// rotate at once therefore rotate once; an erasure one made is not undone by the other.
    pub fn update<T>(
        &mut self,
        path: &Path,
        change: impl FnOnce(&mut KeyStore) -> (T, bool),
    ) -> anyhow::Result<T> {
        let lock_path = path.with_extension("key.lock");
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).truncate(false).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let lock = opts
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
        self.reload(path)?;
        let (result, changed) = change(self);
        if changed {
            self.save(path)?;
        }
        Ok(result)
    }

    fn from_file(file: UnlockedKeyFile, path: &Path) -> anyhow::Result<Self> {
        let corrupt = |what: &str| {
            anyhow::anyhow!(
                "the key file {} is damaged ({what}); it was left untouched",
                path.display()
            )
        };
        // Copied straight into memory that is wiped on drop, never into a plain array.
        let secret32 = |name: &str| -> anyhow::Result<Zeroizing<[u8; 32]>> {
            let bytes = file
                .get(name)
                .filter(|s| s.len() == 32)
                .ok_or_else(|| corrupt(name))?;
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(bytes);
            Ok(out)
        };
        let seed = secret32(IDENTITY).map_err(|_| corrupt("no identity"))?;
        let identity = IdentityKeyPair::from_seed(&seed);
        if let Some(id) = file.public.get("user_id")
            && *id != identity.user_id().to_string()
        {
            bail!(corrupt("the identity does not match the recorded user id"));
        }
        let storage = file
            .get(STORAGE)
            .and_then(LocalKey::from_bytes)
            .ok_or_else(|| corrupt("no storage key"))?;
        let restore = |name: &str| -> anyhow::Result<PrekeySecret> {
            let secret = secret32(name)?;
            let signed: SignedPrekey = file
                .public
                .get(&format!("{name}.signed"))
                .and_then(|j| serde_json::from_str(j).ok())
                .ok_or_else(|| corrupt(name))?;
            PrekeySecret::restore(&identity.public(), &secret, signed)
                .map_err(|e| corrupt(&format!("{name}: {e}")))
        };
        let current = restore(CURRENT)?;
        let mut retired = Vec::new();
        let names: Vec<String> = file.names().map(str::to_owned).collect();
        // In an unauthenticated (version 1) file, anyone who could write it could have moved a
        // retirement time, to keep a prekey forever or to erase it early: those times are not
        // believed, every retired prekey counts as retired now (kept one full grace period, then
        // erased). The next save authenticates the file.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for name in names.iter().filter(|n| n.starts_with(RETIRED_PREFIX)) {
            let at: u64 = file
                .public
                .get(&format!("{name}.retired_at"))
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| corrupt(name))?;
            let at = if file.authenticated() { at } else { now };
            retired.push((restore(name)?, at));
        }
        Ok(KeyStore {
            file,
            identity,
            ring: PrekeyRing::from_parts(current, retired),
            storage,
        })
    }

    /// Writes the in-memory keys into the unlocked file's sections.
    fn sync_file(&mut self) {
        let names: Vec<String> = self.file.names().map(str::to_owned).collect();
        for n in names {
            self.file.remove(&n);
        }
        self.file.public.clear();
        self.file.put(IDENTITY, self.identity.seed().as_ref());
        self.file.put(STORAGE, self.storage.as_bytes());
        self.file
            .public
            .insert("user_id".into(), self.identity.user_id().to_string());
        self.file.public.insert(
            "identity_key".into(),
            BASE64.encode(&self.identity.public()),
        );
        let current = self.ring.current();
        self.file.put(CURRENT, current.secret_bytes().as_ref());
        self.file.public.insert(
            format!("{CURRENT}.signed"),
            signed_to_json(current.signed()),
        );
        for (i, (key, at)) in self.ring.retired().iter().enumerate() {
            let name = format!("{RETIRED_PREFIX}{i}");
            self.file.put(&name, key.secret_bytes().as_ref());
            self.file
                .public
                .insert(format!("{name}.signed"), signed_to_json(key.signed()));
            self.file
                .public
                .insert(format!("{name}.retired_at"), at.to_string());
        }
    }

    /// Saves the key file (atomically, 0600).
    pub fn save(&mut self, path: &Path) -> anyhow::Result<()> {
        self.sync_file();
        self.file
            .save(path)
            .with_context(|| format!("saving {}", path.display()))
    }

    /// The user id.
    pub fn user_id(&self) -> UserId {
        self.identity.user_id()
    }

    /// Rotates the prekey if it is due, erasing retired prekeys past their grace period.
    /// Returns the new signed prekey to publish, if one was made. The caller saves the file.
    pub fn rotate_if_due(
        &mut self,
        now_secs: u64,
        rotation_secs: u64,
        grace_secs: u64,
    ) -> Option<SignedPrekey> {
        let erased = self.ring.expire(now_secs, grace_secs);
        if erased > 0 {
            tracing::info!(erased, "erased retired prekeys past their grace period");
        }
        if self
            .ring
            .current()
            .due_for_rotation(now_secs, rotation_secs)
        {
            let next = PrekeySecret::generate(&self.identity, now_secs);
            let signed = next.signed().clone();
            self.ring.rotate(next, now_secs);
            Some(signed)
        } else {
            None
        }
    }
}

/// Where a passphrase comes from.
#[derive(Clone, Debug)]
pub enum PassphraseSource {
    /// Ask on the terminal.
    Prompt,
    /// From the `SYNCRA_PASSPHRASE` environment variable.
    Env,
    /// From the first line of a file.
    File(std::path::PathBuf),
    /// Given directly (the TUI's unlock screen, tests).
    Given(Zeroizing<String>),
}

impl PassphraseSource {
    /// The usual choice: a file if given, else the environment variable if set, else a prompt.
    pub fn choose(file: Option<std::path::PathBuf>) -> Self {
        match file {
            Some(f) => PassphraseSource::File(f),
            None if std::env::var_os("SYNCRA_PASSPHRASE").is_some() => PassphraseSource::Env,
            None => PassphraseSource::Prompt,
        }
    }

    /// Reads the passphrase. With `confirm`, a prompt asks twice.
    pub fn read(&self, prompt: &str, confirm: bool) -> anyhow::Result<Zeroizing<String>> {
        let pass = match self {
            PassphraseSource::Given(p) => p.clone(),
            PassphraseSource::Env => Zeroizing::new(
                std::env::var("SYNCRA_PASSPHRASE")
                    .context("SYNCRA_PASSPHRASE is not valid UTF-8")?,
            ),
            PassphraseSource::File(path) => {
                let text =
                    Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                        format!("reading the passphrase file {}", path.display())
                    })?);
                Zeroizing::new(text.lines().next().unwrap_or_default().to_owned())
            }
            PassphraseSource::Prompt => {
                let first = Zeroizing::new(
                    rpassword::prompt_password(prompt)
                        .context("reading the passphrase from the terminal (no terminal? use SYNCRA_PASSPHRASE or --passphrase-file)")?,
                );
                if confirm {
                    let second = Zeroizing::new(
                        rpassword::prompt_password("Repeat the passphrase: ")
                            .context("reading the passphrase again")?,
                    );
                    if *first != *second {
                        bail!("the passphrases do not match; nothing was created");
                    }
                }
                first
            }
        };
        if pass.is_empty() {
            bail!("the passphrase is empty");
        }
        Ok(pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_processes_rotating_at_once_rotate_once_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let mut created = KeyStore::create(b"pw", KdfParams::INSECURE_FOR_TESTS, 1000).unwrap();
        created.save(&path).unwrap();
        let first = *created.ring.current().public();
        // Two processes on one home (a listener and the TUI, say), both unlocked at the start.
        let mut a = KeyStore::unlock(&path, b"pw", true).unwrap();
        let mut b = KeyStore::unlock(&path, b"pw", true).unwrap();
        let rotate = |ks: &mut KeyStore, now: u64| {
            ks.update(&path, |k| {
                let before = k.ring.retired().len();
                let new = k.rotate_if_due(now, 100, 50);
                let changed = new.is_some() || k.ring.retired().len() != before;
                (new, changed)
            })
            .unwrap()
        };
        let made = rotate(&mut a, 1100).expect("due for a");
        // B's copy is stale, but it rotates on what the file holds: not due any more.
        assert!(rotate(&mut b, 1101).is_none(), "rotated twice");
        assert_eq!(b.ring.current().signed(), &made, "b took in a's rotation");
        assert!(b.ring.find(&first).is_some(), "the retired prekey is kept");
        // A erases the retired prekey after its grace; B's stale copy does not bring it back.
        rotate(&mut a, 1100 + 60);
        assert!(a.ring.find(&first).is_none());
        b.update(&path, |_| ((), true)).unwrap();
        let back = KeyStore::unlock(&path, b"pw", true).unwrap();
        assert!(back.ring.find(&first).is_none(), "an erasure was undone");
    }

    #[test]
    fn retirement_times_in_an_unauthenticated_file_are_not_believed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let mut ks = KeyStore::create(b"pw", KdfParams::INSECURE_FOR_TESTS, 1000).unwrap();
        let old = *ks.ring.current().public();
        ks.rotate_if_due(1100, 100, 50).unwrap();
        ks.save(&path).unwrap();
        // Downgraded to version 1 (no mac) with a retirement time far in the future, which
        // would keep the retired prekey from ever being erased.
        let mut file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        file["version"] = 1.into();
        file.as_object_mut().unwrap().remove("mac");
        file["public"]["prekey.retired.0.retired_at"] = "99999999999".into();
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let back = KeyStore::unlock(&path, b"pw", true).unwrap();
        let (_, at) = back.ring.retired()[0];
        assert!(at < 99_999_999_999, "the edited time was believed");
        assert!(back.ring.find(&old).is_some());
        // Edited in a version 2 file, it is refused outright.
        ks.save(&path).unwrap();
        let mut file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        file["public"]["prekey.retired.0.retired_at"] = "99999999999".into();
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let err = KeyStore::unlock(&path, b"pw", true).unwrap_err();
        assert!(err.to_string().contains("authentication"), "{err}");
    }

    #[test]
    fn create_save_unlock_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let mut ks = KeyStore::create(b"pw", KdfParams::INSECURE_FOR_TESTS, 1000).unwrap();
        ks.save(&path).unwrap();
        let back = KeyStore::unlock(&path, b"pw", true).unwrap();
        assert_eq!(back.user_id(), ks.user_id());
        assert_eq!(back.ring.current().signed(), ks.ring.current().signed());

        let old = *ks.ring.current().public();
        assert!(ks.rotate_if_due(1000 + 10, 100, 50).is_none());
        let new = ks.rotate_if_due(1000 + 100, 100, 50).unwrap();
        assert_ne!(new.public, old);
        ks.save(&path).unwrap();
        let back = KeyStore::unlock(&path, b"pw", true).unwrap();
        assert!(
            back.ring.find(&old).is_some(),
            "retired prekey kept for grace"
        );
        assert_eq!(back.ring.current().signed(), &new);

        let mut ks = back;
        ks.rotate_if_due(1000 + 100 + 50, 1000, 50);
        ks.save(&path).unwrap();
        let back = KeyStore::unlock(&path, b"pw", true).unwrap();
        assert!(back.ring.find(&old).is_none(), "erased after grace");
        let err = KeyStore::unlock(&path, b"nope", true).unwrap_err();
        assert!(err.to_string().contains("wrong passphrase"), "{err}");
    }
}
