//! Conversations on MLS: which MLS group a message goes to, sending in it (again, once caught
//! up, when the group moved on), and the upkeep the delivery service asks of a member —
//! KeyPackages in the directory, commits that lost their epoch made again, leave requests
//! committed, leaves refreshed on a schedule.
//!
//! A 1:1 chat is the conversation made as one (`ConversationId::is_group` false) whose roster
//! is exactly the two people. If both sides create one at the same moment, each ends up in two;
//! both then send in the one with the smaller id (the rule is the same on both sides, so they
//! meet there) and read both.

use std::time::Duration;

use super::*;
use crate::message::GroupLabel;
use crate::mls::{ConversationId, Intent, LEAF_UPDATE_INTERVAL_MS, ServiceError};

/// One-time KeyPackages a client keeps in the directory.
pub const KEY_PACKAGE_TARGET: u32 = 10;

/// How often a commit of this member's with no verdict is sent again while connected (at once
/// after a login too).
pub const RESEND_EVERY: Duration = Duration::from_secs(30);

/// How long a one-shot command waits, at most, for the commit it missed when the relay says the
/// group moved on (`wrong_epoch`) or another commit won (`commit_conflict`). The wait ends as
/// soon as the conversation moved past the epoch in question, so the limit only matters when
/// that commit never comes.
pub(super) const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Why a send got no final answer from the relay.
#[derive(Debug)]
pub(super) struct SendProblem {
    /// Trying again later may work (the relay unreachable, the group moved on meanwhile).
    pub transient: bool,
    /// The recipient is offline and the relay keeps no mailbox: nothing was sent.
    pub offline: bool,
    pub why: String,
}

impl SendProblem {
    fn gone(why: impl Into<String>) -> Self {
        SendProblem {
            transient: false,
            offline: false,
            why: why.into(),
        }
    }

    pub(super) fn is_transient(&self) -> bool {
        self.transient
    }
}

impl std::fmt::Display for SendProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl From<ServiceError> for SendProblem {
    fn from(e: ServiceError) -> Self {
        let transient = match &e {
            ServiceError::Net(net) => net.is_transient(),
            // The winner or the missed commit is on its way; the disk may come back.
            ServiceError::Behind { .. }
            | ServiceError::Conflict { .. }
            | ServiceError::Unanswered { .. } => true,
            ServiceError::State(_) => true,
            _ => false,
        };
        SendProblem {
            transient,
            offline: false,
            why: e.to_string(),
        }
    }
}

impl From<anyhow::Error> for SendProblem {
    fn from(e: anyhow::Error) -> Self {
        SendProblem {
            transient: true,
            offline: false,
            why: format!("{e:#}"),
        }
    }
}

impl Client {
    /// The 1:1 conversation with `peer` to send in, if there is one.
    pub fn direct_with(&self, peer: UserId) -> Option<ConversationId> {
        let me = self.user_id();
        self.mls
            .ids()
            .filter(|id| !id.is_group())
            .filter(|id| {
                self.mls.get(*id).is_some_and(|c| {
                    c.is_active()
                        && c.roster()
                            .is_ok_and(|r| r.len() == 2 && r.contains(&me) && r.contains(&peer))
                })
            })
            .min()
    }

