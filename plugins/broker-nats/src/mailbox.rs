//! `[mailbox] kind = "nats"`: sealed deliveries for recipients who are not connected, in a NATS
//! JetStream stream shared by every node of a cluster. It takes the same settings as
//! `[broker] kind = "nats"` (the URL with its credentials, the timeouts) and one of its own,
//! `replicas` ([`NatsMailboxConfig`]).
//!
//! # Layout
//!
//! One stream, [`STREAM`], file storage, holding the subjects `syncra.mbox.<user id>` — one
//! subject per recipient. An entry's id is its stream sequence: it increases in the order puts
//! were stored, per recipient as for the whole stream, and JetStream never reuses one, even once
//! a subject is empty. Each entry carries three headers: [`STORED_AT`] (the relay's clock when it
//! was stored, ms) and two running totals of the recipient's subject, [`BYTES_THROUGH`] and
//! [`COUNT_THROUGH`] (bytes and entries put into that subject up to and including this entry).
//!
//! The stream's own settings do what JetStream can do by itself: `max_age` is the TTL (the
//! server deletes old entries even if no relay runs), `max_msgs_per_subject` with
//! `discard_new_per_subject` and `DiscardPolicy::New` refuses a put beyond the count quota
//! instead of evicting the oldest entry, and `allow_direct` serves the direct gets (by subject)
//! from any replica. A `take` reads its first entry with a direct get (at a ping there is
//! usually none: one round trip) and the rest through a short-lived consumer filtered on the
//! recipient's subject, kept from one page of a backlog to the next (a backlog of thousands is
//! then a few dozen round trips, not one per entry). An acknowledgement deletes the entries
//! this node handed out by sequence, and purges the subject only for entries it did not hand
//! out: nats-server 2.9 walks the whole stream for a purge or a consumer filtered on a subject,
//! which at 100 000 held entries made a drain take minutes (docs/BENCHMARKS.md).
//!
//! # Quotas: why the running totals
//!
//! JetStream limits messages per subject but not bytes per subject, so the byte quota is kept
//! here. Entries only ever leave a subject from its front — `ack` deletes up to an id, `clear`
//! all of them, expiry (ours and `max_age`) the oldest first, and the count limit refuses
//! rather than evicts — so what a subject holds is always a contiguous run of what was put
//! into it, and its usage is `last.through − first.through + first's own size` (the same for
//! the count), read with two direct gets. (An acknowledgement that deleted by sequence purges
//! up to its id whatever is left in front; a hole that a failure in between leaves can only make
//! the usage look larger, never smaller.) A put reads both, checks the quota, and publishes with
//! `Nats-Expected-Last-Subject-Sequence` set to the last entry it saw: if another put (on any
//! node) got in between, JetStream refuses it and the put reads again. So the check and the
//! append are atomic without any lock on the server, and the quota can never be exceeded;
//! deletions that race with a put can only make it see more usage than there is (a refusal a
//! moment too early, never an excess). Within one node, puts for the same recipient take a
//! striped lock first so that they do not race each other. The stream's per-subject limit stays
//! as the server's own backstop for the count.
//!
//! # Durability
//!
//! A put returns once JetStream acknowledged it: it is in the stream's files, and survives the
//! relay and `nats-server` being killed (the store directory is read again on start). With
//! `replicas = 3` on a JetStream cluster, JetStream acknowledges a put once a majority of the
//! stream's replicas stored it, so the stream survives losing one server, and the relays carry
//! on against the others (`relays_ride_out_losing_a_nats_server_with_the_mailbox_on_it`, in
//! host-relay's cluster tests). A direct get may be served by a replica a moment behind the
//! leader: a `take` then misses the newest entries until the recipient's next ping, and a put
//! that read a stale last entry is refused by the leader's expected-sequence check and reads
//! again. For power loss, run replicas on separate machines or a server version with
//! `sync_interval: always` (docs/SCALING.md).
//!
//! # Must never
//!
//! Never evict an entry to make room (a full mailbox refuses), never report `stored` for a put
//! JetStream did not acknowledge, never lower the stream's per-subject limit (JetStream would
//! delete held entries to meet it), and never print the URL's credentials.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy, pull};
use async_nats::jetstream::context::{Context, PublishError, PublishErrorKind};
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream::{
    Config as StreamConfig, DeleteStatus, DirectGetErrorKind, DiscardPolicy, StorageType, Stream,
};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::join_all;
use syncra_core::error::PluginError;
use syncra_core::mailbox::{Mailbox, MailboxEntry, MailboxError, MailboxLimits, PutOutcome};
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::{Health, UserId};
use tokio::sync::Mutex;

