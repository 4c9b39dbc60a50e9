//! Wire protocol: round trips for every frame (property-based) and a refusal for every kind of
//! bad input, each with its own error.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use bytes::Bytes;
use proptest::prelude::*;
use syncra_core::crypto::keys::SignedPrekey;
use syncra_core::error::WireError;
use syncra_core::id::{Handle, UserId};
use syncra_core::record::IdentityRecord;
use syncra_core::wire::{
    DEFAULT_MAX_FRAME, ErrorCode, Frame, Outcome, PROTOCOL_VERSION, RecipientOutcome,
};

fn user_id() -> impl Strategy<Value = UserId> {
    any::<[u8; 20]>().prop_map(UserId::from_bytes)
}

fn prekey() -> impl Strategy<Value = SignedPrekey> {
    (any::<[u8; 32]>(), any::<u64>(), any::<[u8; 64]>()).prop_map(
        |(public, created_at, signature)| SignedPrekey {
            public,
            created_at,
            signature,
        },
    )
}

fn handle() -> impl Strategy<Value = Handle> {
    "[a-z][a-z0-9_]{2,31}".prop_filter_map("reserved", |s| Handle::parse(&s).ok())
}

fn code() -> impl Strategy<Value = ErrorCode> {
    (1u16..40).prop_map(ErrorCode::from_u16)
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Delivered),
        Just(Outcome::Offline),
        code().prop_map(Outcome::Rejected),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (".{0,60}", any::<[u8; 32]>(), any::<u64>(), any::<u32>()).prop_map(
            |(relay_id, nonce, server_time_ms, max_frame)| Frame::Challenge {
                relay_id,
                nonce,
                server_time_ms,
                max_frame
            }
        ),
        (user_id(), ".{0,200}", any::<u64>()).prop_map(|(user_id, token, token_expires_ms)| {
            Frame::AuthOk {
                user_id,
                token,
                token_expires_ms,
            }
        }),
        (
            any::<u32>(),
            user_id(),
            handle(),
            any::<[u8; 32]>(),
            prekey()
        )
            .prop_map(|(request_id, user_id, handle, identity_key, prekey)| {
                Frame::Record {
                    request_id,
                    record: IdentityRecord {
                        user_id,
                        handle,
                        identity_key,
                        prekey,
                    },
                }
            }),
        any::<u32>().prop_map(|request_id| Frame::Ack { request_id }),
        (
            any::<u32>(),
            any::<[u8; 16]>(),
            proptest::collection::vec((user_id(), outcome()), 0..20)
        )
            .prop_map(|(request_id, message_id, outcomes)| Frame::SendResult {
                request_id,
                message_id,
                outcomes: outcomes
                    .into_iter()
                    .map(|(user_id, outcome)| RecipientOutcome { user_id, outcome })
                    .collect()
            }),
        bytes(600).prop_map(|envelope| Frame::Deliver { envelope }),
        (any::<u32>(), code(), ".{0,100}").prop_map(|(request_id, code, message)| {
            Frame::Error {
                request_id,
                code,
                message,
            }
        }),
        (".{0,32}", any::<[u8; 32]>(), prekey(), any::<[u8; 64]>()).prop_map(
            |(handle, identity_key, prekey, signature)| Frame::Register {
                handle,
                identity_key,
                prekey,
                signature
            }
        ),
        (user_id(), ".{0,64}", any::<[u8; 64]>()).prop_map(|(user_id, url, signature)| {
            Frame::Auth {
                user_id,
                url,
                signature,
            }
        }),
        ".{0,300}".prop_map(|token| Frame::Resume { token }),
        (any::<u32>(), ".{0,32}")
            .prop_map(|(request_id, handle)| Frame::LookupHandle { request_id, handle }),
        (any::<u32>(), user_id()).prop_map(|(request_id, user_id)| Frame::LookupId {
            request_id,
            user_id
        }),
        (any::<u32>(), prekey())
            .prop_map(|(request_id, prekey)| Frame::RotatePrekey { request_id, prekey }),
        (any::<u32>(), bytes(600)).prop_map(|(request_id, envelope)| Frame::Send {
            request_id,
            envelope
        }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (any::<u32>(), user_id(), any::<bool>(), key_package()).prop_map(
            |(request_id, user_id, last_resort, package)| Frame::KeyPackage {
                request_id,
                user_id,
                last_resort,
                package
            }
        ),
        (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(
            |(request_id, one_time, last_resort)| Frame::KeyPackages {
                request_id,
                one_time,
                last_resort
            }
        ),
        (
            any::<u32>(),
            proptest::option::of(key_package()),
            proptest::collection::vec(key_package(), 0..5)
        )
            .prop_map(|(request_id, last_resort, one_time)| {
                Frame::PublishKeyPackages {
                    request_id,
                    last_resort,
                    one_time,
                }
            }),
        (any::<u32>(), user_id()).prop_map(|(request_id, user_id)| Frame::ClaimKeyPackage {
            request_id,
            user_id
        }),
    ]
}

