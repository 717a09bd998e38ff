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
//!
//! Layout: `log_store` (the Raft log file), `state_machine` (the streams
//! file and snapshots), `network` (Raft RPCs over the transport),
//! `backend` ([`RaftLog`], the replicated
//! [`ConsensusBackend`](super::log::ConsensusBackend)), `members` (voter
//! changes, and following the membership), `propose` (batching proposals
//! and getting them to the leader) and `elections`; tests in `tests`.

// The error type of openraft's storage traits is theirs to choose.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::{AnyError, StorageError};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod backend;
mod elections;
mod log_store;
mod members;
mod network;
mod propose;
mod state_machine;
#[cfg(test)]
mod tests;

pub use backend::{RaftFigures, RaftLog, RaftOptions, Timing};
pub use log_store::LogStore;
pub use members::MemberChange;
pub use network::{Connection, Network};
pub use state_machine::{SmShared, StateMachine};

/// Proposals after which a queue is full: it goes out even while another
/// is in flight.
pub const MAX_BATCH: usize = 256;
/// Bytes of proposals after which a queue is full.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Most batches a node has in flight at once.
pub const IN_FLIGHT: usize = 8;
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

type Raft = openraft::Raft<TypeConfig>;

/// Raft ids to node names, learned from the config and the membership.
type Names = Arc<RwLock<HashMap<NodeId, String>>>;

/// Whether (and by which membership index) this node was removed.
type Removed = Arc<Mutex<Option<u64>>>;