use crate::{KIND, NatsConfig, connect_client};

/// The stream that holds every recipient's entries.
pub const STREAM: &str = "SYNCRA_MAILBOX";

/// Every recipient's subject starts with this; the stream holds `syncra.mbox.>`.
pub const SUBJECT_PREFIX: &str = "syncra.mbox.";

/// When the entry was stored, by the storing relay's clock (ms since the epoch).
pub const STORED_AT: &str = "Syncra-Stored-At";
/// Bytes of deliveries put into this recipient's subject up to and including this entry.
pub const BYTES_THROUGH: &str = "Syncra-Bytes-Through";
/// Entries put into this recipient's subject up to and including this entry.
pub const COUNT_THROUGH: &str = "Syncra-Count-Through";

/// How often a put reads the subject again after another put got in first before it gives up
/// and reports the mailbox unavailable. Each retry means some other put succeeded, so this is
/// only reached under a flood of puts for one recipient from many nodes at once.
const PUT_ATTEMPTS: usize = 64;

/// How long a reading consumer may sit unused before the server removes it (the reader deletes
/// it at once; this is for a reader that died first).
const CONSUMER_IDLE: Duration = Duration::from_secs(30);

/// Readers kept between pages at most (one per backlog being read page by page).
const MAX_READERS: usize = 1024;

/// Handed-out sequences remembered at most (8 bytes each, in all recipients' queues); see
/// `NatsMailbox::hand_out`.
const MAX_HANDED: usize = 1_000_000;

/// Deletions sent at once by one acknowledgement.
const DELETES_AT_ONCE: usize = 64;

/// Locks that serialise this node's puts per recipient (by a hash of the id): enough that
/// unrelated recipients rarely share one, few enough to cost nothing.
const PUT_STRIPES: usize = 64;

/// The most replicas JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

/// The configuration of `[mailbox] kind = "nats"`: the connection settings of
/// `[broker] kind = "nats"`, and the stream's replica count.
///
/// ```toml
/// [mailbox]
/// kind = "nats"
/// url = "nats://nats-1.internal:4222,nats://nats-2.internal:4222,nats://nats-3.internal:4222"
/// replicas = 3
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsMailboxConfig {
    /// The server(s) and timeouts, as for the broker.
    pub connection: NatsConfig,
    /// How many servers of a JetStream cluster keep the stream (1 to [`MAX_REPLICAS`]). Unset:
    /// a new stream gets 1, an existing stream keeps what it has; set: the stream is created
    /// with it, or changed to it (JetStream moves the data itself).
    pub replicas: Option<usize>,
}

impl NatsMailboxConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        NatsMailboxConfig {
            connection: NatsConfig::new(url),
            replicas: None,
        }
    }

    /// Reads a `[mailbox]` section (without its `kind`): `replicas`, then the connection
    /// settings, which refuse any key they do not know.
    pub fn from_section(mut section: serde_json::Value) -> Result<Self, PluginError> {
        let config_error = |message: String| PluginError::Config {
            category: "mailbox",
            kind: KIND.to_owned(),
            message,
        };
        let replicas = match section
            .as_object_mut()
            .and_then(|fields| fields.remove("replicas"))
        {
            None => None,
            Some(value) => match serde_json::from_value::<usize>(value.clone()) {
                Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Some(n),
                _ => {
                    return Err(config_error(format!(
                        "`replicas` is {value}; expected a whole number from 1 to \
                         {MAX_REPLICAS} (JetStream keeps at most {MAX_REPLICAS} copies of a \
                         stream)"
                    )));
                }
            },
        };
        let connection: NatsConfig = typed_config("mailbox", KIND, section)?;
        Ok(NatsMailboxConfig {
            connection,
            replicas,
        })
    }
}

