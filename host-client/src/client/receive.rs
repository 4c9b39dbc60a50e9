//! Receiving: an MLS carriage processed (under the MLS state's lock, saved before anything is
//! shown), then filed (pinning a new sender, the group's roster and events, history).

use super::*;
use crate::mls::{Arrival, MlsError, RosterEvent, ServiceError};

/// How many people a misdeclared member list names in its event line (a list can hold
/// thousands).
const MISDECLARED_NAMES: usize = 8;

impl Client {
    /// Deliveries refused or skipped since this process started (bad, replayed messages
    /// aside).
    pub fn rejected_count(&self) -> u64 {
        self.rejected
    }

    /// Processes a delivery, files it in history and says what to show. The sender, if not a
    /// contact yet, is looked up on the relay first (one round trip): a long-running session
    /// uses [`Serve`] instead, which runs those lookups beside other deliveries.
    ///
    /// Nothing in a delivery is trusted: one that does not process (tampered, replayed, from
    /// an epoch whose keys are gone, not for a conversation of mine, not a Syncra message)
    /// comes back as [`Incoming::Rejected`], is counted and changes nothing. An `Err` is a
    /// local failure (the disk), never a peer's doing.
    pub async fn receive(&mut self, carriage: &[u8]) -> anyhow::Result<Option<Incoming>> {
        let mut opened = match self.open_delivery(carriage).await? {
            Opening::Done(incoming) => return Ok(incoming),
            Opening::Opened(opened) => opened,
        };
        let record = match self.lookup_needed(&opened) {
            Some(session) => {
                // Kept on disk while it waits: its key is used, it never opens again. Without
                // the disk it still waits, in memory only.
                if let Err(e) = self.spool(&mut opened) {
                    tracing::warn!("keeping a waiting message on disk: {e:#}");
                }
                session.lookup_id(opened.sender()).await.ok()
            }
            None => None,
        };
        self.file_delivery(opened, record).await
    }

    /// The first half of [`receive`](Self::receive): processes the carriage with MLS (its
    /// kind, group and epoch checked against the message inside) and saves the MLS state.
    /// Nothing is filed yet.
    pub async fn open_delivery(&mut self, carriage: &[u8]) -> anyhow::Result<Opening> {
        // Another process on this home may have changed contacts or groups since.
        self.book.refresh()?;
        if carriage.first() != Some(&syncra_core::carriage::CARRIAGE_VERSION) {
            return Ok(Opening::Done(Some(
                self.rejected(
                    "a delivery in the retired sealed-envelope format (version 1) was refused: \
                 conversations are MLS only; the sender needs to upgrade"
                        .into(),
                ),
            )));
        }
        let result = {
            let _lock = self.mls.lock(&self.keys.identity).await?;
            self.mls.receive(carriage)
        };
        match result {
            Ok(arrival) => Ok(Opening::Opened(Opened(Box::new(arrival), None))),
            // Already processed by another process of this home (it filed it), or a repeat.
            Err(ServiceError::Mls(e)) if self.already_processed(carriage, &e) => {
                Ok(Opening::Done(None))
            }
            Err(ServiceError::State(e)) => Err(anyhow::Error::new(e).context("the MLS state")),
            Err(ServiceError::Unknown(id)) if self.mls.set_aside().iter().any(|s| s.id == Some(id)) => {
                Ok(Opening::Done(Some(self.rejected(format!(
                    "a delivery in conversation {id}, which this device set aside when its \
                     state was damaged, cannot be read: writing to the person starts a new chat; \
                     in a group, a member adds you again"
                )))))
            }
            Err(ServiceError::Mls(MlsError::NoMatchingKeyPackage))
                if self.mls.set_aside().iter().any(|s| s.id.is_none()) =>
            {
                Ok(Opening::Done(Some(self.rejected(
                    "a Welcome made with a KeyPackage this device lost when its KeyPackage store \
                     was damaged and set aside cannot be read: whoever added you adds you again"
                        .to_owned(),
                ))))
            }
            Err(ServiceError::Mls(MlsError::FutureEpoch { message, current }))
                if self.note_behind(carriage, message) =>
            {
                // A commit before it has not been processed: held until it is (it may only be
                // late), refused if this copy is let back in instead.
                Ok(Opening::Done(self.hold_future(carriage, message, current)))
            }
            Err(e) => Ok(Opening::Done(Some(
                self.rejected(format!("a delivery was refused: {e}")),
            ))),
        }
    }

