//! A relay hook that allow-lists senders and rate-limits everyone else, by metadata only.
//!
//! Users whose id starts with a prefix stored under `allow/<prefix>` pass freely. Every other
//! session may send at most `LIMIT` envelopes per minute; beyond that the hook denies with a
//! reason the sender sees. Recipients listed under `block/<user id>` never receive anything.

wit_bindgen::generate!({ path: "../../../plugin-sdk/wit", world: "relay-hook" });

use std::cell::RefCell;
use std::collections::HashMap;

use exports::syncra::plugin::hook::Guest;
use syncra::plugin::host::{kv_get, log, now_ms};
use syncra::plugin::relay_types::{ConnectInfo, EnvelopeMeta, Verdict};
use syncra::plugin::types::Level;

const LIMIT: u32 = 120;
/// Senders tracked at most; beyond it stale windows are forgotten.
const MAX_TRACKED: usize = 10_000;

thread_local! {
    /// Per sender: (window start, count). The instance is long-lived, so this survives calls.
    static WINDOWS: RefCell<HashMap<String, (u64, u32)>> = RefCell::new(HashMap::new());
}

struct AllowList;

impl Guest for AllowList {
    fn on_connect(info: ConnectInfo) -> Verdict {
        log(Level::Debug, &format!("session for {}", info.user));
        Verdict::Allow
    }

    fn on_envelope(meta: EnvelopeMeta) -> Verdict {
        for r in &meta.recipients {
            if kv_get(&format!("block/{r}")).is_some() {
                return Verdict::Deny(format!("recipient {r} does not accept messages here"));
            }
        }
        if kv_get(&format!("allow/{}", &meta.session_user)).is_some() {
            return Verdict::Allow;
        }
        let now = now_ms();
        let over = WINDOWS.with(|w| {
            let mut w = w.borrow_mut();
            // Bounded memory: forget windows that are over once the table grows.
            if w.len() >= MAX_TRACKED {
                w.retain(|_, (start, _)| now.saturating_sub(*start) < 60_000);
                if w.len() >= MAX_TRACKED {
                    w.clear();
                }
            }
            let entry = w.entry(meta.session_user.clone()).or_insert((now, 0));
            if now.saturating_sub(entry.0) >= 60_000 {
                *entry = (now, 0);
            }
            entry.1 += 1;
            entry.1 > LIMIT
        });
        if over {
            Verdict::Deny(format!("more than {LIMIT} messages a minute; slow down"))
        } else {
            Verdict::Allow
        }
    }
}

export!(AllowList);
