//! Hot swap: under load nothing is lost or failed; a new version that
//! fails `init` or `restore` leaves the old one serving.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use plexus::runtime::actor::{PluginLimits, SwapError};
use plexus::runtime::bindings::pattern::Method;
use plexus_tests::{TestNode, all_caps, body_json, caps, variant, wasm};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_concurrent_requests_lose_nothing() {
    const CLIENTS: usize = 16;
    const PER_CLIENT: usize = 640; // 10,240 requests
    const SWAPS: usize = 24;
    let n = Arc::new(TestNode::new());
    n.load(
        "kv",
        "replicated-kv",
        caps(&["consensus", "storage"]),
        PluginLimits::default(),
        "{}",
    )
    .await;

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let n = n.clone();
        clients.push(tokio::spawn(async move {
            // Each client owns its keys, so the last acknowledged value of
            // each is known exactly.
            let mut acked: HashMap<String, String> = HashMap::new();
            let mut failed = 0;
            for i in 0..PER_CLIENT {
                let key = format!("c{c}-k{}", i % 8);
                let r = if i % 4 == 3 {
                    n.try_call("kv", Method::Get, &format!("/kv/{key}"), b"")
                        .await
                } else {
                    let value = format!("{c}-{i}");
                    let r = n
                        .try_call("kv", Method::Put, &format!("/kv/{key}"), value.as_bytes())
                        .await;
                    if matches!(&r, Ok(resp) if resp.status == 200) {
                        acked.insert(key, value);
                    }
                    r
                };
                match r {
                    Ok(resp) if resp.status == 200 || resp.status == 404 => {}
                    _ => failed += 1,
                }
            }
            (acked, failed)
        }));
    }

    let versions = [
        variant(&wasm("replicated-kv"), 1),
        variant(&wasm("replicated-kv"), 2),
    ];
    let mut reports = Vec::new();
    for s in 0..SWAPS {
        // Each swap under load: the clients got requests in since the last.
        let taken = n.node.plugin("kv").unwrap().requests;
        n.wait_requests("kv", taken + 4).await;
        let report = n
            .node
            .swap("kv", versions[s % 2].clone(), None)
            .await
            .expect("swap");
        reports.push(report);
    }

    let mut failed = 0;
    let mut acked = HashMap::new();
    for c in clients {
        let (a, f) = c.await.unwrap();
        failed += f;
        acked.extend(a);
    }
    assert_eq!(failed, 0, "requests failed during swaps");
    for (key, value) in &acked {
        let r = n.call("kv", Method::Get, &format!("/kv/{key}"), b"").await;
        assert_eq!(r.body, value.as_bytes(), "acknowledged write to {key} lost");
    }
    let status = n.node.plugin("kv").unwrap();
    assert_eq!(status.swaps as usize, SWAPS);
    assert_eq!(status.swap_pauses_us.len(), SWAPS);
    assert_eq!(status.restarts, 0);
    let served = body_json(&n.call("kv", Method::Get, "/stats", b"").await)["served"]
        .as_u64()
        .unwrap();
    let writes = (CLIENTS * PER_CLIENT * 3 / 4) as u64;
    assert_eq!(
        served, writes,
        "snapshot/restore handed the counter over every swap"
    );
    let mut pauses: Vec<_> = reports.iter().map(|r| r.pause_us).collect();
    pauses.sort_unstable();
    eprintln!(
        "swap pauses (us): p50 {} max {}",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
}

async fn chaos_node() -> TestNode {
    let n = TestNode::new();
    n.load("chaos", "chaos", all_caps(), PluginLimits::default(), "{}")
        .await;
    for _ in 0..3 {
        n.call("chaos", Method::Get, "/ping", b"").await;
    }
    n
}

