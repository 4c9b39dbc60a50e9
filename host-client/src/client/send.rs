//! Sending: checks, the outbox, sealing to every recipient's fresh prekey, the relay's answer.

use super::*;

impl Client {
    pub(super) fn blocked_reason(&self, contact: &Contact) -> Option<String> {
        contact.key_changed.as_ref().map(|new| {
            format!(
                "the identity key of {handle} CHANGED (was {old}, now {new}). This happens when \
                 {handle} reinstalled Syncra — or when someone is impersonating them. Sending is \
                 blocked until you compare safety numbers: run `syncra verify {handle}` and, if \
                 they match what {handle} sees, `syncra verify {handle} --mark-verified`",
                handle = contact.handle,
                old = contact.record.user_id.short(),
                new = new.user_id.short(),
            )
        })
    }

    /// Writes a message to the outbox and history, then tries to send it.
    pub async fn send_text(&mut self, to: &str, text: &str) -> Result<SendReport, ClientError> {
        self.book.refresh()?;
        let target = self.resolve(to)?;
        let pending = self.queue(&target, text)?;
        self.send_queued(&pending).await
    }

    /// Checks that sending is allowed, then writes the message to the outbox and to history
    /// (durably) before anything goes on the network. Returns the outbox entry.
    pub fn queue(&mut self, target: &Target, text: &str) -> Result<Pending, ClientError> {
        self.book.refresh()?;
        if let Target::Direct(id) = target
            && let Some(c) = self.book.by_id(id)
            && let Some(why) = self.blocked_reason(c)
        {
            return Err(ClientError::Refused(why));
        }
        if text.trim().is_empty() {
            return Err(ClientError::Invalid(
                "nothing to send: the message is empty".into(),
            ));
        }
        // A longer text could never leave the outbox (the relay refuses the frame), and would
        // hold up every message typed after it.
        // Control characters take six bytes each once encoded: the encoded text is bounded too.
        let encoded = serde_json::to_string(text).map_or(usize::MAX, |t| t.len());
        if text.len() > syncra_core::ui::MAX_MESSAGE_TEXT
            || encoded > 2 * syncra_core::ui::MAX_MESSAGE_TEXT
        {
            return Err(ClientError::Invalid(format!(
                "the message is {} bytes, over the {}-byte limit for one message; it was not \
                 sent (split it into several)",
                text.len(),
                syncra_core::ui::MAX_MESSAGE_TEXT
            )));
        }
        let id = hex_id(&new_message_id());
        let pending = Pending {
            id: id.clone(),
            conversation: target.conversation(),
            text: text.to_owned(),
            created_ms: syncra_core::now_ms(),
            notify: Vec::new(),
        };
        // Durable before anything else: from here on, nothing typed can be lost.
        self.outbox.put(&pending)?;
        let filed = self.history.append(
            &pending.conversation,
            &StoredMessage {
                id: id.clone(),
                sender: self.user_id(),
                outgoing: true,
                timestamp_ms: pending.created_ms,
                text: text.to_owned(),
                delivery: Some(Delivery::Sending),
                reach: None,
                held: false,
                event: false,
            },
        );
        if let Err(e) = filed {
            // Refused whole: a message that is not in history does not leave either (the
            // person gets the text back and may send it again; it must not go twice).
            if let Err(undo) = self.outbox.remove(&id) {
                tracing::error!("taking back message {id} from the outbox failed: {undo:#}");
            }
            return Err(e.into());
        }
        Ok(pending)
    }

    /// Sends a queued message (connecting first if needed).
    pub async fn send_queued(&mut self, pending: &Pending) -> Result<SendReport, ClientError> {
        let id = pending.id.clone();
        if !self.is_connected()
            && let Err(e) = self.connect().await
        {
            if e.is_transient() {
                return Ok(SendReport {
                    id,
                    state: SendState::Queued(e.to_string()),
                    outcomes: Vec::new(),
                });
            }
            return Err(ClientError::Relay(e));
        }
        Ok(self.deliver_pending(pending).await?)
    }