/// A [`Mailbox`] in a NATS JetStream stream.
pub struct NatsMailbox {
    /// The connection, to check its state before a publish.
    client: Client,
    jetstream: Context,
    stream: Stream,
    /// The servers, for messages (credentials redacted).
    server: String,
    limits: MailboxLimits,
    stripes: Vec<Mutex<()>>,
    /// Reading consumers kept between the pages of one backlog, by subject.
    readers: StdMutex<HashMap<String, Reader>>,
    /// Sequences this node handed out and that were not acknowledged yet: what an
    /// acknowledgement deletes one by one.
    handed: StdMutex<Handed>,
}

/// Sequences handed out by subject, oldest first, and how many in all.
#[derive(Default)]
struct Handed {
    by_subject: HashMap<String, VecDeque<u64>>,
    total: usize,
}

/// A reading consumer kept for the next page of the same backlog.
struct Reader {
    consumer: Consumer<pull::Config>,
    /// The last sequence the page it served returned: the next page must start after it.
    returned: u64,
}

impl std::fmt::Debug for NatsMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsMailbox")
            .field("server", &self.server)
            .field("stream", &STREAM)
            .finish_non_exhaustive()
    }
}

/// The subject of one recipient's entries.
pub fn subject(user: &UserId) -> String {
    let mut s = String::with_capacity(SUBJECT_PREFIX.len() + 32);
    s.push_str(SUBJECT_PREFIX);
    user.push_to(&mut s);
    s
}

/// The stream's settings for these limits. `per_subject` is the count limit the server keeps
/// (never below what an existing stream has, see [`NatsMailbox::connect`]).
fn stream_config(limits: &MailboxLimits, per_subject: i64, replicas: usize) -> StreamConfig {
    StreamConfig {
        name: STREAM.to_owned(),
        description: Some("Syncra: sealed deliveries held for recipients who are away".into()),
        subjects: vec![format!("{SUBJECT_PREFIX}>")],
        storage: StorageType::File,
        num_replicas: replicas,
        max_age: Duration::from_millis(limits.ttl_ms),
        max_messages_per_subject: per_subject,
        discard: DiscardPolicy::New,
        discard_new_per_subject: true,
        allow_direct: true,
        max_messages: -1,
        max_bytes: -1,
        max_consumers: -1,
        ..StreamConfig::default()
    }
}

/// The per-subject limit the server keeps for this quota.
fn per_subject_limit(limits: &MailboxLimits) -> i64 {
    i64::try_from(limits.max_entries).unwrap_or(i64::MAX)
}

/// What a subject holds, from its first and last entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    /// The last entry's sequence (0: the subject is empty).
    last: u64,
    /// The running totals through the last entry.
    bytes_through: u64,
    count_through: u64,
    /// What the subject holds now.
    bytes: u64,
    count: u64,
}

/// What reading a subject's usage found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    Usage(Usage),
    /// The entry with this sequence lacks this plugin's headers, or has totals no put wrote:
    /// someone who can publish on the NATS server appended it, not a relay. (Entries' contents
    /// are authenticated by the relay itself, `host-relay/src/sealed_mailbox.rs`; well-formed
    /// totals that lie are an availability attack, see docs/THREAT_MODEL.md §2.2.)
    Foreign(u64),
}

