//! The operator's page: `GET /ui`, one HTML page with its script and
//! styles inline, embedded in the binary; and `GET /v1/ui/state`, the JSON
//! it polls every second and a half.
//!
//! The state needs no token, as `/metrics` does not: it is read-only and
//! holds no secret (no plugin config, no cluster secret, no token). The
//! page's swap and unload buttons send the token the operator enters to
//! the admin API; without it the page only shows.
//!
//! Each node knows its own Raft figures; the leader also knows how far
//! each follower's log matches its own. So that any member's page shows
//! every member, the state asks each other member for its summary over
//! the cluster's own links ([`Node::peer_summaries`]), within
//! [`PEER_TIMEOUT`]; a member that does not answer is shown as such.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use serde_json::{Value, json};

use super::{IngressOptions, Resp};
use crate::node::{Node, NodeSummary};
use crate::runtime::actor::PluginStatus;
use crate::runtime::metrics::{Histogram, PluginMetrics};

/// The page.
const PAGE: &str = include_str!("ui.html");

/// How long the state waits for another member's summary.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1000);

/// `GET /ui`.
pub(super) fn page() -> Resp {
    hyper::Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .header("cache-control", "no-cache")
        // The page loads nothing from elsewhere and talks only to this
        // node; no other site may frame its admin buttons.
        .header(
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src data:; connect-src 'self'; frame-ancestors 'none'",
        )
        .body(Full::new(Bytes::from_static(PAGE.as_bytes())))
        .expect("static response parts are valid")
}

/// `GET /v1/ui/state`.
pub(super) async fn state(node: &Arc<Node>, opts: &IngressOptions) -> Resp {
    let peers = node.peer_summaries(PEER_TIMEOUT).await;
    super::json(
        StatusCode::OK,
        &state_of(node, &peers, opts.admin_token.is_some()),
    )
}

/// The state the page shows: this node's view of the cluster, every
/// member's summary (`peers` as the other members answered), this node's
/// plugins with their figures, its recent swaps and failures (newest
/// first).
pub(crate) fn state_of(
    node: &Node,
    peers: &[(String, Result<NodeSummary, String>)],
    admin: bool,
) -> Value {
    let services = node.services();
    let (epoch, members) = services.view.snapshot();
    let members: Vec<Value> = members
        .iter()
        .map(|m| json!({ "id": m.id, "state": super::admin::member_state(m.state), "voter": m.voter }))
        .collect();
    let own = node.summary();
    let mut summaries: Vec<(String, Result<NodeSummary, String>)> = vec![(own.id.clone(), Ok(own))];
    summaries.extend(peers.iter().cloned());
    summaries.sort_by(|a, b| a.0.cmp(&b.0));
    let nodes: Vec<Value> = summaries
        .iter()
        .map(|(id, s)| match s {
            Ok(s) => {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["reachable"] = true.into();
                v["self"] = (id == node.id()).into();
                v
            }
            Err(e) => json!({ "id": id, "reachable": false, "self": false, "error": e }),
        })
        .collect();
    // Every member's version of each plugin, to mark those that differ.
    let mut versions: BTreeMap<&str, BTreeMap<&str, Option<&str>>> = BTreeMap::new();
    for (id, s) in &summaries {
        if let Ok(s) = s {
            for p in &s.plugins {
                versions
                    .entry(p.name.as_str())
                    .or_default()
                    .insert(id, Some(&p.version));
            }
        }
    }
    let reachable: Vec<&str> = summaries
        .iter()
        .filter(|(_, s)| s.is_ok())
        .map(|(id, _)| id.as_str())
        .collect();
    let plugins: Vec<Value> = node
        .plugin_metrics()
        .iter()
        .map(|(status, metrics)| {
            let mut v = plugin(status, metrics);
            let here = versions.get(status.name.as_str());
            let differs: Vec<Value> = reachable
                .iter()
                .filter_map(|id| {
                    let theirs = here.and_then(|h| h.get(id).copied()).flatten();
                    (theirs != Some(status.version.as_str()))
                        .then(|| json!({ "node": id, "version": theirs }))
                })
                .collect();
            v["differs"] = differs.into();
            v
        })
        .collect();
    let mut swaps = services.journal.swaps();
    swaps.reverse();
    let mut errors = services.journal.errors();
    errors.reverse();
    json!({
        "node": node.id(),
        "at_ms": crate::runtime::journal::now_ms(),
        "admin": admin,
        "leader": services.log.leader(),
        "term": services.log.term(),
        "membership_epoch": epoch,
        "members": members,
        "nodes": nodes,
        "plugins": plugins,
        "swaps": swaps,
        "errors": errors,
    })
}

