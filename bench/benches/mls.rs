//! Criterion benchmarks of the MLS engine (`syncra_client::mls`, openmls 0.9), to set beside
//! the sealed envelope and Olm/Megolm of the `crypto` bench in the same run.
#![allow(missing_docs)] // criterion's macros and the helpers here are not API.
#![allow(clippy::unwrap_used)] // A benchmark that cannot set up should stop loudly.
//!
//! Run both with `cargo bench -p syncra-bench --bench crypto --bench mls`. Results and method
//! are recorded in `docs/BENCHMARKS.md`.
//!
//! Groups are built the realistic way unless a name says `sparse`: the creator adds members
//! one at a time and each new member updates its leaf at once, so every member has updated
//! its leaf and the ratchet tree is filled. A `sparse` group is one where everyone was added
//! in a single commit and nobody updated since: its tree has blank parents, so a commit must
//! encrypt to almost every leaf on its own. Fixtures are built lazily, only for the benches
//! the filter selects (the 1 000-member group takes about a minute).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use openmls_traits::signatures::Signer;
use openmls_traits::types::SignatureScheme;
use syncra_client::mls::{Conversation, IdentitySigner, Incoming, MemberKeyPackage, MlsIdentity};
use syncra_core::crypto::keys::IdentityKeyPair;
use syncra_core::id::UserId;

const BODY: [u8; 256] = [0x42; 256];

/// A group as bytes, so each measurement starts from the same state.
struct Fixture {
    alice: MlsIdentity,
    alice_state: Vec<u8>,
    bob: MlsIdentity,
    bob_state: Vec<u8>,
    /// Everyone, in the order they were added (alice first, bob second).
    members: Vec<UserId>,
}

impl Fixture {
    fn alice(&self) -> Conversation {
        Conversation::from_bytes(&self.alice_state, &self.alice).unwrap()
    }

    fn bob(&self) -> Conversation {
        Conversation::from_bytes(&self.bob_state, &self.bob).unwrap()
    }
}

fn identity() -> (IdentityKeyPair, MlsIdentity) {
    let key = IdentityKeyPair::generate();
    let mls = MlsIdentity::new(&key);
    (key, mls)
}

fn key_package(key: &IdentityKeyPair, mls: &MlsIdentity) -> MemberKeyPackage {
    MemberKeyPackage::from_bytes(&mls.key_package().unwrap().bytes, key.user_id()).unwrap()
}

fn expect_commit(incoming: Incoming) {
    assert!(matches!(incoming, Incoming::Commit { .. }));
}

/// `n` members, each added on its own and updating its leaf right after (filled tree).
fn filled(n: usize) -> Fixture {
    let (alice_key, alice) = identity();
    let mut a = alice.create_conversation().unwrap();
    let mut members = vec![alice_key.user_id()];
    let mut bob: Option<(MlsIdentity, Conversation)> = None;
    for _ in 1..n {
        let (key, mls) = identity();
        let added = a.add(&[key_package(&key, &mls)]).unwrap();
        a.commit_accepted().unwrap();
        if let Some((_, b)) = bob.as_mut() {
            expect_commit(b.process(&added.commit).unwrap());
        }
        let mut joined = mls.join(added.welcome.as_deref().unwrap()).unwrap();
        let update = joined.update().unwrap();
        joined.commit_accepted().unwrap();
        expect_commit(a.process(&update.commit).unwrap());
        if let Some((_, b)) = bob.as_mut() {
            expect_commit(b.process(&update.commit).unwrap());
        }
        members.push(key.user_id());
        if bob.is_none() {
            bob = Some((mls, joined));
        }
    }
    let (bob, b) = bob.expect("at least two members");
    Fixture {
        alice_state: a.to_bytes().to_vec(),
        alice,
        bob_state: b.to_bytes().to_vec(),
        bob,
        members,
    }
}

