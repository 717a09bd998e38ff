//! work-queue on three `plexus` processes: 10,000 tasks, submitted in
//! lists, shared by a worker on every node. One worker stops mid-task and
//! its node is killed; the plugin is swapped cluster-wide mid-run. Every
//! task still completes with its result accepted exactly once, the tasks
//! the dead node's worker held go back under a higher token once
//! membership declares the node dead, and that worker's late result is
//! refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plexus_tests::{Processes, cluster_node_config, http};
use serde_json::{Value, json};

const TASKS: usize = 10_000;
/// Tasks per submit, and most tasks per lease.
const LIST: usize = 500;
const LEASE_MAX: usize = 25;

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

/// Results accepted, by task: the worker and token of each acceptance.
type Accepted = Arc<Mutex<BTreeMap<String, Vec<(usize, u64)>>>>;

/// Completes one leased task with `{"worker", "token"}` as its result.
/// A 409 after an outcome lost in flight (the call is sent again on a
/// 504) is an acceptance when the task now holds this very result.
async fn complete(addr: SocketAddr, n: usize, task: &Value, accepted: &Accepted) -> Option<()> {
    let id = task["id"].as_str().unwrap().to_string();
    let token = task["token"].as_u64().unwrap();
    let mine = json!({ "worker": n, "token": token });
    let path = format!("/v1/plugins/wq/tasks/{id}/complete?token={token}");
    let done = match Processes::call_while_up(addr, "POST", &path, mine.to_string().as_bytes())
        .await?
    {
        (200, _) => true,
        (409, _) => {
            let (_, now) =
                Processes::call_while_up(addr, "GET", &format!("/v1/plugins/wq/tasks/{id}"), b"")
                    .await?;
            now["result"] == mine
        }
        other => panic!("complete {id}: {other:?}"),
    };
    if done {
        accepted
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .push((n, token));
    }
    Some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_complete_once_each_when_a_workers_node_is_killed() {
    let mut nodes = Processes::start(3, config).await;
    let addrs = nodes.http.clone();
    for (k, chunk) in (0..TASKS).collect::<Vec<_>>().chunks(LIST).enumerate() {
        let list: Vec<Value> = chunk
            .iter()
            .map(|i| json!({ "payload": { "n": i }, "key": format!("task-{i}") }))
            .collect();
        let body = Value::from(list).to_string();
        let (status, ids) = nodes
            .call(
                k % 3,
                "POST",
                "/v1/plugins/wq/queues/jobs/tasks",
                body.as_bytes(),
            )
            .await;
        assert_eq!(
            (status, ids.as_array().map(Vec::len)),
            (200, Some(chunk.len()))
        );
    }
    let accepted: Accepted = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // node-3's worker, once told to, takes a last batch and stops as if
    // mid-task: what it holds is sent back here.
    let freeze = Arc::new(AtomicBool::new(false));
    let worker = |n: usize| {
        let (addr, accepted, stop, freeze) =
            (addrs[n], accepted.clone(), stop.clone(), freeze.clone());
        tokio::spawn(async move {
            // Leases last 30 s: only the node's death puts them back sooner.
            let lease = format!(
                "/v1/plugins/wq/queues/jobs/lease?worker=w{n}&max={LEASE_MAX}&lease_ms=30000&wait_ms=1000"
            );
            while !stop.load(Ordering::Relaxed) {
                let (status, tasks) = Processes::call_while_up(addr, "POST", &lease, b"").await?;
                if status == 204 {
                    continue;
                }
                assert_eq!(status, 200, "{tasks}");
                let tasks = tasks.as_array().unwrap().clone();
                if n == 2 && freeze.load(Ordering::Relaxed) {
                    return Some(tasks);
                }
                let mut done = tokio::task::JoinSet::new();
                for t in tasks {
                    let accepted = accepted.clone();
                    done.spawn(async move { complete(addr, n, &t, &accepted).await });
                }
                while let Some(r) = done.join_next().await {
                    r.unwrap()?;
                }
            }
            Some(Vec::new())
        })
    };
    let mut workers: Vec<_> = (0..3).map(worker).collect();
    let progress = |what: &str, until: usize, secs: u64| {
        let accepted = accepted.clone();
        let what = what.to_string();
        async move {
            let started = Instant::now();
            while accepted.lock().unwrap().len() < until {
                let n = accepted.lock().unwrap().len();
                assert!(
                    started.elapsed() < Duration::from_secs(secs),
                    "{what}: {n} of {until}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    progress("under way", TASKS / 5, 120).await;
    freeze.store(true, Ordering::Relaxed);
    let held = workers
        .remove(2)
        .await
        .unwrap()
        .expect("node-3 is up until killed");
    assert!(!held.is_empty(), "node-3's worker stopped holding nothing");
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
    progress("all done", TASKS, 240).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    // Each task's result was accepted once, from one worker.
    let accepted = accepted.lock().unwrap().clone();
    let twice: Vec<_> = accepted.iter().filter(|(_, a)| a.len() != 1).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
    assert_eq!(accepted.len(), TASKS);
    // What node-3's worker held went back when node-3 was declared dead
    // (30 s leases had not run out), to a worker on a live node under a
    // higher token; its late result under the old token is refused.
    for t in &held {
        let id = t["id"].as_str().unwrap();
        let old = t["token"].as_u64().unwrap();
        let (_, now) = nodes
            .call(0, "GET", &format!("/v1/plugins/wq/tasks/{id}"), b"")
            .await;
        assert_eq!(now["state"], "done", "{now}");
        assert!(now["result"]["token"].as_u64().unwrap() > old, "{now}");
        let why = now["last_error"].as_str().unwrap_or_default();
        assert!(
            why.contains("node-3") && why.contains("declared dead"),
            "{now}"
        );
        let late = format!("/v1/plugins/wq/tasks/{id}/complete?token={old}");
        let (status, body) = nodes.call(1, "POST", &late, b"{}").await;
        assert_eq!(status, 409, "{body}");
    }
    // A sample of the tasks, read back on a live node, is done with the
    // result that was accepted.
    for i in (0..TASKS).step_by(97) {
        let id = format!("task-{i}");
        let (_, now) = nodes
            .call(1, "GET", &format!("/v1/plugins/wq/tasks/{id}"), b"")
            .await;
        let (w, token) = accepted[&id][0];
        assert_eq!(
            now["result"],
            json!({ "worker": w, "token": token }),
            "{id}"
        );
    }
}
