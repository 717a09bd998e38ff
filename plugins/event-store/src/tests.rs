//! The store's rules on the in-memory host, with its clock moved by hand.

use plexus_sdk::Response;
use plexus_sdk::testing::{Answer, TestHost};
use serde_json::{Value, json};

use super::EventStore;

fn body(r: &Response) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| panic!("{}: {}", r.status, String::from_utf8_lossy(&r.body)))
}

fn host() -> TestHost<EventStore> {
    TestHost::<EventStore>::start().unwrap()
}

fn ev(kind: &str, data: Value) -> Value {
    json!({ "type": kind, "data": data })
}

fn append(h: &mut TestHost<EventStore>, stream: &str, expected: &str, events: Value) -> Response {
    h.post(
        &format!("/streams/{stream}?expected_version={expected}"),
        events.to_string(),
    )
}

fn versions(v: &Value) -> Vec<u64> {
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect()
}

#[test]
fn expected_versions_are_checked_and_a_conflict_names_the_current_one() {
    let mut h = host();
    let r = append(
        &mut h,
        "acct-1",
        "no_stream",
        ev("Opened", json!({"owner": "ann"})),
    );
    assert_eq!(
        body(&r),
        json!({"stream": "acct-1", "first_version": 0, "version": 0, "position": 1, "duplicate": false})
    );
    let r = append(&mut h, "acct-1", "no_stream", ev("Opened", json!({})));
    assert_eq!(r.status, 409);
    assert_eq!(body(&r)["current"], 0);
    assert_eq!(body(&r)["expected"], "no_stream");
    let two = json!([
        ev("Deposited", json!({"amount": 5})),
        ev("Deposited", json!({"amount": 7}))
    ]);
    let r = append(&mut h, "acct-1", "0", two.clone());
    assert_eq!(body(&r)["first_version"], 1);
    assert_eq!(body(&r)["version"], 2);
    assert_eq!(append(&mut h, "acct-1", "0", two).status, 409);
    assert_eq!(
        append(&mut h, "acct-2", "stream_exists", ev("X", json!(1))).status,
        409
    );
    assert_eq!(
        body(&append(&mut h, "acct-2", "-1", ev("X", json!(1))))["position"],
        4
    );
    assert_eq!(
        append(&mut h, "acct-2", "any", ev("X", json!(2))).status,
        200
    );
    assert_eq!(
        append(&mut h, "acct-2", "seven", ev("X", json!(2))).status,
        400
    );
    assert_eq!(h.post("/streams/acct-2", "{\"data\": 1}").status, 400);
}

#[test]
fn a_retried_append_with_the_same_ids_is_written_once() {
    let mut h = host();
    let events = json!([
        {"type": "A", "data": 1, "id": "e-1"},
        {"type": "B", "data": 2, "id": "e-2"}
    ]);
    let first = body(&append(&mut h, "s", "no_stream", events.clone()));
    let again = body(&append(&mut h, "s", "no_stream", events));
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["version"], first["version"]);
    assert_eq!(again["position"], first["position"]);
    assert_eq!(versions(&body(&h.get("/streams/s"))), [0, 1]);
}

#[test]
fn a_multi_stream_append_is_all_or_none() {
    let mut h = host();
    append(&mut h, "b", "no_stream", ev("X", json!(0)));
    let both = |eb: u64| {
        json!([
            {"stream": "a", "expected_version": "no_stream", "events": [ev("X", json!(1))]},
            {"stream": "b", "expected_version": eb, "events": [ev("Y", json!(2)), ev("Y", json!(3))]}
        ])
        .to_string()
    };
    let r = h.post("/append", both(5));
    assert_eq!(r.status, 409);
    assert_eq!(body(&r)["stream"], "b");
    assert_eq!(h.get("/streams/a").status, 404);
    let r = body(&h.post("/append", both(0)));
    assert_eq!(
        r["streams"][0],
        json!({"stream": "a", "first_version": 0, "version": 0})
    );
    assert_eq!(
        r["streams"][1],
        json!({"stream": "b", "first_version": 1, "version": 2})
    );
    assert_eq!(r["position"], 4);
    let all = body(&h.get("/all"));
    let streams: Vec<&str> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stream"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["b", "a", "b", "b"]);
    assert_eq!(all["head"], 4);
}

