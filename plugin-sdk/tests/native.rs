//! Native plugins through a real `cdylib`: the broker conformance suite run through the C ABI
//! against `syncra-example-native-broker`, the registry wiring, and each way a library is
//! refused (another ABI version, no version static, not a library, no file) — the first two
//! without any of their code being called.
//!
//! The libraries are the workspace's `examples/native-*` crates, built next to this test
//! executable by `cargo build` (a no-op when they are fresh).

#![cfg(feature = "host")]
// Reading the bad-ABI fixture's call counters means calling into a library by hand; that is all
// the `unsafe` here, each block with its own `// SAFETY:`.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use syncra_core::error::PluginError;
use syncra_core::registry::Kinds;
use syncra_core::{Broker, BrokerSink};
use syncra_plugin_sdk::abi::ABI_VERSION;
use syncra_plugin_sdk::host::{LoadError, LoadedPlugin, load_broker_plugin, register_native};
use syncra_test_support::{RecordingSink, broker_conformance, unique_name};

const EXAMPLE: &str = "syncra_example_native_broker";
const BAD_ABI: &str = "syncra_example_native_bad_abi";
const NO_SYMBOL: &str = "syncra_example_native_no_symbol";

/// The path of one of the fixture libraries, building them all on first use so a stale copy is
/// never tested.
fn library(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target directory")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        // From this package's directory, so the build uses this workspace whatever the cwd.
        build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "-p",
            "syncra-example-native-broker",
            "-p",
            "syncra-example-native-bad-abi",
            "-p",
            "syncra-example-native-no-symbol",
        ]);
        if dir.file_name().is_some_and(|name| name == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("run cargo build for the plugin fixtures");
        assert!(
            status.success(),
            "building the native plugin fixtures failed"
        );
        dir
    });
    let path = dir.join(format!(
        "{}{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

fn example() -> LoadedPlugin {
    load_broker_plugin(&library(EXAMPLE)).expect("load the example plugin")
}

#[tokio::test]
async fn the_example_passes_broker_conformance_through_the_abi() {
    let plugin = example();
    assert_eq!(plugin.name(), "memory-native");
    assert_eq!(plugin.sdk_version(), syncra_plugin_sdk::abi::SDK_VERSION);
    broker_conformance(|sink_a, sink_b| {
        let plugin = plugin.clone();
        async move {
            let a = plugin
                .create(serde_json::json!({}), sink_a)
                .await
                .expect("node a");
            let b = plugin
                .create(serde_json::json!({}), sink_b)
                .await
                .expect("node b");
            (
                Arc::new(a) as Arc<dyn Broker>,
                Arc::new(b) as Arc<dyn Broker>,
            )
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_registers_its_kind_and_is_created_from_config() {
    let mut kinds: Kinds<Arc<dyn Broker>, Arc<dyn BrokerSink>> = Kinds::new("broker", &[]);
    register_native(&mut kinds, example()).expect("register");
    assert!(kinds.contains("memory-native"));

    let (sink_a, _inbox_a) = RecordingSink::new();
    let (sink_b, mut inbox_b) = RecordingSink::new();
    let a = kinds
        .create(serde_json::json!({ "kind": "memory-native" }), sink_a)
        .await
        .expect("node a");
    let b = kinds
        .create(serde_json::json!({ "kind": "memory-native" }), sink_b)
        .await
        .expect("node b");
    assert_eq!(a.kind(), "memory-native");
    let topic = unique_name("native.registry");
    b.subscribe(&topic).await.expect("subscribe");
    let receipt = a
        .publish(&topic, Bytes::from_static(b"through the registry"))
        .await
        .expect("publish");
    assert_eq!(receipt.receivers, Some(1));
    assert_eq!(
        inbox_b.next("registry").await.payload,
        Bytes::from_static(b"through the registry")
    );

    // The plugin's own config type refuses unknown keys, naming them.
    let (sink, _inbox) = RecordingSink::new();
    let Err(err) = kinds
        .create(
            serde_json::json!({ "kind": "memory-native", "url": "redis://x" }),
            sink,
        )
        .await
    else {
        panic!("an unknown key must be refused");
    };
    assert!(matches!(err, PluginError::Config { .. }), "{err}");
    assert!(
        err.to_string().contains("url") && err.to_string().contains("memory-native"),
        "{err}"
    );

    // Loading the same library twice and registering it again is a duplicate, not a crash.
    let err = register_native(&mut kinds, example()).unwrap_err();
    assert!(matches!(err, PluginError::Duplicate { .. }), "{err}");
}

/// One of a fixture's call counters, read straight from the library.
fn fixture_counter(library: &libloading::Library, symbol: &std::ffi::CStr) -> u32 {
    // SAFETY: the fixtures export their counters as `extern "C" fn() -> u32`.
    let counter = unsafe { library.get::<unsafe extern "C" fn() -> u32>(symbol) }
        .expect("the fixture exports its counters");
    // SAFETY: as above; the library is loaded while `library` lives.
    unsafe { counter() }
}

/// Opens a fixture for the test itself, so its counters survive the loader unloading it.
fn hold_open(path: &Path) -> libloading::Library {
    // SAFETY: the fixtures are ours and have no initializers.
    unsafe { libloading::Library::new(path) }.expect("open the fixture")
}

#[test]
fn a_library_of_another_abi_version_is_refused_without_being_called() {
    let path = library(BAD_ABI);
    let fixture = hold_open(&path);

    // Had the loader called the fixture's descriptor function, the process would have aborted.
    let err = load_broker_plugin(&path).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::AbiMismatch {
                found: 999,
                expected: ABI_VERSION,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    for needed in [
        "ABI 999".to_owned(),
        format!("this host speaks ABI {ABI_VERSION}"),
        "rebuild the plugin with syncra-plugin-sdk".to_owned(),
        BAD_ABI.to_owned(),
    ] {
        assert!(
            message.contains(&needed),
            "{needed:?} missing from: {message}"
        );
    }
    assert_eq!(
        fixture_counter(&fixture, c"syncra_fixture_descriptor_calls"),
        0,
        "the host read the version as data and called nothing in the library"
    );
}

#[test]
fn a_library_without_the_version_static_is_refused_without_being_called() {
    let path = library(NO_SYMBOL);
    let fixture = hold_open(&path);
    let err = load_broker_plugin(&path).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::MissingSymbol {
                symbol: "SYNCRA_PLUGIN_ABI_VERSION",
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    for needed in [
        "not a Syncra native plugin",
        "SYNCRA_PLUGIN_ABI_VERSION",
        "export_broker_plugin",
        "older than plugin ABI 2",
    ] {
        assert!(
            message.contains(needed),
            "{needed:?} missing from: {message}"
        );
    }
    // The fixture exports a pre-ABI-2 descriptor function; it was not called.
    assert_eq!(
        fixture_counter(&fixture, c"syncra_fixture_descriptor_calls"),
        0
    );
}

#[test]
fn the_example_exports_its_version_as_data() {
    let fixture = hold_open(&library(EXAMPLE));
    // SAFETY: the export macro makes `SYNCRA_PLUGIN_ABI_VERSION` a `u32` static.
    let version = unsafe { fixture.get::<*const u32>(c"SYNCRA_PLUGIN_ABI_VERSION") }
        .map(|symbol| *symbol)
        .expect("the macro exports the version static");
    // SAFETY: the address of a `u32` static in a loaded library.
    assert_eq!(unsafe { version.read() }, ABI_VERSION);
}

#[test]
fn a_file_that_is_not_a_library_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("x.so");
    std::fs::write(&path, b"\x7fELF? no: just some garbage bytes\n").expect("write");
    let err = load_broker_plugin(&path).unwrap_err();
    assert!(matches!(err, LoadError::NotALibrary { .. }), "{err:?}");
    assert!(
        err.to_string().contains("is not a loadable library"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_an_io_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nowhere.so");
    let err = load_broker_plugin(&path).unwrap_err();
    assert!(
        matches!(&err, LoadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(err.to_string().contains("nowhere.so"), "{err}");
}
