//! Receiving: opening a delivery, then filing it (pinning a new sender, group rules, history).

use super::*;

impl Client {
    /// Deliveries refused or skipped since this process started (bad, replayed messages
    /// aside).
    pub fn rejected_count(&self) -> u64 {
        self.rejected
    }

    /// Opens a delivery, files it in history and says what to show. The sender, if not a
    /// contact yet, is looked up on the relay first (one round trip): a long-running session
    /// uses [`Serve`] instead, which runs those lookups beside other deliveries.
    ///
    /// Nothing in a delivery is trusted: a message that does not open or breaks a rule (an
    /// invalid group id, a post from a non-member) comes back as [`Incoming::Rejected`], is
    /// counted and changes nothing. An `Err` is a local failure (the disk), never a peer's doing.
    pub async fn receive(&mut self, envelope: &[u8]) -> anyhow::Result<Option<Incoming>> {
        let opened = match self.open_delivery(envelope)? {
            Opening::Done(incoming) => return Ok(incoming),
            Opening::Opened(opened) => opened,
        };
        let record = match self.lookup_needed(&opened) {
            Some(session) => session.lookup_id(opened.sender()).await.ok(),
            None => None,
        };
        self.file_delivery(opened, record)
    }

    /// The first half of [`receive`](Self::receive): opens the envelope (checking signature,
    /// pinned key and replay window). Nothing is written yet.
    pub fn open_delivery(&mut self, envelope: &[u8]) -> anyhow::Result<Opening> {
        // Another process on this home may have changed contacts or groups since.
        self.book.refresh()?;
        let mut result = self.open_envelope(envelope);
        if matches!(result, Err(OpenError::UnknownPrekey)) {
            // Another process on this home may have rotated the prekey this was sealed to:
            // read the key file again (no passphrase needed) and try once more.
            match self.keys.reload(&self.home.key_file()) {
                Ok(()) => result = self.open_envelope(envelope),
                Err(e) => tracing::warn!("reading the key file again: {e:#}"),
            }
        }
        match result {
            Ok(m) => Ok(Opening::Opened(Opened(Box::new(m)))),
            // A repeat of something already shown (a retried send): shown once.
            Err(OpenError::Replayed) => Ok(Opening::Done(None)),
            Err(e) => Ok(Opening::Done(Some(
                self.rejected(format!("a delivery did not open: {e}")),
            ))),
        }
    }

    /// The session to look the sender of `opened` up on, if they are not a contact yet and I
    /// am connected. Their id is self-certifying; the lookup only learns their handle.
    pub fn lookup_needed(&self, opened: &Opened) -> Option<Arc<Session>> {
        if self.book.by_id(&opened.sender()).is_some() {
            return None;
        }
        self.session()
    }

    /// The second half of [`receive`](Self::receive): files an opened delivery in history,
    /// with the sender's directory record if it was looked up, and says what to show.
    pub fn file_delivery(
        &mut self,
        opened: Opened,
        looked_up: Option<IdentityRecord>,
    ) -> anyhow::Result<Option<Incoming>> {
        let opened = *opened.0;
        let (sender, message_id) = (opened.sender, opened.message_id);
        let incoming = self.file_opened(opened, looked_up)?;
        // Remembered at rest once filed, so a replay after a restart is refused. (Filed first:
        // a crash in between shows the message once more, by id once, rather than losing it.)
        self.replay_log
            .record(sender, &message_id, syncra_core::now_ms())?;
        Ok(incoming)
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

    /// Opens a sealed envelope with my prekeys and pinned keys (in its own function: the opener
    /// borrows non-Send state that must not live across an await).
    pub(super) fn open_envelope(
        &mut self,
        envelope: &[u8],
    ) -> Result<syncra_core::crypto::envelope::OpenedMessage, OpenError> {
        let book = &self.book;
        let pinned = |id: &UserId| book.pinned_key(id);
        let opener = Opener {
            me: self.keys.user_id(),
            prekeys: &self.keys.ring,
            pinned: &pinned,
        };
        opener.open(envelope, &mut self.guard, syncra_core::now_ms())
    }

    pub(super) fn file_opened(
        &mut self,
        opened: syncra_core::crypto::envelope::OpenedMessage,
        looked_up: Option<IdentityRecord>,
    ) -> anyhow::Result<Option<Incoming>> {
        let content = Content::decode(&opened.body);
        let id = hex_id(&opened.message_id);
        let from = opened.sender;
        if let Some(info) = &content.group
            && !crate::contacts::valid_group_id(&info.id)
        {
            let reason = format!(
                "a group message from {} with an invalid group id was refused",
                self.book.name_of(&from)
            );
            return Ok(Some(self.rejected(reason)));
        }

        // Who is it? An unknown sender's looked-up record is pinned if it is the key that
        // signed (their id is self-certifying, so a lookup cannot name anyone else).
        if self.book.by_id(&from).is_none()
            && let Some(record) = looked_up
            && record.user_id == from
            && record.identity_key == opened.sender_key
        {
            let _lock = self.book.lock()?;
            let outcome = self.book.pin(record, true, syncra_core::now_ms());
            self.book.save()?;
            if let PinOutcome::KeyChanged(old) = outcome {
                let conv = Target::Direct(from).conversation();
                let held = StoredMessage {
                    held: true,
                    ..StoredMessage::received(id, from, opened.timestamp_ms, content.text)
                };
                self.history.append(&conv, &held)?;
                return Ok(Some(Incoming::Held {
                    handle: old.handle,
                    from,
                }));
            }
        }
        let accepted = self.book.is_accepted(&from);

        // A group message from someone I did not accept is a message request like any other
        // first message: it creates no group and names no members.
        let mut events = Vec::new();
        let target = match &content.group {
            Some(info) if self.book.groups.contains_key(&info.id) => {
                let group = &self.book.groups[&info.id];
                if !group.members.contains(&from) {
                    let reason = format!(
                        "a message from {} to @{}, of which they are not a member, was refused",
                        self.book.name_of(&from),
                        group.name
                    );
                    return Ok(Some(self.rejected(reason)));
                }
                if group.creator == Some(from) {
                    events = self.apply_membership(info, from, opened.timestamp_ms)?;
                }
                Target::Group(info.id.clone())
            }
            Some(info) if accepted => match self.join_group(info, from, opened.timestamp_ms) {
                Ok(joined) => {
                    events = joined;
                    Target::Group(info.id.clone())
                }
                Err(reason) => return Ok(Some(self.rejected(reason))),
            },
            _ => Target::Direct(from),
        };
        let request = matches!(target, Target::Direct(_)) && !accepted;
        let conversation = target.conversation();
        for text in &events {
            let event = StoredMessage {
                event: true,
                ..StoredMessage::received(
                    hex_id(&new_message_id()),
                    from,
                    opened.timestamp_ms,
                    text.clone(),
                )
            };
            self.history.append(&conversation, &event)?;
        }
        let text = match (&content.group, request) {
            (Some(_), true) if content.text.is_empty() => "(invited you to a group)".to_owned(),
            _ => content.text,
        };
        if !text.is_empty() {
            let line = StoredMessage::received(id.clone(), from, opened.timestamp_ms, text.clone());
            self.history.append(&conversation, &line)?;
        }
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
            timestamp_ms: opened.timestamp_ms,
            id,
            request,
            events,
        }))
    }
}
