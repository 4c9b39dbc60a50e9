//! Messages MLS has opened that wait to be filed: kept sealed on disk until they are.
//!
//! A stranger's first message waits for the directory lookup of their handle (up to 10 s,
//! [`crate::serve`]) after MLS processed it — and MLS processing uses the message's key and
//! saves that, so the same copy never opens again. A crash in that window would lose the message
//! (a live delivery is not sent again; a mailbox copy comes again but no longer opens). So before
//! it waits, the message is written to `spool/` sealed with the storage key, like history; once
//! filed the file is removed, and at the next start whatever is still there is filed (without
//! the lookup: under the sender's short id, as a message request until accepted). A message filed
//! and then spooled again by a crash between the two steps is shown once: its content id is in
//! `replay.log`.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::*;

/// The layout's version byte: version, conversation id, sender, epoch, plaintext.
const VERSION: u8 = 1;
const HEADER: usize = 1 + 16 + 20 + 8;

fn label(file: &str) -> Vec<u8> {
    let mut label = b"syncra/spool/".to_vec();
    label.extend_from_slice(file.as_bytes());
    label
}

impl Client {
    /// Writes an opened message to the spool before it waits for its sender's lookup; the file
    /// is removed once [`Client::file_delivery`] filed it. Anything but a message needs no
    /// spool (nothing of it is shown).
    pub fn spool(&self, opened: &mut Opened) -> anyhow::Result<()> {
        let Arrival::Message {
            conversation,
            sender,
            plaintext,
            epoch,
        } = &*opened.0
        else {
            return Ok(());
        };
        let dir = self.home.spool_dir();
        syncra_core::crypto::keyfile::create_private_dir(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut name = [0u8; 16];
        syncra_core::crypto::fill_random(&mut name);
        let file = format!("{}.msg", HEXLOWER.encode(&name));
        let mut bytes = Zeroizing::new(Vec::with_capacity(HEADER + plaintext.len()));
        bytes.push(VERSION);
        bytes.extend_from_slice(conversation.as_bytes());
        bytes.extend_from_slice(sender.as_bytes());
        bytes.extend_from_slice(&epoch.to_be_bytes());
        bytes.extend_from_slice(plaintext);
        let path = dir.join(&file);
        let sealed = self.keys.storage.seal(&label(&file), &bytes);
        syncra_core::crypto::keyfile::write_private(&path, &sealed)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        opened.1 = Some(path);
        Ok(())
    }

    /// Removes a filed message's spool file.
    pub(super) fn unspool(&self, path: &Path) {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing {}: {e}", path.display()),
        }
    }

    /// Files what a crash left in the spool (at start). A file that does not open or decode is
    /// left where it is and reported; nothing is deleted unread.
    pub(super) fn file_spooled(&mut self) -> anyhow::Result<usize> {
        let dir = self.home.spool_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "msg"))
            .collect();
        // Oldest first, so a sender's messages keep their order.
        files.sort_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
        let mut filed = 0;
        for path in files {
            let Some(opened) = self.read_spooled(&path) else {
                continue;
            };
            self.file_opened(opened, None)?;
            filed += 1;
        }
        Ok(filed)
    }

    fn read_spooled(&self, path: &Path) -> Option<Opened> {
        let file = path.file_name()?.to_str()?;
        let sealed = match std::fs::read(path) {
            Ok(sealed) => sealed,
            Err(e) => {
                tracing::warn!("reading {}: {e}", path.display());
                return None;
            }
        };
        let bytes = match self.keys.storage.open(&label(file), &sealed) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(
                    "{} does not open under this home's storage key ({e}); left in place",
                    path.display()
                );
                return None;
            }
        };
        if bytes.len() < HEADER || bytes[0] != VERSION {
            tracing::warn!("{} is not a spooled message; left in place", path.display());
            return None;
        }
        let mut conversation = [0u8; 16];
        conversation.copy_from_slice(&bytes[1..17]);
        let sender = UserId::from_bytes(bytes[17..37].try_into().ok()?);
        let epoch = u64::from_be_bytes(bytes[37..45].try_into().ok()?);
        let arrival = Arrival::Message {
            conversation: ConversationId::from_bytes(conversation),
            sender,
            plaintext: Zeroizing::new(bytes[HEADER..].to_vec()),
            epoch,
        };
        Some(Opened(Box::new(arrival), Some(path.to_owned())))
    }
}
