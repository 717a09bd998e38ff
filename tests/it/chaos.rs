//! Hostile guests: the chaos plugin loops, exhausts memory, traps in each
//! hook and sends oversized payloads. Each time the node must contain it:
//! the caller gets an error, the plugin is restarted, and a kv plugin on
//! the same node keeps serving.

use std::time::Duration;

use plexus::node::RequestError;
use plexus::primitives::timers::ManualClock;
use plexus::runtime::actor::{CallError, PluginLimits, PluginStatus};
use plexus::runtime::bindings::pattern::Method;
use plexus_tests::{TestNode, all_caps, body_json, caps, limits};

async fn node_with(chaos_limits: PluginLimits, config: &str) -> TestNode {
    node_on(TestNode::new(), chaos_limits, config).await
}

async fn node_on(n: TestNode, chaos_limits: PluginLimits, config: &str) -> TestNode {
    n.load(
        "kv",
        "replicated-kv",
        caps(&["consensus", "storage"]),
        PluginLimits::default(),
        "{}",
    )
    .await;
    n.load("chaos", "chaos", all_caps(), chaos_limits, config)
        .await;
    n
}

/// The kv and chaos plugins on a node whose plugins read a clock the
/// test moves.
async fn node_on_a_clock() -> (std::sync::Arc<ManualClock>, TestNode) {
    let clock = ManualClock::new(1_700_000_000_000);
    let n = node_on(
        TestNode::with_clock(clock.clone()),
        PluginLimits::default(),
        "{}",
    )
    .await;
    (clock, n)
}

/// The kv plugin still takes writes and the chaos plugin, restarted,
/// answers again.
async fn still_serving(n: &TestNode) {
    let r = n.call("kv", Method::Put, "/kv/alive", b"yes").await;
    assert_eq!(r.status, 200);
    n.wait_ok("chaos", "/ping", Duration::from_secs(10)).await;
}

