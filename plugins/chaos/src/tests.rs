//! The switches that make chaos misbehave, checked where they can be
//! without a node: the node's side is `tests/it/chaos.rs`.

use plexus_sdk::testing::TestHost;
use serde_json::json;

use super::Chaos;

#[test]
fn a_hook_named_in_fail_in_refuses_and_others_run() {
    let err = TestHost::<Chaos>::with_config(json!({ "fail_in": "init" }))
        .err()
        .unwrap();
    assert_eq!(err, "chaos: refusing to start");
    let mut c = TestHost::<Chaos>::with_config(json!({ "fail_in": "restore" })).unwrap();
    assert_eq!(c.get("/ping").status, 200);
    assert_eq!(
        c.swap::<Chaos>().err().unwrap(),
        "chaos: refusing the handed-over state"
    );
}

#[test]
fn pings_are_counted_and_handed_over() {
    let mut c = TestHost::<Chaos>::start().unwrap();
    c.get("/ping");
    let mut c = c.swap::<Chaos>().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&c.get("/ping").body).unwrap();
    assert_eq!(r["pong"], 2);
}

#[test]
fn trap_apply_traps_only_until_its_time() {
    let mut c = TestHost::<Chaos>::start().unwrap();
    let past = plexus_sdk::timers::now_ms() - 1;
    c.commit(&super::Command::TrapUntil(past));
    let trapped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.commit(&super::Command::TrapUntil(u64::MAX));
    }));
    assert!(trapped.is_err());
}
