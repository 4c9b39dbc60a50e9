//! The sandbox against real components (examples/bots, built for wasm32-wasip2): each hostile
//! behaviour is stopped and says why (fuel, deadline, memory cap, trap), the plugin restarts, a
//! plugin that keeps failing is disabled, a hook's slow call does not hold up its other calls
//! nor a caller for more than one deadline, a call writes the plugin's store once however many
//! keys it sets, and another plugin keeps serving throughout.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::path::PathBuf;
use std::sync::{Arc, Barrier, OnceLock, mpsc};
use std::time::{Duration, Instant};

use syncra_plugin_wasm::{
    BotAction, BotMessage, BotPlugin, CallFailure, ConnectInfo, EnvelopeMeta, Grants, HookPlugin,
    KvStore, Verdict, WasmError, WasmHost, WasmPluginConfig,
};

/// Path of an example component, building the examples once if needed.
fn component(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join(format!(
        "examples/bots/target/wasm32-wasip2/release/syncra_bot_{name}.wasm"
    ));
    BUILT.get_or_init(|| {
        if !path.exists() {
            let status = std::process::Command::new(root.join("scripts/build-wasm.sh"))
                .status()
                .expect("run scripts/build-wasm.sh");
            assert!(status.success(), "building the example plugins failed");
        }
    });
    assert!(
        path.exists(),
        "{} missing after scripts/build-wasm.sh",
        path.display()
    );
    path
}

fn host() -> WasmHost {
    WasmHost::new().unwrap()
}

fn message(text: &str) -> BotMessage {
    BotMessage {
        id: "00".into(),
        sender: "aaaa".into(),
        sender_handle: Some("alice".into()),
        group: None,
        text: text.into(),
        timestamp_ms: 1,
    }
}

fn reply(actions: Vec<BotAction>) -> String {
    match actions.as_slice() {
        [BotAction::Reply(text)] => text.clone(),
        other => panic!("expected one reply, got {other:?}"),
    }
}

fn bot(name: &str, configure: impl FnOnce(&mut WasmPluginConfig)) -> BotPlugin {
    let mut config = WasmPluginConfig::new(component(name));
    configure(&mut config);
    BotPlugin::load(&host(), config).unwrap()
}

#[test]
fn echo_and_dice_bots_answer() {
    let echo = bot("echo", |_| {});
    assert_eq!(echo.commands().unwrap()[0].name, "echo");
    assert_eq!(reply(echo.on_message(&message("hi")).unwrap()), "echo: hi");

    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("dice.json");
    let dice = bot("dice", |c| c.kv_file = Some(kv.clone()));
    let first = reply(dice.on_message(&message("/roll 2d6")).unwrap());
    assert!(
        first.contains("2d6") && first.contains("roll #1 for alice"),
        "{first}"
    );
    let second = reply(dice.on_message(&message("/roll 3d20+2")).unwrap());
    assert!(second.contains("roll #2"), "{second}");
    // The private store survives a restart of the plugin (a new load reads the file).
    let dice = bot("dice", |c| c.kv_file = Some(kv.clone()));
    let third = reply(dice.on_message(&message("roll 1d6")).unwrap());
    assert!(third.contains("roll #3"), "{third}");
    let bad = reply(dice.on_message(&message("/roll 99d6")).unwrap());
    assert!(bad.contains("at most 20"), "{bad}");
    let cmd = reply(dice.on_command("roll", "1d20", "bob").unwrap());
    assert!(cmd.contains("1d20"), "{cmd}");
}