async fn assert_old_serves(n: &TestNode, version: &str) {
    let status = n.node.plugin("chaos").unwrap();
    assert_eq!(status.version, version);
    assert_eq!(status.swaps, 0);
    let pong = body_json(&n.wait_ok("chaos", "/ping", Duration::from_secs(5)).await);
    assert!(pong["pong"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_to_a_version_failing_init_keeps_the_old_one() {
    let n = chaos_node().await;
    let before = n.node.plugin("chaos").unwrap().version;
    for config in [r#"{"fail_in": "init"}"#, r#"{"fail_in": "init-trap"}"#] {
        let err = n
            .node
            .swap("chaos", variant(&wasm("chaos"), 9), Some(config.into()))
            .await
            .unwrap_err();
        assert!(matches!(err, SwapError::Load(_)), "{err}");
        assert!(err.to_string().contains("init"), "{err}");
        assert_old_serves(&n, &before).await;
    }
    // The old config is back in force: the node can still swap normally.
    n.node
        .swap("chaos", variant(&wasm("chaos"), 9), None)
        .await
        .expect("a good swap still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_to_a_version_failing_restore_keeps_the_old_one() {
    let n = chaos_node().await;
    let before = n.node.plugin("chaos").unwrap().version;
    for config in [
        r#"{"fail_in": "restore"}"#,
        r#"{"fail_in": "restore-trap"}"#,
    ] {
        let err = n
            .node
            .swap("chaos", variant(&wasm("chaos"), 7), Some(config.into()))
            .await
            .unwrap_err();
        assert!(matches!(err, SwapError::Restore(_)), "{err}");
        // The in-memory counter kept counting in the old instance.
        let pong = body_json(&n.call("chaos", Method::Get, "/ping", b"").await);
        assert!(pong["pong"].as_u64().unwrap() >= 4, "{pong}");
        assert_old_serves(&n, &before).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_whose_old_version_traps_in_snapshot_is_refused_and_recovers() {
    let n = TestNode::new();
    n.load(
        "chaos",
        "chaos",
        all_caps(),
        PluginLimits::default(),
        r#"{"fail_in": "snapshot"}"#,
    )
    .await;
    let err = n
        .node
        .swap("chaos", variant(&wasm("chaos"), 3), Some("{}".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, SwapError::Snapshot(_)), "{err}");
    n.wait_ok("chaos", "/ping", Duration::from_secs(10)).await;
    assert_eq!(n.node.plugin("chaos").unwrap().restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_hands_state_over_and_reports_the_pause() {
    let n = chaos_node().await;
    let report = n
        .node
        .swap("chaos", variant(&wasm("chaos"), 5), None)
        .await
        .unwrap();
    assert_eq!(report.state_bytes, 8);
    assert!(report.pause_us < 1_000_000);
    let pong = body_json(&n.call("chaos", Method::Get, "/ping", b"").await);
    assert_eq!(pong["pong"], 4, "the counter continued in the new version");
    assert_eq!(n.node.plugin("chaos").unwrap().version, report.to);
}

/// Writes in flight when a cluster-wide swap is applied are the new
/// version's to apply, and it answers them: every client gets its write's
/// real outcome (here 200, never "outcome unknown"), and each write is
/// applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_swap_answers_every_write_in_flight_with_its_real_outcome() {
    const WRITERS: usize = 16;
    const SWAPS: usize = 12;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let n = Arc::new(TestNode::new());
    n.load(
        "kv",
        "replicated-kv",
        caps(&["consensus", "storage"]),
        PluginLimits::default(),
        "{}",
    )
    .await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (n, done) = (n.clone(), done.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                // Until the swaps are over, and at least a few each.
                let mut i = 0;
                while i < 10 || !done.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let r = n
                        .call("kv", Method::Put, &format!("/kv/w{w}-{i}"), b"v")
                        .await;
                    answers.push((r.status, String::from_utf8_lossy(&r.body).into_owned()));
                }
                answers
            })
        })
        .collect();
    let kv = wasm("replicated-kv");
    for s in 0..SWAPS {
        let taken = n.node.plugin("kv").unwrap().requests;
        n.wait_requests("kv", taken + 16).await;
        n.node
            .swap_cluster("kv", variant(&kv, 1 + (s % 2) as u8), None)
            .await
            .expect("cluster-wide swap");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = Vec::new();
    for w in writers {
        answers.extend(w.await.unwrap());
    }
    let wrong: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} writes not answered 200, e.g. {:?}",
        wrong.len(),
        answers.len(),
        wrong.first()
    );
    let stats = body_json(&n.call("kv", Method::Get, "/stats", b"").await);
    assert_eq!(
        stats["applied"],
        answers.len() as u64,
        "each write applied once"
    );
    assert_eq!(n.node.plugin("kv").unwrap().swaps as usize, SWAPS);
}
