//! End-to-end cryptography: identities, signed prekeys, the sealed envelope, the replay guard,
//! safety numbers and the passphrase-protected key file.
//!
//! Everything here runs in the client. The relay links this module only to read envelope
//! headers ([`envelope::parse_header`]) and to verify signatures on public material.

pub mod envelope;
pub mod keyfile;
pub mod keys;
pub mod local_box;
pub mod safety;
pub mod transcript;

use rand::rngs::SysRng;
use rand::{CryptoRng, Rng};

/// The operating system's generator as an infallible [`CryptoRng`]. A failure to get entropy is
/// unrecoverable for a cryptographic program, so it aborts rather than continuing weakly.
pub fn os_rng() -> impl CryptoRng {
    rand::rand_core::UnwrapErr(SysRng)
}

/// Fills `buf` from the operating system's generator.
pub fn fill_random(buf: &mut [u8]) {
    os_rng().fill_bytes(buf);
}