#[test]
fn reads_go_forwards_and_backwards_and_filter_all() {
    let mut h = host();
    for i in 0..10 {
        let stream = if i % 2 == 0 { "order-1" } else { "cart-1" };
        let kind = if i % 3 == 0 { "Big" } else { "Small" };
        append(&mut h, stream, "any", ev(kind, json!(i)));
    }
    let fwd = body(&h.get("/streams/order-1?from=1&max=2"));
    assert_eq!(versions(&fwd), [1, 2]);
    assert_eq!(fwd["next"], 3);
    let back = body(&h.get("/streams/order-1?direction=backward&max=3"));
    assert_eq!(versions(&back), [4, 3, 2]);
    assert_eq!(back["next"], 1);
    let end = body(&h.get("/streams/order-1?direction=backward&from=0"));
    assert_eq!(versions(&end), [0]);
    assert_eq!(end["next"], Value::Null);
    let carts = body(&h.get("/all?prefix=cart-&type=Big"));
    let data: Vec<i64> = carts["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].as_i64().unwrap())
        .collect();
    assert_eq!(data, [3, 9]);
    let last_two = body(&h.get("/all?direction=backward&max=2"));
    let positions: Vec<u64> = last_two["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [10, 9]);
    assert_eq!(h.get("/streams/nobody").status, 404);
}

#[test]
fn binary_data_and_metadata_come_back_as_sent() {
    let mut h = host();
    let e = json!({"type": "Blob", "data_b64": "AAEC/w==", "metadata": {"by": "x"}, "id": "i"});
    append(&mut h, "b", "any", e);
    let got = &body(&h.get("/streams/b"))["events"][0];
    assert_eq!(got["data_b64"], "AAEC/w==");
    assert_eq!(got["metadata"], json!({"by": "x"}));
    assert_eq!(got["id"], "i");
    assert_eq!(got["type"], "Blob");
}

#[test]
fn limits_erase_the_oldest_events() {
    let mut h = host();
    for i in 0..5 {
        append(&mut h, "s", "any", ev("X", json!(i)));
    }
    let r = h.put("/streams/s/metadata", json!({"max_count": 2}).to_string());
    assert_eq!(body(&r)["first_version"], 3);
    assert_eq!(versions(&body(&h.get("/streams/s"))), [3, 4]);
    assert!(h.stored("a/00000000000000000001").is_none());
    h.put(
        "/streams/s/metadata",
        json!({"truncate_before": 4}).to_string(),
    );
    assert_eq!(versions(&body(&h.get("/streams/s"))), [4]);
    h.put(
        "/streams/s/metadata",
        json!({"max_age_ms": 1000}).to_string(),
    );
    h.advance(2000);
    append(&mut h, "s", "any", ev("X", json!(5)));
    assert_eq!(versions(&body(&h.get("/streams/s"))), [5]);
    // Version 4 was too old by then: erased with the append.
    assert!(h.stored("a/00000000000000000005").is_none());
}

#[test]
fn a_soft_delete_hides_a_stream_whose_versions_go_on() {
    let mut h = host();
    append(
        &mut h,
        "s",
        "any",
        json!([ev("X", json!(0)), ev("X", json!(1))]),
    );
    assert_eq!(h.delete("/streams/s").status, 200);
    assert_eq!(h.get("/streams/s").status, 404);
    let r = body(&append(&mut h, "s", "no_stream", ev("X", json!(2))));
    assert_eq!(r["version"], 2);
    assert_eq!(versions(&body(&h.get("/streams/s"))), [2]);
}

#[test]
fn a_tombstone_erases_every_trace_of_the_stream_for_good() {
    let mut h = host();
    let secret = "the-secret-bytes";
    append(
        &mut h,
        "pii-7",
        "any",
        json!([
            {"type": "Named", "data": {"name": secret}, "id": "n-1"},
            ev("Moved", json!({"city": secret}))
        ]),
    );
    append(&mut h, "other", "any", ev("X", json!(1)));
    assert_eq!(h.delete("/streams/pii-7?hard=true").status, 200);
    assert_eq!(h.get("/streams/pii-7").status, 410);
    assert_eq!(
        append(&mut h, "pii-7", "any", ev("X", json!(1))).status,
        410
    );
    assert_eq!(h.delete("/streams/pii-7").status, 410);
    for key in h.keys() {
        let value = h.stored(&key).unwrap();
        let text = String::from_utf8_lossy(&value);
        assert!(
            !text.contains(secret),
            "{} holds it",
            String::from_utf8_lossy(&key)
        );
        assert!(!String::from_utf8_lossy(&key).starts_with("i/pii-7"));
    }
    let all = body(&h.get("/all"));
    assert_eq!(all["events"].as_array().unwrap().len(), 1);
}

#[test]
fn state_as_of_a_version_folds_the_events_up_to_it() {
    let mut h = host();
    for (i, k) in ["a", "b", "a"].iter().enumerate() {
        append(&mut h, "s", "any", ev("Set", json!({ *k: i })));
    }
    let r = body(&h.get("/streams/s/state?reducer=merge&version=1"));
    assert_eq!(
        r,
        json!({"stream": "s", "version": 1, "state": {"a": 0, "b": 1}})
    );
    let r = body(&h.get("/streams/s/state?reducer=merge"));
    assert_eq!(r["state"], json!({"a": 2, "b": 1}));
    assert_eq!(
        body(&h.get("/streams/s/state?reducer=count&version=0"))["state"],
        1
    );
    assert_eq!(
        h.get("/streams/s/state?reducer=count&version=9").status,
        404
    );
}

#[test]
fn a_reducer_plugin_is_sent_the_events_in_batches_with_its_state() {
    let mut h = host();
    let events: Vec<Value> = (0..1200).map(|i| ev("Add", json!({"n": i}))).collect();
    append(&mut h, "big", "any", json!(events[..1000]));
    append(&mut h, "big", "any", json!(events[1000..]));
    h.on_plugin_call(|plugin, _, req| {
        assert_eq!(plugin, "summer");
        assert_eq!(req.path, "/fold");
        let b: Value = serde_json::from_slice(&req.body).unwrap();
        let events = b["events"].as_array().unwrap();
        assert!(events.len() <= 500);
        let mut sum = b["state"]["sum"].as_u64().unwrap_or(0);
        let calls = b["state"]["calls"].as_u64().unwrap_or(0) + 1;
        for e in events {
            sum += e["data"]["n"].as_u64().unwrap();
        }
        Ok(Response::json(200, &json!({"sum": sum, "calls": calls})))
    });
    let r = body(&h.get("/streams/big/state?reducer=summer&version=1099"));
    assert_eq!(
        r["state"],
        json!({"sum": (0..1100u64).sum::<u64>(), "calls": 3})
    );
}

#[test]
fn a_persistent_subscription_shares_events_and_retries_then_parks() {
    let mut h = host();
    let config = json!({"ack_wait_ms": 1000, "max_retry": 1, "prefix": "order-"});
    assert_eq!(
        h.put("/subscriptions/billing", config.to_string()).status,
        200
    );
    for i in 0..4 {
        append(&mut h, &format!("order-{i}"), "any", ev("Placed", json!(i)));
        append(&mut h, "noise", "any", ev("X", json!(i)));
    }
    let fetch = |h: &mut TestHost<EventStore>, c: &str, max: u32| -> Vec<(u64, u64)> {
        body(&h.post(
            &format!("/subscriptions/billing/fetch?max={max}&consumer={c}"),
            "",
        ))
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["position"].as_u64().unwrap(),
                e["retry"].as_u64().unwrap(),
            )
        })
        .collect()
    };
    assert_eq!(fetch(&mut h, "c1", 2), [(1, 0), (3, 0)]);
    assert_eq!(fetch(&mut h, "c2", 10), [(5, 0), (7, 0)]);
    assert!(fetch(&mut h, "c2", 10).is_empty());
    let r = h.post("/subscriptions/billing/ack", "[1, 5, 99]");
    assert_eq!(body(&r)["acked"], 2);
    h.advance(1000);
    assert_eq!(fetch(&mut h, "c2", 10), [(3, 1), (7, 1)]);
    h.post("/subscriptions/billing/ack", "[7]");
    h.advance(1000);
    // Position 3 is past max_retry: parked, not handed out.
    assert!(fetch(&mut h, "c2", 10).is_empty());
    let parked = body(&h.get("/subscriptions/billing/parked"));
    assert_eq!(parked[0]["position"], 3);
    assert_eq!(parked[0]["reason"], "max_retry reached");
    let view = body(&h.get("/subscriptions/billing"));
    assert_eq!(
        (view["in_flight"].as_u64(), view["parked"].as_u64()),
        (Some(0), Some(1))
    );
    h.post("/subscriptions/billing/replay-parked", "");
    assert_eq!(fetch(&mut h, "c3", 10), [(3, 0)]);
}

