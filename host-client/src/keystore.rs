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
        let corrupt = |what: &str| {
            anyhow::anyhow!(
                "the key file {} is damaged ({what}); it was left untouched",
                path.display()
            )
        };
        let seed: [u8; 32] = file
            .get(IDENTITY)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| corrupt("no identity"))?;
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
            let secret: [u8; 32] = file
                .get(name)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| corrupt(name))?;
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
        for name in names.iter().filter(|n| n.starts_with(RETIRED_PREFIX)) {
            let at: u64 = file
                .public
                .get(&format!("{name}.retired_at"))
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| corrupt(name))?;
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
