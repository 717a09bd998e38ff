//! What the breakers show: `GET /_cb/status` and `GET /_cb/breakers/{name}`
//! as JSON, `GET /_cb/metrics` in Prometheus text format. Counts are this
//! node's; in cluster scope the state is agreed, and the status also
//! shows the other nodes' counts and their sum.

use std::fmt::Write;

use plexus_sdk::timers;
use serde_json::{Value, json};

use crate::CircuitBreaker;
use crate::breaker::{Counts, Scope, State};

/// A rate for the status: -1 below the minimum of calls, as resilience4j
/// reports it.
fn rate(r: Option<f64>) -> f64 {
    r.map_or(-1.0, |r| (r * 100.0).round() / 100.0)
}

fn counts_json(c: &Counts) -> Value {
    json!({ "calls": c.calls, "failed": c.failed, "slow": c.slow, "slow_failed": c.slow_failed })
}

/// One breaker's status.
pub fn breaker(cb: &mut CircuitBreaker, i: usize) -> Value {
    let now = timers::now_ms();
    let mono = timers::monotonic_ms();
    let ttl = cb.report_ttl();
    let up = &cb.upstreams[i];
    let b = &mut cb.breakers[i];
    let window = b.counts(now);
    let minimum = b.rules.minimum_calls();
    let rates = window.rates(minimum);
    let (kind, size) = b.m.window.shape();
    let m = &b.m;
    let t = &m.totals;
    let mut out = json!({
        "name": up.name,
        "url": up.url,
        "prefixes": up.prefixes,
        "scope": b.scope.name(),
        "state": m.state.name(),
        "since_ms": m.since_ms,
        "attempts": m.attempts,
        "window": {
            "type": kind.name(),
            "size": size,
            "calls": window.calls,
            "failed": window.failed,
            "slow": window.slow,
            "slow_failed": window.slow_failed,
        },
        "minimum_number_of_calls": minimum,
        "failure_rate": rate(rates.map(|r| r.failure_rate)),
        "slow_call_rate": rate(rates.map(|r| r.slow_call_rate)),
        "failure_rate_threshold": b.rules.failure_rate_threshold,
        "slow_call_rate_threshold": b.rules.slow_call_rate_threshold,
        "slow_call_duration_threshold_ms": b.rules.slow_call_duration_threshold_ms,
        "next_wait_ms": b.rules.wait.after(m.attempts.saturating_add(1)),
        "calls": {
            "successful": t.successful,
            "failed": t.failed,
            "slow_successful": t.slow_successful,
            "slow_failed": t.slow_failed,
            "ignored": t.ignored,
            "not_permitted": t.not_permitted,
        },
        "transitions_total": m.transitions.values().sum::<u64>(),
        "transitions": m.history.iter().map(|t| json!({
            "from": t.from.name(),
            "to": t.to.name(),
            "at_ms": t.at_ms,
            "why": t.why.name(),
            "index": t.index,
        })).collect::<Vec<_>>(),
    });
    if m.state == State::Open {
        out["half_open_at_ms"] = m.open_until_ms.into();
        out["retry_after_ms"] = m.open_until_ms.saturating_sub(now).into();
    }
    if m.state == State::HalfOpen {
        let h = &m.half;
        out["half_open"] = json!({
            "permitted": b.rules.permitted_calls_in_half_open,
            "left": h.permits_left,
            "in_flight": h.in_flight,
            "calls": h.counts.calls,
            "failed": h.counts.failed,
            "slow": h.counts.slow,
            "prober": m.prober,
        });
    }
    if b.scope == Scope::Cluster {
        let mut nodes = serde_json::Map::new();
        nodes.insert(cb.node.clone(), counts_json(&window));
        for (node, h) in cb.peers.fresh(&up.name, m.epoch, mono, ttl) {
            let mut c = counts_json(&h.counts);
            c["age_ms"] = mono.saturating_sub(h.at_mono).into();
            nodes.insert(node.clone(), c);
        }
        let sum = window.plus(cb.peers.sum(&up.name, m.epoch, mono, ttl));
        let sum_rates = sum.rates(minimum);
        out["cluster"] = json!({
            "index": m.epoch,
            "nodes": nodes,
            "sum": counts_json(&sum),
            "failure_rate": rate(sum_rates.map(|r| r.failure_rate)),
            "slow_call_rate": rate(sum_rates.map(|r| r.slow_call_rate)),
        });
    }
    out
}

