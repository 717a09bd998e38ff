//! Changes of the voter set, made by an operator and run on the leader, and
//! how each node follows the membership it sees in the log.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Names, NodeId, Raft, RaftLog, Removed, dec, enc, kind, raft_id};
use crate::cluster::log::LogError;
use crate::cluster::transport::{Transport, TransportError};

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
pub(super) fn member_node(name: &str, addr: SocketAddr) -> BasicNode {
    BasicNode {
        addr: format!("{name}@{addr}"),
    }
}

fn parse_member(node: &BasicNode) -> Option<(String, SocketAddr)> {
    let (name, addr) = node.addr.split_once('@')?;
    Some((name.to_string(), addr.parse().ok()?))
}

impl RaftLog {
    /// Takes note that the membership committed at `index` left this node
    /// out, unless this node already knows a later one that has it as a
    /// voter: it stops campaigning until a membership adds it again.
    pub(super) fn on_removed(&self, index: u64) {
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
    pub(super) async fn change_here(
        &self,
        change: MemberChange,
    ) -> Result<BTreeSet<String>, LogError> {
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
}

/// Keeps the names, the transport's peers and the published voter set in
/// step with the membership this node sees in the log.
pub(super) async fn follow_membership(
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

/// A membership change whose answer carries no membership: openraft
/// always sets it for a change, so this is a broken invariant, reported
/// instead of guessed at.
fn no_membership() -> LogError {
    LogError::Storage("the membership change committed without its membership".into())
}
