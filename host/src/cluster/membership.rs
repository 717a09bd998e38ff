//! The node's membership view: the member list as this node sees it, kept
//! by gossip (`swim`) and the Raft membership, and read by plugins through
//! the `membership` interface.

use std::sync::{Arc, RwLock};

use crate::runtime::bindings::plexus::cluster::types::{Member, MemberEvent, MemberState};

/// The node's membership view, shared by all plugins.
///
/// To be correct, a source of membership must bump `epoch` on every change
/// it makes to `members`.
#[derive(Debug)]
pub struct MembershipView {
    local: String,
    inner: RwLock<(u64, Vec<Member>)>,
    /// The members of the Raft membership last seen, and those it dropped
    /// (gossip about them is ignored until a membership has them again).
    raft: std::sync::Mutex<RaftMembers>,
}

#[derive(Debug, Default)]
struct RaftMembers {
    all: std::collections::BTreeSet<String>,
    departed: std::collections::BTreeSet<String>,
}

impl MembershipView {
    /// A cluster of one: this node, alive, voting.
    pub fn single(node: &str, metadata: Vec<(String, String)>) -> Arc<Self> {
        Arc::new(MembershipView {
            local: node.to_string(),
            inner: RwLock::new((
                1,
                vec![Member {
                    id: node.to_string(),
                    state: MemberState::Alive,
                    voter: true,
                    metadata,
                }],
            )),
            raft: Default::default(),
        })
    }

    /// A static cluster: every configured member, alive and voting.
    pub fn cluster(
        node: &str,
        members: impl IntoIterator<Item = String>,
        metadata: Vec<(String, String)>,
    ) -> Arc<Self> {
        let mut list: Vec<Member> = members
            .into_iter()
            .map(|id| Member {
                metadata: if id == node {
                    metadata.clone()
                } else {
                    Vec::new()
                },
                // Peers are suspect until the failure detector hears from
                // them.
                state: if id == node {
                    MemberState::Alive
                } else {
                    MemberState::Suspect
                },
                id,
                voter: true,
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        Arc::new(MembershipView {
            local: node.to_string(),
            inner: RwLock::new((1, list)),
            raft: Default::default(),
        })
    }

    /// Records a member's new state; returns the event if it changed. A
    /// member the view did not know (found by gossip before it was made a
    /// voter) is added as a non-voter.
    pub fn set_state(&self, id: &str, state: MemberState) -> Option<MemberEvent> {
        let mut inner = self.inner.write().expect("membership poisoned");
        if self
            .raft
            .lock()
            .expect("membership poisoned")
            .departed
            .contains(id)
        {
            return None;
        }
        let (epoch, members) = &mut *inner;
        let member = match members.iter().position(|m| m.id == id) {
            Some(i) => {
                let member = &mut members[i];
                if member.state == state {
                    return None;
                }
                member.state = state;
                member
            }
            None => {
                members.push(Member {
                    id: id.to_string(),
                    state,
                    voter: false,
                    metadata: Vec::new(),
                });
                members.sort_by(|a, b| a.id.cmp(&b.id));
                let i = members.iter().position(|m| m.id == id).expect("just added");
                &mut members[i]
            }
        };
        *epoch += 1;
        Some(MemberEvent {
            member: member.clone(),
            epoch: *epoch,
        })
    }

    /// Marks exactly `voters` as voting members, adding those the view did
    /// not know (as suspect until gossip hears from them). Returns one
    /// event per member that changed.
    pub fn set_voters(&self, voters: &std::collections::BTreeSet<String>) -> Vec<MemberEvent> {
        let mut inner = self.inner.write().expect("membership poisoned");
        let (epoch, members) = &mut *inner;
        for id in voters {
            if !members.iter().any(|m| &m.id == id) {
                members.push(Member {
                    id: id.clone(),
                    state: if *id == self.local {
                        MemberState::Alive
                    } else {
                        MemberState::Suspect
                    },
                    voter: false,
                    metadata: Vec::new(),
                });
            }
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let mut events = Vec::new();
        for member in members.iter_mut() {
            let voter = voters.contains(&member.id);
            if member.voter != voter {
                member.voter = voter;
                *epoch += 1;
                events.push(MemberEvent {
                    member: member.clone(),
                    epoch: *epoch,
                });
            }
        }
        events
    }

    /// Follows the Raft membership: `voters` vote, and a member that was in
    /// the last membership (`all`, voters and learners) but is not in this
    /// one leaves the view at once, with a `dead` event; gossip about it is
    /// ignored until a membership has it again.
    pub fn set_members(
        &self,
        voters: &std::collections::BTreeSet<String>,
        all: &std::collections::BTreeSet<String>,
    ) -> Vec<MemberEvent> {
        let mut events = self.set_voters(voters);
        let mut inner = self.inner.write().expect("membership poisoned");
        let mut raft = self.raft.lock().expect("membership poisoned");
        let (epoch, members) = &mut *inner;
        let gone: Vec<String> = raft
            .all
            .iter()
            .filter(|id| !all.contains(*id) && **id != self.local)
            .cloned()
            .collect();
        for id in gone {
            if let Some(i) = members.iter().position(|m| m.id == id) {
                let mut member = members.remove(i);
                member.state = MemberState::Dead;
                member.voter = false;
                *epoch += 1;
                events.push(MemberEvent {
                    member,
                    epoch: *epoch,
                });
            }
            raft.departed.insert(id);
        }
        for id in all {
            raft.departed.remove(id);
        }
        raft.all = all.clone();
        events
    }

    /// This node's id.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The epoch and members.
    pub fn snapshot(&self) -> (u64, Vec<Member>) {
        self.inner.read().expect("membership poisoned").clone()
    }

    /// Whether `node` is a member that is not dead.
    pub fn is_reachable(&self, node: &str) -> bool {
        self.inner
            .read()
            .expect("membership poisoned")
            .1
            .iter()
            .any(|m| m.id == node && m.state != MemberState::Dead)
    }
}