/// The status document: every breaker.
pub fn status(cb: &mut CircuitBreaker) -> Value {
    let breakers: Vec<Value> = (0..cb.breakers.len()).map(|i| breaker(cb, i)).collect();
    json!({
        "node": cb.node,
        "breakers": breakers,
        "log": {
            "proposed": cb.log.proposed,
            "applied": cb.log.applied,
            "reports_sent": cb.log.reports_sent,
            "reports_heard": cb.log.reports_heard,
        },
    })
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values are names checked at load (`A-Z a-z 0-9 . _ -`) and
/// state names, so they need no escaping.
pub fn prometheus(cb: &mut CircuitBreaker) -> String {
    let mut out = String::with_capacity(4096);
    let now = timers::now_ms();
    let names: Vec<String> = cb.upstreams.iter().map(|u| u.name.clone()).collect();

    family(
        &mut out,
        "plexus_cb_state",
        "gauge",
        "1 for the breaker's state, 0 for the others.",
    );
    for (name, b) in names.iter().zip(&cb.breakers) {
        for s in State::ALL {
            let _ = writeln!(
                out,
                "plexus_cb_state{{breaker=\"{name}\",state=\"{}\"}} {}",
                s.name(),
                u8::from(b.m.state == s)
            );
        }
    }
    family(
        &mut out,
        "plexus_cb_calls_total",
        "counter",
        "Calls that reached an outcome, by kind (slow ones included).",
    );
    for (name, b) in names.iter().zip(&cb.breakers) {
        let t = &b.m.totals;
        for (kind, n) in [
            ("successful", t.successful + t.slow_successful),
            ("failed", t.failed + t.slow_failed),
            ("ignored", t.ignored),
        ] {
            let _ = writeln!(
                out,
                "plexus_cb_calls_total{{breaker=\"{name}\",kind=\"{kind}\"}} {n}"
            );
        }
    }
    family(
        &mut out,
        "plexus_cb_slow_calls_total",
        "counter",
        "Calls longer than slow_call_duration_threshold, by kind.",
    );
    for (name, b) in names.iter().zip(&cb.breakers) {
        let t = &b.m.totals;
        for (kind, n) in [("successful", t.slow_successful), ("failed", t.slow_failed)] {
            let _ = writeln!(
                out,
                "plexus_cb_slow_calls_total{{breaker=\"{name}\",kind=\"{kind}\"}} {n}"
            );
        }
    }
    family(
        &mut out,
        "plexus_cb_not_permitted_calls_total",
        "counter",
        "Calls refused without reaching the upstream.",
    );
    for (name, b) in names.iter().zip(&cb.breakers) {
        let _ = writeln!(
            out,
            "plexus_cb_not_permitted_calls_total{{breaker=\"{name}\"}} {}",
            b.m.totals.not_permitted
        );
    }
    family(
        &mut out,
        "plexus_cb_call_duration_seconds",
        "summary",
        "Time from sending a call to its outcome (millisecond resolution), by kind.",
    );
    for (name, b) in names.iter().zip(&cb.breakers) {
        let t = &b.m.totals;
        for (k, (kind, n)) in [
            ("successful", t.successful + t.slow_successful),
            ("failed", t.failed + t.slow_failed),
            ("ignored", t.ignored),
        ]
        .into_iter()
        .enumerate()
        {
            let labels = format!("breaker=\"{name}\",kind=\"{kind}\"");
            let _ = writeln!(
                out,
                "plexus_cb_call_duration_seconds_sum{{{labels}}} {}",
                t.duration_ms[k] as f64 / 1000.0
            );
            let _ = writeln!(out, "plexus_cb_call_duration_seconds_count{{{labels}}} {n}");
        }
    }
    family(
        &mut out,
        "plexus_cb_transitions_total",
        "counter",
        "Transitions of the breaker here, by state left and state entered.",
    );
    for (name, b) in names.iter().zip(&cb.breakers) {
        for ((from, to), n) in &b.m.transitions {
            let _ = writeln!(
                out,
                "plexus_cb_transitions_total{{breaker=\"{name}\",from=\"{}\",to=\"{}\"}} {n}",
                from.name(),
                to.name()
            );
        }
    }
    type Gauge = fn(&mut crate::breaker::Breaker, u64) -> String;
    let gauges: [(&str, &str, Gauge); 5] = [
        (
            "plexus_cb_failure_rate",
            "Failures per hundred calls in this node's window; -1 below minimum_number_of_calls.",
            |b, now| {
                let c = b.counts(now);
                rate(c.rates(b.rules.minimum_calls()).map(|r| r.failure_rate)).to_string()
            },
        ),
        (
            "plexus_cb_slow_call_rate",
            "Slow calls per hundred calls in this node's window; -1 below minimum_number_of_calls.",
            |b, now| {
                let c = b.counts(now);
                rate(c.rates(b.rules.minimum_calls()).map(|r| r.slow_call_rate)).to_string()
            },
        ),
        (
            "plexus_cb_buffered_calls",
            "Calls in this node's window.",
            |b, now| b.counts(now).calls.to_string(),
        ),
        (
            "plexus_cb_attempts",
            "Openings in a row; the wait in the open state grows with them.",
            |b, _| b.m.attempts.to_string(),
        ),
        (
            "plexus_cb_half_open_at_seconds",
            "OPEN: when the wait is over (Unix time); 0 in the other states.",
            |b, _| {
                let at = if b.m.state == State::Open {
                    b.m.open_until_ms
                } else {
                    0
                };
                (at as f64 / 1000.0).to_string()
            },
        ),
    ];
    for (metric, help, value) in gauges {
        family(&mut out, metric, "gauge", help);
        for (name, b) in names.iter().zip(cb.breakers.iter_mut()) {
            let _ = writeln!(out, "{metric}{{breaker=\"{name}\"}} {}", value(b, now));
        }
    }
    if cb.any_cluster() {
        let mono = timers::monotonic_ms();
        let ttl = cb.report_ttl();
        let mut sums = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let b = &mut cb.breakers[i];
            if b.scope != Scope::Cluster {
                continue;
            }
            let sum = b.counts(now).plus(cb.peers.sum(name, b.m.epoch, mono, ttl));
            let r = rate(sum.rates(b.rules.minimum_calls()).map(|r| r.failure_rate));
            sums.push((name, sum.calls, r));
        }
        family(
            &mut out,
            "plexus_cb_cluster_buffered_calls",
            "gauge",
            "Cluster scope: calls in the windows of every node that reported, summed.",
        );
        for (name, calls, _) in &sums {
            let _ = writeln!(
                out,
                "plexus_cb_cluster_buffered_calls{{breaker=\"{name}\"}} {calls}"
            );
        }
        family(
            &mut out,
            "plexus_cb_cluster_failure_rate",
            "gauge",
            "Cluster scope: failures per hundred calls over every node's window; -1 below the minimum.",
        );
        for (name, _, r) in &sums {
            let _ = writeln!(
                out,
                "plexus_cb_cluster_failure_rate{{breaker=\"{name}\"}} {r}"
            );
        }
        family(
            &mut out,
            "plexus_cb_log_entries_total",
            "counter",
            "Cluster scope: transitions this node proposed, and entries applied here.",
        );
        let _ = writeln!(
            out,
            "plexus_cb_log_entries_total{{kind=\"proposed\"}} {}",
            cb.log.proposed
        );
        let _ = writeln!(
            out,
            "plexus_cb_log_entries_total{{kind=\"applied\"}} {}",
            cb.log.applied
        );
        family(
            &mut out,
            "plexus_cb_reports_total",
            "counter",
            "Cluster scope: count reports this node sent and heard.",
        );
        let _ = writeln!(
            out,
            "plexus_cb_reports_total{{direction=\"sent\"}} {}",
            cb.log.reports_sent
        );
        let _ = writeln!(
            out,
            "plexus_cb_reports_total{{direction=\"heard\"}} {}",
            cb.log.reports_heard
        );
    }
    out
}
