//! The state machine on its own (windows, minimum calls, slow calls,
//! half-open permits, the growing wait, forced states), and the plugin on
//! the in-memory host with stand-in upstreams: routing, refusals without
//! a call, classification, status, metrics, admin actions, config errors,
//! a swap and a restart, and cluster scope with other nodes' reports and
//! entries played in by hand.

use std::cell::RefCell;
use std::rc::Rc;

use plexus_sdk::http::FetchError;
use plexus_sdk::testing::{TestHost, request};
use plexus_sdk::{MemberState, Method, Request, Response, codec};
use serde_json::{Value, json};

use super::CircuitBreaker;
use crate::breaker::{
    Admission, Breaker, Counts, Decision, Rules, Sample, Scope, State, Wait, Why, WindowType,
};
use crate::cluster::{Action, Command, Report};

const T0: u64 = 1_767_225_600_000;
const OK: Sample = Sample {
    failed: false,
    slow: false,
};
const FAIL: Sample = Sample {
    failed: true,
    slow: false,
};
const SLOW: Sample = Sample {
    failed: false,
    slow: true,
};

/// A count window of 10, minimum 5 calls, 50% failures, a 1 s wait, 3
/// probes.
fn rules() -> Rules {
    Rules {
        window_type: WindowType::CountBased,
        window_size: 10,
        minimum_number_of_calls: 5,
        failure_rate_threshold: 50.0,
        slow_call_rate_threshold: 100.0,
        slow_call_duration_threshold_ms: 1000,
        wait: Wait {
            base_ms: 1000,
            multiplier_milli: 1000,
            max_ms: 1000,
        },
        permitted_calls_in_half_open: 3,
        max_wait_in_half_open_ms: 0,
        automatic_transition: false,
    }
}

fn node(rules: Rules) -> Breaker {
    Breaker::new(rules, Scope::Node, "n1", T0)
}

fn nobody_gone(_: &str) -> bool {
    false
}

/// One call at `now` with `sample`'s outcome; whether it was permitted.
fn call(b: &mut Breaker, now: u64, sample: Sample) -> bool {
    match b.acquire(now, nobody_gone) {
        Admission::Permitted(p) => {
            b.record(now, p, Some(sample), 0);
            true
        }
        _ => false,
    }
}

fn calls(b: &mut Breaker, now: u64, samples: &[Sample]) {
    for s in samples {
        assert!(call(b, now, *s), "refused in {:?}", b.m.state);
    }
}

