//! Explicit, unambiguous byte strings for signatures and hashes.
//!
//! Every signed statement and every hash over variable-length input in Syncra is built here by
//! hand, never by a serializer (hashes over fixed-length fields only, such as the user id and
//! safety numbers, concatenate them directly): a
//! serializer's output can change with a crate upgrade, and a signature over ambiguous bytes
//! can be replayed in another context. Each transcript starts with a domain label, and every
//! variable-length field carries a 32-bit big-endian length prefix.

/// Builds a domain-separated, length-prefixed byte string.
#[derive(Debug, Clone)]
pub struct Transcript {
    buf: Vec<u8>,
}

impl Transcript {
    /// Starts a transcript for one purpose, e.g. `syncra/v1/envelope`.
    pub fn new(domain: &str) -> Self {
        let mut t = Transcript {
            buf: Vec::with_capacity(128),
        };
        t.bytes(domain.as_bytes());
        t
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a big-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a field whose length is fixed by the protocol (keys, ids, digests).
    pub fn fixed(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Appends a variable-length field with its length in front.
    ///
    /// # Panics
    /// Never for inputs below 4 GiB; every caller passes bounded data.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.buf.extend_from_slice(v);
        self
    }

    /// The finished byte string.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    /// The bytes so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_cannot_be_shifted_into_each_other() {
        let mut a = Transcript::new("d");
        a.bytes(b"ab").bytes(b"c");
        let mut b = Transcript::new("d");
        b.bytes(b"a").bytes(b"bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn domains_separate() {
        assert_ne!(Transcript::new("a").finish(), Transcript::new("b").finish());
    }
}
