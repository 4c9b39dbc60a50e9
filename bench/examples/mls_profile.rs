//! A fixed amount of MLS work, for instruction counts under callgrind (repeatable on a shared
//! machine, unlike wall time): builds a group of N members the way the `mls` bench does
//! (alice first, bob second, everyone added on their own and updating their leaf right after),
//! then has alice encrypt and bob process M 256-byte application messages, one after the other.
//!
//! ```sh
//! cargo build --profile bench -p syncra-bench --example mls_profile
//! valgrind --tool=callgrind target/release/examples/mls_profile 2 1000   # N = 2, M = 1 000
//! valgrind --tool=callgrind target/release/examples/mls_profile 2 0      # the set-up alone
//! ```
//!
//! The difference of the two totals, divided by M, is the instructions of one 1:1 message
//! encrypted and read. Results: docs/BENCHMARKS.md.
#![allow(clippy::unwrap_used)] // A measurement that cannot set up should stop loudly.

use std::hint::black_box;

use syncra_client::mls::{Conversation, Incoming, MemberKeyPackage, MlsIdentity};
use syncra_core::crypto::keys::IdentityKeyPair;

const BODY: [u8; 256] = [0x42; 256];

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

/// Alice and bob of a filled group of `n`.
fn filled(n: usize) -> (Conversation, Conversation) {
    let (_, alice) = identity();
    let mut a = alice.create_conversation().unwrap();
    let mut bob: Option<Conversation> = None;
    for _ in 1..n {
        let (key, mls) = identity();
        let added = a.add(&[key_package(&key, &mls)]).unwrap();
        a.commit_accepted().unwrap();
        if let Some(b) = bob.as_mut() {
            expect_commit(b.process(&added.commit).unwrap());
        }
        let mut joined = mls.join(added.welcome.as_deref().unwrap()).unwrap();
        let update = joined.update().unwrap();
        joined.commit_accepted().unwrap();
        expect_commit(a.process(&update.commit).unwrap());
        if let Some(b) = bob.as_mut() {
            expect_commit(b.process(&update.commit).unwrap());
        }
        if bob.is_none() {
            bob = Some(joined);
        }
    }
    (a, bob.expect("at least two members"))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(2, |a| a.parse().unwrap());
    let m: usize = args.next().map_or(1000, |a| a.parse().unwrap());
    let (mut alice, mut bob) = filled(n);
    for _ in 0..m {
        let message = alice.encrypt(black_box(&BODY)).unwrap();
        black_box(bob.process(&message).unwrap());
    }
}
