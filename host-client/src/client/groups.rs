//! Groups on MLS: created, grown, shrunk and left through commits the relay orders (one per
//! epoch). Any member may add or remove; every member sees the same roster, and every change
//! as an event in the group's history.

use super::*;
use crate::mls::{ConversationId, ServiceError};

impl Client {
    /// A member's name in an event: `you` for me.
    pub(super) fn member_name(&self, id: &UserId) -> String {
        if *id == self.user_id() {
            "you".into()
        } else {
            self.book.name_of(id)
        }
    }

    /// My group called `name` (read afresh) and its MLS conversation.
    fn mls_group(&mut self, name: &str) -> Result<(Group, ConversationId), ClientError> {
        self.book.refresh()?;
        let group = self
            .book
            .group(name)
            .ok_or_else(|| {
                ClientError::Unknown(format!("no group named {name:?}; see `syncra group list`"))
            })?
            .clone();
        let conversation = ConversationId::from_hex(&group.id)
            .ok_or_else(|| ClientError::Invalid(format!("@{name} is not an MLS group")))?;
        Ok((group, conversation))
    }

    /// The user ids of contacts, by handle (refusing a contact whose key changed).
    fn contact_ids(&self, handles: &[String]) -> Result<Vec<UserId>, ClientError> {
        let mut ids: Vec<UserId> = Vec::new();
        for h in handles {
            let c = self.book.by_handle(h).ok_or_else(|| {
                ClientError::Unknown(format!("{h:?} is not a contact; add it first"))
            })?;
            if let Some(why) = self.blocked_reason(c) {
                return Err(ClientError::Refused(why));
            }
            if c.record.user_id != self.user_id() && !ids.contains(&c.record.user_id) {
                ids.push(c.record.user_id);
            }
        }
        Ok(ids)
    }

    /// Events I made, in the group's history.
    pub(super) fn note_events(&self, hex: &str, events: &[String]) -> anyhow::Result<()> {
        let now = syncra_core::now_ms();
        for text in events {
            self.history.append(
                &Target::Group(hex.to_owned()).conversation(),
                &StoredMessage {
                    id: hex_id(&new_message_id()),
                    sender: self.user_id(),
                    outgoing: true,
                    timestamp_ms: now,
                    text: text.clone(),
                    delivery: None,
                    reach: None,
                    held: false,
                    event: true,
                },
            )?;
        }
        Ok(())
    }

    /// [`Client::note_events`] for what a follow-up did on its own (a departure committed, a
    /// member let back in, a lost change made again): also queued for a long-running session
    /// to show as it happens ([`Client::take_follow_up_events`]).
    pub(super) fn note_live(&mut self, hex: &str, events: Vec<String>) -> anyhow::Result<()> {
        self.note_events(hex, &events)?;
        let me = self.user_id();
        self.shown_later.push(Incoming::Message {
            target: Target::Group(hex.to_owned()),
            group_name: self.book.groups.get(hex).map(|g| g.name.clone()),
            from: me,
            from_name: self.name_of(&me),
            text: String::new(),
            timestamp_ms: syncra_core::now_ms(),
            id: hex_id(&new_message_id()),
            request: false,
            events,
        });
        Ok(())
    }

    /// What follow-ups noted since the last call, to show as it happens (events in a group's
    /// history; [`Serve`] passes them on as [`ServeEvent::Incoming`]).
    pub fn take_follow_up_events(&mut self) -> Vec<Incoming> {
        std::mem::take(&mut self.shown_later)
    }

    /// Sends the group's name to its members (an empty group message): how members added by
    /// a commit learn what to call it. Through the outbox, so it is not lost offline.
    async fn announce_name(&mut self, hex: &str) -> Result<(), ClientError> {
        let pending = Pending {
            id: hex_id(&new_message_id()),
            conversation: Target::Group(hex.to_owned()).conversation(),
            text: String::new(),
            created_ms: syncra_core::now_ms(),
            notify: Vec::new(),
        };
        self.outbox.put(&pending)?;
        self.send_queued(&pending).await?;
        Ok(())
    }

