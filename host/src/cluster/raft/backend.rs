//! [`RaftLog`], the replicated [`ConsensusBackend`]: how it starts, what
//! it serves to its peers, and the backend calls plugins make. Voter
//! changes, proposing and elections are in modules of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use openraft::BasicNode;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};
use tokio::sync::{mpsc, watch};

use super::elections::{Heard, hasten_elections};
use super::members::{MemberChange, follow_membership, member_node};
use super::propose::{Group, Reply, proposer};
use super::{
    Batch, FORWARD_TIMEOUT, LogStore, MAX_BATCH, Names, Network, NodeId, PROPOSE_TIMEOUT, Raft,
    Removed, SmShared, StateMachine, TypeConfig, dec, enc, kind, raft_id,
};
use crate::cluster::compaction;
use crate::cluster::log::{
    BoxFuture, Capture, ConsensusBackend, LogError, LogStats, RestorePoint, Submitted,
};
use crate::cluster::transport::Transport;
use crate::runtime::metrics::Histogram;

/// The replicated [`ConsensusBackend`].
pub struct RaftLog {
    pub(super) raft: Raft,
    pub(super) me: String,
    pub(super) sm: Arc<SmShared>,
    pub(super) transport: Arc<Transport>,
    pub(super) names: Names,
    voters: watch::Receiver<BTreeSet<String>>,
    /// Every member (voters and learners), by name.
    members: watch::Receiver<BTreeSet<String>>,
    /// Set once this node learns it was removed from the membership (the
    /// index of the membership that removed it): it no longer campaigns.
    pub(super) removed: Removed,
    /// This node's proposals, and those followers forwarded to it.
    pub(super) queue: mpsc::Sender<Group>,
    /// The leader this follower last accepted entries from.
    heard: Arc<Mutex<Option<Heard>>>,
    pub(super) proposals: Arc<AtomicU64>,
    pub(super) writes: Arc<AtomicU64>,
    /// The log store's append durations.
    append_time: Arc<Mutex<Histogram>>,
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

/// Where this node's Raft stands, as its metrics say: what the operator's
/// page shows for each node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RaftFigures {
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader: Option<String>,
    /// The last entry in this node's log.
    pub last_log_index: Option<u64>,
    /// The last entry applied to this node's state machine.
    pub applied_index: Option<u64>,
    /// The last entry the latest snapshot holds.
    pub snapshot_index: Option<u64>,
    /// On the leader: milliseconds since a quorum last acknowledged it.
    pub quorum_ack_ms: Option<u64>,
    /// On the leader: how far each other member's log matches its own.
    pub matched: Vec<(String, Option<u64>)>,
}

impl RaftLog {
    /// Where this node's Raft stands.
    pub fn figures(&self) -> RaftFigures {
        use openraft::ServerState;
        let m = self.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let matched = m
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, log_id)| {
                let name = self.name_of(*id).unwrap_or_else(|| format!("#{id:016x}"));
                (name, log_id.map(|l| l.index))
            })
            .collect();
        RaftFigures {
            role: role.into(),
            term: m.current_term,
            leader: m.current_leader.and_then(|id| self.name_of(id)),
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            quorum_ack_ms: m.millis_since_quorum_ack,
            matched,
        }
    }

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

    pub(super) fn name_of(&self, id: NodeId) -> Option<String> {
        self.names.read().expect("names poisoned").get(&id).cloned()
    }

    pub(super) fn leader_name(&self) -> Option<String> {
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

    /// Stops Raft.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
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
    ) -> Result<Vec<crate::cluster::log::Entry>, LogError> {
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
