//! The command rules and the fold language on their own, and a command's
//! read-check-append on the in-memory host, whose plugin calls the test
//! answers as an event store would.

use std::cell::RefCell;
use std::rc::Rc;

use plexus_sdk::Response;
use plexus_sdk::testing::TestHost;
use serde_json::{Value, json};

use super::Cqrs;
use super::model::{self, Config, Event};

fn bank() -> Value {
    json!({
        "store": "events",
        "aggregates": {
            "account": {
                "on": {
                    "Opened": {"set": {"owner": "$.owner", "balance": 0, "status": "open"}},
                    "Deposited": {"add": {"balance": "$.amount"}},
                    "Withdrawn": {"sub": {"balance": "$.amount"}},
                    "Closed": {"set": {"status": "closed"}}
                },
                "commands": {
                    "open": {"event": "Opened", "expect": "new", "required": ["owner"]},
                    "deposit": {"event": "Deposited", "required": ["amount"],
                                "rules": [{"field": "amount", "min": 1}]},
                    "withdraw": {"event": "Withdrawn", "required": ["amount"],
                                 "rules": [{"field": "amount", "min": 1, "at_most_state": "balance",
                                            "message": "insufficient funds"},
                                           {"state": "status", "equals": "open"}]}
                }
            }
        },
        "projections": {
            "balances": {"streams": "account-", "on": {
                "Opened": {"set": {"owner": "$.owner", "balance": 0}},
                "Deposited": {"add": {"balance": "$.amount"}}
            }}
        }
    })
}

fn config() -> Config {
    serde_json::from_value(bank()).unwrap()
}

fn ev(kind: &str, data: Value, version: u64) -> Value {
    json!({"stream": "account-1", "type": kind, "data": data, "version": version, "position": version + 1})
}

#[test]
fn events_fold_into_state_by_the_update_language() {
    let c = config();
    let a = &c.aggregates["account"];
    let events = [
        ev("Opened", json!({"owner": "ann"}), 0),
        ev("Deposited", json!({"amount": 30}), 1),
        ev("Deposited", json!({"amount": 2.5}), 2),
        ev("Unknown", json!({}), 3),
    ];
    let state = model::fold(a, None, &events).unwrap().unwrap();
    assert_eq!(
        state,
        json!({"owner": "ann", "balance": 32.5, "status": "open"})
    );
    let bad = [ev("Deposited", json!({"amount": "lots"}), 0)];
    assert!(
        model::fold(a, None, &bad)
            .unwrap_err()
            .contains("not a number")
    );
    let missing = [ev("Deposited", json!({}), 0)];
    assert!(
        model::fold(a, None, &missing)
            .unwrap_err()
            .contains("has no $.amount")
    );
}

#[test]
fn values_name_parts_of_the_event() {
    let e = json!({"stream": "account-42", "type": "T", "version": 3, "position": 9,
                   "data": {"a": {"b": 7}}});
    let e = Event(&e);
    assert_eq!(e.value(&json!("$id")).unwrap(), json!("42"));
    assert_eq!(e.value(&json!("$stream")).unwrap(), json!("account-42"));
    assert_eq!(e.value(&json!("$.a.b")).unwrap(), json!(7));
    assert_eq!(e.value(&json!("$position")).unwrap(), json!(9));
    assert_eq!(e.value(&json!("plain")).unwrap(), json!("plain"));
    assert_eq!(e.value(&json!(5)).unwrap(), json!(5));
}

#[test]
fn commands_are_checked_against_their_rules_and_the_state() {
    let c = config();
    let cmds = &c.aggregates["account"].commands;
    let open = Some(json!({"balance": 10, "status": "open"}));
    assert_eq!(
        model::check(&cmds["deposit"], &json!({}), &open).unwrap_err(),
        "`amount` is required"
    );
    assert!(
        model::check(&cmds["deposit"], &json!({"amount": 0}), &open)
            .unwrap_err()
            .contains(">= 1")
    );
    assert!(model::check(&cmds["withdraw"], &json!({"amount": 10}), &open).is_ok());
    assert_eq!(
        model::check(&cmds["withdraw"], &json!({"amount": 11}), &open).unwrap_err(),
        "insufficient funds"
    );
    let closed = Some(json!({"balance": 10, "status": "closed"}));
    assert!(
        model::check(&cmds["withdraw"], &json!({"amount": 1}), &closed)
            .unwrap_err()
            .contains("status")
    );
    assert!(model::check(&cmds["deposit"], &json!([1]), &open).is_err());
}

