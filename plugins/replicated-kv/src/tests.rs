//! The store's rules on the in-memory host: versions, compare-and-swap,
//! deletes, listing, and what a swap or a restart keeps.

use plexus_sdk::testing::{Answer, TestHost};
use serde_json::Value;

use super::Kv;

fn json(r: &plexus_sdk::Response) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

fn header<'a>(r: &'a plexus_sdk::Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_key_version_is_the_log_index_that_wrote_it() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    assert_eq!(json(&kv.put("/kv/a", "1"))["version"], 1);
    assert_eq!(json(&kv.put("/kv/b", "2"))["version"], 2);
    assert_eq!(json(&kv.put("/kv/a", "3"))["version"], 3);
    let r = kv.get("/kv/a");
    assert_eq!(
        (r.status, r.body.as_slice(), header(&r, "x-version")),
        (200, &b"3"[..], Some("3"))
    );
    assert_eq!(kv.entries().len(), 3);
}

#[test]
fn cas_with_stale_version_is_rejected_with_the_current_one() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    kv.put("/kv/x", "a");
    let r = kv.put("/kv/x?version=7", "b");
    assert_eq!(r.status, 409);
    assert_eq!(
        json(&r),
        serde_json::json!({ "error": "version mismatch", "current": 1 })
    );
    assert_eq!(header(&r, "x-version"), Some("1"));
    assert_eq!(kv.get("/kv/x").body, b"a");
    assert_eq!(json(&kv.put("/kv/x?version=1", "c"))["version"], 3);
}

#[test]
fn version_zero_means_the_key_must_not_exist() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    assert_eq!(kv.put("/kv/new?version=0", "v").status, 200);
    assert_eq!(kv.put("/kv/new?version=0", "w").status, 409);
}

#[test]
fn delete_says_whether_the_key_existed_and_honours_a_version() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    kv.put("/kv/k", "v");
    assert_eq!(kv.delete("/kv/k?version=9").status, 409);
    assert_eq!(json(&kv.delete("/kv/k"))["deleted"], true);
    assert_eq!(json(&kv.delete("/kv/k"))["deleted"], false);
    assert_eq!(kv.get("/kv/k").status, 404);
}

#[test]
fn bad_keys_and_versions_are_refused_before_the_log() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    let long = format!("/kv/{}", "k".repeat(1025));
    assert_eq!(kv.put(&long, "v").status, 400);
    let r = kv.put("/kv/a?version=x", "v");
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("`version`"));
    assert!(kv.entries().is_empty());
}

#[test]
fn listing_by_prefix_shows_keys_and_versions() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    for k in ["user/1", "user/2", "order/1"] {
        kv.put(&format!("/kv/{k}"), "v");
    }
    let listed = json(&kv.get("/kv?prefix=user/"));
    assert_eq!(
        listed,
        serde_json::json!([{ "key": "user/1", "version": 1 }, { "key": "user/2", "version": 2 }])
    );
}

#[test]
fn a_follower_that_cannot_reach_the_leader_answers_421_for_writes() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    kv.set_leader(Some(&"n2".to_string()));
    let r = kv.put("/kv/a", "v");
    assert_eq!(r.status, 421);
    assert_eq!(header(&r, "x-leader"), Some("n2"));
    // A local read needs no leader.
    assert_eq!(kv.get("/kv/a?consistency=local").status, 404);
}

#[test]
fn writes_in_flight_at_a_swap_are_answered_by_the_new_version() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    kv.put("/kv/a", "1");
    kv.pause_log();
    let Answer::Waiting(pending) = kv.request(plexus_sdk::testing::request(
        plexus_sdk::Method::Put,
        "/kv/a",
        b"2".to_vec(),
    )) else {
        panic!("a write without a quorum was answered");
    };
    let mut kv = kv.swap::<Kv>().unwrap();
    kv.resume_log();
    let r = kv.answer_of(pending).expect("answered after the swap");
    assert_eq!(json(&r)["version"], 2);
    // The served count came over in the snapshot and counts the inherited write.
    assert_eq!(
        json(&kv.get("/stats")),
        serde_json::json!({ "applied": 2, "served": 2 })
    );
}

#[test]
fn a_restart_keeps_storage_and_loses_only_the_in_memory_count() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    kv.put("/kv/a", "1");
    let mut kv = kv.restart().unwrap();
    assert_eq!(kv.get("/kv/a").body, b"1");
    assert_eq!(
        json(&kv.get("/stats")),
        serde_json::json!({ "applied": 1, "served": 0 })
    );
}

#[test]
fn an_entry_that_is_not_a_command_changes_nothing() {
    let mut kv = TestHost::<Kv>::start().unwrap();
    kv.commit_raw(vec![0xff, 0xff, 0xff]);
    assert!(!kv.keys().iter().any(|k| k.starts_with(b"k/")));
    assert_eq!(json(&kv.put("/kv/a", "v"))["version"], 2);
}
