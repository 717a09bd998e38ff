//! The compact binary encoding (postcard over serde) for log entries,
//! messages and snapshots, so plugins do not each pick their own.

use serde::{Serialize, de::DeserializeOwned};

/// Encoding or decoding failed; the message says where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub String);

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "codec: {}", self.0)
    }
}

impl std::error::Error for CodecError {}

/// Encodes a value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // postcard only fails on types serde cannot describe (maps with
    // non-serializable keys and the like), which is a bug in the plugin.
    postcard::to_allocvec(value).expect("plexus: value cannot be encoded")
}

/// Decodes a value produced by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    postcard::from_bytes(bytes).map_err(|e| CodecError(e.to_string()))
}
