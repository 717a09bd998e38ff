//! gossip-crdt on three real `plexus` processes: replicas changed on
//! different nodes converge through gossip, a node asks another for its
//! replica with a request, replicas survive restarts, and a node that was
//! away or lost its data catches up.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use plexus_tests::{Processes, cluster_node_config, http};

fn config(i: usize, http: &[SocketAddr], peer: &[SocketAddr]) -> String {
    let plugin = r#"
[[plugins]]
name = "crdt"
component = "bundled:gossip-crdt"
capabilities = ["messaging", "membership", "storage", "timers", "log"]
config = { gossip_ms = 100 }
"#;
    cluster_node_config(i, http, peer, "", plugin)
}

/// The three nodes, with calls to their `crdt` plugin.
struct Nodes(Processes);

impl std::ops::Deref for Nodes {
    type Target = Processes;
    fn deref(&self) -> &Processes {
        &self.0
    }
}

impl std::ops::DerefMut for Nodes {
    fn deref_mut(&mut self) -> &mut Processes {
        &mut self.0
    }
}

impl Nodes {
    async fn start() -> Nodes {
        Nodes(Processes::start(3, config).await)
    }

    /// Calls the plugin on node `i`; the status and JSON body.
    async fn call(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let (status, body) = http(
            self.http[i],
            method,
            &format!("/v1/plugins/crdt{path}"),
            &[],
            body.as_bytes(),
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on node-{}: {e:#}", i + 1));
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    /// Adds `by` to counter `name` on node `i`.
    async fn incr(&self, i: usize, name: &str, by: u64) {
        let (status, body) = self
            .call(
                i,
                "POST",
                &format!("/counters/{name}/incr"),
                &format!(r#"{{"by": {by}}}"#),
            )
            .await;
        assert_eq!(status, 200, "incr on node-{}: {body}", i + 1);
    }

    /// Waits until `path` reads `expected` (at `field`) on every running node.
    async fn converge(&self, path: &str, field: &str, expected: serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(15);
        for i in 0..3 {
            if self.procs[i].is_none() {
                continue;
            }
            loop {
                let (status, body) = self.call(i, "GET", path, "").await;
                if status == 200 && body[field] == expected {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node-{} never converged on {path}: {status} {body}, expected {expected}",
                    i + 1
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Waits until register `key` reads `expected` (`None`: absent) on
    /// every node.
    async fn register_everywhere(&self, key: &str, expected: Option<&str>) {
        let want = match expected {
            Some(v) => (200, v.as_bytes().to_vec()),
            None => (404, Vec::new()),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        for i in 0..3 {
            loop {
                let (status, body) = http(
                    self.http[i],
                    "GET",
                    &format!("/v1/plugins/crdt/registers/{key}"),
                    &[],
                    b"",
                )
                .await
                .unwrap();
                if status == want.0 && (status == 404 || body == want.1) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node-{} reads {key} as {status} {}, expected {expected:?}",
                    i + 1,
                    String::from_utf8_lossy(&body)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_changed_on_every_node_converge() {
    let n = Nodes::start().await;

    // Counters: each node changes its own share, all at once.
    let (a, b, c) = tokio::join!(
        n.call(0, "POST", "/counters/hits/incr", r#"{"by": 3}"#),
        n.call(1, "POST", "/counters/hits/incr", r#"{"by": 5}"#),
        n.call(2, "POST", "/counters/hits/decr", r#"{"by": 2}"#),
    );
    assert_eq!((a.0, b.0, c.0), (200, 200, 200), "{a:?} {b:?} {c:?}");
    assert_eq!(
        a.1["by_node"]["node-1"], 3,
        "a node's own change shows at once: {}",
        a.1
    );
    n.converge("/counters/hits", "value", serde_json::json!(6))
        .await;
    let (_, hits) = n.call(2, "GET", "/counters/hits", "").await;
    assert_eq!(
        hits["by_node"],
        serde_json::json!({ "node-1": 3, "node-2": 5, "node-3": -2 })
    );

    // Sets: a remove takes out the adds it has seen, and only those. The
    // add on node-3 comes after node-2's remove, whether or not node-3 has
    // heard of the remove yet, so it stays. (Which of two truly
    // concurrent operations a node saw first is up to the gossip rounds;
    // the plugin's unit tests cover that case.)
    assert_eq!(n.call(0, "POST", "/sets/s/add", "x").await.0, 200);
    n.converge("/sets/s", "elements", serde_json::json!(["x"]))
        .await;
    let removed = n.call(1, "POST", "/sets/s/remove", "x").await;
    assert_eq!(removed.1["elements"], serde_json::json!([]), "{removed:?}");
    assert_eq!(n.call(2, "POST", "/sets/s/add", "x").await.0, 200);
    n.converge("/sets/s", "elements", serde_json::json!(["x"]))
        .await;
    // node-2 shows `x` only through node-3's add, so its remove has seen
    // every add there is.
    assert_eq!(n.call(1, "POST", "/sets/s/remove", "x").await.0, 200);
    n.converge("/sets/s", "elements", serde_json::json!([]))
        .await;

    // Registers: the later write wins everywhere, a delete included.
    assert_eq!(n.call(0, "PUT", "/registers/k", "first").await.0, 200);
    n.register_everywhere("k", Some("first")).await;
    assert_eq!(n.call(1, "PUT", "/registers/k", "second").await.0, 200);
    n.register_everywhere("k", Some("second")).await;
    assert_eq!(n.call(2, "DELETE", "/registers/k", "").await.0, 200);
    n.register_everywhere("k", None).await;

    // A request to another node's instance answers with its replica.
    let (status, peer) = n.call(0, "GET", "/peers/node-3/counters/hits", "").await;
    assert_eq!(
        (status, &peer["value"]),
        (200, &serde_json::json!(6)),
        "{peer}"
    );
    let (status, _) = n.call(0, "GET", "/peers/node-9/counters/hits", "").await;
    assert_eq!(status, 502, "a request to a node that is not a member");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_survive_restarts_and_a_node_that_was_away_catches_up() {
    let mut n = Nodes::start().await;
    n.incr(2, "c", 7).await;
    n.converge("/counters/c", "value", serde_json::json!(7))
        .await;

    n.procs[2].take().unwrap().kill();
    n.incr(0, "c", 10).await;
    assert_eq!(n.call(1, "POST", "/sets/while-away/add", "y").await.0, 200);
    n.converge("/counters/c", "value", serde_json::json!(17))
        .await;

    // node-3 alone: what it serves comes from its own storage.
    n.procs[0].take().unwrap().kill();
    n.procs[1].take().unwrap().kill();
    n.procs[2] = Some(n.spawn(2).await);
    let (status, c) = n.call(2, "GET", "/counters/c", "").await;
    assert_eq!((status, &c["value"]), (200, &serde_json::json!(7)), "{c}");

    // The others come back with theirs, and gossip brings node-3 the rest.
    n.procs[0] = Some(n.spawn(0).await);
    n.procs[1] = Some(n.spawn(1).await);
    n.converge("/counters/c", "value", serde_json::json!(17))
        .await;
    n.converge("/sets/while-away", "elements", serde_json::json!(["y"]))
        .await;
    let (_, c) = n.call(2, "GET", "/counters/c", "").await;
    assert_eq!(
        c["by_node"],
        serde_json::json!({ "node-1": 10, "node-3": 7 }),
        "{c}"
    );

    // A node whose plugin storage is lost starts a new replica: what it
    // counts from then on adds to what its old one counted.
    n.procs[2].take().unwrap().kill();
    std::fs::remove_file(n.dir.path().join("data-3/state.redb")).unwrap();
    n.procs[2] = Some(n.spawn(2).await);
    n.converge("/counters/c", "value", serde_json::json!(17))
        .await;
    n.incr(2, "c", 1).await;
    n.converge("/counters/c", "value", serde_json::json!(18))
        .await;
}
