//! The single-node consensus log: a durable, totally ordered log in its own
//! redb file, with group commit.
//!
//! Concurrent proposals from all plugins are coalesced by one writer task
//! into a single redb transaction and a single fsync, then acknowledged.
//! A node alone is its own quorum, so "committed" means "fsynced here".
//!
//! Every [`COMPACT_EVERY`] entries the streams are compacted behind the
//! plugins' state, as a cluster compacts them behind its snapshots.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

use super::compaction::{self, Compaction};
use super::log::{BoxFuture, Capture, ConsensusBackend, Entry, LogError, LogStats, RestorePoint};
use super::streams::{self, RUNS, Watches, err};
use crate::runtime::metrics::Histogram;

/// "last-index" → the highest index written.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The layout of the file, recorded in `meta` as "format": 1 keeps the
/// streams in runs.
const FORMAT: u64 = 1;

const TERM: u64 = 1;
/// Most proposals written in one transaction.
const MAX_GROUP: usize = 1024;
/// Entries between two compactions of the streams.
pub const COMPACT_EVERY: u64 = 20_000;

struct Proposal {
    stream: String,
    data: Vec<u8>,
    reply: oneshot::Sender<Result<u64, LogError>>,
}

struct Shared {
    db: Database,
    node: String,
    watches: Watches,
    proposals: AtomicU64,
    writes: AtomicU64,
    compaction: Compaction,
    /// Entries written since the last compaction started.
    since_compaction: AtomicU64,
    compact_every: u64,
    compacting: AtomicBool,
    compactions: AtomicU64,
    /// How long each durable write took, commit and fsync.
    write_time: Mutex<Histogram>,
}

/// The single-node [`ConsensusBackend`].
pub struct LocalLog {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Proposal>,
}

impl LocalLog {
    /// Opens (or creates) the log at `path` and starts its writer task.
    /// Must be called inside a tokio runtime.
    pub fn open(path: &Path, node: &str) -> Result<LocalLog, LogError> {
        LocalLog::open_with(path, node, COMPACT_EVERY)
    }

    /// [`open`](Self::open), compacting every `compact_every` entries.
    pub fn open_with(path: &Path, node: &str, compact_every: u64) -> Result<LocalLog, LogError> {
        let db = Database::create(path).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        let compaction = Compaction::open(&txn)?;
        let last = {
            streams::open_tables(&txn)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            let format = meta.get("format").map_err(err)?.map(|v| v.value());
            match format {
                Some(FORMAT) => {}
                Some(newer) if newer > FORMAT => {
                    return Err(LogError::Storage(format!(
                        "{} was written by a newer version (format {newer}; this one reads {FORMAT})",
                        path.display()
                    )));
                }
                // New, or written before runs: `open_tables` converted it.
                _ => {
                    meta.insert("format", FORMAT).map_err(err)?;
                }
            }
            meta.get("last-index")
                .map_err(err)?
                .map(|v| v.value())
                .unwrap_or(0)
        };
        txn.commit().map_err(err)?;
        let shared = Arc::new(Shared {
            db,
            node: node.to_string(),
            watches: Watches::new(last),
            proposals: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            compaction,
            since_compaction: AtomicU64::new(0),
            compact_every,
            compacting: AtomicBool::new(false),
            compactions: AtomicU64::new(0),
            write_time: Mutex::default(),
        });
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        tokio::spawn(writer(shared.clone(), rx));
        Ok(LocalLog { shared, tx })
    }
}