    /// The conversation a message to `target` goes in — for a contact without one yet, a new
    /// 1:1 conversation (their KeyPackage claimed, the Welcome sent) — and the group label
    /// the message carries.
    pub(super) async fn conversation_for(
        &mut self,
        target: &Target,
        session: &Session,
    ) -> Result<(ConversationId, Option<GroupLabel>), SendProblem> {
        match target {
            Target::Direct(peer) => {
                let contact =
                    self.book.by_id(peer).cloned().ok_or_else(|| {
                        SendProblem::gone("the contact of this outbox entry is gone")
                    })?;
                if let Some(why) = self.blocked_reason(&contact) {
                    return Err(SendProblem::gone(why));
                }
                let _lock = self
                    .mls
                    .lock(&self.keys.identity)
                    .await
                    .map_err(anyhow::Error::new)?;
                // Another process of this home may have made it meanwhile (read under the lock).
                if let Some(id) = self.direct_with(*peer) {
                    return Ok((id, None));
                }
                let id = self.mls.create_as(session, &[*peer], false).await.map_err(
                    |e| match e {
                        ServiceError::Net(NetError::Refused {
                            code: ErrorCode::NotFound,
                            ..
                        }) => SendProblem::gone(format!(
                            "{} has no MLS KeyPackage in the directory (a Syncra too old for MLS \
                             conversations, or not logged in since upgrading)",
                            contact.handle
                        )),
                        other => other.into(),
                    },
                )?;
                let reached = self
                    .mls
                    .welcome_outcomes()
                    .iter()
                    .all(|o| matches!(o.outcome, Outcome::Delivered | Outcome::Stored));
                if !reached {
                    // On a relay without a mailbox: they would never join this conversation,
                    // so it is dropped and the next message starts another.
                    self.mls.forget(id).map_err(anyhow::Error::new)?;
                    return Err(SendProblem {
                        transient: false,
                        offline: true,
                        why: format!(
                            "{} is not connected and the relay keeps no mailbox",
                            contact.handle
                        ),
                    });
                }
                Ok((id, None))
            }
            Target::Group(hex) => {
                let group =
                    self.book.groups.get(hex).cloned().ok_or_else(|| {
                        SendProblem::gone("the group of this outbox entry is gone")
                    })?;
                let id = ConversationId::from_hex(hex)
                    .ok_or_else(|| SendProblem::gone("the group has no MLS conversation"))?;
                match self.mls.get(id) {
                    Some(c) if c.is_active() => {}
                    Some(_) => {
                        return Err(SendProblem::gone(format!(
                            "you are no longer a member of @{}",
                            group.name
                        )));
                    }
                    None => {
                        return Err(SendProblem::gone(format!(
                            "@{} was made before groups moved to MLS (or its invitation never                              arrived); create it again with `syncra group create`",
                            group.name
                        )));
                    }
                }
                Ok((id, Some(GroupLabel { name: group.name })))
            }
        }
    }

    /// Encrypts and sends `plaintext` in a conversation, under the MLS state's lock. When the
    /// relay says the group moved on (`wrong_epoch`), a one-shot command processes what it
    /// missed and encrypts again; a long-running session ([`Serve`], which owns the deliveries)
    /// gets a transient problem and its outbox tries again once it has caught up.
    pub(super) async fn send_in(
        &mut self,
        session: &Session,
        conversation: ConversationId,
        plaintext: &[u8],
    ) -> Result<Vec<RecipientOutcome>, SendProblem> {
        let mut attempt = 0;
        loop {
            let result = {
                let _lock = self
                    .mls
                    .lock(&self.keys.identity)
                    .await
                    .map_err(anyhow::Error::new)?;
                self.mls.send(session, conversation, plaintext).await
            };
            match result {
                Err(ServiceError::Behind { epoch, .. })
                    if self.pushes_rx.is_some() && attempt < 2 =>
                {
                    attempt += 1;
                    self.catch_up_past(conversation, epoch, CATCH_UP_WAIT)
                        .await?;
                }
                other => return other.map_err(SendProblem::from),
            }
        }
    }

    /// Processes and files the deliveries this process holds (a one-shot command owns its
    /// deliveries), waiting up to `wait` for the first one. Returns how many were processed.
    pub async fn catch_up(&mut self, wait: Duration) -> anyhow::Result<usize> {
        self.process_pushes(wait, |_, done| done > 0).await
    }

    /// Processes and files the deliveries this process holds until `conversation` moved past
    /// `epoch` (the commit that won it arrived: the relay answered `wrong_epoch` or
    /// `commit_conflict`) or it is gone, waiting up to `wait` in all. Whatever else arrives
    /// first — another conversation's messages, a Welcome — is processed on the way instead of
    /// ending the wait.
    pub(super) async fn catch_up_past(
        &mut self,
        conversation: ConversationId,
        epoch: u64,
        wait: Duration,
    ) -> anyhow::Result<usize> {
        self.process_pushes(wait, |client, _| {
            client
                .mls
                .get(conversation)
                .is_none_or(|c| c.epoch() > epoch)
        })
        .await
    }

