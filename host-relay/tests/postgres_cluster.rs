//! Two relay nodes on Postgres (the Neon path) and NATS: a user registered through one node
//! logs in through the other; when Postgres goes away, new logins and lookups fail with
//! `store_unavailable`, `/healthz` says so, established sessions keep relaying, and the pool
//! recovers by itself when Postgres returns.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::time::Duration;

use syncra_core::wire::{ErrorCode, Frame, Outcome};
use syncra_test_relay::{RawClient, TestRelay, TestUser};
use syncra_test_support::DEADLINE;
use syncra_test_support::postgres::PostgresServer;
use syncra_test_support::servers::NatsServer;

async fn node(pg: &str, nats: &str, key: &std::path::Path) -> TestRelay {
    let (pg, nats, key) = (pg.to_owned(), nats.to_owned(), key.to_path_buf());
    TestRelay::start(move |c| {
        c.store = serde_json::json!({
            "kind": "postgres",
            "url": pg,
            "acquire_timeout_secs": 1,
        });
        c.broker = serde_json::json!({ "kind": "nats", "url": nats });
        c.auth.token_key_file = key;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_across_nodes_and_through_an_outage() {
    let mut pg = PostgresServer::start();
    let nats = NatsServer::start();
    let shared = tempfile::tempdir().unwrap();
    let key = shared.path().join("token.key");
    let n1 = node(&pg.url(), &nats.url(), &key).await;
    let n2 = node(&pg.url(), &nats.url(), &key).await;

    let (a, b) = (TestUser::new("pa"), TestUser::new("pb"));
    a.register(n1.url()).await;
    b.register(n1.url()).await;
    // Registered through node 1, logging in through node 2.
    let mut ca = a.login(n2.url()).await;
    let mut cb = b.login(n1.url()).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let out = ca.send_envelope(1, a.seal(&[&b], b"via postgres")).await;
        if out[0].outcome == Outcome::Delivered {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cb.delivery().await;

    pg.stop();
    // New logins and lookups fail with a clear code...
    let mut fresh = RawClient::connect(n2.url()).await;
    let f = b.auth_frame(&fresh);
    fresh.send(&f).await;
    fresh.expect_error(ErrorCode::StoreUnavailable).await;
    ca.send(&Frame::LookupHandle {
        request_id: 7,
        handle: b.handle.clone(),
    })
    .await;
    ca.expect_error(ErrorCode::StoreUnavailable).await;
    let (status, body) = n2.admin_get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"store\":{\"status\":\"down\""), "{body}");
    // ...while established sessions keep relaying.
    let out = ca
        .send_envelope(2, a.seal(&[&b], b"during the outage"))
        .await;
    assert_eq!(out[0].outcome, Outcome::Delivered);
    loop {
        let env = cb.delivery().await;
        let opener = syncra_core::crypto::envelope::Opener {
            me: b.id(),
            prekeys: &b.ring,
            pinned: &|_| None,
        };
        let mut g = syncra_core::crypto::envelope::ReplayGuard::new(Default::default(), 8);
        if opener
            .open(&env, &mut g, syncra_core::now_ms())
            .unwrap()
            .body
            == b"during the outage"
        {
            break;
        }
    }

    // Postgres returns: the pool recovers without a restart.
    pg.restart();
    let deadline = tokio::time::Instant::now() + DEADLINE * 2;
    loop {
        let mut c = RawClient::connect(n2.url()).await;
        let f = b.auth_frame(&c);
        c.send(&f).await;
        match c.reply().await {
            Frame::AuthOk { .. } => break,
            Frame::Error {
                code: ErrorCode::StoreUnavailable,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = n2.admin_get("/healthz").await;
    assert_eq!(status, 200);
}
