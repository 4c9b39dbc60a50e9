//! The cost of one relay-hook call per envelope and one bot call per message, with the example
//! components (build them first: `scripts/build-wasm.sh`).
//!
//! `cargo bench -p syncra-plugin-wasm --bench calls`
#![allow(missing_docs)] // criterion_group! and criterion_main! generate undocumented items.
#![allow(clippy::unwrap_used)] // A benchmark that cannot set up should stop loudly.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use syncra_plugin_wasm::{
    BotMessage, BotPlugin, EnvelopeMeta, HookPlugin, WasmHost, WasmPluginConfig,
};

fn component(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../../examples/bots/target/wasm32-wasip2/release/syncra_bot_{name}.wasm"
    ));
    assert!(
        p.exists(),
        "run scripts/build-wasm.sh first ({})",
        p.display()
    );
    p
}

fn calls(c: &mut Criterion) {
    let host = WasmHost::new().unwrap();
    let hook = HookPlugin::load(&host, WasmPluginConfig::new(component("hook_allowlist"))).unwrap();
    let meta = EnvelopeMeta {
        session_user: "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
        recipients: vec!["bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".into()],
        size: 600,
        time_ms: 1,
    };
    // The allow-list hook keeps a per-minute window per sender; cycling over 1000 senders
    // exercises the table lookups of a busy relay (allow or deny, the work is the same).
    let senders: Vec<String> = (0..1000).map(|n| format!("{n:032}")).collect();
    let mut n = 0usize;
    c.bench_function("relay_hook_on_envelope", |b| {
        b.iter(|| {
            n = (n + 1) % senders.len();
            let mut m = meta.clone();
            m.session_user.clone_from(&senders[n]);
            black_box(hook.on_envelope(&m).unwrap())
        })
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let hook = std::sync::Arc::new(hook);
    c.bench_function("relay_hook_on_envelope_via_spawn_blocking", |b| {
        b.iter(|| {
            let h = hook.clone();
            let m = meta.clone();
            rt.block_on(async move {
                tokio::task::spawn_blocking(move || h.on_envelope(&m).unwrap())
                    .await
                    .unwrap()
            })
        })
    });
    let bot = BotPlugin::load(&host, WasmPluginConfig::new(component("echo"))).unwrap();
    let msg = BotMessage {
        id: "00".into(),
        sender: "aaaa".into(),
        sender_handle: Some("alice".into()),
        group: None,
        text: "x".repeat(256),
        timestamp_ms: 1,
    };
    c.bench_function("bot_on_message_256B", |b| {
        b.iter(|| black_box(bot.on_message(&msg).unwrap()))
    });
}

criterion_group!(benches, calls);
criterion_main!(benches);
