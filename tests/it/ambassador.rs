//! ambassador on its real `.wasm`, on three `plexus` processes, in front
//! of a real HTTP service started here that fails, flaps or is sometimes
//! slow on purpose: it retries what it should and nothing else, a
//! per-node budget and a cluster-wide one hold retries under a failing
//! upstream (the cluster-wide one to its total across nodes), a hedge
//! answers for an attempt that is slow, and a cluster-wide swap under
//! load loses no request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use plexus_tests::{Processes, cluster_node_config, http, http_full};
use serde_json::Value;

const TOKEN: &str = "amb-token";

/// A service whose paths behave: `/fail...` 503; `/flaky` 503 on every
/// other request; `/tail` 200, but the tenth, twentieth, ... request after
/// 1.5 s (so a hedge sent after a slow one is fast); else 200. Counts the
/// requests per path.
struct Service {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    async fn start() -> Service {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let seq = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, seq) = (h.clone(), seq.clone());
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (h, seq) = (h.clone(), seq.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let n = {
                            let mut h = h.lock().unwrap();
                            let c = h.entry(path.clone()).or_default();
                            *c += 1;
                            *c
                        };
                        let status = match path.as_str() {
                            p if p.starts_with("/fail") => 503,
                            "/flaky" if n % 2 == 1 => 503,
                            "/tail" if seq.fetch_add(1, Ordering::SeqCst) % 10 == 9 => {
                                tokio::time::sleep(Duration::from_millis(1500)).await;
                                200
                            }
                            _ => 200,
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(path)))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Service { addr, hits, task }
    }

    fn hits(&self, path: &str) -> u64 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(backend: SocketAddr) -> impl Fn(usize, &[SocketAddr], &[SocketAddr]) -> String {
    move |i, http, peer| {
        let budget = "{ retry_ratio = 0.1, min_retries_per_second = 1, ttl_ms = 20000 }";
        let cluster = "{ retry_ratio = 0.1, min_retries_per_second = 1, ttl_ms = 20000, scope = \"cluster\" }";
        let plugin = format!(
            r#"
[admin]
token = "{TOKEN}"

[[plugins]]
name = "amb"
component = "bundled:ambassador"
capabilities = ["outbound-http", "timers", "messaging", "log"]
allowed_outbound_hosts = ["http://{backend}"]
[plugins.config]
access_log = false
upstreams = [
    {{ name = "svc", url = "http://{backend}", num_retries = 3, base_interval_ms = 2, max_interval_ms = 10, budget = {budget} }},
    {{ name = "shared", url = "http://{backend}", num_retries = 3, base_interval_ms = 2, max_interval_ms = 10, budget = {cluster} }},
    {{ name = "hedged", url = "http://{backend}", per_try_timeout_ms = 5000, hedge = {{ percentile = 80, min_delay_ms = 20 }} }},
]
"#
        );
        cluster_node_config(i, http, peer, "", &plugin)
    }
}

/// `method path` through `addr`: the status and the attempts it took.
async fn call(addr: SocketAddr, method: &str, path: &str) -> (u16, u32) {
    let (s, headers, _) = http_full(addr, method, &format!("/v1/plugins/amb{path}"), &[], b"x")
        .await
        .expect("the node answers");
    let attempts = headers
        .iter()
        .find(|(k, _)| k == "x-ambassador-attempts")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    (s, attempts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_where_they_should_within_the_budgets() {
    let backend = Service::start().await;
    let nodes = Processes::start(3, config(backend.addr)).await;
    // A flapping upstream: every GET succeeds, on its second attempt.
    for _ in 0..20 {
        let (s, attempts) = call(nodes.http[0], "GET", "/svc/flaky").await;
        assert_eq!((s, attempts), (200, 2));
    }
    // A POST is not retried.
    let before = backend.hits("/fail-post");
    let (s, attempts) = call(nodes.http[1], "POST", "/svc/fail-post").await;
    assert_eq!(
        (s, attempts, backend.hits("/fail-post") - before),
        (503, 1, 1)
    );
    // A dead upstream, 50 GETs through each node: a per-node budget lets
    // each node retry 10% of its requests plus its floor (1/s over the
    // 20 s window): at most 3 × (5 + 20) retries...
    for i in 0..150 {
        call(nodes.http[i % 3], "GET", "/svc/fail-node").await;
    }
    let node_retries = backend.hits("/fail-node") - 150;
    assert!(node_retries <= 3 * 25, "{node_retries}");
    // ...where the cluster-wide budget counts requests and retries over
    // all three: 10% of 150 plus one floor, and what the half second
    // between counts lets through.
    for i in 0..150 {
        call(nodes.http[i % 3], "GET", "/shared/fail-cluster").await;
        if i % 15 == 14 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    let cluster_retries = backend.hits("/fail-cluster") - 150;
    assert!(cluster_retries <= 15 + 20 + 15, "{cluster_retries}");
    assert!(
        cluster_retries < node_retries,
        "cluster {cluster_retries}, per node {node_retries}"
    );
    let (_, status) = nodes
        .call(0, "GET", "/v1/plugins/amb/_amb/status", b"")
        .await;
    assert!(
        status["upstreams"]["shared"]["stats"]["budget_refused"].as_u64() > Some(0),
        "{status}"
    );
    eprintln!(
        "retries under a dead upstream: {node_retries} with per-node budgets, {cluster_retries} with a cluster-wide one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_answers_for_a_slow_attempt() {
    let backend = Service::start().await;
    let nodes = Processes::start(3, config(backend.addr)).await;
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let started = Instant::now();
        let (s, _) = call(nodes.http[0], "GET", "/hedged/tail").await;
        assert_eq!(s, 200);
        // The first requests teach it the latencies: not timed.
        if i >= 40 {
            slowest = slowest.max(started.elapsed());
        }
    }
    let (_, status) = nodes
        .call(0, "GET", "/v1/plugins/amb/_amb/status", b"")
        .await;
    let stats = &status["upstreams"]["hedged"]["stats"];
    assert!(stats["hedges_won"].as_u64() > Some(0), "{status}");
    assert!(
        slowest < Duration::from_millis(1400),
        "a request waited {slowest:?} for a slow attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_swap_under_load_loses_no_request() {
    let backend = Service::start().await;
    let nodes = Processes::start(3, config(backend.addr)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4usize {
        let (addr, stop) = (nodes.http[c % 3], stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (s, _) = call(addr, "GET", "/svc/ok").await;
                assert_eq!(s, 200);
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let component = plexus_tests::variant(&plexus_tests::wasm("ambassador"), 4);
    let auth = format!("Bearer {TOKEN}");
    let (s, b) = http(
        nodes.http[0],
        "POST",
        "/v1/admin/plugins/amb/swap?scope=cluster",
        &[("authorization", &auth)],
        &component,
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        assert!(c.await.unwrap() > 0);
    }
    let (_, status): (u16, Value) = nodes
        .call(0, "GET", "/v1/plugins/amb/_amb/status", b"")
        .await;
    assert!(status["upstreams"]["svc"]["stats"]["requests"].as_u64() > Some(0));
}