    fn problem(e: ServiceError) -> ClientError {
        match e {
            ServiceError::Net(net) => ClientError::Relay(net),
            ServiceError::State(_) => ClientError::Local(e.into()),
            other => ClientError::Refused(other.to_string()),
        }
    }

    /// Creates a group with contacts (by handle): an MLS group whose first commit adds them
    /// all, a Welcome for them, then its name. Needs the relay (their KeyPackages are claimed
    /// from it).
    pub async fn group_create(
        &mut self,
        name: &str,
        members: &[String],
    ) -> Result<Group, ClientError> {
        self.book.refresh()?;
        if !crate::contacts::valid_group_name(name) {
            return Err(ClientError::Invalid(
                "a group name is one word of at most 32 letters, digits, - or _ (without the @)"
                    .into(),
            ));
        }
        if self.book.group(name).is_some() {
            return Err(ClientError::Invalid(format!(
                "a group named {name:?} exists already"
            )));
        }
        let ids = self.contact_ids(members)?;
        if ids.is_empty() {
            return Err(ClientError::Invalid(
                "a group needs at least one other member".into(),
            ));
        }
        let session = self.require_session()?;
        let id = {
            let _lock = self
                .mls
                .lock(&self.keys.identity)
                .await
                .map_err(|e| ClientError::Local(e.into()))?;
            self.mls
                .create_as(&session, &ids, true)
                .await
                .map_err(Self::problem)?
        };
        let roster = self
            .mls
            .get(id)
            .map(|c| c.roster())
            .transpose()
            .map_err(|e| ClientError::Local(e.into()))?
            .unwrap_or_default();
        let group = Group {
            id: id.to_hex(),
            name: name.to_owned(),
            members: roster,
            updated_ms: syncra_core::now_ms(),
            creator: Some(self.user_id()),
        };
        {
            let _lock = self.book.lock()?;
            self.book.groups.insert(group.id.clone(), group.clone());
            self.book.save()?;
        }
        let names: Vec<String> = ids.iter().map(|m| self.book.name_of(m)).collect();
        self.note_events(
            &group.id,
            &[format!("you created @{name} with {}", names.join(", "))],
        )?;
        self.announce_name(&group.id).await?;
        Ok(group)
    }

