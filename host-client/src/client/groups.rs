//! Client-side groups: creating and changing them (creator only), joining, membership events.

use super::*;

impl Client {
    /// A group I do not have yet, from an accepted contact: only its creator may bring me in,
    /// and only to a list that has me and them. Returns the events to show, or why not.
    pub(super) fn join_group(
        &mut self,
        info: &GroupInfo,
        from: UserId,
        ts: u64,
    ) -> Result<Vec<String>, String> {
        let _lock = self
            .book
            .lock()
            .map_err(|e| format!("locking contacts: {e:#}"))?;
        let me = self.user_id();
        let who = self.book.name_of(&from);
        if info.creator != Some(from) {
            return Err(format!(
                "a message from {who} to a group I am not in was refused: only a group's creator \
                 can add members"
            ));
        }
        if !info.members.contains(&me) || !info.members.contains(&from) {
            return Err(format!(
                "a group message from {who} whose member list lacks me or them was refused"
            ));
        }
        let mut members = Vec::new();
        for m in &info.members {
            if !members.contains(m) {
                members.push(*m);
            }
        }
        let name = self
            .book
            .unique_group_name(&crate::contacts::local_group_name(&info.name));
        let others: Vec<String> = members
            .iter()
            .filter(|m| **m != from)
            .map(|m| self.member_name(m))
            .collect();
        self.book.groups.insert(
            info.id.clone(),
            Group {
                id: info.id.clone(),
                name: name.clone(),
                members,
                updated_ms: ts,
                creator: Some(from),
            },
        );
        self.book
            .save()
            .map_err(|e| format!("saving groups: {e:#}"))?;
        Ok(vec![format!(
            "{who} created @{name} with {}",
            others.join(", ")
        )])
    }

    /// A member list from the group's creator: applied if newer, and every change becomes an
    /// event ("alice added eve", "alice removed you").
    pub(super) fn apply_membership(
        &mut self,
        info: &GroupInfo,
        from: UserId,
        ts: u64,
    ) -> anyhow::Result<Vec<String>> {
        let _lock = self.book.lock()?;
        let Some(group) = self.book.groups.get(&info.id) else {
            return Ok(Vec::new());
        };
        if ts <= group.updated_ms || group.members == info.members {
            return Ok(Vec::new());
        }
        let old = group.members.clone();
        let mut new = Vec::new();
        for m in &info.members {
            if !new.contains(m) {
                new.push(*m);
            }
        }
        let who = self.book.name_of(&from);
        let added: Vec<String> = new
            .iter()
            .filter(|m| !old.contains(m))
            .map(|m| self.member_name(m))
            .collect();
        let removed: Vec<String> = old
            .iter()
            .filter(|m| !new.contains(m))
            .map(|m| self.member_name(m))
            .collect();
        let mut events = Vec::new();
        if !added.is_empty() {
            events.push(format!("{who} added {}", added.join(", ")));
        }
        if !removed.is_empty() {
            events.push(format!("{who} removed {}", removed.join(", ")));
        }
        if let Some(g) = self.book.groups.get_mut(&info.id) {
            g.members = new;
            g.updated_ms = ts;
        }
        self.book.save()?;
        Ok(events)
    }

    /// A member's name in an event: `you` for me.
    pub(super) fn member_name(&self, id: &UserId) -> String {
        if *id == self.user_id() {
            "you".into()
        } else {
            self.book.name_of(id)
        }
    }

    /// Creates a group with contacts (by handle); I am a member and its creator.
    pub fn group_create(&mut self, name: &str, members: &[String]) -> Result<Group, ClientError> {
        let _lock = self.book.lock()?;
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
        let mut ids = vec![self.user_id()];
        for m in members {
            let c = self.book.by_handle(m).ok_or_else(|| {
                ClientError::Unknown(format!("{m:?} is not a contact; add it first"))
            })?;
            if !ids.contains(&c.record.user_id) {
                ids.push(c.record.user_id);
            }
        }
        let group = Group {
            id: crate::contacts::new_group_id(),
            name: name.to_owned(),
            members: ids,
            updated_ms: syncra_core::now_ms(),
            creator: Some(self.user_id()),
        };
        self.book.groups.insert(group.id.clone(), group.clone());
        self.book.save()?;
        Ok(group)
    }

    /// Adds or removes members; only the group's creator may. The change is recorded as an
    /// event and queued as a membership message to everyone in the old and the new list (a
    /// removed member learns it and gets no wrap for any later message). Returns the group and
    /// the outbox entry to send.
    pub fn group_update(
        &mut self,
        name: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<(Group, Pending), ClientError> {
        let _lock = self.book.lock()?;
        let group = self
            .book
            .group(name)
            .ok_or_else(|| {
                ClientError::Unknown(format!("no group named {name:?}; see `syncra group list`"))
            })?
            .clone();
        let me = self.user_id();
        if let Some(creator) = group.creator
            && creator != me
        {
            return Err(ClientError::Refused(format!(
                "only the creator of @{name} ({}) can change its members",
                self.book.name_of(&creator)
            )));
        }
        let mut add_ids = Vec::new();
        for h in add {
            add_ids.push(
                self.book
                    .by_handle(h)
                    .ok_or_else(|| {
                        ClientError::Unknown(format!("{h:?} is not a contact; add it first"))
                    })?
                    .record
                    .user_id,
            );
        }
        let mut remove_ids = Vec::new();
        for h in remove {
            let id = match self.book.by_handle(h) {
                Some(c) => c.record.user_id,
                None => h.parse::<UserId>().map_err(|_| {
                    ClientError::Unknown(format!("{h:?} is not a contact or a user id"))
                })?,
            };
            remove_ids.push(id);
        }
        let old = group.members.clone();
        let mut members = old.clone();
        for id in add_ids {
            if !members.contains(&id) {
                members.push(id);
            }
        }
        members.retain(|m| *m == me || !remove_ids.contains(m));
        let added: Vec<String> = members
            .iter()
            .filter(|m| !old.contains(m))
            .map(|m| self.book.name_of(m))
            .collect();
        let removed: Vec<UserId> = old
            .iter()
            .filter(|m| !members.contains(m))
            .copied()
            .collect();
        let mut events = Vec::new();
        if !added.is_empty() {
            events.push(format!("you added {}", added.join(", ")));
        }
        if !removed.is_empty() {
            let names: Vec<String> = removed.iter().map(|m| self.book.name_of(m)).collect();
            events.push(format!("you removed {}", names.join(", ")));
        }
        if events.is_empty() {
            return Err(ClientError::Invalid(
                "nothing changed: check the member names with `syncra group list`".into(),
            ));
        }
        let now = syncra_core::now_ms();
        let g = {
            let entry = self
                .book
                .groups
                .get_mut(&group.id)
                .context("group vanished")?;
            entry.members = members;
            entry.updated_ms = now;
            if entry.creator.is_none() {
                entry.creator = Some(me);
            }
            entry.clone()
        };
        self.book.save()?;
        let target = Target::Group(g.id.clone());
        for text in events {
            self.history.append(
                &target.conversation(),
                &StoredMessage {
                    id: hex_id(&new_message_id()),
                    sender: me,
                    outgoing: true,
                    timestamp_ms: now,
                    text,
                    delivery: None,
                    reach: None,
                    held: false,
                    event: true,
                },
            )?;
        }
        let pending = Pending {
            id: hex_id(&new_message_id()),
            conversation: target.conversation(),
            text: String::new(),
            created_ms: now,
            notify: removed,
        };
        self.outbox.put(&pending)?;
        Ok((g, pending))
    }
}