async fn writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Proposal>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let batch: Vec<(String, Vec<u8>)> = group
            .iter_mut()
            .map(|p| (p.stream.clone(), std::mem::take(&mut p.data)))
            .collect();
        let s = shared.clone();
        let result = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let written = write_group(&s, &batch);
            s.write_time
                .lock()
                .expect("write times poisoned")
                .observe(started.elapsed().as_secs_f64());
            written
        })
        .await
        .unwrap_or_else(|e| Err(err(e)));
        match result {
            Ok(first) => {
                shared.writes.fetch_add(1, Ordering::Relaxed);
                shared
                    .proposals
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                let last = first + group.len() as u64 - 1;
                let per_stream: HashMap<String, u64> = group
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p.stream.clone(), first + i as u64))
                    .collect();
                // Publish before acknowledging, so a proposer that reads its
                // stream right away finds its entry counted.
                shared.watches.publish(last, per_stream);
                for (i, p) in group.drain(..).enumerate() {
                    let _ = p.reply.send(Ok(first + i as u64));
                }
                let written = last + 1 - first;
                let since = shared
                    .since_compaction
                    .fetch_add(written, Ordering::Relaxed)
                    + written;
                if since >= shared.compact_every && !shared.compacting.swap(true, Ordering::AcqRel)
                {
                    shared.since_compaction.store(0, Ordering::Relaxed);
                    tokio::spawn(compact(shared.clone(), last));
                }
            }
            Err(e) => {
                for p in group.drain(..) {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Compacts the streams behind the state of the plugins running here.
async fn compact(shared: Arc<Shared>, last: u64) {
    let captured = shared.compaction.capture().await;
    let s = shared.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<(), LogError> {
        let txn = s.db.begin_write().map_err(err)?;
        let (_, moved) = compaction::compact(&txn, captured, last, false)?;
        s.compaction.commit(txn, |floors| floors.extend(moved))
    })
    .await
    .unwrap_or_else(|e| Err(err(e)));
    match result {
        Ok(()) => {
            shared.compactions.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!("compacting the log's streams: {e}"),
    }
    shared.compacting.store(false, Ordering::Release);
}

fn write_group(shared: &Shared, batch: &[(String, Vec<u8>)]) -> Result<u64, LogError> {
    let txn = shared.db.begin_write().map_err(err)?;
    let first = {
        let mut meta = txn.open_table(META).map_err(err)?;
        let last = meta
            .get("last-index")
            .map_err(err)?
            .map(|v| v.value())
            .unwrap_or(0);
        let mut runs = streams::Runs::default();
        for ((stream, data), index) in batch.iter().zip(last + 1..) {
            runs.push(stream, index, TERM, data)?;
        }
        runs.write(&mut txn.open_table(RUNS).map_err(err)?)?;
        meta.insert("last-index", last + batch.len() as u64)
            .map_err(err)?;
        last + 1
    };
    txn.commit().map_err(err)?;
    Ok(first)
}

impl ConsensusBackend for LocalLog {
    fn propose(&self, stream: &str, data: Vec<u8>) -> BoxFuture<'static, Result<u64, LogError>> {
        let tx = self.tx.clone();
        let stream = stream.to_string();
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            tx.send(Proposal {
                stream,
                data,
                reply,
            })
            .await
            .map_err(|_| LogError::ShuttingDown)?;
            rx.await.map_err(|_| LogError::ShuttingDown)?
        })
    }

    fn read_index(&self) -> BoxFuture<'static, Result<u64, LogError>> {
        // Alone, this node is always the leader and every acknowledged entry
        // is already in its log.
        let index = self.shared.watches.commit_index();
        Box::pin(async move { Ok(index) })
    }

    fn last_control(&self, stream: &str, through: u64) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        compaction::last_control(&self.shared.db, stream, through)
    }

    fn restore_point(&self, stream: &str) -> Result<Option<RestorePoint>, LogError> {
        compaction::restore_point(&self.shared.db, stream)
    }

    fn set_capture(&self, capture: Arc<dyn Capture>) {
        self.shared.compaction.set_capture(capture);
    }

    fn entries(
        &self,
        stream: &str,
        after: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<Entry>, LogError> {
        self.shared
            .compaction
            .entries(&self.shared.db, stream, after, through, max)
    }

    fn subscribe(&self, stream: &str) -> Result<watch::Receiver<u64>, LogError> {
        self.shared.watches.subscribe(&self.shared.db, stream)
    }

    fn leader(&self) -> Option<String> {
        Some(self.shared.node.clone())
    }

    fn term(&self) -> u64 {
        TERM
    }

    fn commit_index(&self) -> u64 {
        self.shared.watches.commit_index()
    }

    fn stats(&self) -> LogStats {
        LogStats {
            proposals: self.shared.proposals.load(Ordering::Relaxed),
            writes: self.shared.writes.load(Ordering::Relaxed),
            snapshots_built: self.shared.compactions.load(Ordering::Relaxed),
            log_writes: self
                .shared
                .write_time
                .lock()
                .expect("write times poisoned")
                .clone(),
            ..LogStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::compaction::AppliedThrough;
    use redb::ReadableDatabase;
    use std::time::Duration;

    #[tokio::test]
    async fn a_file_of_a_newer_format_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", 99).unwrap();
            txn.commit().unwrap();
        }
        let Err(e) = LocalLog::open(&path, "n") else {
            panic!("a newer file was opened");
        };
        assert!(e.to_string().contains("newer version (format 99"), "{e}");
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get("format").unwrap().unwrap().value(), 99);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_streams_are_compacted_behind_the_plugins_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let log = LocalLog::open_with(&path, "n", 10).unwrap();
        log.set_capture(Arc::new(AppliedThrough(8)));
        for i in 0..12u8 {
            let stream = if i == 3 { "other" } else { "kv" };
            log.propose(stream, vec![0, i]).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.stats().snapshots_built == 0 {
            assert!(std::time::Instant::now() < deadline, "never compacted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let check = |log: &LocalLog| {
            // kv holds 1, 2, 3, 5, ..., 12; through 8 it is the plugin's
            // state, and 8 marks where that part ends.
            assert!(matches!(
                log.entries("kv", 3, 12, 100),
                Err(LogError::Compacted(7))
            ));
            let after: Vec<u64> = log
                .entries("kv", 8, 12, 100)
                .unwrap()
                .iter()
                .map(|e| e.index)
                .collect();
            assert_eq!(after, vec![9, 10, 11, 12]);
            assert_eq!(log.restore_point("kv").unwrap().unwrap().index, 8);
            assert_eq!(log.entries("other", 0, 12, 100).unwrap().len(), 1);
        };
        check(&log);
        drop(log);
        // The floors survive a restart (once the writer task has let go of
        // the file).
        let log = loop {
            match LocalLog::open(&path, "n") {
                Ok(log) => break log,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "{e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        check(&log);
    }
}
