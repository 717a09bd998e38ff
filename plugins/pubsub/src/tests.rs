//! The pattern's rules on the in-memory host, with its clock moved by hand.

use plexus_sdk::Response;
use plexus_sdk::testing::TestHost;
use serde_json::{Value, json};

use super::PubSub;

fn body(r: &Response) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| panic!("{}: {}", r.status, String::from_utf8_lossy(&r.body)))
}

fn host() -> TestHost<PubSub> {
    let mut h = TestHost::<PubSub>::start().unwrap();
    assert_eq!(h.put("/topics/orders", "").status, 200);
    h
}

fn group(h: &mut TestHost<PubSub>, group: &str, config: Value) {
    let r = h.put(
        &format!("/topics/orders/groups/{group}"),
        config.to_string(),
    );
    assert_eq!(r.status, 200, "{}", body(&r));
}

fn publish(h: &mut TestHost<PubSub>, data: &str) -> u64 {
    body(&h.post("/topics/orders/publish", data))["seq"]
        .as_u64()
        .unwrap()
}

/// Fetches and returns `(seq, data, deliveries)` of each message.
fn fetch(h: &mut TestHost<PubSub>, group: &str, max: u32) -> Vec<(u64, String, u64)> {
    let r = h.post(
        &format!("/topics/orders/groups/{group}/fetch?max={max}&consumer=c"),
        "",
    );
    body(&r)
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let data = m["data"].as_str().unwrap().to_string();
            (
                m["seq"].as_u64().unwrap(),
                data,
                m["deliveries"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn ack(h: &mut TestHost<PubSub>, group: &str, seq: u64) -> bool {
    body(&h.post(&format!("/topics/orders/groups/{group}/ack/{seq}"), ""))["acked"] == true
}

#[test]
fn a_publish_needs_its_topic_and_gets_the_next_sequence_number() {
    let mut h = TestHost::<PubSub>::start().unwrap();
    let r = h.post("/topics/orders/publish", "a");
    assert_eq!(r.status, 404);
    h.put("/topics/orders", "");
    assert_eq!((publish(&mut h, "a"), publish(&mut h, "b")), (1, 2));
    assert_eq!(h.post("/topics/bad%2Fname/publish", "a").status, 400);
}

#[test]
fn a_retried_publish_within_the_window_is_stored_once() {
    let mut h = host();
    let first = body(&h.post("/topics/orders/publish?id=p-1", "a"));
    let again = body(&h.post("/topics/orders/publish?id=p-1", "a"));
    assert_eq!(first, json!({ "seq": 1, "duplicate": false }));
    assert_eq!(again, json!({ "seq": 1, "duplicate": true }));
    h.advance(120_000);
    assert_eq!(
        body(&h.post("/topics/orders/publish?id=p-1", "a"))["seq"],
        2
    );
}

#[test]
fn every_group_gets_every_message_and_a_groups_members_share_them() {
    let mut h = host();
    group(&mut h, "billing", json!({}));
    group(&mut h, "shipping", json!({}));
    for m in ["a", "b", "c"] {
        publish(&mut h, m);
    }
    let first = fetch(&mut h, "billing", 2);
    let second = fetch(&mut h, "billing", 2);
    assert_eq!(first, [(1, "a".into(), 1), (2, "b".into(), 1)]);
    assert_eq!(second, [(3, "c".into(), 1)]);
    assert_eq!(fetch(&mut h, "shipping", 10).len(), 3);
}

#[test]
fn an_acked_message_is_not_redelivered_and_an_unacked_one_is_after_ack_wait() {
    let mut h = host();
    group(&mut h, "g", json!({ "ack_wait_ms": 1000 }));
    publish(&mut h, "a");
    publish(&mut h, "b");
    assert_eq!(fetch(&mut h, "g", 10).len(), 2);
    assert!(ack(&mut h, "g", 1));
    assert!(!ack(&mut h, "g", 1), "a second ack finds nothing out");
    h.advance(999);
    assert!(fetch(&mut h, "g", 10).is_empty());
    h.advance(1);
    assert_eq!(fetch(&mut h, "g", 10), [(2, "b".into(), 2)]);
    h.advance(5000);
    assert!(ack(&mut h, "g", 2));
    h.advance(5000);
    assert!(fetch(&mut h, "g", 10).is_empty());
}

#[test]
fn a_message_past_max_deliver_moves_to_the_dead_letter_topic_with_why() {
    let mut h = host();
    group(&mut h, "g", json!({ "ack_wait_ms": 100, "max_deliver": 2 }));
    publish(&mut h, "poison");
    for deliveries in 1..=2 {
        assert_eq!(fetch(&mut h, "g", 1), [(1, "poison".into(), deliveries)]);
        h.advance(100);
    }
    assert!(fetch(&mut h, "g", 1).is_empty());
    let dlq = body(&h.get("/topics/orders.dlq"));
    assert_eq!(dlq["count"], 1);
    group_on(&mut h, "orders.dlq", "ops");
    let r = body(&h.post("/topics/orders.dlq/groups/ops/fetch", ""));
    assert_eq!(r[0]["data"], "poison");
    let headers: Vec<(String, String)> = serde_json::from_value(r[0]["headers"].clone()).unwrap();
    assert!(headers.contains(&(
        "dead-letter-reason".into(),
        "not acknowledged after 2 deliveries (max_deliver)".into()
    )));
    assert!(headers.contains(&("dead-letter-seq".into(), "1".into())));
}

fn group_on(h: &mut TestHost<PubSub>, topic: &str, group: &str) {
    assert_eq!(
        h.put(&format!("/topics/{topic}/groups/{group}"), "").status,
        200
    );
}

#[test]
fn a_nak_with_a_delay_and_progress_move_the_next_delivery() {
    let mut h = host();
    group(&mut h, "g", json!({ "ack_wait_ms": 1000 }));
    publish(&mut h, "a");
    fetch(&mut h, "g", 1);
    h.post("/topics/orders/groups/g/nak/1?delay_ms=200", "");
    h.advance(199);
    assert!(fetch(&mut h, "g", 1).is_empty());
    h.advance(1);
    assert_eq!(fetch(&mut h, "g", 1), [(1, "a".into(), 2)]);
    h.advance(900);
    h.post("/topics/orders/groups/g/progress/1", "");
    h.advance(500);
    assert!(
        fetch(&mut h, "g", 1).is_empty(),
        "progress gave it a new ack wait"
    );
    assert_eq!(h.post("/topics/orders/groups/g/nak/9", "").status, 404);
}

#[test]
fn a_delayed_message_waits_and_later_ones_pass_it() {
    let mut h = host();
    group(&mut h, "g", json!({}));
    body(&h.post("/topics/orders/publish?delay_ms=1000", "later"));
    publish(&mut h, "now");
    assert_eq!(fetch(&mut h, "g", 10), [(2, "now".into(), 1)]);
    h.advance(1000);
    assert_eq!(fetch(&mut h, "g", 10), [(1, "later".into(), 1)]);
}

#[test]
fn max_ack_pending_bounds_what_a_group_has_out() {
    let mut h = host();
    group(&mut h, "g", json!({ "max_ack_pending": 2 }));
    for m in ["a", "b", "c"] {
        publish(&mut h, m);
    }
    assert_eq!(fetch(&mut h, "g", 10).len(), 2);
    assert!(fetch(&mut h, "g", 10).is_empty());
    ack(&mut h, "g", 1);
    assert_eq!(fetch(&mut h, "g", 10), [(3, "c".into(), 1)]);
}

#[test]
fn limits_drop_the_oldest_and_a_new_group_starts_at_the_oldest_kept() {
    let mut h = TestHost::<PubSub>::start().unwrap();
    h.put(
        "/topics/orders",
        json!({ "max_msgs": 2, "max_age_ms": 10_000 }).to_string(),
    );
    for m in ["a", "b", "c"] {
        publish(&mut h, m);
    }
    let t = body(&h.get("/topics/orders"));
    assert_eq!(
        (t["first_seq"].clone(), t["count"].clone()),
        (json!(2), json!(2))
    );
    group(&mut h, "g", json!({ "deliver": "all" }));
    assert_eq!(fetch(&mut h, "g", 10)[0].0, 2);
    group(&mut h, "late", json!({ "deliver": "new" }));
    h.advance(10_000);
    publish(&mut h, "d");
    let t = body(&h.get("/topics/orders"));
    assert_eq!(
        (t["first_seq"].clone(), t["count"].clone()),
        (json!(4), json!(1))
    );
    assert_eq!(fetch(&mut h, "late", 10), [(4, "d".into(), 1)]);
}

#[test]
fn bad_group_settings_are_refused_before_the_log() {
    let mut h = host();
    let r = h.put(
        "/topics/orders/groups/g",
        json!({ "ack_wait_ms": 1 }).to_string(),
    );
    assert_eq!(r.status, 400);
    let r = h.put(
        "/topics/orders/groups/g",
        json!({ "ack_wiat_ms": 100 }).to_string(),
    );
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("ack_wiat_ms"));
}

#[test]
fn the_state_survives_a_swap_and_a_restart() {
    let mut h = host();
    group(&mut h, "g", json!({}));
    publish(&mut h, "a");
    let h2 = h.swap::<PubSub>().unwrap();
    let mut h3 = h2.restart().unwrap();
    assert_eq!(fetch(&mut h3, "g", 1), [(1, "a".into(), 1)]);
}

#[test]
fn a_waiting_fetch_is_answered_by_the_next_publish_or_empty_at_its_deadline() {
    use plexus_sdk::Method;
    use plexus_sdk::testing::{Answer, request};
    let mut h = host();
    group(&mut h, "g", json!({}));
    let fetch = || {
        request(
            Method::Post,
            "/topics/orders/groups/g/fetch?max=5&wait_ms=1000",
            Vec::new(),
        )
    };
    let Answer::Waiting(first) = h.request(fetch()) else {
        panic!("an empty fetch with wait_ms answered at once");
    };
    h.advance(200);
    assert!(h.answer_of(first).is_none());
    publish(&mut h, "a");
    h.advance(0);
    let got = body(&h.answer_of(first).expect("answered by the publish"));
    assert_eq!(
        (got[0]["seq"].clone(), got[0]["data"].clone()),
        (json!(1), json!("a"))
    );
    // Nothing comes: `[]` at the deadline, not before.
    let Answer::Waiting(second) = h.request(fetch()) else {
        panic!("answered at once");
    };
    h.advance(999);
    assert!(h.answer_of(second).is_none());
    h.advance(1);
    assert_eq!(
        body(&h.answer_of(second).expect("answered at the deadline")),
        json!([])
    );
}

#[test]
fn a_list_of_acks_is_one_entry_and_counts_only_what_was_out() {
    let mut h = host();
    group(&mut h, "g", json!({ "ack_wait_ms": 1000 }));
    for n in 0..4 {
        publish(&mut h, &n.to_string());
    }
    let seqs: Vec<u64> = fetch(&mut h, "g", 3).iter().map(|m| m.0).collect();
    let before = h.entries().len();
    let r = h.post(
        "/topics/orders/groups/g/ack",
        json!([seqs[0], seqs[1], seqs[2], 4, 99]).to_string(),
    );
    assert_eq!(body(&r), json!({ "acked": 3 }));
    assert_eq!(h.entries().len(), before + 1);
    h.advance(1000);
    // Nothing acked comes again; the one never fetched comes next.
    assert_eq!(
        fetch(&mut h, "g", 10)
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>(),
        [4]
    );
    assert_eq!(h.post("/topics/orders/groups/g/ack", "[]").status, 400);
    assert_eq!(h.post("/topics/orders/groups/g/ack", "[\"x\"]").status, 400);
}