#[test]
fn a_nack_retries_parks_or_skips() {
    let mut h = host();
    h.put("/subscriptions/g", json!({"stream": "s"}).to_string());
    for i in 0..3 {
        append(&mut h, "s", "any", ev("X", json!(i)));
    }
    let r = body(&h.post("/subscriptions/g/fetch?max=3", ""));
    assert_eq!(r.as_array().unwrap().len(), 3);
    h.post("/subscriptions/g/nack?action=retry", "[1]");
    h.post("/subscriptions/g/nack?action=park&reason=bad%20data", "[2]");
    h.post("/subscriptions/g/nack?action=skip", "[3]");
    let r = body(&h.post("/subscriptions/g/fetch?max=3", ""));
    assert_eq!(r.as_array().unwrap().len(), 1);
    assert_eq!(r[0]["position"], 1);
    assert_eq!(
        body(&h.get("/subscriptions/g/parked"))[0]["reason"],
        "bad data"
    );
    assert_eq!(
        h.post("/subscriptions/g/nack?action=drop", "[1]").status,
        400
    );
}

#[test]
fn a_subscription_from_the_end_sees_only_new_events() {
    let mut h = host();
    append(&mut h, "s", "any", ev("X", json!(0)));
    h.put("/subscriptions/late", json!({"from": "end"}).to_string());
    assert!(
        body(&h.post("/subscriptions/late/fetch?max=5", ""))
            .as_array()
            .unwrap()
            .is_empty()
    );
    append(&mut h, "s", "any", ev("X", json!(1)));
    let r = body(&h.post("/subscriptions/late/fetch?max=5", ""));
    assert_eq!(r[0]["position"], 2);
    assert_eq!(
        h.put("/subscriptions/bad", json!({"from": "start"}).to_string())
            .status,
        400
    );
}

