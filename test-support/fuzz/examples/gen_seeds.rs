//! Writes the seed corpora of the fuzz targets added with it (`envelope_open`, `keyfile`,
//! `history_line`, `relay_session`) into `corpus/<target>/`.
//!
//! ```text
//! cd test-support/fuzz && cargo run --example gen_seeds --no-default-features -- corpus
//! ```
//!
//! Seeds are small, named by what they exercise, and deterministic where the API allows it
//! (fresh randomness goes into wraps and nonces, so regenerated envelope seeds differ in bytes
//! but exercise the same paths).

use std::fs;
use std::path::{Path, PathBuf};

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use rand::{Rng, RngExt};
use syncra_core::crypto::envelope::{Recipient, forge, seal_with_rng};
use syncra_core::crypto::keyfile::{KdfParams, UnlockedKeyFile};
use syncra_core::crypto::keys::IdentityKeyPair;
use syncra_fuzz::actions::{Action, FuzzFrame};
use syncra_fuzz::envelope::{me_recipient, other_recipient, reference_envelope};
use syncra_fuzz::keyfile::PASSPHRASE;
use syncra_fuzz::{NOW_MS, mallory, me, my_retired_prekey, seeded, sender};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

/// Prints what each `envelope_open` seed that is an envelope (mode 0) does when opened, so a
/// seed that stopped reaching its check is noticed.
fn report_envelopes(dir: &Path) {
    let recipient = syncra_fuzz::envelope::Recipient0::default();
    let mut names: Vec<_> = fs::read_dir(dir)
        .expect("corpus dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let bytes = fs::read(dir.join(&name)).expect("seed");
        if bytes.first() != Some(&0) {
            continue;
        }
        let mut guard = syncra_core::crypto::envelope::ReplayGuard::new(Default::default(), 8);
        match recipient.open(&bytes[1..], &mut guard) {
            Ok(m) => println!("envelope_open/{name}: opens ({} bytes)", m.body.len()),
            Err(e) => println!("envelope_open/{name}: {e:?}"),
        }
    }
}

/// Mode byte 0: open the rest as is.
fn as_is(envelope: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(envelope);
    v
}

fn seal(from: &IdentityKeyPair, to: &[Recipient], body: &[u8], ts: u64, seed: u64) -> Vec<u8> {
    seal_with_rng(from, to, body, ts, &mut seeded(seed))
        .expect("seal")
        .bytes
}

fn envelope_open(dir: &Path) {
    let s = sender();
    let me_r = me_recipient();
    let retired = Recipient {
        user_id: me().user_id(),
        prekey: *my_retired_prekey().public(),
    };
    write(
        dir,
        "sealed_to_me",
        &as_is(&seal(&s, &[me_r], b"hello", NOW_MS, 10)),
    );
    write(
        dir,
        "sealed_to_retired_prekey",
        &as_is(&seal(&s, &[retired], b"late", NOW_MS, 11)),
    );
    write(dir, "group_reference", &as_is(&reference_envelope()));
    write(
        dir,
        "group_1000_bytes",
        &as_is(&seal(
            &s,
            &[me_r, other_recipient()],
            &[b'x'; 1000],
            NOW_MS,
            12,
        )),
    );
    write(
        dir,
        "not_for_me",
        &as_is(&seal(&s, &[other_recipient()], b"not yours", NOW_MS, 13)),
    );
    write(
        dir,
        "too_old",
        &as_is(&seal(&s, &[me_r], b"old", NOW_MS - 2 * 3600 * 1000, 14)),
    );
    write(
        dir,
        "from_the_future",
        &as_is(&seal(&s, &[me_r], b"future", NOW_MS + 600 * 1000, 15)),
    );
    let id = [7u8; 16];
    // Claims the sender, carries the sender's key, signed by mallory: bad signature.
    let inner = forge::inner(
        &s.user_id(),
        &s.public(),
        &mallory(),
        &[me_r],
        &id,
        NOW_MS,
        b"x",
    );
    let forged = forge::reencrypt(&inner, &id, &[me_r]).expect("reencrypt");
    write(dir, "forged_signature", &as_is(&forged));
    // Claims the sender with mallory's key: the key does not belong to the id.
    let m = mallory();
    let inner = forge::inner(&s.user_id(), &m.public(), &m, &[me_r], &id, NOW_MS, b"x");
    let forged = forge::reencrypt(&inner, &id, &[me_r]).expect("reencrypt");
    write(dir, "sender_key_mismatch", &as_is(&forged));
    // Really signed by the sender, for the other recipient, re-wrapped to me: forwarded.
    let inner = forge::inner(
        &s.user_id(),
        &s.public(),
        &s,
        &[other_recipient()],
        &id,
        NOW_MS,
        b"forwarded",
    );
    let forged = forge::reencrypt(&inner, &id, &[me_r]).expect("reencrypt");
    write(dir, "forwarded", &as_is(&forged));
    // Mode byte 1: edits of the reference envelope. No edits opens; the others are starters.
    write(dir, "edit_none", &[1]);
    write(dir, "edit_flip_header", &[1, 0, 3, 0, 0x80]);
    write(dir, "edit_truncate", &[1, 4, 0x90, 0x01]);
    write(dir, "edit_copy", &[1, 5, 0x13, 0, 0x6b, 0, 0x34, 0]);
}

