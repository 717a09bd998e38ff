//! Elections hastened: a follower campaigns as soon as a silent leader's
//! lease has run out, instead of a whole election timeout later.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::BasicNode;

use super::{NodeId, Raft, Removed, Timing};

/// The leader this follower last accepted entries from: who, in which
/// term, and when the request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Heard {
    pub(super) leader: NodeId,
    pub(super) term: u64,
    pub(super) at: Instant,
}

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
pub(super) async fn hasten_elections(
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
