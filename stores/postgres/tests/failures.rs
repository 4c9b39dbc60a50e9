//! The store when things go wrong: Postgres going away and coming back, TLS that must not be
//! skipped, and a database password that must never show.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::time::{Duration, Instant};

use syncra_core::error::StoreError;
use syncra_core::redact::redact_url;
use syncra_core::{Health, IdentityStore};
use syncra_store_postgres::{PostgresConfig, PostgresStore, migrate};
use syncra_test_support::postgres::{DATABASE, PostgresServer, USER};
use syncra_test_support::{DEADLINE, test_identity, unique_name};

/// A failing call must come back within the acquire timeout (1 s here) plus slack for a
/// loaded machine; this bounds "quickly", it does not measure speed.
const FAIL_WITHIN: Duration = Duration::from_secs(6);

fn expect_unavailable<T: std::fmt::Debug>(
    what: &str,
    started: Instant,
    result: Result<T, StoreError>,
) -> String {
    let elapsed = started.elapsed();
    let Err(StoreError::Unavailable(message)) = result else {
        panic!("{what}: expected Unavailable while Postgres is down, got {result:?}");
    };
    assert!(
        elapsed < FAIL_WITHIN,
        "{what}: took {elapsed:?} to fail, expected under {FAIL_WITHIN:?}"
    );
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_fast_while_postgres_is_down_and_recover_when_it_returns() {
    let mut server = PostgresServer::start();
    let store = PostgresStore::connect(&PostgresConfig {
        acquire_timeout_secs: 1,
        ..PostgresConfig::new(server.url())
    })
    .await
    .unwrap();
    let (alice_key, _, alice) = test_identity(&unique_name("alice"));
    store.register(&alice).await.unwrap();
    assert_eq!(store.health().await, Health::Up);

    server.stop();
    let (_, _, bob) = test_identity(&unique_name("bob"));
    let newer = syncra_core::crypto::keys::PrekeySecret::generate(
        &alice_key,
        syncra_test_support::FIXTURE_PREKEY_CREATED_AT + 1,
    );
    let t = Instant::now();
    let message = expect_unavailable("by_id", t, store.by_id(&alice.user_id).await);
    assert!(message.contains("looking up a user id"), "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:{}", server.port())),
        "{message}"
    );
    let t = Instant::now();
    expect_unavailable("by_handle", t, store.by_handle(&alice.handle).await);
    let t = Instant::now();
    expect_unavailable("register", t, store.register(&bob).await);
    let t = Instant::now();
    expect_unavailable(
        "store_prekey",
        t,
        store.store_prekey(&alice.user_id, newer.signed()).await,
    );
    let t = Instant::now();
    expect_unavailable("delete", t, store.delete(&alice.user_id).await);
    let t = Instant::now();
    let health = store.health().await;
    assert!(t.elapsed() < FAIL_WITHIN, "health took {:?}", t.elapsed());
    let Health::Down(why) = health else {
        panic!("health must be down while Postgres is, got {health:?}");
    };
    // The diagnosis names the cause, not just a timeout.
    assert!(why.to_lowercase().contains("refused"), "{why}");

    server.restart();
    // The same store instance, no reconnect call: the pool must find its way back.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match store.health().await {
            Health::Up => break,
            other => assert!(
                Instant::now() < deadline,
                "health not up within {DEADLINE:?} of the restart: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        store.by_id(&alice.user_id).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(store.by_handle(&alice.handle).await.unwrap(), Some(alice));
    store.register(&bob).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_and_verified() {
    let server = PostgresServer::start_tls();
    let ca = server.ca_cert().unwrap().to_owned();
    let port = server.port();
    let config = |url: String| PostgresConfig {
        acquire_timeout_secs: 2,
        ..PostgresConfig::new(url)
    };

    // The server takes TLS only.
    let plain = format!("postgres://{USER}@127.0.0.1:{port}/{DATABASE}?sslmode=disable");
    let err = PostgresStore::connect(&config(plain))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("pg_hba.conf"), "{err}");

    // verify-full without our CA: the built-in roots do not know it.
    let err = PostgresStore::connect(&config(server.url()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // No sslmode on a name that is not loopback would mean verify-full; on localhost the
    // default is prefer, which takes TLS here without checking it.
    let bare = format!("postgres://{USER}@localhost:{port}/{DATABASE}");
    let store = PostgresStore::connect(&config(bare)).await.unwrap();
    assert_eq!(store.health().await, Health::Up);

    // require: encrypted, not verified (libpq's meaning), so it works without the CA.
    let require = format!("postgres://{USER}@localhost:{port}/{DATABASE}?sslmode=require");
    let store = PostgresStore::connect(&config(require)).await.unwrap();
    assert_eq!(store.health().await, Health::Up);

    // verify-full with the CA from the URL instead of the config.
    let in_url = format!("{}&sslrootcert={}", server.url(), ca.display());
    let store = PostgresStore::connect(&config(in_url)).await.unwrap();
    assert_eq!(store.health().await, Health::Up);

    // verify-full checks the name: the certificate is for localhost, not for 127.0.0.1, so
    // the same server by address fails verify-full and passes verify-ca (chain only).
    let by_address = |mode: &str| PostgresConfig {
        ssl_root_cert: Some(ca.clone()),
        ..config(format!(
            "postgres://{USER}@127.0.0.1:{port}/{DATABASE}?sslmode={mode}"
        ))
    };
    let err = PostgresStore::connect(&by_address("verify-full"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not valid for name"), "{err}");
    let store = PostgresStore::connect(&by_address("verify-ca"))
        .await
        .unwrap();
    assert_eq!(store.health().await, Health::Up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_shows() {
    // Trust authentication ignores the password, so a URL with one connects; every way the
    // store reports on itself must leave it out, as written and decoded.
    let mut server = PostgresServer::start();
    let password = "S3cret/p@ss word?#%";
    let encoded = "S3cret%2Fp%40ss%20word%3F%23%25";
    let url = format!(
        "postgres://{USER}:{encoded}@127.0.0.1:{}/{DATABASE}?sslmode=disable",
        server.port()
    );
    let config = PostgresConfig {
        acquire_timeout_secs: 1,
        migrate_url: Some(url.clone()),
        ..PostgresConfig::new(url.clone())
    };
    let leaks = |what: &str, text: &str| {
        for secret in [password, encoded, "S3cret"] {
            assert!(!text.contains(secret), "{what} shows the password: {text}");
        }
    };
    leaks("redact_url", &redact_url(&url));
    leaks("config Debug", &format!("{config:?}"));

    let store = PostgresStore::connect(&config).await.unwrap();
    leaks("store Debug", &format!("{store:?}"));
    let (_, _, alice) = test_identity(&unique_name("alice"));
    store.register(&alice).await.unwrap();

    server.stop();
    let err = store.by_id(&alice.user_id).await.unwrap_err();
    leaks("error", &format!("{err} {err:?}"));
    assert!(
        err.to_string().contains(&format!("{USER}:<redacted>@")),
        "{err}"
    );
    let err = store.register(&alice).await.unwrap_err();
    leaks("error", &format!("{err} {err:?}"));
    leaks("health", &format!("{:?}", store.health().await));
    let err = PostgresStore::connect(&config).await.unwrap_err();
    leaks("connect error", &format!("{err} {err:?}"));
    let err = migrate(&config).await.unwrap_err();
    leaks("migrate error", &format!("{err} {err:?}"));
}
