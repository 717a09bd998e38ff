//! The replicated log: openraft over the peer transport, with the Raft log
//! and the state machine in two redb files. Every openraft type stays in
//! this module.
//!
//! The host coalesces concurrent proposals from all plugins into one Raft
//! entry (a [`Batch`]), because openraft 0.9 commits at most one entry per
//! fsync round. Applying a batch gives each proposal its own dense log
//! index, in order, the same on every node. Every node queues its own
//! proposals; a follower forwards what queued up to the leader in one
//! request, which the leader puts into one entry with its own (see
//! `proposer`). Read-index requests and voter changes are forwarded to
//! the leader one by one.
//!
//! Every member is recorded in the Raft membership as `name@address`, so
//! a node learns the names and peer addresses of members added at run time
//! from the log itself.

// The error type of openraft's storage traits is theirs to choose.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io::Cursor;
use std::net::SocketAddr;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{
    LogFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine,
    Snapshot,
};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use super::compaction::{self, Compaction, StreamState};
use super::log::{
    BoxFuture, Capture, ConsensusBackend, LogError, LogStats, RestorePoint, Submitted,
};
use super::state_store::{Checkpoints, Persist};
use super::streams::{self, RUNS, Watches};
use super::transport::{Transport, TransportError};
use crate::runtime::metrics::Histogram;

/// Proposals after which a queue is full: it goes out even while another
/// is in flight.
pub const MAX_BATCH: usize = 256;
/// Bytes of proposals after which a queue is full.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Most batches a node has in flight at once.
pub const IN_FLIGHT: usize = 8;
/// A leader's batch at least this large means the node is under load:
/// the next one then waits a little for more proposals ([`FILL_TO`],
/// [`FILL_WAIT`]).
const BUSY_BATCH: usize = 32;
/// Proposals a batch waits for under load...
const FILL_TO: usize = 192;
/// ...for at most this long after the previous batch is done. Each Raft
/// entry costs every node a durable log commit and a storage commit
/// whatever it carries, so while the node is busy fuller entries leave
/// more of the machine to the writes themselves; the wait is short next
/// to a round of the log, and a light load never waits.
const FILL_WAIT: Duration = Duration::from_millis(2);
/// How long a proposal may wait for a leader and a commit.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a request forwarded to the leader may take before its outcome
/// is reported unknown.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// Transport request kinds used by consensus.
pub mod kind {
    /// Raft AppendEntries.
    pub const APPEND: u8 = 1;
    /// Raft Vote.
    pub const VOTE: u8 = 2;
    /// Raft InstallSnapshot (one chunk).
    pub const SNAPSHOT: u8 = 3;
    /// Proposals forwarded to the leader, to go into one entry in order.
    pub const PROPOSE: u8 = 10;
    /// A read-index request forwarded to the leader.
    pub const READ_INDEX: u8 = 11;
    /// A voter change forwarded to the leader.
    pub const MEMBERS: u8 = 12;
    /// Is this node there, as the id it was dialled as? Answered with its
    /// name.
    pub const PROBE: u8 = 13;
    /// You were removed from the membership committed at this index.
    pub const REMOVED: u8 = 14;
}

/// How long adding a voter may take: the new member first catches up as a
/// learner.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a joining member has to answer the leader at all.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a joining member has, once a learner, to reach the leader's
/// log as of its addition; past it the join fails and the learner is
/// taken out again.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// A change of the voter set, made by an operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MemberChange {
    /// Add `name`, reachable at `addr`, as a voter once it has caught up.
    Join {
        /// Its node id.
        name: String,
        /// Its peer address.
        addr: SocketAddr,
    },
    /// Remove `name` from the voters.
    Leave {
        /// Its node id.
        name: String,
    },
}

/// How a member is recorded in the Raft membership.
fn member_node(name: &str, addr: SocketAddr) -> BasicNode {
    BasicNode {
        addr: format!("{name}@{addr}"),
    }
}

fn parse_member(node: &BasicNode) -> Option<(String, SocketAddr)> {
    let (name, addr) = node.addr.split_once('@')?;
    Some((name.to_string(), addr.parse().ok()?))
}

/// Proposals of several plugins, committed as one Raft entry: each is the
/// plugin's stream and the entry's bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(#[serde(with = "ops_bytes")] pub Vec<(String, Vec<u8>)>);

