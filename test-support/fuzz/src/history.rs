//! `history_line`: turning fuzz input into a `chats/<conversation>.log` file.
//!
//! The input is split into lines at `\n`. A line starting with
//! - `+` is the JSON record after it, sealed with the right key for this conversation;
//! - `~` is sealed with the right key but for another conversation (a moved line);
//! - `!` is sealed with another key (a line from someone else's history);
//! - anything else is written as it is (base64 garbage, torn lines, raw JSON).
//!
//! Whether the input ends with `\n` decides whether the file does (a torn last line). Sealing
//! inside the harness lets the fuzzer reach the JSON decoding and the folding of records, which
//! random bytes never would through AES-GCM.

use data_encoding::BASE64;
use syncra_core::crypto::local_box::LocalKey;

/// The conversation the file belongs to.
pub const CONVERSATION: &str = "fuzz";

/// The label `History` binds each line to (must match `host-client/src/history.rs`).
pub fn label(conversation: &str) -> Vec<u8> {
    format!("syncra/v1/history/{conversation}").into_bytes()
}

/// The history key.
pub fn key() -> LocalKey {
    LocalKey::from_bytes(&[0x4b; 32]).expect("32 bytes")
}

/// Another person's history key.
pub fn other_key() -> LocalKey {
    LocalKey::from_bytes(&[0x0b; 32]).expect("32 bytes")
}

/// What the harness wrote.
#[derive(Debug, Default)]
pub struct Built {
    /// The file's bytes.
    pub file: Vec<u8>,
    /// Lines sealed with the right key and label (only these may produce records).
    pub sealed_ok: usize,
    /// Lines in the file (non-empty).
    pub lines: usize,
    /// Whether the file ends with a newline.
    pub ends_clean: bool,
}

/// Builds the log file from fuzz input.
pub fn build(data: &[u8]) -> Built {
    let key = key();
    let other = other_key();
    let mut out = Built {
        ends_clean: data.last() == Some(&b'\n'),
        ..Built::default()
    };
    let parts: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let count = parts.len();
    for (i, part) in parts.into_iter().enumerate() {
        let line: Vec<u8> = match part.split_first() {
            Some((b'+', rest)) => {
                out.sealed_ok += 1;
                BASE64
                    .encode(&key.seal(&label(CONVERSATION), rest))
                    .into_bytes()
            }
            Some((b'~', rest)) => BASE64
                .encode(&key.seal(&label("elsewhere"), rest))
                .into_bytes(),
            Some((b'!', rest)) => BASE64
                .encode(&other.seal(&label(CONVERSATION), rest))
                .into_bytes(),
            _ => part.to_vec(),
        };
        if !line.is_empty() {
            out.lines += 1;
        }
        out.file.extend_from_slice(&line);
        if i + 1 < count {
            out.file.push(b'\n');
        }
    }
    out
}