fn key_package() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 1..300).prop_map(Bytes::from)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_frame_round_trips(f in frame()) {
        let encoded = f.encode();
        let decoded = Frame::decode(&encoded, DEFAULT_MAX_FRAME).unwrap();
        prop_assert_eq!(decoded, f);
    }

    #[test]
    fn every_strict_prefix_is_refused_without_panic(f in frame()) {
        let encoded = f.encode();
        for cut in 0..encoded.len() {
            prop_assert!(Frame::decode(&encoded.slice(..cut), DEFAULT_MAX_FRAME).is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = Frame::decode(&Bytes::from(data), DEFAULT_MAX_FRAME);
    }

    /// The relay decodes with `decode_owned` (no second reference to the frame's buffer): it
    /// must give exactly what `decode` gives, for every frame, every prefix of one, a frame
    /// with bytes after it, and arbitrary bytes.
    #[test]
    fn decoding_by_value_gives_what_decoding_by_reference_gives(
        f in frame(),
        data in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let encoded = f.encode();
        let mut longer = encoded.to_vec();
        longer.push(0);
        let mut inputs: Vec<Bytes> = (0..=encoded.len()).map(|cut| encoded.slice(..cut)).collect();
        inputs.push(Bytes::from(longer));
        inputs.push(Bytes::from(data));
        for input in inputs {
            for max in [DEFAULT_MAX_FRAME, input.len().saturating_sub(1)] {
                let by_ref = Frame::decode(&input, max);
                let by_value = Frame::decode_owned(Bytes::copy_from_slice(&input), max);
                prop_assert_eq!(by_value, by_ref);
            }
        }
    }
}

fn check(input: &[u8], expect: WireError) {
    let got = Frame::decode(&Bytes::copy_from_slice(input), DEFAULT_MAX_FRAME);
    assert_eq!(got, Err(expect), "input {input:02x?}");
}

#[test]
fn truncated_frames_are_refused() {
    check(&[], WireError::Truncated("version"));
    check(&[PROTOCOL_VERSION], WireError::Truncated("type"));
    check(
        &[PROTOCOL_VERSION, 0x20, 0, 0],
        WireError::Truncated("nonce"),
    );
    // A Send that announces 100 envelope bytes and carries 3.
    check(
        &[PROTOCOL_VERSION, 0x16, 0, 0, 0, 1, 0, 0, 0, 100, 1, 2, 3],
        WireError::Truncated("envelope"),
    );
}

#[test]
fn oversized_frames_are_refused_before_decoding() {
    let big = Frame::Deliver {
        envelope: Bytes::from(vec![0u8; 2048]),
    }
    .encode();
    assert_eq!(
        Frame::decode(&big, 1024),
        Err(WireError::TooLarge {
            size: big.len(),
            max: 1024
        })
    );
}

#[test]
fn unknown_version_and_type_are_refused() {
    // The version after the current one (the current one is 2 since protocol v2).
    let next = PROTOCOL_VERSION + 1;
    check(
        &[next, 0x20, 0, 0, 0, 0, 0, 0, 0, 0],
        WireError::UnsupportedVersion(next),
    );
    // Version 1 (before logins signed the dialled URL) is refused, not misread.
    check(
        &[1, 0x20, 0, 0, 0, 0, 0, 0, 0, 0],
        WireError::UnsupportedVersion(1),
    );
    check(&[0, 0x20], WireError::UnsupportedVersion(0));
    check(&[PROTOCOL_VERSION, 0x7f], WireError::UnknownType(0x7f));
}

#[test]
fn trailing_bytes_are_refused() {
    let mut f = Frame::Ping { nonce: 1 }.encode().to_vec();
    f.push(0);
    check(&f, WireError::Trailing(1));
}

#[test]
fn invalid_fields_are_refused() {
    // A string that is not UTF-8.
    check(
        &[PROTOCOL_VERSION, 0x12, 0, 2, 0xff, 0xfe],
        WireError::Invalid {
            field: "token",
            why: "not UTF-8",
        },
    );
    // A token longer than the limit.
    let mut f = vec![PROTOCOL_VERSION, 0x12];
    f.extend_from_slice(&5000u16.to_be_bytes());
    f.extend(std::iter::repeat_n(b'a', 5000));
    check(
        &f,
        WireError::Invalid {
            field: "token",
            why: "too long",
        },
    );
    // An outcome count that claims more than is allowed.
    let mut f = vec![PROTOCOL_VERSION, 0x05, 0, 0, 0, 1];
    f.extend_from_slice(&[0u8; 16]);
    f.extend_from_slice(&u16::MAX.to_be_bytes());
    check(
        &f,
        WireError::Invalid {
            field: "outcome_count",
            why: "more outcomes than recipients allowed",
        },
    );
    // A publish with more KeyPackages than a frame may carry, and one with an empty package.
    let mut f = vec![PROTOCOL_VERSION, 0x19, 0, 0, 0, 1, 0, 0];
    f.extend_from_slice(&101u16.to_be_bytes());
    check(
        &f,
        WireError::Invalid {
            field: "count",
            why: "more KeyPackages than one frame may carry",
        },
    );
    let f = [PROTOCOL_VERSION, 0x19, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0];
    check(
        &f,
        WireError::Invalid {
            field: "one_time",
            why: "empty KeyPackage",
        },
    );
    // A KeyPackage longer than the directory keeps.
    let mut f = vec![PROTOCOL_VERSION, 0x19, 0, 0, 0, 1];
    f.extend_from_slice(&5000u16.to_be_bytes());
    check(
        &f,
        WireError::Invalid {
            field: "last_resort",
            why: "too long",
        },
    );
    // A flag that is neither 0 nor 1.
    let f = [PROTOCOL_VERSION, 0x0b, 0, 0, 0, 1, 0, 0, 0, 3, 2];
    check(
        &f,
        WireError::Invalid {
            field: "last_resort",
            why: "must be 0 or 1",
        },
    );
}

#[test]
fn envelope_bytes_are_shared_not_copied() {
    let frame = Frame::Send {
        request_id: 7,
        envelope: Bytes::from(vec![5u8; 1000]),
    }
    .encode();
    let inside = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
    for decoded in [
        Frame::decode(&frame, DEFAULT_MAX_FRAME),
        Frame::decode_owned(frame.clone(), DEFAULT_MAX_FRAME),
    ] {
        let Ok(Frame::Send { envelope, .. }) = decoded else {
            panic!("not a send: {decoded:?}");
        };
        assert!(inside.contains(&(envelope.as_ptr() as usize)));
        assert_eq!(envelope, vec![5u8; 1000]);
    }
}