fn keyfile(dir: &Path) {
    let mut rng = seeded(20);
    let mut f = UnlockedKeyFile::create(PASSPHRASE, KdfParams::INSECURE_FOR_TESTS, &mut rng)
        .expect("create");
    f.put("identity", &[1u8; 32]);
    f.put("history", &[2u8; 32]);
    f.public
        .insert("user_id".into(), me().user_id().to_string());
    let valid = f.seal().expect("seal");
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");
    let valid_json = serde_json::to_value(&valid).expect("value");
    write(dir, "valid", &json(&valid_json));

    let mut one = UnlockedKeyFile::create(PASSPHRASE, KdfParams::INSECURE_FOR_TESTS, &mut rng)
        .expect("create");
    one.put("identity", &[3u8; 40]);
    let one = one.seal().expect("seal");
    write(dir, "one_secret", &serde_json::to_vec(&one).expect("json"));

    let other = UnlockedKeyFile::create(
        b"another passphrase",
        KdfParams::INSECURE_FOR_TESTS,
        &mut rng,
    )
    .expect("create");
    let mut other = other;
    other.put("identity", &[4u8; 32]);
    let other = other.seal().expect("seal");
    write(
        dir,
        "other_passphrase",
        &serde_json::to_vec(&other).expect("json"),
    );

    // One secret from another file: the passphrase is right, the file is damaged.
    let mut mixed = valid.clone();
    mixed
        .secrets
        .insert("history".into(), other.secrets["identity"].clone());
    write(
        dir,
        "partly_damaged",
        &serde_json::to_vec(&mixed).expect("json"),
    );

    let mut v = valid_json.clone();
    v["params"] = serde_json::json!({ "m_kib": 65536, "t": 3, "p": 1 });
    write(dir, "default_params", &json(&v));
    let mut v = valid_json.clone();
    v["params"] = serde_json::json!({ "m_kib": 4294967295u32, "t": 4294967295u32, "p": 0 });
    write(dir, "absurd_params", &json(&v));
    let mut v = valid_json.clone();
    v["salt"] = serde_json::json!("c2hvcnQ=");
    write(dir, "short_salt", &json(&v));
    let mut v = valid_json.clone();
    v["version"] = serde_json::json!(2);
    write(dir, "version_2", &json(&v));
    let mut v = valid_json.clone();
    v["secrets"] = serde_json::json!({});
    write(dir, "no_secrets", &json(&v));
    write(dir, "empty_object", b"{}");
}