#[test]
fn a_count_window_opens_at_the_threshold_once_it_holds_the_minimum_of_calls() {
    let mut b = node(rules());
    // Four failures of four: 100%, but below the minimum of five.
    calls(&mut b, T0, &[FAIL, FAIL, FAIL, FAIL]);
    assert_eq!(b.m.state, State::Closed);
    assert_eq!(b.counts(T0).rates(5), None);
    // The fifth call, a success, makes 80% of five: open.
    assert!(call(&mut b, T0, OK));
    assert_eq!(b.m.state, State::Open);
    assert_eq!(b.m.attempts, 1);
    assert_eq!(b.m.open_until_ms, T0 + 1000);
    let t = b.m.history.back().unwrap();
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    match t.why {
        Why::Rates(r) => assert_eq!((r.failure_rate, r.calls), (80.0, 5)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failure_rate_exactly_at_the_threshold_opens_and_one_below_does_not() {
    let mut b = node(Rules {
        minimum_number_of_calls: 4,
        ..rules()
    });
    calls(&mut b, T0, &[OK, OK, OK, FAIL]);
    assert_eq!(b.m.state, State::Closed, "25% < 50%");
    let mut b = node(Rules {
        minimum_number_of_calls: 4,
        ..rules()
    });
    calls(&mut b, T0, &[OK, FAIL, OK, FAIL]);
    assert_eq!(b.m.state, State::Open, "50% >= 50%");
}

#[test]
fn a_count_window_keeps_only_its_last_calls_and_caps_the_minimum_at_its_size() {
    // Minimum 100 over a window of 4: resilience4j needs 4.
    let mut b = node(Rules {
        window_size: 4,
        minimum_number_of_calls: 100,
        ..rules()
    });
    assert_eq!(b.rules.minimum_calls(), 4);
    calls(&mut b, T0, &[FAIL, OK, OK, OK]);
    assert_eq!(b.m.state, State::Closed);
    // The failure slides out; one new failure of four is 25%.
    calls(&mut b, T0, &[OK, FAIL]);
    assert_eq!(
        b.counts(T0),
        Counts {
            calls: 4,
            failed: 1,
            slow: 0,
            slow_failed: 0
        }
    );
    assert_eq!(b.m.state, State::Closed);
    calls(&mut b, T0, &[FAIL]);
    assert_eq!(b.m.state, State::Open, "2 of the last 4");
}

#[test]
fn a_time_window_counts_the_calls_of_its_last_seconds_only() {
    let mut b = node(Rules {
        window_type: WindowType::TimeBased,
        window_size: 2,
        minimum_number_of_calls: 4,
        ..rules()
    });
    let s0 = T0 / 1000 * 1000;
    calls(&mut b, s0, &[FAIL, FAIL]);
    calls(&mut b, s0 + 900, &[FAIL]);
    assert_eq!(b.counts(s0 + 1500).calls, 3);
    // Two seconds later the first second's calls are out of the window.
    assert_eq!(b.counts(s0 + 2000).calls, 0);
    calls(&mut b, s0 + 2000, &[FAIL, OK, OK]);
    assert_eq!(b.m.state, State::Closed, "3 calls, below the minimum of 4");
    calls(&mut b, s0 + 2999, &[OK]);
    assert_eq!(b.m.state, State::Closed, "1 of 4 failed");
    calls(&mut b, s0 + 3000, &[FAIL, FAIL]);
    // The second at s0+2 is still in (s0+2, s0+3): 3 failures of 6.
    assert_eq!(b.counts(s0 + 3000).calls, 6);
    assert_eq!(b.m.state, State::Open);
    // A minimum above a time window's size is not capped.
    assert_eq!(
        Rules {
            window_type: WindowType::TimeBased,
            window_size: 2,
            minimum_number_of_calls: 100,
            ..rules()
        }
        .minimum_calls(),
        100
    );
}

#[test]
fn slow_calls_open_at_the_slow_call_rate_and_a_call_at_the_limit_is_not_slow() {
    let r = Rules {
        slow_call_rate_threshold: 60.0,
        ..rules()
    };
    assert!(!r.is_slow(1000));
    assert!(r.is_slow(1001));
    let mut b = node(r);
    calls(&mut b, T0, &[SLOW, SLOW, OK, OK, OK]);
    assert_eq!(b.m.state, State::Closed, "40% slow");
    calls(&mut b, T0, &[SLOW]);
    assert_eq!(b.m.state, State::Closed, "50% slow");
    calls(&mut b, T0, &[SLOW]);
    // 4 of 7 = 57%; one more slow failure makes 5 of 8 = 62.5%.
    assert_eq!(b.m.state, State::Closed);
    calls(
        &mut b,
        T0,
        &[Sample {
            failed: true,
            slow: true,
        }],
    );
    assert_eq!(b.m.state, State::Open);
    assert_eq!(b.m.totals.slow_successful, 4);
    assert_eq!(b.m.totals.slow_failed, 1);
    match b.m.history.back().unwrap().why {
        Why::Rates(r) => assert_eq!(r.slow_call_rate, 62.5),
        other => panic!("{other:?}"),
    }
}

fn opened(r: Rules) -> Breaker {
    let mut b = node(r);
    calls(&mut b, T0, &[FAIL; 5]);
    assert_eq!(b.m.state, State::Open);
    b
}

#[test]
fn an_open_breaker_refuses_until_its_wait_is_over_then_the_next_call_half_opens_it() {
    let mut b = opened(rules());
    assert_eq!(
        b.acquire(T0 + 999, nobody_gone),
        Admission::NotPermitted {
            state: State::Open,
            half_open_at_ms: Some(T0 + 1000),
            prober: None
        }
    );
    assert_eq!(b.m.totals.not_permitted, 1);
    // The wait is over: this call is the first probe.
    assert!(matches!(
        b.acquire(T0 + 1000, nobody_gone),
        Admission::Permitted(_)
    ));
    assert_eq!(b.m.state, State::HalfOpen);
    assert_eq!(b.m.half.permits_left, 2);
}

#[test]
fn half_open_permits_its_calls_then_closes_when_they_pass_with_an_empty_window() {
    let mut b = opened(rules());
    let now = T0 + 1000;
    let permits: Vec<_> = (0..3)
        .map(|_| match b.acquire(now, nobody_gone) {
            Admission::Permitted(p) => p,
            other => panic!("{other:?}"),
        })
        .collect();
    // A fourth is refused while the three are out.
    assert!(matches!(
        b.acquire(now, nobody_gone),
        Admission::NotPermitted {
            state: State::HalfOpen,
            ..
        }
    ));
    b.record(now, permits[0], Some(OK), 5);
    b.record(now, permits[1], Some(FAIL), 5);
    assert_eq!(b.m.state, State::HalfOpen);
    // One failure of three: 33% < 50%.
    b.record(now, permits[2], Some(OK), 5);
    assert_eq!(b.m.state, State::Closed);
    assert_eq!(b.counts(now).calls, 0);
    assert_eq!(b.m.attempts, 0);
    let path: Vec<_> = b.m.history.iter().map(|t| (t.from, t.to)).collect();
    assert_eq!(
        path,
        [
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed)
        ]
    );
}

#[test]
fn failing_probes_open_it_again_and_the_wait_grows_until_it_closes() {
    let mut b = opened(Rules {
        wait: Wait {
            base_ms: 1000,
            multiplier_milli: 2000,
            max_ms: 3000,
        },
        ..rules()
    });
    let mut now = T0;
    let mut waits = vec![b.m.open_until_ms - now];
    for _ in 0..3 {
        now = b.m.open_until_ms;
        calls(&mut b, now, &[FAIL, OK, FAIL]);
        assert_eq!(b.m.state, State::Open, "two of three probes failed");
        waits.push(b.m.open_until_ms - now);
    }
    assert_eq!(waits, [1000, 2000, 3000, 3000]);
    assert_eq!(b.m.attempts, 4);
    // Probes that pass close it, and the next opening waits the base again.
    now = b.m.open_until_ms;
    calls(&mut b, now, &[OK, OK, OK]);
    assert_eq!((b.m.state, b.m.attempts), (State::Closed, 0));
    calls(&mut b, now, &[FAIL; 5]);
    assert_eq!(b.m.open_until_ms - now, 1000);
}

#[test]
fn the_wait_grows_by_the_multiplier_up_to_its_maximum() {
    let w = Wait {
        base_ms: 500,
        multiplier_milli: 1500,
        max_ms: 2000,
    };
    let waits: Vec<u64> = (1..=6).map(|n| w.after(n)).collect();
    assert_eq!(waits, [500, 750, 1125, 1687, 2000, 2000]);
    let flat = Wait {
        base_ms: 500,
        multiplier_milli: 1000,
        max_ms: 500,
    };
    assert_eq!(flat.after(9), 500);
    // A wait too short to grow by a small multiplier stays as it is,
    // however many openings in a row.
    let tiny = Wait {
        base_ms: 1,
        multiplier_milli: 1001,
        max_ms: 1000,
    };
    assert_eq!(tiny.after(u32::MAX), 1);
}

#[test]
fn an_ignored_outcome_in_half_open_gives_its_permit_back() {
    let mut b = opened(rules());
    let now = T0 + 1000;
    let Admission::Permitted(p) = b.acquire(now, nobody_gone) else {
        panic!()
    };
    b.record(now, p, None, 0);
    assert_eq!(b.m.half.permits_left, 3);
    assert_eq!(b.m.totals.ignored, 1);
    calls(&mut b, now, &[OK, OK, OK]);
    assert_eq!(b.m.state, State::Closed);
}

#[test]
fn a_late_answer_permitted_before_an_opening_is_not_counted_as_a_probe() {
    let mut b = node(rules());
    let Admission::Permitted(early) = b.acquire(T0, nobody_gone) else {
        panic!()
    };
    calls(&mut b, T0, &[FAIL; 5]);
    assert_eq!(b.m.state, State::Open);
    let now = T0 + 1000;
    let Admission::Permitted(_) = b.acquire(now, nobody_gone) else {
        panic!()
    };
    // The call from the closed state comes back failed: counted in the
    // totals, not among the probes.
    b.record(now, early, Some(FAIL), 3000);
    assert_eq!(b.m.half.counts.calls, 0);
    assert_eq!(b.m.totals.failed, 6);
    assert_eq!(b.m.state, State::HalfOpen);
}

#[test]
fn automatic_transition_half_opens_on_time_and_a_half_open_too_long_opens_again() {
    let mut b = opened(Rules {
        automatic_transition: true,
        max_wait_in_half_open_ms: 500,
        ..rules()
    });
    assert_eq!(b.next_due_ms(), Some(T0 + 1000));
    assert_eq!(b.due(T0 + 999), None);
    assert_eq!(b.m.state, State::Open);
    b.due(T0 + 1000);
    assert_eq!(b.m.state, State::HalfOpen);
    assert_eq!(b.next_due_ms(), Some(T0 + 1500));
    // One probe of three came back; the others did not in time.
    calls(&mut b, T0 + 1100, &[OK]);
    b.due(T0 + 1500);
    assert_eq!(b.m.state, State::Open);
    assert_eq!(b.m.history.back().unwrap().why, Why::HalfOpenTimeout);
    assert_eq!(b.m.attempts, 2);
    // Without automatic transition nothing is due in the open state.
    let b = opened(rules());
    assert_eq!(b.next_due_ms(), None);
}

#[test]
fn forced_open_disabled_and_metrics_only_hold_until_an_operator_moves_the_breaker() {
    let mut b = node(rules());
    b.go(State::ForcedOpen, T0, Why::Operator);
    assert_eq!(b.m.attempts, 1);
    assert!(
        !call(&mut b, T0 + 3_600_000, OK),
        "forced open never waits out"
    );
    assert_eq!(b.m.totals.not_permitted, 1);

    b.go(State::Disabled, T0, Why::Operator);
    calls(&mut b, T0, &[FAIL; 20]);
    assert_eq!(b.m.state, State::Disabled);
    assert_eq!(b.counts(T0).calls, 0, "disabled records nothing");
    assert_eq!(b.m.totals.failed, 20, "but counts the calls");

    b.go(State::MetricsOnly, T0, Why::Operator);
    calls(&mut b, T0, &[FAIL; 10]);
    assert_eq!(b.m.state, State::MetricsOnly, "never moves by itself");
    assert_eq!(b.counts(T0).failed, 10);

    b.go(State::Closed, T0, Why::Operator);
    assert_eq!(b.counts(T0).calls, 0);
    calls(&mut b, T0, &[FAIL, FAIL, OK]);
    // A reset empties the window and forgets the openings in a row.
    b.go(State::Closed, T0, Why::Reset);
    assert_eq!((b.counts(T0).calls, b.m.attempts), (0, 0));
    let last = b.m.history.back().unwrap();
    assert_eq!(
        (last.from, last.to, last.why),
        (State::Closed, State::Closed, Why::Reset)
    );
    assert_eq!(b.m.transitions[&(State::Closed, State::Closed)], 1);
}

#[test]
fn a_cluster_breaker_proposes_instead_of_moving_and_only_its_prober_probes() {
    let mut b = Breaker::new(rules(), Scope::Cluster, "n1", T0);
    calls(&mut b, T0, &[FAIL; 8]);
    assert_eq!(b.m.state, State::Closed, "the caller sums and proposes");
    b.enter(
        State::Open,
        T0,
        7,
        1,
        T0 + 1000,
        None,
        Why::Operator,
        Some(7),
    );
    assert_eq!(
        b.acquire(T0 + 1000, nobody_gone),
        Admission::ProposeHalfOpen
    );
    // Half-open, probed by n2: n1 refuses, unless n2 is gone.
    b.enter(
        State::HalfOpen,
        T0 + 1000,
        9,
        1,
        0,
        Some("n2".into()),
        Why::WaitOver,
        Some(9),
    );
    assert!(matches!(
        b.acquire(T0 + 1000, nobody_gone),
        Admission::NotPermitted { prober: Some(p), .. } if p == "n2"
    ));
    assert_eq!(b.acquire(T0 + 1000, |n| n == "n2"), Admission::Claim);
    b.enter(
        State::HalfOpen,
        T0 + 1000,
        10,
        1,
        0,
        Some("n1".into()),
        Why::ProberGone,
        Some(10),
    );
    let mut decided = None;
    for _ in 0..3 {
        let Admission::Permitted(p) = b.acquire(T0 + 1000, nobody_gone) else {
            panic!()
        };
        decided = b.record(T0 + 1000, p, Some(OK), 1);
    }
    assert!(matches!(decided, Some(Decision::Close(_))));
    assert_eq!(b.m.state, State::HalfOpen, "until the log agrees");
    assert!(matches!(
        b.acquire(T0 + 1000, nobody_gone),
        Admission::NotPermitted { .. }
    ));
}

// ---- the plugin on the in-memory host ----

/// Upstream `users` on :9001 (and `orders` on :9002), with `extra`
/// options for every upstream.
fn config(extra: Value) -> Value {
    json!({
        "admin_token": "secret-token",
        "defaults": extra,
        "upstreams": [
            { "name": "users", "url": "http://127.0.0.1:9001/v1" },
            { "name": "orders", "url": "http://127.0.0.1:9002", "prefixes": ["/api/orders"] },
        ],
    })
}

fn small() -> Value {
    json!({
        "sliding_window_size": 10,
        "minimum_number_of_calls": 4,
        "wait_duration_in_open_state": "1s",
        "permitted_number_of_calls_in_half_open_state": 2,
    })
}

/// A stand-in upstream: answers `status` (or the error), counting calls
/// and keeping the last request.
struct Stage {
    hits: Rc<RefCell<u32>>,
    answer: Rc<RefCell<Result<u16, FetchError>>>,
    last: Rc<RefCell<Option<plexus_sdk::http::OutgoingRequest>>>,
}

impl Stage {
    fn answer(&self, a: Result<u16, FetchError>) {
        *self.answer.borrow_mut() = a;
    }
    fn hits(&self) -> u32 {
        *self.hits.borrow()
    }
}

fn start(config: Value) -> (TestHost<CircuitBreaker>, Stage) {
    let h = TestHost::<CircuitBreaker>::with_config(config).unwrap();
    stage(h)
}

fn stage(mut h: TestHost<CircuitBreaker>) -> (TestHost<CircuitBreaker>, Stage) {
    let s = Stage {
        hits: Rc::default(),
        answer: Rc::new(RefCell::new(Ok(200))),
        last: Rc::default(),
    };
    let (hits, answer, last) = (s.hits.clone(), s.answer.clone(), s.last.clone());
    h.on_fetch(move |req| {
        *hits.borrow_mut() += 1;
        *last.borrow_mut() = Some(req.clone());
        match answer.borrow().clone() {
            Ok(status) => {
                Ok(Response::text(status, "from upstream").with_header("connection", "close"))
            }
            Err(e) => Err(e),
        }
    });
    (h, s)
}

fn status_of(h: &mut TestHost<CircuitBreaker>, name: &str) -> Value {
    let r = h.get(&format!("/_cb/breakers/{name}"));
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).unwrap()
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn body(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

#[test]
fn a_request_goes_to_the_upstream_its_path_names_with_method_query_headers_and_body() {
    let (mut h, s) = start(config(json!({})));
    let mut req = request(Method::Put, "/users/7/name?x=1&y=2", b"alice".to_vec());
    req.headers = vec![
        ("x-trace".into(), "abc".into()),
        ("host".into(), "me".into()),
        ("connection".into(), "keep-alive".into()),
    ];
    let r = h.request(req).response();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"from upstream");
    assert_eq!(header(&r, "x-circuit-breaker-state"), Some("CLOSED"));
    assert_eq!(header(&r, "connection"), None, "hop-by-hop headers stay");
    let sent = s.last.borrow().clone().unwrap();
    assert_eq!(sent.url, "http://127.0.0.1:9001/v1/7/name?x=1&y=2");
    assert_eq!(sent.method, Method::Put);
    assert_eq!(sent.body, b"alice");
    assert_eq!(
        sent.headers,
        vec![("x-trace".to_string(), "abc".to_string())]
    );
    // A prefix passes the whole path; the bare name goes to the root.
    h.get("/api/orders/17");
    assert_eq!(
        s.last.borrow().as_ref().unwrap().url,
        "http://127.0.0.1:9002/api/orders/17"
    );
    h.get("/orders");
    assert_eq!(
        s.last.borrow().as_ref().unwrap().url,
        "http://127.0.0.1:9002/"
    );
    // `/api/ordersx` is not under `/api/orders`, nor an upstream's name.
    assert_eq!(h.get("/api/ordersx").status, 404);
    assert_eq!(h.get("/nobody/x").status, 404);
}

#[test]
fn an_open_breaker_answers_503_at_once_without_calling_the_upstream() {
    let (mut h, s) = start(config(small()));
    s.answer(Ok(500));
    for _ in 0..4 {
        assert_eq!(h.get("/users/x").status, 500, "the upstream's own answer");
    }
    assert_eq!(s.hits(), 4);
    let r = h.get("/users/x");
    assert_eq!(r.status, 503);
    assert_eq!(s.hits(), 4, "not called");
    assert_eq!(header(&r, "x-circuit-breaker-state"), Some("OPEN"));
    assert_eq!(header(&r, "retry-after"), Some("1"));
    let b = body(&r);
    assert_eq!(b["state"], "OPEN");
    assert_eq!(b["breaker"], "users");
    assert_eq!(b["retry_after_ms"], 1000);
    let at = b["half_open_at_ms"].as_u64().unwrap();
    assert_eq!(
        header(&r, "x-circuit-breaker-half-open-at"),
        Some(at.to_string().as_str())
    );
    // The other upstream's breaker is its own.
    assert_eq!(h.get("/orders/1").status, 500);

    // After the wait, two probes; they pass, and it closes.
    h.advance(1000);
    s.answer(Ok(200));
    assert_eq!(h.get("/users/x").status, 200);
    assert_eq!(status_of(&mut h, "users")["state"], "HALF_OPEN");
    assert_eq!(h.get("/users/x").status, 200);
    let st = status_of(&mut h, "users");
    assert_eq!(st["state"], "CLOSED");
    assert_eq!(st["calls"]["not_permitted"], 1);
    assert_eq!(st["calls"]["failed"], 4);
    assert_eq!(st["calls"]["successful"], 2);
    assert_eq!(st["transitions_total"], 3);
    assert_eq!(s.hits(), 7);
}

#[test]
fn statuses_and_errors_count_as_the_config_says() {
    let (mut h, s) = start(config(json!({
        "minimum_number_of_calls": 100,
        "record_statuses": ["5xx", 429],
        "ignore_statuses": ["404-404"],
        "record_errors": ["timeout"],
    })));
    for (answer, _) in [
        (Ok(503), "failed"),
        (Ok(429), "failed"),
        (Ok(404), "ignored"),
        (Ok(400), "successful"),
        (Err(FetchError::Timeout), "failed"),
        (Err(FetchError::Connect("refused".into())), "ignored"),
    ] {
        s.answer(answer);
        h.get("/users/a");
    }
    let st = status_of(&mut h, "users");
    assert_eq!(st["calls"]["failed"], 3, "{st}");
    assert_eq!(st["calls"]["ignored"], 2, "{st}");
    assert_eq!(st["calls"]["successful"], 1, "{st}");
    assert_eq!(
        st["window"]["calls"], 4,
        "ignored calls stay out of the window: {st}"
    );
    // A timeout is answered as the SDK maps it, with the state.
    s.answer(Err(FetchError::Timeout));
    let r = h.get("/users/a");
    assert_eq!(r.status, 504);
    assert_eq!(header(&r, "x-circuit-breaker-state"), Some("CLOSED"));
}

#[test]
fn status_and_metrics_show_state_window_rates_and_transitions() {
    let (mut h, s) = start(config(small()));
    s.answer(Ok(502));
    for _ in 0..3 {
        h.get("/users/a");
    }
    let st = status_of(&mut h, "users");
    assert_eq!(st["failure_rate"], -1.0, "below the minimum: {st}");
    assert_eq!(st["window"]["type"], "COUNT_BASED");
    s.answer(Ok(200));
    h.get("/users/a");
    let st = status_of(&mut h, "users");
    assert_eq!(st["state"], "OPEN", "{st}");
    assert_eq!(st["failure_rate"], 75.0);
    assert_eq!(st["window"]["calls"], 4);
    assert_eq!(st["transitions"][0]["why"], "rates_exceeded");
    assert_eq!(
        st["half_open_at_ms"],
        st["since_ms"].as_u64().unwrap() + 1000
    );
    h.get("/users/a");
    let all: Value = serde_json::from_slice(&h.get("/_cb/status").body).unwrap();
    assert_eq!(all["breakers"].as_array().unwrap().len(), 2);

    let text = String::from_utf8(h.get("/_cb/metrics").body).unwrap();
    for line in [
        "plexus_cb_state{breaker=\"users\",state=\"OPEN\"} 1",
        "plexus_cb_state{breaker=\"users\",state=\"CLOSED\"} 0",
        "plexus_cb_state{breaker=\"orders\",state=\"CLOSED\"} 1",
        "plexus_cb_calls_total{breaker=\"users\",kind=\"failed\"} 3",
        "plexus_cb_calls_total{breaker=\"users\",kind=\"successful\"} 1",
        "plexus_cb_not_permitted_calls_total{breaker=\"users\"} 1",
        "plexus_cb_transitions_total{breaker=\"users\",from=\"CLOSED\",to=\"OPEN\"} 1",
        "plexus_cb_failure_rate{breaker=\"users\"} 75",
        "plexus_cb_buffered_calls{breaker=\"users\"} 4",
        "plexus_cb_attempts{breaker=\"users\"} 1",
    ] {
        assert!(text.contains(line), "no `{line}` in\n{text}");
    }
}

fn admin(h: &mut TestHost<CircuitBreaker>, path: &str, token: Option<&str>) -> Response {
    let mut req = request(Method::Post, path, Vec::new());
    if let Some(t) = token {
        req.headers = vec![("authorization".into(), format!("Bearer {t}"))];
    }
    h.request(req).response()
}

#[test]
fn operator_actions_need_the_admin_token_and_move_the_breaker() {
    let (mut h, s) = start(config(small()));
    assert_eq!(
        admin(&mut h, "/_cb/breakers/users/force_open", None).status,
        401
    );
    assert_eq!(
        admin(
            &mut h,
            "/_cb/breakers/users/force_open",
            Some("secret-tokex")
        )
        .status,
        401
    );
    let r = admin(
        &mut h,
        "/_cb/breakers/users/force_open",
        Some("secret-token"),
    );
    assert_eq!(
        (r.status, body(&r)["state"].clone()),
        (200, json!("FORCED_OPEN"))
    );
    h.advance(3_600_000);
    assert_eq!(h.get("/users/a").status, 503);
    assert_eq!(s.hits(), 0);
    let r = admin(&mut h, "/_cb/breakers/users/disable", Some("secret-token"));
    assert_eq!(body(&r)["state"], "DISABLED");
    s.answer(Ok(500));
    for _ in 0..10 {
        assert_eq!(h.get("/users/a").status, 500);
    }
    assert_eq!(status_of(&mut h, "users")["state"], "DISABLED");
    admin(
        &mut h,
        "/_cb/breakers/users/metrics_only",
        Some("secret-token"),
    );
    for _ in 0..10 {
        h.get("/users/a");
    }
    let st = status_of(&mut h, "users");
    assert_eq!(
        (st["state"].clone(), st["failure_rate"].clone()),
        (json!("METRICS_ONLY"), json!(100.0))
    );
    let r = admin(&mut h, "/_cb/breakers/users/reset", Some("secret-token"));
    assert_eq!(
        (
            body(&r)["state"].clone(),
            body(&r)["window"]["calls"].clone()
        ),
        (json!("CLOSED"), json!(0))
    );
    assert_eq!(
        admin(&mut h, "/_cb/breakers/users/explode", Some("secret-token")).status,
        404
    );
    assert_eq!(
        admin(&mut h, "/_cb/breakers/nobody/reset", Some("secret-token")).status,
        404
    );
    // Without a token in the config, actions are off.
    let (mut h, _) = start(json!({ "upstreams": [{ "name": "u", "url": "http://127.0.0.1:9" }] }));
    assert_eq!(
        admin(&mut h, "/_cb/breakers/u/reset", Some("anything")).status,
        403
    );
}

#[test]
fn config_errors_name_the_key_and_where_it_was_set() {
    let err = |c: Value| TestHost::<CircuitBreaker>::with_config(c).err().unwrap();
    let up = |extra: Value| {
        let mut u = json!({ "name": "u", "url": "http://127.0.0.1:9" });
        for (k, v) in extra.as_object().unwrap() {
            u[k] = v.clone();
        }
        json!({ "upstreams": [u] })
    };
    assert_eq!(
        err(up(json!({ "failure_rate_treshold": 50 }))),
        "config.upstreams[0].failure_rate_treshold: unknown field, expected one of `name`, `url`, `prefixes`, `scope`, `sliding_window_type`, `sliding_window_size`, `minimum_number_of_calls`, `failure_rate_threshold`, `slow_call_rate_threshold`, `slow_call_duration_threshold`, `wait_duration_in_open_state`, `enable_exponential_backoff`, `exponential_backoff_multiplier`, `exponential_max_wait_duration_in_open_state`, `permitted_number_of_calls_in_half_open_state`, `max_wait_duration_in_half_open_state`, `automatic_transition_from_open_to_half_open_enabled`, `record_statuses`, `ignore_statuses`, `record_errors`, `timeout_duration`"
    );
    assert_eq!(
        err(up(json!({ "failure_rate_threshold": 0 }))),
        "config.upstreams[0].failure_rate_threshold: must be a percentage in (0, 100]"
    );
    assert_eq!(
        err(up(json!({ "sliding_window_type": "SESSION_BASED" }))),
        "config.upstreams[0].sliding_window_type: unknown variant `SESSION_BASED`, expected `COUNT_BASED` or `TIME_BASED`"
    );
    assert_eq!(
        err(up(json!({ "wait_duration_in_open_state": "soon" }))),
        "config.upstreams[0].wait_duration_in_open_state: `soon` is not a duration: milliseconds, or a number with ms, s, m or h"
    );
    assert_eq!(
        err(up(json!({ "exponential_backoff_multiplier": 2.0 }))),
        "config.upstreams[0].exponential_backoff_multiplier: has no effect without enable_exponential_backoff = true"
    );
    assert_eq!(
        err(up(json!({ "record_statuses": ["6xx"] }))),
        "config.upstreams[0].record_statuses[0]: 600-699 is not a range of HTTP statuses (100 to 599)"
    );
    assert_eq!(
        err(up(json!({ "name": "_cb" }))),
        "config.upstreams[0].name: `_cb` must be 1 to 64 of A-Z a-z 0-9 . _ -, not starting with `_`"
    );
    assert_eq!(
        err(json!({
            "defaults": { "sliding_window_type": "TIME_BASED", "sliding_window_size": 5000 },
            "upstreams": [{ "name": "u", "url": "http://127.0.0.1:9" }],
        })),
        "config.defaults.sliding_window_size: must be in 1..=3600 for TIME_BASED"
    );
    assert_eq!(
        err(up(
            json!({ "enable_exponential_backoff": true, "wait_duration_in_open_state": "10s", "exponential_max_wait_duration_in_open_state": "5s" })
        )),
        "config.upstreams[0].exponential_max_wait_duration_in_open_state: must be at least wait_duration_in_open_state (10000 ms)"
    );
    assert_eq!(
        err(json!({ "upstreams": [] })),
        "config.upstreams: at least one upstream"
    );
    // An upstream's own option wins over the defaults.
    let (mut h, _) = start(json!({
        "defaults": { "minimum_number_of_calls": 7, "scope": "node" },
        "upstreams": [
            { "name": "a", "url": "http://127.0.0.1:9" },
            { "name": "b", "url": "http://127.0.0.1:9", "minimum_number_of_calls": 3 },
        ],
    }));
    assert_eq!(status_of(&mut h, "a")["minimum_number_of_calls"], 7);
    assert_eq!(status_of(&mut h, "b")["minimum_number_of_calls"], 3);
}

#[test]
fn a_swap_hands_over_the_state_the_window_and_the_counts() {
    let (mut h, s) = start(config(json!({
        "minimum_number_of_calls": 6,
        "wait_duration_in_open_state": "1s",
        "permitted_number_of_calls_in_half_open_state": 2,
    })));
    s.answer(Ok(500));
    for _ in 0..3 {
        h.get("/users/a");
        h.get("/orders/a");
    }
    for _ in 0..3 {
        h.get("/users/a");
    }
    h.get("/users/a");
    assert_eq!(status_of(&mut h, "users")["state"], "OPEN");
    let (mut h, s) = stage(h.swap::<CircuitBreaker>().unwrap());
    let st = status_of(&mut h, "users");
    assert_eq!(st["state"], "OPEN", "{st}");
    assert_eq!(st["calls"]["not_permitted"], 1);
    assert_eq!(st["transitions_total"], 1);
    assert_eq!(h.get("/users/a").status, 503);
    assert_eq!(s.hits(), 0);
    // The closed breaker's window came along: three more failures open it.
    assert_eq!(status_of(&mut h, "orders")["window"]["calls"], 3);
    for _ in 0..3 {
        h.get("/orders/a");
    }
    assert_eq!(status_of(&mut h, "orders")["state"], "OPEN");
    // Half-open with a probe out at the swap: the new version gets the
    // permit back (the probe's outcome goes to the old one).
    h.advance(1000);
    h.get("/users/a");
    assert_eq!(status_of(&mut h, "users")["half_open"]["left"], 1);
    let mut h = h.swap::<CircuitBreaker>().unwrap();
    let st = status_of(&mut h, "users");
    assert_eq!(
        (st["state"].clone(), st["half_open"]["left"].clone()),
        (json!("HALF_OPEN"), json!(1))
    );
}

#[test]
fn a_node_scope_breaker_keeps_its_state_through_a_restart() {
    let (mut h, s) = start(config(small()));
    s.answer(Ok(500));
    for _ in 0..4 {
        h.get("/users/a");
    }
    admin(
        &mut h,
        "/_cb/breakers/orders/force_open",
        Some("secret-token"),
    );
    let (mut h, s) = stage(h.restart().unwrap());
    assert_eq!(status_of(&mut h, "users")["state"], "OPEN");
    assert_eq!(status_of(&mut h, "orders")["state"], "FORCED_OPEN");
    assert_eq!(h.get("/users/a").status, 503);
    h.advance(1000);
    assert_eq!(h.get("/users/a").status, 200, "half-open: a probe");
    assert_eq!(status_of(&mut h, "users")["state"], "HALF_OPEN");
    assert_eq!(s.hits(), 1);
}

// ---- cluster scope ----

/// Node n1 of n1..n3, `users` in cluster scope: window 10, minimum 6.
fn cluster() -> (TestHost<CircuitBreaker>, Stage) {
    let h = TestHost::<CircuitBreaker>::setup()
        .members(&["n1", "n2", "n3"])
        .config(json!({
            "admin_token": "secret-token",
            "report_interval_ms": 100,
            "defaults": {
                "scope": "cluster",
                "sliding_window_size": 10,
                "minimum_number_of_calls": 6,
                "wait_duration_in_open_state": "1s",
                "permitted_number_of_calls_in_half_open_state": 2,
            },
            "upstreams": [{ "name": "users", "url": "http://127.0.0.1:9001" }],
        }))
        .start()
        .unwrap();
    stage(h)
}

fn report(index: u64, calls: u64, failed: u64) -> Vec<u8> {
    codec::encode(&Report {
        breakers: vec![(
            "users".into(),
            index,
            Counts {
                calls,
                failed,
                ..Counts::default()
            },
        )],
    })
}

fn commands(h: &TestHost<CircuitBreaker>) -> Vec<Command> {
    h.entries()
        .iter()
        .map(|e| codec::decode(&e.data).unwrap())
        .collect()
}

#[test]
fn a_cluster_breaker_opens_on_the_nodes_summed_counts_when_none_has_enough_alone() {
    let (mut h, s) = cluster();
    s.answer(Ok(500));
    for _ in 0..2 {
        h.get("/users/a");
    }
    h.message("n2", "cb.report", &report(0, 2, 2));
    assert_eq!(
        status_of(&mut h, "users")["state"],
        "CLOSED",
        "4 calls of 6"
    );
    assert!(h.entries().is_empty());
    h.message("n3", "cb.report", &report(0, 2, 2));
    let st = status_of(&mut h, "users");
    assert_eq!(st["state"], "OPEN", "{st}");
    assert_eq!(st["cluster"]["index"], 1);
    // The others' reports were counted under the closed state: from now
    // on only what they count under the open one.
    assert_eq!(st["cluster"]["sum"]["calls"], 2, "{st}");
    assert_eq!(st["transitions"][0]["index"], 1);
    match &commands(&h)[..] {
        [
            Command::Open {
                seen: 0,
                why: Why::Rates(r),
                ..
            },
        ] => {
            assert_eq!((r.calls, r.failure_rate), (6, 100.0))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.get("/users/a").status, 503);
    assert_eq!(s.hits(), 2);
    // The same opening proposed by another node on the old state changes
    // nothing.
    let stale = match &commands(&h)[0] {
        c @ Command::Open { .. } => c.clone(),
        _ => unreachable!(),
    };
    h.commit(&stale);
    assert_eq!(status_of(&mut h, "users")["cluster"]["index"], 1);
}

#[test]
fn reports_of_another_state_or_gone_stale_or_from_a_dead_node_do_not_count() {
    let (mut h, s) = cluster();
    s.answer(Ok(500));
    for _ in 0..2 {
        h.get("/users/a");
    }
    // Counted under a state this node has left.
    h.message("n2", "cb.report", &report(5, 4, 4));
    assert_eq!(status_of(&mut h, "users")["cluster"]["sum"]["calls"], 2);
    // Too old: three keepalive periods.
    h.message("n2", "cb.report", &report(0, 2, 2));
    assert_eq!(status_of(&mut h, "users")["cluster"]["sum"]["calls"], 4);
    h.advance(3000);
    assert_eq!(status_of(&mut h, "users")["cluster"]["sum"]["calls"], 2);
    // From a node declared dead.
    h.message("n3", "cb.report", &report(0, 2, 2));
    h.member("n3", MemberState::Dead);
    assert_eq!(status_of(&mut h, "users")["cluster"]["sum"]["calls"], 2);
    h.message("n3", "cb.report", &report(0, 4, 4));
    assert_eq!(status_of(&mut h, "users")["state"], "CLOSED");
}

#[test]
fn each_node_reports_its_counts_when_they_change_and_once_a_second_anyway() {
    let (mut h, s) = cluster();
    h.sent();
    h.advance(100);
    assert_eq!(h.sent().len(), 1, "the first round");
    h.advance(300);
    assert!(h.sent().is_empty(), "nothing new");
    s.answer(Ok(500));
    h.get("/users/a");
    h.advance(100);
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, None, "broadcast");
    let r: Report = codec::decode(&sent[0].payload).unwrap();
    assert_eq!(r.breakers[0].0, "users");
    assert_eq!((r.breakers[0].2.calls, r.breakers[0].2.failed), (1, 1));
    h.advance(1000);
    assert_eq!(h.sent().len(), 1, "the keepalive");
}

fn open_cluster() -> (TestHost<CircuitBreaker>, Stage) {
    let (mut h, s) = cluster();
    s.answer(Ok(500));
    h.get("/users/a");
    h.message("n2", "cb.report", &report(0, 5, 5));
    assert_eq!(status_of(&mut h, "users")["state"], "OPEN");
    (h, s)
}

#[test]
fn after_the_wait_the_first_node_with_a_call_probes_and_closes_it_through_the_log() {
    let (mut h, s) = open_cluster();
    h.advance(1000);
    s.answer(Ok(200));
    // This call proposes HALF_OPEN naming n1, waits for it, and is the
    // first probe.
    assert_eq!(h.get("/users/a").status, 200);
    let st = status_of(&mut h, "users");
    assert_eq!(st["state"], "HALF_OPEN", "{st}");
    assert_eq!(st["half_open"]["prober"], "n1");
    assert!(matches!(
        commands(&h).last(),
        Some(Command::HalfOpen { prober: Some(p), .. }) if p == "n1"
    ));
    assert_eq!(h.get("/users/a").status, 200);
    let st = status_of(&mut h, "users");
    assert_eq!(st["state"], "CLOSED", "{st}");
    assert!(matches!(commands(&h).last(), Some(Command::Close { .. })));
    assert_eq!(commands(&h).len(), 3);
    assert_eq!(s.hits(), 3);
}

#[test]
fn another_nodes_probes_refuse_calls_here_until_it_dies_and_this_node_claims_them() {
    let (mut h, s) = open_cluster();
    let index = h.entries().len() as u64;
    h.advance(1000);
    h.commit(&Command::HalfOpen {
        breaker: "users".into(),
        seen: index,
        at_ms: plexus_sdk::timers::now_ms(),
        prober: Some("n2".into()),
    });
    let r = h.get("/users/a");
    assert_eq!(r.status, 503);
    assert_eq!(body(&r)["prober"], "n2");
    assert_eq!(header(&r, "x-circuit-breaker-state"), Some("HALF_OPEN"));
    h.member("n2", MemberState::Dead);
    s.answer(Ok(200));
    assert_eq!(h.get("/users/a").status, 200);
    assert!(matches!(
        commands(&h).last(),
        Some(Command::Claim { prober, .. }) if prober == "n1"
    ));
    h.get("/users/a");
    assert_eq!(status_of(&mut h, "users")["state"], "CLOSED");
}

#[test]
fn with_automatic_transition_the_timers_half_open_a_cluster_breaker_and_failing_probes_reopen_it() {
    let h = TestHost::<CircuitBreaker>::setup()
        .members(&["n1", "n2"])
        .config(json!({
            "defaults": {
                "scope": "cluster",
                "minimum_number_of_calls": 2,
                "wait_duration_in_open_state": "1s",
                "enable_exponential_backoff": true,
                "exponential_backoff_multiplier": 2,
                "automatic_transition_from_open_to_half_open_enabled": true,
                "permitted_number_of_calls_in_half_open_state": 1,
            },
            "upstreams": [{ "name": "users", "url": "http://127.0.0.1:9001" }],
        }))
        .start()
        .unwrap();
    let (mut h, s) = stage(h);
    s.answer(Ok(500));
    h.get("/users/a");
    h.get("/users/a");
    assert_eq!(status_of(&mut h, "users")["state"], "OPEN");
    h.advance(1000);
    let st = status_of(&mut h, "users");
    assert_eq!(st["state"], "HALF_OPEN", "{st}");
    assert_eq!(st["half_open"]["prober"], Value::Null);
    // The first call claims the probes; it fails; open again, for 2 s.
    assert_eq!(h.get("/users/a").status, 500);
    let st = status_of(&mut h, "users");
    assert_eq!(st["state"], "OPEN", "{st}");
    assert_eq!(st["retry_after_ms"], 2000);
    let kinds: Vec<&str> = commands(&h)
        .iter()
        .map(|c| match c {
            Command::Open { .. } => "open",
            Command::HalfOpen { .. } => "half_open",
            Command::Claim { .. } => "claim",
            Command::Close { .. } => "close",
            Command::Operator { .. } => "operator",
        })
        .collect();
    assert_eq!(kinds, ["open", "half_open", "claim", "open"]);
}

#[test]
fn operator_actions_on_a_cluster_breaker_are_log_entries() {
    let (mut h, s) = cluster();
    let r = admin(
        &mut h,
        "/_cb/breakers/users/force_open",
        Some("secret-token"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        (body(&r)["state"].clone(), body(&r)["index"].clone()),
        (json!("FORCED_OPEN"), json!(1))
    );
    assert!(matches!(
        commands(&h)[..],
        [Command::Operator {
            action: Action::ForceOpen,
            ..
        }]
    ));
    assert_eq!(h.get("/users/a").status, 503);
    assert_eq!(s.hits(), 0);
    // Another node's reset, applied here.
    h.commit(&Command::Operator {
        breaker: "users".into(),
        action: Action::Reset,
        at_ms: plexus_sdk::timers::now_ms(),
    });
    assert_eq!(status_of(&mut h, "users")["state"], "CLOSED");
    assert_eq!(h.get("/users/a").status, 200);
}

#[test]
fn a_cluster_breaker_keeps_the_agreed_state_through_a_restart_and_a_swap() {
    let (h, _) = open_cluster();
    let (mut h, s) = stage(h.restart().unwrap());
    let st = status_of(&mut h, "users");
    assert_eq!(
        (st["state"].clone(), st["cluster"]["index"].clone()),
        (json!("OPEN"), json!(1))
    );
    assert_eq!(h.get("/users/a").status, 503);
    let (mut h, s2) = stage(h.swap::<CircuitBreaker>().unwrap());
    let st = status_of(&mut h, "users");
    assert_eq!(st["state"], "OPEN");
    assert_eq!(st["calls"]["not_permitted"], 1, "counts handed over");
    assert_eq!(h.get("/users/a").status, 503);
    assert_eq!(s.hits() + s2.hits(), 0);
}

#[test]
fn the_bare_name_of_an_upstream_goes_to_its_base_path_with_the_headers() {
    let (mut h, s) = start(config(json!({})));
    let req = Request {
        method: Method::Get,
        path: "/users".into(),
        query: String::new(),
        headers: vec![("accept".into(), "application/json".into())],
        body: Vec::new(),
        source: plexus_sdk::RequestSource::Client,
    };
    assert_eq!(h.request(req).response().status, 200);
    let sent = s.last.borrow().clone().unwrap();
    assert_eq!(sent.url, "http://127.0.0.1:9001/v1/");
    assert_eq!(
        sent.headers,
        vec![("accept".to_string(), "application/json".to_string())]
    );
}