impl NatsMailbox {
    /// Connects and opens (or creates) the stream with these limits.
    ///
    /// An existing stream gets this node's TTL, and its replica count if `replicas` is set;
    /// its per-subject limit is raised to this node's count quota if lower, never lowered
    /// (JetStream would delete held entries to meet a lower one; the quota is checked here as
    /// well, so a lower quota still holds).
    pub async fn connect(
        config: &NatsMailboxConfig,
        limits: MailboxLimits,
    ) -> Result<Self, PluginError> {
        let connected = connect_client(&config.connection, "mailbox").await?;
        let server = connected.server;
        let start_error = |why: String| PluginError::Start {
            category: "mailbox",
            kind: KIND.to_owned(),
            message: format!(
                "nats at {server}: {why}; the mailbox needs JetStream (`nats-server -js`, or a \
                 `jetstream {{}}` block in its config), an account allowed to use it, and for \
                 `replicas` above 1 a JetStream cluster of at least that many servers"
            ),
        };
        let client = connected.client;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(connected.timeouts.command);
        let wanted = stream_config(
            &limits,
            per_subject_limit(&limits),
            config.replicas.unwrap_or(1),
        );
        let mut stream = js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| start_error(format!("cannot open the stream {STREAM}: {e}")))?;
        let have = stream.cached_info().config.clone();
        let keep = per_subject_limit(&limits).max(have.max_messages_per_subject);
        let replicas = config.replicas.unwrap_or(have.num_replicas.max(1));
        let update = stream_config(&limits, keep, replicas);
        if !same_settings(&have, &update) {
            js.update_stream(update)
                .await
                .map_err(|e| start_error(format!("cannot update the stream {STREAM}: {e}")))?;
            stream = js
                .get_stream(STREAM)
                .await
                .map_err(|e| start_error(format!("cannot open the stream {STREAM}: {e}")))?;
        }
        Ok(NatsMailbox {
            client,
            jetstream: js,
            stream,
            server,
            limits,
            stripes: (0..PUT_STRIPES).map(|_| Mutex::new(())).collect(),
            readers: StdMutex::new(HashMap::new()),
            handed: StdMutex::new(Handed::default()),
        })
    }

    fn unavailable(&self, action: &str, e: impl std::fmt::Display) -> MailboxError {
        MailboxError::Unavailable(format!(
            "mailbox in stream {STREAM} at nats {}: {action} failed: {e}",
            self.server
        ))
    }

    /// A number from one of our headers; `None` if it is missing or not a number (an entry
    /// this plugin did not write).
    fn header(m: &StreamMessage, name: &str) -> Option<u64> {
        Self::header_in(Some(&m.headers), name)
    }

    /// [`NatsMailbox::header`] of an entry's headers.
    fn header_in(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
        headers
            .and_then(|h| h.get(name))
            .and_then(|v| v.as_str().parse::<u64>().ok())
    }

    /// A short-lived consumer reading `subject` from sequence `from` on: no acknowledgements,
    /// in memory, filtered on the subject. Reading a backlog through it is a few dozen round
    /// trips for 10 000 entries instead of one request per entry.
    async fn create_reader(
        &self,
        subject: &str,
        from: u64,
    ) -> Result<Consumer<pull::Config>, MailboxError> {
        self.stream
            .create_consumer(pull::Config {
                filter_subject: subject.to_owned(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ack_policy: AckPolicy::None,
                memory_storage: true,
                num_replicas: 1,
                // Removed by the server if this node dies before deleting it.
                inactive_threshold: CONSUMER_IDLE,
                ..pull::Config::default()
            })
            .await
            .map_err(|e| self.unavailable("reading a mailbox", e))
    }

    /// Deletes a reading consumer; best effort (the server removes it after `CONSUMER_IDLE`).
    async fn drop_reader(&self, consumer: Consumer<pull::Config>) {
        let name = consumer.cached_info().name.clone();
        let _ = self.stream.delete_consumer(&name).await;
    }

    /// The next up to `max` entries of a reader: (sequence, headers, payload) in order, and
    /// whether there may be more.
    async fn fetch(
        &self,
        reader: &Consumer<pull::Config>,
        max: usize,
    ) -> Result<(Vec<(u64, Option<HeaderMap>, Bytes)>, bool), MailboxError> {
        let action = "reading a mailbox";
        let mut batch = reader
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(|e| self.unavailable(action, e))?;
        let mut out = Vec::with_capacity(max);
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| self.unavailable(action, e))?;
            let seq = m
                .info()
                .map_err(|e| self.unavailable(action, e))?
                .stream_sequence;
            out.push((seq, m.message.headers, m.message.payload));
        }
        let more = out.len() == max;
        Ok((out, more))
    }

    /// Remembers the sequences a take returned, for the acknowledgement that deletes them.
    fn hand_out(&self, subject: &str, entries: &[MailboxEntry]) {
        if entries.is_empty() {
            return;
        }
        let mut handed = self.handed.lock().unwrap_or_else(PoisonError::into_inner);
        // Sessions that read and never acknowledge (a one-shot command) leave their entries
        // here. At the bound everything is forgotten at once: acknowledgements of forgotten
        // entries purge instead (slower, never wrong), and the memory stays bounded.
        if handed.total + entries.len() > MAX_HANDED {
            handed.by_subject.clear();
            handed.total = 0;
        }
        let Handed { by_subject, total } = &mut *handed;
        let queue = by_subject.entry(subject.to_owned()).or_default();
        for e in entries {
            // A page read again (a second session of the user) hands out the same entries.
            if queue.back().is_none_or(|last| *last < e.id) {
                queue.push_back(e.id);
                *total += 1;
            }
        }
    }

    /// Deletes one entry by sequence (JetStream finds it directly, unlike a purge filtered on
    /// a subject, which walks the stream); an entry already gone is not an error.
    async fn delete_seq(&self, seq: u64) -> Result<(), MailboxError> {
        let answer: Result<Response<DeleteStatus>, _> = self
            .jetstream
            .request(
                format!("STREAM.MSG.DELETE.{STREAM}"),
                &serde_json::json!({ "seq": seq, "no_erase": true }),
            )
            .await;
        match answer {
            Ok(Response::Ok(_)) => Ok(()),
            // nats-server 2.9 answers a deletion of a missing entry with "delete failed: no
            // message found" (10057), other versions with "no message found" (10037). A 10057
            // for another reason leaves the entry in place, and `ack` purges what is left up to
            // its id after the deletions, so taking it as "gone" here loses nothing.
            Ok(Response::Err { error })
                if [
                    ErrorCode::NO_MESSAGE_FOUND,
                    ErrorCode::STREAM_MESSAGE_DELETE_FAILED,
                ]
                .contains(&error.error_code()) =>
            {
                Ok(())
            }
            Ok(Response::Err { error }) => Err(self.unavailable("acknowledging", error)),
            Err(e) => Err(self.unavailable("acknowledging", e)),
        }
    }

    /// The first entry at or after `from` on `subject` (which may be the wildcard of the whole
    /// stream), or `None`.
    async fn next(
        &self,
        action: &str,
        subject: &str,
        from: u64,
    ) -> Result<Option<StreamMessage>, MailboxError> {
        match self
            .stream
            .direct_get_next_for_subject(subject, Some(from.max(1)))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.unavailable(action, e)),
        }
    }

    /// What `subject` holds now, or the sequence of an entry there without this plugin's
    /// headers (written by someone else: see [`Read::Foreign`]).
    async fn usage(&self, subject: &str) -> Result<Read, MailboxError> {
        let last = match self
            .stream
            .direct_get_last_for_subject(subject.to_owned())
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
                return Ok(Read::Usage(Usage::default()));
            }
            Err(e) => return Err(self.unavailable("reading a mailbox's last entry", e)),
        };
        let (Some(bytes_through), Some(count_through)) = (
            Self::header(&last, BYTES_THROUGH),
            Self::header(&last, COUNT_THROUGH),
        ) else {
            return Ok(Read::Foreign(last.sequence));
        };
        let mut usage = Usage {
            last: last.sequence,
            bytes_through,
            count_through,
            bytes: 0,
            count: 0,
        };
        // Deleted in the meantime: the put's expected last sequence will be refused and it
        // reads again.
        let Some(first) = self
            .next("reading a mailbox's first entry", subject, 1)
            .await?
        else {
            return Ok(Read::Usage(usage));
        };
        // A total below the entry's own size, or a count of 0, is not something a put wrote.
        let before = |name: &str, own: u64| Self::header(&first, name)?.checked_sub(own);
        let (Some(before_bytes), Some(before_count)) = (
            before(BYTES_THROUGH, first.payload.len() as u64),
            before(COUNT_THROUGH, 1),
        ) else {
            return Ok(Read::Foreign(first.sequence));
        };
        usage.bytes = bytes_through.saturating_sub(before_bytes);
        usage.count = count_through.saturating_sub(before_count);
        Ok(Read::Usage(usage))
    }

    fn stripe(&self, user: &UserId) -> &Mutex<()> {
        let bytes = user.as_bytes();
        let index = usize::from(bytes[0]) | (usize::from(bytes[1]) << 8);
        &self.stripes[index % self.stripes.len()]
    }
}

