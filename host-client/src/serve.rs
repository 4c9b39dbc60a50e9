//! The one loop that keeps a client connected and turns what the relay pushes into what a
//! frontend shows — used by `syncra listen`, `syncra bot run` and the terminal UI alike.
//!
//! It reconnects with jittered backoff, drains the outbox on every connection and every few
//! seconds (messages other processes on the same home wrote leave too; so do messages the
//! relay refused because their group had moved on, once the missed commits are processed),
//! rotates and erases prekeys, tops up KeyPackages and refreshes MLS leaves on a timer, makes
//! lost commits again and commits other members' leave requests, and files every delivery in
//! history before acknowledging it.
//!
//! **No head-of-line blocking.** A message from someone who is not a contact yet needs a
//! directory lookup (one round trip, rate-limited by the relay) to learn their handle. Those
//! lookups run beside delivery: at most [`MAX_LOOKUPS`] at a time, each bounded by
//! [`LOOKUP_TIMEOUT`], while messages from known senders are filed at once. A sender's own
//! messages stay in order (they wait behind their sender's lookup); at most [`MAX_PARKED`]
//! messages wait in all, and beyond that a newcomer's message is filed without the lookup (shown
//! with their short id) rather than held in memory. A flood of first messages therefore costs
//! other conversations nothing.
//!
//! Two ways to drive it: [`Serve::next`] for a loop that does nothing else, or
//! [`Serve::wait`] (cancel-safe, borrows no client) then [`Serve::handle`] and
//! [`Serve::take_events`] for a loop that also serves a person (the TUI).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use syncra_core::wire::ErrorCode;
use syncra_core::{IdentityRecord, UserId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{Client, Incoming, Opened, Opening};
use crate::net::{Push, Session};

/// How often a long-running session checks whether its prekey is due for rotation (and retired
/// prekeys for erasure). Rotation periods are days; this bounds how late a rotation can be.
pub const KEY_CHECK_EVERY: Duration = Duration::from_secs(600);

/// How long a fresh connection waits for the end of the login's backlog before it does what
/// waits for answers anyway (a relay that never ends it must not keep the outbox waiting).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

/// How long a fresh connection that has received no backlog entry waits before it takes the
/// backlog to be over: a relay of before 2026-12-07 without a mailbox sends no `PendingEnd`.
/// Every backlog entry starts it again (live deliveries do not: on such a relay they are all
/// there is).
const CATCH_UP_QUIET: Duration = Duration::from_secs(5);

/// Reading the login's backlog ([`Serve::catching_up`]).
#[derive(Clone, Copy, Debug)]
struct CatchUp {
    /// Over if nothing arrives before this.
    quiet_until: Instant,
    /// Over at this, whatever arrives.
    limit: Instant,
}

impl CatchUp {
    fn started() -> Self {
        let now = Instant::now();
        CatchUp {
            quiet_until: now + CATCH_UP_QUIET,
            limit: now + CATCH_UP_LIMIT,
        }
    }

    fn ends_at(&self) -> Instant {
        self.quiet_until.min(self.limit)
    }
}

/// How often the outbox is looked at while connected (entries other processes wrote).
const OUTBOX_EVERY: Duration = Duration::from_secs(2);

/// Directory lookups of new senders in flight at once.
pub const MAX_LOOKUPS: usize = 4;

/// How long one lookup may take before its messages are filed without it.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages that may wait for their sender's lookup, in all.
pub const MAX_PARKED: usize = 512;

/// What [`Serve`] reports to its caller.
#[derive(Debug)]
pub enum ServeEvent {
    /// A connection attempt starts (the first is attempt 1).
    Connecting {
        /// Which attempt this is.
        attempt: u32,
    },
    /// Connected and caught up: the login's backlog read, the keys' upkeep done and the
    /// outbox drained.
    Connected {
        /// Messages the outbox sent on connecting.
        sent: usize,
    },
    /// The connection failed or was lost; the next attempt is in `retry_in`.
    Disconnected {
        /// Why.
        reason: String,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// A delivery, filed in history (or refused: [`Incoming::Rejected`]).
    Incoming(Incoming),
    /// A delivery could not be filed (a local failure, such as the disk). It was not
    /// acknowledged: one from the mailbox comes again at the next login.
    Failed(String),
    /// How many messages waited in the mailbox while I was away (they came first).
    Backlog(u32),
    /// A relay notice not tied to a request (for example: messages were dropped).
    Notice(ErrorCode, String),
}

/// What woke [`Serve::wait`]; give it to [`Serve::handle`].
#[derive(Debug)]
pub enum Wake {
    /// The stop future completed, or the deliveries channel closed.
    Stop,
    /// Time to (re)connect.
    Connect,
    /// The connection ended.
    Closed,
    /// Time to check the keys.
    KeyCheck,
    /// Time to look at the outbox.
    Outbox,
    /// The relay pushed something.
    Push(Push),
    /// A sender's lookup finished (`None`: it failed or timed out).
    LookedUp(UserId, Option<IdentityRecord>),
}

/// Keeps a client connected and yields what happens, until `stop` completes:
///
/// ```ignore
/// let mut serve = Serve::new(&mut client, stop)?;
/// while let Some(event) = serve.next(&mut client).await { /* ... */ }
/// ```
pub struct Serve<S> {
    pushes: mpsc::Receiver<Push>,
    stop: std::pin::Pin<Box<S>>,
    stopped: bool,
    attempt: u32,
    /// When to try connecting next (`None`: now).
    retry_at: Option<Instant>,
    /// No relay is configured yet: do not try until [`Serve::connect_now`].
    paused: bool,
    /// A login succeeded and the end of its connection is not handled yet: a connection found
    /// gone is `Closed` (backoff, `Disconnected`), even if it went while this loop was busy.
    live: bool,
    key_check_every: Duration,
    next_key_check: Instant,
    /// Rotation failures in a row (for the retry backoff).
    key_failures: u32,
    next_outbox: Instant,
    /// Logged in and reading the login's backlog: nothing that waits for an answer runs
    /// meanwhile (key upkeep, the outbox, follow-ups), since an answer can sit behind more
    /// backlog than the deliveries channel holds while this loop would wait for it instead of
    /// reading. Ends at `PendingEnd`, or at its quiet time (an older relay without a mailbox
    /// sends none), or at its limit.
    catching_up: Option<CatchUp>,
    lookups: JoinSet<(UserId, Option<IdentityRecord>)>,
    /// Whose lookup each task is (to file their messages even if a task failed).
    looking_up: HashMap<tokio::task::Id, UserId>,
    /// Messages waiting for their sender's lookup, per sender in arrival order, with the
    /// mailbox entry to acknowledge once filed.
    parked: HashMap<UserId, VecDeque<(Option<u64>, Opened)>>,
    parked_len: usize,
    /// The bound on `parked_len` ([`MAX_PARKED`] unless changed; tests lower it).
    max_parked: usize,
    /// Senders whose lookup waits for a free slot.
    queued: VecDeque<UserId>,
    /// Mailbox entries that repeat a message still parked: acknowledged only once nothing is
    /// parked (the parked copy is not in history yet).
    deferred_acks: Vec<u64>,
    events: VecDeque<ServeEvent>,
}

impl<S: Future<Output = ()>> Serve<S> {
    /// Takes the client's deliveries; there can be only one consumer.
    pub fn new(client: &mut Client, stop: S) -> anyhow::Result<Self> {
        let pushes = client
            .take_pushes()
            .context("deliveries are already being consumed")?;
        let now = Instant::now();
        Ok(Serve {
            pushes,
            stop: Box::pin(stop),
            stopped: false,
            attempt: 0,
            retry_at: None,
            paused: false,
            live: false,
            key_check_every: KEY_CHECK_EVERY,
            next_key_check: now + KEY_CHECK_EVERY,
            key_failures: 0,
            next_outbox: now + OUTBOX_EVERY,
            catching_up: None,
            lookups: JoinSet::new(),
            looking_up: HashMap::new(),
            parked: HashMap::new(),
            parked_len: 0,
            max_parked: MAX_PARKED,
            queued: VecDeque::new(),
            deferred_acks: Vec::new(),
            events: VecDeque::new(),
        })
    }

    /// Keeps at most `n` messages waiting for their senders' lookups instead of
    /// [`MAX_PARKED`] (tests: the relay's rate limit lets no test send 512).
    pub fn max_parked(mut self, n: usize) -> Self {
        self.max_parked = n;
        self
    }

    /// Checks the keys this often instead of every [`KEY_CHECK_EVERY`] (tests).
    pub fn check_keys_every(mut self, every: Duration) -> Self {
        self.key_check_every = every;
        self.next_key_check = Instant::now() + every;
        self
    }

    /// Failed connection attempts in a row.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Connects at the next [`wait`](Self::wait) (for example once a relay is configured).
    pub fn connect_now(&mut self) {
        self.paused = false;
        self.retry_at = None;
    }

    /// The next event; `None` once `stop` completed (the client is then disconnected).
    pub async fn next(&mut self, client: &mut Client) -> Option<ServeEvent> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Some(event);
            }
            if self.stopped {
                return None;
            }
            let wake = self.wait(client.session(), client.is_connected()).await;
            self.handle(client, wake).await;
        }
    }

    /// Events produced by [`handle`](Self::handle), oldest first.
    pub fn take_events(&mut self) -> impl Iterator<Item = ServeEvent> + '_ {
        self.events.drain(..)
    }

    /// Waits for the next thing to do. Cancel-safe and borrows no client, so a loop can wait
    /// for this and for a person's input at once.
    pub async fn wait(&mut self, session: Option<Arc<Session>>, connected: bool) -> Wake {
        if self.stopped {
            return Wake::Stop;
        }
        if self.live && !connected {
            return Wake::Closed;
        }
        let connect_at =
            (!connected && !self.paused).then(|| self.retry_at.unwrap_or_else(Instant::now));
        let connect = async {
            match connect_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let closed = async {
            match (&session, connected) {
                (Some(s), true) => s.wait_closed().await,
                _ => std::future::pending().await,
            }
        };
        let key_check = async {
            match (connected, self.catching_up) {
                (true, None) => tokio::time::sleep_until(self.next_key_check).await,
                _ => std::future::pending().await,
            }
        };
        // While catching up, the outbox's turn comes at the catch-up's limit instead.
        let outbox = async {
            match (connected, self.catching_up) {
                (true, None) => tokio::time::sleep_until(self.next_outbox).await,
                (true, Some(catch_up)) => tokio::time::sleep_until(catch_up.ends_at()).await,
                (false, _) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut self.stop => Wake::Stop,
            () = connect => Wake::Connect,
            () = closed => Wake::Closed,
            () = key_check => Wake::KeyCheck,
            () = outbox => Wake::Outbox,
            Some(done) = self.lookups.join_next_with_id(), if !self.lookups.is_empty() => {
                match done {
                    Ok((id, (sender, record))) => {
                        self.looking_up.remove(&id);
                        Wake::LookedUp(sender, record)
                    }
                    // A lookup task cannot fail short of a bug; its messages are still filed.
                    Err(e) => {
                        tracing::warn!("a sender lookup stopped: {e}");
                        match self.looking_up.remove(&e.id()) {
                            Some(sender) => Wake::LookedUp(sender, None),
                            None => Wake::Outbox,
                        }
                    }
                }
            }
            push = self.pushes.recv() => match push {
                Some(push) => Wake::Push(push),
                None => Wake::Stop,
            },
        }
    }

    /// Does what `wake` asks; what comes of it is in [`take_events`](Self::take_events).
    pub async fn handle(&mut self, client: &mut Client, wake: Wake) {
        match wake {
            Wake::Stop => {
                self.stopped = true;
                // What is parked is filed without its lookup rather than dropped.
                let senders: Vec<UserId> = self.parked.keys().copied().collect();
                for sender in senders {
                    self.file_parked(client, sender, None).await;
                }
                client.disconnect().await;
            }
            Wake::Connect => self.connect(client).await,
            Wake::Closed => {
                self.live = false;
                self.catching_up = None;
                client.disconnect().await;
                self.schedule_retry("the connection to the relay was lost".into());
            }
            Wake::KeyCheck => self.maintain_keys(client).await,
            Wake::Outbox if let Some(catch_up) = self.catching_up => {
                if Instant::now() >= catch_up.limit {
                    tracing::warn!(
                        "the relay has not ended the login's backlog within {}s; going on",
                        CATCH_UP_LIMIT.as_secs()
                    );
                }
                self.caught_up(client).await;
            }
            Wake::Outbox => {
                self.next_outbox = Instant::now() + OUTBOX_EVERY;
                if client.outbox_len() > 0
                    && let Err(e) = client.drain_outbox().await
                {
                    tracing::warn!("outbox: {e:#}");
                }
                // What waits for time rather than a delivery (a copy behind for long enough).
                self.follow_up(client).await;
            }
            Wake::Push(Push::Deliver(carriage)) => {
                self.deliver(client, None, &carriage).await;
                if self.catching_up.is_none() {
                    self.follow_up(client).await;
                }
            }
            Wake::Push(Push::Pending(entry, carriage)) => {
                self.deliver(client, Some(entry), &carriage).await;
                self.after_delivery(client).await;
            }
            Wake::Push(Push::BacklogDone { count, connection }) => {
                if count > 0 {
                    self.events.push_back(ServeEvent::Backlog(count));
                }
                // Only this connection's end ends its catch-up: one that a connection which has
                // ended left in the channel ends nothing (before, it brought the client online
                // with the new login's backlog unread).
                let this_one = client
                    .session()
                    .is_some_and(|s| s.connection == connection && !s.is_closed());
                if self.catching_up.is_some() && this_one {
                    self.caught_up(client).await;
                }
            }
            Wake::Push(Push::Notice(code, message)) => {
                self.events.push_back(ServeEvent::Notice(code, message));
            }
            Wake::LookedUp(sender, record) => {
                self.file_parked(client, sender, record).await;
                self.start_lookups(client);
            }
        }
    }

    async fn connect(&mut self, client: &mut Client) {
        if client.settings().relay.is_none() {
            // Nothing to connect to until registration sets a relay (`connect_now`).
            self.paused = true;
            return;
        }
        self.events.push_back(ServeEvent::Connecting {
            attempt: self.attempt + 1,
        });
        match client.login().await {
            Ok(()) => {
                self.live = true;
                self.attempt = 0;
                self.retry_at = None;
                // The backlog first (see `catching_up`); the rest in `caught_up`.
                self.catching_up = Some(CatchUp::started());
            }
            Err(e) => self.schedule_retry(e.to_string()),
        }
    }

    /// The login's backlog is read (`PendingEnd`, or nothing came for [`CATCH_UP_QUIET`], or
    /// [`CATCH_UP_LIMIT`] passed): the key upkeep of a fresh connection, then the outbox, then
    /// `Connected`, then what the backlog's deliveries left to follow up.
    async fn caught_up(&mut self, client: &mut Client) {
        self.catching_up = None;
        client.upkeep().await;
        self.next_outbox = Instant::now() + OUTBOX_EVERY;
        let sent = match client.drain_outbox().await {
            Ok(reports) => reports.len(),
            Err(e) => {
                tracing::warn!("outbox: {e:#}");
                0
            }
        };
        self.events.push_back(ServeEvent::Connected { sent });
        // What the backlog's deliveries left to do.
        self.follow_up(client).await;
    }

    /// After a backlog entry: its follow-ups, or, while catching up, a later end of the quiet
    /// time (the follow-ups wait for `caught_up`).
    async fn after_delivery(&mut self, client: &mut Client) {
        match &mut self.catching_up {
            Some(catch_up) => catch_up.quiet_until = Instant::now() + CATCH_UP_QUIET,
            None => self.follow_up(client).await,
        }
    }

    fn schedule_retry(&mut self, reason: String) {
        let retry_in = crate::net::backoff(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        self.retry_at = Some(Instant::now() + retry_in);
        self.events
            .push_back(ServeEvent::Disconnected { reason, retry_in });
    }

    /// The timer's turn: rotate or erase if due; a failure is retried with backoff.
    async fn maintain_keys(&mut self, client: &mut Client) {
        let now = Instant::now();
        match client.maintain_keys().await {
            Ok(()) => {
                self.key_failures = 0;
                self.next_key_check = now + self.key_check_every;
            }
            Err(e) => {
                let retry_in = crate::net::backoff(self.key_failures).min(self.key_check_every);
                self.key_failures = self.key_failures.saturating_add(1);
                self.next_key_check = now + retry_in;
                tracing::warn!(
                    "prekey rotation failed; retrying in {:.1}s: {e:#}",
                    retry_in.as_secs_f64()
                );
            }
        }
    }

    /// What deliveries left to do that needs the relay ([`Client::follow_up`]), and the events
    /// it noted, shown as they happen.
    async fn follow_up(&mut self, client: &mut Client) {
        client.follow_up().await;
        for incoming in client.take_follow_up_events() {
            self.events.push_back(ServeEvent::Incoming(incoming));
        }
    }

    /// One delivery: processed by MLS now; filed now, or after its sender's lookup.
    async fn deliver(&mut self, client: &mut Client, entry: Option<u64>, carriage: &[u8]) {
        let opened = match client.open_delivery(carriage).await {
            Ok(Opening::Opened(opened)) => opened,
            Ok(Opening::Done(incoming)) => {
                if let Some(entry) = entry {
                    if incoming.is_none() && self.parked_len > 0 {
                        // Possibly a repeat of a parked message (a new login sends what was
                        // not acknowledged yet): acknowledged once that one is filed.
                        self.deferred_acks.push(entry);
                    } else {
                        client.acknowledge(entry).await;
                    }
                }
                if let Some(incoming) = incoming {
                    self.events.push_back(ServeEvent::Incoming(incoming));
                }
                return;
            }
            Err(e) => {
                self.events.push_back(ServeEvent::Failed(format!(
                    "a delivery could not be filed: {e:#}"
                )));
                return;
            }
        };
        let sender = opened.sender();
        if self.parked.contains_key(&sender) {
            if self.parked_len >= self.max_parked {
                // At the bound (a relay can hold a lookup's answer back while one sender's
                // messages keep coming): what this sender has waiting is filed now, without
                // its lookup (under its short id, as after a crash), then this one. Order
                // holds and memory stays bounded.
                self.file_parked(client, sender, None).await;
                self.file(client, entry, opened, None).await;
                return;
            }
            // Behind the same sender's earlier messages, so their order holds; on disk like
            // them, since its key is used too.
            let mut opened = opened;
            if let Err(e) = client.spool(&mut opened) {
                tracing::warn!("keeping a waiting message on disk: {e:#}");
            }
            if let Some(queue) = self.parked.get_mut(&sender) {
                queue.push_back((entry, opened));
                self.parked_len += 1;
            }
            return;
        }
        if self.parked_len < self.max_parked && client.lookup_needed(&opened).is_some() {
            // Kept on disk while it waits: its key is used, so it would never open again after
            // a crash (client/spool.rs). Without the disk it still waits, in memory only.
            let mut opened = opened;
            if let Err(e) = client.spool(&mut opened) {
                tracing::warn!("keeping a waiting message on disk: {e:#}");
            }
            self.parked
                .entry(sender)
                .or_default()
                .push_back((entry, opened));
            self.parked_len += 1;
            self.queued.push_back(sender);
            self.start_lookups(client);
            return;
        }
        self.file(client, entry, opened, None).await;
    }

    /// Starts queued lookups while there is room.
    fn start_lookups(&mut self, client: &Client) {
        while self.lookups.len() < MAX_LOOKUPS {
            let Some(sender) = self.queued.pop_front() else {
                return;
            };
            let session = client.session();
            let task = self.lookups.spawn(async move {
                let record = match session {
                    Some(s) => tokio::time::timeout(LOOKUP_TIMEOUT, s.lookup_id(sender))
                        .await
                        .ok()
                        .and_then(Result::ok),
                    None => None,
                };
                (sender, record)
            });
            self.looking_up.insert(task.id(), sender);
        }
    }

    /// Files what waited for `sender`'s lookup, in order.
    async fn file_parked(
        &mut self,
        client: &mut Client,
        sender: UserId,
        record: Option<IdentityRecord>,
    ) {
        let Some(queue) = self.parked.remove(&sender) else {
            return;
        };
        self.parked_len -= queue.len();
        self.queued.retain(|s| *s != sender);
        for (entry, opened) in queue {
            self.file(client, entry, opened, record.clone()).await;
        }
        if self.parked_len == 0 {
            for entry in std::mem::take(&mut self.deferred_acks) {
                client.acknowledge(entry).await;
            }
        }
    }

    /// Files one opened delivery; acknowledges its mailbox entry once it is in history.
    async fn file(
        &mut self,
        client: &mut Client,
        entry: Option<u64>,
        opened: Opened,
        record: Option<IdentityRecord>,
    ) {
        match client.file_delivery(opened, record).await {
            Ok(incoming) => {
                if let Some(entry) = entry {
                    client.acknowledge(entry).await;
                }
                if let Some(incoming) = incoming {
                    self.events.push_back(ServeEvent::Incoming(incoming));
                }
            }
            Err(e) => self.events.push_back(ServeEvent::Failed(format!(
                "a delivery could not be filed: {e:#}"
            ))),
        }
    }
}
