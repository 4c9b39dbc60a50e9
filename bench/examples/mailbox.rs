//! The embedded SQLite mailbox on its own, without the relay around it: how many sealed
//! deliveries per second it stores durably (group commit, `synchronous = FULL`) when many
//! senders put at once, and how long a 10 000-entry backlog takes to read out in pages and
//! acknowledge, as a relay does at login.
//!
//! `cargo run --release -p syncra-bench --example mailbox -- [PUTS] [SENDERS]`
//! (defaults 20 000 puts from 100 concurrent senders). Results: docs/BENCHMARKS.md.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use syncra_core::UserId;
use syncra_core::mailbox::{Mailbox, MailboxLimits, PutOutcome};
use syncra_store_sqlite::mailbox::SqliteMailbox;

fn user(n: u32) -> UserId {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&n.to_be_bytes());
    UserId::from_identity_key(&key)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let puts: u32 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let senders: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let dir = tempfile::tempdir()?;
    let limits = MailboxLimits {
        max_entries: 1_000_000,
        max_bytes: 1 << 40,
        ..MailboxLimits::default()
    };
    let mailbox = Arc::new(SqliteMailbox::open(&dir.path().join("mailbox.db"), limits).await?);
    // A short message's sealed envelope: 512 bytes padded plus one wrapped key.
    let delivery = Bytes::from(vec![7u8; 620]);

    // Store: `senders` concurrent tasks, each putting to its own recipient.
    let started = Instant::now();
    let per = puts / senders;
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (m, d) = (mailbox.clone(), delivery.clone());
        tasks.push(tokio::spawn(async move {
            let to = user(s);
            for _ in 0..per {
                match m.put(&to, d.clone(), syncra_core::now_ms()).await {
                    Ok(PutOutcome::Stored(_)) => {}
                    other => anyhow::bail!("put: {other:?}"),
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let stored = per * senders;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "store: {stored} puts from {senders} concurrent senders in {secs:.3} s = {:.0} msg/s",
        f64::from(stored) / secs
    );

    // Drain: one recipient with a 10 000-entry backlog, read in pages of 256 and acknowledged.
    let backlog_user = user(1_000_000);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (m, d) = (mailbox.clone(), delivery.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                m.put(&backlog_user, d.clone(), syncra_core::now_ms())
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let started = Instant::now();
    let (mut after, mut read) = (0u64, 0usize);
    loop {
        let page = mailbox
            .take(&backlog_user, after, 256, syncra_core::now_ms())
            .await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        read += page.len();
    }
    let read_secs = started.elapsed().as_secs_f64();
    mailbox.ack(&backlog_user, after).await?;
    let total_secs = started.elapsed().as_secs_f64();
    println!(
        "drain: {read} entries read in {read_secs:.3} s, acknowledged in {:.3} s more ({total_secs:.3} s in all)",
        total_secs - read_secs
    );
    Ok(())
}
