//! Base64 helpers for serde, so keys in JSON and TOML are readable text rather than arrays of
//! numbers. Kept in one place so the domain types carry no encoding logic of their own.

/// Fixed-size byte arrays as base64 strings.
pub mod fixed {
    use data_encoding::BASE64;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises `[u8; N]` as base64.
    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(bytes))
    }

    /// Deserialises `[u8; N]` from base64, refusing any other length.
    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        let s = String::deserialize(deserializer)?;
        let bytes = BASE64
            .decode(s.as_bytes())
            .map_err(|_| serde::de::Error::custom("expected base64"))?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom(format!("expected {N} bytes")))
    }
}