fn history(dir: &Path) {
    let sender = me().user_id();
    let msg = |id: &str, text: &str| {
        format!(
            r#"{{"t":"msg","id":"{id}","sender":"{sender}","outgoing":true,"timestamp_ms":1,"text":"{text}","delivery":"sending"}}"#
        )
    };
    let status = |id: &str, d: &str| format!(r#"{{"t":"status","id":"{id}","delivery":"{d}"}}"#);
    let incoming = format!(
        r#"{{"t":"msg","id":"in1","sender":"{sender}","outgoing":false,"timestamp_ms":2,"text":"hi","held":true}}"#
    );
    let lines = |ls: &[String], clean: bool| {
        let mut s = ls.join("\n");
        if clean {
            s.push('\n');
        }
        s.into_bytes()
    };
    let p = |s: String| format!("+{s}");
    write(
        dir,
        "messages_and_status",
        &lines(
            &[
                p(msg("1", "one")),
                p(msg("2", "two")),
                p(status("1", "delivered")),
                p(incoming),
            ],
            true,
        ),
    );
    write(
        dir,
        "duplicate_ids",
        &lines(
            &[
                p(msg("1", "one")),
                p(msg("1", "again")),
                p(status("1", "failed")),
            ],
            true,
        ),
    );
    write(
        dir,
        "garbage_between",
        &lines(
            &[
                p(msg("1", "one")),
                "this line is garbage".into(),
                p(msg("2", "two")),
            ],
            true,
        ),
    );
    write(
        dir,
        "torn_tail",
        &lines(&[p(msg("1", "one")), "dG9ybi".into()], false),
    );
    write(
        dir,
        "moved_and_foreign",
        &lines(
            &[
                format!("~{}", msg("1", "moved")),
                format!("!{}", msg("2", "foreign")),
                p(msg("3", "mine")),
            ],
            true,
        ),
    );
    write(
        dir,
        "bad_records",
        &lines(
            &[
                p(r#"{"t":"msg"}"#.into()),
                p("not json".into()),
                p(status("1", "exploded")),
                p(r#"{"t":"msg","id":"1","sender":"x","outgoing":true,"timestamp_ms":1,"text":"t","extra":1}"#.into()),
                p(r#"{"t":"unknown"}"#.into()),
            ],
            true,
        ),
    );
}

/// Random byte strings decoded as the harness decodes them; the shortest that matches each
/// pattern becomes a seed.
fn relay_session(dir: &Path) {
    type Pattern = (&'static str, fn(&[Action]) -> bool);
    let patterns: [Pattern; 10] = [
        ("login_then_sealed_send", |a| {
            let l = a.iter().position(|x| matches!(x, Action::Login(_)));
            let s = a
                .iter()
                .rposition(|x| matches!(x, Action::SendSealed { to, .. } if !to.is_empty()));
            matches!((l, s), (Some(l), Some(s)) if l < s)
        }),
        ("resume_then_shaped_send", |a| {
            let l = a.iter().position(|x| matches!(x, Action::Resume));
            let s = a
                .iter()
                .rposition(|x| matches!(x, Action::SendShaped { to, .. } if !to.is_empty()));
            matches!((l, s), (Some(l), Some(s)) if l < s)
        }),
        ("register", |a| {
            a.iter().any(|x| matches!(x, Action::Register(_)))
        }),
        ("login_then_rotate", |a| {
            let l = a.iter().position(|x| matches!(x, Action::Login(_)));
            let s = a.iter().rposition(|x| matches!(x, Action::Rotate { .. }));
            matches!((l, s), (Some(l), Some(s)) if l < s)
        }),
        ("two_connections", |a| {
            let sw = a.iter().position(|x| matches!(x, Action::Switch));
            let l = a.iter().filter(|x| matches!(x, Action::Login(_))).count();
            sw.is_some() && l >= 2
        }),
        ("oversize", |a| {
            a.iter().any(|x| matches!(x, Action::Oversize { .. }))
        }),
        ("raw", |a| {
            a.iter().any(|x| matches!(x, Action::Raw(v) if v.len() > 4))
        }),
        ("stale_login", |a| {
            a.iter().any(|x| matches!(x, Action::StaleLogin(_)))
        }),
        ("fuzzed_auth_frames", |a| {
            a.iter()
                .filter(|x| {
                    matches!(
                        x,
                        Action::Frame(
                            FuzzFrame::Auth { .. }
                                | FuzzFrame::Register { .. }
                                | FuzzFrame::Resume { .. }
                        )
                    )
                })
                .count()
                >= 2
        }),
        ("lookups", |a| {
            a.iter()
                .any(|x| matches!(x, Action::Frame(FuzzFrame::LookupHandle { .. })))
                && a.iter()
                    .any(|x| matches!(x, Action::Frame(FuzzFrame::LookupId { .. })))
        }),
    ];
    let mut best: Vec<Option<Vec<u8>>> = vec![None; patterns.len()];
    let mut rng = seeded(30);
    for _ in 0..200_000 {
        let len = rng.random_range(8..256);
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        let actions = <Vec<Action> as Arbitrary>::arbitrary_take_rest(Unstructured::new(&bytes))
            .unwrap_or_default();
        for (i, (_, pattern)) in patterns.iter().enumerate() {
            if pattern(&actions) && best[i].as_ref().is_none_or(|b| b.len() > bytes.len()) {
                best[i] = Some(bytes.clone());
            }
        }
    }
    for ((name, _), bytes) in patterns.iter().zip(best) {
        match bytes {
            Some(b) => write(dir, name, &b),
            None => eprintln!("no seed found for {name}"),
        }
    }
}

fn main() {
    let base: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("corpus"));
    envelope_open(&base.join("envelope_open"));
    report_envelopes(&base.join("envelope_open"));
    keyfile(&base.join("keyfile"));
    history(&base.join("history_line"));
    relay_session(&base.join("relay_session"));
    println!("seeds written under {}", base.display());
}
