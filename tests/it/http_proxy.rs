//! The `http-proxy` plugin on its real `.wasm`: every request is one
//! outbound call in flight, so the plugin keeps serving while hundreds
//! wait on the upstream, and a hot swap answers each of them once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use plexus::runtime::actor::{Access, PluginLimits};
use plexus::runtime::bindings::pattern::Method;
use plexus_tests::backend::{Backend, wait_until};
use plexus_tests::{TestNode, body_json, caps, variant, wasm};

async fn proxy(backend: &Backend) -> Arc<TestNode> {
    let n = Arc::new(TestNode::new());
    let config = serde_json::json!({ "upstream": backend.origin(), "timeout_ms": 20_000 });
    n.load_with(
        "proxy",
        "http-proxy",
        caps(&["outbound-http"]),
        PluginLimits::default(),
        &config.to_string(),
        Access {
            outbound: Arc::new(vec![backend.origin().parse().unwrap()]),
            ..Access::default()
        },
    )
    .await;
    n
}

/// Sends `count` requests for `/hold` and returns their tasks.
fn hold(n: &Arc<TestNode>, count: usize) -> Vec<tokio::task::JoinHandle<(u16, Vec<u8>)>> {
    (0..count)
        .map(|_| {
            let n = n.clone();
            tokio::spawn(async move {
                let r = n.call("proxy", Method::Get, "/hold", b"").await;
                (r.status, r.body)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pass_through_with_method_path_query_and_body() {
    let backend = Backend::start().await;
    let n = proxy(&backend).await;
    let r = n.call("proxy", Method::Post, "/echo/a?b=1", b"hello").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(String::from_utf8_lossy(&r.body), "POST /echo/a?b=1 hello");
    assert!(
        r.headers.iter().any(|(k, v)| k == "x-backend" && v == "1"),
        "{:?}",
        r.headers
    );
    let stats = body_json(&n.call("proxy", Method::Get, "/_proxy/stats", b"").await);
    assert_eq!(
        (stats["passed"].as_u64(), stats["answered"].as_u64()),
        (Some(1), Some(1)),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_200_calls_in_flight_the_plugin_keeps_answering() {
    let backend = Backend::start().await;
    let n = proxy(&backend).await;
    let waiting = hold(&n, 200);
    assert!(
        wait_until(Duration::from_secs(30), || backend.held() == 200).await,
        "the upstream holds {} of 200",
        backend.held()
    );
    // All 200 are in flight at once, and the mailbox still drains.
    let stats = body_json(&n.call("proxy", Method::Get, "/_proxy/stats", b"").await);
    assert_eq!(stats["passed"], 200, "{stats}");
    assert_eq!(stats["answered"], 0, "{stats}");
    backend.release();
    for w in waiting {
        let (status, body) = w.await.unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"released"[..]));
    }
    let stats = body_json(&n.call("proxy", Method::Get, "/_proxy/stats", b"").await);
    assert_eq!(stats["answered"], 200, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_with_100_calls_in_flight_answers_every_client_once() {
    let backend = Backend::start().await;
    let n = proxy(&backend).await;
    let waiting = hold(&n, 100);
    assert!(
        wait_until(Duration::from_secs(30), || backend.held() == 100).await,
        "the upstream holds {} of 100",
        backend.held()
    );
    let node = n.node.clone();
    let swap = tokio::spawn(async move {
        node.swap("proxy", variant(&wasm("http-proxy"), 1), None)
            .await
    });
    // The old version keeps its calls: the swap waits for their outcomes.
    assert!(
        !wait_until(Duration::from_millis(500), || swap.is_finished()).await,
        "the swap did not wait for the calls in flight"
    );
    backend.release();
    let report = swap.await.unwrap().expect("swap");
    let mut answers: BTreeMap<(u16, Vec<u8>), usize> = BTreeMap::new();
    for w in waiting {
        *answers.entry(w.await.unwrap()).or_default() += 1;
    }
    assert_eq!(
        answers,
        BTreeMap::from([((200, b"released".to_vec()), 100)]),
        "every client answered once, by the version that took its request"
    );
    assert_ne!(report.from, report.to);
    // The new version took over the counts: each call counted once.
    let stats = body_json(&n.call("proxy", Method::Get, "/_proxy/stats", b"").await);
    assert_eq!(
        (stats["passed"].as_u64(), stats["answered"].as_u64()),
        (Some(100), Some(100)),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_in_flight_limit_are_refused_at_once() {
    let backend = Backend::start().await;
    let n = Arc::new(TestNode::new());
    let config = serde_json::json!({ "upstream": backend.origin() });
    let mut limits = PluginLimits::default();
    limits.quota.max_in_flight = 3;
    n.load_with(
        "proxy",
        "http-proxy",
        caps(&["outbound-http"]),
        limits,
        &config.to_string(),
        Access {
            outbound: Arc::new(vec![backend.origin().parse().unwrap()]),
            ..Access::default()
        },
    )
    .await;
    let waiting = hold(&n, 3);
    assert!(wait_until(Duration::from_secs(30), || backend.held() == 3).await);
    let refused = n.call("proxy", Method::Get, "/hold", b"").await;
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(body_json(&refused)["kind"], "busy");
    backend.release();
    for w in waiting {
        assert_eq!(w.await.unwrap().0, 200);
    }
}
