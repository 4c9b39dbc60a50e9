//! `[[plugins]]` in the relay: a WASM relay hook that denies by metadata (the sender gets
//! `hook_denied` with the hook's reason), a hostile hook that traps, loops and sleeps while the
//! relay keeps serving everyone else, `/healthz` reporting a failing and a disabled hook, and a
//! native broker plugin loaded from config carrying real traffic.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::path::{Path, PathBuf};
use std::process::Command;

use syncra_core::wire::{ErrorCode, Frame, Outcome};
use syncra_test_relay::{RawClient, TestRelay, TestUser};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn component(name: &str) -> PathBuf {
    let path = root().join(format!(
        "examples/bots/target/wasm32-wasip2/release/syncra_bot_{name}.wasm"
    ));
    if !path.exists() {
        let ok = Command::new(root().join("scripts/build-wasm.sh"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "scripts/build-wasm.sh failed");
    }
    path
}

/// The example native broker library, built from this workspace if needed.
fn native_broker() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .current_dir(root())
        .args(["build", "-p", "syncra-example-native-broker"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "building the native broker example failed");
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    dir.join(format!(
        "{}syncra_example_native_broker{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

async fn send(c: &mut RawClient, id: u32, env: Vec<u8>) -> Frame {
    c.send(&Frame::Send {
        request_id: id,
        envelope: env.into(),
    })
    .await;
    c.reply().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_hook_denies_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        TestUser::new("ha"),
        TestUser::new("hb"),
        TestUser::new("hc"),
    );
    let kv = dir.path().join("hook.json");
    std::fs::write(&kv, format!(r#"{{"block/{}":[1]}}"#, b.id())).unwrap();
    let wasm = component("hook_allowlist");
    let relay = TestRelay::start(move |cfg| {
        cfg.plugins = vec![serde_json::json!({
            "kind": "wasm",
            "path": wasm,
            "kv_file": kv,
        })];
    })
    .await;
    let (mut ca, _) = a.register(relay.url()).await;
    let (_cb, _) = b.register(relay.url()).await;
    let (mut cc, _) = c.register(relay.url()).await;
    match send(&mut ca, 1, a.seal(&[&b], b"let me in")).await {
        Frame::Error {
            request_id: 1,
            code: ErrorCode::HookDenied,
            message,
        } => assert!(message.contains("does not accept messages"), "{message}"),
        other => panic!("expected hook_denied, got {other:?}"),
    }
    // Everyone else is served.
    match send(&mut ca, 2, a.seal(&[&c], b"fine")).await {
        Frame::SendResult { outcomes, .. } => assert_eq!(outcomes[0].outcome, Outcome::Delivered),
        other => panic!("{other:?}"),
    }
    cc.delivery().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hook_is_contained_and_the_relay_keeps_serving() {
    let wasm = component("hostile_hook");
    let w2 = wasm.clone();
    let open = TestRelay::start(move |cfg| {
        cfg.plugins = vec![serde_json::json!({
            "kind": "wasm", "path": w2, "fuel_per_call": 5_000_000, "max_failures": 100,
        })];
    })
    .await;
    let (a, b, c) = (
        TestUser::new("ka"),
        TestUser::new("kb"),
        TestUser::new("kc"),
    );
    let (mut ca, _) = a.register(open.url()).await;
    let (mut cb, _) = b.register(open.url()).await;
    let (mut cc, _) = c.register(open.url()).await;
    // Two recipients make it trap; a large envelope makes it loop until its budget runs out.
    // Fail-open (the default): the relay delivers anyway.
    match send(&mut ca, 1, a.seal(&[&b, &c], b"trap")).await {
        Frame::SendResult { outcomes, .. } => {
            assert!(outcomes.iter().all(|o| o.outcome == Outcome::Delivered))
        }
        other => panic!("{other:?}"),
    }
    match send(&mut ca, 2, a.seal(&[&b], &vec![b'x'; 20_000])).await {
        Frame::SendResult { outcomes, .. } => assert_eq!(outcomes[0].outcome, Outcome::Delivered),
        other => panic!("{other:?}"),
    }
    // Meanwhile other traffic flows.
    let (mut cb2, _) = (b.login(open.url()).await, ());
    match send(&mut cc, 3, c.seal(&[&b], b"still here")).await {
        Frame::SendResult { outcomes, .. } => assert_eq!(outcomes[0].outcome, Outcome::Delivered),
        other => panic!("{other:?}"),
    }
    cb.delivery().await;
    cb2.delivery().await;

    // Fail-closed: the same failures become a refusal with a clear reason.
    let closed = TestRelay::start(move |cfg| {
        cfg.plugins = vec![serde_json::json!({
            "kind": "wasm", "path": wasm, "fail_open": false, "fuel_per_call": 5_000_000,
        })];
    })
    .await;
    let (mut ca, _) = a.register(closed.url()).await;
    b.register(closed.url()).await;
    c.register(closed.url()).await;
    match send(&mut ca, 4, a.seal(&[&b, &c], b"trap")).await {
        Frame::Error {
            code: ErrorCode::HookDenied,
            message,
            ..
        } => assert!(message.contains("failing"), "{message}"),
        other => panic!("{other:?}"),
    }
}

async fn health(relay: &TestRelay) -> (u16, serde_json::Value) {
    let (status, body) = relay.admin_get("/healthz").await;
    (status, serde_json::from_str(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_sleeping_for_one_user_does_not_stall_another_users_send() {
    let wasm = component("hostile_hook");
    let relay = TestRelay::start(move |cfg| {
        cfg.plugins = vec![serde_json::json!({
            "kind": "wasm", "path": wasm, "deadline_ms": 5_000,
        })];
    })
    .await;
    let (a, b, c) = (
        TestUser::new("sa"),
        TestUser::new("sb"),
        TestUser::new("sc"),
    );
    let (mut ca, _) = a.register(relay.url()).await;
    let (mut cb, _) = b.register(relay.url()).await;
    let (mut cc, _) = c.register(relay.url()).await;
    // An envelope of 4 to 8 KiB makes the hook sleep for five minutes in WASI (a 3 000-byte
    // body is padded to 4 KiB, plus the envelope's own fields).
    let slow = a.seal(&[&b], &vec![b'x'; 3_000]);
    assert!((4 * 1024 + 1..=8 * 1024).contains(&slow.len()));
    ca.send(&Frame::Send {
        request_id: 1,
        envelope: slow.into(),
    })
    .await;
    // Wait (polling with a deadline) until the hook is inside that call.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while health(&relay).await.1["hooks"][0]["busy"] != 1 {
        assert!(
            std::time::Instant::now() < until,
            "the hook call never started"
        );
        tokio::task::yield_now().await;
    }
    // Another user's send gets its verdict and is delivered meanwhile...
    match send(&mut cc, 2, c.seal(&[&b], b"not held up")).await {
        Frame::SendResult { outcomes, .. } => assert_eq!(outcomes[0].outcome, Outcome::Delivered),
        other => panic!("{other:?}"),
    }
    // ...while the sleeping call is still running: it has neither ended nor failed yet.
    let (_, h) = health(&relay).await;
    assert_eq!(h["hooks"][0]["busy"], 1, "{h}");
    assert_eq!(h["hooks"][0]["failures"], 0, "{h}");
    // The sleeping call is stopped at its deadline; fail-open (the default) lets it through,
    // and /healthz says the hook is failing, and why.
    match ca.reply().await {
        Frame::SendResult {
            request_id: 1,
            outcomes,
            ..
        } => assert_eq!(outcomes[0].outcome, Outcome::Delivered),
        other => panic!("{other:?}"),
    }
    let (status, h) = health(&relay).await;
    assert_eq!(
        status, 200,
        "a failing hook that still runs does not degrade the node: {h}"
    );
    assert_eq!(h["hooks"][0]["status"], "failing", "{h}");
    assert!(
        h["hooks"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("deadline of 5000 ms")),
        "{h}"
    );
    cb.delivery().await;
    cb.delivery().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_hook_degrades_health() {
    let wasm = component("hostile_hook");
    let relay = TestRelay::start(move |cfg| {
        cfg.plugins = vec![serde_json::json!({
            "kind": "wasm", "path": wasm, "max_failures": 2,
        })];
    })
    .await;
    let (status, h) = health(&relay).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["hooks"][0]["status"], "ok", "{h}");
    let (a, b, c) = (
        TestUser::new("da"),
        TestUser::new("db"),
        TestUser::new("dc"),
    );
    let (mut ca, _) = a.register(relay.url()).await;
    b.register(relay.url()).await;
    c.register(relay.url()).await;
    // Two recipients make the hook trap; twice in a row disables it.
    for id in 1..=2 {
        match send(&mut ca, id, a.seal(&[&b, &c], b"trap")).await {
            Frame::SendResult { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let (status, h) = health(&relay).await;
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["hooks"][0]["status"], "disabled", "{h}");
    assert_eq!(h["hooks"][0]["failures"], 2, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_broker_plugin_from_config_carries_traffic() {
    let lib = native_broker();
    let relay = TestRelay::start(move |cfg| {
        cfg.plugins = vec![serde_json::json!({ "kind": "native", "path": lib })];
        cfg.broker = serde_json::json!({ "kind": "memory-native" });
    })
    .await;
    let (a, b) = (TestUser::new("na"), TestUser::new("nb"));
    let (mut ca, _) = a.register(relay.url()).await;
    let (mut cb, _) = b.register(relay.url()).await;
    match send(&mut ca, 1, a.seal(&[&b], b"through the plugin")).await {
        Frame::SendResult { outcomes, .. } => assert_eq!(outcomes[0].outcome, Outcome::Delivered),
        other => panic!("{other:?}"),
    }
    cb.delivery().await;
    let (_, health) = relay.admin_get("/healthz").await;
    assert!(health.contains("\"broker\":{\"status\":\"up\""), "{health}");
}

#[tokio::test]
async fn bad_plugin_entries_fail_at_start_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_lib = dir.path().join("junk.so");
    std::fs::write(&not_a_lib, b"not a library").unwrap();
    for (entry, expect) in [
        (
            serde_json::json!({ "kind": "native", "path": not_a_lib }),
            "not a loadable library",
        ),
        (
            serde_json::json!({ "kind": "wasm", "path": dir.path().join("missing.wasm") }),
            "missing.wasm",
        ),
        (
            serde_json::json!({ "kind": "lua", "path": "x" }),
            "unknown plugin kind",
        ),
    ] {
        let mut config = syncra_test_relay::test_relay_config(dir.path().join("d"));
        config.plugins = vec![entry];
        let err = format!(
            "{:#}",
            syncra_relay::Relay::start(config).await.unwrap_err()
        );
        assert!(err.to_lowercase().contains(expect), "{err}");
    }
}
