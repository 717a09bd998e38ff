//! The `relay` plugin on its real `.wasm`: every kind of call the
//! contract has — forward, messaging call, plugin call, outbound HTTP —
//! working and failing as the WIT documents, in one process and across
//! three `plexus` processes; and a component of the earlier contract
//! refused in plain words.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use plexus::runtime::actor::{Access, PluginLimits};
use plexus::runtime::bindings::pattern::Method;
use plexus_tests::backend::Backend;
use plexus_tests::{
    Processes, TestNode, body_json, caps, cluster_node_config, http, http_full, wasm,
};

fn access(plugins: &[&str], origins: &[String]) -> Access {
    Access {
        plugins: Arc::new(
            plugins
                .iter()
                .map(|p| p.to_string())
                .collect::<BTreeSet<_>>(),
        ),
        outbound: Arc::new(origins.iter().map(|o| o.parse().unwrap()).collect()),
    }
}

async fn relay_node(origins: &[String], config: &str) -> TestNode {
    let n = TestNode::new();
    n.load_with(
        "relay",
        "relay",
        caps(&["messaging", "plugins", "outbound-http"]),
        PluginLimits {
            quota: plexus::primitives::CallQuota {
                max_in_flight: 64,
                max_response_bytes: 1000,
            },
            ..PluginLimits::default()
        },
        config,
        access(&["peer", "chaos"], origins),
    )
    .await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_reaches_only_listed_origins_and_reports_each_failure() {
    let backend = Backend::start().await;
    let n = relay_node(&[backend.origin()], r#"{"timeout_ms": 500}"#).await;
    let fetch = |path: String| {
        let n = &n;
        async move {
            n.call("relay", Method::Get, &format!("/fetch?url={path}"), b"")
                .await
        }
    };
    let ok = fetch(format!("{}/echo/x?q=1", backend.origin())).await;
    assert_eq!(ok.status, 200);
    assert_eq!(String::from_utf8_lossy(&ok.body), "GET /echo/x?q=1 ");

    // A host not on the list: definite, nothing sent, the origin named.
    let served = backend.served();
    let other = fetch("http://127.0.0.2:9/echo".into()).await;
    let body = body_json(&other);
    assert_eq!(
        (other.status, body["kind"].as_str()),
        (502, Some("not-allowed")),
        "{body}"
    );
    assert_eq!(body["error"], "http://127.0.0.2:9");
    assert_eq!(backend.served(), served);

    // The backend too slow for the call's deadline: unknown outcome.
    let slow = fetch(format!("{}/slow?ms=3000", backend.origin())).await;
    assert_eq!(
        (slow.status, body_json(&slow)["kind"].as_str()),
        (504, Some("timeout"))
    );

    // A response over `max_response_bytes` (1000 here) is dropped.
    let big = fetch(format!("{}/big?bytes=5000", backend.origin())).await;
    let body = body_json(&big);
    assert_eq!(
        (big.status, body["kind"].as_str()),
        (502, Some("too-large")),
        "{body}"
    );
    let fits = fetch(format!("{}/big?bytes=1000", backend.origin())).await;
    assert_eq!((fits.status, fits.body.len()), (200, 1000));

    // The backend dies mid-call: it had the request, the outcome is unknown.
    let died = fetch(format!("{}/die", backend.origin())).await;
    let body = body_json(&died);
    assert_eq!(
        (died.status, body["kind"].as_str()),
        (504, Some("broken")),
        "{body}"
    );

    // Nothing listens on the port: refused before sending, definite.
    let port = plexus_tests::free_port();
    let n2 = relay_node(&[format!("http://127.0.0.1:{port}")], "{}").await;
    let refused = n2
        .call(
            "relay",
            Method::Get,
            &format!("/fetch?url=http://127.0.0.1:{port}/"),
            b"",
        )
        .await;
    let body = body_json(&refused);
    assert_eq!(
        (refused.status, body["kind"].as_str()),
        (502, Some("connect")),
        "{body}"
    );

    let stats = body_json(&n.call("relay", Method::Get, "/stats", b"").await);
    assert_eq!(stats["calls"], stats["outcomes"], "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_calls_reach_granted_plugins_only_and_a_trapping_callee_fails_definitely() {
    let n = relay_node(&[], "{}").await;
    let all = caps(&["messaging", "plugins", "outbound-http"]);
    n.load_with(
        "peer",
        "relay",
        all,
        PluginLimits::default(),
        "{}",
        Access::default(),
    )
    .await;
    n.load(
        "chaos",
        "chaos",
        plexus_tests::all_caps(),
        PluginLimits::default(),
        "{}",
    )
    .await;
    n.load(
        "kv",
        "replicated-kv",
        caps(&["consensus", "storage", "log"]),
        PluginLimits::default(),
        "{}",
    )
    .await;

    let r = n
        .call("relay", Method::Post, "/call/peer/echo/a?x=1", b"hi")
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = body_json(&r);
    assert_eq!(
        body["source"],
        serde_json::json!({ "plugin": "relay", "node": "node-1" })
    );
    assert_eq!(
        (body["path"].as_str(), body["body"].as_str()),
        (Some("/a"), Some("hi"))
    );

    let denied = n.call("relay", Method::Get, "/call/kv/kv/a", b"").await;
    assert_eq!(
        (denied.status, body_json(&denied)["kind"].as_str()),
        (403, Some("not-allowed"))
    );
    assert_eq!(
        n.node.plugin("kv").unwrap().requests,
        0,
        "the refused call reached kv"
    );

    let trapped = n.call("relay", Method::Post, "/call/chaos/trap", b"").await;
    let body = body_json(&trapped);
    assert_eq!(
        (trapped.status, body["kind"].as_str()),
        (502, Some("failed")),
        "{body}"
    );
    assert!(
        body["error"].as_str().is_some_and(|e| e
            .contains("on-request: panicked at plugins/chaos/src/lib.rs:")
            && e.ends_with(": chaos: trap in on-request")),
        "{body}"
    );
    // The caller is unharmed and serves on; the callee restarts.
    assert_eq!(n.node.plugin("relay").unwrap().traps, 0);
    let again = n.call("relay", Method::Get, "/echo/still", b"").await;
    assert_eq!(again.status, 200);
    n.wait_ok("chaos", "/ping", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_of_contract_0_1_is_refused_in_plain_words_and_nothing_changes() {
    let n = TestNode::new();
    let old: Arc<[u8]> = Arc::from(
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/replicated-kv-0.1.0.wasm"
        ))
        .unwrap(),
    );
    let spec = |component| plexus::node::LoadSpec {
        name: "kv".into(),
        component,
        capabilities: caps(&["consensus", "storage", "log"]),
        limits: PluginLimits::default(),
        config_json: "{}".into(),
        access: Access::default(),
    };
    let err = n
        .node
        .load(spec(old.clone()))
        .await
        .unwrap_err()
        .to_string();
    for part in [
        "plexus:cluster@0.1.0",
        "plexus:cluster@0.2.0",
        "rebuild the plugin with plexus-sdk 0.2",
    ] {
        assert!(err.contains(part), "missing {part:?} in: {err}");
    }
    assert!(n.node.plugins().is_empty());

    // A swap to it is refused before anything is switched.
    n.node.load(spec(wasm("replicated-kv"))).await.unwrap();
    n.call("kv", Method::Put, "/kv/a", b"1").await;
    let before = n.node.plugin("kv").unwrap().version;
    let err = n.node.swap("kv", old, None).await.unwrap_err().to_string();
    assert!(err.contains("plexus:cluster@0.1.0"), "{err}");
    assert_eq!(n.node.plugin("kv").unwrap().version, before);
    let r = n.call("kv", Method::Get, "/kv/a", b"").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"1"[..]));
}

/// Three `plexus` processes each running `relay` and `peer`.
async fn cluster() -> Processes {
    let plugins = r#"
[[plugins]]
name = "relay"
component = "bundled:relay"
capabilities = ["messaging", "plugins", "outbound-http"]
allowed_plugins = ["peer"]

[[plugins]]
name = "peer"
component = "bundled:relay"
capabilities = ["messaging", "plugins", "outbound-http"]
"#;
    Processes::start(3, |i, http, peer| {
        cluster_node_config(i, http, peer, "", plugins)
    })
    .await
}

/// Retries `f` until it answers 200 (the members find each other first).
async fn until_ok<F, Fut>(mut f: F) -> (u16, Vec<(String, String)>, Vec<u8>)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(u16, Vec<(String, String)>, Vec<u8>)>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = f().await;
        if let Ok(r) = &r
            && r.0 == 200
        {
            return r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never answered 200: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_across_three_processes_forward_ask_and_call_between_nodes() {
    let nodes = cluster().await;
    let a = nodes.http[0];

    // Forward: sent to node-1, answered by node-2's instance, intact.
    let (status, headers, body) = until_ok(|| {
        http_full(
            a,
            "PUT",
            "/v1/plugins/relay/on/node-2/k?y=1",
            &[("x-client", "c1")],
            b"payload",
        )
    })
    .await;
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "x-answered-by" && v == "node-2"),
        "{headers:?}"
    );
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["node"], "node-2");
    assert_eq!(body["source"], serde_json::json!({ "forwarded": "node-1" }));
    assert_eq!(
        (body["method"].as_str(), body["query"].as_str()),
        (Some("PUT"), Some("y=1"))
    );
    assert_eq!(body["body"], "payload");
    let sent: Vec<(String, String)> = serde_json::from_value(body["headers"].clone()).unwrap();
    for want in [("x-client", "c1"), ("x-relayed-by", "node-1")] {
        assert!(
            sent.iter().any(|(k, v)| (k.as_str(), v.as_str()) == want),
            "{sent:?}"
        );
    }

    // A forward to a node that is not a member: 502, nothing handled.
    let (status, body) = http(a, "GET", "/v1/plugins/relay/on/node-9/k", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));

    // messaging.call: node-3's on-message answers through node-1.
    let (_, _, body) =
        until_ok(|| http_full(a, "POST", "/v1/plugins/relay/ask/node-3", &[], b"ping")).await;
    assert_eq!(String::from_utf8_lossy(&body), "node-3:ping");

    // plugins.call on another node: `peer` on node-2 sees relay@node-1.
    let (_, _, body) = until_ok(|| {
        http_full(
            a,
            "POST",
            "/v1/plugins/relay/call/peer/echo/z?node=node-2",
            &[],
            b"x",
        )
    })
    .await;
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["node"], "node-2");
    assert_eq!(
        body["source"],
        serde_json::json!({ "plugin": "relay", "node": "node-1" })
    );
}

