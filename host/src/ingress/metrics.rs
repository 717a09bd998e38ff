//! `GET /metrics`: the node's counters, gauges and histograms in the
//! Prometheus text format.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;

use super::{Resp, limits};
use crate::node::Node;
use crate::runtime::actor::PluginStatus;
use crate::runtime::metrics::VersionMetrics;

/// Appends the `# HELP` and `# TYPE` lines that open a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub(super) fn metrics(node: &Arc<Node>, conns: &limits::Connections) -> Resp {
    use std::fmt::Write;
    let mut out = String::new();
    let plugins = node.plugins();
    let all = node.plugin_metrics();
    // Counts and latencies by the version that ran; gauges by the version
    // running now.
    type Counter = (&'static str, &'static str, fn(&VersionMetrics) -> u64);
    let counters: [Counter; 4] = [
        (
            "plexus_plugin_requests_total",
            "Client requests handled.",
            |m| m.requests,
        ),
        (
            "plexus_plugin_errors_total",
            "Hook calls that failed.",
            |m| m.errors,
        ),
        (
            "plexus_plugin_traps_total",
            "Hook calls that trapped.",
            |m| m.traps,
        ),
        (
            "plexus_plugin_restarts_total",
            "Instances restarted after a failure.",
            |m| m.restarts,
        ),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        for (s, m) in &all {
            for (version, v) in &m.versions {
                let _ = writeln!(
                    out,
                    "{name}{{plugin=\"{}\",version=\"{version}\"}} {}",
                    s.name,
                    value(v)
                );
            }
        }
    }
    type Gauge = (&'static str, &'static str, fn(&PluginStatus) -> f64);
    let gauges: [Gauge; 2] = [
        (
            "plexus_plugin_mailbox_depth",
            "Mailbox items waiting.",
            |s| s.mailbox_depth as f64,
        ),
        (
            "plexus_plugin_last_swap_pause_seconds",
            "Pause of the last hot swap.",
            |s| s.last_swap_pause_us.map_or(0.0, |us| us as f64 / 1e6),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        for s in &plugins {
            let _ = writeln!(
                out,
                "{name}{{plugin=\"{}\",version=\"{}\"}} {}",
                s.name,
                s.version,
                value(s)
            );
        }
    }
    family(
        &mut out,
        "plexus_plugin_call_duration_seconds",
        "histogram",
        "Hook call duration, including its storage commit.",
    );
    for (s, m) in &all {
        for (version, v) in &m.versions {
            for (hook, h) in &v.calls {
                let labels = format!(
                    "plugin=\"{}\",version=\"{version}\",hook=\"{hook}\"",
                    s.name
                );
                h.render(&mut out, "plexus_plugin_call_duration_seconds", &labels);
            }
        }
    }
    family(
        &mut out,
        "plexus_plugin_swap_pause_seconds",
        "histogram",
        "Mailbox pause of hot swaps.",
    );
    for (s, m) in &all {
        m.swap_pause.render(
            &mut out,
            "plexus_plugin_swap_pause_seconds",
            &format!("plugin=\"{}\"", s.name),
        );
    }
    let log = node.services().log.clone();
    let stats = log.stats();
    let gauges: [(&str, &str, &str, u64); 7] = [
        (
            "plexus_consensus_commit_index",
            "gauge",
            "Last committed log index.",
            node.commit_index(),
        ),
        (
            "plexus_consensus_term",
            "gauge",
            "Current term.",
            log.term(),
        ),
        (
            "plexus_consensus_is_leader",
            "gauge",
            "Whether this node leads.",
            u64::from(log.leader().as_deref() == Some(node.id())),
        ),
        (
            "plexus_consensus_proposals_total",
            "counter",
            "Entries proposed and committed.",
            stats.proposals,
        ),
        (
            "plexus_consensus_log_writes_total",
            "counter",
            "Durable log writes (fsyncs); proposals per write is the batching factor.",
            stats.writes,
        ),
        (
            "plexus_consensus_snapshots_built_total",
            "counter",
            "Snapshots built here (on a single node: compactions); each compacts the plugins' streams behind their state.",
            stats.snapshots_built,
        ),
        (
            "plexus_consensus_snapshots_installed_total",
            "counter",
            "Snapshots installed from the leader.",
            stats.snapshots_installed,
        ),
    ];
    for (name, kind, help, value) in gauges {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    let name = "plexus_consensus_log_write_duration_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Durable log writes on this node, commit and fsync.",
    );
    stats.log_writes.render(&mut out, name, "");
    let name = "plexus_network_junk_total";
    family(
        &mut out,
        name,
        "counter",
        "Input dropped from the network: failed or refused peer handshakes, malformed or tampered peer frames, gossip datagrams without a valid tag.",
    );
    for j in crate::cluster::junk::sources() {
        let _ = writeln!(out, "{name}{{source=\"{}\"}} {}", j.source(), j.count());
    }
    let http: [(&str, &str, &str, u64); 3] = [
        (
            "plexus_http_connections",
            "gauge",
            "HTTP connections open now.",
            conns.open() as u64,
        ),
        (
            "plexus_http_connections_max",
            "gauge",
            "Most HTTP connections served at once (node.max_connections, lowered to fit the open-file limit).",
            conns.max() as u64,
        ),
        (
            "plexus_http_connections_refused_total",
            "counter",
            "HTTP connections refused past a cap (in all or per client address).",
            conns.refused(),
        ),
    ];
    for (name, kind, help, value) in http {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    hyper::Response::builder()
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(out)))
        .expect("static response parts are valid")
}
