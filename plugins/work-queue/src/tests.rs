//! Leases, fencing tokens, retries and priorities on the in-memory host,
//! with its clock moved by hand.

use plexus_sdk::Response;
use plexus_sdk::testing::TestHost;
use serde_json::{Value, json};

use super::WorkQueue;

fn body(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

fn submit(h: &mut TestHost<WorkQueue>, task: Value) -> String {
    let r = h.post("/queues/q/tasks", task.to_string());
    assert_eq!(r.status, 200, "{}", body(&r));
    body(&r)["id"].as_str().unwrap().to_string()
}

/// Leases the next task: `(id, token)`, or `None` on a 204.
fn lease(h: &mut TestHost<WorkQueue>, lease_ms: u64) -> Option<(String, u64)> {
    let r = h.post(&format!("/queues/q/lease?worker=w&lease_ms={lease_ms}"), "");
    if r.status == 204 {
        return None;
    }
    let v = body(&r);
    Some((
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_u64().unwrap(),
    ))
}

fn state(h: &mut TestHost<WorkQueue>, id: &str) -> Value {
    body(&h.get(&format!("/tasks/{id}")))
}

#[test]
fn a_task_is_leased_once_and_completed_under_its_token() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let id = submit(&mut h, json!({ "payload": { "n": 7 } }));
    let (leased, token) = lease(&mut h, 1000).unwrap();
    assert_eq!((leased.as_str(), token), (id.as_str(), 1));
    assert_eq!(lease(&mut h, 1000), None);
    let r = h.post(&format!("/tasks/{id}/complete?token=1"), r#"{"sum": 7}"#);
    assert_eq!(r.status, 200);
    let s = state(&mut h, &id);
    assert_eq!(
        (s["state"].clone(), s["result"].clone()),
        (json!("done"), json!({ "sum": 7 }))
    );
}

#[test]
fn a_lease_that_runs_out_goes_to_the_next_worker_and_the_late_result_is_refused() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let id = submit(&mut h, json!({}));
    let (_, first) = lease(&mut h, 1000).unwrap();
    h.advance(1000);
    let (again, second) = lease(&mut h, 1000).unwrap();
    assert_eq!((again, second), (id.clone(), first + 1));
    let late = h.post(&format!("/tasks/{id}/complete?token={first}"), "1");
    assert_eq!(late.status, 409);
    assert_eq!(body(&late)["token"], second);
    assert_eq!(
        h.post(&format!("/tasks/{id}/complete?token={second}"), "2")
            .status,
        200
    );
    // Accepted once: the same token again is refused too.
    assert_eq!(
        h.post(&format!("/tasks/{id}/complete?token={second}"), "3")
            .status,
        409
    );
    assert_eq!(state(&mut h, &id)["result"], 2);
}

#[test]
fn heartbeats_keep_a_lease() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let id = submit(&mut h, json!({}));
    lease(&mut h, 1000).unwrap();
    for _ in 0..3 {
        h.advance(800);
        assert_eq!(
            h.post(&format!("/tasks/{id}/heartbeat?token=1&lease_ms=1000"), "")
                .status,
            200
        );
    }
    assert_eq!(lease(&mut h, 1000), None, "the task is still leased");
    assert_eq!(state(&mut h, &id)["state"], "leased");
}

#[test]
fn a_failed_attempt_is_retried_after_a_backoff_until_max_attempts() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let id = submit(&mut h, json!({ "max_attempts": 2 }));
    lease(&mut h, 10_000).unwrap();
    let r = h.post(&format!("/tasks/{id}/fail?token=1"), "boom");
    assert_eq!(body(&r)["state"], "queued");
    assert_eq!(lease(&mut h, 10_000), None, "not before the backoff");
    h.advance(1000);
    let (_, token) = lease(&mut h, 10_000).unwrap();
    assert_eq!(token, 2);
    h.post(&format!("/tasks/{id}/fail?token=2"), "boom again");
    let s = state(&mut h, &id);
    assert_eq!(
        (s["state"].clone(), s["error"].clone()),
        (json!("failed"), json!("boom again"))
    );
    h.advance(120_000);
    assert_eq!(lease(&mut h, 1000), None);
}

#[test]
fn higher_priority_first_then_oldest_first() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let low = submit(&mut h, json!({ "priority": 0 }));
    let high = submit(&mut h, json!({ "priority": 9 }));
    let low2 = submit(&mut h, json!({ "priority": 0 }));
    let order: Vec<String> = (0..3).map(|_| lease(&mut h, 1000).unwrap().0).collect();
    assert_eq!(order, [high, low, low2]);
}