#[test]
fn an_infinite_loop_is_stopped_by_its_budget_and_the_plugin_restarts() {
    let hostile = bot("hostile", |c| c.fuel_per_call = 50_000_000);
    let echo = bot("echo", |_| {});
    let err = hostile.on_message(&message("loop")).unwrap_err();
    assert!(
        matches!(
            err,
            WasmError::Call {
                reason: CallFailure::Fuel,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("ran out of fuel"), "{err}");
    // Restarted: it answers again, and the other plugin never stopped.
    assert_eq!(
        reply(hostile.on_message(&message("ping")).unwrap()),
        "still alive: ping"
    );
    assert_eq!(reply(echo.on_message(&message("x")).unwrap()), "echo: x");
}

#[test]
fn a_memory_hog_is_capped() {
    let hostile = bot("hostile", |c| c.memory_mib = 16);
    let err = hostile.on_message(&message("hog")).unwrap_err();
    assert!(
        matches!(
            err,
            WasmError::Call {
                reason: CallFailure::MemoryCap,
                ..
            }
        ),
        "{err}"
    );
    // Said as what happened, not as the `unreachable` the guest's allocator ended in.
    assert!(
        err.to_string()
            .contains("exceeded its memory cap of 16 MiB"),
        "{err}"
    );
    assert_eq!(
        reply(hostile.on_message(&message("after")).unwrap()),
        "still alive: after"
    );
}

#[test]
fn a_trap_restarts_and_repeated_failures_disable() {
    let hostile = bot("hostile", |c| c.max_failures = 3);
    let echo = bot("echo", |_| {});
    for _ in 0..2 {
        assert!(matches!(
            hostile.on_message(&message("trap")).unwrap_err(),
            WasmError::Call { .. }
        ));
    }
    // A success resets the count.
    assert_eq!(
        reply(hostile.on_message(&message("ok")).unwrap()),
        "still alive: ok"
    );
    for i in 0..3 {
        let err = hostile.on_message(&message("trap")).unwrap_err();
        assert!(
            matches!(err, WasmError::Call { .. }),
            "trap {i} is a failed call, not a refusal (the plugin is disabled after the third): \
             {err}"
        );
    }
    assert!(hostile.is_disabled());
    assert!(matches!(
        hostile.on_message(&message("ok")).unwrap_err(),
        WasmError::Disabled { .. }
    ));
    assert_eq!(
        reply(echo.on_message(&message("still here")).unwrap()),
        "echo: still here"
    );
}

fn is_deadline(err: &WasmError) -> bool {
    matches!(
        err,
        WasmError::Call {
            reason: CallFailure::Deadline,
            ..
        }
    )
}

#[test]
fn a_sleeping_bot_is_stopped_at_its_deadline_and_restarts() {
    // `sleep` waits five minutes in WASI (`subscribe-duration`, then a blocking wait) and burns
    // no fuel: only the wall-clock deadline can stop it.
    let hostile = bot("hostile", |c| c.deadline_ms = 300);
    let err = hostile.on_message(&message("sleep")).unwrap_err();
    assert!(is_deadline(&err), "{err}");
    assert!(
        err.to_string().contains("passed its deadline of 300 ms"),
        "{err}"
    );
    // The instance was thrown away; a fresh one answers.
    assert_eq!(
        reply(hostile.on_message(&message("ping")).unwrap()),
        "still alive: ping"
    );
    assert_eq!(hostile.health().failures, 0);
}

#[test]
fn a_busy_loop_with_fuel_to_spare_is_stopped_by_the_deadline() {
    // Fuel for hours: the epoch deadline stops guest code that computes, too.
    let hostile = bot("hostile", |c| {
        c.fuel_per_call = u64::MAX / 2;
        c.deadline_ms = 300;
    });
    let err = hostile.on_message(&message("loop")).unwrap_err();
    assert!(is_deadline(&err), "{err}");
    assert_eq!(
        reply(hostile.on_message(&message("after")).unwrap()),
        "still alive: after"
    );
}

#[test]
fn a_plugin_that_keeps_sleeping_is_disabled() {
    let hostile = bot("hostile", |c| {
        c.deadline_ms = 100;
        c.max_failures = 2;
    });
    for _ in 0..2 {
        let err = hostile.on_message(&message("sleep")).unwrap_err();
        assert!(is_deadline(&err), "{err}");
    }
    let health = hostile.health();
    assert!(health.disabled);
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("deadline")),
        "{health:?}"
    );
    assert!(matches!(
        hostile.on_message(&message("ping")).unwrap_err(),
        WasmError::Disabled { .. }
    ));
}

fn hook(name: &str, configure: impl FnOnce(&mut WasmPluginConfig)) -> HookPlugin {
    let mut config = WasmPluginConfig::new(component(name));
    configure(&mut config);
    HookPlugin::load(&host(), config).unwrap()
}

fn envelope(recipients: usize, size: u32) -> EnvelopeMeta {
    EnvelopeMeta {
        session_user: "aaaa".into(),
        recipients: (0..recipients).map(|i| format!("r{i}")).collect(),
        size,
        time_ms: 1,
    }
}

fn connect() -> ConnectInfo {
    ConnectInfo {
        user: "aaaa".into(),
        client_ip: "127.0.0.1".into(),
    }
}

#[test]
fn failures_of_one_call_kind_disable_even_when_another_kind_succeeds() {
    let hostile = hook("hostile_hook", |c| c.max_failures = 3);
    for round in 0..3 {
        // Two recipients make `on-envelope` trap; `on-connect` always succeeds.
        assert!(
            hostile.on_envelope(&envelope(2, 100)).is_err(),
            "round {round}"
        );
        if round < 2 {
            assert_eq!(hostile.on_connect(&connect()).unwrap(), Verdict::Allow);
        }
    }
    assert!(hostile.is_disabled());
    assert!(matches!(
        hostile.on_connect(&connect()).unwrap_err(),
        WasmError::Disabled { failures: 3, .. }
    ));
}

