//! `keyfile`: the passphrase and the cost clamp.

use syncra_core::crypto::keyfile::{KdfParams, KeyFile};

/// The passphrase the seed key files were made with.
pub const PASSPHRASE: &[u8] = b"fuzz passphrase";
/// A passphrase that must never unlock a seed file.
pub const WRONG_PASSPHRASE: &[u8] = b"not the passphrase";

/// Whether a file's Argon2id parameters are cheap enough to run as they are: at most 8x the
/// test parameters' memory and two passes. Anything dearer is replaced by
/// [`KdfParams::INSECURE_FOR_TESTS`] before unlocking, so an iteration stays well under a
/// millisecond; the product's own bound (4 GiB, 64 passes) is reported in `docs/SECURITY.md`.
pub fn cheap(params: &KdfParams) -> bool {
    params.m_kib <= 8 * KdfParams::INSECURE_FOR_TESTS.m_kib && params.t <= 2 && params.p <= 4
}

/// Clamps the file's parameters in place (see [`cheap`]).
pub fn clamp(file: &mut KeyFile) {
    if !cheap(&file.params) {
        file.params = KdfParams::INSECURE_FOR_TESTS;
    }
}
