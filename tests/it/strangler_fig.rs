//! strangler-fig on its real `.wasm`, on three `plexus` processes, in
//! front of a legacy and a new HTTP service started here: weights honoured
//! within a stated tolerance, cohorts that stay on the new side as the
//! weight rises and come back with a rollback, a table change that every
//! node takes at one log index, shadow traffic compared and its
//! mismatches counted, and a cluster-wide swap under load that loses no
//! request.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use plexus_tests::{Processes, cluster_node_config, http, http_full};
use serde_json::{Value, json};

const TOKEN: &str = "fig-token";
const FIG: &str = "/v1/plugins/fig";

/// A service on 127.0.0.1 answering `{name}:{path}`; the new one answers
/// paths holding `changed` differently.
async fn service(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let body = if name == "new" && path.contains("changed") {
                        format!("new:{path}!")
                    } else if name == "new" && path.starts_with("/reports") {
                        // The same answer as legacy's: a faithful rewrite.
                        format!("legacy:{path}")
                    } else {
                        format!("{name}:{path}")
                    };
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        body,
                    ))))
                },
            );
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

fn config(
    legacy: SocketAddr,
    new: SocketAddr,
) -> impl Fn(usize, &[SocketAddr], &[SocketAddr]) -> String {
    move |i, http, peer| {
        let plugin = format!(
            r#"
[admin]
token = "{TOKEN}"

[[plugins]]
name = "fig"
component = "bundled:strangler-fig"
capabilities = ["outbound-http", "consensus", "storage", "plugins"]
allowed_outbound_hosts = ["http://{legacy}", "http://{new}"]
[plugins.config]
legacy = "http://{legacy}"
admin_token = "{TOKEN}"
routes = [
    {{ prefix = "/orders", new = {{ url = "http://{new}" }}, weight = 30 }},
    {{ prefix = "/reports", new = {{ url = "http://{new}" }}, shadow = true }},
]
"#
        );
        cluster_node_config(i, http, peer, "", &plugin)
    }
}

