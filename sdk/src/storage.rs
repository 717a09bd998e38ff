//! The plugin's private, durable key-value namespace on this node.
//!
//! All writes of one hook call commit atomically when the call returns.

use serde::{Serialize, de::DeserializeOwned};

use crate::host::storage as wit;

pub use wit::{BatchOp, KeyValue, StorageError as Error, Version, Versioned};

/// Reads a key.
pub fn get(key: impl AsRef<[u8]>) -> Result<Option<Versioned>, Error> {
    wit::get(key.as_ref())
}

/// Writes a key; returns its new version.
pub fn put(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<Version, Error> {
    wit::put(key.as_ref(), value.as_ref())
}

/// Removes a key; returns whether it existed.
pub fn delete(key: impl AsRef<[u8]>) -> Result<bool, Error> {
    wit::delete(key.as_ref())
}

/// Writes `value` (or deletes when `None`) if the key is at `expected`.
pub fn compare_and_swap(
    key: impl AsRef<[u8]>,
    expected: Option<Version>,
    value: Option<&[u8]>,
) -> Result<Option<Version>, Error> {
    wit::compare_and_swap(key.as_ref(), expected, value)
}

/// Runs the operations atomically.
pub fn batch(ops: &[BatchOp]) -> Result<Vec<Version>, Error> {
    wit::batch(ops)
}

/// One page of keys under `prefix`, after `start_after`.
pub fn scan(
    prefix: impl AsRef<[u8]>,
    start_after: Option<&[u8]>,
    limit: u32,
) -> Result<Vec<KeyValue>, Error> {
    wit::scan(prefix.as_ref(), start_after, limit)
}

/// Every key under `prefix`, fetched page by page.
pub fn scan_all(prefix: impl AsRef<[u8]>) -> Result<Vec<KeyValue>, Error> {
    let prefix = prefix.as_ref();
    let mut out: Vec<KeyValue> = Vec::new();
    loop {
        let after = out.last().map(|kv| kv.key.clone());
        let page = wit::scan(prefix, after.as_deref(), 1000)?;
        let done = page.len() < 1000;
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

/// Reads a key holding a value written by [`put_typed`].
pub fn get_typed<T: DeserializeOwned>(
    key: impl AsRef<[u8]>,
) -> Result<Option<(T, Version)>, Error> {
    match get(key)? {
        None => Ok(None),
        Some(v) => crate::codec::decode(&v.value)
            .map(|t| Some((t, v.version)))
            .map_err(|e| Error::Io(e.to_string())),
    }
}

/// Encodes `value` with [`crate::codec`] and writes it.
pub fn put_typed<T: Serialize + ?Sized>(
    key: impl AsRef<[u8]>,
    value: &T,
) -> Result<Version, Error> {
    put(key, crate::codec::encode(value))
}

/// This node's own keys, which consensus snapshots neither carry nor
/// replace (see `wit/storage.wit`): for data a node holds for itself, such
/// as a shard, written outside `apply`. The functions take and return keys
/// without the prefix.
pub mod local {
    use super::{Error, KeyValue, Version, Versioned};

    /// What starts every node-local key in the namespace.
    pub const PREFIX: &[u8] = b"\xffnode/";

    /// `key` as stored.
    pub fn key(key: impl AsRef<[u8]>) -> Vec<u8> {
        [PREFIX, key.as_ref()].concat()
    }

    /// Reads a node-local key.
    pub fn get(key: impl AsRef<[u8]>) -> Result<Option<Versioned>, Error> {
        super::get(self::key(key))
    }

    /// Writes a node-local key.
    pub fn put(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<Version, Error> {
        super::put(self::key(key), value)
    }

    /// Deletes a node-local key.
    pub fn delete(key: impl AsRef<[u8]>) -> Result<bool, Error> {
        super::delete(self::key(key))
    }

    /// One page of node-local keys under `prefix`, after `start_after`.
    pub fn scan(
        prefix: impl AsRef<[u8]>,
        start_after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<KeyValue>, Error> {
        let after = start_after.map(self::key);
        let mut page = super::scan(self::key(prefix), after.as_deref(), limit)?;
        for kv in &mut page {
            kv.key.drain(..PREFIX.len());
        }
        Ok(page)
    }

    /// Every node-local key under `prefix`, fetched page by page.
    pub fn scan_all(prefix: impl AsRef<[u8]>) -> Result<Vec<KeyValue>, Error> {
        let mut all = super::scan_all(self::key(prefix))?;
        for kv in &mut all {
            kv.key.drain(..PREFIX.len());
        }
        Ok(all)
    }
}