/// Whether an existing stream already has the settings this node would give it.
fn same_settings(have: &StreamConfig, want: &StreamConfig) -> bool {
    have.subjects == want.subjects
        && have.max_age == want.max_age
        && have.max_messages_per_subject == want.max_messages_per_subject
        && have.discard == want.discard
        && have.discard_new_per_subject == want.discard_new_per_subject
        && have.allow_direct == want.allow_direct
        && have.num_replicas.max(1) == want.num_replicas.max(1)
}

/// Whether a publish was refused because the subject is at the stream's per-subject limit
/// (JetStream answers "store failed" with error code 10077; the only limit this stream refuses
/// new messages for is the per-subject one).
fn refused_as_full(e: &PublishError) -> bool {
    e.kind() == PublishErrorKind::Other
        && std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|s| s.error_code() == ErrorCode::STREAM_STORE_FAILED)
}

#[async_trait]
impl Mailbox for NatsMailbox {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn put(
        &self,
        recipient: &UserId,
        delivery: Bytes,
        now_ms: u64,
    ) -> Result<PutOutcome, MailboxError> {
        let size = delivery.len() as u64;
        if size > self.limits.max_bytes {
            return Ok(PutOutcome::Full);
        }
        let subject = subject(recipient);
        let _serialised = self.stripe(recipient).lock().await;
        for _ in 0..PUT_ATTEMPTS {
            let usage = match self.usage(&subject).await? {
                Read::Usage(usage) => usage,
                // Not ours: removed, so that it neither blocks this recipient's puts nor counts
                // towards their quota.
                Read::Foreign(seq) => {
                    self.delete_seq(seq).await?;
                    continue;
                }
            };
            if usage.count >= self.limits.max_entries
                || usage.bytes.saturating_add(size) > self.limits.max_bytes
            {
                return Ok(PutOutcome::Full);
            }
            let mut headers = HeaderMap::new();
            headers.insert(STORED_AT, now_ms.to_string().as_str());
            headers.insert(
                BYTES_THROUGH,
                (usage.bytes_through + size).to_string().as_str(),
            );
            headers.insert(
                COUNT_THROUGH,
                (usage.count_through + 1).to_string().as_str(),
            );
            // While disconnected the client would hold the publish and send it after some later
            // reconnection, long after the sender was told the mailbox is unavailable.
            if self.client.connection_state() != State::Connected {
                return Err(self.unavailable("storing a delivery", "disconnected; reconnecting"));
            }
            let message = PublishMessage::build()
                .payload(delivery.clone())
                .headers(headers)
                .expected_last_subject_sequence(usage.last);
            let acked = match self.jetstream.send_publish(subject.clone(), message).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => return Ok(PutOutcome::Stored(ack.sequence)),
                // Another node's put (or a deletion of the whole subject) got in first.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) if refused_as_full(&e) => return Ok(PutOutcome::Full),
                Err(e) => return Err(self.unavailable("storing a delivery", e)),
            }
        }
        Err(self.unavailable(
            "storing a delivery",
            format!("{PUT_ATTEMPTS} attempts in a row lost to other puts for the same recipient"),
        ))
    }

    async fn take(
        &self,
        recipient: &UserId,
        after: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<MailboxEntry>, MailboxError> {
        let oldest = now_ms.saturating_sub(self.limits.ttl_ms);
        let subject = subject(recipient);
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let kept = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&subject);
        let (mut reader, mut from) = match kept {
            // The next page of the backlog this reader served.
            Some(r) if r.returned == after => (Some(r.consumer), after.saturating_add(1)),
            other => {
                if let Some(stale) = other {
                    self.drop_reader(stale.consumer).await;
                }
                // One direct get first: the common answer (at a ping) is "nothing", one round
                // trip.
                let Some(first) = self
                    .next("reading a mailbox", &subject, after.saturating_add(1))
                    .await?
                else {
                    return Ok(out);
                };
                let from = first.sequence.saturating_add(1);
                // An entry without this plugin's headers was not put here by a relay: skipped.
                if let Some(stored_at_ms) = Self::header(&first, STORED_AT)
                    && stored_at_ms >= oldest
                {
                    out.push(MailboxEntry {
                        id: first.sequence,
                        stored_at_ms,
                        delivery: first.payload,
                    });
                }
                (None, from)
            }
        };
        // The rest through a reader; expired entries are skipped, so fetch again until `max`
        // are found or the subject has no more.
        let mut more = true;
        while out.len() < max && more {
            let (consumer, kept) = match reader.take() {
                Some(c) => (c, true),
                None => (self.create_reader(&subject, from).await?, false),
            };
            let (entries, may_have_more) = match self.fetch(&consumer, max - out.len()).await {
                Ok(fetched) => {
                    reader = Some(consumer);
                    fetched
                }
                // A kept reader the server removed meanwhile (the client paused longer than
                // `CONSUMER_IDLE` between pages): read on with a new one.
                Err(_) if kept => {
                    self.drop_reader(consumer).await;
                    continue;
                }
                Err(e) => {
                    self.drop_reader(consumer).await;
                    return Err(e);
                }
            };
            more = may_have_more;
            for (seq, headers, delivery) in entries {
                from = seq.saturating_add(1);
                if let Some(stored_at_ms) = Self::header_in(headers.as_ref(), STORED_AT)
                    && stored_at_ms >= oldest
                {
                    out.push(MailboxEntry {
                        id: seq,
                        stored_at_ms,
                        delivery,
                    });
                }
            }
        }
        self.hand_out(&subject, &out);
        if let Some(consumer) = reader {
            // A full page: the relay reads on, and the next page continues with this reader.
            let unused = match out.last().map(|e| e.id) {
                Some(returned) if out.len() == max => {
                    let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
                    if readers.len() < MAX_READERS {
                        readers.insert(subject, Reader { consumer, returned });
                        None
                    } else {
                        Some(consumer)
                    }
                }
                _ => Some(consumer),
            };
            if let Some(consumer) = unused {
                self.drop_reader(consumer).await;
            }
        }
        Ok(out)
    }

    /// Deletes the entries this node handed out up to `up_to` one by one (concurrently), then,
    /// if the subject still starts at or below `up_to` (entries another node or an earlier run
    /// handed out), purges it up to there. A purge filtered on a subject walks the stream in
    /// nats-server 2.9, which at 100 000 entries made each acknowledgement slow.
    async fn ack(&self, recipient: &UserId, up_to: u64) -> Result<(), MailboxError> {
        if up_to == 0 {
            return Ok(());
        }
        let subject = subject(recipient);
        let seqs: Vec<u64> = {
            let mut handed = self.handed.lock().unwrap_or_else(PoisonError::into_inner);
            let Handed { by_subject, total } = &mut *handed;
            let mut seqs = Vec::new();
            if let Some(queue) = by_subject.get_mut(&subject) {
                while let Some(seq) = queue.front().copied().filter(|s| *s <= up_to) {
                    queue.pop_front();
                    seqs.push(seq);
                }
                if queue.is_empty() {
                    by_subject.remove(&subject);
                }
            }
            *total = total.saturating_sub(seqs.len());
            seqs
        };
        for chunk in seqs.chunks(DELETES_AT_ONCE) {
            for result in join_all(chunk.iter().map(|seq| self.delete_seq(*seq))).await {
                result?;
            }
        }
        match self.next("acknowledging", &subject, 1).await? {
            Some(first) if first.sequence <= up_to => {
                self.stream
                    .purge()
                    .filter(subject)
                    .sequence(up_to.saturating_add(1))
                    .await
                    .map_err(|e| self.unavailable("acknowledging", e))?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn clear(&self, recipient: &UserId) -> Result<u64, MailboxError> {
        let subject = subject(recipient);
        {
            let mut handed = self.handed.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(queue) = handed.by_subject.remove(&subject) {
                handed.total = handed.total.saturating_sub(queue.len());
            }
        }
        let purged = self
            .stream
            .purge()
            .filter(subject)
            .await
            .map_err(|e| self.unavailable("emptying a mailbox", e))?;
        Ok(purged.purged)
    }

    /// Walks the stream from its oldest entry and deletes entries stored before the cutoff,
    /// stopping at the first that is not: entries are appended in the order they were stored,
    /// so the expired ones are the stream's front, and the work is proportional to what
    /// expires. Deleting only a front keeps each subject a contiguous run, which the quota
    /// arithmetic relies on. An entry that a node with a slower clock stored behind a newer one
    /// is never taken once expired, and leaves with the next pass or the stream's `max_age`.
    async fn expire(&self, now_ms: u64) -> Result<u64, MailboxError> {
        let cutoff = now_ms.saturating_sub(self.limits.ttl_ms);
        let all = format!("{SUBJECT_PREFIX}>");
        let mut from = 1;
        let mut gone = 0;
        while let Some(m) = self.next("purging expired entries", &all, from).await? {
            // An entry without this plugin's headers was not put here by a relay: it goes too,
            // rather than stopping expiry for the whole stream.
            if Self::header(&m, STORED_AT).is_some_and(|at| at >= cutoff) {
                break;
            }
            from = m.sequence.saturating_add(1);
            self.stream
                .delete_message(m.sequence)
                .await
                .map_err(|e| self.unavailable("purging expired entries", e))?;
            gone += 1;
        }
        Ok(gone)
    }

    async fn health(&self) -> Health {
        match self.jetstream.get_stream(STREAM).await {
            Ok(_) => Health::Up,
            Err(e) => Health::Down(
                self.unavailable("reading the stream's state", e)
                    .to_string(),
            ),
        }
    }
}

/// Registers mailbox kind `"nats"` (the settings of `[broker] kind = "nats"`, and `replicas`).
pub fn register(kinds: &mut Kinds<Arc<dyn Mailbox>, MailboxLimits>) -> Result<(), PluginError> {
    kinds.register(KIND, |config, limits| async move {
        let config = NatsMailboxConfig::from_section(config)?;
        Ok(Arc::new(NatsMailbox::connect(&config, limits).await?) as Arc<dyn Mailbox>)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipient_is_one_literal_subject_under_the_stream() {
        let user = UserId::from_bytes([7; syncra_core::id::USER_ID_LEN]);
        let s = subject(&user);
        assert!(s.starts_with(SUBJECT_PREFIX), "{s}");
        assert_eq!(s.len(), SUBJECT_PREFIX.len() + 32);
        assert!(
            !s.contains('*') && !s.contains('>') && !s.contains(' '),
            "{s}"
        );
    }

    #[test]
    fn replicas_is_a_mailbox_setting_from_one_to_five() {
        let section = |extra: serde_json::Value| {
            let mut s = serde_json::json!({ "url": "nats://h:4222" });
            for (k, v) in extra.as_object().unwrap() {
                s[k] = v.clone();
            }
            NatsMailboxConfig::from_section(s)
        };
        assert_eq!(
            section(serde_json::json!({})).unwrap(),
            NatsMailboxConfig::new("nats://h:4222")
        );
        assert_eq!(
            section(serde_json::json!({ "replicas": 3 }))
                .unwrap()
                .replicas,
            Some(3)
        );
        for bad in [
            serde_json::json!(0),
            serde_json::json!(6),
            serde_json::json!(-1),
            serde_json::json!("3"),
        ] {
            let err = section(serde_json::json!({ "replicas": bad })).unwrap_err();
            assert!(matches!(err, PluginError::Config { .. }), "{err}");
            assert!(err.to_string().contains("`replicas`"), "{err}");
        }
        // The connection settings still refuse what they do not know.
        let err = section(serde_json::json!({ "replica": 3 })).unwrap_err();
        assert!(err.to_string().contains("replica"), "{err}");
        // And the broker does not take `replicas` at all.
        assert!(
            serde_json::from_value::<NatsConfig>(
                serde_json::json!({ "url": "nats://h", "replicas": 3 })
            )
            .is_err()
        );
    }

    #[test]
    fn a_changed_replica_count_updates_the_stream() {
        let limits = MailboxLimits::default();
        let one = stream_config(&limits, per_subject_limit(&limits), 1);
        let three = stream_config(&limits, per_subject_limit(&limits), 3);
        assert!(!same_settings(&one, &three));
        assert!(same_settings(&three, &three.clone()));
    }

    #[test]
    fn an_existing_stream_keeps_a_higher_per_subject_limit() {
        let limits = MailboxLimits::default();
        let ours = stream_config(&limits, per_subject_limit(&limits), 1);
        let mut theirs = ours.clone();
        theirs.max_messages_per_subject = per_subject_limit(&limits) * 2;
        let keep = per_subject_limit(&limits).max(theirs.max_messages_per_subject);
        assert_eq!(keep, theirs.max_messages_per_subject);
        assert!(same_settings(&theirs, &stream_config(&limits, keep, 1)));
        assert!(!same_settings(&ours, &stream_config(&limits, keep, 1)));
    }
}
