//! `plexus:cluster/storage`: the plugin's durable namespace, with one
//! transaction per hook call.
//!
//! Writes go into an in-memory overlay that reads consult first; the
//! plugin actor commits the overlay (and the applied log index) in one
//! durable transaction when the hook returns, or drops it when it traps.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

use super::{CallLimits, over};
use crate::cluster::state_store::{KvBackend, KvReader, StoreError, Write};
use crate::runtime::bindings::plexus::cluster::storage::{
    self as wit, BatchOp, KeyValue, StorageError, Version, Versioned,
};
use crate::runtime::state::PluginState;

/// One plugin instance's storage context.
pub struct StorageCtx {
    ns: String,
    backend: Arc<dyn KvBackend>,
    limits: CallLimits,
    overlay: BTreeMap<Vec<u8>, Option<(Vec<u8>, u64)>>,
    overlay_bytes: u64,
    /// The committed state this hook call reads, opened at its first read.
    reader: Option<Box<dyn KvReader>>,
}

impl StorageCtx {
    /// A context for namespace `ns`.
    pub fn new(ns: &str, backend: Arc<dyn KvBackend>, limits: CallLimits) -> Self {
        StorageCtx {
            ns: ns.to_string(),
            backend,
            limits,
            overlay: BTreeMap::new(),
            overlay_bytes: 0,
            reader: None,
        }
    }

    /// Takes the writes of the current hook call, leaving none.
    pub fn take_writes(&mut self) -> Vec<Write> {
        self.overlay_bytes = 0;
        self.reader = None;
        std::mem::take(&mut self.overlay).into_iter().collect()
    }

    /// Drops the writes of the current hook call.
    pub fn discard(&mut self) {
        self.overlay.clear();
        self.overlay_bytes = 0;
        self.reader = None;
    }

