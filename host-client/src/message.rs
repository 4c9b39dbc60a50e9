//! What travels inside an envelope body: a small, versioned JSON document.
//!
//! The relay never sees it (it is the plaintext). Group messages carry the group id, name,
//! creator and member list. A receiver takes the member list only from the group's creator (a
//! member who is not in the creator's newer list has been removed) and treats every field as
//! untrusted input (`crate::contacts::valid_group_id`). A group message with an empty text
//! carries only a membership change.

use serde::{Deserialize, Serialize};
use syncra_core::UserId;

/// The body of a sealed message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Content {
    /// Format version (1).
    pub v: u32,
    /// The text.
    pub text: String,
    /// Set for group messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupInfo>,
}

/// Group membership carried in every group message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupInfo {
    /// The group id (32 hex characters).
    pub id: String,
    /// The group's name.
    pub name: String,
    /// Every member, including the sender.
    pub members: Vec<UserId>,
    /// Who created the group; only the creator's member lists count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<UserId>,
}

impl Content {
    /// A direct text message.
    pub fn text(text: impl Into<String>) -> Self {
        Content {
            v: 1,
            text: text.into(),
            group: None,
        }
    }

    /// Encodes to bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and ids cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a body; a body that is not ours is shown as its raw text.
    pub fn decode(body: &[u8]) -> Content {
        serde_json::from_slice::<Content>(body)
            .ok()
            .filter(|c| c.v == 1)
            .unwrap_or_else(|| Content::text(String::from_utf8_lossy(body).into_owned()))
    }
}
