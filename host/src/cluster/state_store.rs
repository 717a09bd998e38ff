//! Node-local plugin storage on redb: one database, one key namespace per
//! plugin, and the per-plugin "applied through" log index kept in the same
//! transactions as the plugin's writes.
//!
//! Writes made by applying committed log entries may reach the disk a
//! little later than the others, at the next [`Checkpoints`] point: the log
//! holds the entries, and a node that crashed before the checkpoint applies
//! them again from the applied index that did reach the disk.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// `(namespace, key)` → `version (8 bytes LE) ++ value`.
const KV: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("kv");
/// namespace → last log index whose effects are in `KV`.
const APPLIED: TableDefinition<&str, u64> = TableDefinition::new("applied");
/// "version" → a bound, on disk, above every version ever committed.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Keys under this prefix are the node's own (a shard's data, a cache):
/// consensus snapshots neither carry them nor replace them, since no log
/// entry wrote them. Only [`KvBackend::purge`] removes them.
pub const NODE_LOCAL: &[u8] = b"\xffnode/";

/// Versions reserved on disk at a time: a commit that would pass the bound
/// raises it by this much and is made durable.
const VERSION_LEASE: u64 = 1 << 20;
/// Longest a replayable commit stays off the disk.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// When a commit must reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Before the commit returns.
    Now,
    /// By the next checkpoint: the writes come from applying log entries
    /// after an applied index that is on disk, and are made again by
    /// applying them again after a crash.
    Replayable,
}

/// Decides which commits to a redb file are durable: all that must be, and
/// a replayable one once [`CHECKPOINT_EVERY`] has passed since the last
/// durable commit. A durable commit also makes every earlier one durable,
/// and lets redb reuse the pages they freed.
#[derive(Debug)]
pub struct Checkpoints {
    last: Mutex<Instant>,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Checkpoints {
            last: Mutex::new(Instant::now()),
        }
    }
}

impl Checkpoints {
    /// The durability of the next commit, which is `persist`.
    pub fn durability(&self, persist: Persist) -> redb::Durability {
        let mut last = self.last.lock().expect("checkpoints poisoned");
        if persist == Persist::Now || last.elapsed() >= CHECKPOINT_EVERY {
            *last = Instant::now();
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        }
    }
}

/// A failure of the storage engine (I/O, corruption). Definite: the
/// operation did not take effect.
#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A key with its value and version, as a scan returns it.
pub type Item = (Vec<u8>, Vec<u8>, u64);

/// One write of a transaction: a new value with its version, or a delete.
pub type Write = (Vec<u8>, Option<(Vec<u8>, u64)>);

/// The durable key-value backend behind the `storage` interface.
///
/// To be correct, an implementation must make `commit` atomic (all writes
/// and the applied index, or nothing), durable before it returns unless it
/// is [`Persist::Replayable`], and, when it loses replayable commits in a
/// crash, lose the later ones too; and it must hand out versions from
/// `next_version` that are greater than any version it has ever committed,
/// lost commits included.
pub trait KvBackend: Send + Sync + 'static {
    /// A view of namespace `ns` as committed now, which later commits do
    /// not change: the reads of one hook call go through one view.
    fn reader(&self, ns: &str) -> Result<Box<dyn KvReader>, StoreError>;
    /// Applies `writes` and, when given, records `applied` as the namespace's
    /// applied log index, atomically; durably as `persist` says.
    fn commit(
        &self,
        ns: &str,
        writes: Vec<Write>,
        applied: Option<u64>,
        persist: Persist,
    ) -> Result<(), StoreError>;
    /// The namespace's applied log index and all its keys but the
    /// [`NODE_LOCAL`] ones, read at one point.
    fn export(&self, ns: &str) -> Result<(u64, Vec<Item>), StoreError>;
    /// Replaces every key of the namespace but the [`NODE_LOCAL`] ones by
    /// `items` and its applied log index by `applied`, atomically and
    /// durably. The items get fresh versions of this store: theirs came
    /// from another node's counter.
    fn replace(&self, ns: &str, items: Vec<Item>, applied: u64) -> Result<(), StoreError>;
    /// Removes every key of the namespace, [`NODE_LOCAL`] ones too, and
    /// records `applied` as its applied index; how many keys there were.
    fn purge(&self, ns: &str, applied: u64) -> Result<usize, StoreError>;
    /// The namespace's applied log index (0 when none).
    fn applied_index(&self, ns: &str) -> Result<u64, StoreError>;
    /// A fresh version, greater than every version committed so far.
    fn next_version(&self) -> u64;
}