    fn current(&mut self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, StorageError> {
        match self.overlay.get(key) {
            Some(w) => Ok(w.clone()),
            None => view(&mut self.reader, &*self.backend, &self.ns)?
                .get(key)
                .map_err(io),
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<(), StorageError> {
        if over(key.len(), self.limits.max_key_bytes) {
            return Err(StorageError::TooLarge(self.limits.max_key_bytes));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), StorageError> {
        if over(value.len(), self.limits.max_value_bytes) {
            return Err(StorageError::TooLarge(self.limits.max_value_bytes));
        }
        Ok(())
    }

    fn write(
        &mut self,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<Option<Version>, StorageError> {
        let size = (key.len() + value.as_ref().map_or(0, Vec::len)) as u64;
        if self.overlay_bytes.saturating_add(size) > self.limits.max_txn_bytes {
            return Err(StorageError::TooLarge(
                u32::try_from(self.limits.max_txn_bytes).unwrap_or(u32::MAX),
            ));
        }
        self.overlay_bytes += size;
        let write = value.map(|v| (v, self.backend.next_version()));
        let version = write.as_ref().map(|(_, v)| *v);
        self.overlay.insert(key, write);
        Ok(version)
    }
}

fn io(e: StoreError) -> StorageError {
    StorageError::Io(e.0)
}

/// The committed state as this hook call sees it: the view in `slot`,
/// opened at the call's first read.
fn view<'a>(
    slot: &'a mut Option<Box<dyn KvReader>>,
    backend: &dyn KvBackend,
    ns: &str,
) -> Result<&'a dyn KvReader, StorageError> {
    Ok(match slot {
        Some(reader) => &**reader,
        None => &**slot.insert(backend.reader(ns).map_err(io)?),
    })
}

impl wit::Host for StorageCtx {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Result<Option<Versioned>, StorageError>> {
        Ok((|| {
            self.check_key(&key)?;
            Ok(self
                .current(&key)?
                .map(|(value, version)| Versioned { value, version }))
        })())
    }

    fn put(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<Version, StorageError>> {
        Ok((|| {
            self.check_key(&key)?;
            self.check_value(&value)?;
            Ok(self.write(key, Some(value))?.unwrap_or_default())
        })())
    }

    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<Result<bool, StorageError>> {
        Ok((|| {
            self.check_key(&key)?;
            let existed = self.current(&key)?.is_some();
            if existed {
                self.write(key, None)?;
            }
            Ok(existed)
        })())
    }

    fn scan(
        &mut self,
        prefix: Vec<u8>,
        start_after: Option<Vec<u8>>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<KeyValue>, StorageError>> {
        Ok((|| {
            self.check_key(&prefix)?;
            let limit = limit.clamp(1, 1000) as usize;
            let in_range =
                |k: &Vec<u8>| k.starts_with(&prefix) && start_after.as_ref().is_none_or(|a| k > a);
            let reader = view(&mut self.reader, &*self.backend, &self.ns)?;
            let pending: Vec<_> = self.overlay.iter().filter(|(k, _)| in_range(k)).collect();
            // Deleted or overwritten keys in the overlay may hide stored ones,
            // so read enough stored keys to still fill the page.
            let stored = reader
                .scan(&prefix, start_after.as_deref(), limit + pending.len())
                .map_err(io)?;
            let mut merged: BTreeMap<Vec<u8>, (Vec<u8>, u64)> = stored
                .into_iter()
                .map(|(k, v, ver)| (k, (v, ver)))
                .collect();
            for (k, w) in pending {
                match w {
                    Some(v) => merged.insert(k.clone(), v.clone()),
                    None => merged.remove(k),
                };
            }
            Ok(merged
                .into_iter()
                .take(limit)
                .map(|(key, (value, version))| KeyValue {
                    key,
                    value: Versioned { value, version },
                })
                .collect())
        })())
    }

    fn compare_and_swap(
        &mut self,
        key: Vec<u8>,
        expected: Option<Version>,
        value: Option<Vec<u8>>,
    ) -> wasmtime::Result<Result<Option<Version>, StorageError>> {
        Ok((|| {
            self.check_key(&key)?;
            if let Some(v) = &value {
                self.check_value(v)?;
            }
            let current = self.current(&key)?.map(|(_, v)| v);
            if current != expected {
                return Err(StorageError::VersionMismatch(current));
            }
            if value.is_none() && current.is_none() {
                return Ok(None);
            }
            self.write(key, value)
        })())
    }

    fn batch(&mut self, ops: Vec<BatchOp>) -> wasmtime::Result<Result<Vec<Version>, StorageError>> {
        Ok((|| {
            for op in &ops {
                match op {
                    BatchOp::Put((k, v)) => {
                        self.check_key(k)?;
                        self.check_value(v)?;
                    }
                    BatchOp::Delete(k) => self.check_key(k)?,
                    BatchOp::Check((k, expected)) => {
                        self.check_key(k)?;
                        let current = self.current(k)?.map(|(_, v)| v);
                        if current != *expected {
                            return Err(StorageError::VersionMismatch(current));
                        }
                    }
                }
            }
            let size: u64 = ops
                .iter()
                .map(|op| match op {
                    BatchOp::Put((k, v)) => (k.len() + v.len()) as u64,
                    BatchOp::Delete(k) => k.len() as u64,
                    BatchOp::Check(_) => 0,
                })
                .sum();
            if self.overlay_bytes.saturating_add(size) > self.limits.max_txn_bytes {
                return Err(StorageError::TooLarge(
                    u32::try_from(self.limits.max_txn_bytes).unwrap_or(u32::MAX),
                ));
            }
            let mut versions = Vec::new();
            for op in ops {
                match op {
                    BatchOp::Put((k, v)) => {
                        versions.push(self.write(k, Some(v))?.unwrap_or_default())
                    }
                    BatchOp::Delete(k) => {
                        self.write(k, None)?;
                    }
                    BatchOp::Check(_) => {}
                }
            }
            Ok(versions)
        })())
    }
}

struct Storage;

impl HasData for Storage {
    type Data<'a> = &'a mut StorageCtx;
}

/// Grants `storage`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<PluginState, Storage>(linker, |s| &mut s.storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Result`s of storage calls, compared by their debug form (the
    /// generated error type has no `PartialEq`).
    fn shown<T: std::fmt::Debug>(v: T) -> String {
        format!("{v:?}")
    }
    use crate::cluster::state_store::{Persist, RedbKv};

    /// A context on a real redb file, and a way to end its hook call.
    struct Hook {
        _dir: tempfile::TempDir,
        backend: Arc<dyn KvBackend>,
        ctx: StorageCtx,
    }

    impl Hook {
        fn new() -> Hook {
            Hook::with(CallLimits::default())
        }

        fn with(limits: CallLimits) -> Hook {
            let dir = tempfile::tempdir().unwrap();
            let backend: Arc<dyn KvBackend> =
                Arc::new(RedbKv::open(&dir.path().join("state.redb")).unwrap());
            let ctx = StorageCtx::new("p", backend.clone(), limits);
            Hook {
                _dir: dir,
                backend,
                ctx,
            }
        }

        /// Commits the hook call's writes, as the actor does when it returns.
        fn commit(&mut self) {
            let writes = self.ctx.take_writes();
            self.backend
                .commit("p", writes, None, Persist::Now)
                .unwrap();
        }

        fn put(&mut self, k: &str, v: &str) -> Version {
            wit::Host::put(&mut self.ctx, k.into(), v.into())
                .unwrap()
                .unwrap()
        }

        fn get(&mut self, k: &str) -> Option<(Vec<u8>, Version)> {
            wit::Host::get(&mut self.ctx, k.into())
                .unwrap()
                .unwrap()
                .map(|v| (v.value, v.version))
        }

        fn scan(&mut self, prefix: &str, limit: u32) -> Vec<String> {
            wit::Host::scan(&mut self.ctx, prefix.into(), None, limit)
                .unwrap()
                .unwrap()
                .into_iter()
                .map(|kv| String::from_utf8(kv.key).unwrap())
                .collect()
        }
    }

    #[test]
    fn cas_with_stale_version_is_rejected_with_the_current_one() {
        let mut h = Hook::new();
        let v1 = h.put("k", "a");
        h.commit();
        let cas = |h: &mut Hook, expected, value: Option<&str>| {
            wit::Host::compare_and_swap(&mut h.ctx, b"k".to_vec(), expected, value.map(Into::into))
                .unwrap()
        };
        let stale = shown(Err::<(), _>(StorageError::VersionMismatch(Some(v1))));
        assert_eq!(shown(cas(&mut h, Some(v1 + 100), Some("b"))), stale);
        assert_eq!(shown(cas(&mut h, None, Some("b"))), stale);
        let v2 = cas(&mut h, Some(v1), Some("b")).unwrap().unwrap();
        assert!(v2 > v1);
        // Deleting by version; then `None` means "must not exist".
        assert_eq!(shown(cas(&mut h, Some(v2), None)), "Ok(None)");
        assert!(cas(&mut h, None, Some("c")).unwrap().is_some());
        h.commit();
        assert_eq!(h.get("k").unwrap().0, b"c");
    }

    #[test]
    fn a_batch_with_a_failed_check_writes_nothing() {
        let mut h = Hook::new();
        let v = h.put("a", "1");
        h.commit();
        let ops = vec![
            BatchOp::Put((b"b".to_vec(), b"2".to_vec())),
            BatchOp::Check((b"a".to_vec(), Some(v + 1))),
        ];
        assert_eq!(
            shown(wit::Host::batch(&mut h.ctx, ops).unwrap()),
            shown(Err::<(), _>(StorageError::VersionMismatch(Some(v))))
        );
        assert_eq!(h.get("b"), None);
        let ops = vec![
            BatchOp::Check((b"a".to_vec(), Some(v))),
            BatchOp::Put((b"b".to_vec(), b"2".to_vec())),
            BatchOp::Delete(b"a".to_vec()),
        ];
        let versions = wit::Host::batch(&mut h.ctx, ops).unwrap().unwrap();
        assert_eq!(versions.len(), 1);
        h.commit();
        assert_eq!(h.get("a"), None);
        assert_eq!(h.get("b").unwrap(), (b"2".to_vec(), versions[0]));
    }

    #[test]
    fn a_scan_sees_the_hooks_own_writes_and_deletes_merged_with_storage() {
        let mut h = Hook::new();
        for k in ["k1", "k2", "k3", "k4"] {
            h.put(k, "stored");
        }
        h.commit();
        // In the next hook call: two deletes hide stored keys, a new key
        // and an overwrite show, and the page is still full.
        wit::Host::delete(&mut h.ctx, b"k1".to_vec())
            .unwrap()
            .unwrap();
        wit::Host::delete(&mut h.ctx, b"k2".to_vec())
            .unwrap()
            .unwrap();
        h.put("k25", "new");
        h.put("k3", "changed");
        assert_eq!(h.scan("k", 3), ["k25", "k3", "k4"]);
        assert_eq!(h.get("k3").unwrap().0, b"changed");
        // A trap drops them: storage is as it was.
        h.ctx.discard();
        assert_eq!(h.scan("k", 10), ["k1", "k2", "k3", "k4"]);
    }

    #[test]
    fn keys_values_and_a_hooks_writes_are_bounded() {
        let limits = CallLimits {
            max_key_bytes: 16,
            max_value_bytes: 100,
            max_txn_bytes: 1000,
            ..CallLimits::default()
        };
        let mut h = Hook::with(limits);
        let long_key = vec![b'k'; limits.max_key_bytes as usize + 1];
        assert_eq!(
            shown(wit::Host::put(&mut h.ctx, long_key, b"v".to_vec()).unwrap()),
            shown(Err::<(), _>(StorageError::TooLarge(limits.max_key_bytes)))
        );
        let big = vec![0u8; limits.max_value_bytes as usize + 1];
        assert_eq!(
            shown(wit::Host::put(&mut h.ctx, b"k".to_vec(), big).unwrap()),
            shown(Err::<(), _>(StorageError::TooLarge(limits.max_value_bytes)))
        );
        // Values that fit, until the hook call's total is spent.
        let value = vec![0u8; limits.max_value_bytes as usize];
        let mut refused = None;
        for i in 0..=(limits.max_txn_bytes / limits.max_value_bytes as u64) + 1 {
            if let Err(e) =
                wit::Host::put(&mut h.ctx, format!("k{i}").into(), value.clone()).unwrap()
            {
                refused = Some(e);
                break;
            }
        }
        assert!(
            matches!(refused, Some(StorageError::TooLarge(_))),
            "{refused:?}"
        );
    }
}
