//! The broker conformance suite on a real `redis-server` that this test starts: two broker
//! nodes on one server, as two relay nodes of a cluster would be.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use syncra_broker_redis::{RedisBroker, RedisConfig};
use syncra_core::Broker;
use syncra_test_support::servers::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_conforms() {
    let server = RedisServer::start();
    let config = RedisConfig::new(server.url());
    syncra_test_support::broker_conformance(|sink_a, sink_b| {
        let config = config.clone();
        async move {
            let a: Arc<dyn Broker> = Arc::new(RedisBroker::connect(&config, sink_a).await.unwrap());
            let b: Arc<dyn Broker> = Arc::new(RedisBroker::connect(&config, sink_b).await.unwrap());
            (a, b)
        }
    })
    .await;
}

/// The mailbox conformance suite on a real `redis-server` (Redis Streams), every case on one
/// server as a cluster shares one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_mailbox_conforms() {
    let server = RedisServer::start();
    let config = RedisConfig::new(server.url());
    syncra_test_support::mailbox_conformance(|limits| {
        let config = config.clone();
        async move {
            Arc::new(
                syncra_broker_redis::mailbox::RedisMailbox::connect(&config, limits)
                    .await
                    .unwrap(),
            ) as Arc<dyn syncra_core::Mailbox>
        }
    })
    .await;
}

/// Another client of the Redis server appends to a recipient's stream: an entry without the
/// plugin's fields, one with an id not of the form `<n>-0`, one without its time. Before, each
/// made every read of that recipient's mailbox fail (`Corrupt`); now reads skip them, the
/// plugin's own entries around them come out in order, and expiry removes them without
/// counting them against the recipient's usage. (The relay also refuses any entry it did not
/// MAC: `host-relay/src/sealed_mailbox.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_appended_by_others_are_skipped() {
    use syncra_core::mailbox::{Mailbox, MailboxLimits, PutOutcome};
    let server = RedisServer::start();
    let limits = MailboxLimits {
        ttl_ms: 60_000,
        max_entries: 10,
        max_bytes: 10_000,
    };
    let m = syncra_broker_redis::mailbox::RedisMailbox::connect(
        &RedisConfig::new(server.url()),
        limits,
    )
    .await
    .unwrap();
    let to = syncra_core::UserId::from_identity_key(&[3; 32]);
    let now = syncra_core::now_ms();
    let stored = |o| match o {
        PutOutcome::Stored(id) => id,
        PutOutcome::Full => panic!("full"),
    };
    let first = stored(
        m.put(&to, bytes::Bytes::from_static(b"one"), now)
            .await
            .unwrap(),
    );
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("syncra.mb.{{{to}}}");
    let mut append = async |id: &str, fields: &[&str]| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&key).arg(id).arg(fields);
        let _: String = cmd.query_async(&mut raw).await.unwrap();
    };
    append("1-5", &["d", "x", "t", "1"]).await;
    append("1-6", &["junk", "1"]).await;
    let second = stored(
        m.put(&to, bytes::Bytes::from_static(b"two"), now)
            .await
            .unwrap(),
    );
    // After the plugin's last entry, ids of its form: no `d` or `t`, a time that is no number.
    append("3-0", &["junk", "1"]).await;
    append("4-0", &["d", "x", "t", "soon"]).await;
    let taken = m.take(&to, 0, 100, now).await.unwrap();
    assert_eq!(
        taken
            .iter()
            .map(|e| (e.id, &e.delivery[..]))
            .collect::<Vec<_>>(),
        [(first, &b"one"[..]), (second, &b"two"[..])]
    );
    // Expiry removes the appended entries and frees exactly what the plugin's own held.
    assert_eq!(m.expire(now + 60_001).await.unwrap(), 2);
    let left: usize = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(left, 0);
    let entries: i64 = redis::cmd("HGET")
        .arg(format!("syncra.mbu.{{{to}}}"))
        .arg("entries")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(entries, 0);
}
