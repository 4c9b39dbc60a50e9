//! The MLS carriage: how an MLS message travels through the relay (envelope version 2).
//!
//! Why it exists: an MLS message is already encrypted and authenticated end to end (RFC 9420
//! `PrivateMessage`, or a `Welcome` encrypted to the joiner's KeyPackage), so wrapping it in the
//! sealed envelope of version 1 would add one signature and one HPKE wrap per recipient for
//! nothing — exactly the cost MLS removes. The carriage adds only what the relay needs to route
//! and order it, in the clear:
//!
//! - the recipients (user ids; the relay learns them for the sealed envelope too),
//! - the group id, the epoch and the kind (application, commit, welcome, proposal, rejoin
//!   request) — the same
//!   facts an MLS `PrivateMessage` shows in its own plaintext header,
//! - for a commit, the members after it, so the relay can refuse handshakes and messages from
//!   users who are not in the group (it sees the same ids as recipients of every message).
//!
//! The sender is not in the carriage: the relay knows the session that sent it, and members
//! learn the sender from the authenticated MLS message, never from anything the relay says.
//! A client checks that the kind and epoch declared here match the MLS message inside, so a
//! member cannot slip a commit past the relay's one-commit-per-epoch rule by calling it
//! something else.
//!
//! Layout (integers big-endian), see docs/PROTOCOL.md §9:
//!
//! ```text
//! 0x02 | message id [16] | kind u8 | group id [16] | epoch u64
//!      | recipient count u16 | recipients [20 × n]
//!      | member count u16    | members    [20 × m]   (commits only; 0 otherwise)
//!      | body length u32     | body
//! ```

use crate::crypto::envelope::{EnvelopeHeader, MAX_RECIPIENTS, MESSAGE_ID_LEN, MessageId};
use crate::error::OpenError;
use crate::id::{USER_ID_LEN, UserId};

/// The envelope version byte of a carriage (version 1 is the sealed envelope).
pub const CARRIAGE_VERSION: u8 = 2;
/// Bytes in an MLS group id, as Syncra clients make them (random).
pub const GROUP_ID_LEN: usize = 16;
/// The largest MLS message a carriage holds: a Welcome for a large group carries the ratchet
/// tree, so this is the sealed envelope's body limit plus room for the tree of 512 members.
pub const MAX_CARRIAGE_BODY: usize = 512 * 1024;
/// The most members a commit may declare (the relay's recipient limit: every member receives
/// every message).
pub const MAX_MEMBERS: usize = MAX_RECIPIENTS + 1;

const FIXED: usize = 1 + MESSAGE_ID_LEN + 1 + GROUP_ID_LEN + 8;

/// An MLS group id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub [u8; GROUP_ID_LEN]);

impl GroupId {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8; GROUP_ID_LEN] {
        &self.0
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupId({self})")
    }
}

/// What an MLS message in a carriage is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CarriageKind {
    /// An application message (a chat line), in the group's current epoch.
    Application,
    /// A commit: moves the group from `epoch` to `epoch + 1`. The relay accepts one per epoch.
    Commit,
    /// A Welcome for members a commit added; `epoch` is the epoch they join in.
    Welcome,
    /// A proposal (e.g. a member asking to leave), committed later by another member.
    Proposal,
    /// A member whose copy of the group fell behind for good (it missed a commit) asks the
    /// others to let it back in: not an MLS message but a signed request carrying a fresh
    /// KeyPackage of its own. `epoch` is the epoch its copy is stuck in, at most the group's.
    Rejoin,
}

impl CarriageKind {
    /// The byte on the wire.
    pub fn as_u8(self) -> u8 {
        match self {
            CarriageKind::Application => 1,
            CarriageKind::Commit => 2,
            CarriageKind::Welcome => 3,
            CarriageKind::Proposal => 4,
            CarriageKind::Rejoin => 5,
        }
    }

