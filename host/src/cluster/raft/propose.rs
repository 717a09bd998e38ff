//! Proposing: this node's proposals (and those followers forward to it)
//! batched into Raft entries and placed on the leader, and read-index
//! requests run there.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{
    Batch, FORWARD_TIMEOUT, IN_FLIGHT, MAX_BATCH, MAX_BATCH_BYTES, PROPOSE_TIMEOUT, RaftLog, dec,
    enc, kind,
};
use crate::cluster::log::{BoxFuture, LogError, Submitted};
use crate::cluster::transport::TransportError;

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

/// Proposals to go into one Raft entry in order, with consecutive indexes;
/// `reply` gets the first.
pub(super) struct Group {
    pub(super) ops: Vec<(String, Vec<u8>)>,
    /// Sent by a follower: placed here, or refused, never forwarded on.
    pub(super) forwarded: bool,
    pub(super) reply: Reply,
    /// When the outcome is reported unknown if the entry has not committed
    /// by then. It runs from submission, so time spent queued behind a
    /// stuck entry counts against it.
    pub(super) deadline: Instant,
}

impl Group {
    fn bytes(&self) -> usize {
        self.ops.iter().map(|(s, d)| s.len() + d.len()).sum()
    }
}

/// Where a group's outcome goes: to a task awaiting it, or straight to a
/// plugin's submission, which needs no task of its own. A reply dropped
/// unsent (the proposer stopped) reports [`LogError::ShuttingDown`].
pub(super) struct Reply(Option<ReplyTo>);

enum ReplyTo {
    Wait(oneshot::Sender<Result<u64, LogError>>),
    Call(Submitted),
}

impl Reply {
    pub(super) fn wait(tx: oneshot::Sender<Result<u64, LogError>>) -> Reply {
        Reply(Some(ReplyTo::Wait(tx)))
    }

    pub(super) fn call(done: Submitted) -> Reply {
        Reply(Some(ReplyTo::Call(done)))
    }

    pub(super) fn send(mut self, outcome: Result<u64, LogError>) {
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

impl RaftLog {
    /// Queues `ops` to go into one entry; resolves with the first one's
    /// index once committed.
    pub(super) async fn enqueue(
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

    pub(super) async fn read_index_here(&self) -> Result<u64, LogError> {
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
    pub(super) async fn on_leader(
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
}

/// Awaits `attempt`, answering `timeout` to each group in `slots` whose
/// deadline passes meanwhile. `None` when every group was answered so
/// before the attempt ended.
pub(super) async fn await_within_deadlines(
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
pub(super) async fn proposer(log: std::sync::Weak<RaftLog>, mut queued: mpsc::Receiver<Group>) {
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
