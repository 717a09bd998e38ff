//! Histories of a `pubsub` topic and of `work-queue` tasks, checked for
//! what their users rely on.
//!
//! A topic: every publish that was acknowledged is stored, once, and
//! delivered; nothing is stored that no one published; and no message is
//! delivered by a fetch sent after an ack of it was answered (an acked
//! message never comes again).
//!
//! Tasks: every task whose submit was acknowledged ends done; no fencing
//! token of a task is handed out twice, and a lease sent after another
//! was answered carries a higher token; at most one result of a task is
//! accepted, and it is the one the task holds at the end.

use std::collections::{BTreeMap, BTreeSet};

/// A message handed to a consumer by a fetch.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// When the fetch was sent and answered.
    pub call: u64,
    pub ret: u64,
    pub seq: u64,
    /// The message, which is its publish id.
    pub id: String,
}

/// An ack answered `acked: true`: the message was out, and is no more.
#[derive(Debug, Clone)]
pub struct Ack {
    pub call: u64,
    pub ret: u64,
    pub seq: u64,
}

#[derive(Debug, Default)]
pub struct Topic {
    /// Publishes answered 200, by id.
    pub acknowledged: BTreeSet<String>,
    /// Publishes whose outcome is unknown (they may be stored, once).
    pub unknown: BTreeSet<String>,
    pub deliveries: Vec<Delivery>,
    pub acks: Vec<Ack>,
    /// The whole topic read back at the end: `(seq, id)`.
    pub stored: Vec<(u64, String)>,
}

/// The violations in a topic's history, in words; empty when none.
pub fn topic_violations(t: &Topic) -> Vec<String> {
    let mut out = Vec::new();
    let mut stored: BTreeMap<&str, u64> = BTreeMap::new();
    for (seq, id) in &t.stored {
        if let Some(first) = stored.insert(id, *seq) {
            out.push(format!("{id} stored twice, as {first} and {seq}"));
        }
        if !t.acknowledged.contains(id) && !t.unknown.contains(id) {
            out.push(format!("{id} (seq {seq}) stored but never published"));
        }
    }
    let delivered: BTreeSet<&str> = t.deliveries.iter().map(|d| d.id.as_str()).collect();
    for id in &t.acknowledged {
        if !stored.contains_key(id.as_str()) {
            out.push(format!("{id} acknowledged but not stored"));
        } else if !delivered.contains(id.as_str()) {
            out.push(format!("{id} acknowledged but never delivered"));
        }
    }
    let mut acked: BTreeMap<u64, &Ack> = BTreeMap::new();
    for a in &t.acks {
        // The first ack of a message to be answered.
        if acked.get(&a.seq).is_none_or(|b| a.ret < b.ret) {
            acked.insert(a.seq, a);
        }
    }
    for d in &t.deliveries {
        if let Some(a) = acked.get(&d.seq)
            && d.call > a.ret
        {
            out.push(format!(
                "seq {} delivered by a fetch sent at {} after an ack answered at {}",
                d.seq, d.call, a.ret
            ));
        }
    }
    out
}

/// A task handed to a worker by a lease.
#[derive(Debug, Clone)]
pub struct Lease {
    pub call: u64,
    pub ret: u64,
    pub id: String,
    pub token: u64,
}

#[derive(Debug, Default)]
pub struct Tasks {
    /// Every task submitted, whatever the answer, by id.
    pub submitted: BTreeSet<String>,
    /// Submits answered 200, by id.
    pub acknowledged: BTreeSet<String>,
    pub leases: Vec<Lease>,
    /// Results answered 200: `(id, token)`.
    pub accepted: Vec<(String, u64)>,
    /// Each task at the end: its state and the token its result names
    /// (the result of a completion is the token it was sent under).
    pub finally: BTreeMap<String, (String, Option<u64>)>,
}