fn trap_message(r: Result<plexus::runtime::bindings::pattern::Response, RequestError>) -> String {
    match r {
        Err(RequestError::Call(CallError::Trap(msg))) => msg,
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_hits_the_cpu_deadline() {
    let n = node_with(limits(64, 200), "{}").await;
    let started = std::time::Instant::now();
    let msg = trap_message(n.try_call("chaos", Method::Post, "/loop", b"").await);
    assert!(msg.contains("CPU deadline of 200 ms"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5));
    still_serving(&n).await;
    let status = n.node.plugin("chaos").unwrap();
    assert_eq!(status.traps, 1);
    assert_eq!(status.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_keeps_serving_while_a_neighbour_loops() {
    // The loop's deadline is long enough that a loaded machine still
    // finishes the writes inside it; the claim is that they finish while
    // the loop runs, not how fast.
    let n = node_with(limits(64, 10_000), "{}").await;
    let node = n.node.clone();
    let looping = tokio::spawn(async move {
        let req = plexus::runtime::bindings::pattern::Request {
            method: Method::Post,
            path: "/loop".into(),
            query: String::new(),
            headers: vec![],
            body: vec![],
            source: plexus::runtime::bindings::pattern::RequestSource::Client,
        };
        node.request("chaos", req, Duration::from_secs(20)).await
    });
    // The loop's request is taken: the guest is in its loop from now on.
    n.wait_requests("chaos", 1).await;
    // The looping guest yields at every epoch tick, so the kv plugin's
    // requests go through meanwhile.
    for i in 0..10 {
        assert_eq!(
            n.call("kv", Method::Put, &format!("/kv/k{i}"), b"v")
                .await
                .status,
            200
        );
    }
    assert!(!looping.is_finished(), "the loop should still be running");
    assert!(looping.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_hits_the_cap() {
    let n = node_with(limits(32, 5000), "{}").await;
    let msg = trap_message(n.try_call("chaos", Method::Post, "/oom", b"").await);
    assert!(msg.contains("memory"), "{msg}");
    still_serving(&n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_in_on_request_restarts_the_plugin() {
    let n = node_with(PluginLimits::default(), "{}").await;
    let msg = trap_message(n.try_call("chaos", Method::Post, "/trap", b"").await);
    assert!(msg.contains("unreachable") || msg.contains("trap"), "{msg}");
    still_serving(&n).await;
    assert_eq!(n.node.plugin("chaos").unwrap().restarts, 1);
}

/// Waits until the chaos plugin's status shows `what`.
async fn wait_chaos(n: &TestNode, what: &str, shown: impl Fn(&PluginStatus) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = n.node.plugin("chaos").unwrap();
        if shown(&status) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} not seen: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_in_on_message_restarts_the_plugin() {
    let n = node_with(PluginLimits::default(), "{}").await;
    assert_eq!(
        n.call("chaos", Method::Post, "/trap-message", b"")
            .await
            .status,
        202
    );
    wait_chaos(&n, "a restart", |s| s.restarts >= 1).await;
    still_serving(&n).await;
    assert!(
        n.node
            .plugin("chaos")
            .unwrap()
            .last_error
            .unwrap()
            .contains("on-message")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_in_on_timer_restarts_the_plugin() {
    let n = node_with(PluginLimits::default(), "{}").await;
    assert_eq!(
        n.call("chaos", Method::Post, "/trap-timer", b"")
            .await
            .status,
        202
    );
    wait_chaos(&n, "a restart", |s| s.restarts >= 1).await;
    still_serving(&n).await;
    assert!(
        n.node
            .plugin("chaos")
            .unwrap()
            .last_error
            .unwrap()
            .contains("on-timer")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_in_apply_is_retried_until_the_entry_applies() {
    let (clock, n) = node_on_a_clock().await;
    // The entry makes apply trap until the plugin's clock passes 300 ms
    // from now: the proposing request traps (it applies its own entry),
    // then redelivery through `apply` traps while the clock stands still.
    let r = n
        .try_call("chaos", Method::Post, "/trap-apply?ms=300", b"")
        .await;
    assert!(
        matches!(r, Err(RequestError::Call(CallError::Trap(_)))),
        "{r:?}"
    );
    // The kv plugin beside it is not held up.
    let r = n.call("kv", Method::Put, "/kv/alive", b"yes").await;
    assert_eq!(r.status, 200);
    wait_chaos(&n, "apply redelivered and trapping", |s| s.traps >= 2).await;
    // Once the window has passed, the next redelivery applies the entry.
    clock.advance(Duration::from_millis(300));
    n.wait_ok("chaos", "/ping", Duration::from_secs(20)).await;
    let status = n.node.plugin("chaos").unwrap();
    assert!(status.traps >= 2, "{status:?}");
    assert!(status.last_error.unwrap().contains("apply"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_in_on_membership_crash_loops_without_harming_others() {
    let n = TestNode::new();
    n.load(
        "kv",
        "replicated-kv",
        caps(&["consensus", "storage"]),
        PluginLimits::default(),
        "{}",
    )
    .await;
    // on-membership runs right after init, so the load itself reports it.
    let err = n
        .node
        .load(plexus::node::LoadSpec {
            name: "chaos".into(),
            component: plexus_tests::wasm("chaos"),
            capabilities: all_caps(),
            limits: PluginLimits::default(),
            config_json: r#"{"fail_in": "on-membership"}"#.into(),
            access: Default::default(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("on-membership"), "{err}");
    assert!(n.node.plugin("chaos").is_none());
    assert_eq!(n.call("kv", Method::Put, "/kv/k", b"v").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_in_init_refuses_the_load() {
    let n = TestNode::new();
    for (config, expect) in [
        (r#"{"fail_in": "init"}"#, "refusing to start"),
        (r#"{"fail_in": "init-trap"}"#, "trap in init"),
    ] {
        let err = n
            .node
            .load(plexus::node::LoadSpec {
                name: "chaos".into(),
                component: plexus_tests::wasm("chaos"),
                capabilities: all_caps(),
                limits: PluginLimits::default(),
                config_json: config.into(),
                access: Default::default(),
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("init failed"), "{err}");
        let _ = expect;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_payload_is_rejected_as_too_large() {
    let n = node_with(limits(256, 5000), "{}").await;
    let r = n
        .call("chaos", Method::Post, "/propose-big?mb=64", b"")
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(body_json(&r)["limit"], 1 << 20);
    let r = n
        .call("chaos", Method::Post, "/message-big?mb=64", b"")
        .await;
    assert_eq!(r.status, 413);
    // The guest was not harmed: the same instance answers.
    assert_eq!(n.node.plugin("chaos").unwrap().restarts, 0);
    still_serving(&n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_not_granted_is_refused_at_load() {
    let n = TestNode::new();
    let err = n
        .node
        .load(plexus::node::LoadSpec {
            name: "kv".into(),
            component: plexus_tests::wasm("replicated-kv"),
            capabilities: caps(&["storage", "log"]),
            limits: PluginLimits::default(),
            config_json: "{}".into(),
            access: Default::default(),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("plexus:cluster/consensus@0.2.0"), "{err}");
    assert!(err.contains("not granted"), "{err}");
    assert!(n.node.plugins().is_empty());
}

/// Where `panic!("{text}")` is in the chaos plugin's source, as a panic
/// report names it: `plugins/chaos/src/lib.rs:LINE:COLUMN`.
fn panic_site(text: &str) -> String {
    let source = include_str!("../../plugins/chaos/src/lib.rs");
    let (line, column) = source
        .lines()
        .enumerate()
        .find_map(|(i, l)| l.find(&format!("panic!(\"{text}")).map(|c| (i + 1, c + 1)))
        .unwrap_or_else(|| panic!("no panic!(\"{text}\") in the chaos plugin"));
    format!("plugins/chaos/src/lib.rs:{line}:{column}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_reaches_the_client_and_the_status_with_its_message_and_place() {
    let n = node_with(PluginLimits::default(), "{}").await;
    let msg = trap_message(n.try_call("chaos", Method::Post, "/trap", b"").await);
    let expected = format!(
        "on-request: panicked at {}: chaos: trap in on-request",
        panic_site("chaos: trap in on-request")
    );
    assert_eq!(msg, expected);
    let status = n.node.plugin("chaos").unwrap();
    assert_eq!(status.last_error.as_deref(), Some(expected.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_keeps_trapping_apply_fails_the_plugin_until_a_swap() {
    use plexus::runtime::actor::RunState;
    let (clock, n) = node_on_a_clock().await;
    let before = n.node.plugin("chaos").unwrap().version;
    // Traps for an hour of the plugin's clock, which stands still.
    let _ = n
        .try_call("chaos", Method::Post, "/trap-apply?ms=3600000", b"")
        .await;
    wait_chaos(&n, "the plugin failed", |s| s.state == RunState::Failed).await;
    let status = n.node.plugin("chaos").unwrap();
    let why = status.last_error.unwrap();
    let index: u64 = why
        .strip_prefix("failed at index ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("{why}"));
    assert_eq!(
        why,
        format!(
            "failed at index {index}: apply: panicked at {}: chaos: trap in apply of entry {index}. \
             The entry is committed and every node applies it, so it failed 5 times in a row; \
             no instance runs until a version whose apply handles it is swapped in \
             (`plexus plugin swap chaos FILE`; the same file retries)",
            panic_site("chaos: trap in apply of entry")
        )
    );
    // No crash loop: requests are answered at once with why.
    let restarts = status.restarts;
    assert_eq!(
        trap_message(n.try_call("chaos", Method::Get, "/ping", b"").await),
        why
    );
    assert_eq!(n.node.plugin("chaos").unwrap().restarts, restarts);
    // The kv plugin beside it serves.
    assert_eq!(
        n.call("kv", Method::Put, "/kv/alive", b"yes").await.status,
        200
    );

    // A version that applies the entry (here: the window has passed).
    clock.advance(Duration::from_secs(7200));
    let fixed = plexus_tests::variant(&plexus_tests::wasm("chaos"), 9);
    n.node.swap("chaos", fixed, None).await.unwrap();
    n.wait_ok("chaos", "/ping", Duration::from_secs(10)).await;
    let status = n.node.plugin("chaos").unwrap();
    assert_eq!(status.state, RunState::Running);

    // Traps are counted under the version that trapped, not the one
    // running now.
    let (_, metrics) = n
        .node
        .plugin_metrics()
        .into_iter()
        .find(|(s, _)| s.name == "chaos")
        .unwrap();
    let traps = |v: &str| {
        metrics
            .versions
            .iter()
            .find(|(version, _)| version == v)
            .map_or(0, |(_, m)| m.traps)
    };
    assert!(traps(&before) >= 5, "{metrics:?}");
    assert_eq!(traps(&status.version), 0, "{metrics:?}");
}

/// A request to `chaos` for `path`, waiting up to `timeout`.
async fn ask_chaos(
    node: &plexus::node::Node,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<plexus::runtime::bindings::pattern::Response, RequestError> {
    let req = plexus::runtime::bindings::pattern::Request {
        method,
        path: path.into(),
        query: String::new(),
        headers: vec![],
        body: vec![],
        source: plexus::runtime::bindings::pattern::RequestSource::Client,
    };
    node.request("chaos", req, timeout).await
}

/// A full mailbox holds a request back until its deadline (504 to an HTTP
/// client) and loses none of those it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_holds_requests_back_until_their_deadline() {
    let mut chaos_limits = limits(64, 3000);
    chaos_limits.mailbox = 2;
    let n = node_with(chaos_limits, "{}").await;
    // The guest loops until its CPU deadline: nothing is taken meanwhile.
    let node = n.node.clone();
    let looping = tokio::spawn(async move {
        ask_chaos(&node, Method::Post, "/loop", Duration::from_secs(20)).await
    });
    n.wait_requests("chaos", 1).await;
    // Two requests fill the mailbox.
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let node = n.node.clone();
            tokio::spawn(async move {
                ask_chaos(&node, Method::Get, "/ping", Duration::from_secs(30)).await
            })
        })
        .collect();
    wait_chaos(&n, "a full mailbox", |s| s.mailbox_depth == 2).await;
    // A third finds no room before its deadline.
    let r = ask_chaos(&n.node, Method::Get, "/ping", Duration::from_millis(300)).await;
    assert!(
        matches!(r, Err(RequestError::Call(CallError::Timeout))),
        "{r:?}"
    );
    // The two it took are answered once the loop is cut off.
    for q in queued {
        assert_eq!(q.await.unwrap().unwrap().status, 200);
    }
    assert!(trap_message(looping.await.unwrap()).contains("CPU deadline"));
}