    /// Processes held deliveries: everything already here, then, until `enough` says so (given
    /// how many were processed) or `wait` ran out, what arrives.
    async fn process_pushes(
        &mut self,
        wait: Duration,
        enough: impl Fn(&Self, usize) -> bool,
    ) -> anyhow::Result<usize> {
        let Some(mut pushes) = self.pushes_rx.take() else {
            return Ok(0);
        };
        let mut done = 0;
        let deadline = tokio::time::Instant::now() + wait;
        let result = loop {
            let push = match pushes.try_recv() {
                Ok(push) => push,
                Err(_) if wait.is_zero() || enough(self, done) => break Ok(done),
                Err(_) => match tokio::time::timeout_at(deadline, pushes.recv()).await {
                    Ok(Some(push)) => push,
                    _ => break Ok(done),
                },
            };
            let (entry, carriage) = match push {
                Push::Deliver(carriage) => (None, carriage),
                Push::Pending(entry, carriage) => (Some(entry), carriage),
                _ => continue,
            };
            if let Err(e) = self.receive(&carriage).await {
                break Err(e);
            }
            if let Some(entry) = entry {
                self.acknowledge(entry).await;
            }
            done += 1;
        };
        self.pushes_rx = Some(pushes);
        result
    }

    /// Before a one-shot command disconnects: a live delivery it holds would be lost (the relay
    /// counted it delivered), and a lost commit leaves a conversation behind for good, so if
    /// any arrived live, everything held is processed and filed in order. Held mailbox entries
    /// alone stay at the relay (not acknowledged) for the next login, where `listen` or the TUI
    /// shows them.
    pub(super) async fn settle_deliveries(&mut self) -> anyhow::Result<()> {
        let Some(mut pushes) = self.pushes_rx.take() else {
            return Ok(());
        };
        let mut held = Vec::new();
        while let Ok(push) = pushes.try_recv() {
            held.push(push);
        }
        self.pushes_rx = Some(pushes);
        if !held.iter().any(|p| matches!(p, Push::Deliver(_))) {
            return Ok(());
        }
        for push in held {
            let (entry, carriage) = match push {
                Push::Deliver(carriage) => (None, carriage),
                Push::Pending(entry, carriage) => (Some(entry), carriage),
                _ => continue,
            };
            self.receive(&carriage).await?;
            if let Some(entry) = entry {
                self.acknowledge(entry).await;
            }
        }
        Ok(())
    }