/// `n` members added in one commit, nobody updated since (sparse tree).
fn sparse(n: usize) -> Fixture {
    let (alice_key, alice) = identity();
    let mut a = alice.create_conversation().unwrap();
    let people: Vec<(IdentityKeyPair, MlsIdentity)> = (1..n).map(|_| identity()).collect();
    let packages: Vec<MemberKeyPackage> = people.iter().map(|(k, m)| key_package(k, m)).collect();
    let added = a.add(&packages).unwrap();
    a.commit_accepted().unwrap();
    let mut members = vec![alice_key.user_id()];
    members.extend(people.iter().map(|(k, _)| k.user_id()));
    let mut people = people.into_iter();
    let (_, bob) = people.next().unwrap();
    let b = bob.join(added.welcome.as_deref().unwrap()).unwrap();
    Fixture {
        alice_state: a.to_bytes().to_vec(),
        alice,
        bob_state: b.to_bytes().to_vec(),
        bob,
        members,
    }
}

/// Fixtures built on first use and kept for the rest of the run.
#[derive(Default)]
struct Fixtures {
    filled: HashMap<usize, Fixture>,
    sparse: HashMap<usize, Fixture>,
}

impl Fixtures {
    fn filled(&mut self, n: usize) -> &Fixture {
        self.filled.entry(n).or_insert_with(|| {
            let started = Instant::now();
            let f = filled(n);
            eprintln!(
                "built a filled group of {n} in {:.1?}; a member's state is {} bytes",
                started.elapsed(),
                f.bob_state.len()
            );
            f
        })
    }

    fn sparse(&mut self, n: usize) -> &Fixture {
        self.sparse.entry(n).or_insert_with(|| sparse(n))
    }
}

/// An MLS `SignContent` of 256 bytes of content.
fn sign_content() -> Vec<u8> {
    let label = b"MLS 1.0 FramedContentTBS";
    let mut payload = vec![u8::try_from(label.len()).unwrap()];
    payload.extend_from_slice(label);
    payload.extend_from_slice(&[0x41, 0x00]); // a two-byte varint length: 256
    payload.extend_from_slice(&BODY);
    payload
}

fn signers(c: &mut Criterion) {
    let mut group = c.benchmark_group("mls_signer");
    let key = IdentityKeyPair::generate();
    let payload = sign_content();
    let ours = IdentitySigner::new(&key);
    let basic = openmls_basic_credential::SignatureKeyPair::from_raw(
        SignatureScheme::ED25519,
        key.seed().to_vec(),
        key.public().to_vec(),
    );
    group.bench_function("identity_signer_sign_256B", |b| {
        b.iter(|| ours.sign(black_box(&payload)).unwrap())
    });
    group.bench_function("basic_credential_sign_256B", |b| {
        b.iter(|| basic.sign(black_box(&payload)).unwrap())
    });
    group.finish();
}

/// Encrypts `iters` messages (not timed), then times bob opening them in order.
fn time_decrypts(f: &Fixture, iters: u64) -> Duration {
    let mut a = f.alice();
    let mut b = f.bob();
    let messages: Vec<Vec<u8>> = (0..iters).map(|_| a.encrypt(&BODY).unwrap()).collect();
    let start = Instant::now();
    for m in &messages {
        black_box(b.process(m).unwrap());
    }
    start.elapsed()
}

fn messages(c: &mut Criterion, fx: &mut Fixtures) {
    let mut group = c.benchmark_group("mls_message");
    group.throughput(Throughput::Elements(1));
    // 1:1: a group of two, both sides in one iteration.
    group.bench_function("one_to_one_encrypt_decrypt_256B", |b| {
        let f = fx.filled(2);
        let (mut alice, mut bob) = (f.alice(), f.bob());
        b.iter(|| {
            let m = alice.encrypt(black_box(&BODY)).unwrap();
            bob.process(&m).unwrap()
        })
    });
    for n in [2usize, 10, 100, 1000] {
        group.bench_function(BenchmarkId::new("encrypt_256B", n), |b| {
            let mut alice = fx.filled(n).alice();
            b.iter(|| alice.encrypt(black_box(&BODY)).unwrap())
        });
        group.bench_function(BenchmarkId::new("decrypt_256B", n), |b| {
            let f = fx.filled(n);
            b.iter_custom(|iters| time_decrypts(f, iters))
        });
    }
    group.finish();
}

/// Which tree a commit benchmark runs on.
#[derive(Clone, Copy)]
enum Shape {
    Filled,
    Sparse,
}

