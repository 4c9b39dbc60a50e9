//! Local history: `chats/<conversation>.log`, append-only JSON Lines, every line encrypted.
//!
//! Each line is `base64(nonce || AES-256-GCM(storage_key, record, aad = file name))`, so a line
//! cannot be read without the passphrase nor moved to another conversation's file unnoticed.
//! Delivery updates are appended as their own records and folded in on read, so a write never
//! rewrites earlier lines. A torn last line (a crash mid-write) or a damaged line is skipped with
//! a warning and never hides the lines after it.
//!
//! Lines are independent (each is sealed on its own), so a reader that remembers where it
//! stopped can fold in only what was appended since: [`History::last_message`] does that for
//! the conversation list, which is sent after every message and must not cost the whole history
//! each time.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
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

/// What a conversation list shows of a log: its last message that is not held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastMessage {
    /// The first line of its text.
    pub first_line: String,
    /// Its sender's timestamp (ms).
    pub timestamp_ms: u64,
}

impl LastMessage {
    /// The last message of `messages` (as [`History::read`] returns them) that is not held.
    pub fn of(messages: &[StoredMessage]) -> Option<LastMessage> {
        messages
            .iter()
            .rev()
            .find(|m| !m.held)
            .map(LastMessage::from)
    }
}

impl From<&StoredMessage> for LastMessage {
    fn from(m: &StoredMessage) -> Self {
        LastMessage {
            first_line: m.text.lines().next().unwrap_or("").to_owned(),
            timestamp_ms: m.timestamp_ms,
        }
    }
}

/// How many bytes before the read position [`LastMessages`] checks are still there: the end of
/// the last line folded in, whose sealed bytes end in an AES-GCM tag, so a log that was replaced
/// or rewritten shows up as a mismatch and is read again from its start.
const SEAL_BYTES: usize = 64;

/// The last message of each log, kept by [`History::last_message`] so that a later look folds
/// in only the lines appended since.
///
/// Per log it keeps the read position, the ids seen (about a hundred bytes per message: a
/// message id that turns up again is folded exactly as [`History::read`] folds it, first one
/// wins) and the answer. Nothing here can go stale: every look checks the log is still the one
/// read (its length, its modification time, the bytes just before the read position) and starts
/// over when it is not. Dropping it (or calling [`LastMessages::clear`]) costs one full read per
/// log at the next look.
#[derive(Debug, Default)]
pub struct LastMessages {
    logs: HashMap<String, Tail>,
}

impl LastMessages {
    /// Forgets every log: the next look reads each from its start.
    pub fn clear(&mut self) {
        self.logs.clear();
    }
}

/// What the lines of one log read so far say.
#[derive(Debug, Default)]
struct Tail {
    /// Bytes folded in. Always just after a newline: a torn last line is not folded in, but read
    /// again next time, as [`History::read`] would see it then (completed, or glued to the next
    /// line and damaged).
    offset: u64,
    /// The last bytes folded in (up to [`SEAL_BYTES`], ending at `offset`).
    seal: Vec<u8>,
    /// The log's length and modification time when it was last looked at: while they stay the
    /// same, nothing was appended and the log is not even opened.
    seen: Option<(u64, Option<std::time::SystemTime>)>,
    /// The ids of the messages folded in.
    ids: HashSet<String>,
    /// The answer so far.
    last: Option<LastMessage>,
}

/// How much work reading did, for the tests that check a message costs the same however long
/// the history is.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct ReadCounts {
    /// Calls to [`History::read`].
    pub(crate) full_reads: std::sync::atomic::AtomicUsize,
    /// Lines decoded and decrypted, by any reader.
    pub(crate) lines_opened: std::sync::atomic::AtomicUsize,
}

/// The encrypted chat logs.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    key: LocalKey,
    fsync: FsyncPolicy,
    #[cfg(test)]
    pub(crate) counts: ReadCounts,
}