    /// The kind for a byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => CarriageKind::Application,
            2 => CarriageKind::Commit,
            3 => CarriageKind::Welcome,
            4 => CarriageKind::Proposal,
            5 => CarriageKind::Rejoin,
            _ => return None,
        })
    }

    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            CarriageKind::Application => "application",
            CarriageKind::Commit => "commit",
            CarriageKind::Welcome => "welcome",
            CarriageKind::Proposal => "proposal",
            CarriageKind::Rejoin => "rejoin request",
        }
    }
}

/// Everything in a carriage but the MLS message: what the relay reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CarriageHeader {
    /// A random id: the send result names it, and a client drops a second copy by it.
    pub message_id: MessageId,
    /// What the MLS message is.
    pub kind: CarriageKind,
    /// The group.
    pub group_id: GroupId,
    /// The epoch the message was made in (for a Welcome: the epoch the joiners enter).
    pub epoch: u64,
    /// Who gets it. A commit may have none (the first commit of a group whose only member is
    /// its creator still has to claim its epoch); every other kind has at least one.
    pub recipients: Vec<UserId>,
    /// For a commit, the members after it (its sender among them); empty for other kinds.
    pub members: Vec<UserId>,
}

/// A parsed carriage, borrowing its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carriage<'a> {
    /// The routing facts.
    pub header: CarriageHeader,
    /// The MLS message, untouched.
    pub body: &'a [u8],
}

impl CarriageHeader {
    /// Encodes the header followed by `body`.
    pub fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            FIXED + 8 + (self.recipients.len() + self.members.len()) * USER_ID_LEN + body.len(),
        );
        out.push(CARRIAGE_VERSION);
        out.extend_from_slice(&self.message_id);
        out.push(self.kind.as_u8());
        out.extend_from_slice(self.group_id.as_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        for list in [&self.recipients, &self.members] {
            out.extend_from_slice(&(list.len().min(u16::MAX as usize) as u16).to_be_bytes());
            for id in list.iter() {
                out.extend_from_slice(id.as_bytes());
            }
        }
        out.extend_from_slice(&(body.len().min(u32::MAX as usize) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }
}

/// Parses a carriage, checking every rule of its shape: the version, a known kind, recipient
/// and member counts within limits and without duplicates, members on commits only (with the
/// sender's place among them left to the relay, which knows the sender), a non-empty body
/// within [`MAX_CARRIAGE_BODY`], and nothing after it.
pub fn parse(bytes: &[u8]) -> Result<Carriage<'_>, OpenError> {
    let mut r = Cursor { bytes, at: 0 };
    let [version] = r.array("empty carriage")?;
    if version != CARRIAGE_VERSION {
        return Err(OpenError::UnsupportedVersion(version));
    }
    let message_id: MessageId = r.array("truncated message id")?;
    let [kind] = r.array("truncated kind")?;
    let kind = CarriageKind::from_u8(kind).ok_or(OpenError::Malformed("unknown carriage kind"))?;
    let group_id = GroupId(r.array("truncated group id")?);
    let epoch = u64::from_be_bytes(r.array("truncated epoch")?);
    let recipients = r.ids(MAX_RECIPIENTS, "duplicate recipient")?;
    let members = r.ids(MAX_MEMBERS, "duplicate member")?;
    let body_len = u32::from_be_bytes(r.array("truncated body length")?) as usize;
    if body_len == 0 {
        return Err(OpenError::Malformed("empty MLS message"));
    }
    if body_len > MAX_CARRIAGE_BODY {
        return Err(OpenError::Malformed("MLS message larger than allowed"));
    }
    let body = r.take(body_len, "truncated MLS message")?;
    if r.at != bytes.len() {
        return Err(OpenError::Malformed("trailing bytes after the MLS message"));
    }
    match kind {
        CarriageKind::Commit if members.is_empty() => {
            return Err(OpenError::Malformed("a commit names no members"));
        }
        CarriageKind::Commit => {}
        _ if !members.is_empty() => {
            return Err(OpenError::Malformed("only a commit names members"));
        }
        _ if recipients.is_empty() => return Err(OpenError::Malformed("no recipients")),
        _ => {}
    }
    Ok(Carriage {
        header: CarriageHeader {
            message_id,
            kind,
            group_id,
            epoch,
            recipients,
            members,
        },
        body,
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], OpenError> {
        let end = self.at.checked_add(n).ok_or(OpenError::Malformed(what))?;
        let s = self
            .bytes
            .get(self.at..end)
            .ok_or(OpenError::Malformed(what))?;
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], OpenError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// A u16 count, then that many distinct user ids (the count checked before any allocation);
    /// a repeated id is refused as `duplicate`.
    fn ids(&mut self, max: usize, duplicate: &'static str) -> Result<Vec<UserId>, OpenError> {
        let count = u16::from_be_bytes(self.array("truncated count")?) as usize;
        if count > max {
            return Err(OpenError::TooManyRecipients(count));
        }
        let list = self.take(count * USER_ID_LEN, "truncated id list")?;
        let mut ids: Vec<UserId> = Vec::with_capacity(count);
        for chunk in list.chunks_exact(USER_ID_LEN) {
            let mut id = [0u8; USER_ID_LEN];
            id.copy_from_slice(chunk);
            let id = UserId::from_bytes(id);
            if ids.contains(&id) {
                return Err(OpenError::Malformed(duplicate));
            }
            ids.push(id);
        }
        Ok(ids)
    }
}

/// What the relay reads of anything a client sends: a sealed envelope's header (version 1) or
/// a carriage's (version 2). The first byte says which.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routed {
    /// A sealed envelope.
    Sealed(EnvelopeHeader),
    /// An MLS carriage.
    Mls(CarriageHeader),
}

