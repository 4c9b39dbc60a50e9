//! The conformance suite every `Mailbox` implementation runs: order, acknowledgement,
//! isolation between recipients, quotas, expiry, clearing, concurrent puts and ids that are
//! never reused. Durability across a killed process is shown at the relay level, with real
//! processes (`host-relay/tests/mailbox.rs`).
#![allow(clippy::unwrap_used)] // A conformance suite fails loudly, naming the case: that is how it reports.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use syncra_core::UserId;
use syncra_core::mailbox::{Mailbox, MailboxLimits, PutOutcome};

/// A fresh recipient id no other case uses.
fn recipient() -> UserId {
    let mut key = [0u8; 32];
    syncra_core::crypto::fill_random(&mut key);
    UserId::from_identity_key(&key)
}

const NOW: u64 = 1_800_000_000_000;

fn limits() -> MailboxLimits {
    MailboxLimits {
        ttl_ms: 60_000,
        max_entries: 5,
        max_bytes: 1000,
    }
}

async fn put(m: &dyn Mailbox, to: &UserId, body: &[u8], now: u64) -> PutOutcome {
    m.put(to, Bytes::copy_from_slice(body), now)
        .await
        .unwrap_or_else(|e| panic!("{}: put failed: {e}", m.kind()))
}

async fn stored(m: &dyn Mailbox, to: &UserId, body: &[u8], now: u64) -> u64 {
    match put(m, to, body, now).await {
        PutOutcome::Stored(id) => id,
        PutOutcome::Full => panic!("{}: put of {} bytes refused as full", m.kind(), body.len()),
    }
}

async fn bodies(m: &dyn Mailbox, to: &UserId, after: u64, now: u64) -> Vec<Vec<u8>> {
    m.take(to, after, 100, now)
        .await
        .unwrap_or_else(|e| panic!("{}: take failed: {e}", m.kind()))
        .into_iter()
        .map(|e| e.delivery.to_vec())
        .collect()
}

/// Runs every case against mailboxes made by `make` (one per case) with the limits it is given.
///
/// # Panics
///
/// On the first rule the mailbox breaks, naming the case.
pub async fn mailbox_conformance<F, Fut>(make: F)
where
    F: Fn(MailboxLimits) -> Fut,
    Fut: Future<Output = Arc<dyn Mailbox>>,
{
    order_and_acknowledgement(&*make(limits()).await).await;
    recipients_are_isolated(&*make(limits()).await).await;
    quotas_refuse_and_free_up(&*make(limits()).await).await;
    expired_entries_are_neither_taken_nor_kept(&*make(limits()).await).await;
    clear_empties_one_mailbox(&*make(limits()).await).await;
    concurrent_puts_keep_one_order(
        make(MailboxLimits {
            max_entries: 1000,
            max_bytes: 1 << 20,
            ..limits()
        })
        .await,
    )
    .await;
}

async fn order_and_acknowledgement(m: &dyn Mailbox) {
    let to = recipient();
    assert!(m.stores(), "{}: a storing mailbox says so", m.kind());
    let a = stored(m, &to, b"one", NOW).await;
    let b = stored(m, &to, b"two", NOW).await;
    let c = stored(m, &to, b"three", NOW).await;
    assert!(a < b && b < c, "{}: ids increase: {a} {b} {c}", m.kind());
    assert_eq!(
        bodies(m, &to, 0, NOW).await,
        [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()],
        "{}: taken in order",
        m.kind()
    );
    let first = m.take(&to, 0, 1, NOW).await.unwrap();
    assert_eq!(first.len(), 1, "{}: take honours max", m.kind());
    assert_eq!(first[0].id, a);
    assert_eq!(first[0].stored_at_ms, NOW);
    assert_eq!(
        bodies(m, &to, a, NOW).await.len(),
        2,
        "{}: after a cursor",
        m.kind()
    );
    // Taking does not remove; acknowledging does, up to and including the id.
    assert_eq!(bodies(m, &to, 0, NOW).await.len(), 3);
    m.ack(&to, b).await.unwrap();
    assert_eq!(
        bodies(m, &to, 0, NOW).await,
        [b"three".to_vec()],
        "{}",
        m.kind()
    );
    m.ack(&to, c).await.unwrap();
    assert!(bodies(m, &to, 0, NOW).await.is_empty(), "{}", m.kind());
    // Ids are never reused, even once the mailbox is empty: a late acknowledgement must not
    // delete a newer entry.
    let d = stored(m, &to, b"four", NOW).await;
    assert!(d > c, "{}: id {d} reused after {c}", m.kind());
    m.ack(&to, c).await.unwrap();
    assert_eq!(
        bodies(m, &to, 0, NOW).await,
        [b"four".to_vec()],
        "{}",
        m.kind()
    );
}

