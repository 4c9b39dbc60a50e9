//! Contacts (pinned on first use) and client-side groups.
//!
//! A contact is pinned by handle to one identity key on first use. Because a user id is the hash
//! of its key, a relay cannot change the key behind a known id — but it can answer a handle with
//! a different id. When that happens the contact is marked `key_changed`: sending to it and
//! showing messages from the new key are blocked until the person re-verifies.
//!
//! These files hold public material only; they are written atomically with mode 0600.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use syncra_core::crypto::keyfile::write_private;
use syncra_core::crypto::keys::SignedPrekey;
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

/// A client-side group. The relay knows nothing of it: a group message is sealed once with one
/// wrap per member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// 32 hex characters.
    pub id: String,
    /// Display name (unique among my groups).
    pub name: String,
    /// Members, including me.
    pub members: Vec<UserId>,
    /// Timestamp (ms) of the membership change this list comes from; newer lists win.
    pub updated_ms: u64,
}

/// Contacts and groups on disk.
#[derive(Debug)]
pub struct Book {
    contacts_path: PathBuf,
    groups_path: PathBuf,
    /// Contacts by user id.
    pub contacts: BTreeMap<UserId, Contact>,
    /// Groups by id.
    pub groups: BTreeMap<String, Group>,
}

fn load<T: for<'de> Deserialize<'de> + Default>(path: &PathBuf) -> anyhow::Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is damaged and was left untouched; fix or restore it",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

impl Book {
    /// Loads both files (missing files are empty).
    pub fn load(contacts_path: PathBuf, groups_path: PathBuf) -> anyhow::Result<Self> {
        let contacts: Vec<Contact> = load(&contacts_path)?;
        let groups: Vec<Group> = load(&groups_path)?;
        Ok(Book {
            contacts: contacts
                .into_iter()
                .map(|c| (c.record.user_id, c))
                .collect(),
            groups: groups.into_iter().map(|g| (g.id.clone(), g)).collect(),
            contacts_path,
            groups_path,
        })
    }

    /// Saves both files.
    pub fn save(&self) -> anyhow::Result<()> {
        let contacts: Vec<&Contact> = self.contacts.values().collect();
        write_private(&self.contacts_path, &serde_json::to_vec_pretty(&contacts)?)?;
        let groups: Vec<&Group> = self.groups.values().collect();
        write_private(&self.groups_path, &serde_json::to_vec_pretty(&groups)?)?;
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

    /// A group by name or id.
    pub fn group(&self, name_or_id: &str) -> Option<&Group> {
        self.groups
            .get(name_or_id)
            .or_else(|| self.groups.values().find(|g| g.name == name_or_id))
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
