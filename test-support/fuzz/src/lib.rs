//! Fixtures shared by the fuzz targets and by `examples/gen_seeds.rs` (which writes the seed
//! corpora): fixed keys, the reference envelope, the history line format and the in-process
//! relay harness.
//!
//! Everything here is deterministic where it can be (keys from fixed seeds, a fixed clock for
//! opening envelopes), so a seed written by `gen_seeds` keeps exercising the same paths and a
//! crash input reproduces. The relay harness is the exception: it keeps one relay alive across
//! inputs, so a relay crash may depend on earlier inputs (see `docs/SECURITY.md`).

pub mod actions;
pub mod envelope;
pub mod history;

/// The client's history reader, compiled from its own source file. Depending on the
/// `syncra-client` crate would build Wasmtime and the terminal UI with sanitizers for one
/// self-contained module; if `history.rs` starts using more of its crate, extend [`home`] (or
/// switch to the crate dependency) and the fuzz build says so.
#[path = "../../../host-client/src/history.rs"]
pub mod client_history;

/// What `client_history` uses from the client's `home` module.
pub mod home {
    /// Mirrors `syncra_client::home::FsyncPolicy`.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum FsyncPolicy {
        /// After every line.
        #[default]
        Always,
        /// Never explicitly.
        Never,
    }
}
pub mod keyfile;
#[cfg(feature = "hosts")]
pub mod relay;

use rand::SeedableRng;
use rand::rngs::StdRng;
use syncra_core::crypto::keys::{IdentityKeyPair, PrekeyRing, PrekeySecret};

/// The fixed "now" every envelope is opened at (2023-11-14T22:13:20Z), so that seeds sealed for
/// this time stay inside the accept window forever.
pub const NOW_MS: u64 = 1_700_000_000_000;

/// A deterministic generator for fixtures (never for real keys).
pub fn seeded(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The only sender whose messages may open (pinned by the recipient).
pub fn sender() -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&[0x5e; 32])
}

/// Someone else: signs forgeries that must never open.
pub fn mallory() -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&[0x66; 32])
}

/// The recipient the fuzzer opens as.
pub fn me() -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&[0x7e; 32])
}

/// A second recipient (group messages, messages not for me).
pub fn other() -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&[0x0a; 32])
}

/// My current prekey (created one day before [`NOW_MS`]).
pub fn my_current_prekey() -> PrekeySecret {
    PrekeySecret::generate_with(&me(), NOW_MS / 1000 - 86_400, &mut seeded(1))
}

/// My retired prekey, still inside its grace period.
pub fn my_retired_prekey() -> PrekeySecret {
    PrekeySecret::generate_with(&me(), NOW_MS / 1000 - 8 * 86_400, &mut seeded(2))
}

/// The other recipient's prekey.
pub fn other_prekey() -> PrekeySecret {
    PrekeySecret::generate_with(&other(), NOW_MS / 1000 - 86_400, &mut seeded(3))
}

/// My prekey ring: the current prekey and one retired prekey.
pub fn my_ring() -> PrekeyRing {
    PrekeyRing::from_parts(
        my_current_prekey(),
        vec![(my_retired_prekey(), NOW_MS / 1000 - 86_400)],
    )
}

/// Removes `<tmp>/<prefix><pid>` directories left behind by fuzzer processes that are gone
/// (libFuzzer ends with `exit`, so statics holding temporary directories are never dropped).
pub fn remove_stale_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A fresh `<tmp>/<prefix><pid>` directory for this process.
pub fn process_dir(prefix: &str) -> std::path::PathBuf {
    remove_stale_dirs(prefix);
    let dir = std::env::temp_dir().join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fuzz temp dir");
    dir
}
