//! What is particular to the JetStream mailbox, on real `nats-server`s this test starts: quotas
//! held exactly when two nodes put for one recipient at once, a full mailbox that refuses
//! rather than evicts, entries that survive the server being killed and started again on the
//! same store, a stream whose per-subject limit a node never lowers, and clear start errors.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use bytes::Bytes;
use syncra_broker_nats::mailbox::{NatsMailbox, NatsMailboxConfig};
use syncra_core::mailbox::{Mailbox, MailboxError, MailboxLimits, PutOutcome};
use syncra_core::registry::Kinds;
use syncra_core::{Health, UserId};
use syncra_test_support::broker::OUTAGE_ANSWER_WITHIN;
use syncra_test_support::servers::NatsServer;

fn recipient() -> UserId {
    let mut key = [0u8; 32];
    syncra_core::crypto::fill_random(&mut key);
    UserId::from_identity_key(&key)
}

fn limits(max_entries: u64, max_bytes: u64) -> MailboxLimits {
    MailboxLimits {
        ttl_ms: 3_600_000,
        max_entries,
        max_bytes,
    }
}

async fn mailbox(server: &NatsServer, limits: MailboxLimits) -> Arc<NatsMailbox> {
    Arc::new(
        NatsMailbox::connect(&NatsMailboxConfig::new(server.url()), limits)
            .await
            .unwrap(),
    )
}

fn ids(entries: &[syncra_core::mailbox::MailboxEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.id).collect()
}

/// The ids `to` holds now.
async fn held_ids(m: &NatsMailbox, to: &UserId, now: u64) -> Vec<u64> {
    ids(&m.take(to, 0, 10_000, now).await.unwrap())
}

/// Two nodes put 100-byte deliveries for one recipient at the same time against a 2 000-byte
/// quota: exactly 20 are stored, whichever node stored them, and their ids are one order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_never_exceed_the_byte_quota() {
    let server = NatsServer::start_jetstream();
    let quota = limits(1000, 2000);
    let (a, b) = (mailbox(&server, quota).await, mailbox(&server, quota).await);
    let to = recipient();
    let now = syncra_core::now_ms();
    let tasks: Vec<_> = (0..60u8)
        .map(|i| {
            let m = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { m.put(&to, Bytes::from(vec![i; 100]), now).await })
        })
        .collect();
    let mut stored = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            PutOutcome::Stored(id) => stored.push(id),
            PutOutcome::Full => {}
        }
    }
    assert_eq!(stored.len(), 20, "2000 bytes hold twenty 100-byte entries");
    let held = a.take(&to, 0, 1000, now).await.unwrap();
    stored.sort();
    assert_eq!(ids(&held), stored);
    // Acknowledging half frees exactly that much room.
    a.ack(&to, stored[9]).await.unwrap();
    for _ in 0..10 {
        assert!(matches!(
            b.put(&to, Bytes::from(vec![1; 100]), now).await.unwrap(),
            PutOutcome::Stored(_)
        ));
    }
    assert_eq!(
        b.put(&to, Bytes::from(vec![1; 100]), now).await.unwrap(),
        PutOutcome::Full
    );
}

/// A full mailbox refuses: the oldest entry is still there, unchanged, after the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_refuses_and_evicts_nothing() {
    let server = NatsServer::start_jetstream();
    let m = mailbox(&server, limits(3, 1 << 20)).await;
    let to = recipient();
    let now = syncra_core::now_ms();
    for body in [b"first", b"secnd", b"third"] {
        assert!(matches!(
            m.put(&to, Bytes::from_static(body), now).await.unwrap(),
            PutOutcome::Stored(_)
        ));
    }
    assert_eq!(
        m.put(&to, Bytes::from_static(b"fourth"), now)
            .await
            .unwrap(),
        PutOutcome::Full
    );
    let held = m.take(&to, 0, 10, now).await.unwrap();
    assert_eq!(held.len(), 3);
    assert_eq!(held[0].delivery, Bytes::from_static(b"first"));
}

