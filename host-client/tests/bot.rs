//! Bots end to end through a real relay: a person sends `/roll 2d6` to the dice bot's handle
//! and gets the bot's sealed reply; a hostile bot that loops, hogs memory, traps and tries the
//! file system is stopped and restarted each time while ordinary chat keeps working.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::path::PathBuf;
use std::time::Duration;

use syncra_client::net::Push;
use syncra_client::{Client, Home, Incoming, InitOptions, SendState};
use syncra_core::crypto::keyfile::KdfParams;
use syncra_plugin_wasm::WasmPluginConfig;
use syncra_test_relay::TestRelay;
use syncra_test_support::DEADLINE;
use tokio::sync::{mpsc, oneshot};

const PASS: &str = "pw for tests";

fn component(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join(format!(
        "examples/bots/target/wasm32-wasip2/release/syncra_bot_{name}.wasm"
    ));
    if !path.exists() {
        let ok = std::process::Command::new(root.join("scripts/build-wasm.sh"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "scripts/build-wasm.sh failed");
    }
    path
}

async fn user(dir: &std::path::Path, relay: &TestRelay, handle: &str) -> Client {
    let mut c = Client::init(
        Home::at(dir.join(handle)),
        PASS,
        InitOptions {
            kdf: KdfParams::MINIMUM,
        },
    )
    .unwrap();
    c.register(relay.url(), handle).await.unwrap();
    c
}

/// Starts a bot in the background; returns the handle to stop it.
async fn start_bot(
    dir: &std::path::Path,
    relay: &TestRelay,
    handle: &str,
    wasm: &str,
    configure: impl FnOnce(&mut WasmPluginConfig),
) -> oneshot::Sender<()> {
    let mut client = user(dir, relay, handle).await;
    let mut config = WasmPluginConfig::new(component(wasm));
    configure(&mut config);
    let store = dir.join(format!("{handle}-store"));
    std::fs::create_dir_all(&store).unwrap();
    let plugin = syncra_client::bot::load(config, &store, client.plugin_store_key()).unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        syncra_client::bot::run(&mut client, plugin, async {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    });
    stop_tx
}

/// The next message's text, opened by `client`.
async fn next_text(client: &mut Client, pushes: &mut mpsc::Receiver<Push>) -> String {
    loop {
        match tokio::time::timeout(DEADLINE, pushes.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Push::Deliver(env) => {
                if let Some(Incoming::Message { text, .. }) = client.receive(&env).await.unwrap() {
                    return text;
                }
            }
            Push::Pending(entry, env) => {
                let received = client.receive(&env).await.unwrap();
                client.acknowledge(entry).await;
                if let Some(Incoming::Message { text, .. }) = received {
                    return text;
                }
            }
            Push::Notice(..) | Push::BacklogDone { .. } => {}
        }
    }
}

/// Sends until delivered (the bot may still be connecting).
async fn send(client: &mut Client, to: &str, text: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let r = client.send_text(to, text).await.unwrap();
        if r.state == SendState::Delivered {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{to} never came online: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dice_bot_answers_a_roll_with_a_sealed_reply() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let _stop = start_bot(dir.path(), &relay, "dicebot", "dice", |_| {}).await;
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut pushes = alice.take_pushes().unwrap();
    alice.add_contact("dicebot").await.unwrap();
    send(&mut alice, "dicebot", "/roll 2d6").await;
    let reply = next_text(&mut alice, &mut pushes).await;
    assert!(
        reply.contains("2d6") && reply.contains("for alice"),
        "{reply}"
    );
    // The reply is in Alice's history, from the bot.
    let history = alice.history_of("dicebot", None).unwrap();
    assert!(history.iter().any(|m| !m.outgoing && m.text == reply));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_bot_is_contained_and_chat_goes_on() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let _stop = start_bot(dir.path(), &relay, "badbot", "hostile", |c| {
        c.memory_mib = 16;
        c.fuel_per_call = 50_000_000;
        c.max_failures = 10;
    })
    .await;
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut bob = user(dir.path(), &relay, "bob").await;
    let mut alice_pushes = alice.take_pushes().unwrap();
    let mut bob_pushes = bob.take_pushes().unwrap();
    alice.add_contact("badbot").await.unwrap();
    alice.add_contact("bob").await.unwrap();

    for attack in ["loop", "hog", "trap"] {
        send(&mut alice, "badbot", attack).await;
        // Each attack is stopped; the bot restarts and answers the next message.
        let probe = format!("ping after {attack}");
        send(&mut alice, "badbot", &probe).await;
        let reply = next_text(&mut alice, &mut alice_pushes).await;
        assert_eq!(reply, format!("still alive: {probe}"));
        // And ordinary chat between people is untouched.
        send(&mut alice, "bob", &format!("hi bob, {attack} done")).await;
        assert_eq!(
            next_text(&mut bob, &mut bob_pushes).await,
            format!("hi bob, {attack} done")
        );
    }
    // A call asking for 40 replies gets the first 16; the next message is answered next.
    send(&mut alice, "badbot", "flood 40").await;
    for i in 0..syncra_client::bot::MAX_BOT_ACTIONS {
        assert_eq!(
            next_text(&mut alice, &mut alice_pushes).await,
            format!("flood {i}")
        );
    }
    send(&mut alice, "badbot", "ping after flood").await;
    assert_eq!(
        next_text(&mut alice, &mut alice_pushes).await,
        "still alive: ping after flood"
    );
    send(&mut alice, "badbot", "fs /etc/hostname").await;
    let reply = next_text(&mut alice, &mut alice_pushes).await;
    assert!(reply.starts_with("fs denied"), "{reply}");
    send(&mut alice, "badbot", "net 127.0.0.1:1").await;
    let reply = next_text(&mut alice, &mut alice_pushes).await;
    assert!(reply.starts_with("net denied"), "{reply}");
}

/// A bot whose plugin was disabled after repeated failures answers every message with a sealed
/// "unavailable" reply: the sender is never left with "delivered" and silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_bot_says_it_is_unavailable() {
    let relay = TestRelay::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let _stop = start_bot(dir.path(), &relay, "fragile", "hostile", |c| {
        c.max_failures = 2;
    })
    .await;
    let mut alice = user(dir.path(), &relay, "alice").await;
    let mut pushes = alice.take_pushes().unwrap();
    alice.add_contact("fragile").await.unwrap();
    send(&mut alice, "fragile", "trap").await;
    send(&mut alice, "fragile", "trap").await;
    // The second failure disabled it: that message and every later one get the answer.
    assert_eq!(
        next_text(&mut alice, &mut pushes).await,
        syncra_client::bot::UNAVAILABLE
    );
    send(&mut alice, "fragile", "are you there?").await;
    assert_eq!(
        next_text(&mut alice, &mut pushes).await,
        syncra_client::bot::UNAVAILABLE
    );
}
