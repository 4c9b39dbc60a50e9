//! Fuzzes the client's history reader, `History::read` (host-client/src/history.rs, compiled
//! into the fuzz crate, see src/lib.rs), through its public API on a real file:
//! the input becomes `chats/fuzz.log` (see `src/history.rs` for how lines are sealed), then it
//! is read. It must never fail or panic on damaged content, never return a record from a line
//! not sealed with the right key for this conversation, and never show a message id twice.
#![no_main]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use syncra_fuzz::client_history::History;
use syncra_fuzz::history::{CONVERSATION, build, key};
use syncra_fuzz::home::FsyncPolicy;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| syncra_fuzz::process_dir("syncra-fuzz-history-"))
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    let built = build(data);
    std::fs::write(dir.join(format!("{CONVERSATION}.log")), &built.file).expect("write log");
    let history = History::new(dir.clone(), key(), FsyncPolicy::Never);
    let (messages, report) = history
        .read(CONVERSATION)
        .expect("reading an existing log never fails on its content");
    assert!(
        messages.len() <= built.sealed_ok,
        "{} messages from {} properly sealed lines",
        messages.len(),
        built.sealed_ok
    );
    let mut ids = HashSet::new();
    for m in &messages {
        assert!(ids.insert(&m.id), "message id {:?} shown twice", m.id);
    }
    assert!(
        report.damaged <= built.lines,
        "more damaged lines than lines"
    );
    assert!(
        !(report.torn_tail && built.ends_clean),
        "a torn tail reported in a file that ends with a newline"
    );
});
