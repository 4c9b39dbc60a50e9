//! The outbox: messages written but not yet accepted by the relay, one encrypted file each
//! (`outbox/<id>.msg`), so nothing typed is lost if the relay is unreachable or the process is
//! killed. An entry leaves the outbox only when the relay has given a final answer for it.
//!
//! Two processes draining the same outbox may both send an entry; recipients show it once,
//! because the message id is reused on every attempt and their replay guard drops repeats.
//!
//! An entry is bound to its file name: the id is part of the encryption label and must equal
//! the name, so a copied or renamed entry does not open and is never sent again. An entry that
//! does not open, or that can never be sent, is moved aside to `outbox/failed/` (with a `.why`
//! file saying why) instead of blocking the entries behind it.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use syncra_core::crypto::keyfile::write_private;
use syncra_core::crypto::local_box::LocalKey;

/// A message waiting to be sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// The message id (hex); every attempt carries it inside the MLS plaintext.
    pub id: String,
    /// The conversation (history file name): a user id or `group-<id>`.
    pub conversation: String,
    /// The text.
    pub text: String,
    /// When it was written (ms).
    pub created_ms: u64,
    /// Written by versions before groups moved to MLS (the members a membership change
    /// removed); read so their entries still open, ignored: an MLS commit reaches the removed
    /// members itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<syncra_core::UserId>,
}

/// The outbox directory.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    key: LocalKey,
}

/// The label of entries written before entries were bound to their id (still read, if the
/// id inside matches the file name).
const LEGACY_LABEL: &[u8] = b"syncra/v1/outbox";

fn label(id: &str) -> Vec<u8> {
    format!("syncra/v2/outbox/{id}").into_bytes()
}

/// Whether `id` can be an entry's id: a message id in hex.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Outbox {
    /// The outbox in `dir`, encrypted with `key`.
    pub fn new(dir: PathBuf, key: LocalKey) -> Self {
        Outbox { dir, key }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.msg"))
    }

    /// Where entries that cannot be sent are moved.
    pub fn failed_dir(&self) -> PathBuf {
        self.dir.join("failed")
    }

    /// Adds an entry (durably: the file is synced before this returns).
    pub fn put(&self, entry: &Pending) -> anyhow::Result<()> {
        if !valid_id(&entry.id) {
            anyhow::bail!("an outbox entry id must be hex");
        }
        let json = serde_json::to_vec(entry).context("serialising an outbox entry")?;
        let sealed = self.key.seal(&label(&entry.id), &json);
        write_private(&self.path(&entry.id), &sealed)
            .with_context(|| format!("writing outbox entry {}", entry.id))?;
        Ok(())
    }

    /// Removes an entry after the relay answered for it.
    pub fn remove(&self, id: &str) -> anyhow::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing outbox entry {id}")),
        }
    }

    /// Moves the file `name` (`<id>.msg`) aside to `failed/`, with the reason next to it.
    pub fn set_aside(&self, name: &str, why: &str) -> anyhow::Result<()> {
        let failed = self.failed_dir();
        syncra_core::crypto::keyfile::create_private_dir(&failed)
            .with_context(|| format!("creating {}", failed.display()))?;
        let from = self.dir.join(name);
        let to = failed.join(name);
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            // Another process set it aside or sent it first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(e).with_context(|| format!("moving {} aside", from.display()));
            }
        }
        write_private(&to.with_extension("why"), why.as_bytes())?;
        Ok(())
    }

    /// Moves entry `id` aside (see [`Outbox::set_aside`]).
    pub fn set_aside_entry(&self, id: &str, why: &str) -> anyhow::Result<()> {
        self.set_aside(&format!("{id}.msg"), why)
    }

    fn open_entry(&self, path: &std::path::Path) -> Option<Pending> {
        let stem = path.file_stem()?.to_str()?;
        if !valid_id(stem) {
            return None;
        }
        let bytes = std::fs::read(path).ok()?;
        let plain = match self.key.open(&label(stem), &bytes) {
            Ok(p) => p,
            Err(_) => self.key.open(LEGACY_LABEL, &bytes).ok()?,
        };
        let entry = serde_json::from_slice::<Pending>(&plain).ok()?;
        // Bound to its name: a copy under another name is not this entry.
        (entry.id == stem).then_some(entry)
    }

    /// Every entry, oldest first. Entries that do not open (damaged, written under another
    /// key, or copied from another entry's file) are reported and moved aside.
    pub fn list(&self) -> anyhow::Result<Vec<Pending>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.dir.display())),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("msg") {
                continue;
            }
            match self.open_entry(&path) {
                Some(p) => out.push(p),
                None => {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    tracing::warn!(
                        file = %path.display(),
                        "outbox entry is damaged or not bound to its name; moved to outbox/failed"
                    );
                    if let Err(e) = self.set_aside(
                        &name,
                        "the entry did not open: damaged, written under another key, or a copy \
                         of another entry",
                    ) {
                        tracing::warn!("{e:#}");
                    }
                }
            }
        }
        out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::new(dir.path().into(), LocalKey::generate());
        for (i, id) in ["bb", "aa"].iter().enumerate() {
            o.put(&Pending {
                id: (*id).into(),
                conversation: "c".into(),
                // Long enough that ciphertext never contains it by chance (a two-byte text
                // did, about once in a few hundred runs).
                text: format!("the text of entry number {i}"),
                created_ms: i as u64,
                notify: Vec::new(),
            })
            .unwrap();
        }
        std::fs::write(dir.path().join("junk.msg"), b"garbage").unwrap();
        // A copy of an entry under another name is not an entry.
        std::fs::copy(dir.path().join("aa.msg"), dir.path().join("cc.msg")).unwrap();
        let l = o.list().unwrap();
        assert_eq!(
            l.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["bb", "aa"]
        );
        assert!(dir.path().join("failed/cc.msg").exists());
        assert!(dir.path().join("failed/junk.msg").exists());
        assert!(!dir.path().join("cc.msg").exists());
        o.remove("bb").unwrap();
        o.remove("bb").unwrap();
        assert_eq!(o.list().unwrap().len(), 1);
        let raw = std::fs::read(dir.path().join("aa.msg")).unwrap();
        let text = b"the text of entry number 1";
        assert!(
            !raw.windows(text.len()).any(|w| w == text),
            "entries are encrypted"
        );
    }
}