#[test]
fn a_config_with_a_bad_rule_or_name_is_refused() {
    let mut c = bank();
    c["aggregates"]["account"]["commands"]["deposit"]["rules"] = json!([{"min": 1}]);
    let c: Config = serde_json::from_value(c).unwrap();
    assert!(c.check().unwrap_err().contains("names `field` or `state`"));
    let mut c = bank();
    c["aggregates"]["my-account"] = json!({});
    let c: Config = serde_json::from_value(c).unwrap();
    assert!(c.check().unwrap_err().contains("no `-`"));
    assert!(TestHost::<Cqrs>::with_config(json!({"projections": {"p": {"on": {}}}})).is_err());
}

/// A stream kept by the test, answering the calls a command makes.
fn store(host: &mut TestHost<Cqrs>, events: Rc<RefCell<Vec<Value>>>, conflicts: Rc<RefCell<u32>>) {
    host.on_plugin_call(move |plugin, _, req| {
        assert_eq!(plugin, "events");
        let mut events = events.borrow_mut();
        if req.path.starts_with("/streams/") && req.body.is_empty() {
            if events.is_empty() {
                return Ok(Response::error(404, "no stream"));
            }
            return Ok(Response::json(
                200,
                &json!({"events": *events, "next": events.len()}),
            ));
        }
        let mut c = conflicts.borrow_mut();
        if *c > 0 {
            *c -= 1;
            // Another writer got there first.
            let n = events.len() as u64;
            events.push(ev("Deposited", json!({"amount": 100}), n));
            return Ok(Response::json(409, &json!({"current": n})));
        }
        let expected = req
            .query
            .strip_prefix("expected_version=")
            .unwrap()
            .to_string();
        let want = events
            .len()
            .checked_sub(1)
            .map_or("no_stream".into(), |v| v.to_string());
        assert_eq!(expected, want);
        let e: Value = serde_json::from_slice(&req.body).unwrap();
        let n = events.len() as u64;
        events.push(ev(e["type"].as_str().unwrap(), e["data"].clone(), n));
        Ok(Response::json(
            200,
            &json!({"stream": "account-1", "version": n, "position": n + 1}),
        ))
    });
}

#[test]
fn a_command_reads_checks_and_appends_with_the_version_it_read() {
    let mut h = TestHost::<Cqrs>::with_config(bank()).unwrap();
    let (events, conflicts) = (Rc::new(RefCell::new(Vec::new())), Rc::new(RefCell::new(0)));
    store(&mut h, events.clone(), conflicts.clone());
    let r = h.post("/commands/account/1/deposit", r#"{"amount": 5}"#);
    assert_eq!(r.status, 404, "deposit before open");
    let r = h.post("/commands/account/1/open", r#"{"owner": "ann"}"#);
    assert_eq!(r.status, 200);
    assert_eq!(
        h.post("/commands/account/1/open", r#"{"owner": "bob"}"#)
            .status,
        409
    );
    let r = h.post("/commands/account/1/withdraw", r#"{"amount": 5}"#);
    assert_eq!(
        (
            r.status,
            String::from_utf8_lossy(&r.body).contains("insufficient")
        ),
        (422, true)
    );
    // Two conflicts: read again and appended on the third try.
    *conflicts.borrow_mut() = 2;
    let r = h.post("/commands/account/1/deposit", r#"{"amount": 5}"#);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (v["version"].as_u64(), v["position"].as_u64()),
        (Some(3), Some(4))
    );
    // The winners' deposits count in the state checked.
    let r = h.post("/commands/account/1/withdraw", r#"{"amount": 150}"#);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(events.borrow().len(), 5);
    assert_eq!(h.post("/commands/account/1/nothing", "{}").status, 404);
}

#[test]
fn fold_answers_the_event_stores_reducer_calls() {
    let mut h = TestHost::<Cqrs>::with_config(bank()).unwrap();
    let body = json!({"stream": "account-9", "state": {"balance": 1},
                      "events": [ev("Deposited", json!({"amount": 2}), 5)]});
    let r = h.post("/fold", body.to_string());
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap()["balance"],
        3
    );
    let other = json!({"stream": "cart-1", "state": null, "events": []});
    assert_eq!(h.post("/fold", other.to_string()).status, 404);
}
