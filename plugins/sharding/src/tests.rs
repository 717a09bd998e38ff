//! The shard map's changes, and one node's part in writes, forwards,
//! replication and copies, on the in-memory host (other nodes answer
//! through stand-ins).

use std::cell::RefCell;
use std::rc::Rc;

use plexus_sdk::testing::{Answer, TestHost, request};
use plexus_sdk::{MemberState, Method, codec, messaging};
use serde_json::{Value, json};

use super::shard::{self, Item, Version};
use super::{Ack, Put, Sharding, placement};

/// A key and its item, as a copy carried it.
type Copied = (Vec<u8>, Item);

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn body(r: &plexus_sdk::Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

/// A node `n1` of `members`, its map made (it leads).
fn node(members: &[&str], replicas: u8) -> TestHost<Sharding> {
    let mut h = TestHost::<Sharding>::setup()
        .node("n1")
        .members(members)
        .config(json!({ "replicas": replicas, "slots": 64 }))
        .start()
        .unwrap();
    h.advance(0);
    assert_eq!(body(&h.get("/map"))["epoch"], 1);
    h
}

/// A key whose primary is `primary` in a 64-slot map of `members`.
fn key_on(members: &[&str], replicas: usize, primary: &str) -> String {
    let map = placement::place(&names(members), 64, replicas, super::DEFAULT_BALANCE);
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| map[placement::slot_of(k.as_bytes(), 64) as usize][0] == primary)
        .unwrap()
}

#[test]
fn a_first_map_places_every_slot_and_a_dead_primary_is_replaced_at_once() {
    let members = names(&["a", "b", "c"]);
    let (map, plan) = shard::rebalance(None, &members, &[], (64, 2, 105), 0);
    assert_eq!((map.epoch, plan), (1, None));
    assert!(map.holders.iter().all(|h| h.len() == 2));
    // `a` dies: its slots are served by their replicas under a new
    // epoch, and a plan copies them to a new second holder.
    let left = names(&["b", "c"]);
    let (next, plan) = shard::rebalance(Some(map.clone()), &left, &names(&["a"]), (64, 2, 105), 7);
    assert_eq!(next.epoch, 2);
    assert!(next.holders.iter().all(|h| !h.contains(&"a".to_string())));
    let plan = plan.expect("slots that lost a holder get a new one");
    assert_eq!(plan.epoch, 3);
    for slot in &plan.pending {
        let s = *slot as usize;
        assert!(plan.target[s].iter().any(|n| !next.holders[s].contains(n)));
    }
    // Nothing to copy: the map switches at once.
    let (same, none) = shard::rebalance(Some(next.clone()), &left, &[], (64, 1, 105), 9);
    assert!(none.is_none() || !none.unwrap().pending.is_empty());
    assert!(same.epoch >= next.epoch);
}

#[test]
fn on_one_node_keys_are_written_read_and_deleted() {
    let mut h = node(&["n1"], 2);
    assert_eq!(h.put("/kv/alpha", "1").status, 200);
    let r = h.get("/kv/alpha");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"1"[..]));
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k == "x-shard-node" && v == "n1")
    );
    assert_eq!(h.delete("/kv/alpha").status, 200);
    assert_eq!(h.get("/kv/alpha").status, 404);
    let stats = body(&h.get("/stats"));
    assert_eq!(stats["primary"]["slots"], 64);
}

#[test]
fn a_write_reaches_the_replica_before_it_is_kept_and_answered() {
    let members = ["n1", "n2"];
    let mut h = node(&members, 2);
    let sent: Rc<RefCell<Vec<(String, Put)>>> = Rc::default();
    let log = sent.clone();
    let answer = Rc::new(RefCell::new(Ok(codec::encode(&Ack::Done))));
    let with = answer.clone();
    h.on_message_to(move |node, topic, payload| {
        assert_eq!(topic, "put");
        log.borrow_mut()
            .push((node.to_string(), codec::decode(payload).unwrap()));
        with.borrow().clone()
    });
    let key = key_on(&members, 2, "n1");
    assert_eq!(h.put(&format!("/kv/{key}"), "v1").status, 200);
    let (to, put) = sent.borrow_mut().pop().unwrap();
    assert_eq!((to.as_str(), put.epoch), ("n2", 1));
    assert_eq!(put.items[0].1.value.as_deref(), Some(&b"v1"[..]));
    // A replica that has another map: not kept here, sent again later.
    *answer.borrow_mut() = Ok(codec::encode(&Ack::Epoch(2)));
    assert_eq!(h.put(&format!("/kv/{key}"), "v2").status, 503);
    // No answer: the outcome is unknown, and nothing is kept here.
    *answer.borrow_mut() = Err(messaging::Error::Timeout);
    assert_eq!(h.put(&format!("/kv/{key}"), "v3").status, 504);
    assert_eq!(h.get(&format!("/kv/{key}")).body, b"v1");
}

