//! Contacts (pinned on first use) and client-side groups.
//!
//! A contact is pinned by handle to one identity key on first use. Because a user id is the hash
//! of its key, a relay cannot change the key behind a known id — but it can answer a handle with
//! a different id. When that happens the contact is marked `key_changed`: sending to it and
//! showing messages from the new key are blocked until the person re-verifies.
//!
//! They are the social graph, so at rest they are encrypted with the storage key like history
//! (`contacts.sealed`, `groups.sealed`, each sealed under its own label); plaintext
//! `contacts.json` and `groups.json` left by older versions are read once and replaced on the
//! next save. Files are written atomically with mode 0600.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use syncra_core::crypto::keyfile::write_private;
use syncra_core::crypto::keys::SignedPrekey;
use syncra_core::crypto::local_box::LocalKey;
use syncra_core::{IdentityRecord, UserId};

/// A pinned contact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    /// The handle it was added under.
    pub handle: String,
    /// The pinned identity (id, key, last known prekey).
    pub record: IdentityRecord,
    /// Whether the safety number was compared and marked verified.
    pub verified: bool,
    /// When it was pinned (ms).
    pub added_ms: u64,
    /// A different identity now answers to this handle; sending is blocked until re-verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_changed: Option<IdentityRecord>,
    /// Added because they wrote first (a message request), not by me.
    #[serde(default)]
    pub request: bool,
}

/// My entry for a group: its local name and the membership shown, for an MLS group
/// (docs/PROTOCOL.md §9.8). The members are the MLS roster, brought in line with it by every
/// commit and message; the name is only a suggestion from a peer turned into a local name
/// ([`local_group_name`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// The MLS group id as 32 lowercase hex characters.
    pub id: String,
    /// My local name for it (unique among my groups); `@name` resolves by this only.
    pub name: String,
    /// Members, including me (the MLS roster, in leaf order).
    pub members: Vec<UserId>,
    /// When the members were last brought in line with the roster (ms).
    pub updated_ms: u64,
    /// Who named it to me (its creator, for groups I saw created). Shown, not trusted: any
    /// member may change an MLS group's members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<UserId>,
}

/// Length of a group id: 128 bits as lowercase hex.
pub const GROUP_ID_LEN: usize = 32;

