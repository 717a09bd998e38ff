//! Leases and fencing tokens on the in-memory host, with its clock moved
//! by hand.

use plexus_sdk::testing::TestHost;
use serde_json::{Value, json};

use super::Election;

fn body(r: &plexus_sdk::Response) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

fn acquire(
    e: &mut TestHost<Election>,
    role: &str,
    holder: &str,
    ttl_ms: u64,
) -> plexus_sdk::Response {
    let req = json!({ "holder": holder, "ttl_ms": ttl_ms }).to_string();
    e.post(&format!("/roles/{role}/acquire"), req)
}

#[test]
fn a_held_role_is_refused_to_others_with_the_current_holder() {
    let mut e = TestHost::<Election>::start().unwrap();
    let r = acquire(&mut e, "primary", "a", 1000);
    assert_eq!((r.status, body(&r)["token"].clone()), (200, json!(1)));
    let r = acquire(&mut e, "primary", "b", 1000);
    assert_eq!(r.status, 409);
    assert_eq!(body(&r)["holder"], "a");
}

#[test]
fn renewing_keeps_the_token_and_moves_the_expiry() {
    let mut e = TestHost::<Election>::start().unwrap();
    let first = body(&acquire(&mut e, "primary", "a", 1000));
    e.advance(500);
    let renewed = body(&acquire(&mut e, "primary", "a", 1000));
    assert_eq!(renewed["token"], first["token"]);
    assert_eq!(
        renewed["expires_at_ms"].as_u64().unwrap(),
        first["expires_at_ms"].as_u64().unwrap() + 500
    );
}

#[test]
fn the_fencing_token_grows_each_time_the_role_changes_hands() {
    let mut e = TestHost::<Election>::start().unwrap();
    acquire(&mut e, "primary", "a", 1000);
    e.advance(1000);
    let r = acquire(&mut e, "primary", "b", 1000);
    assert_eq!((r.status, body(&r)["token"].clone()), (200, json!(2)));
    let token = body(&r)["token"].as_u64().unwrap();
    // The deposed holder cannot release what it no longer holds.
    let r = e.post(
        "/roles/primary/release",
        json!({ "holder": "a", "token": 1 }).to_string(),
    );
    assert_eq!(
        (r.status, body(&r)["error"].clone()),
        (409, json!("not the holder"))
    );
    let r = e.post(
        "/roles/primary/release",
        json!({ "holder": "b", "token": token }).to_string(),
    );
    assert_eq!(body(&r)["released"], true);
    assert_eq!(e.get("/roles/primary").status, 404);
    // A later holder still gets a larger token than any before.
    assert_eq!(body(&acquire(&mut e, "primary", "c", 1000))["token"], 3);
}

#[test]
fn out_of_range_ttls_and_empty_holders_are_refused_before_the_log() {
    let mut e = TestHost::<Election>::start().unwrap();
    assert_eq!(acquire(&mut e, "r", "a", 1).status, 400);
    assert_eq!(acquire(&mut e, "r", "", 1000).status, 400);
    assert_eq!(e.post("/roles/r/acquire", "not json").status, 400);
    assert!(e.entries().is_empty());
}

#[test]
fn a_campaigning_node_takes_its_roles_and_renews_them_on_a_timer() {
    let config = json!({ "campaign": ["scheduler"], "ttl_ms": 900 });
    let mut e = TestHost::<Election>::setup()
        .node("n7")
        .config(config)
        .start()
        .unwrap();
    e.advance(0);
    let held = body(&e.get("/roles/scheduler"));
    assert_eq!(
        (held["holder"].clone(), held["token"].clone()),
        (json!("n7"), json!(1))
    );
    assert_eq!(e.timers(), [(super::CAMPAIGN_TIMER, 300)]);
    e.advance(300);
    let renewed = body(&e.get("/roles/scheduler"));
    assert_eq!(renewed["token"], 1);
    assert!(renewed["expires_at_ms"].as_u64() > held["expires_at_ms"].as_u64());
}

#[test]
fn a_misspelt_config_key_is_named() {
    let err = TestHost::<Election>::with_config(json!({ "campain": ["x"] }))
        .err()
        .unwrap();
    assert_eq!(
        err,
        "config.campain: unknown field, expected `campaign` or `ttl_ms`"
    );
}
