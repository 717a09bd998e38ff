//! task-worker on its real `.wasm`, beside work-queue on three `plexus`
//! processes: the workers are plugin instances, one per node. One node is
//! killed and the worker plugin is swapped on another while they work;
//! every task is still done once with its right result, and the tasks
//! that fail on purpose end failed after their attempts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use plexus_tests::{Processes, cluster_node_config, http};
use serde_json::{Value, json};

const SUMS: usize = 1200;
const FAILS: usize = 10;

fn config(i: usize, http: &[SocketAddr], peer: &[SocketAddr]) -> String {
    let plugins = r#"
[admin]
token = "worker-token"

[[plugins]]
name = "wq"
component = "bundled:work-queue"
capabilities = ["consensus", "storage", "timers"]

[[plugins]]
name = "task-worker"
component = "bundled:task-worker"
capabilities = ["plugins", "timers"]
allowed_plugins = ["wq"]
[plugins.config]
batch = 20
wait_ms = 1000
"#;
    cluster_node_config(i, http, peer, "", plugins)
}

async fn done_so_far(nodes: &Processes, alive: &[usize]) -> u64 {
    let mut done = 0;
    for &i in alive {
        let (_, s) = nodes
            .call(i, "GET", "/v1/plugins/task-worker/stats", b"")
            .await;
        done += s["done"].as_u64().unwrap_or(0);
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_workers_on_every_node_do_each_task_through_a_kill_and_a_swap() {
    let mut nodes = Processes::start(3, config).await;
    // Tasks in lists of 200: sums whose results are known, and a few that
    // fail on purpose with two attempts each.
    let mut tasks: Vec<Value> = (0..SUMS)
        .map(|i| json!({ "key": format!("sum-{i}"), "payload": { "op": "sum", "args": [i, 0.5] } }))
        .collect();
    tasks.extend((0..FAILS).map(|i| {
        json!({ "key": format!("fail-{i}"), "max_attempts": 2, "payload": { "op": "fail", "error": "on purpose" } })
    }));
    for (k, list) in tasks.chunks(200).enumerate() {
        let body = Value::from(list.to_vec()).to_string();
        let (status, _) = nodes
            .call(
                k % 3,
                "POST",
                "/v1/plugins/wq/queues/jobs/tasks",
                body.as_bytes(),
            )
            .await;
        assert_eq!(status, 200);
    }
    // Once the workers are under way, node-3 dies and node-1's worker is
    // swapped for a new version of itself.
    let started = Instant::now();
    while done_so_far(&nodes, &[0, 1, 2]).await < (SUMS / 4) as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the workers never got going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes.procs[2].take().unwrap().kill();
    let component = plexus_tests::variant(&plexus_tests::wasm("task-worker"), 5);
    let (status, body) = http(
        nodes.http[0],
        "POST",
        "/v1/admin/plugins/task-worker/swap",
        &[("authorization", "Bearer worker-token")],
        &component,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // Every task ends: the sums done with their sums, the others failed.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (i, t) in tasks.iter().enumerate() {
        let id = t["key"].as_str().unwrap();
        let path = format!("/v1/plugins/wq/tasks/{id}");
        let task = loop {
            let (_, task) = nodes.call(i % 2, "GET", &path, b"").await;
            if task["state"] == "done" || task["state"] == "failed" {
                break task;
            }
            assert!(Instant::now() < deadline, "{id} never ended: {task}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if i < SUMS {
            assert_eq!(task["result"], json!({ "sum": i as f64 + 0.5 }), "{task}");
        } else {
            assert_eq!(
                (task["state"].as_str(), task["error"].as_str()),
                (Some("failed"), Some("on purpose"))
            );
            assert_eq!(task["attempts"], 2, "{task}");
        }
    }
    // The two workers left report no errors beyond node-3's death.
    for i in 0..2 {
        let (_, s) = nodes
            .call(i, "GET", "/v1/plugins/task-worker/stats", b"")
            .await;
        assert!(s["done"].as_u64().unwrap() > 0, "node-{}: {s}", i + 1);
    }
}
