//! Unit tests of the replicated log: deadlines of queued proposals, the
//! wire encoding of Raft messages and batches, and snapshots.

use std::collections::BTreeMap;
use std::time::Instant;

use openraft::raft::{AppendEntriesRequest, VoteResponse};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{BasicNode, Entry, EntryPayload, LogId, error::RaftError};
use tokio::sync::oneshot;

use super::propose::{Group, Reply, await_within_deadlines};
use super::*;
use crate::cluster::compaction;
use crate::cluster::log::{BoxFuture, LogError, Submitted};

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
    let swap = crate::cluster::framing::Control::Swap {
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
