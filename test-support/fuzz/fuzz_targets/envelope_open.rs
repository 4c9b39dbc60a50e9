//! Fuzzes `Opener::open` as a fixed recipient (fixed prekey ring, the sender pinned, a fixed
//! clock). It must never panic, and anything that opens must have been sealed by the pinned
//! sender, name me, and be refused when opened a second time (replay).
//!
//! Input: an even first byte means the rest is an envelope to open as is; an odd first byte
//! means the rest is a list of edits applied to a real envelope (see `src/envelope.rs`), and
//! whatever still opens must be exactly the original message.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use syncra_fuzz::envelope::{REFERENCE_BODY, Recipient0, mutations, reference_envelope};

struct Fixture {
    recipient: Recipient0,
    reference: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        recipient: Recipient0::default(),
        reference: reference_envelope(),
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        f.recipient.check(rest);
    } else {
        let mut envelope = f.reference.clone();
        for m in mutations(rest) {
            m.apply(&mut envelope);
        }
        if let Some(opened) = f.recipient.check(&envelope) {
            assert_eq!(
                opened.body, REFERENCE_BODY,
                "an edited envelope opened to another body"
            );
            assert_eq!(
                opened.timestamp_ms,
                syncra_fuzz::NOW_MS,
                "an edited envelope opened with another timestamp"
            );
            assert_eq!(
                &envelope[1..17],
                &f.reference[1..17],
                "an edited envelope opened with another message id"
            );
        }
    }
});