/// The server's per-subject limit is the count quota's backstop. A node configured with a
/// lower quota than the stream has does not lower it (JetStream would delete held entries to
/// meet it) and still holds its own quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_quota_never_lowers_the_streams_limit() {
    let server = NatsServer::start_jetstream();
    let roomy = mailbox(&server, limits(10, 1 << 20)).await;
    let to = recipient();
    let now = syncra_core::now_ms();
    for i in 0..5u8 {
        roomy.put(&to, Bytes::from(vec![i]), now).await.unwrap();
    }
    let strict = mailbox(&server, limits(2, 1 << 20)).await;
    assert_eq!(
        roomy.take(&to, 0, 100, now).await.unwrap().len(),
        5,
        "held entries survive a node with a lower quota starting"
    );
    assert_eq!(
        strict
            .put(&to, Bytes::from_static(b"x"), now)
            .await
            .unwrap(),
        PutOutcome::Full
    );
    let other = recipient();
    for _ in 0..2 {
        strict
            .put(&other, Bytes::from_static(b"y"), now)
            .await
            .unwrap();
    }
    assert_eq!(
        strict
            .put(&other, Bytes::from_static(b"z"), now)
            .await
            .unwrap(),
        PutOutcome::Full
    );
}

/// A stored entry survives `nats-server` being killed (SIGKILL) and started again on the same
/// store; while it is gone, a put fails promptly as unavailable instead of hanging or claiming
/// a store, and the mailbox recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_survive_the_server_being_killed_and_restarted() {
    let mut server = NatsServer::start_jetstream();
    let mut config = NatsMailboxConfig::new(server.url());
    config.connection.command_timeout_ms = 500;
    let m = NatsMailbox::connect(&config, limits(100, 1 << 20))
        .await
        .unwrap();
    let to = recipient();
    let now = syncra_core::now_ms();
    let mut stored = Vec::new();
    for i in 0..10u8 {
        match m.put(&to, Bytes::from(vec![i; 10]), now).await.unwrap() {
            PutOutcome::Stored(id) => stored.push(id),
            PutOutcome::Full => panic!("not full"),
        }
    }

    server.stop();
    let during = tokio::time::timeout(
        OUTAGE_ANSWER_WITHIN,
        m.put(&to, Bytes::from_static(b"while down"), now),
    )
    .await
    .expect("a put while the server is down must not hang");
    assert!(
        matches!(during, Err(MailboxError::Unavailable(_))),
        "{during:?}"
    );
    assert!(matches!(m.health().await, Health::Down(_)));

    server.restart();
    let deadline = tokio::time::Instant::now() + syncra_test_support::DEADLINE;
    let held = loop {
        match m.take(&to, 0, 100, now).await {
            Ok(held) => break held,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never recovered: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(ids(&held), stored);
    assert_eq!(held[9].delivery.as_ref(), [9u8; 10]);
    assert_eq!(m.health().await, Health::Up);
    // The usage arithmetic is intact after the restart: 10 held, room for 90 more.
    assert!(matches!(
        m.put(&to, Bytes::from_static(b"after"), now).await.unwrap(),
        PutOutcome::Stored(id) if id > stored[9]
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_kind_nats_and_says_when_jetstream_is_missing() {
    let mut kinds = Kinds::new("mailbox", &[]);
    syncra_broker_nats::mailbox::register(&mut kinds).unwrap();
    let js = NatsServer::start_jetstream();
    let m = kinds
        .create(
            serde_json::json!({ "kind": "nats", "url": js.url(), "command_timeout_ms": 1500 }),
            limits(10, 1000),
        )
        .await
        .unwrap();
    assert_eq!(m.kind(), "nats");
    assert!(m.stores());
    assert_eq!(m.health().await, Health::Up);

    let Err(err) = kinds
        .create(
            serde_json::json!({ "kind": "nats", "url": js.url(), "stream": "X" }),
            limits(10, 1000),
        )
        .await
    else {
        panic!("an unknown key must be refused");
    };
    assert!(err.to_string().contains("stream"), "{err}");

    // Core NATS without JetStream: a start error that says what is missing.
    let core = NatsServer::start();
    let Err(err) = kinds
        .create(
            serde_json::json!({ "kind": "nats", "url": core.url(), "command_timeout_ms": 1000 }),
            limits(10, 1000),
        )
        .await
    else {
        panic!("a server without JetStream must fail the start");
    };
    assert!(err.to_string().contains("JetStream"), "{err}");
}

/// A backlog larger than a page is read in pages, in order, with nothing skipped or repeated,
/// and expired entries between current ones are passed over without cutting a page short (a
/// short page tells the relay the backlog is over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_is_read_in_full_pages_in_order() {
    let server = NatsServer::start_jetstream();
    let m = mailbox(&server, limits(10_000, 1 << 30)).await;
    let to = recipient();
    let now = syncra_core::now_ms();
    let expired = now - 2 * 3_600_000;
    let mut want = Vec::new();
    for i in 0..600u32 {
        // Every fifth entry was stored long ago (a node with a slow clock).
        let at = if i % 5 == 4 { expired } else { now };
        let put = m.put(&to, Bytes::from(i.to_be_bytes().to_vec()), at);
        match put.await.unwrap() {
            PutOutcome::Stored(id) if at == now => want.push((id, i)),
            PutOutcome::Stored(_) => {}
            PutOutcome::Full => panic!("not full"),
        }
    }
    let mut got = Vec::new();
    let mut after = 0;
    loop {
        let page = m.take(&to, after, 256, now).await.unwrap();
        let full = page.len() == 256;
        for e in &page {
            let body = u32::from_be_bytes(e.delivery.as_ref().try_into().unwrap());
            got.push((e.id, body));
            after = e.id;
        }
        if !full {
            break;
        }
    }
    assert_eq!(got, want);
}

/// An acknowledgement deletes up to its id whichever node handed the entries out: the node
/// that read them deletes them one by one, another node (or one started since) purges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_deletes_up_to_its_id_on_any_node() {
    let server = NatsServer::start_jetstream();
    let (a, b) = (
        mailbox(&server, limits(1000, 1 << 20)).await,
        mailbox(&server, limits(1000, 1 << 20)).await,
    );
    let to = recipient();
    let now = syncra_core::now_ms();
    for i in 0..10u8 {
        a.put(&to, Bytes::from(vec![i]), now).await.unwrap();
    }
    let read = a.take(&to, 0, 100, now).await.unwrap();
    a.ack(&to, read[3].id).await.unwrap();
    assert_eq!(held_ids(&b, &to, now).await, ids(&read[4..]));
    // Node c never handed anything out: it purges.
    let c = mailbox(&server, limits(1000, 1 << 20)).await;
    c.ack(&to, read[6].id).await.unwrap();
    assert_eq!(held_ids(&a, &to, now).await, ids(&read[7..]));
    // Acknowledging again, or below what is gone, changes nothing.
    a.ack(&to, read[5].id).await.unwrap();
    assert_eq!(a.take(&to, 0, 100, now).await.unwrap().len(), 3);
}

/// Anyone who can publish on the NATS server can append to a recipient's subject: an entry
/// without the plugin's headers, one whose totals no put could have written (below its own
/// size; a count of 0), one with a time that is not a number. Before, the first made every take
/// and put of that recipient fail as `Corrupt` and stopped expiry for the whole stream. Now
/// takes skip them, a put removes what it finds at either end of the subject and stores, and
/// expiry removes them from the stream's front. (The relay also refuses any entry it did not
/// MAC: `host-relay/src/sealed_mailbox.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_published_by_others_neither_block_nor_come_out() {
    use syncra_broker_nats::mailbox::{BYTES_THROUGH, COUNT_THROUGH, STORED_AT, subject};
    let server = NatsServer::start_jetstream();
    let m = mailbox(&server, limits(100, 100_000)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let to = recipient();
    let now = syncra_core::now_ms();
    let publish = async |headers: &[(&str, &str)], body: &'static [u8]| {
        let mut map = async_nats::HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, *v);
        }
        js.publish_with_headers(subject(&to), map, Bytes::from_static(body))
            .await
            .unwrap()
            .await
            .unwrap();
    };
    // Without the plugin's format: never an entry; expiry removes them rather than stopping.
    publish(&[], b"no headers").await;
    publish(&[(STORED_AT, "soon")], b"a time that is no number").await;
    assert!(
        m.take(&to, 0, 100, now).await.unwrap().is_empty(),
        "neither is an entry"
    );
    assert_eq!(m.expire(now).await.unwrap(), 2, "both removed by expiry");
    // Totals no put writes, at both ends of the subject: the next put removes them and stores.
    let at = now.to_string();
    publish(
        &[(STORED_AT, &at), (BYTES_THROUGH, "1"), (COUNT_THROUGH, "1")],
        b"a byte total below its own size",
    )
    .await;
    publish(
        &[
            (STORED_AT, &at),
            (BYTES_THROUGH, "500"),
            (COUNT_THROUGH, "0"),
        ],
        b"a count of 0",
    )
    .await;
    let stored = match m.put(&to, Bytes::from_static(b"genuine"), now).await {
        Ok(PutOutcome::Stored(id)) => id,
        other => panic!("a put after foreign entries: {other:?}"),
    };
    let taken = m.take(&to, 0, 100, now).await.unwrap();
    assert_eq!(ids(&taken), [stored], "only the genuine entry is left");
    assert_eq!(&taken[0].delivery[..], b"genuine");
    assert_eq!(m.expire(now + 3_600_001).await.unwrap(), 1);
    assert!(
        m.take(&to, 0, 100, now + 3_600_001)
            .await
            .unwrap()
            .is_empty()
    );
}
