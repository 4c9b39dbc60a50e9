//! The product's message path, end to end on one machine: two `syncra` clients (the library
//! the commands, `listen`, the TUI and bots share) chatting 1:1 over MLS through an in-process
//! relay. Per message the sender writes the outbox entry and the history line, encrypts, seals
//! its MLS state to disk and waits for the relay's answer; the receiver processes it, seals its
//! state and files it in history. Prints wall-clock microseconds per message for each side.
//!
//! Usage: `cargo run --release -p syncra-bench --example chat -- [MESSAGES]` (default 500, at most 1 000).
//! The numbers include the disk (each state save is written and synced), so they depend on the
//! filesystem; docs/BENCHMARKS.md gives the machine.

use std::time::{Duration, Instant};

use syncra_client::{Client, Home, InitOptions, SendState};
use syncra_core::crypto::keyfile::KdfParams;
use syncra_test_relay::TestRelay;

async fn user(dir: &std::path::Path, relay: &TestRelay, handle: &str) -> anyhow::Result<Client> {
    let options = InitOptions {
        kdf: KdfParams::MINIMUM,
    };
    let mut c = Client::init(Home::at(dir.join(handle)), "bench", options)?;
    c.register(relay.url(), handle)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(c)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let messages: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(500);
    // The receiver holds what arrives in its session's push channel (1 024) until it reads.
    anyhow::ensure!(messages <= 1000, "at most 1 000 messages");
    let relay = TestRelay::start(|c| {
        c.limits.messages_per_second_per_user = 1_000_000;
        c.limits.message_burst_per_user = 1_000_000;
        c.limits.messages_per_second_per_address = 1_000_000;
        c.limits.message_burst_per_address = 1_000_000;
    })
    .await;
    let dir = tempfile::tempdir()?;
    let mut alice = user(dir.path(), &relay, "alice").await?;
    let mut bob = user(dir.path(), &relay, "bob").await?;
    alice.add_contact("bob").await?;
    bob.add_contact("alice").await?;
    // The conversation is created by the first message (not counted).
    alice.send_text("bob", "hello").await?;
    while bob.catch_up(Duration::from_millis(300)).await? > 0 {}

    let text = "x".repeat(256);
    let started = Instant::now();
    for _ in 0..messages {
        let report = alice.send_text("bob", &text).await?;
        anyhow::ensure!(report.state == SendState::Delivered, "{report:?}");
    }
    let sent = started.elapsed();
    let started = Instant::now();
    let mut received = 0;
    while received < messages {
        let n = bob.catch_up(Duration::from_secs(5)).await?;
        anyhow::ensure!(n > 0, "only {received} of {messages} arrived");
        received += n;
    }
    let read = started.elapsed();
    anyhow::ensure!(bob.rejected_count() == 0, "refused deliveries");
    let per = |d: Duration| d.as_secs_f64() * 1e6 / messages as f64;
    println!(
        "{messages} messages of 256 B, 1:1 over MLS through an in-process relay:\n  \
         send (outbox, history, encrypt, state to disk, relay answer): {:.1} µs/msg\n  \
         receive (process, state to disk, history): {:.1} µs/msg",
        per(sent),
        per(read)
    );
    Ok(())
}
