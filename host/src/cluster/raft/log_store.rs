//! The Raft log in its own redb file: openraft's log storage, every append
//! fsynced before it is acknowledged.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{NodeId, SErr, TypeConfig, check_format, dec, enc, io_err};
use crate::runtime::metrics::Histogram;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const LOG_META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The Raft log in its own redb file. Every write is fsynced before it is
/// acknowledged (`LogFlushed` fires after the commit returns).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The commit index Raft last reported, not yet written: the next
    /// append writes it in its own transaction.
    committed: Arc<Mutex<Option<Option<LogId<NodeId>>>>>,
    /// How long each append took, commit and fsync.
    pub(super) append_time: Arc<Mutex<Histogram>>,
}

impl LogStore {
    /// Opens or creates the log at `path`.
    pub fn open(path: &Path) -> anyhow::Result<LogStore> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        check_format(&txn, LOG_META, path)?;
        txn.commit()?;
        Ok(LogStore {
            db: Arc::new(db),
            committed: Arc::default(),
            append_time: Arc::default(),
        })
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, SErr> {
        let read = || -> Result<Option<T>, AnyError> {
            let txn = self.db.begin_read().map_err(io_err)?;
            let t = txn.open_table(LOG_META).map_err(io_err)?;
            match t.get(key).map_err(io_err)? {
                Some(v) => dec(v.value()).map(Some).map_err(io_err),
                None => Ok(None),
            }
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }

    fn put_meta<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        durability: redb::Durability,
    ) -> Result<(), AnyError> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(durability).map_err(io_err)?;
        txn.open_table(LOG_META)
            .map_err(io_err)?
            .insert(key, enc(value).as_slice())
            .map_err(io_err)?;
        txn.commit().map_err(io_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        // Recent entries, read back from redb's cache: short enough to run
        // on the async worker.
        let read = || -> Result<Vec<Entry<TypeConfig>>, AnyError> {
            let txn = self.db.begin_read().map_err(io_err)?;
            let t = txn.open_table(LOG).map_err(io_err)?;
            let mut out = Vec::new();
            for item in t.range(range).map_err(io_err)? {
                let (_, v) = item.map_err(io_err)?;
                out.push(dec(v.value()).map_err(io_err)?);
            }
            Ok(out)
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let purged: Option<LogId<NodeId>> = self.meta("purged")?;
        let last = tokio::task::block_in_place(|| -> Result<Option<LogId<NodeId>>, AnyError> {
            let txn = self.db.begin_read().map_err(io_err)?;
            let t = txn.open_table(LOG).map_err(io_err)?;
            match t.last().map_err(io_err)? {
                Some((_, v)) => Ok(Some(
                    dec::<Entry<TypeConfig>>(v.value()).map_err(io_err)?.log_id,
                )),
                None => Ok(None),
            }
        })
        .map_err(StorageIOError::read_logs)?;
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        tokio::task::block_in_place(|| self.put_meta("vote", vote, redb::Durability::Immediate))
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.meta("vote")
    }

    /// The commit index may be lost in a crash (Raft learns it again from
    /// the leader), so it is not written on its own: the next append
    /// writes it in the same transaction.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        *self.committed.lock().expect("log store poisoned") = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        if let Some(c) = *self.committed.lock().expect("log store poisoned") {
            return Ok(c);
        }
        Ok(self.meta::<Option<LogId<NodeId>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let committed = self.committed.lock().expect("log store poisoned").take();
        // Blocks the consensus thread for the commit and its fsync: Raft
        // waits for each append before it goes on anyway, and handing the
        // thread's other tasks to a second one (`block_in_place`) costs a
        // thread switch per entry on every node.
        let started = Instant::now();
        let result = (|| -> Result<(), AnyError> {
            let txn = self.db.begin_write().map_err(io_err)?;
            {
                let mut t = txn.open_table(LOG).map_err(io_err)?;
                for e in entries {
                    t.insert(e.log_id.index, enc(&e).as_slice())
                        .map_err(io_err)?;
                }
            }
            if let Some(committed) = &committed {
                txn.open_table(LOG_META)
                    .map_err(io_err)?
                    .insert("committed", enc(committed).as_slice())
                    .map_err(io_err)?;
            }
            // Durable (fsync) before the callback acknowledges the append.
            txn.commit().map_err(io_err)
        })();
        self.append_time
            .lock()
            .expect("log store poisoned")
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        tokio::task::block_in_place(|| -> Result<(), AnyError> {
            let txn = self.db.begin_write().map_err(io_err)?;
            txn.open_table(LOG)
                .map_err(io_err)?
                .retain_in(log_id.index.., |_, _| false)
                .map_err(io_err)?;
            txn.commit().map_err(io_err)
        })
        .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        tokio::task::block_in_place(|| -> Result<(), AnyError> {
            let txn = self.db.begin_write().map_err(io_err)?;
            txn.open_table(LOG_META)
                .map_err(io_err)?
                .insert("purged", enc(&log_id).as_slice())
                .map_err(io_err)?;
            txn.open_table(LOG)
                .map_err(io_err)?
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(io_err)?;
            txn.commit().map_err(io_err)
        })
        .map_err(|e| StorageIOError::write_logs(e).into())
    }
}