#[test]
fn a_waiting_read_is_answered_by_the_next_append() {
    let mut h = host();
    append(&mut h, "s", "any", ev("X", json!(0)));
    let waiting = h.request(plexus_sdk::testing::request(
        plexus_sdk::Method::Get,
        "/streams/s?from=1&wait_ms=5000",
        Vec::new(),
    ));
    let Answer::Waiting(pending) = waiting else {
        panic!("the read did not wait: {waiting:?}")
    };
    append(&mut h, "s", "any", ev("X", json!(1)));
    h.advance(0);
    let r = h.answer_of(pending).expect("answered");
    assert_eq!(versions(&body(&r)), [1]);
}

#[test]
fn a_waiting_read_answers_at_its_deadline_with_where_to_read_on() {
    let mut h = host();
    append(&mut h, "s", "any", ev("X", json!(0)));
    let waiting = h.request(plexus_sdk::testing::request(
        plexus_sdk::Method::Get,
        "/all?from=2&wait_ms=300",
        Vec::new(),
    ));
    let Answer::Waiting(pending) = waiting else {
        panic!("the read did not wait: {waiting:?}")
    };
    h.advance(200);
    assert!(h.answer_of(pending).is_none());
    h.advance(200);
    let r = body(&h.answer_of(pending).expect("answered at the deadline"));
    assert_eq!(
        (r["events"].as_array().unwrap().len(), r["next"].as_u64()),
        (0, Some(2))
    );
}

#[test]
fn state_survives_a_swap_to_the_next_version() {
    let mut h = host();
    append(&mut h, "s", "any", ev("X", json!(0)));
    let mut h = h.swap::<EventStore>().unwrap();
    assert_eq!(
        body(&append(&mut h, "s", "0", ev("X", json!(1))))["position"],
        2
    );
}