/// Encodes each proposal's data as bytes, not as a sequence of numbers: the
/// same postcard encoding, decoded in one copy instead of byte by byte.
mod ops_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(ops: &[(String, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ops.iter().map(|(stream, data)| (stream, Bytes::new(data))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
        let ops = Vec::<(String, ByteBuf)>::deserialize(d)?;
        Ok(ops
            .into_iter()
            .map(|(stream, data)| (stream, data.into_vec()))
            .collect())
    }
}

openraft::declare_raft_types!(
    /// The Raft types of Plexus.
    pub TypeConfig:
        D = Batch,
        R = u64,
);

type NodeId = u64;
type SErr = StorageError<NodeId>;

/// A node's Raft id: the first 8 bytes of the SHA-256 of its name.
pub fn raft_id(name: &str) -> NodeId {
    let d = Sha256::digest(name.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

fn io_err(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// Raft messages and stored entries are postcard: compact and fast to
/// encode, which keeps a large entry (a component in a cluster-wide swap)
/// from holding up heartbeats.
fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Sized first: a log entry of a few hundred writes would otherwise grow
    // its buffer a dozen times, each a copy (a profile had that at 1.5% of
    // the node's CPU).
    let size = postcard::experimental::serialized_size(v).expect("raft types serialize");
    postcard::to_extend(v, Vec::with_capacity(size)).expect("raft types serialize")
}

fn dec<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

// ---------------------------------------------------------------- log store

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const LOG_META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// How everything in the two Raft files is encoded, recorded in each.
const FORMAT: &[u8] = b"plexus-raft/postcard-2";
/// The format before streams were kept in runs: `streams::open_tables`
/// converts it.
const FORMAT_1: &[u8] = b"plexus-raft/postcard-1";

/// Records [`FORMAT`] in a new file's `meta` table (and in one of
/// [`FORMAT_1`], which the caller converted in `txn`), and refuses a file
/// written in another encoding rather than misreading it.
fn check_format(
    txn: &redb::WriteTransaction,
    meta: TableDefinition<&str, &[u8]>,
    path: &Path,
) -> anyhow::Result<()> {
    use redb::ReadableTableMetadata;
    let mut t = txn.open_table(meta)?;
    let found = t.get("format")?.map(|v| v.value().to_vec());
    match found {
        Some(f) if f == FORMAT => Ok(()),
        Some(f) if f == FORMAT_1 => {
            t.insert("format", FORMAT)?;
            Ok(())
        }
        None if t.is_empty()? => {
            t.insert("format", FORMAT)?;
            Ok(())
        }
        other => anyhow::bail!(
            "{} was written in another format ({}) than this version reads ({}); \
             move the node's data directory aside and let the node catch up from the cluster",
            path.display(),
            other.map_or("an older one".into(), |f| String::from_utf8_lossy(&f)
                .into_owned()),
            String::from_utf8_lossy(FORMAT),
        ),
    }
}

/// The Raft log in its own redb file. Every write is fsynced before it is
/// acknowledged (`LogFlushed` fires after the commit returns).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The commit index Raft last reported, not yet written: the next
    /// append writes it in its own transaction.
    committed: Arc<Mutex<Option<Option<LogId<NodeId>>>>>,
    /// How long each append took, commit and fsync.
    append_time: Arc<Mutex<Histogram>>,
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

// ------------------------------------------------------------ state machine

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
    db: Database,
    watches: Watches,
    meta: Mutex<SmMeta>,
    /// The streams' floors, and where plugin state comes from.
    compaction: Compaction,
    /// Which applies are durable.
    checkpoints: Checkpoints,
    built: AtomicU64,
    installed: AtomicU64,
}

impl SmShared {
    fn entries(
        &self,
        stream: &str,
        after: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<super::log::Entry>, LogError> {
        self.compaction
            .entries(&self.db, stream, after, through, max)
    }

    fn restore_point(&self, stream: &str) -> Result<Option<RestorePoint>, LogError> {
        compaction::restore_point(&self.db, stream)
    }
}

/// The state machine: the per-plugin streams of committed proposals.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<SmShared>,
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

// ------------------------------------------------------------------ network

/// Raft RPCs over the peer transport.
#[derive(Clone)]
pub struct Network {
    transport: Arc<Transport>,
    names: Names,
}

/// A connection to one peer.
pub struct Connection {
    transport: Arc<Transport>,
    target: NodeId,
    name: Option<String>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection {
            transport: self.transport.clone(),
            target,
            name: self
                .names
                .read()
                .expect("names poisoned")
                .get(&target)
                .cloned(),
        }
    }
}

impl Connection {
    async fn call<
        Req: Serialize,
        Resp: for<'de> Deserialize<'de>,
        E: std::error::Error + for<'de> Deserialize<'de>,
    >(
        &self,
        kind: u8,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        let Some(name) = &self.name else {
            return Err(RPCError::Network(NetworkError::new(
                &TransportError::UnknownPeer(self.target.to_string()),
            )));
        };
        let bytes = self
            .transport
            .request(name, kind, enc(req), option.hard_ttl())
            .await
            .map_err(|e| match e {
                TransportError::Timeout(_)
                | TransportError::Lost(_)
                | TransportError::Unreachable(..) => {
                    RPCError::Unreachable(openraft::error::Unreachable::new(&e))
                }
                other => RPCError::Network(NetworkError::new(&other)),
            })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            dec(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(kind::APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(kind::SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(kind::VOTE, &rpc, &option).await
    }
}

// ------------------------------------------------------------------ backend

type Raft = openraft::Raft<TypeConfig>;

/// Proposals to go into one Raft entry in order, with consecutive indexes;
/// `reply` gets the first.
struct Group {
    ops: Vec<(String, Vec<u8>)>,
    /// Sent by a follower: placed here, or refused, never forwarded on.
    forwarded: bool,
    reply: Reply,
    /// When the outcome is reported unknown if the entry has not committed
    /// by then. It runs from submission, so time spent queued behind a
    /// stuck entry counts against it.
    deadline: Instant,
}

impl Group {
    fn bytes(&self) -> usize {
        self.ops.iter().map(|(s, d)| s.len() + d.len()).sum()
    }
}

/// Where a group's outcome goes: to a task awaiting it, or straight to a
/// plugin's submission, which needs no task of its own. A reply dropped
/// unsent (the proposer stopped) reports [`LogError::ShuttingDown`].
struct Reply(Option<ReplyTo>);

enum ReplyTo {
    Wait(oneshot::Sender<Result<u64, LogError>>),
    Call(Submitted),
}

impl Reply {
    fn wait(tx: oneshot::Sender<Result<u64, LogError>>) -> Reply {
        Reply(Some(ReplyTo::Wait(tx)))
    }

    fn call(done: Submitted) -> Reply {
        Reply(Some(ReplyTo::Call(done)))
    }

    fn send(mut self, outcome: Result<u64, LogError>) {
        match self.0.take() {
            Some(ReplyTo::Wait(tx)) => {
                let _ = tx.send(outcome);
            }
            Some(ReplyTo::Call(done)) => done(outcome),
            None => {}
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(ReplyTo::Call(done)) = self.0.take() {
            done(Err(LogError::ShuttingDown));
        }
    }
}

/// The replicated [`ConsensusBackend`].
pub struct RaftLog {
    raft: Raft,
    me: String,
    sm: Arc<SmShared>,
    transport: Arc<Transport>,
    names: Names,
    voters: watch::Receiver<BTreeSet<String>>,
    /// Every member (voters and learners), by name.
    members: watch::Receiver<BTreeSet<String>>,
    /// Set once this node learns it was removed from the membership (the
    /// index of the membership that removed it): it no longer campaigns.
    removed: Removed,
    /// This node's proposals, and those followers forwarded to it.
    queue: mpsc::Sender<Group>,
    /// The leader this follower last accepted entries from.
    heard: Arc<Mutex<Option<Heard>>>,
    proposals: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    /// The log store's append durations.
    append_time: Arc<Mutex<Histogram>>,
}

/// Raft ids to node names, learned from the config and the membership.
type Names = Arc<RwLock<HashMap<NodeId, String>>>;

/// Whether (and by which membership index) this node was removed.
type Removed = Arc<Mutex<Option<u64>>>;

/// The leader this follower last accepted entries from: who, in which
/// term, and when the request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Heard {
    leader: NodeId,
    term: u64,
    at: Instant,
}

/// How to start the replicated log.
pub struct RaftOptions<'a> {
    /// This node's name.
    pub me: &'a str,
    /// Every voter, this node included: name → peer address.
    pub members: BTreeMap<String, SocketAddr>,
    /// Where the two redb files go.
    pub dir: &'a Path,
    /// The transport, already listening.
    pub transport: Arc<Transport>,
    /// Raft entries between snapshots.
    pub snapshot_every: u64,
    /// Heartbeat and election timeouts.
    pub timing: Timing,
    /// Whether this node may initialise a new cluster (the member with the
    /// smallest id does). A node joining a running cluster must not; it
    /// waits to be added.
    pub bootstrap: bool,
}

/// Raft's timers, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Interval between the leader's heartbeats.
    pub heartbeat_ms: u64,
    /// Shortest silence after which a follower campaigns.
    pub election_min_ms: u64,
    /// Longest such silence; also the leader lease.
    pub election_max_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 50,
            election_min_ms: 150,
            election_max_ms: 300,
        }
    }
}

impl RaftLog {
    /// Opens the stores, starts Raft, and, on the member with the smallest
    /// id of a fresh cluster, initialises the membership.
    pub async fn start(opts: RaftOptions<'_>) -> anyhow::Result<Arc<RaftLog>> {
        let log = LogStore::open(&opts.dir.join("raft-log.redb"))?;
        let append_time = log.append_time.clone();
        let sm = StateMachine::open(&opts.dir.join("raft-sm.redb"))?;
        let shared = sm.shared.clone();
        let names: Names = Arc::new(RwLock::new(
            opts.members
                .keys()
                .map(|n| (raft_id(n), n.clone()))
                .collect(),
        ));
        let config = openraft::Config {
            cluster_name: "plexus".into(),
            heartbeat_interval: opts.timing.heartbeat_ms,
            election_timeout_min: opts.timing.election_min_ms,
            election_timeout_max: opts.timing.election_max_ms,
            max_payload_entries: 64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(opts.snapshot_every),
            max_in_snapshot_log_to_keep: opts.snapshot_every / 4,
            ..Default::default()
        };
        let config = Arc::new(config.validate()?);
        let network = Network {
            transport: opts.transport.clone(),
            names: names.clone(),
        };
        let me = raft_id(opts.me);
        let raft = Raft::new(me, config, network, log, sm).await?;
        if opts.bootstrap && !raft.is_initialized().await? {
            let first = opts.members.keys().map(|n| raft_id(n)).min();
            if first == Some(me) {
                let members: BTreeMap<NodeId, BasicNode> = opts
                    .members
                    .iter()
                    .map(|(n, a)| (raft_id(n), member_node(n, *a)))
                    .collect();
                if let Err(e) = raft.initialize(members).await {
                    tracing::info!("cluster already initialised: {e}");
                }
            }
        }
        let (queue, queued) = mpsc::channel(4 * MAX_BATCH);
        let heard: Arc<Mutex<Option<Heard>>> = Arc::default();
        let removed: Removed = Arc::default();
        tokio::spawn(hasten_elections(
            raft.clone(),
            me,
            heard.clone(),
            removed.clone(),
            opts.timing,
        ));
        let (voters_tx, voters) = watch::channel(BTreeSet::new());
        let (members_tx, members) = watch::channel(BTreeSet::new());
        tokio::spawn(follow_membership(
            raft.clone(),
            me,
            names.clone(),
            opts.transport.clone(),
            voters_tx,
            members_tx,
            removed.clone(),
        ));
        let log = Arc::new(RaftLog {
            raft,
            me: opts.me.to_string(),
            sm: shared,
            transport: opts.transport,
            names,
            voters,
            members,
            removed,
            queue,
            heard,
            proposals: Arc::default(),
            writes: Arc::default(),
            append_time,
        });
        tokio::spawn(proposer(Arc::downgrade(&log), queued));
        Ok(log)
    }

    fn name_of(&self, id: NodeId) -> Option<String> {
        self.names.read().expect("names poisoned").get(&id).cloned()
    }

    fn leader_name(&self) -> Option<String> {
        let id = self.raft.metrics().borrow().current_leader?;
        self.name_of(id)
    }

    /// The voters, by name, as of the latest membership this node knows.
    pub fn voters(&self) -> watch::Receiver<BTreeSet<String>> {
        self.voters.clone()
    }

    /// Every member (voters and learners), by name, as of the latest
    /// membership this node knows.
    pub fn members(&self) -> watch::Receiver<BTreeSet<String>> {
        self.members.clone()
    }

    /// The membership index by which this node learned it was removed.
    pub fn removed_at(&self) -> Option<u64> {
        *self.removed.lock().expect("removed poisoned")
    }

    /// Takes note that the membership committed at `index` left this node
    /// out, unless this node already knows a later one that has it as a
    /// voter: it stops campaigning until a membership adds it again.
    fn on_removed(&self, index: u64) {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let me = raft_id(&self.me);
        let later = m.log_id().as_ref().is_some_and(|l| l.index > index);
        if later && m.membership().voter_ids().any(|v| v == me) {
            return;
        }
        let mut removed = self.removed.lock().expect("removed poisoned");
        if removed.is_none() {
            tracing::warn!(
                index,
                "this node was removed from the cluster and no longer campaigns; add it again with `plexus cluster join`"
            );
        }
        *removed = Some(index);
        self.raft.runtime_config().elect(false);
    }

    /// Adds or removes a voter, on the leader (forwarded from a follower).
    /// Returns the voters after the change.
    pub async fn change_members(
        self: &Arc<Self>,
        change: MemberChange,
    ) -> Result<BTreeSet<String>, LogError> {
        match self.leader_name() {
            Some(l) if l == self.me => self.change_here(change).await,
            Some(l) => match self
                .transport
                .request(
                    &l,
                    kind::MEMBERS,
                    enc(&change),
                    CHANGE_TIMEOUT + Duration::from_secs(10),
                )
                .await
            {
                Ok(bytes) => dec::<Result<BTreeSet<String>, LogError>>(&bytes)
                    .unwrap_or_else(|e| Err(LogError::Storage(e.to_string()))),
                Err(TransportError::Timeout(_) | TransportError::Lost(_)) => Err(LogError::Timeout),
                Err(e) => Err(LogError::NotLeader(Some(format!("{l} ({e})")))),
            },
            None => Err(LogError::NotLeader(None)),
        }
    }

    /// Makes a voter change on this node, the leader, within
    /// [`CHANGE_TIMEOUT`]. A join that does not complete in time takes the
    /// learner out again, so a wrong address can be corrected by joining
    /// again.
    async fn change_here(&self, change: MemberChange) -> Result<BTreeSet<String>, LogError> {
        use openraft::ChangeMembers;
        let fail = |e: openraft::error::RaftError<
            NodeId,
            openraft::error::ClientWriteError<NodeId, BasicNode>,
        >| {
            if e.forward_to_leader().is_some() {
                LogError::NotLeader(None)
            } else {
                LogError::Storage(e.to_string())
            }
        };
        match change {
            MemberChange::Join { name, addr } => {
                let id = raft_id(&name);
                let known = {
                    let m = self.raft.metrics().borrow().membership_config.clone();
                    m.nodes().any(|(n, _)| *n == id)
                };
                let before = self.transport.peer_addr(&name);
                let restore = || match before {
                    Some(old) => self.transport.add_peer(&name, old),
                    None => self.transport.remove_peer(&name),
                };
                self.transport.add_peer(&name, addr);
                // It must answer, as the node it claims to be, before the
                // membership changes at all.
                match self
                    .transport
                    .request(&name, kind::PROBE, Vec::new(), PROBE_TIMEOUT)
                    .await
                {
                    // A handler's error still came from the node itself.
                    Ok(_) | Err(TransportError::Remote(..)) => {}
                    Err(e) => {
                        restore();
                        return Err(LogError::Rejected(format!(
                            "`{name}` at {addr} did not answer ({e}); the membership is unchanged"
                        )));
                    }
                }
                self.names
                    .write()
                    .expect("names poisoned")
                    .insert(id, name.clone());
                tracing::info!(member = %name, %addr, "adding a learner; it becomes a voter once caught up");
                let joined = tokio::time::timeout(CHANGE_TIMEOUT, async {
                    if known {
                        // Joined before: take the address given now.
                        self.raft
                            .change_membership(
                                ChangeMembers::SetNodes([(id, member_node(&name, addr))].into()),
                                true,
                            )
                            .await
                            .map_err(fail)?;
                    }
                    let added = self
                        .raft
                        .add_learner(id, member_node(&name, addr), false)
                        .await
                        .map_err(fail)?;
                    // Caught up: it holds the log through its own addition.
                    let target = added.log_id.index;
                    let caught_up = self
                        .raft
                        .wait(Some(CATCH_UP_TIMEOUT))
                        .metrics(
                            |m| {
                                m.replication
                                    .as_ref()
                                    .and_then(|r| r.get(&id).cloned().flatten())
                                    .is_some_and(|l| l.index >= target)
                            },
                            "the learner to catch up",
                        )
                        .await;
                    if caught_up.is_err() {
                        let matched = self
                            .raft
                            .metrics()
                            .borrow()
                            .replication
                            .as_ref()
                            .and_then(|r| r.get(&id).cloned().flatten())
                            .map_or(0, |l| l.index);
                        let what = if known {
                            "it stays the member it was"
                        } else if self
                            .raft
                            .change_membership(ChangeMembers::RemoveNodes([id].into()), false)
                            .await
                            .is_ok()
                        {
                            "it was taken out as a learner"
                        } else {
                            "taking it out as a learner failed (this node may no longer lead); remove it with `plexus cluster leave`"
                        };
                        return Err(LogError::Rejected(format!(
                            "`{name}` did not catch up within {} s (it holds the log to index {matched} of {target}); {what}, and the voters are unchanged",
                            CATCH_UP_TIMEOUT.as_secs()
                        )));
                    }
                    self.raft
                        .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                        .await
                        .map_err(fail)?
                        .membership
                        .ok_or_else(no_membership)
                })
                .await;
                match joined {
                    Ok(Ok(m)) => Ok(self.voter_names(&m)),
                    Ok(Err(e)) => Err(e),
                    Err(_) => {
                        tracing::warn!(member = %name, "join timed out; removing the learner");
                        let _ = self
                            .raft
                            .change_membership(ChangeMembers::RemoveNodes([id].into()), false)
                            .await;
                        Err(LogError::Timeout)
                    }
                }
            }
            MemberChange::Leave { name } => {
                let id = raft_id(&name);
                let current = self.raft.metrics().borrow().membership_config.clone();
                let voter = current.membership().voter_ids().any(|v| v == id);
                let known = current.nodes().any(|(n, _)| *n == id);
                if !known {
                    return Err(LogError::Storage(format!("`{name}` is not a member")));
                }
                tracing::info!(member = %name, voter, "removing a member");
                let change = if voter {
                    ChangeMembers::RemoveVoters([id].into())
                } else {
                    ChangeMembers::RemoveNodes([id].into())
                };
                let done = tokio::time::timeout(
                    CHANGE_TIMEOUT,
                    self.raft.change_membership(change, false),
                )
                .await
                .map_err(|_| LogError::Timeout)?
                .map_err(fail)?;
                // The metrics catch up with a committed change a moment
                // later; the answer is the membership the change committed.
                let m = done.membership.ok_or_else(no_membership)?;
                Ok(self.voter_names(&m))
            }
        }
    }

    fn voter_names(&self, m: &openraft::Membership<NodeId, BasicNode>) -> BTreeSet<String> {
        m.voter_ids().filter_map(|id| self.name_of(id)).collect()
    }

    /// Handles a transport request addressed to consensus; `None` if `kind`
    /// is not consensus's.
    pub fn handle(
        self: &Arc<Self>,
        kind: u8,
        body: Vec<u8>,
    ) -> Option<BoxFuture<'static, Result<Vec<u8>, String>>> {
        let this = self.clone();
        Some(match kind {
            kind::APPEND => Box::pin(async move {
                let req: AppendEntriesRequest<TypeConfig> =
                    dec(&body).map_err(|e| e.to_string())?;
                // Stamped on arrival, as Raft's own timer is: a slow fsync
                // of the entries must not look like a silent leader.
                let arrived = Instant::now();
                let from = req
                    .vote
                    .is_committed()
                    .then(|| req.vote.leader_id().voted_for())
                    .flatten()
                    .map(|leader| (leader, req.vote.leader_id().term));
                let resp = this.raft.append_entries(req).await;
                if let (Some((leader, term)), Ok(r)) = (from, &resp)
                    && !matches!(r, AppendEntriesResponse::HigherVote(_))
                {
                    *this.heard.lock().expect("heard poisoned") = Some(Heard {
                        leader,
                        term,
                        at: arrived,
                    });
                }
                Ok(enc(&resp))
            }),
            kind::VOTE => Box::pin(async move {
                let req: VoteRequest<NodeId> = dec(&body).map_err(|e| e.to_string())?;
                Ok(enc(&this.raft.vote(req).await))
            }),
            kind::SNAPSHOT => Box::pin(async move {
                let req: InstallSnapshotRequest<TypeConfig> =
                    dec(&body).map_err(|e| e.to_string())?;
                Ok(enc(&this.raft.install_snapshot(req).await))
            }),
            kind::PROPOSE => Box::pin(async move {
                let Batch(ops) = dec(&body).map_err(|e| e.to_string())?;
                Ok(enc(&this
                    // The follower gives up on its request after
                    // FORWARD_TIMEOUT from sending it; sooner here.
                    .enqueue(ops, true, Instant::now() + FORWARD_TIMEOUT)
                    .await))
            }),
            kind::READ_INDEX => Box::pin(async move { Ok(enc(&this.read_index_here().await)) }),
            kind::MEMBERS => Box::pin(async move {
                let change: MemberChange = dec(&body).map_err(|e| e.to_string())?;
                Ok(enc(&this.change_here(change).await))
            }),
            kind::PROBE => Box::pin(async move { Ok(enc(&this.me)) }),
            kind::REMOVED => Box::pin(async move {
                let index: u64 = dec(&body).map_err(|e| e.to_string())?;
                this.on_removed(index);
                Ok(Vec::new())
            }),
            _ => return None,
        })
    }

    /// Queues `ops` to go into one entry; resolves with the first one's
    /// index once committed.
    async fn enqueue(
        &self,
        ops: Vec<(String, Vec<u8>)>,
        forwarded: bool,
        deadline: Instant,
    ) -> Result<u64, LogError> {
        let (reply, rx) = oneshot::channel();
        self.queue
            .send(Group {
                ops,
                forwarded,
                reply: Reply::wait(reply),
                deadline,
            })
            .await
            .map_err(|_| LogError::ShuttingDown)?;
        rx.await.map_err(|_| LogError::ShuttingDown)?
    }

    /// Puts `groups` into one Raft entry, here when this node leads or
    /// through the leader, and answers each group with its first index.
    /// Retries while no leader is known; groups a follower forwarded are
    /// refused instead, and that follower retries.
    ///
    /// Each group keeps its own deadline: one that passes is answered
    /// `timeout` (outcome unknown) on its own, while the others go on
    /// waiting for the same entry. A group whose deadline passed before it
    /// was placed (it queued behind an entry that could not commit) is not
    /// placed at all.
    async fn place(self: Arc<Self>, mut groups: Vec<Group>) {
        loop {
            let now = Instant::now();
            let expired;
            (expired, groups) = groups.into_iter().partition(|g| g.deadline <= now);
            for g in expired {
                g.reply.send(Err(LogError::Timeout));
            }
            let leader = self.leader_name();
            if leader.as_ref() != Some(&self.me) {
                let refused;
                (refused, groups) = groups.into_iter().partition(|g| g.forwarded);
                for g in refused {
                    g.reply.send(Err(LogError::NotLeader(leader.clone())));
                }
            }
            if groups.is_empty() {
                return;
            }
            let ops: Vec<(String, Vec<u8>)> = groups.iter().flat_map(|g| g.ops.clone()).collect();
            let attempt: BoxFuture<'_, Result<u64, LogError>> = match &leader {
                Some(l) if *l == self.me => Box::pin(self.write_here(ops)),
                Some(l) => Box::pin(self.forward(l, ops)),
                None => Box::pin(std::future::ready(Err(LogError::NotLeader(None)))),
            };
            // Slots keep each group's place in the entry (its first index
            // follows from the groups before it) after it was answered.
            let mut slots: Vec<(u64, Option<Group>)> = groups
                .into_iter()
                .map(|g| (g.ops.len() as u64, Some(g)))
                .collect();
            let Some(result) = await_within_deadlines(attempt, &mut slots).await else {
                // Every group timed out; without a quorum the commit would
                // wait forever.
                return;
            };
            match result {
                Ok(first) => {
                    let mut next = first;
                    for (n, g) in slots {
                        if let Some(g) = g {
                            g.reply.send(Ok(next));
                        }
                        next += n;
                    }
                    return;
                }
                // Refused by Raft or never delivered: nothing was appended,
                // so trying again cannot apply anything twice.
                Err(LogError::NotLeader(_)) => {
                    groups = slots.into_iter().filter_map(|(_, g)| g).collect();
                    let Some(first_deadline) = groups.iter().map(|g| g.deadline).min() else {
                        return;
                    };
                    let pause = (Instant::now() + Duration::from_millis(50)).min(first_deadline);
                    tokio::time::sleep_until(pause.into()).await;
                }
                Err(e) => {
                    for g in slots.into_iter().filter_map(|(_, g)| g) {
                        g.reply.send(Err(e.clone()));
                    }
                    return;
                }
            }
        }
    }

    /// Appends `ops` as one entry on this node, the leader; resolves with
    /// the first one's index once applied here.
    async fn write_here(&self, ops: Vec<(String, Vec<u8>)>) -> Result<u64, LogError> {
        let n = ops.len() as u64;
        match self.raft.client_write(Batch(ops)).await {
            Ok(resp) => {
                self.proposals.fetch_add(n, Ordering::Relaxed);
                self.writes.fetch_add(1, Ordering::Relaxed);
                Ok(resp.data)
            }
            Err(e) => Err(match e.forward_to_leader() {
                Some(f) => LogError::NotLeader(f.leader_id.and_then(|id| self.name_of(id))),
                None => LogError::Storage(e.to_string()),
            }),
        }
    }

    /// Sends `ops` to the leader `to`, to go into one entry.
    async fn forward(&self, to: &str, ops: Vec<(String, Vec<u8>)>) -> Result<u64, LogError> {
        match self
            .transport
            .request(to, kind::PROPOSE, enc(&Batch(ops)), FORWARD_TIMEOUT)
            .await
        {
            // The leader's own answer, `not-leader` included when
            // leadership moved meanwhile.
            Ok(bytes) => dec::<Result<u64, LogError>>(&bytes)
                .unwrap_or_else(|e| Err(LogError::Storage(e.to_string()))),
            Err(e) => Err(transport_error(e)),
        }
    }

    async fn read_index_here(&self) -> Result<u64, LogError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(self.sm.watches.commit_index()),
            Err(e) => Err(LogError::NotLeader(
                e.forward_to_leader()
                    .and_then(|f| f.leader_id)
                    .and_then(|id| self.name_of(id)),
            )),
        }
    }

    /// Runs `here` on the leader (locally or forwarded), retrying while no
    /// leader is known, then waits until this node has applied the result.
    async fn on_leader(
        self: Arc<Self>,
        kind: u8,
        body: Vec<u8>,
        here: impl Fn(Arc<Self>) -> BoxFuture<'static, Result<u64, LogError>>,
    ) -> Result<u64, LogError> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let result = match self.leader_name() {
                // Without a quorum the leader's commit would wait forever.
                Some(l) if l == self.me => {
                    tokio::time::timeout_at(deadline.into(), here(self.clone()))
                        .await
                        .unwrap_or(Err(LogError::Timeout))
                }
                Some(l) => match self
                    .transport
                    .request(&l, kind, body.clone(), FORWARD_TIMEOUT)
                    .await
                {
                    // The leader's own answer, `not-leader` included when
                    // leadership moved meanwhile.
                    Ok(bytes) => dec::<Result<u64, LogError>>(&bytes)
                        .unwrap_or_else(|e| Err(LogError::Storage(e.to_string()))),
                    Err(e) => Err(transport_error(e)),
                },
                None => Err(LogError::NotLeader(None)),
            };
            match result {
                Ok(index) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    return tokio::time::timeout(left, self.sm.watches.wait_for(index))
                        .await
                        .map(|()| index)
                        .map_err(|_| LogError::Timeout);
                }
                Err(LogError::NotLeader(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(LogError::NotLeader(_)) => return Err(LogError::Timeout),
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// Keeps the names, the transport's peers and the published voter set in
/// step with the membership this node sees in the log.
/// Campaigns as soon as a silent leader's lease has run out on every
/// follower.
///
/// A follower refuses votes while its lease on the leader it follows
/// lasts (the longest election timeout). The first campaign after a
/// leader dies usually starts before that and is refused, and Raft's own
/// timer then waits a whole election timeout more. This starts the
/// campaign that can win, once the lease is over. The followers go in
/// the order of their ids, two heartbeats apart, so they do not split the
/// vote; Raft's own timers keep running as before.
///
/// It campaigns only while this node is still in the silent leader's term,
/// or a candidate for the next one: never after it voted for another
/// candidate or followed a newer leader, and never while it leads.
async fn hasten_elections(
    raft: Raft,
    me: NodeId,
    heard: Arc<Mutex<Option<Heard>>>,
    removed: Removed,
    timing: Timing,
) {
    let tick = Duration::from_millis((timing.heartbeat_ms / 4).max(2));
    let lease = Duration::from_millis(timing.election_max_ms + timing.heartbeat_ms / 2);
    let stagger = Duration::from_millis(timing.heartbeat_ms * 2);
    let mut fired_for = None;
    let mut metrics = raft.metrics();
    // Whether campaigning now is warranted, and after how much silence.
    let due = |m: &openraft::RaftMetrics<NodeId, BasicNode>, h: &Heard| -> Option<Duration> {
        if m.state == openraft::ServerState::Leader {
            return None;
        }
        let still_silent = m.current_term == h.term && m.current_leader == Some(h.leader);
        let own_campaign =
            m.current_term == h.term + 1 && m.vote.leader_id().voted_for() == Some(me);
        if !(still_silent || own_campaign) {
            return None;
        }
        let mut others: Vec<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != h.leader)
            .collect();
        others.sort_unstable();
        let rank = others.iter().position(|id| *id == me)?;
        Some(lease + stagger * rank as u32)
    };
    loop {
        tokio::time::sleep(tick).await;
        let h = {
            let mut heard = heard.lock().expect("heard poisoned");
            if metrics.borrow().state == openraft::ServerState::Leader {
                *heard = None;
            }
            *heard
        };
        let Some(h) = h else { continue };
        if removed.lock().expect("removed poisoned").is_some() {
            continue;
        }
        if fired_for == Some(h) {
            continue;
        }
        let Some(after) = due(&metrics.borrow_and_update(), &h) else {
            continue;
        };
        let silent = h.at.elapsed();
        if silent < after {
            continue;
        }
        // Look again right before campaigning: a vote granted or a new
        // leader heard since the check above calls it off.
        if *heard.lock().expect("heard poisoned") != Some(h) || due(&metrics.borrow(), &h).is_none()
        {
            continue;
        }
        fired_for = Some(h);
        tracing::info!(
            silent_ms = silent.as_millis() as u64,
            term = h.term,
            "the leader is silent past its lease; campaigning"
        );
        if raft.trigger().elect().await.is_err() {
            return;
        }
    }
}

async fn follow_membership(
    raft: Raft,
    me: NodeId,
    names: Names,
    transport: Arc<Transport>,
    voters: watch::Sender<BTreeSet<String>>,
    members: watch::Sender<BTreeSet<String>>,
    removed: Removed,
) {
    let mut metrics = raft.metrics();
    let mut seen: Option<Arc<openraft::StoredMembership<NodeId, BasicNode>>> = None;
    // Removed members still to tell, with the index of the membership that
    // removed them.
    let mut owed: Vec<(NodeId, String, u64)> = Vec::new();
    loop {
        let membership = metrics.borrow_and_update().membership_config.clone();
        // The metrics change with every append and apply; the membership
        // seldom does, and taking the peers' write lock for nothing slows
        // every send.
        if seen.as_ref() != Some(&membership) {
            for (id, node) in membership.nodes() {
                if let Some((name, addr)) = parse_member(node) {
                    transport.add_peer(&name, addr);
                    names.write().expect("names poisoned").insert(*id, name);
                }
            }
            let index = membership.log_id().as_ref().map_or(0, |l| l.index);
            let (now, all): (BTreeSet<String>, BTreeSet<String>) = {
                let names = names.read().expect("names poisoned");
                (
                    membership
                        .membership()
                        .voter_ids()
                        .filter_map(|id| names.get(&id).cloned())
                        .collect(),
                    membership
                        .nodes()
                        .filter_map(|(id, _)| names.get(id).cloned())
                        .collect(),
                )
            };
            // Members this membership left out: told so (so they stop
            // campaigning), then forgotten by the transport, once the
            // membership is committed (applied here).
            if let Some(before) = &seen {
                let names = names.read().expect("names poisoned");
                for (id, _) in before.nodes() {
                    if *id != me
                        && membership.membership().get_node(id).is_none()
                        && let Some(name) = names.get(id)
                    {
                        owed.push((*id, name.clone(), index));
                    }
                }
            }
            if membership.membership().voter_ids().any(|v| v == me) {
                let mut r = removed.lock().expect("removed poisoned");
                if r.is_some_and(|at| index != at) {
                    tracing::info!(index, "this node is a voter again; it campaigns again");
                    *r = None;
                    raft.runtime_config().elect(true);
                }
            }
            voters.send_if_modified(|v| {
                let changed = *v != now;
                *v = now;
                changed
            });
            members.send_if_modified(|v| {
                let changed = *v != all;
                *v = all;
                changed
            });
            seen = Some(membership);
        }
        let applied = metrics
            .borrow()
            .last_applied
            .as_ref()
            .map_or(0, |l| l.index);
        for (id, name, index) in std::mem::take(&mut owed) {
            if index > applied {
                owed.push((id, name, index));
                continue;
            }
            let (transport, raft) = (transport.clone(), raft.clone());
            tokio::spawn(async move {
                let _ = transport
                    .request(&name, kind::REMOVED, enc(&index), Duration::from_secs(2))
                    .await;
                // Unless it was added again meanwhile.
                let back = raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .get_node(&id)
                    .is_some();
                if !back {
                    transport.remove_peer(&name);
                }
            });
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Awaits `attempt`, answering `timeout` to each group in `slots` whose
/// deadline passes meanwhile. `None` when every group was answered so
/// before the attempt ended.
async fn await_within_deadlines(
    attempt: BoxFuture<'_, Result<u64, LogError>>,
    slots: &mut [(u64, Option<Group>)],
) -> Option<Result<u64, LogError>> {
    let mut attempt = attempt;
    loop {
        let next = slots
            .iter()
            .filter_map(|(_, g)| g.as_ref().map(|g| g.deadline))
            .min()?;
        tokio::select! {
            result = &mut attempt => return Some(result),
            () = tokio::time::sleep_until(next.into()) => {
                let now = Instant::now();
                for (_, slot) in slots.iter_mut() {
                    if let Some(g) = slot.take_if(|g| g.deadline <= now) {
                        g.reply.send(Err(LogError::Timeout));
                    }
                }
            }
        }
    }
}

/// What a failed forward means for the request.
fn transport_error(e: TransportError) -> LogError {
    match e {
        // Sent, and maybe handled: retrying could apply it twice.
        TransportError::Timeout(_) | TransportError::Lost(_) => LogError::Timeout,
        // Never reached the leader: safe to try again.
        TransportError::Unreachable(..) | TransportError::UnknownPeer(_) => {
            LogError::NotLeader(None)
        }
        e @ (TransportError::Remote(..) | TransportError::TooLarge(_)) => {
            LogError::Storage(e.to_string())
        }
    }
}

/// Sends out this node's queued proposals as batches, each to go into one
/// Raft entry.
///
/// One batch goes out as soon as anything is queued; while it is in
/// flight, what queues up next waits for it to finish, unless the queue
/// fills up first ([`MAX_BATCH`], [`MAX_BATCH_BYTES`]), in which case up
/// to [`IN_FLIGHT`] batches go at once. Under load each Raft entry thus
/// takes all that arrived during the previous round, and the per-entry
/// costs (fsyncs, storage commits, round trips) are shared by more writes;
/// at light load a proposal goes out at once. On the leader, after a batch
/// of [`BUSY_BATCH`] or more, the next one also waits for [`FILL_TO`]
/// proposals, or [`FILL_WAIT`] after the previous one is done. A follower
/// forwards at once: the leader's batching covers its proposals too.
async fn proposer(log: std::sync::Weak<RaftLog>, mut queued: mpsc::Receiver<Group>) {
    let mut flights = tokio::task::JoinSet::new();
    let mut waiting: Vec<Group> = Vec::new();
    let (mut ops, mut bytes) = (0, 0);
    let mut open = true;
    // The size of the last batch, and when the last flight ended.
    let (mut last_ops, mut last_done) = (0, Instant::now());
    loop {
        while open && ops < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match queued.try_recv() {
                Ok(g) => {
                    (ops, bytes) = (ops + g.ops.len(), bytes + g.bytes());
                    waiting.push(g);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let full = ops >= MAX_BATCH || bytes >= MAX_BATCH_BYTES;
        let mut fill_until = None;
        if !waiting.is_empty() && flights.len() < IN_FLIGHT {
            let Some(log) = log.upgrade() else { return };
            let leads = log.leader_name().as_ref() == Some(&log.me);
            let until = last_done + FILL_WAIT;
            let filled = last_ops < BUSY_BATCH || ops >= FILL_TO || Instant::now() >= until;
            if (flights.is_empty() && filled) || full || !leads {
                last_ops = ops;
                flights.spawn(log.place(std::mem::take(&mut waiting)));
                (ops, bytes) = (0, 0);
                continue;
            }
            if flights.is_empty() {
                fill_until = Some(until);
            }
        }
        let filling = fill_until.is_some();
        let fill_until = fill_until.unwrap_or_else(Instant::now);
        tokio::select! {
            () = tokio::time::sleep_until(fill_until.into()), if filling => {}
            Some(_) = flights.join_next(), if !flights.is_empty() => last_done = Instant::now(),
            g = queued.recv(), if open && !full => match g {
                Some(g) => {
                    (ops, bytes) = (ops + g.ops.len(), bytes + g.bytes());
                    waiting.push(g);
                }
                None => open = false,
            },
            else => return,
        }
    }
}

impl ConsensusBackend for Arc<RaftLog> {
    fn propose(&self, stream: &str, data: Vec<u8>) -> BoxFuture<'static, Result<u64, LogError>> {
        let ops = vec![(stream.to_string(), data)];
        let this = self.clone();
        Box::pin(async move {
            // One deadline for committing and applying here.
            let deadline = Instant::now() + PROPOSE_TIMEOUT;
            let index = this.enqueue(ops, false, deadline).await?;
            // Committed; the caller also wants it applied here.
            tokio::time::timeout_at(deadline.into(), this.sm.watches.wait_for(index))
                .await
                .map(|()| index)
                .map_err(|_| LogError::Timeout)
        })
    }

    fn submit(&self, stream: &str, data: Vec<u8>, done: Submitted) {
        let group = Group {
            ops: vec![(stream.to_string(), data)],
            forwarded: false,
            reply: Reply::call(done),
            deadline: Instant::now() + PROPOSE_TIMEOUT,
        };
        // The queue is full only under a burst beyond what one entry
        // carries; then the submission waits for room on a task.
        match self.queue.try_send(group) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(group)) => {
                let queue = self.queue.clone();
                tokio::spawn(async move {
                    if let Err(mpsc::error::SendError(group)) = queue.send(group).await {
                        group.reply.send(Err(LogError::ShuttingDown));
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(group)) => {
                group.reply.send(Err(LogError::ShuttingDown));
            }
        }
    }

    fn read_index(&self) -> BoxFuture<'static, Result<u64, LogError>> {
        Box::pin(self.clone().on_leader(kind::READ_INDEX, Vec::new(), |me| {
            Box::pin(async move { me.read_index_here().await })
        }))
    }

    fn entries(
        &self,
        stream: &str,
        after: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<super::log::Entry>, LogError> {
        self.sm.entries(stream, after, through, max)
    }

    fn restore_point(&self, stream: &str) -> Result<Option<RestorePoint>, LogError> {
        self.sm.restore_point(stream)
    }

    fn set_capture(&self, capture: Arc<dyn Capture>) {
        self.sm.compaction.set_capture(capture);
    }

    fn last_control(&self, stream: &str, through: u64) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        compaction::last_control(&self.sm.db, stream, through)
    }

    fn subscribe(&self, stream: &str) -> Result<tokio::sync::watch::Receiver<u64>, LogError> {
        self.sm.watches.subscribe(&self.sm.db, stream)
    }

    fn leader(&self) -> Option<String> {
        self.leader_name()
    }

    fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    fn commit_index(&self) -> u64 {
        self.sm.watches.commit_index()
    }

    fn stats(&self) -> LogStats {
        LogStats {
            proposals: self.proposals.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            snapshots_built: self.sm.built.load(Ordering::Relaxed),
            snapshots_installed: self.sm.installed.load(Ordering::Relaxed),
            log_writes: self.append_time.lock().expect("log store poisoned").clone(),
        }
    }
}

/// A membership change whose answer carries no membership: openraft
/// always sets it for a change, so this is a broken invariant, reported
/// instead of guessed at.
fn no_membership() -> LogError {
    LogError::Storage("the membership change committed without its membership".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(deadline: Instant) -> (Group, oneshot::Receiver<Result<u64, LogError>>) {
        let (tx, rx) = oneshot::channel();
        let g = Group {
            ops: vec![("kv".into(), vec![1])],
            forwarded: false,
            reply: Reply::wait(tx),
            deadline,
        };
        (g, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn each_group_times_out_at_its_own_deadline_while_the_rest_wait_on() {
        let now = Instant::now();
        let (early, mut early_rx) = group(now + Duration::from_secs(1));
        let (late, late_rx) = group(now + Duration::from_secs(8));
        let mut slots = vec![(1, Some(early)), (1, Some(late))];
        // The entry commits 3 s in: after the first deadline, before the second.
        let attempt: BoxFuture<'_, Result<u64, LogError>> = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(10)
        });
        let result = await_within_deadlines(attempt, &mut slots).await;
        assert!(matches!(result, Some(Ok(10))));
        assert!(matches!(early_rx.try_recv(), Ok(Err(LogError::Timeout))));
        assert!(slots[0].1.is_none(), "the early group was answered");
        // The late one is still waiting for its index, which counts the
        // early group's op before it.
        let (_, Some(late)) = slots.remove(1) else {
            panic!("the late group was answered early");
        };
        late.reply.send(Ok(11));
        assert!(matches!(late_rx.await, Ok(Ok(11))));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_never_ends_times_every_group_out() {
        let now = Instant::now();
        let (a, a_rx) = group(now + Duration::from_secs(1));
        let (b, b_rx) = group(now + Duration::from_secs(2));
        let mut slots = vec![(1, Some(a)), (1, Some(b))];
        let attempt: BoxFuture<'_, Result<u64, LogError>> = Box::pin(std::future::pending());
        assert!(await_within_deadlines(attempt, &mut slots).await.is_none());
        assert!(matches!(a_rx.await, Ok(Err(LogError::Timeout))));
        assert!(matches!(b_rx.await, Ok(Err(LogError::Timeout))));
    }

    /// Every RPC crosses the wire in postcard: the shapes openraft uses
    /// (enums, maps, sets, options, nested errors) must survive it.
    #[test]
    fn raft_messages_survive_the_wire_encoding() {
        let leader = raft_id("node-1");
        let log_id = |index| LogId::new(openraft::CommittedLeaderId::new(3, leader), index);
        let members: BTreeMap<NodeId, BasicNode> = ["node-1", "node-2"]
            .iter()
            .map(|n| {
                (
                    raft_id(n),
                    BasicNode {
                        addr: format!("{n}@127.0.0.1:7400"),
                    },
                )
            })
            .collect();
        let membership = openraft::Membership::new(vec![members.keys().copied().collect()], None);
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(3, leader),
            prev_log_id: Some(log_id(6)),
            entries: vec![
                Entry {
                    log_id: log_id(7),
                    payload: EntryPayload::Normal(Batch(vec![("kv".into(), vec![0, 1, 2])])),
                },
                Entry {
                    log_id: log_id(8),
                    payload: EntryPayload::Membership(membership.clone()),
                },
                Entry {
                    log_id: log_id(9),
                    payload: EntryPayload::Blank,
                },
            ],
            leader_commit: Some(log_id(6)),
        };
        let back: AppendEntriesRequest<TypeConfig> = dec(&enc(&req)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{req:?}"));

        let err: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
            Err(RaftError::Fatal(openraft::error::Fatal::Panicked));
        let back: Result<VoteResponse<NodeId>, RaftError<NodeId>> = dec(&enc(&err)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{err:?}"));
    }

    /// A submission's outcome is reported exactly once: the outcome it was
    /// sent, or `shutting-down` when the proposer dropped it unsent.
    #[test]
    fn a_reply_reports_once_even_when_dropped() {
        let (tx, rx) = std::sync::mpsc::channel();
        let report = |tx: std::sync::mpsc::Sender<_>| -> Submitted {
            Box::new(move |outcome| tx.send(outcome).unwrap())
        };
        Reply::call(report(tx.clone())).send(Ok(7));
        drop(Reply::call(report(tx)));
        let outcomes: Vec<_> = rx.iter().collect();
        assert!(matches!(
            outcomes.as_slice(),
            [Ok(7), Err(LogError::ShuttingDown)]
        ));
    }

    /// A batch's data is encoded as bytes, which in postcard is exactly
    /// what a sequence of `u8` was: logs written before still decode.
    #[test]
    fn batch_encoding_is_that_of_a_plain_vector() {
        let ops = vec![
            ("kv".to_string(), vec![0, 1, 2, 255]),
            ("lock".to_string(), vec![]),
        ];
        let bytes = enc(&Batch(ops.clone()));
        assert_eq!(bytes, enc(&ops));
        assert_eq!(dec::<Batch>(&bytes).unwrap(), Batch(ops));
    }

    fn batch(index: u64, ops: &[(&str, &[u8])]) -> Entry<TypeConfig> {
        let leader = openraft::CommittedLeaderId::new(1, raft_id("node-1"));
        Entry {
            log_id: LogId::new(leader, index),
            payload: EntryPayload::Normal(Batch(
                ops.iter()
                    .map(|(s, d)| (s.to_string(), d.to_vec()))
                    .collect(),
            )),
        }
    }

    /// A snapshot replaces a plugin's applied entries by its state: a
    /// reader behind that state is told to restore, on the node that built
    /// it and on a node that installs it, and the entries after it are
    /// still read one by one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_compacts_a_stream_behind_the_plugins_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(&dir.path().join("a.redb")).unwrap();
        // Stream indexes 1..=6: kv, other, kv, kv (a swap), kv, kv.
        let swap = crate::primitives::consensus::Control::Swap {
            component: vec![0],
            config: None,
        }
        .encode();
        sm.apply(vec![
            batch(1, &[("kv", &[0, 1]), ("other", &[0, 2])]),
            batch(2, &[("kv", &[0, 3]), ("kv", &swap)]),
            batch(3, &[("kv", &[0, 5]), ("kv", &[0, 6])]),
        ])
        .await
        .unwrap();
        // The plugin has applied through 5.
        sm.shared
            .compaction
            .set_capture(Arc::new(compaction::AppliedThrough(5)));
        let snapshot = sm.build_snapshot().await.unwrap();

        let check = |shared: &SmShared| {
            assert!(matches!(
                shared.entries("kv", 2, 6, 100),
                Err(LogError::Compacted(4))
            ));
            let after: Vec<u64> = shared
                .entries("kv", 5, 6, 100)
                .unwrap()
                .iter()
                .map(|e| e.index)
                .collect();
            assert_eq!(after, vec![6]);
            let point = shared.restore_point("kv").unwrap().unwrap();
            assert_eq!((point.index, &point.state[..]), (5, &b"memory"[..]));
            assert_eq!(point.control.map(|(i, _)| i), Some(4), "the swap is kept");
            // A stream with no plugin state is kept whole.
            assert_eq!(shared.entries("other", 0, 6, 100).unwrap().len(), 1);
        };
        check(&sm.shared);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.snapshot_id, snapshot.meta.snapshot_id);

        let mut other = StateMachine::open(&dir.path().join("b.redb")).unwrap();
        other
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        check(&other.shared);
        assert_eq!(other.shared.watches.commit_index(), 6);
        // The install survives a reopen.
        drop(other);
        let reopened = StateMachine::open(&dir.path().join("b.redb")).unwrap();
        check(&reopened.shared);
    }
}