/// Whether `id` is a group id: exactly 32 lowercase hex characters. Anything else a peer sends
/// as a group id is refused, so a group id is always safe inside a file name.
pub fn valid_group_id(id: &str) -> bool {
    id.len() == GROUP_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random group id.
pub fn new_group_id() -> String {
    let mut gid = [0u8; GROUP_ID_LEN / 2];
    syncra_core::crypto::fill_random(&mut gid);
    data_encoding::HEXLOWER.encode(&gid)
}

/// Whether `name` is acceptable as a local group name: one word of at most 32 letters, digits,
/// `-` or `_`, not starting with `@`.
pub fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A local name made from the name a peer suggested: only the characters a local name may
/// have, at most 32, `group` if nothing is left.
pub fn local_group_name(suggested: &str) -> String {
    let name: String = suggested
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(24)
        .collect();
    if name.is_empty() {
        "group".into()
    } else {
        name
    }
}

/// Contacts and groups on disk.
///
/// Several processes may share one home (the TUI, `listen`, a bot, one-shot commands), so a
/// change is made under an exclusive lock on `book.lock`, on a copy reloaded from disk just
/// before: take [`Book::lock`], change, [`Book::save`], drop the guard. Nobody writes back a
/// stale copy, so no process undoes another's change.
#[derive(Debug)]
pub struct Book {
    contacts_path: PathBuf,
    groups_path: PathBuf,
    key: LocalKey,
    /// Contacts by user id.
    pub contacts: BTreeMap<UserId, Contact>,
    /// Groups by id.
    pub groups: BTreeMap<String, Group>,
}

const CONTACTS_LABEL: &[u8] = b"syncra/v1/contacts";
const GROUPS_LABEL: &[u8] = b"syncra/v1/groups";

/// The plaintext file an older version kept instead of `path`.
fn legacy_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

fn load<T: for<'de> Deserialize<'de> + Default>(
    path: &Path,
    key: &LocalKey,
    label: &[u8],
) -> anyhow::Result<T> {
    let damaged = || {
        format!(
            "{} is damaged (or from another identity) and was left untouched; fix or restore it",
            path.display()
        )
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let plain = key
                .open(label, &bytes)
                .map_err(|_| anyhow::anyhow!(damaged()))?;
            serde_json::from_slice(&plain).with_context(damaged)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let legacy = legacy_path(path);
            match std::fs::read(&legacy) {
                Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "{} is damaged and was left untouched; fix or restore it",
                        legacy.display()
                    )
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
                Err(e) => Err(e).with_context(|| format!("reading {}", legacy.display())),
            }
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_sealed(path: &Path, key: &LocalKey, label: &[u8], json: &[u8]) -> anyhow::Result<()> {
    write_private(path, &key.seal(label, json))?;
    // The plaintext an older version kept goes once its sealed replacement is on disk.
    match std::fs::remove_file(legacy_path(path)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", legacy_path(path).display())),
    }
}

/// Holds the book's lock; dropping it releases the lock.
#[derive(Debug)]
#[must_use = "the lock is released when this is dropped"]
pub struct BookLock {
    _file: std::fs::File,
}

impl Book {
    /// Takes the exclusive lock shared by every process on this home (waiting for it), then
    /// reloads both files, so what is changed next is the latest state.
    pub fn lock(&mut self) -> anyhow::Result<BookLock> {
        let path = self.lock_path();
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).truncate(false).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        self.refresh()?;
        Ok(BookLock { _file: file })
    }

    /// Reloads both files (another process may have changed them).
    pub fn refresh(&mut self) -> anyhow::Result<()> {
        let fresh = Book::load(
            self.contacts_path.clone(),
            self.groups_path.clone(),
            self.key.clone(),
        )?;
        self.contacts = fresh.contacts;
        self.groups = fresh.groups;
        Ok(())
    }

    fn lock_path(&self) -> PathBuf {
        self.contacts_path.with_file_name("book.lock")
    }

    /// Loads both files, sealed with `key` (missing files are empty).
    pub fn load(
        contacts_path: PathBuf,
        groups_path: PathBuf,
        key: LocalKey,
    ) -> anyhow::Result<Self> {
        let contacts: Vec<Contact> = load(&contacts_path, &key, CONTACTS_LABEL)?;
        let groups: Vec<Group> = load(&groups_path, &key, GROUPS_LABEL)?;
        Ok(Book {
            contacts: contacts
                .into_iter()
                .map(|c| (c.record.user_id, c))
                .collect(),
            groups: groups
                .into_iter()
                .filter(|g| {
                    // Left by an older version that trusted peers' group ids: never used.
                    let ok = valid_group_id(&g.id);
                    if !ok {
                        tracing::warn!(
                            "ignoring a group with an invalid id ({}) in the groups file",
                            syncra_core::text::escape_untrusted(&g.id)
                        );
                    }
                    ok
                })
                .map(|g| (g.id.clone(), g))
                .collect(),
            contacts_path,
            groups_path,
            key,
        })
    }

    /// Saves both files.
    pub fn save(&self) -> anyhow::Result<()> {
        let contacts: Vec<&Contact> = self.contacts.values().collect();
        let json = zeroize::Zeroizing::new(serde_json::to_vec(&contacts)?);
        save_sealed(&self.contacts_path, &self.key, CONTACTS_LABEL, &json)?;
        let groups: Vec<&Group> = self.groups.values().collect();
        let json = zeroize::Zeroizing::new(serde_json::to_vec(&groups)?);
        save_sealed(&self.groups_path, &self.key, GROUPS_LABEL, &json)?;
        Ok(())
    }

    /// The contact pinned for a handle.
    pub fn by_handle(&self, handle: &str) -> Option<&Contact> {
        let handle = handle.trim().to_ascii_lowercase();
        self.contacts.values().find(|c| c.handle == handle)
    }

    /// The contact for a user id.
    pub fn by_id(&self, id: &UserId) -> Option<&Contact> {
        self.contacts.get(id)
    }

    /// A group by my local name. Never by id: ids are chosen by others, names are mine.
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.values().find(|g| g.name == name)
    }

    /// A local group name like `name` that none of my groups has yet (`name-2`, `name-3`...).
    pub fn unique_group_name(&self, name: &str) -> String {
        let mut candidate = name.to_owned();
        let mut n = 2;
        while self.group(&candidate).is_some() {
            candidate = format!("{name}-{n}");
            n += 1;
        }
        candidate
    }

    /// Whether `id` is a contact I accepted: added by me (or verified), not a message request,
    /// not blocked by a key change.
    pub fn is_accepted(&self, id: &UserId) -> bool {
        self.contacts
            .get(id)
            .is_some_and(|c| !c.request && c.key_changed.is_none())
    }

    /// The identity key pinned for a user id (for the envelope's pinned-key check).
    pub fn pinned_key(&self, id: &UserId) -> Option<[u8; 32]> {
        self.contacts.get(id).map(|c| c.record.identity_key)
    }

    /// Pins a record found by handle, or reports that the handle now has another key.
    pub fn pin(&mut self, record: IdentityRecord, request: bool, now_ms: u64) -> PinOutcome {
        let handle = record.handle.as_str().to_owned();
        if let Some(existing) = self.by_handle(&handle).cloned() {
            if existing.record.user_id == record.user_id {
                // Same identity: refresh the prekey (its signature was verified by the caller).
                if let Some(c) = self.contacts.get_mut(&record.user_id) {
                    c.record.prekey = newer(&c.record.prekey, &record.prekey);
                    if !request {
                        c.request = false;
                    }
                }
                return PinOutcome::Unchanged;
            }
            if let Some(c) = self.contacts.get_mut(&existing.record.user_id) {
                c.key_changed = Some(record);
            }
            return PinOutcome::KeyChanged(Box::new(existing));
        }
        self.contacts.insert(
            record.user_id,
            Contact {
                handle,
                record,
                verified: false,
                added_ms: now_ms,
                key_changed: None,
                request,
            },
        );
        PinOutcome::Pinned
    }

    /// Accepts a changed key for a handle after the person re-verified: the new identity
    /// replaces the old pin (whose history stays in its own file).
    pub fn accept_key_change(&mut self, handle: &str, now_ms: u64) -> Option<Contact> {
        let old = self.by_handle(handle)?.clone();
        let new = old.key_changed.clone()?;
        self.contacts.remove(&old.record.user_id);
        let contact = Contact {
            handle: old.handle.clone(),
            record: new,
            verified: true,
            added_ms: now_ms,
            key_changed: None,
            request: false,
        };
        self.contacts
            .insert(contact.record.user_id, contact.clone());
        Some(contact)
    }

    /// A display name for a user id.
    pub fn name_of(&self, id: &UserId) -> String {
        match self.contacts.get(id) {
            Some(c) => c.handle.clone(),
            None => id.short(),
        }
    }
}