    /// Adds or removes members (any member may): one commit each way, accepted by the relay
    /// only on the group's current epoch. If another member's commit won that epoch, this one
    /// catches up and makes it again. Returns the group with its roster now.
    pub async fn group_update(
        &mut self,
        name: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<Group, ClientError> {
        let (group, conversation) = self.mls_group(name)?;
        let add_ids = self.contact_ids(add)?;
        let mut remove_ids = Vec::new();
        for h in remove {
            let id = match self.book.by_handle(h) {
                Some(c) => c.record.user_id,
                None => h.parse::<UserId>().map_err(|_| {
                    ClientError::Unknown(format!("{h:?} is not a contact or a user id"))
                })?,
            };
            if id == self.user_id() {
                return Err(ClientError::Invalid(format!(
                    "to leave @{name}, use `syncra group leave {name}`"
                )));
            }
            remove_ids.push(id);
        }
        let session = self.require_session()?;
        let mut events = Vec::new();
        let mut deferred: Option<&str> = None;
        for (adding, ids) in [(true, add_ids), (false, remove_ids)] {
            let ids: Vec<UserId> = {
                let current = self.mls.get(conversation).ok_or_else(|| {
                    ClientError::Refused(format!("you are no longer a member of @{name}"))
                })?;
                ids.into_iter()
                    .filter(|m| current.contains(*m) != adding)
                    .collect()
            };
            if ids.is_empty() {
                continue;
            }
            let names: Vec<String> = ids.iter().map(|m| self.book.name_of(m)).collect();
            let names = names.join(", ");
            if let Some(deferred) = deferred {
                // One change waits for its turn already: this one is not tried.
                events.push(format!(
                    "{} {names} was not tried: {deferred} waits for its turn; try again once it \
                     is made",
                    if adding { "adding" } else { "removing" }
                ));
                continue;
            }
            let verb = if adding { "added" } else { "removed" };
            let doing = if adding { "adding" } else { "removing" };
            match self
                .commit_change(&session, conversation, adding, &ids)
                .await?
            {
                Change::Made => events.push(format!("you {verb} {names}")),
                Change::Again => {
                    events.push(format!(
                        "another member changed @{name} at the same moment; {doing} {names} is \
                         made again once their change arrives"
                    ));
                    deferred = Some(doing);
                }
                Change::Unanswered(why) => {
                    events.push(format!(
                        "{doing} {names} has no answer from the relay yet ({why}); it is sent \
                         again by itself"
                    ));
                    deferred = Some(doing);
                }
            }
        }
        if events.is_empty() {
            return Err(ClientError::Invalid(
                "nothing changed: check the member names with `syncra group list`".into(),
            ));
        }
        self.sync_roster_of(conversation)?;
        self.note_events(&group.id, &events)?;
        if !add.is_empty() {
            self.announce_name(&group.id).await?;
        }
        Ok(self.book.groups.get(&group.id).cloned().unwrap_or(group))
    }

    /// One add or remove commit (what came of it: [`Change`]); after losing the epoch to
    /// another member's commit, catches up (a one-shot command processes its deliveries) and
    /// makes it again, twice at most.
    async fn commit_change(
        &mut self,
        session: &Session,
        conversation: ConversationId,
        adding: bool,
        ids: &[UserId],
    ) -> Result<Change, ClientError> {
        let first = {
            let _lock = self
                .mls
                .lock(&self.keys.identity)
                .await
                .map_err(|e| ClientError::Local(e.into()))?;
            if adding {
                self.mls.add(session, conversation, ids).await
            } else {
                self.mls.remove(session, conversation, ids).await
            }
        };
        let mut result = first.map(drop);
        for _ in 0..2 {
            match result {
                Err(ServiceError::Conflict { epoch, .. }) if self.pushes_rx.is_some() => {
                    self.catch_up_past(conversation, epoch, conversations::CATCH_UP_WAIT)
                        .await?;
                    let _lock = self
                        .mls
                        .lock(&self.keys.identity)
                        .await
                        .map_err(|e| ClientError::Local(e.into()))?;
                    result = self.mls.rebase(session, conversation).await.map(drop);
                }
                _ => break,
            }
        }
        if matches!(result, Err(ServiceError::Conflict { .. })) && self.pushes_rx.is_none() {
            // A long-running session (the TUI, `listen`, a bot) owns its deliveries: the
            // winning commit arrives through its loop, and `follow_up` makes this one again then.
            return Ok(Change::Again);
        }
        if let Err(ServiceError::Unanswered { error, .. }) = &result {
            // Pending, and sent again by the follow-ups (`Conversations::resend`).
            return Ok(Change::Unanswered(error.to_string()));
        }
        result.map(|()| Change::Made).map_err(|e| match e {
            ServiceError::Net(NetError::Refused {
                code: ErrorCode::NotFound,
                ..
            }) => ClientError::Unknown(
                "a member to add has no MLS KeyPackage in the directory (an older Syncra?)".into(),
            ),
            other => Self::problem(other),
        })
    }

    /// Asks to leave a group: a proposal that another member commits (MLS does not let a
    /// member commit its own removal). I am out once that commit arrives.
    pub async fn group_leave(&mut self, name: &str) -> Result<Group, ClientError> {
        let (group, conversation) = self.mls_group(name)?;
        let session = self.require_session()?;
        {
            let _lock = self
                .mls
                .lock(&self.keys.identity)
                .await
                .map_err(|e| ClientError::Local(e.into()))?;
            self.mls
                .leave(&session, conversation)
                .await
                .map_err(Self::problem)?;
        }
        self.note_events(&group.id, &["you asked to leave".to_owned()])?;
        Ok(group)
    }
}

/// What came of one roster change.
enum Change {
    /// Made: the relay accepted it.
    Made,
    /// Another member's change won the epoch: made again once theirs arrives.
    Again,
    /// No verdict yet (why): pending, and sent again by itself.
    Unanswered(String),
}