    /// Sends every outbox entry. Returns the reports of those that got a final answer.
    ///
    /// An entry that can never be sent (it names no conversation of ours, sealing it fails...)
    /// is moved aside to `outbox/failed/` and marked failed in history; the entries behind it
    /// still leave. Only a lost connection stops the drain.
    pub async fn drain_outbox(&mut self) -> Result<Vec<SendReport>, ClientError> {
        let mut done = Vec::new();
        for pending in self.outbox.list()? {
            let report = match self.deliver_pending(&pending).await {
                Ok(report) => report,
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::warn!(
                        "outbox entry {} cannot be sent and was moved to outbox/failed: {}",
                        pending.id,
                        syncra_core::text::escape_untrusted(&why)
                    );
                    self.outbox.set_aside_entry(&pending.id, &why)?;
                    if Target::from_conversation(&pending.conversation).is_some() {
                        let _ = self.history.set_delivery(
                            &pending.conversation,
                            &pending.id,
                            Delivery::Failed,
                        );
                    }
                    done.push(SendReport {
                        id: pending.id.clone(),
                        state: SendState::Failed(why),
                        outcomes: Vec::new(),
                    });
                    continue;
                }
            };
            if matches!(report.state, SendState::Queued(_)) {
                break;
            }
            done.push(report);
        }
        Ok(done)
    }

    /// Entries moved aside because they could not be sent (`outbox/failed/`).
    pub fn outbox_failed_len(&self) -> usize {
        std::fs::read_dir(self.outbox.failed_dir())
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Entries waiting in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.list().map(|l| l.len()).unwrap_or(0)
    }

    pub(super) async fn deliver_pending(
        &mut self,
        pending: &Pending,
    ) -> anyhow::Result<SendReport> {
        self.book.refresh()?;
        let target = Target::from_conversation(&pending.conversation)
            .context("outbox entry names an unknown conversation")?;
        let queued = |e: String| SendReport {
            id: pending.id.clone(),
            state: SendState::Queued(e),
            outcomes: Vec::new(),
        };
        if !self.is_connected() {
            return Ok(queued("not connected".into()));
        }
        // Key changes are detected by handle before sending to a contact.
        if let Target::Direct(id) = &target
            && let Some(contact) = self.book.by_id(id).cloned()
            && let Some(session) = self.session()
        {
            match session.lookup_handle(&contact.handle).await {
                Ok(record) if record.user_id != contact.record.user_id => {
                    let _lock = self.book.lock()?;
                    self.book.pin(record, false, syncra_core::now_ms());
                    self.book.save()?;
                }
                Ok(_) => {}
                Err(e) if e.is_transient() => return Ok(queued(e.to_string())),
                Err(_) => {}
            }
        }
        let session = match self.session() {
            Some(s) => s,
            None => return Ok(queued("not connected".into())),
        };
        let (conversation, group) = match self.conversation_for(&target, &session).await {
            Ok(found) => found,
            Err(e) if e.offline => {
                return self.finish(pending, SendState::Offline, Vec::new());
            }
            Err(e) => {
                if !self.is_connected() || e.is_transient() {
                    return Ok(queued(e.to_string()));
                }
                // Blocked or gone: a final answer; the entry leaves the outbox as failed.
                return self.finish(pending, SendState::Failed(e.to_string()), Vec::new());
            }
        };
        let content = Content {
            v: crate::message::CONTENT_VERSION,
            id: pending.id.clone(),
            ts: pending.created_ms,
            text: pending.text.clone(),
            group,
        };
        match self
            .send_in(&session, conversation, &content.encode())
            .await
        {
            Ok(outcomes) => {
                let state = overall(&outcomes);
                // Refused for a reason that may pass (the relay's mailbox or broker was down, the
                // sender too fast) and for no final one: kept and sent again. Recipients it
                // reached meanwhile show the repeat once (by message id).
                if let SendState::Failed(why) = &state
                    && !outcomes.iter().any(|o| is_final_rejection(&o.outcome))
                {
                    return Ok(queued(why.clone()));
                }
                self.finish(pending, state, outcomes)
            }
            Err(e) if e.is_transient() => Ok(queued(e.to_string())),
            Err(e) => self.finish(pending, SendState::Failed(e.to_string()), Vec::new()),
        }
    }

    pub(super) fn finish(
        &mut self,
        pending: &Pending,
        state: SendState,
        outcomes: Vec<RecipientOutcome>,
    ) -> anyhow::Result<SendReport> {
        let reach = Some(outcome_summary(&outcomes)).filter(|s| !s.is_empty());
        self.history.set_delivery_with_reach(
            &pending.conversation,
            &pending.id,
            state.delivery(),
            reach,
        )?;
        self.outbox.remove(&pending.id)?;
        Ok(SendReport {
            id: pending.id.clone(),
            state,
            outcomes,
        })
    }
}
