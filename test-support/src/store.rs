//! The [`IdentityStore`] conformance suite.
//!
//! Each case gets a fresh store from the caller's factory and uses handles made unique with
//! [`unique_name`], so the suite is correct both for a factory that makes an empty store per call
//! (SQLite in memory) and one that hands out the same database every time (a shared Postgres).

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use syncra_core::carriage::{GROUP_ID_LEN, GroupId};
use syncra_core::crypto::keys::{IdentityKeyPair, PrekeySecret};
use syncra_core::error::{CryptoError, StoreError};
use syncra_core::store::{
    ClaimedKeyPackage, EpochAdvance, GroupState, KeyPackageStock, MAX_KEY_PACKAGE_LEN,
    MAX_KEY_PACKAGES,
};
use syncra_core::{Handle, Health, IdentityRecord, IdentityStore, UserId};

use crate::fixtures::{FIXTURE_PREKEY_CREATED_AT, test_identity, unique_name};

/// How many tasks race for one handle in the concurrency case.
const RACERS: usize = 16;

/// Runs every identity store rule against stores made by `make`.
///
/// `make` is called once per case. Run the suite on a multi-threaded runtime
/// (`#[tokio::test(flavor = "multi_thread")]`) so the race case really races.
///
/// # Panics
///
/// On the first rule the store breaks, naming the case.
pub async fn identity_store_conformance<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn IdentityStore>>,
{
    register_then_look_up(make().await).await;
    unknown_lookups_are_none(make().await).await;
    handle_taken_is_a_typed_error(make().await).await;
    second_handle_for_one_identity_is_refused(make().await).await;
    record_whose_id_is_not_its_key_is_refused(make().await).await;
    record_with_bad_prekey_signature_is_refused(make().await).await;
    newer_prekey_replaces_the_current_one(make().await).await;
    prekey_signed_by_another_identity_is_refused(make().await).await;
    older_prekey_is_stale(make().await).await;
    replacing_for_unknown_user_is_not_found(make().await).await;
    prekey_timestamps_round_trip_over_the_whole_range(make().await).await;
    delete_frees_the_handle(make().await).await;
    a_new_registration_has_a_new_generation(make().await).await;
    racing_registrations_have_exactly_one_winner(make().await).await;
    key_packages_are_claimed_once_oldest_first_then_last_resort(make().await).await;
    key_package_publishing_is_bounded_and_needs_a_user(make().await).await;
    racing_claims_never_share_a_key_package(make().await).await;
    deleting_a_user_deletes_their_key_packages(make().await).await;
    a_group_advances_one_epoch_per_commit(make().await).await;
    racing_commits_for_one_epoch_have_exactly_one_winner(make().await).await;
    health_is_up(make().await).await;
}

fn packages(tag: &str, n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(format!("{tag}-key-package-{i}")))
        .collect()
}

fn fresh_group() -> GroupId {
    let mut id = [0u8; GROUP_ID_LEN];
    syncra_core::crypto::fill_random(&mut id);
    GroupId(id)
}

async fn claim(store: &dyn IdentityStore, id: &UserId, case: &str) -> Option<ClaimedKeyPackage> {
    store
        .claim_key_package(id)
        .await
        .unwrap_or_else(|e| panic!("{case}: claim failed: {e}"))
}

