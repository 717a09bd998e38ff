//! The table's rules on their own, and the plugin on the in-memory host
//! whose outbound requests and plugin calls the test answers.

use std::cell::RefCell;
use std::rc::Rc;

use plexus_sdk::Response;
use plexus_sdk::testing::TestHost;
use serde_json::{Value, json};

use super::Fig;
use super::table::{Route, Table, Target, bucket};

fn route(prefix: &str, weight: f64) -> Route {
    Route {
        prefix: prefix.into(),
        methods: Vec::new(),
        new: Target::Plugin("orders-v2".into()),
        weight,
        shadow: false,
    }
}

#[test]
fn the_longest_whole_segment_prefix_and_method_take_a_request() {
    let mut get_only = route("/orders/export", 0.0);
    get_only.methods = vec!["GET".into()];
    let t = Table {
        routes: vec![route("/orders", 0.0), get_only],
        ..Table::default()
    };
    assert_eq!(t.route("GET", "/orders/17").unwrap().prefix, "/orders");
    assert_eq!(t.route("GET", "/orders").unwrap().prefix, "/orders");
    assert_eq!(
        t.route("GET", "/orders/export/x").unwrap().prefix,
        "/orders/export"
    );
    assert_eq!(t.route("POST", "/orders/export").unwrap().prefix, "/orders");
    assert!(t.route("GET", "/ordersx").is_none());
    assert!(t.route("GET", "/users").is_none());
}

#[test]
fn weights_are_honoured_and_cohorts_only_grow() {
    let users: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
    let mut previous: Vec<bool> = vec![false; users.len()];
    for weight in [0.0, 1.0, 10.0, 30.0, 50.0, 99.0, 100.0] {
        let r = route("/orders", weight);
        let now: Vec<bool> = users.iter().map(|u| r.is_new(u)).collect();
        let share = now.iter().filter(|n| **n).count() as f64 / users.len() as f64 * 100.0;
        assert!((share - weight).abs() < 1.0, "weight {weight}: {share}%");
        for (i, (was, is)) in previous.iter().zip(&now).enumerate() {
            assert!(!was || *is, "{} left the new side at {weight}", users[i]);
        }
        previous = now;
    }
    // Routes hash apart: a user's cohorts on two routes are independent.
    let same = users
        .iter()
        .filter(|u| (bucket("/a", u) < 5000) == (bucket("/b", u) < 5000))
        .count();
    assert!((9000..11000).contains(&same), "{same}");
}

#[test]
fn bad_routes_are_refused_by_name() {
    assert!(
        route("orders", 1.0)
            .check()
            .unwrap_err()
            .contains("starts with /")
    );
    assert!(
        route("/o", 101.0)
            .check()
            .unwrap_err()
            .contains("percentage")
    );
    let mut r = route("/o", 1.0);
    r.new = Target::Url("https://x".into());
    assert!(r.check().unwrap_err().contains("http://"));
}

fn config(routes: Value) -> Value {
    json!({"legacy": "http://127.0.0.1:9000", "admin_token": "t", "routes": routes})
}

fn side(r: &Response) -> &str {
    r.headers
        .iter()
        .find(|(k, _)| k == "x-fig-side")
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

fn status(h: &mut TestHost<Fig>) -> Value {
    serde_json::from_slice(&h.get("/_fig/status").body).unwrap()
}

#[test]
fn requests_go_by_the_table_and_the_new_side_is_a_plugin() {
    let routes = json!([{"prefix": "/orders", "new": {"plugin": "orders-v2"}, "weight": 100}]);
    let mut h = TestHost::<Fig>::with_config(config(routes)).unwrap();
    h.on_fetch(|req| {
        assert!(req.url.starts_with("http://127.0.0.1:9000/"), "{}", req.url);
        Ok(Response::text(200, "legacy"))
    });
    h.on_plugin_call(|plugin, _, req| {
        assert_eq!(
            (plugin, req.path.as_str(), req.query.as_str()),
            ("orders-v2", "/orders/1", "x=1")
        );
        Ok(Response::text(200, "new"))
    });
    let r = h.get("/orders/1?x=1");
    assert_eq!((r.body.as_slice(), side(&r)), (&b"new"[..], "new"));
    let r = h.get("/users/1");
    assert_eq!((r.body.as_slice(), side(&r)), (&b"legacy"[..], "legacy"));
    let s = status(&mut h);
    assert_eq!(s["routes"]["/orders"]["new"], 1);
    assert_eq!(s["routes"]["(no route)"]["legacy"], 1);
}

#[test]
fn a_shadowed_request_is_answered_by_legacy_and_compared() {
    let routes = json!([{"prefix": "/orders", "new": {"url": "http://127.0.0.1:9001"}, "weight": 0, "shadow": true}]);
    let mut h = TestHost::<Fig>::with_config(config(routes)).unwrap();
    let seen = Rc::new(RefCell::new(Vec::new()));
    let s2 = seen.clone();
    h.on_fetch(move |req| {
        s2.borrow_mut().push(req.url.clone());
        let new = req.url.contains(":9001");
        let body = if new && req.url.ends_with("/2") {
            "changed"
        } else {
            "same"
        };
        Ok(Response::text(200, body))
    });
    for i in 1..=3 {
        let r = h.get(&format!("/orders/{i}"));
        assert_eq!((r.body.as_slice(), side(&r)), (&b"same"[..], "legacy"));
    }
    assert_eq!(seen.borrow().len(), 6, "each request twice");
    let s = status(&mut h);
    assert_eq!(
        (
            s["routes"]["/orders"]["shadowed"].as_u64(),
            s["routes"]["/orders"]["mismatched"].as_u64()
        ),
        (Some(3), Some(1))
    );
    assert_eq!(s["last_mismatches"][0]["path"], "/orders/2");
}

#[test]
fn a_table_change_needs_the_token_and_rolls_back_in_one_step() {
    let mut h = TestHost::<Fig>::with_config(config(json!([]))).unwrap();
    h.on_fetch(|_| Ok(Response::text(200, "legacy")));
    h.on_plugin_call(|_, _, _| Ok(Response::text(200, "new")));
    let table = json!([{"prefix": "/a", "new": {"plugin": "p"}, "weight": 100}]).to_string();
    assert_eq!(h.put("/_fig/routes", table.clone()).status, 401);
    let put = |h: &mut TestHost<Fig>, body: &str| {
        let mut req =
            plexus_sdk::testing::request(plexus_sdk::Method::Put, "/_fig/routes", body.into());
        req.headers
            .push(("authorization".into(), "Bearer t".into()));
        h.request(req).response()
    };
    let r = put(&mut h, &table);
    let t: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (t["version"].as_u64(), t["routes"][0]["prefix"].as_str()),
        (Some(1), Some("/a"))
    );
    assert_eq!(side(&h.get("/a/x")), "new");
    assert_eq!(
        put(&mut h, r#"[{"prefix": "a", "new": {"plugin": "p"}}]"#).status,
        400
    );
    let mut rollback =
        plexus_sdk::testing::request(plexus_sdk::Method::Post, "/_fig/rollback", Vec::new());
    rollback
        .headers
        .push(("authorization".into(), "Bearer t".into()));
    let r = h.request(rollback).response();
    assert_eq!(r.status, 200);
    assert_eq!(side(&h.get("/a/x")), "legacy");
    // The table is kept across a restart.
    let mut h = h.restart().unwrap();
    let t: Value = serde_json::from_slice(&h.get("/_fig/routes").body).unwrap();
    assert_eq!(
        (t["version"].as_u64(), t["routes"].as_array().map(Vec::len)),
        (Some(2), Some(0))
    );
}