#[test]
fn a_key_of_another_primary_is_forwarded_with_the_epoch() {
    let members = ["n1", "n2"];
    let mut h = node(&members, 1);
    let key = key_on(&members, 1, "n2");
    let Answer::Forwarded(to) = h.request(request(Method::Get, &format!("/kv/{key}"), Vec::new()))
    else {
        panic!("served here");
    };
    assert_eq!(to.node, "n2");
    assert!(
        to.headers
            .contains(&("x-shard-epoch".to_string(), "1".to_string()))
    );
}

#[test]
fn a_holder_keeps_the_newer_version_and_refuses_another_epoch() {
    let members = ["n1", "n2"];
    let mut h = node(&members, 2);
    let key = key_on(&members, 2, "n2");
    let slot = placement::slot_of(key.as_bytes(), 64);
    let put = |epoch, seq, v: &str| {
        codec::encode(&Put {
            epoch,
            slot,
            items: vec![(
                key.clone().into_bytes(),
                Item {
                    version: Version { epoch: 1, seq },
                    value: Some(v.into()),
                },
            )],
        })
    };
    let ack = |h: &mut TestHost<Sharding>, bytes: Vec<u8>| {
        codec::decode::<Ack>(&h.message("n2", "put", &bytes).unwrap()).unwrap()
    };
    assert!(matches!(ack(&mut h, put(1, 2, "new")), Ack::Done));
    assert!(matches!(ack(&mut h, put(1, 1, "old")), Ack::Done));
    assert_eq!(
        shard::get(slot, key.as_bytes()).unwrap().as_deref(),
        Some(&b"new"[..])
    );
    assert!(matches!(ack(&mut h, put(0, 3, "stale")), Ack::Epoch(1)));
}

#[test]
fn a_joining_member_gets_its_slots_copied_before_the_map_switches() {
    let mut h = node(&["n1"], 1);
    for i in 0..40 {
        assert_eq!(h.put(&format!("/kv/k{i}"), format!("v{i}")).status, 200);
    }
    let copied: Rc<RefCell<Vec<Copied>>> = Rc::default();
    let into = copied.clone();
    h.on_message_to(move |node, topic, payload| {
        assert_eq!(node, "n2");
        let put: Put = codec::decode(payload).unwrap();
        if topic == "copy" {
            into.borrow_mut().extend(put.items);
        }
        Ok(codec::encode(&Ack::Done))
    });
    h.member("n2", MemberState::Alive);
    h.advance(1000);
    let map = body(&h.get("/map?slots=true"));
    assert_eq!(map["epoch"], 2, "{map}");
    let holders: Vec<Vec<String>> = serde_json::from_value(map["holders"].clone()).unwrap();
    // Every key now on n2 was copied there; n1 dropped what it no longer holds.
    let moved: Vec<String> = (0..40)
        .map(|i| format!("k{i}"))
        .filter(|k| holders[placement::slot_of(k.as_bytes(), 64) as usize][0] == "n2")
        .collect();
    assert!(!moved.is_empty());
    let copied: Vec<String> = copied
        .borrow()
        .iter()
        .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
        .collect();
    for k in &moved {
        assert!(copied.contains(k), "{k} not copied");
        let slot = placement::slot_of(k.as_bytes(), 64);
        assert_eq!(
            shard::get(slot, k.as_bytes()).unwrap(),
            None,
            "{k} still on n1"
        );
    }
    assert_eq!(body(&h.get("/plan"))["plan"], Value::Null);
}

#[test]
fn a_drained_node_loses_its_slots_and_a_dry_run_counts_the_moves() {
    let mut h = node(&["n1", "n2"], 1);
    h.on_message_to(|_, _, _| Ok(codec::encode(&Ack::Done)));
    let dry = body(&h.get("/plan?members=n1,n2,n3"));
    assert!(dry["slots_moving"].as_u64().unwrap() > 10, "{dry}");
    let on_n2 = body(&h.get("/map"))["nodes"]["n2"]["primary_slots"]
        .as_u64()
        .unwrap();
    assert_eq!(h.post("/drain/n2", "").status, 200);
    h.advance(1000);
    // n2's slots move to n1; n2 copies them (here, its report is
    // committed as if it came from n2), and the map switches.
    let plan = body(&h.get("/plan"));
    let pending: Vec<u32> = serde_json::from_value(plan["plan"]["pending"].clone()).unwrap();
    let epoch = plan["plan"]["epoch"].as_u64().unwrap();
    assert_eq!(pending.len() as u64, on_n2, "{plan}");
    h.commit(&super::Command::Caught {
        epoch,
        slots: pending,
    });
    let map = body(&h.get("/map"));
    assert_eq!(map["nodes"]["n1"]["primary_slots"], 64, "{map}");
    assert_eq!(map["epoch"], epoch);
    assert_eq!(map["drained"], json!(["n2"]));
}

#[test]
fn bad_config_is_refused() {
    for bad in [
        json!({ "replicas": 0 }),
        json!({ "balance_factor": 99 }),
        json!({ "slot": 5 }),
    ] {
        assert!(
            TestHost::<Sharding>::setup()
                .config(bad.clone())
                .start()
                .is_err(),
            "{bad}"
        );
    }
}
