//! The consensus backend contract shared by the single-node log and the
//! replicated engine.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

use crate::runtime::metrics::Histogram;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A committed entry of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Cluster-wide log index.
    pub index: u64,
    /// Term it was committed in.
    pub term: u64,
    /// The proposed bytes.
    pub data: Vec<u8>,
}

/// Why a log operation failed.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum LogError {
    /// Another node leads; definite.
    #[error("not the leader (leader: {0:?})")]
    NotLeader(Option<String>),
    /// No quorum in time; the outcome is unknown.
    #[error("timed out waiting for commit")]
    Timeout,
    /// The node is stopping; the outcome is unknown.
    #[error("shutting down")]
    ShuttingDown,
    /// The log store failed; definite.
    #[error("log store: {0}")]
    Storage(String),
    /// The stream's entries through this index were compacted into a
    /// snapshot: a reader behind it must start from the stream's
    /// [`RestorePoint`].
    #[error("entries through {0} were compacted into a snapshot")]
    Compacted(u64),
    /// The request was refused and nothing changed; definite. The message
    /// says why.
    #[error("{0}")]
    Rejected(String),
}

/// A plugin's state at one index of its stream, as a snapshot carries it
/// in place of the entries it has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestorePoint {
    /// The last index of the stream whose effects the state includes.
    pub index: u64,
    /// The plugin's storage namespace: key, value, version.
    pub items: Vec<(Vec<u8>, Vec<u8>, u64)>,
    /// What the plugin's `snapshot` hook returned.
    pub state: Vec<u8>,
    /// The last host control entry (a cluster-wide swap) at or below
    /// `index`: `(index, data)`. A node restoring from the point applies
    /// it first, so the state goes to the version that produced it.
    pub control: Option<(u64, Vec<u8>)>,
}

/// Takes the plugins' [`RestorePoint`]s, each between two of its hooks,
/// for the log to compact each plugin's stream behind its point.
pub trait Capture: Send + Sync + 'static {
    /// The state of every plugin running here, by stream name. A plugin
    /// that does not answer within `deadline` is left out.
    fn capture(
        &self,
        deadline: std::time::Duration,
    ) -> BoxFuture<'static, HashMap<String, RestorePoint>>;
}

/// Counters a log keeps about itself.
#[derive(Debug, Clone, Default)]
pub struct LogStats {
    /// Entries proposed and committed.
    pub proposals: u64,
    /// Durable writes (fsyncs) that committed them.
    pub writes: u64,
    /// Snapshots this node built; on a single node, compactions of its
    /// streams.
    pub snapshots_built: u64,
    /// Snapshots this node installed from the leader.
    pub snapshots_installed: u64,
    /// How long this node's durable log writes took (commit and fsync),
    /// in seconds.
    pub log_writes: Histogram,
}

/// Receives the outcome of [`ConsensusBackend::submit`].
pub type Submitted = Box<dyn FnOnce(Result<u64, LogError>) + Send>;

/// A totally ordered, durable log with one stream per plugin.
///
/// To be correct, an implementation must: give every entry a unique index
/// that is greater than every earlier entry's; resolve `propose` only once
/// the entry is durable on a quorum; never lose or reorder a committed entry;
/// and make `subscribe` report, for a stream, the index of its last
/// committed entry, growing monotonically.
pub trait ConsensusBackend: Send + Sync + 'static {
    /// Appends `data` to `stream`; resolves with its index once committed
    /// and applied on this node.
    fn propose(&self, stream: &str, data: Vec<u8>) -> BoxFuture<'static, Result<u64, LogError>>;
    /// Like [`propose`](Self::propose), but hands the outcome to `done` as
    /// soon as the entry is committed, applied here or not. `done` runs
    /// exactly once, and must be quick: it may run on the task that
    /// commits entries.
    fn submit(&self, stream: &str, data: Vec<u8>, done: Submitted) {
        let proposal = self.propose(stream, data);
        tokio::spawn(async move { done(proposal.await) });
    }
    /// A linearizable read point: every entry acknowledged before the call
    /// has an index at or below the returned one and is committed here.
    fn read_index(&self) -> BoxFuture<'static, Result<u64, LogError>>;
    /// Committed entries of `stream` with `after < index <= through`, in
    /// order, at most `max`. Fails with [`LogError::Compacted`] when some
    /// of them were compacted away: the reader continues from
    /// [`restore_point`](Self::restore_point).
    fn entries(
        &self,
        stream: &str,
        after: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<Entry>, LogError>;
    /// The last host control entry (a cluster-wide swap) of `stream` at or
    /// below `through`, as `(index, data)`: the version a plugin whose
    /// cursor is at `through` runs.
    fn last_control(&self, stream: &str, through: u64) -> Result<Option<(u64, Vec<u8>)>, LogError>;
    /// Sets where plugin state comes from when the streams are compacted.
    /// Until it is set, they are kept whole.
    fn set_capture(&self, capture: std::sync::Arc<dyn Capture>);
    /// The state that replaces the compacted part of `stream`, if any.
    fn restore_point(&self, stream: &str) -> Result<Option<RestorePoint>, LogError> {
        let _ = stream;
        Ok(None)
    }
    /// The last committed index of `stream`, updated as entries commit.
    fn subscribe(&self, stream: &str) -> Result<watch::Receiver<u64>, LogError>;
    /// The leader this node knows of.
    fn leader(&self) -> Option<String>;
    /// The current term.
    fn term(&self) -> u64;
    /// The last committed index of the whole log.
    fn commit_index(&self) -> u64;
    /// Counters for metrics.
    fn stats(&self) -> LogStats;
}