/// A read view of one namespace (see [`KvBackend::reader`]).
pub trait KvReader: Send {
    /// Reads one key: value and version.
    fn get(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, StoreError>;
    /// Keys starting with `prefix`, after `start_after`, in order.
    fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError>;
}

/// [`KvBackend`] on a redb file.
pub struct RedbKv {
    db: Database,
    version: AtomicU64,
    /// The version bound on disk.
    reserved: AtomicU64,
    checkpoints: Checkpoints,
}

impl RedbKv {
    /// Opens (or creates) the database at `path`, and compacts it: the
    /// pages that deleted values left behind are given back, so what a
    /// plugin erased (a tombstoned stream) is not left in the file after
    /// the node restarts.
    pub fn open(path: &Path) -> Result<RedbKv, StoreError> {
        let mut db = Database::create(path).map_err(err)?;
        db.compact().map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        let version = {
            txn.open_table(KV).map_err(err)?;
            txn.open_table(APPLIED).map_err(err)?;
            let meta = txn.open_table(META).map_err(err)?;
            meta.get("version")
                .map_err(err)?
                .map(|v| v.value())
                .unwrap_or(0)
        };
        txn.commit().map_err(err)?;
        Ok(RedbKv {
            db,
            version: AtomicU64::new(version),
            reserved: AtomicU64::new(version),
            checkpoints: Checkpoints::default(),
        })
    }

    /// Keeps the version bound on disk above `version`: when it is not,
    /// raises it in `txn`, which must then be durable. Returns whether it
    /// did.
    fn reserve(&self, txn: &redb::WriteTransaction, version: u64) -> Result<bool, StoreError> {
        if version <= self.reserved.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let bound = version + VERSION_LEASE;
        txn.open_table(META)
            .map_err(err)?
            .insert("version", bound)
            .map_err(err)?;
        Ok(true)
    }

    /// Removes the namespace's keys (the [`NODE_LOCAL`] ones only when
    /// `all`), writes `items` with fresh versions and records `applied`,
    /// in one durable transaction; how many keys were removed.
    fn rewrite(
        &self,
        ns: &str,
        items: Vec<Item>,
        applied: u64,
        all: bool,
    ) -> Result<usize, StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut max_version = 0;
        let removed;
        let reserved = {
            let mut table = txn.open_table(KV).map_err(err)?;
            let old: Vec<Vec<u8>> = table
                .range((ns, &[][..])..)
                .map_err(err)?
                .map_while(|item| match item {
                    Ok((k, _)) if k.value().0 == ns => Some(Ok(k.value().1.to_vec())),
                    Ok(_) => None,
                    Err(e) => Some(Err(err(e))),
                })
                .filter(|key| {
                    all || key
                        .as_ref()
                        .is_ok_and(|k: &Vec<u8>| !k.starts_with(NODE_LOCAL))
                })
                .collect::<Result<_, _>>()?;
            removed = old.len();
            for key in old {
                table.remove((ns, key.as_slice())).map_err(err)?;
            }
            let mut buf = Vec::new();
            for (key, value, _) in &items {
                let version = self.next_version();
                encode_value(version, value, &mut buf);
                table
                    .insert((ns, key.as_slice()), buf.as_slice())
                    .map_err(err)?;
                max_version = max_version.max(version);
            }
            let reserved = self.reserve(&txn, max_version)?;
            txn.open_table(APPLIED)
                .map_err(err)?
                .insert(ns, applied)
                .map_err(err)?;
            reserved
        };
        txn.commit().map_err(err)?;
        if reserved {
            self.reserved
                .fetch_max(max_version + VERSION_LEASE, Ordering::Relaxed);
        }
        Ok(removed)
    }
}

fn encode_value(version: u64, value: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&version.to_le_bytes());
    buf.extend_from_slice(value);
}

fn decode_value(raw: &[u8]) -> Result<(Vec<u8>, u64), StoreError> {
    let (head, value) = raw
        .split_first_chunk::<8>()
        .ok_or_else(|| StoreError("corrupt value: shorter than its version".into()))?;
    Ok((value.to_vec(), u64::from_le_bytes(*head)))
}

/// A redb read transaction on the `KV` table, limited to one namespace.
struct RedbReader {
    ns: String,
    table: redb::ReadOnlyTable<(&'static str, &'static [u8]), &'static [u8]>,
}

