//! What the balancer shows: `GET /_lb/status` as JSON, `GET /_lb/metrics`
//! in Prometheus text format. Counters are this node's; the state
//! (`in`, `ejected`, ejections, the log index of the verdict) is agreed.

use std::fmt::Write;

use plexus_sdk::timers;
use serde_json::{Value, json};

use crate::{BUCKETS_MS, Balancer, Failure, Health};

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Unknown => "unknown",
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
    }
}

/// The status document.
pub fn status(b: &Balancer) -> Value {
    let (wall, mono) = (timers::now_ms(), timers::monotonic_ms());
    let policy = b.settings.lb_policy.name();
    let (_, panic) = b.candidates(None);
    let all = b.all_series();
    let backends: Vec<Value> = (0..b.names.len())
        .map(|i| {
            let (name, weight) = &b.names[i];
            let (v, l) = (&b.view[i], &b.local[i]);
            let (requests, errors) = all
                .iter()
                .filter(|((_, n), _)| n == name)
                .fold((0, 0), |(r, e), (_, s)| {
                    (r + s.requests, e + s.errors.iter().sum::<u64>())
                });
            json!({
                "name": name,
                "target": match &b.targets[i] {
                    crate::Target::Url(u) => u.clone(),
                    crate::Target::Plugin { plugin, node } => format!("plugin:{plugin}@{node}"),
                },
                "state": if v.ejected { "ejected" } else { "in" },
                "weight": weight / 1000,
                "effective_weight": b.weight_now(i, wall) as f64 / 1000.0,
                "ejections": v.ejections,
                "reason": v.reason.map(|r| r.name()),
                "ejected_ms": v.ejected_ms,
                "until_ms": v.until_ms,
                "returned_ms": v.returned_ms,
                "index": v.index,
                "health": health_name(l.health),
                "outstanding": l.outstanding,
                "ewma_ms": l.ewma.at(mono, b.settings.ewma_decay_ms),
                "requests": requests,
                "errors": errors,
            })
        })
        .collect();
    json!({
        "node": b.node,
        "policy": policy,
        "panic": panic,
        "backends": backends,
        "verdicts": {
            "proposed_eject": b.counts.proposed_eject,
            "proposed_return": b.counts.proposed_return,
            "applied_eject": b.counts.applied_eject,
            "applied_return": b.counts.applied_return,
        },
    })
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values are names checked at load (`A-Z a-z 0-9 . _ -`), so they
/// need no escaping.
pub fn prometheus(b: &Balancer) -> String {
    let mut out = String::with_capacity(4096);
    let all = b.all_series();
    let (wall, mono) = (timers::now_ms(), timers::monotonic_ms());

    family(
        &mut out,
        "plexus_lb_requests_total",
        "counter",
        "Requests this node sent to a backend.",
    );
    for ((policy, backend), s) in &all {
        let _ = writeln!(
            out,
            "plexus_lb_requests_total{{policy=\"{policy}\",backend=\"{backend}\"}} {}",
            s.requests
        );
    }
    family(
        &mut out,
        "plexus_lb_errors_total",
        "counter",
        "Failed exchanges with a backend, by kind.",
    );
    for ((policy, backend), s) in &all {
        for (k, kind) in Failure::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "plexus_lb_errors_total{{policy=\"{policy}\",backend=\"{backend}\",kind=\"{}\"}} {}",
                kind.name(),
                s.errors[k]
            );
        }
    }
    family(
        &mut out,
        "plexus_lb_resent_total",
        "counter",
        "Requests sent to another backend after this one refused the connection.",
    );
    for ((policy, backend), s) in &all {
        let _ = writeln!(
            out,
            "plexus_lb_resent_total{{policy=\"{policy}\",backend=\"{backend}\"}} {}",
            s.resent
        );
    }
    family(
        &mut out,
        "plexus_lb_request_duration_seconds",
        "histogram",
        "Time from sending to a backend to its answer (millisecond resolution).",
    );
    for ((policy, backend), s) in &all {
        let labels = format!("policy=\"{policy}\",backend=\"{backend}\"");
        let mut cumulative = 0;
        for (k, le) in BUCKETS_MS.iter().enumerate() {
            cumulative += s.buckets[k];
            let _ = writeln!(
                out,
                "plexus_lb_request_duration_seconds_bucket{{{labels},le=\"{}\"}} {cumulative}",
                *le as f64 / 1000.0
            );
        }
        cumulative += s.buckets[BUCKETS_MS.len()];
        let _ = writeln!(
            out,
            "plexus_lb_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "plexus_lb_request_duration_seconds_sum{{{labels}}} {}",
            s.latency_sum_ms as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "plexus_lb_request_duration_seconds_count{{{labels}}} {cumulative}"
        );
    }

    type Gauge = fn(&Balancer, usize, u64, u64) -> String;
    let gauges: [(&str, &str, &str, Gauge); 7] = [
        (
            "plexus_lb_backend_in",
            "gauge",
            "1 when the backend is in by the agreed verdicts, 0 when ejected.",
            |b, i, _, _| u8::from(!b.view[i].ejected).to_string(),
        ),
        (
            "plexus_lb_ejections_total",
            "counter",
            "Ejections of the backend agreed through the log.",
            |b, i, _, _| b.view[i].ejections.to_string(),
        ),
        (
            "plexus_lb_verdict_index",
            "gauge",
            "Log index of the verdict that set the backend's state.",
            |b, i, _, _| b.view[i].index.to_string(),
        ),
        (
            "plexus_lb_backend_weight",
            "gauge",
            "The backend's weight now (lowered during slow start).",
            |b, i, wall, _| (b.weight_now(i, wall) as f64 / 1000.0).to_string(),
        ),
        (
            "plexus_lb_outstanding",
            "gauge",
            "Requests this node has in flight to the backend.",
            |b, i, _, _| b.local[i].outstanding.to_string(),
        ),
        (
            "plexus_lb_peak_ewma_seconds",
            "gauge",
            "The backend's peak EWMA latency, decayed to now.",
            |b, i, _, mono| {
                (b.local[i].ewma.at(mono, b.settings.ewma_decay_ms) / 1000.0).to_string()
            },
        ),
        (
            "plexus_lb_healthy",
            "gauge",
            "1 when this node's health checks pass, 0 when they fail, -1 before a verdict.",
            |b, i, _, _| {
                match b.local[i].health {
                    Health::Healthy => "1",
                    Health::Unhealthy => "0",
                    Health::Unknown => "-1",
                }
                .to_string()
            },
        ),
    ];
    for (name, kind, help, value) in gauges {
        family(&mut out, name, kind, help);
        for (i, (backend, _)) in b.names.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{backend=\"{backend}\"}} {}",
                value(b, i, wall, mono)
            );
        }
    }
    family(
        &mut out,
        "plexus_lb_health_checks_total",
        "counter",
        "Health checks by result.",
    );
    for (i, (backend, _)) in b.names.iter().enumerate() {
        let l = &b.local[i];
        let _ = writeln!(
            out,
            "plexus_lb_health_checks_total{{backend=\"{backend}\",result=\"pass\"}} {}",
            l.checks_passed
        );
        let _ = writeln!(
            out,
            "plexus_lb_health_checks_total{{backend=\"{backend}\",result=\"fail\"}} {}",
            l.checks_failed
        );
    }
    let (_, panic) = b.candidates(None);
    let policy = b.settings.lb_policy.name();
    family(
        &mut out,
        "plexus_lb_panic",
        "gauge",
        "1 while too few backends are in and all take requests.",
    );
    let _ = writeln!(
        out,
        "plexus_lb_panic{{policy=\"{policy}\"}} {}",
        u8::from(panic)
    );
    family(
        &mut out,
        "plexus_lb_panic_requests_total",
        "counter",
        "Requests spread in panic.",
    );
    let _ = writeln!(
        out,
        "plexus_lb_panic_requests_total {}",
        b.counts.panic_requests
    );
    family(
        &mut out,
        "plexus_lb_verdicts_proposed_total",
        "counter",
        "Verdicts this node proposed to the log.",
    );
    let _ = writeln!(
        out,
        "plexus_lb_verdicts_proposed_total{{verdict=\"eject\"}} {}",
        b.counts.proposed_eject
    );
    let _ = writeln!(
        out,
        "plexus_lb_verdicts_proposed_total{{verdict=\"return\"}} {}",
        b.counts.proposed_return
    );
    family(
        &mut out,
        "plexus_lb_verdicts_applied_total",
        "counter",
        "Verdicts applied here that changed a backend's state.",
    );
    let _ = writeln!(
        out,
        "plexus_lb_verdicts_applied_total{{verdict=\"eject\"}} {}",
        b.counts.applied_eject
    );
    let _ = writeln!(
        out,
        "plexus_lb_verdicts_applied_total{{verdict=\"return\"}} {}",
        b.counts.applied_return
    );
    out
}