async fn recipients_are_isolated(m: &dyn Mailbox) {
    let (alice, bob) = (recipient(), recipient());
    let a = stored(m, &alice, b"for alice", NOW).await;
    stored(m, &bob, b"for bob", NOW).await;
    m.ack(&bob, u64::MAX / 2).await.unwrap();
    assert_eq!(
        bodies(m, &alice, 0, NOW).await,
        [b"for alice".to_vec()],
        "{}",
        m.kind()
    );
    assert!(bodies(m, &bob, 0, NOW).await.is_empty(), "{}", m.kind());
    m.ack(&alice, a).await.unwrap();
}

async fn quotas_refuse_and_free_up(m: &dyn Mailbox) {
    let to = recipient();
    let mut last = 0;
    for i in 0..5u8 {
        last = stored(m, &to, &[i; 10], NOW).await;
    }
    assert_eq!(
        put(m, &to, b"sixth", NOW).await,
        PutOutcome::Full,
        "{}: count quota",
        m.kind()
    );
    assert_eq!(
        bodies(m, &to, 0, NOW).await.len(),
        5,
        "{}: a refused put stores nothing",
        m.kind()
    );
    m.ack(&to, last).await.unwrap();
    // Bytes: 1000 in all.
    stored(m, &to, &[1; 600], NOW).await;
    assert_eq!(
        put(m, &to, &[2; 401], NOW).await,
        PutOutcome::Full,
        "{}: byte quota",
        m.kind()
    );
    stored(m, &to, &[3; 400], NOW).await;
    let other = recipient();
    stored(m, &other, &[4; 600], NOW).await;
}

async fn expired_entries_are_neither_taken_nor_kept(m: &dyn Mailbox) {
    let to = recipient();
    let old = NOW - 61_000;
    for _ in 0..5 {
        stored(m, &to, b"old", old).await;
    }
    assert!(
        bodies(m, &to, 0, NOW).await.is_empty(),
        "{}: expired entries are not taken",
        m.kind()
    );
    let purged = m.expire(NOW).await.unwrap();
    assert!(purged >= 5, "{}: expire purged {purged}", m.kind());
    // Their quota is free again.
    for _ in 0..5 {
        stored(m, &to, b"new", NOW).await;
    }
    assert_eq!(bodies(m, &to, 0, NOW).await.len(), 5, "{}", m.kind());
}

async fn clear_empties_one_mailbox(m: &dyn Mailbox) {
    let (to, other) = (recipient(), recipient());
    for _ in 0..3 {
        stored(m, &to, b"x", NOW).await;
    }
    stored(m, &other, b"y", NOW).await;
    assert_eq!(m.clear(&to).await.unwrap(), 3, "{}: clear counts", m.kind());
    assert!(bodies(m, &to, 0, NOW).await.is_empty());
    assert_eq!(
        bodies(m, &other, 0, NOW).await.len(),
        1,
        "{}: only that mailbox",
        m.kind()
    );
    stored(m, &to, b"again", NOW).await;
}

async fn concurrent_puts_keep_one_order(m: Arc<dyn Mailbox>) {
    let to = recipient();
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let m = m.clone();
            tokio::spawn(async move {
                match m.put(&to, Bytes::from(i.to_be_bytes().to_vec()), NOW).await {
                    Ok(PutOutcome::Stored(id)) => (id, i),
                    other => panic!("{}: concurrent put: {other:?}", m.kind()),
                }
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    let entries = m.take(&to, 0, 1000, NOW).await.unwrap();
    assert_eq!(entries.len(), 200, "{}: every put is there", m.kind());
    for (e, (id, i)) in entries.iter().zip(&ids) {
        assert_eq!(e.id, *id, "{}: taken in id order", m.kind());
        assert_eq!(
            e.delivery.as_ref(),
            i.to_be_bytes(),
            "{}: the id is the put's",
            m.kind()
        );
    }
}