    /// What processing deliveries left to do that needs the relay: commits that lost their
    /// epoch made again, other members' leave requests committed. [`Serve`] calls it after
    /// every delivery; a failure is logged and tried again after the next one.
    pub async fn follow_up(&mut self) {
        self.resend_unanswered().await;
        // Rejoin requests left unanswered for their wait are asked again.
        let unanswered: Vec<ConversationId> = self
            .asked_rejoin
            .iter()
            .filter(|(_, asked)| asked.at.elapsed() >= asked.wait)
            .map(|(id, _)| *id)
            .collect();
        self.follow_ups.extend(unanswered);
        if self.follow_ups.is_empty() {
            return;
        }
        let Some(session) = self.session() else {
            return;
        };
        for id in std::mem::take(&mut self.follow_ups) {
            let lock = self.mls.lock(&self.keys.identity).await;
            if let Err(e) = lock {
                tracing::warn!("the MLS state: {e}");
                self.follow_ups.insert(id);
                continue;
            }
            if let Some(intent) = self.mls.lost_intent(id) {
                let event = self.event_of(intent);
                match self.mls.rebase(&session, id).await {
                    Ok(Some(_)) => self.note_change(id, event),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("making a lost commit of conversation {id} again: {e}")
                    }
                }
            }
            if self.mls.has_rejoin_requests(id) {
                let (back, failed) = self.mls.readmit_pending(&session, id).await;
                for e in failed {
                    tracing::warn!("letting a member back into conversation {id}: {e}");
                }
                if !back.is_empty() {
                    let event = format!("you let {} back in", self.names(back));
                    self.note_change(id, Some(event));
                }
            }
            self.ask_to_rejoin_if_behind(&session, id).await;
            let leaving = self
                .mls
                .get(id)
                .filter(|c| c.is_active())
                .map(|c| c.leave_requests())
                .unwrap_or_default();
            if !leaving.is_empty() {
                match self.mls.commit_departures(&session, id).await {
                    Ok(_) => {
                        drop(lock);
                        let event = format!("{} left", self.names(leaving));
                        self.note_change(id, Some(event));
                    }
                    Err(e) => tracing::warn!("committing a leave request in {id}: {e}"),
                }
            }
        }
    }

    /// Names for people, joined for an event line.
    fn names(&self, ids: impl IntoIterator<Item = UserId>) -> String {
        ids.into_iter()
            .map(|m| self.book.name_of(&m))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// After a follow-up changed a conversation's roster: my group entry follows it, and the
    /// event (if any) is noted and shown as it happens. A failure is logged (the change itself
    /// is made).
    /// What the history says when a change of this member's is made.
    fn event_of(&self, intent: Intent) -> Option<String> {
        match intent {
            Intent::Add(added) => Some(format!(
                "you added {}",
                self.names(added.iter().map(|p| p.user_id()))
            )),
            Intent::Remove(removed) => Some(format!("you removed {}", self.names(removed))),
            Intent::Readmit { package, .. } => Some(format!(
                "you let {} back in",
                self.names([package.user_id()])
            )),
            Intent::Update => None,
        }
    }

    /// Sends again, at most every [`RESEND_EVERY`] (and at once after a login: from
    /// [`Client::upkeep`], so a one-shot command does it too), each commit of this member's that
    /// had no verdict (no answer came, or the relay's store was away): the same commit, which
    /// the relay routes if it won already and decides now if not.
    pub(super) async fn resend_unanswered(&mut self) {
        let now = std::time::Instant::now();
        if self.resend_at.is_some_and(|at| now < at) {
            return;
        }
        let Some(session) = self.session() else {
            return;
        };
        // The lock is taken at most this often, even with nothing to send.
        self.resend_at = Some(now + RESEND_EVERY);
        // Read under the lock: another process of this home may have left one.
        let unanswered = match self.mls.lock(&self.keys.identity).await {
            Ok(_lock) => self.mls.unanswered(),
            Err(e) => {
                tracing::warn!("the MLS state: {e}");
                return;
            }
        };
        if unanswered.is_empty() {
            return;
        }
        for id in unanswered {
            // Held through the send and what follows: another process of this home may be
            // processing the same conversation.
            let _lock = match self.mls.lock(&self.keys.identity).await {
                Ok(lock) => lock,
                Err(e) => {
                    tracing::warn!("the MLS state: {e}");
                    return;
                }
            };
            let intent = self.mls.get(id).and_then(|c| c.pending_intent());
            match self.mls.resend(&session, id).await {
                Ok(Some(_)) => {
                    let event = intent.and_then(|i| self.event_of(i));
                    self.note_change(id, event);
                }
                // Another commit won (`Conflict`): the change is made again once the winner
                // is processed, as any lost commit's.
                Ok(None) | Err(ServiceError::Unanswered { .. } | ServiceError::Conflict { .. }) => {
                }
                Err(e) => tracing::warn!("sending a change to conversation {id} again: {e}"),
            }
        }
    }

    fn note_change(&mut self, id: ConversationId, event: Option<String>) {
        let noted = self.sync_roster_of(id).and_then(|()| match event {
            Some(text) => self.note_live(&id.to_hex(), vec![text]),
            None => Ok(()),
        });
        if let Err(e) = noted {
            tracing::warn!("{e:#}");
        }
    }

    /// If this copy of a conversation met a later epoch than it holds (checked again under the
    /// lock, with what other processes of this home processed meanwhile), asks the members to
    /// let it back in — once per stuck epoch, and again if no answer comes (the request or the
    /// Welcome answering it lost), waiting twice as long each time.
    async fn ask_to_rejoin_if_behind(&mut self, session: &Session, id: ConversationId) {
        let Some(&(seen, since)) = self.behind.get(&id) else {
            self.asked_rejoin.remove(&id);
            return;
        };
        let Some(conversation) = self.mls.get(id) else {
            self.behind.remove(&id);
            self.asked_rejoin.remove(&id);
            return;
        };
        let epoch = conversation.epoch();
        if !conversation.is_active() || epoch >= seen {
            // Caught up after all, or out of the group: nothing to ask.
            self.behind.remove(&id);
            self.asked_rejoin.remove(&id);
            return;
        }
        let before = self.asked_rejoin.get(&id).copied();
        let again = match before {
            Some(asked) if asked.epoch == epoch => {
                if asked.at.elapsed() < asked.wait {
                    return;
                }
                true
            }
            _ => false,
        };
        if since.elapsed() < self.rejoin_grace {
            // Maybe only late (a mailbox entry from a login race comes at the next ping):
            // looked at again at a later follow-up.
            self.follow_ups.insert(id);
            return;
        }
        match self.mls.ask_to_rejoin(session, id).await {
            Ok(reached) => {
                let wait = match before {
                    Some(asked) if again => (asked.wait * 2).min(REJOIN_RETRY_MAX),
                    _ => self.rejoin_retry,
                };
                self.asked_rejoin.insert(
                    id,
                    Asked {
                        epoch,
                        at: std::time::Instant::now(),
                        wait,
                    },
                );
                tracing::info!(
                    "conversation {id}: this device missed a change (stuck in epoch {epoch}, the \
                     group is at {seen} or later); asked {reached} members to let it back in{}",
                    if again { " again" } else { "" }
                );
                let hex = id.to_hex();
                let line = if again {
                    "no answer yet; asked the members again to let this device back in"
                } else {
                    "this device missed a change to the group; asked the members to let it back in"
                };
                if self.book.groups.contains_key(&hex)
                    && let Err(e) = self.note_live(&hex, vec![line.to_owned()])
                {
                    tracing::warn!("{e:#}");
                }
            }
            Err(e) => {
                tracing::warn!("asking to be let back into conversation {id}: {e}");
                self.follow_ups.insert(id);
            }
        }
    }

    /// How long a conversation's copy must stay behind a later epoch before this client asks
    /// its members to let it back in ([`REJOIN_GRACE`] unless changed; tests shorten it).
    pub fn rejoin_after(&mut self, grace: Duration) {
        self.rejoin_grace = grace;
    }

    /// How long this client waits for an answer to its first rejoin request in a conversation
    /// before asking again, doubled after each ([`REJOIN_RETRY`] unless changed; tests shorten
    /// it).
    pub fn rejoin_again_after(&mut self, wait: Duration) {
        self.rejoin_retry = wait;
    }

    /// Keeps the directory stocked with this member's KeyPackages and refreshes its leaf
    /// wherever it is due ([`LEAF_UPDATE_INTERVAL_MS`]). Run on connecting and on the key timer.
    pub(super) async fn maintain_mls(&mut self) -> Result<(), ClientError> {
        let session = self.require_session()?;
        let _lock = self
            .mls
            .lock(&self.keys.identity)
            .await
            .map_err(|e| ClientError::Local(e.into()))?;
        self.mls
            .replenish(&session, KEY_PACKAGE_TARGET)
            .await
            .map_err(|e| ClientError::Local(anyhow::anyhow!("publishing KeyPackages: {e}")))?;
        for (id, result) in self
            .mls
            .update_due(&session, syncra_core::now_ms(), LEAF_UPDATE_INTERVAL_MS)
            .await
        {
            if let Err(e) = result {
                tracing::warn!("refreshing my leaf in conversation {id}: {e}");
            }
        }
        Ok(())
    }

    /// Conversations set aside because their state was damaged (docs/PROTOCOL.md §9.5).
    pub fn conversations_set_aside(&self) -> &[crate::mls::SetAside] {
        self.mls.set_aside()
    }

    /// Number of MLS conversations this member is in.
    pub fn conversation_count(&self) -> usize {
        self.mls
            .ids()
            .filter(|id| self.mls.get(*id).is_some_and(|c| c.is_active()))
            .count()
    }
}
