//! The identity store conformance suite on real Postgres servers: plain TCP, TLS with
//! `sslmode=verify-full` against a private CA (the way Neon is reached), and with named
//! prepared statements switched on. Each server is started by the test and has one database
//! shared by every case, as a relay cluster shares one.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use syncra_core::IdentityStore;
use syncra_store_postgres::{PostgresConfig, PostgresStore};
use syncra_test_support::identity_store_conformance;
use syncra_test_support::postgres::PostgresServer;

/// Runs the suite with a new store (pool) per case, all on one database.
async fn conforms(config: PostgresConfig) {
    identity_store_conformance(|| {
        let config = config.clone();
        async move { Arc::new(PostgresStore::connect(&config).await.unwrap()) as Arc<dyn IdentityStore> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_store_conforms() {
    let server = PostgresServer::start();
    conforms(PostgresConfig::new(server.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_store_conforms() {
    let server = PostgresServer::start_tls();
    assert!(
        server.url().contains("sslmode=verify-full"),
        "{}",
        server.url()
    );
    conforms(PostgresConfig {
        ssl_root_cert: Some(server.ca_cert().unwrap().to_owned()),
        ..PostgresConfig::new(server.url())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shared_store_with_prepared_statements_conforms() {
    let server = PostgresServer::start();
    let store: Arc<dyn IdentityStore> = Arc::new(
        PostgresStore::connect(&PostgresConfig {
            prepared_statements: true,
            ..PostgresConfig::new(server.url())
        })
        .await
        .unwrap(),
    );
    identity_store_conformance(|| {
        let store = Arc::clone(&store);
        async move { store }
    })
    .await;
}

/// The mailbox conformance suite on a real Postgres: every case on one database, as a cluster
/// shares one (each case uses recipients of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_mailbox_conforms() {
    let server = PostgresServer::start();
    let config = PostgresConfig::new(server.url());
    syncra_test_support::mailbox_conformance(|limits| {
        let config = config.clone();
        async move {
            Arc::new(
                syncra_store_postgres::mailbox::PostgresMailbox::connect(&config, limits)
                    .await
                    .unwrap(),
            ) as Arc<dyn syncra_core::Mailbox>
        }
    })
    .await;
}