#[test]
fn an_idempotency_key_submits_once() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let r1 = body(&h.post("/queues/q/tasks", json!({ "key": "order-1" }).to_string()));
    let r2 = body(&h.post("/queues/q/tasks", json!({ "key": "order-1" }).to_string()));
    assert_eq!(r1, json!({ "id": "order-1", "duplicate": false }));
    assert_eq!(r2, json!({ "id": "order-1", "duplicate": true }));
    assert!(lease(&mut h, 1000).is_some());
    assert_eq!(lease(&mut h, 1000), None);
}

#[test]
fn bad_requests_are_refused_before_the_log() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    assert_eq!(
        h.post("/queues/q/tasks", json!({ "priority": 10 }).to_string())
            .status,
        400
    );
    assert_eq!(
        h.post("/queues/q/tasks", json!({ "priorty": 1 }).to_string())
            .status,
        400
    );
    assert_eq!(h.post("/tasks/t1/complete", "").status, 400);
    assert!(h.entries().is_empty());
}

#[test]
fn a_waiting_lease_gets_the_next_task_or_204_at_its_deadline() {
    use plexus_sdk::Method;
    use plexus_sdk::testing::{Answer, request};
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let ask = || {
        request(
            Method::Post,
            "/queues/q/lease?worker=w&wait_ms=5000",
            Vec::new(),
        )
    };
    let Answer::Waiting(first) = h.request(ask()) else {
        panic!("an empty lease with wait_ms answered at once");
    };
    h.advance(100);
    assert!(h.answer_of(first).is_none());
    let id = submit(&mut h, json!({ "payload": 1 }));
    h.advance(0);
    let leased = body(&h.answer_of(first).expect("answered by the submit"));
    assert_eq!(
        (leased["id"].as_str(), leased["token"].as_u64()),
        (Some(id.as_str()), Some(1))
    );
    // Nothing comes: 204 at the deadline, not before.
    let Answer::Waiting(second) = h.request(ask()) else {
        panic!("answered at once");
    };
    h.advance(4999);
    assert!(h.answer_of(second).is_none());
    h.advance(1);
    assert_eq!(
        h.answer_of(second)
            .expect("answered at the deadline")
            .status,
        204
    );
}

#[test]
fn a_list_is_submitted_in_one_entry_and_leased_several_at_a_time() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let tasks: Vec<Value> = (0..5).map(|n| json!({ "payload": n })).collect();
    let r = h.post("/queues/q/tasks", Value::from(tasks).to_string());
    assert_eq!(r.status, 200);
    let ids: Vec<String> = body(&r)
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 5);
    assert_eq!(h.entries().len(), 1);
    let first = body(&h.post("/queues/q/lease?worker=w&max=3", ""));
    let leased: Vec<&str> = first
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(leased, ids[..3]);
    let rest = body(&h.post("/queues/q/lease?worker=w&max=3", ""));
    assert_eq!(rest.as_array().unwrap().len(), 2);
    assert_eq!(h.post("/queues/q/lease?worker=w&max=3", "").status, 204);
    let too_many: Vec<Value> = (0..1001).map(|_| json!({})).collect();
    let r = h.post("/queues/q/tasks", Value::from(too_many).to_string());
    assert_eq!(r.status, 400);
}