/// Polls `check` until it holds, failing after a generous deadline.
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn a_sleeping_hook_call_does_not_hold_up_the_next_call() {
    let hostile = Arc::new(hook("hostile_hook", |c| {
        c.instances = 2;
        c.deadline_ms = 5_000;
    }));
    // 6 KiB: the hook sleeps for five minutes, until its deadline stops it.
    let sleeper = {
        let hostile = hostile.clone();
        std::thread::spawn(move || hostile.on_envelope(&envelope(1, 6 * 1024)))
    };
    wait_for("the sleeping call to start", || hostile.health().busy == 1);
    // Another caller is served by the second instance, while the first call still sleeps.
    assert_eq!(
        hostile.on_envelope(&envelope(1, 100)).unwrap(),
        Verdict::Allow
    );
    assert_eq!(
        hostile.health().busy,
        1,
        "answered while the sleeping call was still running"
    );
    let err = sleeper.join().unwrap().unwrap_err();
    assert!(is_deadline(&err), "{err}");
    assert_eq!(hostile.health().busy, 0);
    assert_eq!(hostile.health().failures, 1);
}

/// A caller's deadline covers everything its call waits for. The only instance is taken by a
/// call that sleeps until its deadline; a second sleeping call, started 0.3 deadlines later,
/// waits for the instance and then may run only in what is left of its own deadline. A marker
/// hook whose deadline is 1.45 deadlines, started at the same moment as the second call, must
/// answer after it: with a deadline per step, the second call would wait 0.7 deadlines and then
/// sleep a whole one of its own, answering after 1.7.
#[test]
fn a_hook_call_that_waits_for_an_instance_is_held_one_deadline_in_all() {
    const DEADLINE_MS: u64 = 2_000;
    let hostile = Arc::new(hook("hostile_hook", |c| {
        c.instances = 1;
        c.deadline_ms = DEADLINE_MS;
    }));
    let marker = Arc::new(hook("hostile_hook", |c| {
        c.deadline_ms = DEADLINE_MS * 145 / 100;
    }));
    // 6 KiB: the hook sleeps for five minutes, until its deadline stops it.
    let sleeper = {
        let hostile = hostile.clone();
        std::thread::spawn(move || hostile.on_envelope(&envelope(1, 6 * 1024)))
    };
    wait_for("the sleeping call to start", || hostile.health().busy == 1);
    // Not a wait for readiness: the second caller must start well after the first, so that
    // its wait ends with the instance freed, not with every instance still busy.
    std::thread::sleep(Duration::from_millis(DEADLINE_MS * 3 / 10));
    let start = Arc::new(Barrier::new(2));
    let (done, finished) = mpsc::channel();
    let callers = [("second caller", hostile.clone()), ("marker", marker)].map(|(who, hook)| {
        let (start, done) = (start.clone(), done.clone());
        std::thread::spawn(move || {
            start.wait();
            let answer = hook.on_envelope(&envelope(1, 6 * 1024));
            done.send((who, answer)).unwrap();
        })
    });
    let (first, answer) = finished.recv().unwrap();
    assert_eq!(
        first, "second caller",
        "the marker answered first: the second caller was held longer than one deadline"
    );
    // It ran in what was left and passed it: busy, not the plugin's failure (a flood of calls
    // must not get a well-behaved hook disabled).
    let err = answer.unwrap_err();
    assert!(matches!(err, WasmError::Busy { .. }), "{err}");
    let (_, marker_answer) = finished.recv().unwrap();
    assert!(is_deadline(&marker_answer.unwrap_err()));
    for caller in callers {
        caller.join().unwrap();
    }
    assert!(is_deadline(&sleeper.join().unwrap().unwrap_err()));
    assert_eq!(hostile.health().busy, 0);
    assert_eq!(
        hostile.health().failures,
        1,
        "only the call that had its whole deadline counts"
    );
}

/// However many keys a call sets, the plugin's store is written once, after the call; a call
/// that sets nothing writes nothing; what a call set before it trapped is kept.
#[test]
fn a_call_writes_the_plugin_store_once_however_many_keys_it_sets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostile.json");
    let hostile = bot("hostile", |c| {
        c.kv_file = Some(file.clone());
        // Time enough for a write per key on a slow disk: this test counts writes, it does not
        // time them.
        c.deadline_ms = 60_000;
    });
    let counter = |n: u32| Some(n.to_le_bytes().to_vec());
    let before = hostile.store_writes();
    assert_eq!(
        reply(hostile.on_message(&message("kv 1000")).unwrap()),
        "set the counter 1000 times"
    );
    assert_eq!(hostile.store_writes(), before + 1);
    assert_eq!(
        KvStore::open(Some(&file)).unwrap().get("counter"),
        counter(999)
    );
    assert_eq!(
        reply(hostile.on_message(&message("ping")).unwrap()),
        "still alive: ping"
    );
    assert_eq!(hostile.store_writes(), before + 1);
    let err = hostile.on_message(&message("kv 10 trap")).unwrap_err();
    assert!(matches!(err, WasmError::Call { .. }), "{err}");
    assert_eq!(hostile.store_writes(), before + 2);
    assert_eq!(
        KvStore::open(Some(&file)).unwrap().get("counter"),
        counter(9)
    );
}

