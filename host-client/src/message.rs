//! What travels inside an MLS application message: a small, versioned JSON document.
//!
//! The relay never sees it (it is the plaintext of an MLS `PrivateMessage`). It carries the
//! message id and the sender's time — inside the encryption, so the relay can neither change
//! nor correlate them — the text, and for a group message the name its sender knows the group
//! by. Who sent it and who the members are come from MLS, never from here. Every field is
//! untrusted input: a name is only a suggestion turned into a local name
//! (`crate::contacts::local_group_name`), an id must be 32 hex characters. A group message with
//! an empty text only names the group (its creator sends one right after creating it).

use serde::{Deserialize, Serialize};

/// The version this client writes and reads.
pub const CONTENT_VERSION: u32 = 2;

/// The plaintext of an application message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Content {
    /// Format version ([`CONTENT_VERSION`]).
    pub v: u32,
    /// The message id (32 lowercase hex characters): the same on every attempt to send it, so
    /// a message sent twice (a lost answer) is shown once.
    pub id: String,
    /// When its sender wrote it (ms since the Unix epoch, the sender's clock).
    pub ts: u64,
    /// The text.
    pub text: String,
    /// Set for group messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupLabel>,
}

/// What a group message says about its group besides what MLS says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupLabel {
    /// The name the sender knows the group by (a suggestion).
    pub name: String,
}

impl Content {
    /// Encodes to bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a plaintext; `None` if it is not a Syncra message of this version.
    pub fn decode(body: &[u8]) -> Option<Content> {
        serde_json::from_slice::<Content>(body)
            .ok()
            .filter(|c| c.v == CONTENT_VERSION && valid_id(&c.id))
    }

    /// The message id as bytes.
    pub fn message_id(&self) -> Option<[u8; 16]> {
        let bytes = data_encoding::HEXLOWER.decode(self.id.as_bytes()).ok()?;
        bytes.try_into().ok()
    }
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_version_with_a_hex_id_decodes() {
        let c = Content {
            v: CONTENT_VERSION,
            id: "0123456789abcdef0123456789abcdef".into(),
            ts: 7,
            text: "hi".into(),
            group: Some(GroupLabel { name: "g".into() }),
        };
        assert_eq!(Content::decode(&c.encode()), Some(c.clone()));
        let bad_id = Content {
            id: "../../etc".into(),
            ..c.clone()
        };
        assert_eq!(Content::decode(&bad_id.encode()), None);
        let old = Content { v: 1, ..c };
        assert_eq!(Content::decode(&old.encode()), None);
        assert_eq!(Content::decode(b"plain text"), None);
        assert_eq!(
            Content::decode(
                br#"{"v":2,"id":"0123456789abcdef0123456789abcdef","ts":1,"text":"x","extra":1}"#
            ),
            None
        );
    }
}
