//! Local history: `chats/<conversation>.log`, append-only JSON Lines, every line encrypted.
//!
//! Each line is `base64(nonce || AES-256-GCM(storage_key, record, aad = file name))`, so a line
//! cannot be read without the passphrase nor moved to another conversation's file unnoticed.
//! Delivery updates are appended as their own records and folded in on read, so a write never
//! rewrites earlier lines. A torn last line (a crash mid-write) or a damaged line is skipped with
//! a warning and never hides the lines after it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use data_encoding::BASE64;
use serde::{Deserialize, Serialize};
use syncra_core::UserId;
use syncra_core::crypto::local_box::LocalKey;

use crate::home::FsyncPolicy;

/// Delivery state of an outgoing message, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// In the outbox or in flight.
    Sending,
    /// Every recipient's live session took it.
    Delivered,
    /// Some recipient was offline.
    Offline,
    /// Some recipient was not connected; the relay holds it in their mailbox.
    Stored,
    /// The relay refused it.
    Failed,
}

impl Delivery {
    /// As the UI contract's state.
    pub fn to_ui(self) -> syncra_core::ui::DeliveryState {
        use syncra_core::ui::DeliveryState as D;
        match self {
            Delivery::Sending => D::Sending,
            Delivery::Delivered => D::Delivered,
            Delivery::Offline => D::Offline,
            Delivery::Stored => D::Stored,
            Delivery::Failed => D::Failed,
        }
    }
}

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredMessage {
    /// Message id (hex).
    pub id: String,
    /// Who wrote it.
    pub sender: UserId,
    /// Whether I wrote it.
    pub outgoing: bool,
    /// Sender's timestamp (ms).
    pub timestamp_ms: u64,
    /// The text.
    pub text: String,
    /// For outgoing messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// For outgoing group messages: what happened per member ("delivered to 1 of 2, held for 1").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<String>,
    /// Held because the sender's key changed; shown only after re-verification.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// A group event (a membership change), not something someone wrote: `text` describes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub event: bool,
}

impl StoredMessage {
    /// A line that arrived from `sender` (not held, not an event: set those fields after).
    pub fn received(id: String, sender: UserId, timestamp_ms: u64, text: String) -> Self {
        StoredMessage {
            id,
            sender,
            outgoing: false,
            timestamp_ms,
            text,
            delivery: None,
            reach: None,
            held: false,
            event: false,
        }
    }
}

/// One line of a log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
enum Record {
    Msg(StoredMessage),
    Status {
        id: String,
        delivery: Delivery,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reach: Option<String>,
    },
}

/// What reading a log found besides messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReadReport {
    /// Lines skipped because they were damaged (or written under another key).
    pub damaged: usize,
    /// Whether the last line was torn (an interrupted write).
    pub torn_tail: bool,
}

/// The encrypted chat logs.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    key: LocalKey,
    fsync: FsyncPolicy,
}

impl History {
    /// Logs under `dir` encrypted with `key`.
    pub fn new(dir: PathBuf, key: LocalKey, fsync: FsyncPolicy) -> Self {
        History { dir, key, fsync }
    }

    /// The log of a conversation. The name becomes a file name, so it must be one of ours (a
    /// user id or `group-<id>`: lowercase letters, digits and `-`, at most 64); anything else
    /// is refused rather than used.
    fn path(&self, conversation: &str) -> anyhow::Result<PathBuf> {
        let safe = !conversation.is_empty()
            && conversation.len() <= 64
            && conversation
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !safe {
            anyhow::bail!(
                "refusing a conversation name that is not a file name of ours: {}",
                syncra_core::text::escape_untrusted(conversation)
            );
        }
        Ok(self.dir.join(format!("{conversation}.log")))
    }

    fn label(conversation: &str) -> Vec<u8> {
        format!("syncra/v1/history/{conversation}").into_bytes()
    }