fn newer(a: &SignedPrekey, b: &SignedPrekey) -> SignedPrekey {
    if b.created_at >= a.created_at {
        b.clone()
    } else {
        a.clone()
    }
}

/// What pinning a record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinOutcome {
    /// A new contact.
    Pinned,
    /// Already pinned to this identity.
    Unchanged,
    /// The handle is pinned to another identity; the contact is now blocked until re-verified.
    KeyChanged(Box<Contact>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_have_one_format() {
        for (id, ok) in [
            ("0123456789abcdef0123456789abcdef", true),
            ("0123456789ABCDEF0123456789abcdef", false),
            ("ops", false),
            ("../../../etc/passwd", false),
            ("0123456789abcdef0123456789abcde/", false),
            ("0123456789abcdef0123456789abcde\0", false),
            ("", false),
        ] {
            assert_eq!(valid_group_id(id), ok, "{id:?}");
        }
        assert!(!valid_group_id(&"a".repeat(300)));
        assert!(valid_group_id(&new_group_id()));
    }

    #[test]
    fn peers_suggest_names_they_do_not_set_them() {
        assert_eq!(local_group_name("team"), "team");
        assert_eq!(local_group_name("../\n\u{1b}[2Kx"), "2Kx");
        assert_eq!(local_group_name("\u{202e}"), "group");
        assert_eq!(local_group_name(&"a".repeat(300)).len(), 24);
    }
}