impl Fixtures {
    fn get(&mut self, shape: Shape, n: usize) -> &Fixture {
        match shape {
            Shape::Filled => self.filled(n),
            Shape::Sparse => self.sparse(n),
        }
    }
}

fn commits(c: &mut Criterion, fx: &mut Fixtures) {
    let mut group = c.benchmark_group("mls_commit");
    group.sample_size(10);
    let (new_key, new_mls) = identity();
    let newcomer = key_package(&new_key, &new_mls);
    for (shape, name, n) in [
        (Shape::Filled, "filled", 10usize),
        (Shape::Filled, "filled", 100),
        (Shape::Filled, "filled", 1000),
        (Shape::Sparse, "sparse", 100),
        (Shape::Sparse, "sparse", 1000),
    ] {
        // The committer's cost: the commit (and for an add the Welcome), serialised. Every
        // iteration starts from the same state, restored outside the timing.
        group.bench_function(BenchmarkId::new(format!("add_one_create_{name}"), n), |b| {
            let f = fx.get(shape, n);
            b.iter_batched(
                || f.alice(),
                |mut a| a.add(std::slice::from_ref(&newcomer)).unwrap(),
                BatchSize::PerIteration,
            )
        });
        group.bench_function(
            BenchmarkId::new(format!("remove_one_create_{name}"), n),
            |b| {
                let f = fx.get(shape, n);
                let last = *f.members.last().unwrap();
                b.iter_batched(
                    || f.alice(),
                    |mut a| a.remove(&[last]).unwrap(),
                    BatchSize::PerIteration,
                )
            },
        );
        // Every other member's cost: process the commit and merge it.
        group.bench_function(
            BenchmarkId::new(format!("add_one_process_{name}"), n),
            |b| {
                let f = fx.get(shape, n);
                let commit = f
                    .alice()
                    .add(std::slice::from_ref(&newcomer))
                    .unwrap()
                    .commit;
                b.iter_batched(
                    || f.bob(),
                    |mut bob| bob.process(&commit).unwrap(),
                    BatchSize::PerIteration,
                )
            },
        );
        group.bench_function(
            BenchmarkId::new(format!("remove_one_process_{name}"), n),
            |b| {
                let f = fx.get(shape, n);
                let last = *f.members.last().unwrap();
                let commit = f.alice().remove(&[last]).unwrap().commit;
                b.iter_batched(
                    || f.bob(),
                    |mut bob| bob.process(&commit).unwrap(),
                    BatchSize::PerIteration,
                )
            },
        );
    }
    group.finish();
}

fn joins(c: &mut Criterion, fx: &mut Fixtures) {
    let mut group = c.benchmark_group("mls_join");
    group.sample_size(10);
    for n in [10usize, 100, 1000] {
        // Joining a group of n (the joiner is the n+1th) from a Welcome, with the tree in it.
        group.bench_function(BenchmarkId::new("from_welcome_filled", n), |b| {
            let f = fx.filled(n);
            let (key, mls) = identity();
            let package = key_package(&key, &mls);
            let store = mls.key_store_to_bytes();
            let welcome = f.alice().add(&[package]).unwrap().welcome.unwrap();
            b.iter_batched(
                || MlsIdentity::restore(&key, &store).unwrap(),
                |joiner| joiner.join(&welcome).unwrap(),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn state(c: &mut Criterion, fx: &mut Fixtures) {
    // What persisting costs: the client writes a conversation's state after every change.
    let mut group = c.benchmark_group("mls_state");
    for n in [2usize, 100, 1000] {
        group.bench_function(BenchmarkId::new("to_bytes", n), |b| {
            let f = fx.filled(n);
            let bob = f.bob();
            b.iter(|| bob.to_bytes())
        });
        group.bench_function(BenchmarkId::new("from_bytes", n), |b| {
            let f = fx.filled(n);
            b.iter(|| f.bob())
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut fx = Fixtures::default();
    signers(&mut c);
    messages(&mut c, &mut fx);
    commits(&mut c, &mut fx);
    joins(&mut c, &mut fx);
    state(&mut c, &mut fx);
    c.final_summary();
}