impl History {
    /// Logs under `dir` encrypted with `key`.
    pub fn new(dir: PathBuf, key: LocalKey, fsync: FsyncPolicy) -> Self {
        History {
            dir,
            key,
            fsync,
            #[cfg(test)]
            counts: ReadCounts::default(),
        }
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
        #[cfg(test)]
        self.counts
            .full_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        let mut index: HashMap<String, usize> = HashMap::new();
        let ends_clean = bytes.last() == Some(&b'\n');
        let lines: Vec<&[u8]> = bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let last = lines.len().saturating_sub(1);
        for (i, line) in lines.iter().enumerate() {
            match self.open_line(&label, line) {
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

    /// One line of a log, or `None` if it is damaged (or sealed for another file or key).
    fn open_line(&self, label: &[u8], line: &[u8]) -> Option<Record> {
        #[cfg(test)]
        self.counts
            .lines_opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        BASE64
            .decode(line)
            .ok()
            .and_then(|sealed| self.key.open(label, &sealed).ok())
            .and_then(|plain| serde_json::from_slice::<Record>(&plain).ok())
    }

    /// The last message of a conversation that is not held — what [`LastMessage::of`] finds in
    /// [`History::read`]'s result — reading only the lines appended since `cache` last looked
    /// at this log (the whole log the first time, or when it was replaced since).
    pub fn last_message(
        &self,
        conversation: &str,
        cache: &mut LastMessages,
    ) -> anyhow::Result<Option<LastMessage>> {
        let path = self.path(conversation)?;
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                cache.logs.remove(conversation);
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let tail = cache.logs.entry(conversation.to_owned()).or_default();
        let stamp = (meta.len(), meta.modified().ok());
        if tail.seen == Some(stamp) {
            return Ok(tail.last.clone());
        }
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        if !Self::still_there(&mut file, tail, stamp.0) {
            *tail = Tail::default();
        }
        let mut appended = Vec::new();
        file.seek(SeekFrom::Start(tail.offset))
            .and_then(|_| file.read_to_end(&mut appended))
            .with_context(|| format!("reading {}", path.display()))?;
        self.fold_appended(conversation, tail, &appended);
        tail.seen = Some(stamp);
        Ok(tail.last.clone())
    }

    /// Whether `file` still holds, just before `tail.offset`, the bytes that were folded in
    /// last (a log is only appended to; anything else means it was replaced).
    fn still_there(file: &mut std::fs::File, tail: &Tail, len: u64) -> bool {
        if tail.offset == 0 {
            return true;
        }
        if len < tail.offset {
            return false;
        }
        let mut now = vec![0; tail.seal.len()];
        file.seek(SeekFrom::Start(tail.offset - tail.seal.len() as u64))
            .and_then(|_| file.read_exact(&mut now))
            .is_ok_and(|()| now == tail.seal)
    }

    /// Folds the complete lines of `appended` (the log's bytes from `tail.offset` on) into
    /// `tail`, as [`History::read`] folds them.
    fn fold_appended(&self, conversation: &str, tail: &mut Tail, appended: &[u8]) {
        let complete = appended
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |at| at + 1);
        let appended = &appended[..complete];
        let label = Self::label(conversation);
        let mut damaged = 0usize;
        for line in appended.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match self.open_line(&label, line) {
                Some(Record::Msg(m)) => {
                    // The first line with an id is the one shown, as in `read`.
                    if tail.ids.insert(m.id.clone()) && !m.held {
                        tail.last = Some(LastMessage::from(&m));
                    }
                }
                // Delivery updates change neither the text nor the time shown.
                Some(Record::Status { .. }) => {}
                None => damaged += 1,
            }
        }
        if damaged > 0 {
            tracing::warn!(
                conversation,
                damaged,
                "skipped damaged history lines; the rest is intact"
            );
        }
        tail.offset += complete as u64;
        let mut seal = std::mem::take(&mut tail.seal);
        seal.extend_from_slice(&appended[appended.len().saturating_sub(SEAL_BYTES)..]);
        seal.drain(..seal.len().saturating_sub(SEAL_BYTES));
        tail.seal = seal;
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

    fn held(id: &str, text: &str) -> StoredMessage {
        StoredMessage {
            held: true,
            ..msg(id, text)
        }
    }

    /// What a full read says the list shows, and what the incremental reader says.
    fn check(h: &History, cache: &mut LastMessages, conversation: &str) -> Option<LastMessage> {
        let (messages, _) = h.read(conversation).unwrap();
        let expected = LastMessage::of(&messages);
        assert_eq!(h.last_message(conversation, cache).unwrap(), expected);
        expected
    }

    fn append_raw(dir: &Path, conversation: &str, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{conversation}.log")))
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn the_last_message_read_incrementally_is_the_one_a_full_read_finds() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path().into(), LocalKey::generate(), FsyncPolicy::Never);
        let mut cache = LastMessages::default();
        assert_eq!(check(&h, &mut cache, "c"), None);
        // Each record is appended, then both readers are asked.
        let event = StoredMessage {
            event: true,
            ..msg("4", "alice added eve")
        };
        let steps = vec![
            Record::Msg(msg("1", "first\nsecond line")),
            Record::Msg(msg("2", "two")),
            Record::Status {
                id: "2".into(),
                delivery: Delivery::Delivered,
                reach: None,
            },
            // A held message is not shown in the list; the one before it is.
            Record::Msg(held("3", "held")),
            // An id seen before: the first one stays, where it was.
            Record::Msg(msg("1", "the one again")),
            Record::Msg(msg("2", "two again")),
            Record::Msg(event),
            // A held id that turns up again unheld stays held (first one wins).
            Record::Msg(msg("3", "unheld")),
            Record::Msg(msg("5", "")),
        ];
        for record in &steps {
            h.append_record("c", record).unwrap();
            check(&h, &mut cache, "c");
        }
        assert_eq!(
            check(&h, &mut cache, "c"),
            Some(LastMessage {
                first_line: String::new(),
                timestamp_ms: 1
            })
        );

        // Garbage, then a torn line, then a line glued to it: damaged in both readers.
        append_raw(dir.path(), "c", b"garbage\n");
        h.append("c", &msg("6", "six")).unwrap();
        check(&h, &mut cache, "c");
        append_raw(dir.path(), "c", b"dG9ybi");
        check(&h, &mut cache, "c");
        h.append("c", &msg("7", "glued to the torn line")).unwrap();
        assert_eq!(check(&h, &mut cache, "c").unwrap().first_line, "six");
        h.append("c", &msg("8", "eight")).unwrap();
        assert_eq!(check(&h, &mut cache, "c").unwrap().first_line, "eight");
    }

    #[test]
    fn a_log_replaced_or_removed_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let key = LocalKey::generate();
        let h = History::new(dir.path().into(), key.clone(), FsyncPolicy::Never);
        let mut cache = LastMessages::default();
        for i in 0..5 {
            h.append("c", &msg(&i.to_string(), &format!("old {i}")))
                .unwrap();
        }
        assert_eq!(check(&h, &mut cache, "c").unwrap().first_line, "old 4");
        // Another log moved into its place, longer than what was read: the bytes before the
        // read position differ, so it is read from its start.
        let other = tempfile::tempdir().unwrap();
        let o = History::new(other.path().into(), key, FsyncPolicy::Never);
        o.append("c", &msg("x", "replaced")).unwrap();
        for i in 0..10 {
            o.append("c", &held(&format!("h{i}"), "held")).unwrap();
        }
        std::fs::rename(other.path().join("c.log"), dir.path().join("c.log")).unwrap();
        assert_eq!(check(&h, &mut cache, "c").unwrap().first_line, "replaced");
        // Shorter than what was read.
        std::fs::remove_file(dir.path().join("c.log")).unwrap();
        assert_eq!(check(&h, &mut cache, "c"), None);
        h.append("c", &msg("y", "new")).unwrap();
        assert_eq!(check(&h, &mut cache, "c").unwrap().first_line, "new");
        cache.clear();
        assert_eq!(check(&h, &mut cache, "c").unwrap().first_line, "new");
    }

    #[test]
    fn a_later_look_opens_only_the_lines_appended_since() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path().into(), LocalKey::generate(), FsyncPolicy::Never);
        let mut cache = LastMessages::default();
        for i in 0..200 {
            h.append("c", &msg(&i.to_string(), "seeded")).unwrap();
        }
        h.last_message("c", &mut cache).unwrap();
        assert_eq!(h.counts.lines_opened.load(Relaxed), 200);
        for i in 200..250 {
            h.append("c", &msg(&i.to_string(), "new")).unwrap();
            h.set_delivery("c", &i.to_string(), Delivery::Delivered)
                .unwrap();
            h.last_message("c", &mut cache).unwrap();
            // Unchanged since: not even opened.
            h.last_message("c", &mut cache).unwrap();
        }
        assert_eq!(h.counts.lines_opened.load(Relaxed), 300);
        assert_eq!(h.counts.full_reads.load(Relaxed), 0);
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
