//! The state machine in its own redb file: the per-plugin streams of
//! committed proposals, and the snapshots that compact them.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, SnapshotMeta, StorageIOError, StoredMembership,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Batch, NodeId, SErr, TypeConfig, check_format, dec, enc, io_err};
use crate::cluster::compaction::{self, Compaction, StreamState};
use crate::cluster::log::{LogError, RestorePoint};
use crate::cluster::state_store::{Checkpoints, Persist};
use crate::cluster::streams::{self, RUNS, Watches};

const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm-meta");
/// `"current"` → the last snapshot built or installed ([`Stored`]).
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SmMeta {
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    /// Dense index of the last proposal applied.
    last_index: u64,
}

/// A snapshot: every plugin stream as a restore point and the committed
/// entries after it.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    meta: SmMeta,
    streams: Vec<StreamState>,
}

/// The current snapshot as the state machine keeps it.
#[derive(Serialize, Deserialize)]
struct Stored {
    meta: SmMeta,
    id: String,
    data: Vec<u8>,
}

impl Stored {
    fn into_snapshot(self) -> Snapshot<TypeConfig> {
        Snapshot {
            meta: SnapshotMeta {
                last_log_id: self.meta.applied,
                last_membership: self.meta.membership,
                snapshot_id: self.id,
            },
            snapshot: Box::new(Cursor::new(self.data)),
        }
    }
}

/// What the state machine shares with the consensus backend.
pub struct SmShared {
    pub(super) db: Database,
    pub(super) watches: Watches,
    meta: Mutex<SmMeta>,
    /// The streams' floors, and where plugin state comes from.
    pub(super) compaction: Compaction,
    /// Which applies are durable.
    checkpoints: Checkpoints,
    pub(super) built: AtomicU64,
    pub(super) installed: AtomicU64,
}

impl SmShared {
    pub(super) fn entries(
        &self,
        stream: &str,
        after: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<crate::cluster::log::Entry>, LogError> {
        self.compaction
            .entries(&self.db, stream, after, through, max)
    }

    pub(super) fn restore_point(&self, stream: &str) -> Result<Option<RestorePoint>, LogError> {
        compaction::restore_point(&self.db, stream)
    }
}

/// The state machine: the per-plugin streams of committed proposals.
#[derive(Clone)]
pub struct StateMachine {
    pub(super) shared: Arc<SmShared>,
}

impl StateMachine {
    /// Opens or creates the state machine at `path`.
    pub fn open(path: &Path) -> anyhow::Result<StateMachine> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        streams::open_tables(&txn)?;
        txn.open_table(SNAPSHOT)?;
        let compaction = Compaction::open(&txn)?;
        check_format(&txn, SM_META, path)?;
        let meta: SmMeta = match txn.open_table(SM_META)?.get("meta")? {
            Some(v) => dec(v.value())?,
            None => SmMeta::default(),
        };
        txn.commit()?;
        Ok(StateMachine {
            shared: Arc::new(SmShared {
                watches: Watches::new(meta.last_index),
                meta: Mutex::new(meta),
                compaction,
                checkpoints: Checkpoints::default(),
                built: AtomicU64::new(0),
                installed: AtomicU64::new(0),
                db,
            }),
        })
    }