/// The side that answered `GET path` for `user` through `addr`.
async fn side(addr: SocketAddr, path: &str, user: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = http_full(
            addr,
            "GET",
            &format!("{FIG}{path}"),
            &[("x-user-id", user)],
            b"",
        )
        .await;
        if let Ok((200, headers, body)) = got {
            let side = headers
                .iter()
                .find(|(k, _)| k == "x-fig-side")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let body = String::from_utf8_lossy(&body).to_string();
            assert!(
                body.starts_with(&format!("{side}:")),
                "{side} answered {body}"
            );
            return side;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never answered: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The users of `users` sent to the new side, asking through every node.
async fn new_cohort(nodes: &Processes, users: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, u) in users.iter().enumerate() {
        if side(nodes.http[i % 3], "/orders/1", u).await == "new" {
            out.insert(u.clone());
        }
    }
    out
}

async fn change(nodes: &Processes, i: usize, path: &str, body: Value) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let (s, b) = http(
        nodes.http[i],
        if path.ends_with("routes") {
            "PUT"
        } else {
            "POST"
        },
        &format!("{FIG}{path}"),
        &[("authorization", &auth)],
        body.to_string().as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    serde_json::from_slice(&b).unwrap()
}

/// Waits until every node's table is `version`; returns the index each
/// took it at.
async fn tables_at(nodes: &Processes, version: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut indexes = Vec::new();
        for i in 0..3 {
            let (_, t) = nodes
                .call(i, "GET", &format!("{FIG}/_fig/routes"), b"")
                .await;
            if t["version"] == version {
                indexes.push(t["index"].as_u64().unwrap());
            }
        }
        if indexes.len() == 3 {
            return indexes;
        }
        assert!(
            Instant::now() < deadline,
            "not every node took version {version}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_cohorts_a_table_change_at_one_index_and_shadow_traffic() {
    let ((legacy, _l), (new, _n)) = (service("legacy").await, service("new").await);
    let nodes = Processes::start(3, config(legacy, new)).await;
    let users: Vec<String> = (0..600).map(|i| format!("user-{i}")).collect();
    // Weight 30 over 600 users: within 6 points (the stated tolerance;
    // three standard deviations are 5.6).
    let at30 = new_cohort(&nodes, &users).await;
    let share = |c: &BTreeSet<String>| c.len() as f64 / users.len() as f64 * 100.0;
    assert!((share(&at30) - 30.0).abs() < 6.0, "{}%", share(&at30));
    // The same user gets the same side on every node.
    for u in users.iter().take(20) {
        let sides: BTreeSet<String> = sides_on_every_node(&nodes, u).await;
        assert_eq!(sides.len(), 1, "{u}: {sides:?}");
    }
    let mut routes = json!([
        {"prefix": "/orders", "new": {"url": format!("http://{new}")}, "weight": 60},
        {"prefix": "/reports", "new": {"url": format!("http://{new}")}, "shadow": true}
    ]);
    let t = change(&nodes, 1, "/_fig/routes", routes.clone()).await;
    assert_eq!(t["version"], 1);
    let indexes = tables_at(&nodes, 1).await;
    assert!(indexes.iter().all(|i| *i == indexes[0]), "{indexes:?}");
    let at60 = new_cohort(&nodes, &users).await;
    assert!((share(&at60) - 60.0).abs() < 6.0, "{}%", share(&at60));
    assert!(
        at30.is_subset(&at60),
        "a user went back to legacy as the weight rose"
    );
    // Rollback: one entry, and the cohort is the one at 30 again.
    change(&nodes, 2, "/_fig/rollback", json!(null)).await;
    tables_at(&nodes, 2).await;
    assert_eq!(new_cohort(&nodes, &users).await, at30);
    // Shadow: every answer from legacy, each compared; 10 of 40 differ.
    for i in 0..40 {
        let path = if i % 4 == 0 {
            format!("/reports/changed-{i}")
        } else {
            format!("/reports/{i}")
        };
        assert_eq!(side(nodes.http[i % 3], &path, "someone").await, "legacy");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (mut shadowed, mut mismatched) = (0, 0);
        for i in 0..3 {
            let (_, s) = nodes
                .call(i, "GET", &format!("{FIG}/_fig/status"), b"")
                .await;
            shadowed += s["routes"]["/reports"]["shadowed"].as_u64().unwrap_or(0);
            mismatched += s["routes"]["/reports"]["mismatched"].as_u64().unwrap_or(0);
        }
        if shadowed == 40 {
            assert_eq!(mismatched, 10);
            break;
        }
        assert!(Instant::now() < deadline, "{shadowed} of 40 compared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    routes[0]["weight"] = json!(0);
    change(&nodes, 0, "/_fig/routes", routes).await;
    tables_at(&nodes, 3).await;
    assert!(new_cohort(&nodes, &users[..50]).await.is_empty());
}

async fn sides_on_every_node(nodes: &Processes, user: &str) -> BTreeSet<String> {
    let mut sides = BTreeSet::new();
    for i in 0..3 {
        sides.insert(side(nodes.http[i], "/orders/9", user).await);
    }
    sides
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_swap_under_load_loses_no_request() {
    let ((legacy, _l), (new, _n)) = (service("legacy").await, service("new").await);
    let nodes = Processes::start(3, config(legacy, new)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4usize {
        let (addr, stop) = (nodes.http[c % 3], stop.clone());
        clients.push(tokio::spawn(async move {
            let mut answered = 0;
            while !stop.load(Ordering::Relaxed) {
                let path = if c % 2 == 0 { "/orders/1" } else { "/users/1" };
                let user = format!("u{answered}");
                let (s, _, body) = http_full(
                    addr,
                    "GET",
                    &format!("{FIG}{path}"),
                    &[("x-user-id", &user)],
                    b"",
                )
                .await
                .expect("the node answers");
                assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
                answered += 1;
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let component = plexus_tests::variant(&plexus_tests::wasm("strangler-fig"), 9);
    let auth = format!("Bearer {TOKEN}");
    let (s, b) = http(
        nodes.http[0],
        "POST",
        "/v1/admin/plugins/fig/swap?scope=cluster",
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
    // The counts came through the swap.
    let (_, st) = nodes
        .call(0, "GET", &format!("{FIG}/_fig/status"), b"")
        .await;
    let total = st["routes"]["/orders"]["legacy"].as_u64().unwrap_or(0)
        + st["routes"]["/orders"]["new"].as_u64().unwrap_or(0);
    assert!(total > 0, "{st}");
}
