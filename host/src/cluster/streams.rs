//! Per-plugin streams of committed entries, as both log engines keep them:
//! a redb table keyed by `(stream, index)` and a watch per stream that
//! reports its last committed index.

use std::collections::HashMap;
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::log::{Entry, LogError};

/// `(stream, index)` → `term (8 bytes LE) ++ data`.
pub const ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("entries");

/// Encodes a stored entry value.
pub fn encode(term: u64, data: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&term.to_le_bytes());
    buf.extend_from_slice(data);
}

pub(crate) fn err(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(e.to_string())
}

/// Committed entries of `stream` with `after < index <= through`.
pub fn read(
    db: &Database,
    stream: &str,
    after: u64,
    through: u64,
    max: usize,
) -> Result<Vec<Entry>, LogError> {
    let mut out = Vec::new();
    if after >= through {
        return Ok(out);
    }
    let txn = db.begin_read().map_err(err)?;
    let table = txn.open_table(ENTRIES).map_err(err)?;
    for item in table
        .range((stream, after + 1)..=(stream, through))
        .map_err(err)?
    {
        let (k, v) = item.map_err(err)?;
        let (term, data) = v
            .value()
            .split_first_chunk::<8>()
            .map(|(t, d)| (u64::from_le_bytes(*t), d.to_vec()))
            .ok_or_else(|| LogError::Storage("corrupt log entry".into()))?;
        out.push(Entry {
            index: k.value().1,
            term,
            data,
        });
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

/// The last host control entry (a cluster-wide swap) of `stream` at or
/// below `through`, as `(index, data)`.
pub fn last_control(
    db: &Database,
    stream: &str,
    through: u64,
) -> Result<Option<(u64, Vec<u8>)>, LogError> {
    let txn = db.begin_read().map_err(err)?;
    control_in(&txn.open_table(ENTRIES).map_err(err)?, stream, through)
}

/// [`last_control`] in an open stream table.
pub fn control_in(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    stream: &str,
    through: u64,
) -> Result<Option<(u64, Vec<u8>)>, LogError> {
    for item in table
        .range((stream, 0)..=(stream, through))
        .map_err(err)?
        .rev()
    {
        let (k, v) = item.map_err(err)?;
        let data = v.value().get(8..).unwrap_or_default();
        if data.first() == Some(&crate::primitives::consensus::TAG_CONTROL) {
            return Ok(Some((k.value().1, data.to_vec())));
        }
    }
    Ok(None)
}

/// The last index of `stream` (0 when empty).
pub fn last(db: &Database, stream: &str) -> Result<u64, LogError> {
    let txn = db.begin_read().map_err(err)?;
    let table = txn.open_table(ENTRIES).map_err(err)?;
    let last = table
        .range((stream, 0)..=(stream, u64::MAX))
        .map_err(err)?
        .next_back()
        .transpose()
        .map_err(err)?
        .map_or(0, |(k, _)| k.value().1);
    Ok(last)
}

/// The watches: the whole log's commit index and each stream's.
pub struct Watches {
    commit: watch::Sender<u64>,
    streams: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Watches {
    /// Watches starting at commit index `commit`.
    pub fn new(commit: u64) -> Self {
        Watches {
            commit: watch::Sender::new(commit),
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// The commit index.
    pub fn commit_index(&self) -> u64 {
        *self.commit.borrow()
    }

    /// Waits until the commit index reaches `index`.
    pub async fn wait_for(&self, index: u64) {
        let mut rx = self.commit.subscribe();
        let _ = rx.wait_for(|i| *i >= index).await;
    }

    /// Publishes new commits: the log's index and each stream's last.
    pub fn publish(&self, commit: u64, per_stream: HashMap<String, u64>) {
        let mut streams = self.streams.lock().expect("stream map poisoned");
        for (stream, last) in per_stream {
            streams
                .entry(stream)
                .or_insert_with(|| watch::Sender::new(0))
                .send_replace(last);
        }
        drop(streams);
        self.commit.send_replace(commit);
    }

    /// Resets every stream watch from the table (after a snapshot install).
    pub fn reload(&self, db: &Database, commit: u64) -> Result<(), LogError> {
        let streams = self.streams.lock().expect("stream map poisoned");
        for (stream, tx) in streams.iter() {
            tx.send_replace(last(db, stream)?);
        }
        drop(streams);
        self.commit.send_replace(commit);
        Ok(())
    }

    /// A receiver of `stream`'s last committed index.
    pub fn subscribe(&self, db: &Database, stream: &str) -> Result<watch::Receiver<u64>, LogError> {
        let mut streams = self.streams.lock().expect("stream map poisoned");
        if let Some(tx) = streams.get(stream) {
            return Ok(tx.subscribe());
        }
        let tx = watch::Sender::new(last(db, stream)?);
        let rx = tx.subscribe();
        streams.insert(stream.to_string(), tx);
        Ok(rx)
    }
}
