//! Safety numbers: a short, comparable fingerprint of two identities.
//!
//! Each side's half is an iterated SHA-512 over its identity key and user id (iteration makes
//! grinding a look-alike key expensive); the halves are ordered so both people see the same
//! 60 digits. Reading them out, or scanning them, proves there is no key in the middle.

use sha2::{Digest, Sha512};

use super::keys::IdentityPublicKey;
use crate::id::UserId;

const ITERATIONS: usize = 5200;

fn half(key: &IdentityPublicKey) -> [u8; 30] {
    let id = UserId::from_identity_key(key);
    let mut hash = {
        let mut h = Sha512::new();
        h.update(b"syncra/v1/safety-number");
        h.update(key);
        h.update(id.as_bytes());
        h.finalize()
    };
    for _ in 0..ITERATIONS {
        let mut h = Sha512::new();
        h.update(hash);
        h.update(key);
        hash = h.finalize();
    }
    let mut out = [0u8; 30];
    out.copy_from_slice(&hash[..30]);
    out
}

fn digits(half: &[u8; 30]) -> String {
    half.chunks_exact(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            format!("{:05}", n % 100_000)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The safety number of two identities: 12 groups of five digits, the same from both sides.
pub fn safety_number(a: &IdentityPublicKey, b: &IdentityPublicKey) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    format!("{} {}", digits(&half(first)), digits(&half(second)))
}

/// A short fingerprint of one identity (its half of any safety number), for status bars.
pub fn fingerprint(key: &IdentityPublicKey) -> String {
    digits(&half(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_and_distinct() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let c = [3u8; 32];
        let ab = safety_number(&a, &b);
        assert_eq!(ab, safety_number(&b, &a));
        assert_ne!(ab, safety_number(&a, &c));
        assert_eq!(ab.split(' ').count(), 12);
        assert!(
            ab.split(' ')
                .all(|g| g.len() == 5 && g.bytes().all(|d| d.is_ascii_digit()))
        );
    }
}
