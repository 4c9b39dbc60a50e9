//! The outbox: messages written but not yet accepted by the relay, one encrypted file each
//! (`outbox/<id>.msg`), so nothing typed is lost if the relay is unreachable or the process is
//! killed. An entry leaves the outbox only when the relay has given a final answer for it.
//!
//! Two processes draining the same outbox may both send an entry; recipients show it once,
//! because the message id is reused on every attempt and their replay guard drops repeats.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use syncra_core::crypto::keyfile::write_private;
use syncra_core::crypto::local_box::LocalKey;

/// A message waiting to be sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// The message id (hex); the envelope reuses it on every attempt.
    pub id: String,
    /// The conversation (history file name): a user id or `group-<id>`.
    pub conversation: String,
    /// The text.
    pub text: String,
    /// When it was written (ms).
    pub created_ms: u64,
    /// Who gets this entry besides the conversation's members: the members a membership change
    /// removed, so they learn it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<syncra_core::UserId>,
}

/// The outbox directory.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    key: LocalKey,
}

const LABEL: &[u8] = b"syncra/v1/outbox";

impl Outbox {
    /// The outbox in `dir`, encrypted with `key`.
    pub fn new(dir: PathBuf, key: LocalKey) -> Self {
        Outbox { dir, key }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.msg"))
    }

    /// Adds an entry (durably: the file is synced before this returns).
    pub fn put(&self, entry: &Pending) -> anyhow::Result<()> {
        let json = serde_json::to_vec(entry).context("serialising an outbox entry")?;
        let sealed = self.key.seal(LABEL, &json);
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

    /// Every entry, oldest first. Damaged entries are reported and left in place.
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
            let parsed = std::fs::read(&path)
                .ok()
                .and_then(|b| self.key.open(LABEL, &b).ok())
                .and_then(|plain| serde_json::from_slice::<Pending>(&plain).ok());
            match parsed {
                Some(p) => out.push(p),
                None => tracing::warn!(
                    file = %path.display(),
                    "outbox entry is damaged; left in place and skipped"
                ),
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
        for (i, id) in ["b", "a"].iter().enumerate() {
            o.put(&Pending {
                id: (*id).into(),
                conversation: "c".into(),
                text: format!("t{i}"),
                created_ms: i as u64,
                notify: Vec::new(),
            })
            .unwrap();
        }
        std::fs::write(dir.path().join("junk.msg"), b"garbage").unwrap();
        let l = o.list().unwrap();
        assert_eq!(
            l.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        o.remove("b").unwrap();
        o.remove("b").unwrap();
        assert_eq!(o.list().unwrap().len(), 1);
        let raw = std::fs::read(dir.path().join("a.msg")).unwrap();
        assert!(!raw.windows(2).any(|w| w == b"t1"), "entries are encrypted");
    }
}
