//! replicated-kv on one node: puts, reads, compare-and-swap, deletes,
//! exactly-once apply, and state that survives a hot swap.

use plexus::runtime::bindings::pattern::Method;
use plexus_tests::{TestNode, body_json, caps, wasm};

use plexus::runtime::actor::PluginLimits;

async fn kv_node() -> TestNode {
    let n = TestNode::new();
    n.load(
        "kv",
        "replicated-kv",
        caps(&["consensus", "storage", "log"]),
        PluginLimits::default(),
        "{}",
    )
    .await;
    n
}

fn header<'a>(r: &'a plexus::runtime::bindings::pattern::Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_then_get_returns_the_value_and_its_version() {
    let n = kv_node().await;
    let r = n.call("kv", Method::Put, "/kv/apple", b"red").await;
    assert_eq!(r.status, 200);
    let version = body_json(&r)["version"].as_u64().unwrap();
    let r = n.call("kv", Method::Get, "/kv/apple", b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"red");
    assert_eq!(header(&r, "x-version"), Some(version.to_string().as_str()));
    let r = n.call("kv", Method::Get, "/kv/pear", b"").await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_with_stale_version_is_rejected() {
    let n = kv_node().await;
    let v1 = body_json(&n.call("kv", Method::Put, "/kv/k", b"1").await)["version"]
        .as_u64()
        .unwrap();
    let v2 = body_json(
        &n.call("kv", Method::Put, &format!("/kv/k?version={v1}"), b"2")
            .await,
    )["version"]
        .as_u64()
        .unwrap();
    assert!(v2 > v1);
    let r = n
        .call("kv", Method::Put, &format!("/kv/k?version={v1}"), b"3")
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(body_json(&r)["current"].as_u64(), Some(v2));
    // version=0 means "must not exist".
    assert_eq!(
        n.call("kv", Method::Put, "/kv/k?version=0", b"x")
            .await
            .status,
        409
    );
    assert_eq!(
        n.call("kv", Method::Put, "/kv/fresh?version=0", b"x")
            .await
            .status,
        200
    );
    assert_eq!(n.call("kv", Method::Get, "/kv/k", b"").await.body, b"2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_prefix_listing() {
    let n = kv_node().await;
    for k in ["user/1", "user/2", "order/1"] {
        assert_eq!(
            n.call("kv", Method::Put, &format!("/kv/{k}"), b"v")
                .await
                .status,
            200
        );
    }
    let listed = body_json(&n.call("kv", Method::Get, "/kv?prefix=user/", b"").await);
    let keys: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, vec!["user/1", "user/2"]);
    let r = n.call("kv", Method::Delete, "/kv/user/1", b"").await;
    assert_eq!(body_json(&r)["deleted"], true);
    let r = n.call("kv", Method::Delete, "/kv/user/1", b"").await;
    assert_eq!(body_json(&r)["deleted"], false);
    assert_eq!(
        n.call("kv", Method::Get, "/kv/user/1", b"").await.status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_is_applied_exactly_once() {
    let n = kv_node().await;
    for i in 0..50 {
        assert_eq!(
            n.call("kv", Method::Put, &format!("/kv/k{}", i % 7), b"v")
                .await
                .status,
            200
        );
    }
    let stats = body_json(&n.call("kv", Method::Get, "/stats", b"").await);
    assert_eq!(stats["applied"], 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_hot_swap() {
    let n = kv_node().await;
    for i in 0..10 {
        n.call(
            "kv",
            Method::Put,
            &format!("/kv/k{i}"),
            format!("v{i}").as_bytes(),
        )
        .await;
    }
    let report = n
        .node
        .swap("kv", plexus_tests::variant(&wasm("replicated-kv"), 1), None)
        .await
        .expect("swap");
    assert_ne!(report.from, report.to);
    for i in 0..10 {
        let r = n.call("kv", Method::Get, &format!("/kv/k{i}"), b"").await;
        assert_eq!(r.body, format!("v{i}").as_bytes());
    }
    let stats = body_json(&n.call("kv", Method::Get, "/stats", b"").await);
    // `served` lives in the instance's memory and was handed over by
    // snapshot/restore; `applied` lives in storage.
    assert_eq!(stats["served"], 10);
    assert_eq!(stats["applied"], 10);
}

/// Writes made while a hot swap happens all succeed and are all counted,
/// whichever version applied them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_hot_swap_are_all_counted() {
    let n = std::sync::Arc::new(kv_node().await);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let n = n.clone();
            tokio::spawn(async move {
                let mut ok = 0u64;
                for i in 0..25 {
                    let path = format!("/kv/w{w}-{i}");
                    if n.call("kv", Method::Put, &path, b"v").await.status == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    // The swap happens while the writers are under way.
    let before = n.node.plugin("kv").unwrap().requests;
    n.wait_requests("kv", before + 8).await;
    n.node
        .swap("kv", plexus_tests::variant(&wasm("replicated-kv"), 1), None)
        .await
        .expect("swap");
    let mut ok = 0;
    for w in writers {
        ok += w.await.unwrap();
    }
    assert_eq!(ok, 100, "every write during the swap succeeds");
    let stats = body_json(&n.call("kv", Method::Get, "/stats", b"").await);
    assert_eq!(stats["applied"], ok);
}