    /// Notes that a conversation's copy is behind `epoch` for good (the relay delivers a
    /// group's commits before what follows them, so a later epoch here means one was lost):
    /// the next follow-up asks its members to let this device back in.
    fn note_behind(&mut self, carriage: &[u8], epoch: u64) -> bool {
        let Ok(carried) = syncra_core::carriage::parse(carriage) else {
            return false;
        };
        let id = ConversationId::from_bytes(carried.header.group_id.0);
        if self.mls.get(id).is_none() {
            return false;
        }
        let seen = self
            .behind
            .entry(id)
            .or_insert((epoch, std::time::Instant::now()));
        seen.0 = seen.0.max(epoch);
        self.follow_ups.insert(id);
        true
    }

    /// Holds a delivery from a later epoch than this copy reached (at most [`HELD_FUTURE_MAX`];
    /// beyond, the oldest is refused). Answers what to show now.
    fn hold_future(&mut self, carriage: &[u8], epoch: u64, current: u64) -> Option<Incoming> {
        let Ok(carried) = syncra_core::carriage::parse(carriage) else {
            return None;
        };
        let id = ConversationId::from_bytes(carried.header.group_id.0);
        self.held_future.push_back((id, epoch, carriage.to_vec()));
        if self.held_future.len() <= HELD_FUTURE_MAX {
            return None;
        }
        self.held_future.pop_front();
        Some(self.rejected(format!(
            "a delivery from epoch {epoch} of a conversation this device holds at epoch \
             {current} was dropped: more than {HELD_FUTURE_MAX} wait for changes not processed"
        )))
    }

    /// After conversations moved to a later epoch: the held deliveries they can now read are
    /// processed and filed, in order, and queued to show ([`Client::take_follow_up_events`]).
    /// A commit among them moves its conversation on again, which this loop picks up too.
    async fn retry_held(&mut self) -> anyhow::Result<()> {
        while let Some((conversation, epoch)) = self.moved_on.pop_front() {
            for (_, carriage) in self.take_held(conversation, epoch) {
                let shown = match self.open_delivery(&carriage).await? {
                    Opening::Done(shown) => shown,
                    Opening::Opened(opened) => self.file_opened(opened, None)?,
                };
                if let Some(shown) = shown {
                    self.shown_later.push(shown);
                }
            }
        }
        Ok(())
    }

    /// Takes the held deliveries of `conversation` made in epoch `up_to` or before, in order
    /// (epoch, carriage); the others stay held.
    fn take_held(&mut self, conversation: ConversationId, up_to: u64) -> Vec<(u64, Vec<u8>)> {
        if !self
            .held_future
            .iter()
            .any(|(id, _, _)| *id == conversation)
        {
            return Vec::new();
        }
        let (taken, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held_future)
            .into_iter()
            .partition(|(id, at, _)| *id == conversation && *at <= up_to);
        self.held_future = rest.into();
        taken.into_iter().map(|(_, at, c)| (at, c)).collect()
    }

    /// Refuses what was held for a conversation whose copy was replaced (let back in): sent
    /// while this copy was out of step, it cannot be read.
    fn drop_held(&mut self, conversation: ConversationId) {
        for (epoch, _) in self.take_held(conversation, u64::MAX) {
            let shown = self.rejected(format!(
                "a delivery from epoch {epoch} of conversation {conversation} was sent while \
                 this device was out of step with it and cannot be read"
            ));
            self.shown_later.push(shown);
        }
    }

    /// Whether a carriage that MLS refused is one this home has seen already: a replayed
    /// message, a commit for an epoch already left, a Welcome to a conversation already joined.
    /// Several processes of one home (the TUI, `listen`, a one-shot command) each get the
    /// relay's copy; the first processes and files it, the others meet it as one of these.
    fn already_processed(&self, carriage: &[u8], error: &MlsError) -> bool {
        let Ok(carried) = syncra_core::carriage::parse(carriage) else {
            return false;
        };
        let id = ConversationId::from_bytes(carried.header.group_id.0);
        let welcome = carried.header.kind == syncra_core::carriage::CarriageKind::Welcome;
        let seen = match error {
            MlsError::Replayed
            | MlsError::CommitLost { .. }
            | MlsError::OldEpoch { .. }
            | MlsError::StaleRejoin => true,
            MlsError::Unsupported(_) => welcome,
            _ => false,
        };
        seen && self.mls.get(id).is_some()
    }