    /// Builds the snapshot from the stream table and `captured`, and
    /// compacts each captured stream behind its new restore point, in one
    /// transaction.
    fn compact(&self, captured: HashMap<String, RestorePoint>) -> Result<Stored, AnyError> {
        let txn = self.shared.db.begin_write().map_err(io_err)?;
        let meta: SmMeta = match txn
            .open_table(SM_META)
            .map_err(io_err)?
            .get("meta")
            .map_err(io_err)?
        {
            Some(v) => dec(v.value()).map_err(io_err)?,
            None => SmMeta::default(),
        };
        let (streams, moved) =
            compaction::compact(&txn, captured, meta.last_index, true).map_err(io_err)?;
        self.shared.built.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).map_err(io_err)?;
        let stored = Stored {
            id: format!(
                "{}-{}-{:08x}",
                meta.applied.map_or(0, |l| l.index),
                meta.last_index,
                u32::from_le_bytes(nonce)
            ),
            data: enc(&SnapshotData {
                meta: meta.clone(),
                streams,
            }),
            meta,
        };
        txn.open_table(SNAPSHOT)
            .map_err(io_err)?
            .insert("current", enc(&stored).as_slice())
            .map_err(io_err)?;
        self.shared
            .compaction
            .commit(txn, |floors| floors.extend(moved))
            .map_err(io_err)?;
        Ok(stored)
    }

    fn current(&self) -> Result<Option<Stored>, AnyError> {
        let txn = self.shared.db.begin_read().map_err(io_err)?;
        let t = txn.open_table(SNAPSHOT).map_err(io_err)?;
        t.get("current")
            .map_err(io_err)?
            .map(|v| dec(v.value()).map_err(io_err))
            .transpose()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Captures each plugin's state between two of its hooks first, then
    /// reads the streams: a plugin is never ahead of the state machine, so
    /// the entries after its point are all there.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let captured = self.shared.compaction.capture().await;
        let stored = tokio::task::block_in_place(|| self.compact(captured))
            .map_err(StorageIOError::read_state_machine)?;
        tracing::info!(
            snapshot = %stored.id,
            bytes = stored.data.len(),
            "snapshot built"
        );
        Ok(stored.into_snapshot())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        let m = self.shared.meta.lock().expect("sm poisoned");
        Ok((m.applied, m.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<u64>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut meta = self.shared.meta.lock().expect("sm poisoned").clone();
        let mut responses = Vec::new();
        let shared = &self.shared;
        // Without an fsync (but once a second) this is short enough to run
        // on the async worker. Returns each stream's last index.
        let write = || -> Result<HashMap<String, u64>, AnyError> {
            let mut txn = shared.db.begin_write().map_err(io_err)?;
            // The Raft log holds these entries: after a crash, Raft applies
            // them again from the applied index that reached the disk.
            txn.set_durability(shared.checkpoints.durability(Persist::Replayable))
                .map_err(io_err)?;
            let mut runs = streams::Runs::default();
            for entry in entries {
                meta.applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => responses.push(0),
                    EntryPayload::Normal(Batch(ops)) => {
                        responses.push(meta.last_index + 1);
                        for (stream, data) in ops {
                            meta.last_index += 1;
                            runs.push(&stream, meta.last_index, entry.log_id.leader_id.term, &data)
                                .map_err(io_err)?;
                        }
                    }
                    EntryPayload::Membership(m) => {
                        meta.membership = StoredMembership::new(Some(entry.log_id), m);
                        responses.push(0);
                    }
                }
            }
            let per_stream = runs
                .write(&mut txn.open_table(RUNS).map_err(io_err)?)
                .map_err(io_err)?;
            txn.open_table(SM_META)
                .map_err(io_err)?
                .insert("meta", enc(&meta).as_slice())
                .map_err(io_err)?;
            txn.commit().map_err(io_err)?;
            Ok(per_stream)
        };
        let per_stream = write().map_err(StorageIOError::write_state_machine)?;
        let last = meta.last_index;
        *self.shared.meta.lock().expect("sm poisoned") = meta;
        self.shared.watches.publish(last, per_stream);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// Replaces the streams and restore points by the snapshot's. Each
    /// plugin actor finds its stream compacted behind its cursor and
    /// restores from the point, or, when its own state is newer than the
    /// point, goes on from its cursor.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData =
            dec(&bytes).map_err(|e| StorageIOError::read_snapshot(None, io_err(e)))?;
        let stored = Stored {
            meta: data.meta.clone(),
            id: meta.snapshot_id.clone(),
            data: bytes,
        };
        let shared = &self.shared;
        tokio::task::block_in_place(|| -> Result<(), AnyError> {
            let txn = shared.db.begin_write().map_err(io_err)?;
            let new_floors = compaction::install(&txn, &data.streams).map_err(io_err)?;
            txn.open_table(SM_META)
                .map_err(io_err)?
                .insert("meta", enc(&data.meta).as_slice())
                .map_err(io_err)?;
            txn.open_table(SNAPSHOT)
                .map_err(io_err)?
                .insert("current", enc(&stored).as_slice())
                .map_err(io_err)?;
            shared
                .compaction
                .commit(txn, |floors| *floors = new_floors)
                .map_err(io_err)
        })
        .map_err(StorageIOError::write_state_machine)?;
        let last = data.meta.last_index;
        *self.shared.meta.lock().expect("sm poisoned") = data.meta;
        self.shared
            .watches
            .reload(&self.shared.db, last)
            .map_err(|e| StorageIOError::write_state_machine(io_err(e)))?;
        self.shared.installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(snapshot = %meta.snapshot_id, bytes = stored.data.len(), "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let current = tokio::task::block_in_place(|| self.current())
            .map_err(StorageIOError::read_state_machine)?;
        Ok(current.map(Stored::into_snapshot))
    }
}