#[test]
fn a_worker_on_several_queues_takes_them_in_turn_by_weight() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    for (queue, n) in [("busy", 40), ("quiet", 10)] {
        let tasks: Vec<Value> = (0..n).map(|_| json!({})).collect();
        let r = h.post(
            &format!("/queues/{queue}/tasks"),
            Value::from(tasks).to_string(),
        );
        assert_eq!(r.status, 200);
    }
    let mut taken = std::collections::HashMap::<String, u32>::new();
    for _ in 0..40 {
        let t = body(&h.post("/lease?queues=busy:3,quiet&worker=w", ""));
        *taken
            .entry(t["queue"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!((taken["busy"], taken["quiet"]), (30, 10));
    // An empty queue gives its turns to the others.
    for _ in 0..10 {
        let t = body(&h.post("/lease?queues=busy:3,quiet&worker=w", ""));
        assert_eq!(t["queue"], "busy");
    }
    assert_eq!(h.post("/lease?queues=busy:3,quiet", "").status, 204);
    for bad in ["busy:0", "a,a", "a:x", "", "a/b"] {
        let r = h.post(&format!("/lease?queues={bad}"), "");
        assert_eq!(r.status, 400, "{bad}");
    }
}

#[test]
fn a_finished_task_is_kept_for_its_result_ttl_then_dropped() {
    let mut h = TestHost::<WorkQueue>::setup()
        .config(json!({ "result_ttl_ms": 60_000 }))
        .start()
        .unwrap();
    let short = submit(&mut h, json!({ "result_ttl_ms": 1000 }));
    let long = submit(&mut h, json!({}));
    for _ in 0..2 {
        let (id, token) = lease(&mut h, 10_000).unwrap();
        assert_eq!(
            h.post(&format!("/tasks/{id}/complete?token={token}"), "7")
                .status,
            200
        );
    }
    h.advance(999);
    assert_eq!(state(&mut h, &short)["result"], 7);
    h.advance(1);
    assert_eq!(h.get(&format!("/tasks/{short}")).status, 404);
    // The next write drops it from storage, and the key may be used again.
    submit(&mut h, json!({ "key": "later" }));
    assert!(h.stored(format!("t/{short}")).is_none());
    assert_eq!(state(&mut h, &long)["result"], 7);
    h.advance(59_000);
    assert_eq!(h.get(&format!("/tasks/{long}")).status, 404);
}

#[test]
fn a_task_timeout_sets_the_lease_whatever_the_worker_asks() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let id = submit(&mut h, json!({ "timeout_ms": 2000 }));
    let r = body(&h.post("/queues/q/lease?worker=w&lease_ms=60000", ""));
    assert_eq!(
        r["until_ms"].as_u64(),
        Some(plexus_sdk::timers::now_ms() + 2000)
    );
    h.advance(2000);
    let (again, token) = lease(&mut h, 60_000).unwrap();
    assert_eq!((again, token), (id, 2));
}

#[test]
fn leases_taken_through_a_node_declared_dead_go_back_under_a_higher_token() {
    use super::{Ask, Command};
    use plexus_sdk::MemberState;
    let mut h = TestHost::<WorkQueue>::setup()
        .members(&["n1", "n2"])
        .start()
        .unwrap();
    let theirs = submit(&mut h, json!({ "payload": "theirs" }));
    let ours = submit(&mut h, json!({ "payload": "ours" }));
    // A worker beside n2 leases the first task through n2.
    let ask = Ask {
        queues: vec![("q".into(), 1)],
        worker: "w2".into(),
        node: "n2".into(),
        lease_ms: 60_000,
        max: 1,
        list: false,
    };
    h.commit(&Command::Take {
        ask,
        now_ms: plexus_sdk::timers::now_ms(),
    });
    assert_eq!(lease(&mut h, 60_000).unwrap(), (ours.clone(), 1));
    h.member("n2", MemberState::Dead);
    h.advance(0);
    let s = state(&mut h, &theirs);
    assert_eq!(s["state"], "queued", "{s}");
    assert!(s["last_error"].as_str().unwrap().contains("n2"));
    assert_eq!(state(&mut h, &ours)["state"], "leased");
    assert_eq!(lease(&mut h, 60_000).unwrap(), (theirs.clone(), 2));
    let late = h.post(&format!("/tasks/{theirs}/complete?token=1"), "1");
    assert_eq!(late.status, 409);
}

#[test]
fn a_task_stored_by_the_first_layout_is_still_served() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    super::tasks::store_first_layout("old", "q");
    assert_eq!(state(&mut h, "old")["state"], "queued");
    assert_eq!(lease(&mut h, 1000).unwrap(), ("old".to_string(), 1));
    assert_eq!(h.post("/tasks/old/complete?token=1", "5").status, 200);
    assert_eq!(state(&mut h, "old")["result"], 5);
}

#[test]
fn a_completion_takes_the_next_lease_in_the_same_entry() {
    let mut h = TestHost::<WorkQueue>::start().unwrap();
    let first = submit(&mut h, json!({ "payload": 1 }));
    let second = submit(&mut h, json!({ "payload": 2 }));
    let (id, token) = lease(&mut h, 10_000).unwrap();
    assert_eq!(id, first);
    let before = h.entries().len();
    let r = body(&h.post(
        &format!("/tasks/{id}/complete?token={token}&next=q&worker=w"),
        "7",
    ));
    assert_eq!(h.entries().len(), before + 1);
    assert_eq!(r["completed"]["state"], "done");
    assert_eq!(
        (r["next"]["id"].as_str(), r["next"]["token"].as_u64()),
        (Some(second.as_str()), Some(1))
    );
    let r = body(&h.post(&format!("/tasks/{second}/complete?token=1&next=q"), "8"));
    assert_eq!(r["next"], Value::Null);
    // A stale token completes nothing and leases nothing.
    let r = h.post(&format!("/tasks/{second}/complete?token=1&next=q"), "9");
    assert_eq!(r.status, 409);
}
