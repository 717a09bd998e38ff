//! The retry policy and budget on their own, and the plugin on the
//! in-memory host, whose outbound requests the test answers.

use std::cell::RefCell;
use std::rc::Rc;

use plexus_sdk::Response;
use plexus_sdk::http::FetchError;
use plexus_sdk::testing::TestHost;
use serde_json::{Value, json};

use super::Ambassador;
use super::policy::{Budget, Latencies, Scope, Upstream, Window};

fn upstream(extra: Value) -> Upstream {
    let mut v = json!({"name": "pay", "url": "http://127.0.0.1:9000"});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

#[test]
fn only_the_chosen_conditions_are_retried() {
    let u = upstream(json!({}));
    assert!(u.retriable(&Ok(503)));
    assert!(!u.retriable(&Ok(404)));
    assert!(u.retriable(&Err(FetchError::Connect("refused".into()))));
    assert!(u.retriable(&Err(FetchError::Broken("reset".into()))));
    assert!(!u.retriable(&Err(FetchError::NotAllowed("x".into()))));
    let g = upstream(
        json!({"retry_on": ["gateway-error", "retriable-status-codes"], "retriable_status_codes": [409]}),
    );
    assert!(g.retriable(&Ok(502)) && g.retriable(&Ok(409)));
    assert!(!g.retriable(&Ok(500)));
    assert!(!g.retriable(&Err(FetchError::Connect("refused".into()))));
    assert!(
        upstream(json!({"retry_on": ["sometimes"]}))
            .check()
            .is_err()
    );
}

#[test]
fn non_idempotent_methods_are_sent_once_unless_allowed() {
    let u = upstream(json!({}));
    assert!(u.may_repeat(plexus_sdk::Method::Get) && u.may_repeat(plexus_sdk::Method::Put));
    assert!(!u.may_repeat(plexus_sdk::Method::Post) && !u.may_repeat(plexus_sdk::Method::Patch));
    assert!(upstream(json!({"retry_non_idempotent": true})).may_repeat(plexus_sdk::Method::Post));
}

#[test]
fn backoff_grows_with_full_jitter_up_to_the_cap() {
    let u = upstream(json!({"base_interval_ms": 10, "max_interval_ms": 100}));
    assert_eq!(u.backoff_ms(1, 0.999), 19);
    assert_eq!(u.backoff_ms(2, 0.999), 39);
    assert_eq!(u.backoff_ms(9, 0.999), 99);
    assert_eq!(u.backoff_ms(3, 0.0), 0);
}

#[test]
fn the_budget_allows_a_ratio_of_requests_plus_a_floor_over_its_window() {
    let b = Budget {
        retry_ratio: 0.2,
        min_retries_per_second: 1,
        ttl_ms: 10_000,
        scope: Scope::Node,
    };
    // The floor: 10 retries over ten seconds with no requests.
    assert!(b.allows(0, 9) && !b.allows(0, 10));
    // 100 requests: 20 more.
    assert!(b.allows(100, 29) && !b.allows(100, 30));
    let mut w = Window::default();
    for ms in [0, 500, 1500, 9000] {
        w.request(ms);
    }
    w.retry(9500);
    assert_eq!(w.totals(9999, 10_000), (4, 1));
    assert_eq!(
        w.totals(11_500, 10_000),
        (2, 1),
        "the first second left the window"
    );
}

#[test]
fn percentiles_wait_for_enough_latencies() {
    let mut l = Latencies::default();
    for ms in 1..=19 {
        l.add(ms);
    }
    assert_eq!(l.percentile(95.0), None);
    l.add(100);
    assert_eq!(l.percentile(50.0), Some(11));
    assert_eq!(l.percentile(99.0), Some(100));
}

fn host(extra: Value) -> TestHost<Ambassador> {
    let mut u = json!({"name": "pay", "url": "http://127.0.0.1:9000", "base_interval_ms": 1, "max_interval_ms": 2});
    for (k, x) in extra.as_object().unwrap() {
        u[k] = x.clone();
    }
    TestHost::<Ambassador>::with_config(json!({"upstreams": [u], "access_log": false})).unwrap()
}

fn attempts(r: &Response) -> u32 {
    r.headers
        .iter()
        .find(|(k, _)| k == "x-ambassador-attempts")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap()
}

/// Answers each outbound request with the next status of `script`
/// (then 200), counting them.
fn scripted(h: &mut TestHost<Ambassador>, script: Vec<u16>) -> Rc<RefCell<Vec<String>>> {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let (s, script) = (seen.clone(), RefCell::new(script.into_iter()));
    h.on_fetch(move |req| {
        s.borrow_mut().push(req.url.clone());
        Ok(Response::text(
            script.borrow_mut().next().unwrap_or(200),
            "ok",
        ))
    });
    seen
}

/// Runs `req` and the retry timers it sets until it is answered.
fn run(h: &mut TestHost<Ambassador>, method: plexus_sdk::Method, path: &str) -> Response {
    let pending = match h.request(plexus_sdk::testing::request(method, path, b"body".to_vec())) {
        plexus_sdk::testing::Answer::Done(r) => return r,
        plexus_sdk::testing::Answer::Waiting(p) => p,
        other => panic!("{other:?}"),
    };
    for _ in 0..100 {
        if let Some(r) = h.answer_of(pending) {
            return r;
        }
        h.advance(5);
    }
    panic!("never answered");
}

#[test]
fn a_failing_attempt_is_retried_and_the_path_passed_on() {
    let mut h = host(json!({}));
    let seen = scripted(&mut h, vec![503, 503]);
    let r = run(&mut h, plexus_sdk::Method::Get, "/pay/charges/7?x=1");
    assert_eq!((r.status, attempts(&r)), (200, 3));
    assert_eq!(seen.borrow()[0], "http://127.0.0.1:9000/charges/7?x=1");
    let mut h = host(json!({"num_retries": 1}));
    scripted(&mut h, vec![503, 503]);
    let r = run(&mut h, plexus_sdk::Method::Get, "/pay/x");
    assert_eq!((r.status, attempts(&r)), (503, 2));
    assert_eq!(
        run(&mut h, plexus_sdk::Method::Get, "/nobody/x").status,
        404
    );
}

#[test]
fn a_post_is_not_retried_by_default() {
    let mut h = host(json!({}));
    scripted(&mut h, vec![503]);
    let r = run(&mut h, plexus_sdk::Method::Post, "/pay/charges");
    assert_eq!((r.status, attempts(&r)), (503, 1));
}

#[test]
fn the_budget_stops_retries_under_a_failing_upstream() {
    // Ratio 0.1, a floor of 1/s over 10 s: 100 failing requests may
    // retry at most 10 + 10 times.
    let mut h = host(
        json!({"num_retries": 3, "budget": {"retry_ratio": 0.1, "min_retries_per_second": 1}}),
    );
    let seen = scripted(&mut h, vec![503; 10_000]);
    for _ in 0..100 {
        run(&mut h, plexus_sdk::Method::Get, "/pay/x");
    }
    let retries = seen.borrow().len() - 100;
    assert!(retries <= 20, "{retries} retries");
    let s: Value = serde_json::from_slice(&h.get("/_amb/status").body).unwrap();
    assert_eq!(s["upstreams"]["pay"]["stats"]["retries"], retries as u64);
    assert!(s["upstreams"]["pay"]["stats"]["budget_refused"].as_u64() > Some(0));
    assert!(
        String::from_utf8(h.get("/_amb/metrics").body)
            .unwrap()
            .contains("ambassador_retries_total{upstream=\"pay\"}")
    );
}

#[test]
fn a_connect_failure_is_retried_and_reported_when_it_lasts() {
    let mut h = host(json!({"num_retries": 2}));
    let n = Rc::new(RefCell::new(0));
    let n2 = n.clone();
    h.on_fetch(move |_| {
        *n2.borrow_mut() += 1;
        Err(FetchError::Connect("refused".into()))
    });
    let r = run(&mut h, plexus_sdk::Method::Get, "/pay/x");
    assert_eq!((r.status, attempts(&r), *n.borrow()), (502, 3, 3));
}