    fn append_record(&self, conversation: &str, record: &Record) -> anyhow::Result<()> {
        let json = serde_json::to_vec(record).context("serialising a history record")?;
        let sealed = self.key.seal(&Self::label(conversation), &json);
        let mut line = BASE64.encode(&sealed);
        line.push('\n');
        let path = self.path(conversation)?;
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // One write call per line: with O_APPEND, lines from two processes do not interleave.
        f.write_all(line.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        if self.fsync == FsyncPolicy::Always {
            f.sync_data()
                .with_context(|| format!("syncing {}", path.display()))?;
        }
        Ok(())
    }

    /// Appends a message.
    pub fn append(&self, conversation: &str, message: &StoredMessage) -> anyhow::Result<()> {
        self.append_record(conversation, &Record::Msg(message.clone()))
    }

    /// Records a delivery update for an outgoing message.
    pub fn set_delivery(
        &self,
        conversation: &str,
        id: &str,
        delivery: Delivery,
    ) -> anyhow::Result<()> {
        self.set_delivery_with_reach(conversation, id, delivery, None)
    }

    /// Records a message's delivery state with, for a group message, what happened per member.
    pub fn set_delivery_with_reach(
        &self,
        conversation: &str,
        id: &str,
        delivery: Delivery,
        reach: Option<String>,
    ) -> anyhow::Result<()> {
        self.append_record(
            conversation,
            &Record::Status {
                id: id.to_owned(),
                delivery,
                reach,
            },
        )
    }

    /// Reads a conversation, oldest first, with delivery updates applied and duplicates (same
    /// message id) shown once.
    pub fn read(&self, conversation: &str) -> anyhow::Result<(Vec<StoredMessage>, ReadReport)> {
        let path = self.path(conversation)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), ReadReport::default()));
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let label = Self::label(conversation);
        let mut report = ReadReport::default();
        let mut messages: Vec<StoredMessage> = Vec::new();
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let ends_clean = bytes.last() == Some(&b'\n');
        let lines: Vec<&[u8]> = bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let last = lines.len().saturating_sub(1);
        for (i, line) in lines.iter().enumerate() {
            let record = BASE64
                .decode(line)
                .ok()
                .and_then(|sealed| self.key.open(&label, &sealed).ok())
                .and_then(|plain| serde_json::from_slice::<Record>(&plain).ok());
            match record {
                Some(Record::Msg(m)) => {
                    // Linear in the log: an index by id instead of a scan per line.
                    if let std::collections::hash_map::Entry::Vacant(slot) =
                        index.entry(m.id.clone())
                    {
                        slot.insert(messages.len());
                        messages.push(m);
                    }
                }
                Some(Record::Status {
                    id,
                    delivery,
                    reach,
                }) => {
                    if let Some(&at) = index.get(&id) {
                        messages[at].delivery = Some(delivery);
                        messages[at].reach = reach;
                    }
                }
                None if i == last && !ends_clean => report.torn_tail = true,
                None => report.damaged += 1,
            }
        }
        if report.damaged > 0 {
            tracing::warn!(
                file = %path.display(),
                damaged = report.damaged,
                "skipped damaged history lines; the rest is intact"
            );
        }
        Ok((messages, report))
    }

    /// Every conversation with a log.
    pub fn conversations(&self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.dir.display())),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".log") {
                out.push(stem.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// The directory of the logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, text: &str) -> StoredMessage {
        StoredMessage {
            id: id.into(),
            sender: UserId::from_identity_key(&[1; 32]),
            outgoing: true,
            timestamp_ms: 1,
            text: text.into(),
            delivery: Some(Delivery::Sending),
            reach: None,
            held: false,
            event: false,
        }
    }

    #[test]
    fn append_read_fold_and_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path().into(), LocalKey::generate(), FsyncPolicy::Always);
        h.append("c", &msg("1", "the one")).unwrap();
        h.append("c", &msg("2", "the two")).unwrap();
        h.append("c", &msg("1", "the one again")).unwrap();
        h.set_delivery("c", "1", Delivery::Delivered).unwrap();
        let (m, report) = h.read("c").unwrap();
        assert_eq!(report, ReadReport::default());
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].text, "the one");
        assert_eq!(m[0].delivery, Some(Delivery::Delivered));
        assert_eq!(m[1].delivery, Some(Delivery::Sending));
        // With a space in them, the texts cannot turn up by chance in the encoded ciphertext
        // (a three-letter word did, about once in a few hundred runs).
        let raw = std::fs::read_to_string(dir.path().join("c.log")).unwrap();
        assert!(
            !raw.contains("the one") && !raw.contains("the two"),
            "lines are encrypted at rest"
        );
    }

    #[test]
    fn damaged_and_torn_lines_are_skipped_without_hiding_later_lines() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path().into(), LocalKey::generate(), FsyncPolicy::Never);
        h.append("c", &msg("1", "one")).unwrap();
        let path = dir.path().join("c.log");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"this line is garbage\n").unwrap();
        drop(f);
        h.append("c", &msg("2", "two")).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"dG9ybi").unwrap();
        drop(f);
        let (m, report) = h.read("c").unwrap();
        assert_eq!(
            m.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(report.damaged, 1);
        assert!(report.torn_tail);
    }

    #[test]
    fn lines_cannot_move_between_conversations() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path().into(), LocalKey::generate(), FsyncPolicy::Never);
        h.append("a", &msg("1", "for a")).unwrap();
        std::fs::copy(dir.path().join("a.log"), dir.path().join("b.log")).unwrap();
        let (m, report) = h.read("b").unwrap();
        assert!(m.is_empty());
        assert_eq!(report.damaged, 1);
    }
}
