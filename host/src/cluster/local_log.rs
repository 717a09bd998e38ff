//! The single-node consensus log: a durable, totally ordered log in its own
//! redb file, with group commit.
//!
//! Concurrent proposals from all plugins are coalesced by one writer task
//! into a single redb transaction and a single fsync, then acknowledged.
//! A node alone is its own quorum, so "committed" means "fsynced here".

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

use super::log::{BoxFuture, ConsensusBackend, Entry, LogError, LogStats};
use super::streams::{self, ENTRIES, Watches, err};

/// "last-index" → the highest index written.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const TERM: u64 = 1;
/// Most proposals written in one transaction.
const MAX_GROUP: usize = 1024;

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
        let db = Database::create(path).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        let last = {
            txn.open_table(ENTRIES).map_err(err)?;
            let meta = txn.open_table(META).map_err(err)?;
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
        let result = tokio::task::spawn_blocking(move || write_group(&s, &batch))
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
            }
            Err(e) => {
                for p in group.drain(..) {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
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
        let mut table = txn.open_table(ENTRIES).map_err(err)?;
        let mut buf = Vec::new();
        for (i, (stream, data)) in batch.iter().enumerate() {
            streams::encode(TERM, data, &mut buf);
            table
                .insert((stream.as_str(), last + 1 + i as u64), buf.as_slice())
                .map_err(err)?;
        }
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
        streams::last_control(&self.shared.db, stream, through)
    }

    fn entries(
        &self,
        stream: &str,
        after: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<Entry>, LogError> {
        streams::read(&self.shared.db, stream, after, through, max)
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
            ..LogStats::default()
        }
    }
}
