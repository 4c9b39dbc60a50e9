//! Criterion benchmarks of Syncra's envelope against its primitives and against Olm/Megolm.
#![allow(missing_docs)] // criterion_group! and criterion_main! generate undocumented items.
#![allow(clippy::unwrap_used)] // A benchmark that cannot set up should stop loudly.
//!
//! Run with `cargo bench -p syncra-bench --bench crypto`. Results and method are recorded in
//! `docs/BENCHMARKS.md`. The primitives' floor for one 1:1 message is one Ed25519 sign, one
//! Ed25519 verify and two X25519 operations (the HPKE encapsulation and decapsulation each do
//! one DH with the recipient's prekey; the sender's ephemeral key generation is a third
//! base-point multiplication, which the floor leaves out on purpose to stay a lower bound).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signer, SigningKey, Verifier};
use hpke::{Deserializable, Kem, OpModeS};
use syncra_core::crypto::envelope::{AcceptWindow, Opener, Recipient, ReplayGuard, seal};
use syncra_core::crypto::keys::{IdentityKeyPair, PrekeyRing, PrekeySecret};
use vodozemac::megolm::{GroupSession, InboundGroupSession, SessionConfig as MegolmConfig};
use vodozemac::olm::{Account, OlmMessage, SessionConfig};

const BODY: [u8; 256] = [0x42; 256];
const NOW: u64 = 1_800_000_000_000;

struct Person {
    id: IdentityKeyPair,
    ring: PrekeyRing,
}

fn person() -> Person {
    let id = IdentityKeyPair::generate();
    let ring = PrekeyRing::new(PrekeySecret::generate(&id, NOW / 1000));
    Person { id, ring }
}

fn recipients(people: &[Person]) -> Vec<Recipient> {
    people
        .iter()
        .map(|p| Recipient {
            user_id: p.id.user_id(),
            prekey: *p.ring.current().public(),
        })
        .collect()
}

fn envelope(c: &mut Criterion) {
    let sender = person();
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    for n in [1usize, 10, 100] {
        let people: Vec<Person> = (0..n).map(|_| person()).collect();
        let to = recipients(&people);
        group.bench_with_input(BenchmarkId::new("seal_256B", n), &to, |b, to| {
            b.iter(|| seal(&sender.id, black_box(to), black_box(&BODY), NOW).unwrap())
        });
        let sealed = seal(&sender.id, &to, &BODY, NOW).unwrap();
        // Opening costs the same for every recipient; measure the last one (worst position).
        let me = &people[n - 1];
        let opener = Opener {
            me: me.id.user_id(),
            prekeys: &me.ring,
            pinned: &|_| None,
        };
        group.bench_with_input(
            BenchmarkId::new("open_256B", n),
            &sealed.bytes,
            |b, bytes| {
                b.iter(|| {
                    // A fresh guard each time: we measure opening, not replay refusal.
                    let mut guard = ReplayGuard::new(AcceptWindow::default(), 4);
                    opener.open(black_box(bytes), &mut guard, NOW).unwrap()
                })
            },
        );
    }
    group.finish();
}

fn primitives(c: &mut Criterion) {
    let mut group = c.benchmark_group("primitives");
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let vk = key.verifying_key();
    let sig = key.sign(&BODY);
    group.bench_function("ed25519_sign_256B", |b| {
        b.iter(|| key.sign(black_box(&BODY)))
    });
    group.bench_function("ed25519_verify_256B", |b| {
        b.iter(|| vk.verify(black_box(&BODY), &sig).unwrap())
    });
    let a = x25519_dalek::StaticSecret::from([1u8; 32]);
    let b_pub = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([2u8; 32]));
    group.bench_function("x25519_dh", |b| {
        b.iter(|| a.diffie_hellman(black_box(&b_pub)))
    });
    type K = hpke::kem::X25519HkdfSha256;
    let pk = <K as Kem>::PublicKey::from_bytes(b_pub.as_bytes()).unwrap();
    group.bench_function("hpke_wrap_one_key", |b| {
        b.iter(|| {
            hpke::single_shot_seal::<hpke::aead::AesGcm256, hpke::kdf::HkdfSha256, K>(
                &OpModeS::Base,
                &pk,
                b"syncra/v1/wrap",
                black_box(&[0u8; 64]),
                &[],
            )
            .unwrap()
        })
    });
    group.finish();
}

fn olm(c: &mut Criterion) {
    // An established Olm session between two accounts, as vodozemac (Matrix) uses it.
    let alice = Account::new();
    let mut bob = Account::new();
    bob.generate_one_time_keys(1);
    let otk = *bob.one_time_keys().values().next().unwrap();
    bob.mark_keys_as_published();
    let mut a_session = alice
        .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
        .unwrap();
    let first = a_session.encrypt(BODY).unwrap();
    let OlmMessage::PreKey(pre) = first else {
        panic!("first message is a pre-key message")
    };
    let mut b_session = bob
        .create_inbound_session(SessionConfig::version_1(), alice.curve25519_key(), &pre)
        .unwrap()
        .session;

    let mut group = c.benchmark_group("olm");
    // One direction only: each message advances the symmetric chain (no DH ratchet step).
    group.bench_function("encrypt_decrypt_256B_chain_step", |b| {
        b.iter(|| {
            let m = a_session.encrypt(black_box(BODY)).unwrap();
            b_session.decrypt(&m).unwrap()
        })
    });
    // Alternating directions: every message starts a new DH ratchet step, the closest Olm
    // comes to a fresh key per message.
    group.bench_function("encrypt_decrypt_256B_ratchet_step", |b| {
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            if flip {
                let m = a_session.encrypt(black_box(BODY)).unwrap();
                b_session.decrypt(&m).unwrap()
            } else {
                let m = b_session.encrypt(black_box(BODY)).unwrap();
                a_session.decrypt(&m).unwrap()
            }
        })
    });
    group.finish();
}

fn megolm(c: &mut Criterion) {
    // Matrix's group ratchet: one outbound session, every member holds the inbound half. A
    // message is one AES-CBC + HMAC under a hash-ratchet key and one Ed25519 signature.
    let mut outbound = GroupSession::new(MegolmConfig::version_1());
    let mut inbound = InboundGroupSession::new(&outbound.session_key(), MegolmConfig::version_1());
    let mut group = c.benchmark_group("megolm");
    group.bench_function("encrypt_decrypt_256B", |b| {
        b.iter(|| {
            let m = outbound.encrypt(black_box(BODY));
            inbound.decrypt(&m).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, envelope, primitives, olm, megolm);
criterion_main!(benches);
