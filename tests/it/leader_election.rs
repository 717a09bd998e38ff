//! leader-election on one node: leases, renewal, release, fencing tokens,
//! and the node's own campaign driven by timers.

use std::time::Duration;

use plexus::primitives::timers::ManualClock;
use plexus::runtime::actor::PluginLimits;
use plexus::runtime::bindings::pattern::{Method, Response};
use plexus_tests::{TestNode, body_json, caps};

async fn election(config: &str) -> TestNode {
    election_on(TestNode::new(), config).await
}

async fn election_on(n: TestNode, config: &str) -> TestNode {
    n.load(
        "election",
        "leader-election",
        caps(&["consensus", "storage", "timers", "log"]),
        PluginLimits::default(),
        config,
    )
    .await;
    n
}

fn acquire(holder: &str, ttl_ms: u64) -> Vec<u8> {
    serde_json::json!({ "holder": holder, "ttl_ms": ttl_ms })
        .to_string()
        .into_bytes()
}

/// `holder` asks for role `db` for `ttl_ms`.
async fn acquire_db(n: &TestNode, holder: &str, ttl_ms: u64) -> Response {
    n.call(
        "election",
        Method::Post,
        "/roles/db/acquire",
        &acquire(holder, ttl_ms),
    )
    .await
}

/// `holder` gives role `db` back, naming the fencing token it holds.
async fn release_db(n: &TestNode, holder: &str, token: u64) -> Response {
    let body = serde_json::json!({ "holder": holder, "token": token }).to_string();
    n.call(
        "election",
        Method::Post,
        "/roles/db/release",
        body.as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_per_role_and_tokens_only_grow() {
    // Expiry is judged on the wall clock the plugin reads; this one moves
    // only when the test moves it, however slowly a loaded machine runs.
    let clock = ManualClock::new(1_700_000_000_000);
    let n = election_on(TestNode::with_clock(clock.clone()), "{}").await;
    let a = acquire_db(&n, "a", 300).await;
    assert_eq!(a.status, 200);
    let t1 = body_json(&a)["token"].as_u64().unwrap();

    // b is refused while a's lease runs; a renewing keeps its token.
    let b = acquire_db(&n, "b", 300).await;
    assert_eq!(b.status, 409);
    assert_eq!(body_json(&b)["holder"], "a");
    let renew = acquire_db(&n, "a", 300).await;
    assert_eq!(body_json(&renew)["token"].as_u64(), Some(t1));

    // Up to the last millisecond of the lease, b is still refused.
    clock.advance(Duration::from_millis(299));
    let b = acquire_db(&n, "b", 300).await;
    assert_eq!(b.status, 409);

    // After expiry b takes over with a strictly larger fencing token.
    clock.advance(Duration::from_millis(1));
    let b = acquire_db(&n, "b", 5000).await;
    assert_eq!(b.status, 200);
    let t2 = body_json(&b)["token"].as_u64().unwrap();
    assert!(t2 > t1);

    // a cannot release what it no longer holds; b can.
    assert_eq!(release_db(&n, "a", t1).await.status, 409);
    assert_eq!(release_db(&n, "b", t2).await.status, 200);
    assert_eq!(
        n.call("election", Method::Get, "/roles/db", b"")
            .await
            .status,
        404
    );

    // A release does not reset the token sequence.
    let c = acquire_db(&n, "c", 5000).await;
    assert!(body_json(&c)["token"].as_u64().unwrap() > t2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_campaigns_and_renews_by_timer() {
    // The lease is long enough that a renewal delayed by a loaded machine
    // still lands in time; the test is about renewal, not its latency.
    let n = election(r#"{"campaign": ["scheduler"], "ttl_ms": 3000}"#).await;
    let first = body_json(
        &n.wait_ok("election", "/roles/scheduler", Duration::from_secs(5))
            .await,
    );
    assert_eq!(first["holder"], "node-1");
    // Renewed past the end of the first lease: the expiry moved on by a
    // whole lease length, with the same token (renewed, never lost).
    let first_expiry = first["expires_at_ms"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let later = loop {
        let now = body_json(
            &n.call("election", Method::Get, "/roles/scheduler", b"")
                .await,
        );
        if now["expires_at_ms"].as_u64().unwrap() >= first_expiry + 3000 {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never renewed past the first lease: {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(later["holder"], "node-1");
    assert_eq!(later["token"], first["token"]);
    assert_eq!(later["expired"], false);
    assert!(later["expires_at_ms"].as_u64() > first["expires_at_ms"].as_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_with_400() {
    let n = election("{}").await;
    assert_eq!(
        n.call("election", Method::Post, "/roles/db/acquire", b"not json")
            .await
            .status,
        400
    );
    assert_eq!(
        n.call(
            "election",
            Method::Post,
            "/roles/db/acquire",
            &acquire("a", 1)
        )
        .await
        .status,
        400
    );
    assert_eq!(
        n.call("election", Method::Get, "/nowhere", b"")
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_config_key_is_refused_at_load_naming_the_key() {
    let n = plexus_tests::TestNode::new();
    let err = n
        .node
        .load(plexus::node::LoadSpec {
            name: "election".into(),
            component: plexus_tests::wasm("leader-election"),
            capabilities: plexus_tests::caps(&["consensus", "storage", "timers", "log"]),
            limits: plexus::runtime::actor::PluginLimits::default(),
            config_json: r#"{"campaign": ["primary"], "ttl_mss": 3000}"#.into(),
            access: Default::default(),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with(
            "init failed: config.ttl_mss: unknown field, expected `campaign` or `ttl_ms`"
        ),
        "{err}"
    );
    assert!(n.node.plugins().is_empty());
}