    /// The session to look the sender of `opened` up on, if they are not a contact yet and I
    /// am connected. Their id is self-certifying; the lookup only learns their handle.
    pub fn lookup_needed(&self, opened: &Opened) -> Option<Arc<Session>> {
        if !matches!(*opened.0, Arrival::Message { .. })
            || self.book.by_id(&opened.sender()).is_some()
        {
            return None;
        }
        self.session()
    }

    /// The second half of [`receive`](Self::receive): files a processed delivery in history,
    /// with the sender's directory record if it was looked up, and says what to show. When it
    /// is a commit, the deliveries held for the epoch it reached are processed next.
    pub async fn file_delivery(
        &mut self,
        opened: Opened,
        looked_up: Option<IdentityRecord>,
    ) -> anyhow::Result<Option<Incoming>> {
        let shown = self.file_opened(opened, looked_up)?;
        self.retry_held().await?;
        Ok(shown)
    }

    /// Files a processed delivery; a commit's conversation is noted for [`Self::retry_held`].
    pub(super) fn file_opened(
        &mut self,
        opened: Opened,
        looked_up: Option<IdentityRecord>,
    ) -> anyhow::Result<Option<Incoming>> {
        let Opened(arrival, spooled) = opened;
        let shown = self.file_arrival(*arrival, looked_up)?;
        if let Some(path) = spooled {
            self.unspool(&path);
        }
        Ok(shown)
    }

    fn file_arrival(
        &mut self,
        arrival: Arrival,
        looked_up: Option<IdentityRecord>,
    ) -> anyhow::Result<Option<Incoming>> {
        match arrival {
            Arrival::Message {
                conversation,
                sender,
                plaintext,
                ..
            } => self.file_message(conversation, sender, &plaintext, looked_up),
            Arrival::Commit {
                conversation,
                by,
                events,
                removed_me,
                rebase,
                epoch,
                misdeclared,
            } => {
                if rebase {
                    self.follow_ups.insert(conversation);
                }
                let shown = self.file_commit(
                    conversation,
                    by,
                    &events,
                    removed_me,
                    misdeclared.as_deref(),
                )?;
                self.moved_on.push_back((conversation, epoch));
                Ok(shown)
            }
            Arrival::LeaveRequest { conversation, .. }
            | Arrival::RejoinRequest { conversation, .. } => {
                // Any other member commits it; this one does at its next turn.
                self.follow_ups.insert(conversation);
                Ok(None)
            }
            Arrival::Joined {
                conversation,
                rejoined: true,
                ..
            } => {
                self.behind.remove(&conversation);
                self.asked_rejoin.remove(&conversation);
                self.drop_held(conversation);
                self.sync_roster_of(conversation)?;
                let hex = conversation.to_hex();
                if !self.book.groups.contains_key(&hex) {
                    return Ok(None);
                }
                self.note_live(
                    &hex,
                    vec![
                        "you are back in: this device had missed a change to the group (what \
                         was sent meanwhile could not be read here)"
                            .to_owned(),
                    ],
                )?;
                // Shown as the answer to this delivery rather than later.
                Ok(self.shown_later.pop())
            }
            // A group shows once a message names it; a 1:1 chat with its first message.
            Arrival::Joined { .. } => Ok(None),
        }
    }

    /// Counts and logs a refused delivery.
    pub(super) fn rejected(&mut self, reason: String) -> Incoming {
        self.rejected = self.rejected.saturating_add(1);
        tracing::warn!(
            "skipped a delivery: {}",
            syncra_core::text::escape_untrusted(&reason)
        );
        Incoming::Rejected { reason }
    }

    /// The target a conversation is shown under: a named group (my local entry for it), or
    /// the 1:1 chat with `other` — only while the conversation was made as one and has exactly
    /// the two of us in it.
    fn shown_as(&self, conversation: ConversationId, other: UserId) -> Option<Target> {
        let hex = conversation.to_hex();
        if self.book.groups.contains_key(&hex) {
            return Some(Target::Group(hex));
        }
        let roster = self.mls.get(conversation)?.roster().ok()?;
        let direct = !conversation.is_group()
            && roster.len() == 2
            && roster.contains(&other)
            && roster.contains(&self.user_id());
        direct.then_some(Target::Direct(other))
    }

