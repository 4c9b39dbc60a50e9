//! The replay guard at rest: `replay.log`, one encrypted line per accepted message, so a
//! message replayed after a restart (within the accept window) is still refused.
//!
//! Each line is `base64(nonce || AES-256-GCM(storage_key, record, label))`, appended with one
//! write call (lines from several processes on one home do not interleave). On load, lines past
//! the window are dropped; when most lines are stale the file is rewritten with the live ones.
//! A damaged line is skipped.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use data_encoding::{BASE64, HEXLOWER};
use serde::{Deserialize, Serialize};
use syncra_core::UserId;
use syncra_core::crypto::envelope::{MessageId, ReplayGuard};
use syncra_core::crypto::keyfile::write_private;
use syncra_core::crypto::local_box::LocalKey;

const LABEL: &[u8] = b"syncra/v1/replay";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Seen {
    s: UserId,
    m: String,
    t: u64,
}

/// The persisted replay guard.
#[derive(Debug)]
pub struct ReplayLog {
    path: PathBuf,
    key: LocalKey,
}

impl ReplayLog {
    /// The log at `path`, encrypted with `key`.
    pub fn new(path: PathBuf, key: LocalKey) -> Self {
        ReplayLog { path, key }
    }

    fn line(&self, sender: UserId, id: &MessageId, at_ms: u64) -> anyhow::Result<String> {
        let json = serde_json::to_vec(&Seen {
            s: sender,
            m: HEXLOWER.encode(id),
            t: at_ms,
        })?;
        let mut line = BASE64.encode(&self.key.seal(LABEL, &json));
        line.push('\n');
        Ok(line)
    }

    /// Fills `guard` with what was accepted within its window.
    pub fn load_into(&self, guard: &mut ReplayGuard, now_ms: u64) -> anyhow::Result<()> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let window = guard.window();
        let horizon = now_ms.saturating_sub(window.max_age_ms + window.max_future_ms);
        let mut total = 0usize;
        for line in text.lines() {
            total += 1;
            let seen = BASE64
                .decode(line.as_bytes())
                .ok()
                .and_then(|b| self.key.open(LABEL, &b).ok())
                .and_then(|p| serde_json::from_slice::<Seen>(&p).ok());
            let Some(seen) = seen else { continue };
            let Some(id) = HEXLOWER
                .decode(seen.m.as_bytes())
                .ok()
                .and_then(|b| MessageId::try_from(b).ok())
            else {
                continue;
            };
            if seen.t >= horizon {
                guard.insert(seen.s, id, seen.t);
            }
        }
        if total > 2 * guard.len() + 1024 {
            let mut live = String::new();
            for (t, s, m) in guard.entries() {
                live.push_str(&self.line(s, &m, t)?);
            }
            write_private(&self.path, live.as_bytes())?;
        }
        Ok(())
    }

    /// Records an accepted message.
    pub fn record(&self, sender: UserId, id: &MessageId, at_ms: u64) -> anyhow::Result<()> {
        let line = self.line(sender, id, at_ms)?;
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        f.write_all(line.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))?;
        f.sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncra_core::crypto::envelope::AcceptWindow;

    #[test]
    fn what_was_accepted_is_refused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = LocalKey::generate();
        let log = ReplayLog::new(dir.path().join("replay.log"), key.clone());
        let sender = UserId::from_identity_key(&[7; 32]);
        let now = syncra_core::now_ms();
        log.record(sender, &[1; 16], now).unwrap();
        log.record(sender, &[2; 16], 1).unwrap(); // long past the window
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("replay.log"))
            .unwrap()
            .write_all(b"garbage\n")
            .unwrap();
        let mut guard = ReplayGuard::new(AcceptWindow::default(), 100);
        ReplayLog::new(dir.path().join("replay.log"), key)
            .load_into(&mut guard, now)
            .unwrap();
        assert!(guard.contains(&sender, &[1; 16]));
        assert!(!guard.contains(&sender, &[2; 16]));
        let raw = std::fs::read_to_string(dir.path().join("replay.log")).unwrap();
        assert!(!raw.contains(&sender.to_string()), "encrypted at rest");
    }
}
