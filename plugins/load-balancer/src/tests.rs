//! The policies' choices, ejection and return through the log, slow
//! start, panic and the config's checks, on the in-memory host with
//! stand-in backends; and, apart from the host, a simulated run of
//! clients against a slow backend for least request and peak EWMA.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use plexus_sdk::http::FetchError;
use plexus_sdk::testing::{TestHost, request};
use plexus_sdk::{Method, Response};
use serde_json::{Value, json};

use super::Balancer;
use crate::config::LbPolicy;
use crate::policy::{Candidate, Choice, Maglev, PeakEwma, Picker};
use crate::verdicts::{Command, Reason};

/// Backends `a`, `b`, `c` on ports 9001..9003, with `extra` config.
fn config(extra: Value) -> Value {
    let mut c = json!({
        "backends": [
            { "name": "a", "url": "http://127.0.0.1:9001" },
            { "name": "b", "url": "http://127.0.0.1:9002" },
            { "name": "c", "url": "http://127.0.0.1:9003" },
        ],
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

/// Which backend the URL names.
fn backend_of(url: &str) -> &'static str {
    match url.get(17..21) {
        Some("9001") => "a",
        Some("9002") => "b",
        Some("9003") => "c",
        _ => "?",
    }
}

/// Backends that answer 200 with their name, except those in `failing`
/// (503) and `down` (connection refused); requests are counted by name.
struct Stage {
    served: Rc<RefCell<BTreeMap<&'static str, u32>>>,
    failing: Rc<RefCell<Vec<&'static str>>>,
    down: Rc<RefCell<Vec<&'static str>>>,
}

fn stage(h: &mut TestHost<Balancer>) -> Stage {
    let s = Stage {
        served: Rc::default(),
        failing: Rc::default(),
        down: Rc::default(),
    };
    let (served, failing, down) = (s.served.clone(), s.failing.clone(), s.down.clone());
    h.on_fetch(move |req| {
        let name = backend_of(&req.url);
        if down.borrow().contains(&name) {
            return Err(FetchError::Connect("refused".into()));
        }
        if !req.url.ends_with("/healthz") {
            *served.borrow_mut().entry(name).or_default() += 1;
        }
        if failing.borrow().contains(&name) {
            return Ok(Response::text(503, "failing"));
        }
        Ok(Response::text(200, name))
    });
    s
}

fn start(extra: Value) -> (TestHost<Balancer>, Stage) {
    let mut h = TestHost::<Balancer>::with_config(config(extra)).unwrap();
    let s = stage(&mut h);
    (h, s)
}

fn counts(s: &Stage) -> Vec<u32> {
    let served = s.served.borrow();
    ["a", "b", "c"]
        .iter()
        .map(|n| served.get(n).copied().unwrap_or(0))
        .collect()
}

fn status(h: &mut TestHost<Balancer>) -> Value {
    serde_json::from_slice(&h.get("/_lb/status").body).unwrap()
}

fn state_of(h: &mut TestHost<Balancer>, name: &str) -> Value {
    let s = status(h);
    s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap()
}

fn commands(h: &TestHost<Balancer>) -> Vec<Command> {
    h.entries()
        .iter()
        .map(|e| plexus_sdk::codec::decode(&e.data).unwrap())
        .collect()
}

#[test]
fn weighted_round_robin_gives_each_backend_its_weight_in_every_run() {
    let mut h = TestHost::<Balancer>::with_config(json!({
        "lb_policy": "round_robin",
        "backends": [
            { "name": "a", "url": "http://127.0.0.1:9001", "weight": 1 },
            { "name": "b", "url": "http://127.0.0.1:9002", "weight": 2 },
            { "name": "c", "url": "http://127.0.0.1:9003", "weight": 3 },
        ],
    }))
    .unwrap();
    let s = stage(&mut h);
    let mut order = String::new();
    for _ in 0..6 {
        let r = h.get("/x");
        order.push_str(std::str::from_utf8(&r.body).unwrap());
    }
    // Smooth: c, b, a, c, b, c, rather than c, c, c, b, b, a.
    assert_eq!(order, "cbacbc");
    for _ in 0..54 {
        h.get("/x");
    }
    assert_eq!(counts(&s), [10, 20, 30]);
}

#[test]
fn random_spreads_by_weight_within_a_few_standard_deviations() {
    let mut h = TestHost::<Balancer>::with_config(json!({
        "lb_policy": "random",
        "backends": [
            { "name": "a", "url": "http://127.0.0.1:9001", "weight": 1 },
            { "name": "b", "url": "http://127.0.0.1:9002", "weight": 1 },
            { "name": "c", "url": "http://127.0.0.1:9003", "weight": 2 },
        ],
    }))
    .unwrap();
    let s = stage(&mut h);
    for _ in 0..4000 {
        h.get("/x");
    }
    // Expected 1000, 1000, 2000; a standard deviation is 27 to 32.
    let c = counts(&s);
    assert!((850..1150).contains(&c[0]), "{c:?}");
    assert!((850..1150).contains(&c[1]), "{c:?}");
    assert!((1850..2150).contains(&c[2]), "{c:?}");
}

#[test]
fn maglev_keeps_a_key_on_its_backend_and_moves_only_the_keys_of_one_ejected() {
    let (mut h, _s) = start(json!({ "lb_policy": "maglev", "hash_header": "x-user" }));
    let mut owner = BTreeMap::new();
    for k in 0..300 {
        let user = format!("user-{k}");
        let mut req = request(Method::Get, "/x", Vec::new());
        req.headers = vec![("x-user".into(), user.clone())];
        let first = h.request(req.clone()).response().body;
        let again = h.request(req).response().body;
        assert_eq!(first, again, "{user} moved");
        owner.insert(user, String::from_utf8(first).unwrap());
    }
    let per: Vec<usize> = ["a", "b", "c"]
        .iter()
        .map(|n| owner.values().filter(|o| o == n).count())
        .collect();
    assert!(per.iter().all(|n| (60..140).contains(n)), "{per:?}");
    h.post("/_lb/backends/b/eject", "");
    for (user, was) in &owner {
        let mut req = request(Method::Get, "/x", Vec::new());
        req.headers = vec![("x-user".into(), user.clone())];
        let now = String::from_utf8(h.request(req).response().body).unwrap();
        if was == "b" {
            assert_ne!(now, "b");
        } else {
            assert_eq!(&now, was, "{user} moved though its backend stayed");
        }
    }
}

#[test]
fn the_maglev_table_gives_each_backend_its_weight() {
    let t = Maglev::build(&[(0, "a", 1000), (1, "b", 1000), (2, "c", 2000)]);
    let mut n = [0usize; 3];
    for slot in 0..crate::policy::MAGLEV_SIZE {
        n[t.at(slot).unwrap()] += 1;
    }
    let share: Vec<f64> = n.iter().map(|c| *c as f64 / 65_537.0).collect();
    assert!((share[0] - 0.25).abs() < 0.01, "{share:?}");
    assert!((share[1] - 0.25).abs() < 0.01, "{share:?}");
    assert!((share[2] - 0.5).abs() < 0.01, "{share:?}");
}

#[test]
fn a_refused_connection_is_sent_once_to_another_backend() {
    let (mut h, s) = start(json!({ "lb_policy": "round_robin" }));
    s.down.borrow_mut().push("a");
    let r = h.get("/x");
    assert_eq!(r.status, 200);
    assert_ne!(r.body, b"a");
    // All down: one resend, then the refusal is the answer.
    s.down.borrow_mut().extend(["b", "c"]);
    let r = h.get("/x");
    assert_eq!(r.status, 502);
    let text = String::from_utf8(h.get("/_lb/metrics").body).unwrap();
    assert!(
        text.contains("plexus_lb_resent_total{policy=\"round_robin\",backend=\"a\"} 1"),
        "{text}"
    );
}

#[test]
fn five_5xx_in_a_row_eject_through_the_log_and_the_backend_returns_after_its_time() {
    let (mut h, s) = start(json!({
        "lb_policy": "round_robin",
        "outlier_detection": { "consecutive_5xx": 5, "base_ejection_time_ms": 1000 },
    }));
    s.failing.borrow_mut().push("b");
    for _ in 0..15 {
        h.get("/x");
    }
    let log = commands(&h);
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(matches!(
        &log[0],
        Command::Eject { backend, reason: Reason::Consecutive5xx, generation: 0, .. } if backend == "b"
    ));
    assert_eq!(state_of(&mut h, "b")["state"], "ejected");
    let before = counts(&s)[1];
    for _ in 0..30 {
        assert_eq!(h.get("/x").status, 200);
    }
    assert_eq!(counts(&s)[1], before, "an ejected backend took requests");
    // Back once its time is over (it is not checked: it may fail again).
    s.failing.borrow_mut().clear();
    h.advance(1200);
    assert_eq!(state_of(&mut h, "b")["state"], "in");
    assert!(matches!(
        commands(&h)[1],
        Command::Return { generation: 1, .. }
    ));
    h.get("/x");
    h.get("/x");
    h.get("/x");
    assert_eq!(counts(&s)[1], before + 1);
}

#[test]
fn each_ejection_lasts_longer_up_to_the_max() {
    let (mut h, s) = start(json!({
        "outlier_detection": {
            "consecutive_5xx": 3, "base_ejection_time_ms": 1000, "max_ejection_time_ms": 2500,
        },
    }));
    s.failing.borrow_mut().push("a");
    let mut lengths = Vec::new();
    for _ in 0..3 {
        for _ in 0..9 {
            h.get("/x");
        }
        let a = state_of(&mut h, "a");
        assert_eq!(a["state"], "ejected");
        lengths.push(a["until_ms"].as_u64().unwrap() - a["ejected_ms"].as_u64().unwrap());
        h.advance(3000);
        assert_eq!(state_of(&mut h, "a")["state"], "in");
    }
    assert_eq!(lengths, [1000, 2000, 2500]);
}

#[test]
fn a_verdict_another_node_proposed_applies_here_and_a_stale_one_does_not() {
    let (mut h, s) = start(json!({}));
    let eject = |generation| Command::Eject {
        backend: "c".into(),
        reason: Reason::HealthCheck,
        generation,
        at_ms: 1_767_225_600_000,
        base_ms: 60_000,
        max_ms: 300_000,
        max_percent: 10,
        backends: 3,
    };
    h.commit(&eject(0));
    let c = state_of(&mut h, "c");
    assert_eq!(
        (c["state"].clone(), c["index"].clone()),
        (json!("ejected"), json!(1))
    );
    for _ in 0..20 {
        h.get("/x");
    }
    assert_eq!(counts(&s)[2], 0);
    // A second node's proposal of the same ejection changes nothing, nor
    // does a return made on an older state.
    h.commit(&eject(0));
    h.commit(&Command::Return {
        backend: "c".into(),
        generation: 0,
        at_ms: 1_767_225_601_000,
    });
    let c = state_of(&mut h, "c");
    assert_eq!(
        (
            c["state"].clone(),
            c["index"].clone(),
            c["ejections"].clone()
        ),
        (json!("ejected"), json!(1), json!(1))
    );
}

#[test]
fn outlier_detection_ejects_at_most_max_ejection_percent_but_always_one() {
    let (mut h, s) = start(json!({
        "lb_policy": "round_robin",
        "outlier_detection": { "consecutive_5xx": 2, "max_ejection_percent": 10 },
    }));
    s.failing.borrow_mut().extend(["a", "b"]);
    for _ in 0..30 {
        h.get("/x");
    }
    let st = status(&mut h);
    let out: Vec<&Value> = st["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "ejected")
        .collect();
    assert_eq!(out.len(), 1, "{st}");
    // The refused second ejection is not proposed again and again.
    assert!(h.entries().len() <= 3, "{:?}", commands(&h));
}

#[test]
fn below_the_panic_threshold_requests_go_to_every_backend() {
    let (mut h, s) = start(json!({ "lb_policy": "round_robin", "panic_threshold": 50 }));
    h.post("/_lb/backends/a/eject", "");
    for _ in 0..30 {
        h.get("/x");
    }
    assert_eq!(counts(&s), [0, 15, 15]);
    assert_eq!(status(&mut h)["panic"], false);
    // One of three in is below half: all three take requests.
    h.post("/_lb/backends/b/eject", "");
    for _ in 0..30 {
        h.get("/x");
    }
    assert_eq!(status(&mut h)["panic"], true);
    let c = counts(&s);
    assert_eq!(c.iter().sum::<u32>(), 60);
    assert!(c[0] >= 9 && c[1] >= 24, "{c:?}");
}

#[test]
fn slow_start_ramps_a_returning_backends_weight_over_the_window() {
    let (mut h, _s) = start(json!({
        "lb_policy": "round_robin",
        "slow_start_window_ms": 10_000,
    }));
    h.post("/_lb/backends/a/eject", "");
    h.post("/_lb/backends/a/return", "");
    assert_eq!(state_of(&mut h, "a")["effective_weight"], 0.1);
    h.advance(5000);
    assert_eq!(state_of(&mut h, "a")["effective_weight"], 0.5);
    h.advance(5000);
    assert_eq!(state_of(&mut h, "a")["effective_weight"], 1.0);
    // And its share of requests follows the weight.
    let (mut h, s) = start(json!({ "lb_policy": "round_robin", "slow_start_window_ms": 100_000 }));
    h.post("/_lb/backends/a/eject", "");
    h.post("/_lb/backends/a/return", "");
    h.advance(20_000); // a at 20%: 0.2 of 2.2 shares
    for _ in 0..110 {
        h.get("/x");
    }
    let c = counts(&s);
    assert!((8..=12).contains(&c[0]), "{c:?}");
}

#[test]
fn failed_health_checks_eject_and_passing_ones_bring_the_backend_back() {
    let (mut h, s) = start(json!({
        "health_check": { "interval_ms": 1000, "healthy_threshold": 2, "unhealthy_threshold": 3 },
        "outlier_detection": { "consecutive_5xx": 0, "base_ejection_time_ms": 1000 },
    }));
    h.advance(2500);
    assert_eq!(state_of(&mut h, "b")["health"], "healthy");
    s.failing.borrow_mut().push("b");
    h.advance(2000);
    assert_eq!(
        state_of(&mut h, "b")["state"],
        "in",
        "two failures are not three"
    );
    h.advance(1000);
    let b = state_of(&mut h, "b");
    assert_eq!(
        (b["state"].clone(), b["reason"].clone()),
        (json!("ejected"), json!("health_check"))
    );
    // Its ejection time is over, but it still fails: it stays out.
    h.advance(3000);
    assert_eq!(state_of(&mut h, "b")["state"], "ejected");
    s.failing.borrow_mut().clear();
    h.advance(1000);
    assert_eq!(
        state_of(&mut h, "b")["state"],
        "ejected",
        "one pass is not two"
    );
    h.advance(1200);
    assert_eq!(state_of(&mut h, "b")["state"], "in");
    // Two entries for the whole episode.
    assert_eq!(commands(&h).len(), 2, "{:?}", commands(&h));
}

#[test]
fn a_failure_percentage_over_a_window_ejects() {
    let (mut h, s) = start(json!({
        "lb_policy": "round_robin",
        "outlier_detection": {
            "consecutive_5xx": 0, "interval_ms": 1000,
            "failure_percentage_threshold": 30, "failure_percentage_request_volume": 10,
        },
    }));
    // Every other request to `c` fails: never 5 in a row, but 50%.
    let n = Rc::new(RefCell::new(0u32));
    let served = s.served.clone();
    h.on_fetch(move |req| {
        let name = backend_of(&req.url);
        *served.borrow_mut().entry(name).or_default() += 1;
        *n.borrow_mut() += 1;
        if name == "c" && n.borrow().is_multiple_of(2) {
            return Ok(Response::text(500, "oops"));
        }
        Ok(Response::text(200, name))
    });
    for _ in 0..60 {
        h.get("/x");
    }
    h.advance(1000);
    let c = state_of(&mut h, "c");
    assert_eq!(
        (c["state"].clone(), c["reason"].clone()),
        (json!("ejected"), json!("failure_percentage"))
    );
    assert_eq!(state_of(&mut h, "a")["state"], "in");
}

#[test]
fn status_and_metrics_show_each_backend() {
    let (mut h, s) = start(json!({ "lb_policy": "least_request" }));
    s.failing.borrow_mut().push("c");
    for _ in 0..9 {
        h.get("/x");
    }
    let text = String::from_utf8(h.get("/_lb/metrics").body).unwrap();
    for series in [
        "# TYPE plexus_lb_requests_total counter",
        "plexus_lb_errors_total{policy=\"least_request\",backend=\"c\",kind=\"5xx\"}",
        "plexus_lb_request_duration_seconds_bucket{policy=\"least_request\",backend=\"a\",le=\"+Inf\"}",
        "plexus_lb_backend_in{backend=\"b\"} 1",
        "plexus_lb_ejections_total{backend=\"c\"} 0",
        "plexus_lb_panic{policy=\"least_request\"} 0",
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
    let st = status(&mut h);
    let total: u64 = st["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_u64().unwrap())
        .sum();
    assert_eq!((st["policy"].clone(), total), (json!("least_request"), 9));
    assert_eq!(h.get("/_lb/nothing").status, 404);
}

#[test]
fn the_counts_and_verdicts_survive_a_swap() {
    let (mut h, _s) = start(json!({}));
    for _ in 0..6 {
        h.get("/x");
    }
    h.post("/_lb/backends/a/eject", "");
    let mut h = h.swap::<Balancer>().unwrap();
    let st = status(&mut h);
    let a = &st["backends"][0];
    assert_eq!(
        (a["state"].clone(), a["requests"].clone()),
        (json!("ejected"), json!(2))
    );
}

#[test]
fn the_responses_carry_the_backend_and_no_hop_by_hop_headers() {
    let (mut h, _s) = start(json!({}));
    h.on_fetch(|req| {
        assert!(!req.headers.iter().any(|(k, _)| k == "connection"));
        Ok(Response::text(200, "ok").with_header("connection", "close"))
    });
    let mut req = request(Method::Post, "/a/b?c=1", b"body".to_vec());
    req.headers = vec![("connection".into(), "keep-alive".into())];
    let r = h.request(req).response();
    assert!(!r.headers.iter().any(|(k, _)| k == "connection"));
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k == "x-lb-backend" && v == "a")
    );
}

#[test]
fn plugin_backends_are_called_on_their_node() {
    let mut h = TestHost::<Balancer>::with_config(json!({
        "backends": [
            { "name": "n2", "plugin": "echo", "node": "node-2" },
            { "name": "n3", "plugin": "echo", "node": "node-3" },
        ],
    }))
    .unwrap();
    h.on_plugin_call(|plugin, node, req| {
        Ok(Response::text(
            200,
            &format!("{plugin}@{} {}", node.unwrap_or("-"), req.path),
        ))
    });
    assert_eq!(h.get("/k").body, b"echo@node-2 /k");
    assert_eq!(h.get("/k").body, b"echo@node-3 /k");
}

#[test]
fn bad_configs_are_refused_naming_the_key() {
    let cases = [
        (
            json!({ "backends": [] }),
            "config.backends: list at least one backend",
        ),
        (
            config(json!({ "lb_policy": "ring_hash" })),
            "config.lb_policy: unknown variant `ring_hash`, expected one of `round_robin`, `random`, `least_request`, `peak_ewma`, `maglev`",
        ),
        (
            config(json!({ "lb_policy": "maglev" })),
            "config.hash_header: `maglev` needs the header to hash",
        ),
        (
            json!({ "backends": [{ "name": "a", "url": "ftp://x" }] }),
            "config.backends[0].url: must start with http:// (outbound HTTP has no TLS yet)",
        ),
        (
            json!({ "backends": [{ "name": "a", "url": "http://x" }, { "name": "a", "url": "http://y" }] }),
            "config.backends[1].name: `a` is listed twice",
        ),
        (
            json!({ "backends": [{ "name": "a", "url": "http://x", "weight": 0 }] }),
            "config.backends[0].weight: must be 1 to 10000",
        ),
        (
            json!({ "backends": [{ "name": "a", "plugin": "echo" }] }),
            "config.backends[0].node: a plugin backend names its node",
        ),
        (
            config(json!({ "choice_count": 1 })),
            "config.choice_count: must be at least 2",
        ),
        (
            config(json!({ "panic_threshold": 101 })),
            "config.panic_threshold: is a percentage, 0 to 100",
        ),
        (
            config(json!({ "outlier_detection": { "consecutive_5xxx": 3 } })),
            "config.outlier_detection.consecutive_5xxx: unknown field, expected one of `consecutive_5xx`, `interval_ms`, `failure_percentage_threshold`, `failure_percentage_request_volume`, `base_ejection_time_ms`, `max_ejection_time_ms`, `max_ejection_percent`",
        ),
        (
            config(json!({ "hash_balance_factor": 50 })),
            "config.hash_balance_factor: must be at least 100",
        ),
    ];
    for (config, expected) in cases {
        let err = TestHost::<Balancer>::with_config(config.clone()).err();
        assert_eq!(err.as_deref(), Some(expected), "{config}");
    }
}

/// Backends of weight 1 (1000 thousandths).
fn names(of: &[&str]) -> Vec<(String, u64)> {
    of.iter().map(|n| (n.to_string(), 1000)).collect()
}

/// A closed loop apart from the host: `clients` each send a request, wait
/// for its answer and send the next, for `requests` in all; backend `i`
/// answers after `latency_ms[i]`. Returns the requests each backend took.
fn simulate(policy: LbPolicy, latency_ms: [u64; 3], clients: usize, requests: usize) -> [usize; 3] {
    let names = names(&["a", "b", "c"]);
    let mut picker = Picker::new(3, 7);
    let mut ewma = [PeakEwma::default(); 3];
    let mut outstanding = [0u32; 3];
    let mut taken = [0usize; 3];
    // (done at, backend, sent at), one per client.
    let mut in_flight: Vec<(u64, usize, u64)> = Vec::new();
    let mut now = 0u64;
    let mut sent = 0;
    let tau = 10_000;
    let mut send = |now: u64,
                    picker: &mut Picker,
                    outstanding: &mut [u32; 3],
                    ewma: &[PeakEwma; 3],
                    in_flight: &mut Vec<(u64, usize, u64)>| {
        let candidates: Vec<Candidate> = (0..3)
            .map(|i| Candidate {
                index: i,
                weight: 1000,
                outstanding: outstanding[i],
                cost_ms: ewma[i].at(now, tau),
            })
            .collect();
        let how = Choice {
            policy,
            choice_count: 2,
            key: None,
            hash_balance_factor: 0,
            names: &names,
        };
        let i = picker.pick(how, &candidates);
        outstanding[i] += 1;
        taken[i] += 1;
        in_flight.push((now + latency_ms[i], i, now));
    };
    for _ in 0..clients {
        send(now, &mut picker, &mut outstanding, &ewma, &mut in_flight);
        sent += 1;
    }
    while let Some(k) = (0..in_flight.len()).min_by_key(|&k| in_flight[k].0) {
        let (done, i, at) = in_flight.swap_remove(k);
        now = done;
        outstanding[i] -= 1;
        ewma[i].observe((done - at) as f64, now, tau);
        if sent < requests {
            send(now, &mut picker, &mut outstanding, &ewma, &mut in_flight);
            sent += 1;
        }
    }
    taken
}

#[test]
fn least_request_and_peak_ewma_steer_away_from_a_slow_backend() {
    let latency = [2, 2, 40];
    let rr = simulate(LbPolicy::RoundRobin, latency, 12, 6000);
    let p2c = simulate(LbPolicy::LeastRequest, latency, 12, 6000);
    let ewma = simulate(LbPolicy::PeakEwma, latency, 12, 6000);
    let share = |t: [usize; 3]| t[2] as f64 / t.iter().sum::<usize>() as f64;
    println!(
        "slow backend's share: round robin {:.3}, least request {:.3}, peak EWMA {:.3}",
        share(rr),
        share(p2c),
        share(ewma)
    );
    assert!((share(rr) - 1.0 / 3.0).abs() < 0.01);
    assert!(share(p2c) < 0.2, "least request: {p2c:?}");
    assert!(share(ewma) < 0.05, "peak EWMA: {ewma:?}");
    assert!(share(ewma) < share(p2c));
}

#[test]
fn peak_ewma_takes_a_peak_at_once_and_forgets_it_with_time() {
    let mut e = PeakEwma::default();
    e.observe(2.0, 0, 1000);
    e.observe(100.0, 10, 1000);
    assert_eq!(e.cost_ms, 100.0, "a peak is taken at once");
    e.observe(2.0, 1010, 1000);
    // One time constant later, a fast answer pulls it by 1 - 1/e.
    assert!(
        (e.cost_ms - (100.0 / std::f64::consts::E + 2.0 * (1.0 - 1.0 / std::f64::consts::E))).abs()
            < 0.01
    );
    // Without answers it decays towards zero.
    assert!(e.at(1010 + 5000, 1000) < 0.3);
}

#[test]
fn least_request_prefers_the_backend_with_fewer_in_flight() {
    let mut picker = Picker::new(2, 1);
    let names = names(&["a", "b"]);
    let how = Choice {
        policy: LbPolicy::LeastRequest,
        choice_count: 2,
        key: None,
        hash_balance_factor: 0,
        names: &names,
    };
    let c = [
        Candidate {
            index: 0,
            weight: 1000,
            outstanding: 5,
            cost_ms: 0.0,
        },
        Candidate {
            index: 1,
            weight: 1000,
            outstanding: 1,
            cost_ms: 0.0,
        },
    ];
    for _ in 0..20 {
        assert_eq!(picker.pick(how, &c), 1);
    }
}

#[test]
fn bounded_load_passes_a_hot_key_along_the_table() {
    let mut picker = Picker::new(3, 1);
    let names = names(&["a", "b", "c"]);
    let mut how = Choice {
        policy: LbPolicy::Maglev,
        choice_count: 2,
        key: Some(42),
        hash_balance_factor: 0,
        names: &names,
    };
    let mut c: Vec<Candidate> = (0..3)
        .map(|i| Candidate {
            index: i,
            weight: 1000,
            outstanding: 0,
            cost_ms: 0.0,
        })
        .collect();
    let home = picker.pick(how, &c);
    c[home].outstanding = 30;
    assert_eq!(picker.pick(how, &c), home, "without a bound the key stays");
    how.hash_balance_factor = 150;
    assert_ne!(picker.pick(how, &c), home, "over 150% of the mean it moves");
}

#[test]
fn a_node_whose_checks_pass_again_later_does_not_eject_a_backend_another_brought_back() {
    let (mut h, s) = start(json!({
        "health_check": { "interval_ms": 1000, "healthy_threshold": 2, "unhealthy_threshold": 1 },
        "outlier_detection": { "consecutive_5xx": 0, "base_ejection_time_ms": 60_000 },
    }));
    s.failing.borrow_mut().push("a");
    h.advance(100);
    assert_eq!(state_of(&mut h, "a")["state"], "ejected");
    // Another node's checks passed first: it brought `a` back.
    h.commit(&Command::Return {
        backend: "a".into(),
        generation: 1,
        at_ms: 1_767_225_600_500,
    });
    s.failing.borrow_mut().clear();
    h.advance(1000); // one pass here: still unhealthy in this node's eyes
    assert_eq!(state_of(&mut h, "a")["health"], "unhealthy");
    assert_eq!(state_of(&mut h, "a")["state"], "in");
    assert_eq!(commands(&h).len(), 2, "{:?}", commands(&h));
}

#[test]
fn a_health_check_ejection_has_no_minimum_the_first_time_and_grows_when_it_flaps() {
    let (mut h, s) = start(json!({
        "health_check": { "interval_ms": 1000, "healthy_threshold": 1, "unhealthy_threshold": 1 },
        "outlier_detection": { "consecutive_5xx": 0, "base_ejection_time_ms": 10_000 },
    }));
    let mut out_for = Vec::new();
    for _ in 0..3 {
        s.failing.borrow_mut().push("c");
        h.advance(1000);
        let c = state_of(&mut h, "c");
        assert_eq!(c["state"], "ejected");
        out_for.push(c["until_ms"].as_u64().unwrap() - c["ejected_ms"].as_u64().unwrap());
        s.failing.borrow_mut().clear();
        h.advance(30_000);
        assert_eq!(state_of(&mut h, "c")["state"], "in");
    }
    assert_eq!(out_for, [0, 10_000, 20_000]);
}

#[test]
fn an_operators_ejection_lasts_until_the_operators_return() {
    let (mut h, _s) = start(json!({ "outlier_detection": { "base_ejection_time_ms": 1000 } }));
    let r = h.post("/_lb/backends/b/eject", "");
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (body["changed"].clone(), body["verdict"]["ejected"].clone()),
        (json!(true), json!(true))
    );
    h.advance(600_000);
    assert_eq!(state_of(&mut h, "b")["state"], "ejected");
    h.post("/_lb/backends/b/return", "");
    assert_eq!(state_of(&mut h, "b")["state"], "in");
    assert_eq!(h.post("/_lb/backends/zz/eject", "").status, 404);
}