    /// Keeps my entry for a group in step with its MLS roster (the membership shown).
    pub(super) fn sync_roster_of(&mut self, conversation: ConversationId) -> anyhow::Result<()> {
        let hex = conversation.to_hex();
        let Some(roster) = self
            .mls
            .get(conversation)
            .map(|c| {
                if c.is_active() {
                    c.roster()
                } else {
                    Ok(Vec::new())
                }
            })
            .transpose()?
        else {
            return Ok(());
        };
        let _lock = self.book.lock()?;
        if let Some(group) = self.book.groups.get_mut(&hex)
            && group.members != roster
        {
            group.members = roster;
            group.updated_ms = syncra_core::now_ms();
            self.book.save()?;
        }
        Ok(())
    }

    fn file_message(
        &mut self,
        conversation: ConversationId,
        from: UserId,
        plaintext: &[u8],
        looked_up: Option<IdentityRecord>,
    ) -> anyhow::Result<Option<Incoming>> {
        let Some(content) = Content::decode(plaintext) else {
            let reason = format!(
                "a message from {} that is not a Syncra message of this version was refused",
                self.book.name_of(&from)
            );
            return Ok(Some(self.rejected(reason)));
        };
        let Some(message_id) = content.message_id() else {
            return Ok(None);
        };
        // Sent twice (its first answer was lost): shown once.
        if self.guard.contains(&from, &message_id) {
            return Ok(None);
        }
        let id = content.id.clone();
        let ts = content.ts;

        // Who is it? An unknown sender's looked-up record is pinned if it is the key MLS
        // authenticated (their id is self-certifying, so a lookup cannot name anyone else).
        if self.book.by_id(&from).is_none()
            && let Some(record) = looked_up
            && record.user_id == from
        {
            let _lock = self.book.lock()?;
            let outcome = self.book.pin(record, true, syncra_core::now_ms());
            self.book.save()?;
            if let PinOutcome::KeyChanged(old) = outcome {
                let conv = Target::Direct(from).conversation();
                let held = StoredMessage {
                    held: true,
                    ..StoredMessage::received(id, from, ts, content.text)
                };
                self.history.append(&conv, &held)?;
                self.remember(from, &message_id)?;
                return Ok(Some(Incoming::Held {
                    handle: old.handle,
                    from,
                }));
            }
        }
        let accepted = self.book.is_accepted(&from);

        // A group message from someone I did not accept is a message request like any other
        // first message: it creates no group entry and names no members.
        let mut events = Vec::new();
        let target = match self.shown_as(conversation, from) {
            Some(target) => target,
            None if accepted && content.group.is_some() => {
                events = self.adopt_group(conversation, from, &content)?;
                Target::Group(conversation.to_hex())
            }
            None => Target::Direct(from),
        };
        if let Target::Group(_) = &target {
            self.sync_roster_of(conversation)?;
        }
        let request = matches!(target, Target::Direct(_)) && !accepted;
        let conversation_name = target.conversation();
        for text in &events {
            let event = StoredMessage {
                event: true,
                ..StoredMessage::received(hex_id(&new_message_id()), from, ts, text.clone())
            };
            self.history.append(&conversation_name, &event)?;
        }
        let text = match (&content.group, request) {
            (Some(_), true) if content.text.is_empty() => "(invited you to a group)".to_owned(),
            _ => content.text,
        };
        if !text.is_empty() {
            let line = StoredMessage::received(id.clone(), from, ts, text.clone());
            self.history.append(&conversation_name, &line)?;
        }
        self.remember(from, &message_id)?;
        let group_name = match &target {
            Target::Group(g) => self.book.groups.get(g).map(|g| g.name.clone()),
            Target::Direct(_) => None,
        };
        Ok(Some(Incoming::Message {
            target,
            group_name,
            from,
            from_name: self.book.name_of(&from),
            text,
            timestamp_ms: ts,
            id,
            request,
            events,
        }))
    }