/// Messages from one node to another arrive in the order sent, even when
/// two senders interleave at the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_between_a_pair_of_nodes_arrive_in_the_order_sent() {
    let nodes = cluster().await;
    let (a, b, c) = (nodes.http[0], nodes.http[1], nodes.http[2]);
    const N: u64 = 300;
    // Once the members know each other, both bursts go out at once.
    until_ok(|| http_full(a, "POST", "/v1/plugins/relay/burst/node-3?n=0", &[], b"")).await;
    until_ok(|| http_full(b, "POST", "/v1/plugins/relay/burst/node-3?n=0", &[], b"")).await;
    let burst = format!("/v1/plugins/relay/burst/node-3?n={N}");
    let (ra, rb) = tokio::join!(
        http(a, "POST", &burst, &[], b""),
        http(b, "POST", &burst, &[], b"")
    );
    assert_eq!((ra.unwrap().0, rb.unwrap().0), (200, 200));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let seen: Vec<(String, u64)> = loop {
        let (_, body) = http(c, "GET", "/v1/plugins/relay/seen", &[], b"")
            .await
            .unwrap();
        let seen: Vec<(String, u64)> = serde_json::from_slice(&body).unwrap();
        if seen.len() as u64 >= 2 * N {
            break seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} messages arrived",
            seen.len(),
            2 * N
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for sender in ["node-1", "node-2"] {
        let order: Vec<u64> = seen
            .iter()
            .filter(|(from, _)| from == sender)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(order, (0..N).collect::<Vec<_>>(), "from {sender}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_are_answered_by_a_later_hook_and_504_at_a_swap() {
    let n = Arc::new(relay_node(&[], "{}").await);
    let all = caps(&["messaging", "plugins", "outbound-http"]);
    n.load_with(
        "peer",
        "relay",
        all,
        PluginLimits::default(),
        "{}",
        Access::default(),
    )
    .await;
    let park = |plugin: &'static str, path: &'static str| {
        let n = n.clone();
        tokio::spawn(async move { n.call(plugin, Method::Post, path, b"").await })
    };
    // A long poll answered by a later request, and a plugin call kept in
    // flight by the callee parking it.
    let direct = park("peer", "/hold");
    let called = park("relay", "/call/peer/hold");
    n.wait_requests("peer", 2).await;
    let released = n.call("peer", Method::Post, "/release", b"").await;
    assert_eq!(body_json(&released)["released"], 2);
    for r in [direct.await.unwrap(), called.await.unwrap()] {
        assert_eq!((r.status, r.body.as_slice()), (200, &b"released"[..]));
    }

    // A request parked at a swap: the new version does not know its
    // ticket, so the host answers it at once, and only once.
    let parked = park("peer", "/hold");
    n.wait_requests("peer", 4).await;
    n.node
        .swap("peer", plexus_tests::variant(&wasm("relay"), 1), None)
        .await
        .unwrap();
    let r = parked.await.unwrap();
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        String::from_utf8_lossy(&r.body).contains("swapped"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let released = n.call("peer", Method::Post, "/release", b"").await;
    assert_eq!(body_json(&released)["released"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_plugin_calls_stay_in_flight_until_the_callee_answers() {
    let n = Arc::new(TestNode::new());
    let all = caps(&["messaging", "plugins", "outbound-http"]);
    let mut limits = PluginLimits::default();
    limits.quota.max_in_flight = 65_536;
    n.load_with(
        "relay",
        "relay",
        all.clone(),
        limits,
        r#"{"timeout_ms": 60000}"#,
        access(&["peer"], &[]),
    )
    .await;
    n.load_with(
        "peer",
        "relay",
        all,
        PluginLimits::default(),
        "{}",
        Access::default(),
    )
    .await;
    let count: u64 = std::env::var("HOLD_COUNT")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(500);
    let calls: Vec<_> = (0..count)
        .map(|_| {
            let n = n.clone();
            tokio::spawn(async move { n.call("relay", Method::Post, "/call/peer/hold", b"").await })
        })
        .collect();
    n.wait_requests("peer", count).await;
    let released = n.call("peer", Method::Post, "/release", b"").await;
    assert_eq!(body_json(&released)["released"], count);
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"released"[..]),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
}
