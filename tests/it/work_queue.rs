//! work-queue on three `plexus` processes: workers on every node share a
//! queue, one node is killed with tasks leased to its worker and the
//! plugin is swapped cluster-wide mid-run, and every task still completes
//! with its result accepted exactly once; a late result under an old
//! token is refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plexus_tests::{Processes, cluster_node_config, http};

const TASKS: usize = 150;

fn config(i: usize, http: &[SocketAddr], peer: &[SocketAddr]) -> String {
    let plugin = r#"
[admin]
token = "wq-token"

[[plugins]]
name = "wq"
component = "bundled:work-queue"
capabilities = ["consensus", "storage", "timers"]
"#;
    cluster_node_config(i, http, peer, "", plugin)
}

/// `method path` on `addr` until it answers other than 421/503/504 (no
/// leader yet, or an outcome unknown); the status and body.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<(u16, serde_json::Value)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match http(addr, method, path, &[], body).await {
            Ok((status, bytes)) if ![421, 503, 504].contains(&status) => {
                let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                return Some((status, v));
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => return None,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_completes_once_when_a_workers_node_is_killed() {
    let mut nodes = Processes::start(3, config).await;
    let addrs = nodes.http.clone();
    for i in 0..TASKS {
        let task = format!(r#"{{"payload": {{"n": {i}}}, "key": "task-{i}"}}"#);
        let (status, _) = call(
            addrs[i % 3],
            "POST",
            "/v1/plugins/wq/queues/jobs/tasks",
            task.as_bytes(),
        )
        .await
        .expect("submitted");
        assert_eq!(status, 200);
    }
    // One worker per node; a result accepted is counted by task.
    let accepted: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let stale = Arc::new(Mutex::new(0usize));
    let worker = |n: usize| {
        let (addr, accepted, stale) = (addrs[n], accepted.clone(), stale.clone());
        tokio::spawn(async move {
            // A long poll: an empty queue holds the request up to a second.
            let lease =
                format!("/v1/plugins/wq/queues/jobs/lease?worker=w{n}&lease_ms=1500&wait_ms=1000");
            let deadline = Instant::now() + Duration::from_secs(90);
            // Three empty long polls in a row: the queue is drained (a lease
            // that ran out frees its task within a second and a half).
            let mut empty = 0;
            while Instant::now() < deadline && empty < 3 {
                let Some((status, task)) = call(addr, "POST", &lease, b"").await else {
                    return; // its node is gone
                };
                if status == 204 {
                    empty += 1;
                    continue;
                }
                empty = 0;
                let id = task["id"].as_str().unwrap().to_string();
                let token = task["token"].as_u64().unwrap();
                let done = format!("/v1/plugins/wq/tasks/{id}/complete?token={token}");
                match call(addr, "POST", &done, format!("{n}").as_bytes()).await {
                    Some((200, _)) => *accepted.lock().unwrap().entry(id).or_default() += 1,
                    Some((409, _)) => *stale.lock().unwrap() += 1,
                    Some(other) => panic!("complete {id}: {other:?}"),
                    None => return,
                }
            }
        })
    };
    let workers: Vec<_> = (0..3).map(worker).collect();
    // Once work is under way, node-3 dies with whatever its worker holds.
    let started = Instant::now();
    while accepted.lock().unwrap().len() < TASKS / 5 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodes.procs[2].take().unwrap().kill();
    // And the plugin is swapped on the two left, at one place in the log.
    let component = plexus_tests::variant(&plexus_tests::wasm("work-queue"), 3);
    let auth = ("authorization", "Bearer wq-token");
    let (status, body) = http(
        addrs[0],
        "POST",
        "/v1/admin/plugins/wq/swap?scope=cluster",
        &[auth],
        &component,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    for w in workers {
        w.await.unwrap();
    }
    // No result was accepted twice. (A completion whose answer was lost
    // and that was sent again gets 409 the second time, so a task may be
    // done without a 200 seen here.)
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.values().all(|n| *n == 1),
        "a result accepted twice: {accepted:?}"
    );
    // Every task is done, on a surviving node's view.
    for i in 0..TASKS {
        let path = format!("/v1/plugins/wq/tasks/task-{i}");
        let (_, task) = call(addrs[0], "GET", &path, b"").await.unwrap();
        assert_eq!(task["state"], "done", "{task}");
    }
    // A late result under a token that is no longer current is refused.
    let (_, task) = call(addrs[0], "GET", "/v1/plugins/wq/tasks/task-0", b"")
        .await
        .unwrap();
    let old = task["attempts"].as_u64().unwrap().saturating_sub(1);
    let (status, body) = call(
        addrs[1],
        "POST",
        &format!("/v1/plugins/wq/tasks/task-0/complete?token={old}"),
        b"9",
    )
    .await
    .unwrap();
    assert_eq!(status, 409, "{body}");
}