    /// Remembers a filed message id at rest, so a repeat (even after a restart) shows once.
    fn remember(&mut self, from: UserId, message_id: &MessageId) -> anyhow::Result<()> {
        let now = syncra_core::now_ms();
        self.guard.insert(from, *message_id, now);
        self.replay_log.record(from, message_id, now)
    }

    /// A group I am in by MLS but have no entry for yet, named by an accepted contact's
    /// message: my entry for it, under a local name made from theirs.
    fn adopt_group(
        &mut self,
        conversation: ConversationId,
        from: UserId,
        content: &Content,
    ) -> anyhow::Result<Vec<String>> {
        let roster = match self.mls.get(conversation) {
            Some(c) => c.roster()?,
            None => return Ok(Vec::new()),
        };
        let suggested = content
            .group
            .as_ref()
            .map(|g| g.name.as_str())
            .unwrap_or("");
        let _lock = self.book.lock()?;
        let name = self
            .book
            .unique_group_name(&crate::contacts::local_group_name(suggested));
        let who = self.book.name_of(&from);
        let others: Vec<String> = roster
            .iter()
            .filter(|m| **m != from)
            .map(|m| self.member_name(m))
            .collect();
        self.book.groups.insert(
            conversation.to_hex(),
            Group {
                id: conversation.to_hex(),
                name: name.clone(),
                members: roster,
                updated_ms: syncra_core::now_ms(),
                creator: Some(from),
            },
        );
        self.book.save()?;
        Ok(vec![format!(
            "{who} created @{name} with {}",
            others.join(", ")
        )])
    }

    /// A commit of another member: the roster shown follows it, and each change becomes an
    /// event in the group's history ("alice added eve", "alice removed you"). A member list that
    /// came with the commit (the relay decides by it who may send to the group) and is not the
    /// roster the commit made becomes an event too: worded as what came with the commit, since
    /// the list is not signed and the relay could have changed it.
    fn file_commit(
        &mut self,
        conversation: ConversationId,
        by: UserId,
        events: &[RosterEvent],
        removed_me: bool,
        misdeclared: Option<&[UserId]>,
    ) -> anyhow::Result<Option<Incoming>> {
        let hex = conversation.to_hex();
        if !self.book.groups.contains_key(&hex) {
            // A 1:1 chat's key updates, or a group not shown yet: nothing to show.
            return Ok(None);
        }
        self.sync_roster_of(conversation)?;
        let who = self.member_name(&by);
        let mut lines = Vec::new();
        for event in events {
            match event {
                RosterEvent::Added { by, member } => lines.push(format!(
                    "{} added {}",
                    self.member_name(by),
                    self.member_name(member)
                )),
                RosterEvent::Removed { by, member } => lines.push(format!(
                    "{} removed {}",
                    self.member_name(by),
                    self.member_name(member)
                )),
                // Keys healing is not news to the people in the conversation.
                RosterEvent::Rejoined { by, member } => lines.push(format!(
                    "{} let {} back in",
                    self.member_name(by),
                    self.member_name(member)
                )),
                RosterEvent::Updated { .. } => {}
            }
        }
        if removed_me && lines.is_empty() {
            lines.push(format!("{who} removed you"));
        }
        if let Some(declared) = misdeclared {
            let named: Vec<String> = declared
                .iter()
                .take(MISDECLARED_NAMES)
                .map(|m| self.member_name(m))
                .collect();
            let more = declared.len().saturating_sub(MISDECLARED_NAMES);
            lines.push(format!(
                "the member list that came with {}'s change names {}{} — not who is in the \
                 group; until the next change the relay may refuse members or take messages \
                 from others",
                self.member_name(&by),
                named.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        if lines.is_empty() {
            return Ok(None);
        }
        let target = Target::Group(hex.clone());
        let now = syncra_core::now_ms();
        for text in &lines {
            let event = StoredMessage {
                event: true,
                ..StoredMessage::received(hex_id(&new_message_id()), by, now, text.clone())
            };
            self.history.append(&target.conversation(), &event)?;
        }
        let group_name = self.book.groups.get(&hex).map(|g| g.name.clone());
        let id = hex_id(&new_message_id());
        Ok(Some(Incoming::Message {
            target,
            group_name,
            from: by,
            from_name: self.book.name_of(&by),
            text: String::new(),
            timestamp_ms: now,
            id,
            request: false,
            events: lines,
        }))
    }
}
