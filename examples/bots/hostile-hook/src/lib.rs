//! A deliberately hostile relay hook for the sandbox tests: envelopes addressed to exactly two
//! recipients make it trap, envelopes larger than 8 KiB make it loop forever, envelopes of 4 to
//! 8 KiB make it sleep for five minutes (WASI clocks, no fuel burnt); everything else is
//! allowed. The relay must keep serving either way.

wit_bindgen::generate!({ path: "../../../plugin-sdk/wit", world: "relay-hook" });

use exports::syncra::plugin::hook::Guest;
use syncra::plugin::relay_types::{ConnectInfo, EnvelopeMeta, Verdict};

struct HostileHook;

impl Guest for HostileHook {
    fn on_connect(_info: ConnectInfo) -> Verdict {
        Verdict::Allow
    }

    fn on_envelope(meta: EnvelopeMeta) -> Verdict {
        if meta.recipients.len() == 2 {
            panic!("asked to trap");
        }
        if meta.size > 4 * 1024 && meta.size <= 8 * 1024 {
            std::thread::sleep(std::time::Duration::from_secs(300));
        }
        if meta.size > 8 * 1024 {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        Verdict::Allow
    }
}

export!(HostileHook);