impl KvReader for RedbReader {
    fn get(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        match self.table.get((self.ns.as_str(), key)).map_err(err)? {
            Some(v) => decode_value(v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError> {
        let ns = self.ns.as_str();
        let start = match start_after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let mut out = Vec::new();
        for item in self.table.range((ns, start)..).map_err(err)? {
            let (k, v) = item.map_err(err)?;
            let (k_ns, key) = k.value();
            if k_ns != ns || !key.starts_with(prefix) {
                break;
            }
            if start_after == Some(key) {
                continue;
            }
            let (value, version) = decode_value(v.value())?;
            out.push((key.to_vec(), value, version));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

impl KvBackend for RedbKv {
    fn reader(&self, ns: &str) -> Result<Box<dyn KvReader>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        Ok(Box::new(RedbReader {
            ns: ns.to_string(),
            table: txn.open_table(KV).map_err(err)?,
        }))
    }

    fn commit(
        &self,
        ns: &str,
        writes: Vec<Write>,
        applied: Option<u64>,
        persist: Persist,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(err)?;
        let mut reserved = None;
        {
            let mut table = txn.open_table(KV).map_err(err)?;
            let mut max_version = 0;
            let mut buf = Vec::new();
            for (key, write) in &writes {
                match write {
                    Some((value, version)) => {
                        encode_value(*version, value, &mut buf);
                        table
                            .insert((ns, key.as_slice()), buf.as_slice())
                            .map_err(err)?;
                        max_version = max_version.max(*version);
                    }
                    None => {
                        table.remove((ns, key.as_slice())).map_err(err)?;
                    }
                }
            }
            if self.reserve(&txn, max_version)? {
                reserved = Some(max_version + VERSION_LEASE);
            }
            if let Some(index) = applied {
                let mut t = txn.open_table(APPLIED).map_err(err)?;
                t.insert(ns, index).map_err(err)?;
            }
        }
        let persist = if reserved.is_some() {
            Persist::Now
        } else {
            persist
        };
        txn.set_durability(self.checkpoints.durability(persist))
            .map_err(err)?;
        txn.commit().map_err(err)?;
        if let Some(bound) = reserved {
            self.reserved.fetch_max(bound, Ordering::Relaxed);
        }
        Ok(())
    }

    fn export(&self, ns: &str) -> Result<(u64, Vec<Item>), StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let applied = txn
            .open_table(APPLIED)
            .map_err(err)?
            .get(ns)
            .map_err(err)?
            .map_or(0, |v| v.value());
        let table = txn.open_table(KV).map_err(err)?;
        let mut items = Vec::new();
        for item in table.range((ns, &[][..])..).map_err(err)? {
            let (k, v) = item.map_err(err)?;
            let (k_ns, key) = k.value();
            if k_ns != ns {
                break;
            }
            if key.starts_with(NODE_LOCAL) {
                continue;
            }
            let (value, version) = decode_value(v.value())?;
            items.push((key.to_vec(), value, version));
        }
        Ok((applied, items))
    }

    fn replace(&self, ns: &str, items: Vec<Item>, applied: u64) -> Result<(), StoreError> {
        self.rewrite(ns, items, applied, false).map(drop)
    }

    fn purge(&self, ns: &str, applied: u64) -> Result<usize, StoreError> {
        self.rewrite(ns, Vec::new(), applied, true)
    }

    fn applied_index(&self, ns: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(APPLIED).map_err(err)?;
        Ok(table.get(ns).map_err(err)?.map(|v| v.value()).unwrap_or(0))
    }

    fn next_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, RedbKv) {
        let dir = tempfile::tempdir().unwrap();
        let kv = RedbKv::open(&dir.path().join("state.redb")).unwrap();
        (dir, kv)
    }

    #[test]
    fn namespaces_do_not_see_each_other() {
        let (_d, kv) = store();
        let v = kv.next_version();
        kv.commit(
            "a",
            vec![(b"k".to_vec(), Some((b"1".to_vec(), v)))],
            None,
            Persist::Now,
        )
        .unwrap();
        assert_eq!(
            kv.reader("a").unwrap().get(b"k").unwrap(),
            Some((b"1".to_vec(), v))
        );
        assert_eq!(kv.reader("b").unwrap().get(b"k").unwrap(), None);
        assert!(
            kv.reader("b")
                .unwrap()
                .scan(b"", None, 10)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn scan_pages_by_prefix_in_key_order() {
        let (_d, kv) = store();
        let writes = ["x/3", "x/1", "y/1", "x/2"]
            .iter()
            .map(|k| {
                (
                    k.as_bytes().to_vec(),
                    Some((b"v".to_vec(), kv.next_version())),
                )
            })
            .collect();
        kv.commit("p", writes, None, Persist::Now).unwrap();
        let page = kv.reader("p").unwrap().scan(b"x/", None, 2).unwrap();
        let keys: Vec<_> = page.iter().map(|(k, _, _)| k.clone()).collect();
        assert_eq!(keys, vec![b"x/1".to_vec(), b"x/2".to_vec()]);
        let page = kv
            .reader("p")
            .unwrap()
            .scan(b"x/", Some(b"x/2"), 2)
            .unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].0, b"x/3".to_vec());
    }

    #[test]
    fn node_local_keys_stay_out_of_snapshots_until_a_purge() {
        let (_d, kv) = store();
        let local = [NODE_LOCAL, b"shard/k"].concat();
        let (v1, v2) = (kv.next_version(), kv.next_version());
        kv.commit(
            "a",
            vec![
                (b"applied".to_vec(), Some((b"1".to_vec(), v1))),
                (local.clone(), Some((b"mine".to_vec(), v2))),
            ],
            Some(5),
            Persist::Now,
        )
        .unwrap();
        let (_, items) = kv.export("a").unwrap();
        assert_eq!(items, vec![(b"applied".to_vec(), b"1".to_vec(), v1)]);
        kv.replace("a", vec![(b"other".to_vec(), b"2".to_vec(), v1)], 9)
            .unwrap();
        let reader = kv.reader("a").unwrap();
        assert_eq!(reader.get(&local).unwrap(), Some((b"mine".to_vec(), v2)));
        assert_eq!(reader.get(b"applied").unwrap(), None);
        assert_eq!(kv.purge("a", 12).unwrap(), 2);
        assert_eq!(kv.reader("a").unwrap().get(&local).unwrap(), None);
        assert_eq!(kv.applied_index("a").unwrap(), 12);
    }

    #[test]
    fn a_namespace_exports_and_is_replaced_whole() {
        let (_d, kv) = store();
        let (v1, v2) = (kv.next_version(), kv.next_version());
        kv.commit(
            "a",
            vec![
                (b"k1".to_vec(), Some((b"1".to_vec(), v1))),
                (b"k2".to_vec(), Some((b"2".to_vec(), v2))),
            ],
            Some(5),
            Persist::Now,
        )
        .unwrap();
        kv.commit(
            "b",
            vec![(b"k1".to_vec(), Some((b"x".to_vec(), v1)))],
            Some(3),
            Persist::Now,
        )
        .unwrap();
        let (applied, items) = kv.export("a").unwrap();
        assert_eq!(applied, 5);
        assert_eq!(
            items,
            vec![
                (b"k1".to_vec(), b"1".to_vec(), v1),
                (b"k2".to_vec(), b"2".to_vec(), v2),
            ]
        );
        // Another node's state, with a version from its own counter, which
        // this store may already have handed out.
        kv.replace("a", vec![(b"k3".to_vec(), b"3".to_vec(), v1)], 40)
            .unwrap();
        let (applied, items) = kv.export("a").unwrap();
        assert_eq!(applied, 40);
        assert_eq!(items.len(), 1);
        assert_eq!((&items[0].0[..], &items[0].1[..]), (&b"k3"[..], &b"3"[..]));
        assert!(items[0].2 > v2, "restored keys get fresh versions");
        assert_eq!(
            kv.reader("b").unwrap().get(b"k1").unwrap(),
            Some((b"x".to_vec(), v1))
        );
    }

    #[test]
    fn versions_keep_growing_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let first = {
            let kv = RedbKv::open(&path).unwrap();
            let v = kv.next_version();
            kv.commit(
                "n",
                vec![(b"k".to_vec(), Some((b"v".to_vec(), v)))],
                Some(7),
                Persist::Now,
            )
            .unwrap();
            // Maybe lost on reopen, but its version is never reused.
            let replayable = kv.next_version();
            kv.commit(
                "n",
                vec![(b"k".to_vec(), Some((b"w".to_vec(), replayable)))],
                Some(8),
                Persist::Replayable,
            )
            .unwrap();
            replayable
        };
        let kv = RedbKv::open(&path).unwrap();
        assert!(kv.next_version() > first);
        assert!(kv.applied_index("n").unwrap() >= 7);
    }
}
