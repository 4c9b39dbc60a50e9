//! The identity store conformance suite on SQLite: in memory, on files, and on one database
//! shared by every case (the way a Postgres test database is used).
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use syncra_core::IdentityStore;
use syncra_store_sqlite::SqliteStore;
use syncra_test_support::{identity_store_conformance, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_store_conforms() {
    identity_store_conformance(|| async {
        Arc::new(SqliteStore::open_in_memory().await.unwrap()) as Arc<dyn IdentityStore>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    identity_store_conformance(|| {
        // A file per case, in a directory that does not exist yet.
        let path = root.join(unique_name("case")).join("identities.db");
        async move { Arc::new(SqliteStore::open(&path).await.unwrap()) as Arc<dyn IdentityStore> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shared_file_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn IdentityStore> = Arc::new(
        SqliteStore::open(&dir.path().join("shared.db"))
            .await
            .unwrap(),
    );
    identity_store_conformance(|| {
        let store = Arc::clone(&store);
        async move { store }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sqlite_mailbox_passes_the_mailbox_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU32::new(0);
    syncra_test_support::mailbox_conformance(|limits| {
        let path = dir.path().join(format!(
            "mailbox-{}.db",
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        async move {
            Arc::new(
                syncra_store_sqlite::mailbox::SqliteMailbox::open(&path, limits)
                    .await
                    .unwrap(),
            ) as Arc<dyn syncra_core::Mailbox>
        }
    })
    .await;
}
