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

impl From<CodecError> for String {
    fn from(e: CodecError) -> String {
        e.to_string()
    }
}

/// What starts a snapshot made by [`encode_versioned`].
const VERSIONED: &[u8; 4] = b"PXv\x01";

/// Encodes a snapshot that names the version of its format, so that a
/// later version of the plugin can still read what an earlier one handed
/// over at a hot swap. Bump `version` whenever the snapshot's type
/// changes, and keep a branch for each older version in
/// [`crate::Pattern::restore`]:
///
/// ```ignore
/// fn snapshot(&mut self) -> Vec<u8> {
///     codec::encode_versioned(2, &self.state)
/// }
///
/// fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
///     let snap = codec::versioned(&state)?;
///     self.state = match snap.version {
///         0 => State::default(),               // a version that kept nothing
///         1 => snap.decode::<StateV1>()?.into(), // the format before
///         2 => snap.decode()?,
///         v => return Err(format!("snapshot format {v} is newer than this plugin reads")),
///     };
///     Ok(())
/// }
/// ```
pub fn encode_versioned<T: Serialize + ?Sized>(version: u32, value: &T) -> Vec<u8> {
    let mut out = VERSIONED.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    postcard::to_extend(value, out).expect("plexus: value cannot be encoded")
}

/// A snapshot read by [`versioned`]: its format's version and its body.
#[derive(Debug, Clone, Copy)]
pub struct Versioned<'a> {
    /// The version given to [`encode_versioned`]; 0 for an empty
    /// snapshot or one made without a version (plain [`encode`]).
    pub version: u32,
    /// The encoded value.
    pub body: &'a [u8],
}

impl Versioned<'_> {
    /// Decodes the body as `T`, the type of this version's format.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        decode(self.body)
            .map_err(|e| CodecError(format!("snapshot format {}: {}", self.version, e.0)))
    }
}

/// Reads a snapshot made by [`encode_versioned`], or one made without a
/// version (given as version 0 with all of its bytes as the body).
pub fn versioned(bytes: &[u8]) -> Result<Versioned<'_>, CodecError> {
    match bytes.strip_prefix(VERSIONED) {
        None => Ok(Versioned {
            version: 0,
            body: bytes,
        }),
        Some(rest) if rest.len() >= 4 => Ok(Versioned {
            version: u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]),
            body: &rest[4..],
        }),
        Some(_) => Err(CodecError("snapshot cut short in its version".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct V1 {
        count: u64,
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct V2 {
        count: u64,
        name: String,
    }

    #[test]
    fn a_versioned_snapshot_names_its_format_and_older_ones_still_read() {
        let old = encode_versioned(1, &V1 { count: 7 });
        let snap = versioned(&old).unwrap();
        assert_eq!(snap.version, 1);
        assert_eq!(snap.decode::<V1>().unwrap(), V1 { count: 7 });
        let new = encode_versioned(
            2,
            &V2 {
                count: 8,
                name: "n".into(),
            },
        );
        assert_eq!(versioned(&new).unwrap().version, 2);
        // Read as the wrong format: an error naming the version.
        let err = versioned(&old).unwrap().decode::<V2>().unwrap_err();
        assert!(err.0.starts_with("snapshot format 1:"), "{err}");
        // Made without a version, or empty: version 0.
        let plain = encode(&V1 { count: 3 });
        let snap = versioned(&plain).unwrap();
        assert_eq!(
            (snap.version, snap.decode::<V1>().unwrap()),
            (0, V1 { count: 3 })
        );
        assert_eq!(versioned(&[]).unwrap().version, 0);
        assert!(versioned(b"PXv\x01\x02").is_err());
    }
}