async fn key_packages_are_claimed_once_oldest_first_then_last_resort(
    store: Arc<dyn IdentityStore>,
) {
    let case = "KeyPackages claimed once, oldest first, then the last resort";
    let (_, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    let id = &alice.user_id;
    assert_eq!(
        claim(&*store, id, case).await,
        None,
        "{case}: nothing published yet"
    );
    let first = packages("first", 2);
    let last_resort = Bytes::from_static(b"last resort");
    let stock = store
        .publish_key_packages(id, &first, Some(&last_resort))
        .await
        .unwrap_or_else(|e| panic!("{case}: publish failed: {e}"));
    assert_eq!(
        stock,
        KeyPackageStock {
            one_time: 2,
            last_resort: true
        },
        "{case}"
    );
    let more = packages("more", 1);
    let stock = store
        .publish_key_packages(id, &more, None)
        .await
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(stock.one_time, 3, "{case}: publishing adds to what is held");
    for expected in first.iter().chain(&more) {
        assert_eq!(
            claim(&*store, id, case).await,
            Some(ClaimedKeyPackage {
                package: expected.clone(),
                last_resort: false
            }),
            "{case}: one-time packages come out in the order published"
        );
    }
    for _ in 0..2 {
        assert_eq!(
            claim(&*store, id, case).await,
            Some(ClaimedKeyPackage {
                package: last_resort.clone(),
                last_resort: true
            }),
            "{case}: the last-resort package is handed out, and kept, once the rest are gone"
        );
    }
    let replaced = Bytes::from_static(b"new last resort");
    store
        .publish_key_packages(id, &[], Some(&replaced))
        .await
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(
        claim(&*store, id, case).await.map(|c| c.package),
        Some(replaced),
        "{case}: publishing a last-resort package replaces the old one"
    );
    assert_eq!(
        store
            .key_package_stock(id)
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        KeyPackageStock {
            one_time: 0,
            last_resort: true
        },
        "{case}"
    );
}

async fn key_package_publishing_is_bounded_and_needs_a_user(store: Arc<dyn IdentityStore>) {
    let case = "KeyPackage publishing is bounded";
    let (_, _, nobody) = fresh("nobody");
    let err = store
        .publish_key_packages(&nobody.user_id, &packages("x", 1), None)
        .await;
    assert!(
        matches!(err, Err(StoreError::NotFound(id)) if id == nobody.user_id),
        "{case}: an unknown user must be NotFound, got {err:?}"
    );
    let (_, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    let id = &alice.user_id;
    store
        .publish_key_packages(id, &packages("a", MAX_KEY_PACKAGES - 1), None)
        .await
        .unwrap_or_else(|e| panic!("{case}: publishing up to the limit failed: {e}"));
    let err = store
        .publish_key_packages(id, &packages("b", 2), None)
        .await;
    assert!(
        matches!(err, Err(StoreError::KeyPackagesFull { max }) if max == MAX_KEY_PACKAGES),
        "{case}: beyond the limit must be KeyPackagesFull, got {err:?}"
    );
    assert_eq!(
        store
            .key_package_stock(id)
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"))
            .one_time as usize,
        MAX_KEY_PACKAGES - 1,
        "{case}: a refused publish stores nothing"
    );
    for bad in [
        Bytes::new(),
        Bytes::from(vec![7u8; MAX_KEY_PACKAGE_LEN + 1]),
    ] {
        let err = store.publish_key_packages(id, &[], Some(&bad)).await;
        assert!(
            matches!(err, Err(StoreError::BadKeyPackage { .. })),
            "{case}: a {}-byte package must be BadKeyPackage, got {err:?}",
            bad.len()
        );
    }
}

async fn racing_claims_never_share_a_key_package(store: Arc<dyn IdentityStore>) {
    let case = "racing claims";
    let (_, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    let published = packages("race", RACERS / 2);
    store
        .publish_key_packages(&alice.user_id, &published, Some(&Bytes::from_static(b"lr")))
        .await
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let start = Arc::new(tokio::sync::Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|_| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            let id = alice.user_id;
            tokio::spawn(async move {
                start.wait().await;
                store.claim_key_package(&id).await
            })
        })
        .collect();
    let mut one_time = Vec::new();
    let mut last_resort = 0;
    for task in tasks {
        match tokio::time::timeout(crate::DEADLINE, task)
            .await
            .unwrap_or_else(|_| panic!("{case}: a claim did not finish in time"))
            .unwrap_or_else(|e| panic!("{case}: a claim task panicked: {e}"))
        {
            Ok(Some(c)) if c.last_resort => last_resort += 1,
            Ok(Some(c)) => one_time.push(c.package),
            other => panic!("{case}: expected a package, got {other:?}"),
        }
    }
    one_time.sort();
    let mut expected = published.clone();
    expected.sort();
    assert_eq!(
        one_time, expected,
        "{case}: every one-time package must be handed out exactly once"
    );
    assert_eq!(last_resort, RACERS - published.len(), "{case}");
}

async fn deleting_a_user_deletes_their_key_packages(store: Arc<dyn IdentityStore>) {
    let case = "delete takes the KeyPackages";
    let (_, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    store
        .publish_key_packages(
            &alice.user_id,
            &packages("d", 3),
            Some(&Bytes::from_static(b"lr")),
        )
        .await
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    assert!(
        store
            .delete(&alice.user_id)
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        "{case}"
    );
    register_ok(&*store, &alice, case).await;
    assert_eq!(
        store
            .key_package_stock(&alice.user_id)
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        KeyPackageStock::default(),
        "{case}: packages of a deleted registration must not outlive it"
    );
    assert_eq!(claim(&*store, &alice.user_id, case).await, None, "{case}");
}

async fn a_group_advances_one_epoch_per_commit(store: Arc<dyn IdentityStore>) {
    let case = "one epoch per commit";
    let group = fresh_group();
    let (_, _, alice) = fresh("alice");
    let (_, _, bob) = fresh("bob");
    let members = vec![alice.user_id, bob.user_id];
    let read = |store: Arc<dyn IdentityStore>| async move {
        store
            .group(&group)
            .await
            .unwrap_or_else(|e| panic!("{case}: reading the group failed: {e}"))
    };
    assert_eq!(
        read(Arc::clone(&store)).await,
        None,
        "{case}: unknown group"
    );
    assert_eq!(
        store
            .advance_group(&group, 3, &members, &[3; 16])
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        EpochAdvance::Conflict { current: None },
        "{case}: an unknown group starts at epoch 0"
    );
    assert_eq!(
        store
            .advance_group(&group, 0, &members[..1], &[1; 16])
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        EpochAdvance::Advanced,
        "{case}: the first commit creates the group"
    );
    assert_eq!(
        read(Arc::clone(&store)).await,
        Some(GroupState {
            epoch: 1,
            members: members[..1].to_vec(),
            last_commit: [1; 16],
        }),
        "{case}"
    );
    assert_eq!(
        store
            .advance_group(&group, 0, &members, &[4; 16])
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        EpochAdvance::Conflict { current: Some(1) },
        "{case}: a second commit for a left epoch loses"
    );
    assert_eq!(
        store
            .advance_group(&group, 1, &members, &[2; 16])
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        EpochAdvance::Advanced,
        "{case}"
    );
    assert_eq!(
        read(Arc::clone(&store)).await,
        Some(GroupState {
            epoch: 2,
            members: members.clone(),
            last_commit: [2; 16],
        }),
        "{case}: the winning commit's members are kept"
    );
    assert_eq!(
        store
            .advance_group(&group, 7, &members, &[7; 16])
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        EpochAdvance::Conflict { current: Some(2) },
        "{case}: a commit from the future loses too"
    );
    assert_eq!(
        store
            .advance_group(&group, u64::MAX, &members, &[8; 16])
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        EpochAdvance::Conflict { current: Some(2) },
        "{case}: the largest epoch is refused, not an error"
    );
}

async fn racing_commits_for_one_epoch_have_exactly_one_winner(store: Arc<dyn IdentityStore>) {
    let case = "racing commits";
    let group = fresh_group();
    store
        .advance_group(&group, 0, &[], &[0; 16])
        .await
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let start = Arc::new(tokio::sync::Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                let (_, _, member) = test_identity(&format!("member{i}"));
                start.wait().await;
                let commit = [i as u8; 16];
                let result = store
                    .advance_group(&group, 1, &[member.user_id], &commit)
                    .await;
                let member = (member.user_id, commit);
                (member, result)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (who, result) = tokio::time::timeout(crate::DEADLINE, task)
            .await
            .unwrap_or_else(|_| panic!("{case}: a commit did not finish in time"))
            .unwrap_or_else(|e| panic!("{case}: a commit task panicked: {e}"));
        match result {
            Ok(EpochAdvance::Advanced) => winners.push(who),
            Ok(EpochAdvance::Conflict { current: Some(2) }) => {}
            other => panic!("{case}: expected Advanced or Conflict at 2, got {other:?}"),
        }
    }
    let [(winner, commit)] = winners[..] else {
        panic!(
            "{case}: exactly one commit may win an epoch, {} did",
            winners.len()
        );
    };
    assert_eq!(
        store
            .group(&group)
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}")),
        Some(GroupState {
            epoch: 2,
            members: vec![winner],
            last_commit: commit,
        }),
        "{case}: the group holds the winner's members"
    );
}

/// A fixture identity under a handle no other case uses.
fn fresh(base: &str) -> (IdentityKeyPair, PrekeySecret, IdentityRecord) {
    test_identity(&unique_name(base))
}

async fn lookup_handle(store: &dyn IdentityStore, handle: &Handle) -> Option<IdentityRecord> {
    store
        .by_handle(handle)
        .await
        .unwrap_or_else(|e| panic!("by_handle({handle}) failed: {e}"))
}

async fn lookup_id(store: &dyn IdentityStore, id: &UserId) -> Option<IdentityRecord> {
    store
        .by_id(id)
        .await
        .unwrap_or_else(|e| panic!("by_id({id}) failed: {e}"))
}

async fn register_ok(store: &dyn IdentityStore, record: &IdentityRecord, case: &str) {
    store
        .register(record)
        .await
        .unwrap_or_else(|e| panic!("{case}: registering {} failed: {e}", record.handle));
}

async fn register_then_look_up(store: Arc<dyn IdentityStore>) {
    let case = "register then look up";
    let (_, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    assert_eq!(
        lookup_handle(&*store, &alice.handle).await.as_ref(),
        Some(&alice),
        "{case}: by_handle must return the registered record unchanged"
    );
    assert_eq!(
        lookup_id(&*store, &alice.user_id).await.as_ref(),
        Some(&alice),
        "{case}: by_id must return the registered record unchanged"
    );
}

async fn unknown_lookups_are_none(store: Arc<dyn IdentityStore>) {
    let case = "unknown lookups";
    let (_, _, nobody) = fresh("nobody");
    assert_eq!(
        lookup_handle(&*store, &nobody.handle).await,
        None,
        "{case}: an unregistered handle must be None, not an error"
    );
    assert_eq!(
        lookup_id(&*store, &nobody.user_id).await,
        None,
        "{case}: an unregistered id must be None, not an error"
    );
    let deleted = store
        .delete(&nobody.user_id)
        .await
        .unwrap_or_else(|e| panic!("{case}: delete failed: {e}"));
    assert!(
        !deleted,
        "{case}: deleting an unknown user must return false"
    );
}

async fn handle_taken_is_a_typed_error(store: Arc<dyn IdentityStore>) {
    let case = "handle taken";
    let (_, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    let (_, _, mut mallory) = test_identity("mallory");
    mallory.handle = alice.handle.clone();
    let err = store.register(&mallory).await;
    assert!(
        matches!(&err, Err(StoreError::HandleTaken(h)) if h == alice.handle.as_str()),
        "{case}: expected HandleTaken({:?}), got {err:?}",
        alice.handle.as_str()
    );
    assert_eq!(
        lookup_handle(&*store, &alice.handle).await.as_ref(),
        Some(&alice),
        "{case}: the first owner must keep the handle"
    );
    assert_eq!(
        lookup_id(&*store, &mallory.user_id).await,
        None,
        "{case}: the refused identity must not be stored"
    );
}

async fn second_handle_for_one_identity_is_refused(store: Arc<dyn IdentityStore>) {
    let case = "second handle for one identity";
    let (_, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    let mut again = alice.clone();
    again.handle = Handle::parse(&unique_name("alice_two")).expect("fixture handle is valid");
    let err = store.register(&again).await;
    assert!(
        matches!(&err, Err(StoreError::AlreadyRegistered(id)) if *id == alice.user_id),
        "{case}: expected AlreadyRegistered({}), got {err:?}",
        alice.user_id
    );
    assert_eq!(
        lookup_handle(&*store, &again.handle).await,
        None,
        "{case}: the second handle must stay free"
    );
    assert_eq!(
        lookup_id(&*store, &alice.user_id).await.as_ref(),
        Some(&alice),
        "{case}: the first registration must be unchanged"
    );
}

async fn record_whose_id_is_not_its_key_is_refused(store: Arc<dyn IdentityStore>) {
    let case = "id does not match key";
    let (_, _, alice) = fresh("alice");
    let (_, _, mallory) = fresh("mallory");
    // Mallory's key and prekey under Alice's id: a relay must not let anyone claim an id whose
    // key they do not hold.
    let forged = IdentityRecord {
        user_id: alice.user_id,
        ..mallory
    };
    let err = store.register(&forged).await;
    assert!(
        matches!(
            &err,
            Err(StoreError::Invalid(CryptoError::IdKeyMismatch { .. }))
        ),
        "{case}: expected Invalid(IdKeyMismatch), got {err:?}"
    );
    assert_eq!(
        lookup_handle(&*store, &forged.handle).await,
        None,
        "{case}: a refused record must not be stored"
    );
    assert_eq!(
        lookup_id(&*store, &alice.user_id).await,
        None,
        "{case}: a refused record must not be stored"
    );
}

async fn record_with_bad_prekey_signature_is_refused(store: Arc<dyn IdentityStore>) {
    let case = "bad prekey signature";
    let (_, _, alice) = fresh("alice");
    let (mallory, _, _) = fresh("mallory");

    let mut signed_by_other = alice.clone();
    signed_by_other.prekey = PrekeySecret::generate(&mallory, FIXTURE_PREKEY_CREATED_AT)
        .signed()
        .clone();
    let mut redated = alice.clone();
    redated.prekey.created_at += 1;

    for (what, record) in [
        ("signed by another identity", signed_by_other),
        ("re-dated after signing", redated),
    ] {
        let err = store.register(&record).await;
        assert!(
            matches!(
                &err,
                Err(StoreError::Invalid(CryptoError::BadPrekeySignature))
            ),
            "{case} ({what}): expected Invalid(BadPrekeySignature), got {err:?}"
        );
        assert_eq!(
            lookup_id(&*store, &record.user_id).await,
            None,
            "{case} ({what}): a refused record must not be stored"
        );
    }
}

async fn newer_prekey_replaces_the_current_one(store: Arc<dyn IdentityStore>) {
    let case = "newer prekey";
    let (alice_key, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    let newer = PrekeySecret::generate(&alice_key, FIXTURE_PREKEY_CREATED_AT + 3600);
    store
        .replace_prekey(&alice.user_id, newer.signed())
        .await
        .unwrap_or_else(|e| panic!("{case}: replace_prekey failed: {e}"));
    let expected = IdentityRecord {
        prekey: newer.signed().clone(),
        ..alice.clone()
    };
    assert_eq!(
        lookup_id(&*store, &alice.user_id).await.as_ref(),
        Some(&expected),
        "{case}: by_id must show the new prekey"
    );
    assert_eq!(
        lookup_handle(&*store, &alice.handle).await.as_ref(),
        Some(&expected),
        "{case}: by_handle must show the new prekey"
    );
}

async fn prekey_signed_by_another_identity_is_refused(store: Arc<dyn IdentityStore>) {
    let case = "prekey signed by another identity";
    let (_, _, alice) = fresh("alice");
    let (mallory, _, _) = fresh("mallory");
    register_ok(&*store, &alice, case).await;
    let foreign = PrekeySecret::generate(&mallory, FIXTURE_PREKEY_CREATED_AT + 3600);
    let err = store.replace_prekey(&alice.user_id, foreign.signed()).await;
    assert!(
        matches!(
            &err,
            Err(StoreError::Invalid(CryptoError::BadPrekeySignature))
        ),
        "{case}: expected Invalid(BadPrekeySignature), got {err:?}"
    );
    assert_eq!(
        lookup_id(&*store, &alice.user_id).await.as_ref(),
        Some(&alice),
        "{case}: the stored prekey must be unchanged"
    );
}

async fn older_prekey_is_stale(store: Arc<dyn IdentityStore>) {
    let case = "older prekey";
    let (alice_key, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    let older = PrekeySecret::generate(&alice_key, FIXTURE_PREKEY_CREATED_AT - 1);
    let err = store.replace_prekey(&alice.user_id, older.signed()).await;
    assert!(
        matches!(&err, Err(StoreError::StalePrekey)),
        "{case}: expected StalePrekey, got {err:?}"
    );
    assert_eq!(
        lookup_id(&*store, &alice.user_id).await.as_ref(),
        Some(&alice),
        "{case}: the stored prekey must be unchanged"
    );
}

async fn replacing_for_unknown_user_is_not_found(store: Arc<dyn IdentityStore>) {
    let case = "replace for unknown user";
    let (ghost_key, _, ghost) = fresh("ghost");
    let prekey = PrekeySecret::generate(&ghost_key, FIXTURE_PREKEY_CREATED_AT + 1);
    let err = store.replace_prekey(&ghost.user_id, prekey.signed()).await;
    assert!(
        matches!(&err, Err(StoreError::NotFound(id)) if *id == ghost.user_id),
        "{case}: expected NotFound({}), got {err:?}",
        ghost.user_id
    );
    // The raw method has the same contract, for callers that verified elsewhere.
    let err = store.store_prekey(&ghost.user_id, prekey.signed()).await;
    assert!(
        matches!(&err, Err(StoreError::NotFound(id)) if *id == ghost.user_id),
        "{case}: store_prekey: expected NotFound({}), got {err:?}",
        ghost.user_id
    );
    assert_eq!(
        lookup_id(&*store, &ghost.user_id).await,
        None,
        "{case}: replacing a prekey must not create a user"
    );
}

async fn prekey_timestamps_round_trip_over_the_whole_range(store: Arc<dyn IdentityStore>) {
    // Prekey times are u64 in the contract; a store on a signed 64-bit column must not lose or
    // refuse the upper half.
    let case = "prekey timestamp range";
    for created_at in [0, u64::from(u32::MAX) + 1, 1 << 63, u64::MAX] {
        let identity = IdentityKeyPair::generate();
        let prekey = PrekeySecret::generate(&identity, created_at);
        let record = IdentityRecord {
            user_id: identity.user_id(),
            handle: Handle::parse(&unique_name("time")).expect("fixture handle is valid"),
            identity_key: identity.public(),
            prekey: prekey.signed().clone(),
        };
        register_ok(&*store, &record, case).await;
        assert_eq!(
            lookup_id(&*store, &record.user_id).await.as_ref(),
            Some(&record),
            "{case}: created_at {created_at} must round-trip"
        );
    }
}

/// Tokens name the generation: deleting a user and registering the same identity again must
/// change it, or a token issued before the deletion would still resume.
async fn a_new_registration_has_a_new_generation(store: Arc<dyn IdentityStore>) {
    let case = "generation";
    let (_, _, alice) = fresh("alice");
    let generation = |store: Arc<dyn IdentityStore>, id: UserId| async move {
        store
            .generation(&id)
            .await
            .unwrap_or_else(|e| panic!("{case}: reading the generation failed: {e}"))
    };
    assert_eq!(
        generation(store.clone(), alice.user_id).await,
        None,
        "{case}: an unknown user has no generation"
    );
    register_ok(&*store, &alice, case).await;
    let first = generation(store.clone(), alice.user_id)
        .await
        .unwrap_or_else(|| panic!("{case}: a registered user must have a generation"));
    assert_eq!(
        generation(store.clone(), alice.user_id).await,
        Some(first),
        "{case}: the generation must be stable while the user stays registered"
    );
    let (_, _, bob) = fresh("bob");
    register_ok(&*store, &bob, case).await;
    assert_ne!(
        generation(store.clone(), bob.user_id).await,
        Some(first),
        "{case}: two users must not share a generation"
    );
    assert!(
        store.delete(&alice.user_id).await.unwrap_or(false),
        "{case}"
    );
    assert_eq!(
        generation(store.clone(), alice.user_id).await,
        None,
        "{case}: a deleted user has no generation"
    );
    register_ok(&*store, &alice, case).await;
    let second = generation(store.clone(), alice.user_id).await;
    assert!(
        second.is_some() && second != Some(first),
        "{case}: registering again must give a new generation ({first} then {second:?})"
    );
}

async fn delete_frees_the_handle(store: Arc<dyn IdentityStore>) {
    let case = "delete";
    let (_, _, alice) = fresh("alice");
    register_ok(&*store, &alice, case).await;
    let first = store
        .delete(&alice.user_id)
        .await
        .unwrap_or_else(|e| panic!("{case}: first delete failed: {e}"));
    assert!(first, "{case}: deleting a registered user must return true");
    let second = store
        .delete(&alice.user_id)
        .await
        .unwrap_or_else(|e| panic!("{case}: second delete failed: {e}"));
    assert!(!second, "{case}: deleting again must return false");
    assert_eq!(lookup_id(&*store, &alice.user_id).await, None, "{case}");
    assert_eq!(lookup_handle(&*store, &alice.handle).await, None, "{case}");

    let (_, _, mut bob) = test_identity("bob");
    bob.handle = alice.handle.clone();
    register_ok(&*store, &bob, case).await;
    assert_eq!(
        lookup_handle(&*store, &alice.handle).await.as_ref(),
        Some(&bob),
        "{case}: a deleted user's handle must be free for someone else"
    );
}

async fn racing_registrations_have_exactly_one_winner(store: Arc<dyn IdentityStore>) {
    let case = "racing registrations";
    let handle = Handle::parse(&unique_name("race")).expect("fixture handle is valid");
    // Records are made before the start line so the tasks race on the store, not on key
    // generation.
    let records: Vec<IdentityRecord> = (0..RACERS)
        .map(|_| {
            let (_, _, mut record) = test_identity("racer");
            record.handle = handle.clone();
            record
        })
        .collect();
    let start = Arc::new(tokio::sync::Barrier::new(RACERS));
    let tasks: Vec<_> = records
        .iter()
        .cloned()
        .map(|record| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                let result = store.register(&record).await;
                (record.user_id, result)
            })
        })
        .collect();

    let mut winners = Vec::new();
    let mut taken = 0;
    for task in tasks {
        let (id, result) = tokio::time::timeout(crate::DEADLINE, task)
            .await
            .unwrap_or_else(|_| panic!("{case}: a registration did not finish in time"))
            .unwrap_or_else(|e| panic!("{case}: a registration task panicked: {e}"));
        match result {
            Ok(()) => winners.push(id),
            Err(StoreError::HandleTaken(h)) if h == handle.as_str() => taken += 1,
            Err(e) => panic!("{case}: expected Ok or HandleTaken, got {e:?}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "{case}: exactly one of {RACERS} racing registrations must win"
    );
    assert_eq!(
        taken,
        RACERS - 1,
        "{case}: every loser must get HandleTaken"
    );
    let stored = lookup_handle(&*store, &handle)
        .await
        .unwrap_or_else(|| panic!("{case}: the winner's record is missing"));
    assert_eq!(
        stored.user_id, winners[0],
        "{case}: the stored record must be the winner's"
    );
    for record in records.iter().filter(|r| r.user_id != winners[0]) {
        assert_eq!(
            lookup_id(&*store, &record.user_id).await,
            None,
            "{case}: a loser must not be stored"
        );
    }
}

async fn health_is_up(store: Arc<dyn IdentityStore>) {
    let health = store.health().await;
    assert_eq!(health, Health::Up, "health: a fresh store must be up");
    assert!(!store.kind().is_empty(), "kind: must not be empty");
}