impl Routed {
    /// Parses either format's routing header.
    pub fn parse(bytes: &[u8]) -> Result<Self, OpenError> {
        match bytes.first() {
            Some(&CARRIAGE_VERSION) => parse(bytes).map(|c| Routed::Mls(c.header)),
            _ => crate::crypto::envelope::parse_header(bytes).map(Routed::Sealed),
        }
    }

    /// The message id.
    pub fn message_id(&self) -> MessageId {
        match self {
            Routed::Sealed(h) => h.message_id,
            Routed::Mls(h) => h.message_id,
        }
    }

    /// The recipients, in order, without collecting them (the relay routes every message
    /// through this).
    pub fn recipient_ids(&self) -> impl Iterator<Item = UserId> + '_ {
        let (sealed, mls) = match self {
            Routed::Sealed(h) => (Some(h.recipients.iter().map(|r| r.user_id)), None),
            Routed::Mls(h) => (None, Some(h.recipients.iter().copied())),
        };
        sealed
            .into_iter()
            .flatten()
            .chain(mls.into_iter().flatten())
    }

    /// The recipients, in order.
    pub fn recipients(&self) -> Vec<UserId> {
        self.recipient_ids().collect()
    }

    /// How many recipients.
    pub fn recipient_count(&self) -> usize {
        match self {
            Routed::Sealed(h) => h.recipients.len(),
            Routed::Mls(h) => h.recipients.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> UserId {
        UserId::from_bytes([n; USER_ID_LEN])
    }

    fn header(kind: CarriageKind) -> CarriageHeader {
        CarriageHeader {
            message_id: [7; MESSAGE_ID_LEN],
            kind,
            group_id: GroupId([9; GROUP_ID_LEN]),
            epoch: 41,
            recipients: vec![id(1), id(2)],
            members: if kind == CarriageKind::Commit {
                vec![id(1), id(2), id(3)]
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn every_kind_round_trips() {
        for kind in [
            CarriageKind::Application,
            CarriageKind::Commit,
            CarriageKind::Welcome,
            CarriageKind::Proposal,
            CarriageKind::Rejoin,
        ] {
            let h = header(kind);
            let bytes = h.encode(b"mls bytes");
            let parsed = parse(&bytes).unwrap();
            assert_eq!(parsed.header, h);
            assert_eq!(parsed.body, b"mls bytes");
            assert_eq!(Routed::parse(&bytes).unwrap(), Routed::Mls(h));
        }
    }

    #[test]
    fn recipient_ids_are_the_recipients_in_order_for_both_formats() {
        use crate::crypto::envelope::{Recipient, seal};
        use crate::crypto::keys::{IdentityKeyPair, PrekeySecret};

        let mls = Routed::Mls(header(CarriageKind::Application));
        assert_eq!(mls.recipient_ids().collect::<Vec<_>>(), vec![id(1), id(2)]);
        assert_eq!(mls.recipients(), vec![id(1), id(2)]);
        let sender = IdentityKeyPair::generate();
        let keys: Vec<_> = (0..3).map(|_| IdentityKeyPair::generate()).collect();
        let recipients: Vec<_> = keys
            .iter()
            .map(|k| Recipient {
                user_id: k.user_id(),
                prekey: *PrekeySecret::generate(k, 1).public(),
            })
            .collect();
        let sealed = seal(&sender, &recipients, b"hi", 1).unwrap().bytes;
        let routed = Routed::parse(&sealed).unwrap();
        let want: Vec<_> = keys.iter().map(|k| k.user_id()).collect();
        assert_eq!(routed.recipient_ids().collect::<Vec<_>>(), want);
        assert_eq!(routed.recipients(), want);
    }

    #[test]
    fn a_commit_may_have_no_recipients_but_must_name_members() {
        let mut h = header(CarriageKind::Commit);
        h.recipients.clear();
        assert!(parse(&h.encode(b"c")).is_ok());
        h.members.clear();
        assert_eq!(
            parse(&h.encode(b"c")).unwrap_err(),
            OpenError::Malformed("a commit names no members")
        );
    }

    #[test]
    fn shape_errors_are_refused_by_name() {
        let mut app = header(CarriageKind::Application);
        app.members = vec![id(1)];
        assert_eq!(
            parse(&app.encode(b"x")).unwrap_err(),
            OpenError::Malformed("only a commit names members")
        );
        let mut app = header(CarriageKind::Application);
        app.recipients.clear();
        assert_eq!(
            parse(&app.encode(b"x")).unwrap_err(),
            OpenError::Malformed("no recipients")
        );
        let mut dup = header(CarriageKind::Welcome);
        dup.recipients = vec![id(1), id(1)];
        assert_eq!(
            parse(&dup.encode(b"x")).unwrap_err(),
            OpenError::Malformed("duplicate recipient")
        );
        let ok = header(CarriageKind::Application);
        assert_eq!(
            parse(&ok.encode(b"")).unwrap_err(),
            OpenError::Malformed("empty MLS message")
        );
        let mut bytes = ok.encode(b"x");
        bytes.push(0);
        assert_eq!(
            parse(&bytes).unwrap_err(),
            OpenError::Malformed("trailing bytes after the MLS message")
        );
        let mut bytes = ok.encode(b"x");
        bytes[1 + MESSAGE_ID_LEN] = 9;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            OpenError::Malformed("unknown carriage kind")
        );
    }

    #[test]
    fn counts_are_checked_before_allocation_and_every_prefix_is_refused() {
        let ok = header(CarriageKind::Commit).encode(b"body");
        for end in 0..ok.len() {
            assert!(parse(&ok[..end]).is_err(), "prefix of {end} bytes parsed");
        }
        // A recipient count of 65 535 with nothing behind it.
        let mut huge = ok[..FIXED].to_vec();
        huge.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            parse(&huge),
            Err(OpenError::TooManyRecipients(65_535))
        ));
        // A body length beyond the limit.
        let mut big = header(CarriageKind::Application).encode(b"x");
        let at = big.len() - 5;
        big[at..at + 4].copy_from_slice(&((MAX_CARRIAGE_BODY + 1) as u32).to_be_bytes());
        assert_eq!(
            parse(&big).unwrap_err(),
            OpenError::Malformed("MLS message larger than allowed")
        );
    }

    #[test]
    fn the_first_byte_picks_the_format() {
        let bytes = header(CarriageKind::Application).encode(b"x");
        assert!(matches!(Routed::parse(&bytes), Ok(Routed::Mls(_))));
        let mut other = bytes.clone();
        other[0] = 3;
        assert_eq!(
            Routed::parse(&other).unwrap_err(),
            OpenError::UnsupportedVersion(3)
        );
    }
}