/// The violations in the tasks' history, in words; empty when none.
pub fn task_violations(t: &Tasks) -> Vec<String> {
    let mut out = Vec::new();
    for id in &t.acknowledged {
        match t.finally.get(id) {
            Some((state, _)) if state == "done" => {}
            Some((state, _)) => out.push(format!("task {id} acknowledged but ends {state}")),
            None => out.push(format!("task {id} acknowledged but gone")),
        }
    }
    let mut by_task: BTreeMap<&str, Vec<&Lease>> = BTreeMap::new();
    for l in &t.leases {
        by_task.entry(&l.id).or_default().push(l);
    }
    for (id, leases) in &mut by_task {
        let mut tokens = BTreeSet::new();
        for l in leases.iter() {
            if !tokens.insert(l.token) {
                out.push(format!("task {id}: token {} handed out twice", l.token));
            }
        }
        leases.sort_by_key(|l| l.ret);
        for a in leases.iter() {
            for b in leases.iter().filter(|b| b.call > a.ret) {
                if b.token <= a.token {
                    out.push(format!(
                        "task {id}: token {} leased after token {} was",
                        b.token, a.token
                    ));
                }
            }
        }
    }
    let mut accepted: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (id, token) in &t.accepted {
        accepted.entry(id).or_default().push(*token);
    }
    for (id, tokens) in &accepted {
        if tokens.len() > 1 {
            out.push(format!(
                "task {id}: results accepted under tokens {tokens:?}"
            ));
        }
        match t.finally.get(*id) {
            Some((_, Some(kept))) if tokens.contains(kept) => {}
            other => out.push(format!(
                "task {id}: accepted under {tokens:?} but holds {other:?}"
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn delivery(call: u64, seq: u64, id: &str) -> Delivery {
        Delivery {
            call,
            ret: call + 1,
            seq,
            id: id.into(),
        }
    }

    fn good_topic() -> Topic {
        Topic {
            acknowledged: ids(&["a", "b"]),
            unknown: ids(&["c", "d"]),
            deliveries: vec![
                delivery(10, 1, "a"),
                delivery(12, 2, "b"),
                delivery(30, 2, "b"),
            ],
            acks: vec![
                Ack {
                    call: 14,
                    ret: 15,
                    seq: 1,
                },
                Ack {
                    call: 31,
                    ret: 32,
                    seq: 2,
                },
            ],
            // An unknown publish may be stored once, or not at all.
            stored: vec![(1, "a".into()), (2, "b".into()), (3, "c".into())],
        }
    }

    #[test]
    fn a_good_topic_history_has_no_violations() {
        assert_eq!(topic_violations(&good_topic()), Vec::<String>::new());
    }

    #[test]
    fn loss_doubles_inventions_and_deliveries_after_an_ack_are_found() {
        let mut t = good_topic();
        t.stored.retain(|(_, id)| id != "b");
        assert_eq!(topic_violations(&t), ["b acknowledged but not stored"]);

        let mut t = good_topic();
        t.stored.push((4, "c".into()));
        t.stored.push((5, "zz".into()));
        assert_eq!(
            topic_violations(&t),
            [
                "c stored twice, as 3 and 4",
                "zz (seq 5) stored but never published"
            ]
        );

        let mut t = good_topic();
        t.deliveries.retain(|d| d.id != "a");
        assert_eq!(topic_violations(&t), ["a acknowledged but never delivered"]);

        let mut t = good_topic();
        t.deliveries.push(delivery(16, 1, "a"));
        assert_eq!(
            topic_violations(&t),
            ["seq 1 delivered by a fetch sent at 16 after an ack answered at 15"]
        );
        // A fetch sent before the ack was answered may still deliver it.
        let mut t = good_topic();
        t.deliveries.push(delivery(14, 1, "a"));
        assert!(topic_violations(&t).is_empty());
    }

    fn lease(call: u64, ret: u64, id: &str, token: u64) -> Lease {
        Lease {
            call,
            ret,
            id: id.into(),
            token,
        }
    }

    fn good_tasks() -> Tasks {
        Tasks {
            submitted: ids(&["t1", "t2"]),
            acknowledged: ids(&["t1", "t2"]),
            // t1's first lease ran out; the second worker finished it.
            leases: vec![
                lease(1, 2, "t1", 1),
                lease(5, 6, "t1", 2),
                lease(3, 4, "t2", 1),
            ],
            accepted: vec![("t1".into(), 2), ("t2".into(), 1)],
            finally: [
                ("t1".to_string(), ("done".to_string(), Some(2))),
                ("t2".to_string(), ("done".to_string(), Some(1))),
            ]
            .into(),
        }
    }

    #[test]
    fn a_good_task_history_has_no_violations() {
        assert_eq!(task_violations(&good_tasks()), Vec::<String>::new());
    }

    #[test]
    fn lost_tasks_reused_tokens_and_double_acceptance_are_found() {
        let mut t = good_tasks();
        t.finally.insert("t2".into(), ("queued".into(), None));
        t.accepted.retain(|(id, _)| id != "t2");
        assert_eq!(
            task_violations(&t),
            ["task t2 acknowledged but ends queued"]
        );

        let mut t = good_tasks();
        t.leases.push(lease(7, 8, "t1", 2));
        let v = task_violations(&t);
        assert!(
            v.contains(&"task t1: token 2 handed out twice".to_string()),
            "{v:?}"
        );
        assert!(
            v.contains(&"task t1: token 2 leased after token 2 was".to_string()),
            "{v:?}"
        );

        let mut t = good_tasks();
        t.accepted.push(("t1".into(), 1));
        assert_eq!(
            task_violations(&t),
            ["task t1: results accepted under tokens [2, 1]"]
        );

        let mut t = good_tasks();
        t.finally.insert("t2".into(), ("done".into(), Some(3)));
        assert_eq!(
            task_violations(&t),
            [r#"task t2: accepted under [1] but holds Some(("done", Some(3)))"#]
        );
    }
}
