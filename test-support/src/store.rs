//! The [`IdentityStore`] conformance suite.
//!
//! Each case gets a fresh store from the caller's factory and uses handles made unique with
//! [`unique_name`], so the suite is correct both for a factory that makes an empty store per call
//! (SQLite in memory) and one that hands out the same database every time (a shared Postgres).

use std::future::Future;
use std::sync::Arc;

use syncra_core::crypto::keys::{IdentityKeyPair, PrekeySecret};
use syncra_core::error::{CryptoError, StoreError};
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
    health_is_up(make().await).await;
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