/// Microseconds of a histogram's quantile.
fn micros(h: &Histogram, q: f64) -> Option<u64> {
    h.quantile(q).map(|s| (s * 1e6).round() as u64)
}

/// One plugin of this node: its status without its config, and the
/// latency of the running version's hook calls.
fn plugin(s: &PluginStatus, m: &PluginMetrics) -> Value {
    let running = m.versions.iter().find(|(v, _)| *v == s.version);
    let mut all = Histogram::default();
    let mut hooks = Vec::new();
    for (hook, h) in running.map(|(_, v)| &v.calls).into_iter().flatten() {
        all.merge(h);
        hooks.push(json!({
            "hook": hook,
            "calls": h.count(),
            "p50_us": micros(h, 0.5),
            "p99_us": micros(h, 0.99),
        }));
    }
    json!({
        "name": s.name,
        "version": s.version,
        "state": s.state,
        "last_error": s.last_error,
        "reload_error": s.reload_error,
        "loaded_at_ms": s.loaded_at_ms,
        "requests": s.requests,
        "errors": s.errors,
        "traps": s.traps,
        "restarts": s.restarts,
        "swaps": s.swaps,
        "mailbox_depth": s.mailbox_depth,
        "last_swap_pause_us": s.last_swap_pause_us,
        "swapped_at_index": s.swapped_at_index,
        "calls": all.count(),
        "p50_us": micros(&all, 0.5),
        "p99_us": micros(&all, 0.99),
        "hooks": hooks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::raft::RaftFigures;
    use crate::node::{LoadSpec, NodeOptions, PluginBrief};
    use crate::runtime::actor::RunState;

    async fn node_with_kv() -> (tempfile::TempDir, Arc<Node>) {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(NodeOptions {
            id: "node-1".into(),
            data_dir: dir.path().to_path_buf(),
            call_limits: Default::default(),
            metadata: Vec::new(),
            max_plugin_instances: 16,
            clock: Arc::new(crate::primitives::timers::SystemClock),
        })
        .unwrap();
        node.load(LoadSpec {
            name: "kv".into(),
            component: Arc::from(crate::bundled::get("replicated-kv").unwrap()),
            capabilities: [
                crate::runtime::Capability::Consensus,
                crate::runtime::Capability::Storage,
            ]
            .into(),
            limits: Default::default(),
            config_json: r#"{"secret_looking": "do-not-show"}"#.into(),
            access: Default::default(),
        })
        .await
        .unwrap();
        (dir, node)
    }

    fn peer(id: &str, kv_version: &str) -> (String, Result<NodeSummary, String>) {
        let summary = NodeSummary {
            id: id.into(),
            raft: RaftFigures {
                role: "follower".into(),
                term: 2,
                leader: Some("node-1".into()),
                last_log_index: Some(9),
                applied_index: Some(9),
                snapshot_index: None,
                quorum_ack_ms: None,
                matched: Vec::new(),
            },
            commit_index: 9,
            plugins: vec![PluginBrief {
                name: "kv".into(),
                version: kv_version.into(),
                state: RunState::Running,
            }],
        };
        (id.into(), Ok(summary))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn state_shows_every_member_and_this_nodes_plugins_without_config() {
        let (_dir, node) = node_with_kv().await;
        let kv = node.plugin("kv").unwrap().version;
        node.swap_by(
            "kv",
            Arc::from(crate::bundled::get("leader-election").unwrap()),
            None,
            "admin API",
        )
        .await
        .unwrap_err();
        let peers = vec![
            peer("node-2", &kv),
            peer("node-3", "0123456789ab"),
            (
                "node-4".to_string(),
                Err("peer `node-4` unreachable".into()),
            ),
        ];
        let v = state_of(&node, &peers, true);
        assert_eq!(v["node"], "node-1");
        assert_eq!(v["admin"], true);
        assert_eq!(v["leader"], "node-1");
        assert_eq!(v["members"][0]["id"], "node-1");
        assert_eq!(v["members"][0]["state"], "alive");
        let nodes = v["nodes"].as_array().unwrap();
        let ids: Vec<&str> = nodes.iter().map(|n| n["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["node-1", "node-2", "node-3", "node-4"]);
        assert_eq!(nodes[0]["self"], true);
        assert_eq!(nodes[0]["raft"]["role"], "leader");
        assert_eq!(nodes[1]["raft"]["role"], "follower");
        assert_eq!(nodes[1]["plugins"][0]["version"], kv.as_str());
        assert_eq!(nodes[3]["reachable"], false);
        assert!(nodes[3]["error"].as_str().unwrap().contains("unreachable"));

        let p = &v["plugins"][0];
        assert_eq!(p["name"], "kv");
        assert_eq!(p["version"], kv.as_str());
        assert_eq!(p["state"], "running");
        for field in [
            "requests",
            "errors",
            "traps",
            "restarts",
            "swaps",
            "mailbox_depth",
            "calls",
        ] {
            assert!(p[field].is_u64(), "{field}: {p}");
        }
        // init ran: its latency is there.
        assert!(p["p50_us"].is_u64() && p["p99_us"].is_u64(), "{p}");
        assert!(
            p["hooks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["hook"] == "init")
        );
        // Only node-3 runs another version.
        assert_eq!(
            p["differs"],
            json!([{ "node": "node-3", "version": "0123456789ab" }])
        );
        // No config, here or anywhere in the state.
        assert!(!v.to_string().contains("do-not-show"), "{v}");

        // The refused swap is in the history, with who asked.
        let swap = &v["swaps"][0];
        assert_eq!(swap["plugin"], "kv");
        assert_eq!(swap["from"], kv.as_str());
        assert_eq!(swap["to"], Value::Null);
        assert_eq!(swap["scope"], "local");
        assert_eq!(swap["by"], "admin API");
        assert!(swap["error"].is_string(), "{swap}");
        assert!(v["errors"].as_array().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_swap_and_a_failure_are_recorded_newest_first() {
        let (_dir, node) = node_with_kv().await;
        let kv = crate::bundled::get("replicated-kv").unwrap();
        // The same code with a custom section appended: a new version.
        let mut next = kv.to_vec();
        next.extend_from_slice(&[0, 3, 1, b'x', 1]);
        let report = node
            .swap_by("kv", Arc::from(next), None, "config file")
            .await
            .unwrap();
        node.services().journal.error("kv", "on-request: panicked");
        node.services().journal.error("kv", "on-timer: panicked");
        let v = state_of(&node, &[], false);
        assert_eq!(v["admin"], false);
        assert_eq!(v["plugins"][0]["version"], report.to.as_str());
        assert_eq!(v["plugins"][0]["swaps"], 1);
        assert!(v["plugins"][0]["last_swap_pause_us"].is_u64());
        let swap = &v["swaps"][0];
        assert_eq!(swap["to"], report.to.as_str());
        assert_eq!(swap["by"], "config file");
        assert_eq!(swap["error"], Value::Null);
        assert!(swap["at_ms"].as_u64().unwrap() > 0);
        assert_eq!(v["errors"][0]["message"], "on-timer: panicked");
        assert_eq!(v["errors"][1]["message"], "on-request: panicked");
        assert_eq!(v["plugins"][0]["differs"], json!([]));
    }

    #[test]
    fn the_page_polls_the_state_and_sends_the_token_only_to_the_admin_api() {
        assert!(PAGE.contains("/v1/ui/state"));
        assert!(PAGE.contains("/v1/admin/"));
        assert!(!PAGE.contains("http://") && !PAGE.contains("https://"));
    }
}
