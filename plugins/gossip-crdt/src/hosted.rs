//! The plugin's hooks on the in-memory host: what a change sends, what a
//! peer's state does, what a swap and a restart keep.

use plexus_sdk::testing::TestHost;
use plexus_sdk::{MemberState, codec};
use serde_json::{Value, json};

use super::{Gossip, Replica, STATE};

fn body(r: &plexus_sdk::Response) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

fn node(id: &str) -> TestHost<Gossip> {
    TestHost::setup()
        .node(id)
        .members(&["a", "b"])
        .config(json!({ "gossip_ms": 100 }))
        .start()
        .unwrap()
}

#[test]
fn a_change_goes_out_with_the_next_round_and_a_quiet_replica_stays_quiet() {
    let mut a = node("a");
    a.advance(100);
    a.sent();
    a.post("/counters/hits/incr", "");
    a.advance(100);
    let sent = a.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].to.as_deref(), sent[0].topic.as_str()),
        (None, STATE)
    );
    a.advance(100);
    assert!(
        a.sent().is_empty(),
        "a round with nothing new sent the state again"
    );
}

#[test]
fn a_peers_state_is_merged_and_counted_apart() {
    // One host per thread: b runs first, and its state is carried to a.
    let mut b = node("b");
    b.post("/counters/hits/incr", "");
    b.post("/counters/hits/incr", "");
    b.advance(100);
    let state = b.sent().pop().unwrap().payload;
    drop(b);
    let mut a = node("a");
    a.post("/counters/hits/incr", "");
    assert_eq!(a.message("b", STATE, &state), None);
    let hits = body(&a.get("/counters/hits"));
    assert_eq!(hits["value"], 3);
    assert_eq!(hits["by_node"], json!({ "a": 1, "b": 2 }));
}

#[test]
fn a_malformed_state_is_logged_and_changes_nothing() {
    let mut a = node("a");
    a.post("/sets/s/add", "x");
    a.message("b", STATE, b"not a replica");
    assert!(
        a.logs()
            .iter()
            .any(|l| l.message.contains("was not merged"))
    );
    assert_eq!(body(&a.get("/sets/s"))["elements"], json!(["x"]));
}

#[test]
fn a_member_that_comes_alive_is_sent_the_state_at_once() {
    let mut a = node("a");
    a.sent();
    a.member("c", MemberState::Alive);
    let sent = a.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to.as_deref(), Some("c"));
    assert!(codec::decode::<Replica>(&sent[0].payload).is_ok());
}

#[test]
fn a_swap_and_a_restart_keep_every_replica() {
    let mut a = node("a");
    a.put("/registers/r", "v1");
    a.post("/counters/c/decr", "");
    let mut a = a.swap::<Gossip>().unwrap();
    assert_eq!(body(&a.get("/counters/c"))["value"], -1);
    let mut a = a.restart().unwrap();
    assert_eq!(a.get("/registers/r").body, b"v1");
}

#[test]
fn bad_settings_are_refused_with_the_key() {
    let err = TestHost::<Gossip>::with_config(json!({ "gossip_ms": 5 }))
        .err()
        .unwrap();
    assert_eq!(err, "gossip_ms must be in 10..=60000");
    let err = TestHost::<Gossip>::with_config(json!({ "gosip_ms": 50 }))
        .err()
        .unwrap();
    assert_eq!(err, "config.gosip_ms: unknown field, expected `gossip_ms`");
}