#[test]
fn files_and_sockets_need_a_grant() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("note.txt");
    std::fs::write(&secret, "granted contents").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();

    let jailed = bot("hostile", |_| {});
    let fs = reply(
        jailed
            .on_message(&message(&format!("fs {}", secret.display())))
            .unwrap(),
    );
    assert!(fs.starts_with("fs denied"), "{fs}");
    let fs = reply(jailed.on_message(&message("fs /etc/hostname")).unwrap());
    assert!(fs.starts_with("fs denied"), "{fs}");
    let net = reply(jailed.on_message(&message(&format!("net {addr}"))).unwrap());
    assert!(net.starts_with("net denied"), "{net}");

    // The network alone reaches public addresses only: not this host's services.
    let public_only = bot("hostile", |c| {
        c.grants = Grants {
            network: true,
            ..Grants::default()
        }
    });
    let net = reply(
        public_only
            .on_message(&message(&format!("net {addr}")))
            .unwrap(),
    );
    assert!(net.starts_with("net denied"), "{net}");

    let granted = bot("hostile", |c| {
        c.grants = Grants {
            dirs: vec![dir.path().to_path_buf()],
            network: true,
            network_local: true,
            stderr: false,
        }
    });
    let fs = reply(
        granted
            .on_message(&message(&format!("fs {}", secret.display())))
            .unwrap(),
    );
    assert_eq!(fs, "read a host file: granted contents");
    let net = reply(
        granted
            .on_message(&message(&format!("net {addr}")))
            .unwrap(),
    );
    assert_eq!(net, format!("connected to {addr}"));
}

#[test]
fn relay_hook_allows_denies_and_rate_limits_by_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("hook.json");
    std::fs::write(&kv, r#"{"block/bbbb":[1]}"#).unwrap();
    let mut config = WasmPluginConfig::new(component("hook_allowlist"));
    config.kv_file = Some(kv);
    let hook = HookPlugin::load(&host(), config).unwrap();
    let connect = ConnectInfo {
        user: "aaaa".into(),
        client_ip: "127.0.0.1".into(),
    };
    assert_eq!(hook.on_connect(&connect).unwrap(), Verdict::Allow);
    let meta = |to: &str| EnvelopeMeta {
        session_user: "aaaa".into(),
        recipients: vec![to.into()],
        size: 600,
        time_ms: 1,
    };
    assert_eq!(hook.on_envelope(&meta("cccc")).unwrap(), Verdict::Allow);
    match hook.on_envelope(&meta("bbbb")).unwrap() {
        Verdict::Deny(why) => assert!(why.contains("does not accept"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The limit is 120 a minute: the 122nd envelope (one allowed above) is denied.
    let mut denied = 0;
    for _ in 0..125 {
        if let Verdict::Deny(_) = hook.on_envelope(&meta("cccc")).unwrap() {
            denied += 1;
        }
    }
    assert_eq!(denied, 6);
}

#[test]
fn a_component_of_the_wrong_world_or_no_component_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    let err = BotPlugin::load(&host(), WasmPluginConfig::new(&junk)).unwrap_err();
    assert!(
        err.to_string().contains("not a WebAssembly component"),
        "{err}"
    );
    // A relay hook is not a bot.
    let err =
        BotPlugin::load(&host(), WasmPluginConfig::new(component("hook_allowlist"))).unwrap_err();
    assert!(matches!(err, WasmError::Load { .. }), "{err}");
    let err = BotPlugin::load(
        &host(),
        WasmPluginConfig::new(dir.path().join("missing.wasm")),
    )
    .unwrap_err();
    assert!(matches!(err, WasmError::Load { .. }), "{err}");
}

#[test]
fn a_python_bot_answers_through_the_same_interface() {
    let dir = tempfile::tempdir().unwrap();
    let py = bot("python_shout", |c| {
        c.kv_file = Some(dir.path().join("py.json"))
    });
    assert_eq!(py.commands().unwrap()[0].name, "shout");
    assert_eq!(reply(py.on_message(&message("hello")).unwrap()), "HELLO!");
    assert_eq!(reply(py.on_command("shout", "hey", "bob").unwrap()), "HEY!");
}
