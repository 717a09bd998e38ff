//! sharding on three, then four `plexus` processes: 10,000 keys written
//! through any node are read through any node; a fourth node joins and a
//! node is drained and leaves while a writer keeps writing, and a
//! cluster-wide swap happens meanwhile; a node killed mid-move has its
//! slots served by their replicas. Nothing acknowledged is lost.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plexus_tests::{Process, Processes, cluster_node_config, free_port, http};
use serde_json::Value;

const TOKEN: &str = "shard-token";
const AUTH: (&str, &str) = ("authorization", "Bearer shard-token");

fn config(i: usize, http: &[SocketAddr], peer: &[SocketAddr]) -> String {
    let plugin = format!(
        r#"
[admin]
token = "{TOKEN}"

[[plugins]]
name = "shards"
component = "bundled:sharding"
capabilities = ["consensus", "storage", "timers", "messaging", "membership"]
[plugins.config]
replicas = 2
slots = 256
"#
    );
    cluster_node_config(i, http, peer, "", &plugin)
}

/// `PUT` or `GET` of a key through `addr`, sent again while the answer
/// says to (no map yet, the map changed, no leader): the status and body;
/// `None` when the node is down.
async fn kv(addr: SocketAddr, method: &str, key: &str, value: &[u8]) -> Option<(u16, Vec<u8>)> {
    let path = format!("/v1/plugins/shards/kv/{key}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http(addr, method, &path, &[], value).await {
            Ok((status, body)) if ![421, 502, 503].contains(&status) => {
                return Some((status, body));
            }
            Ok(_) => {}
            Err(_) => return None,
        }
        assert!(
            Instant::now() < deadline,
            "{method} {key} on {addr} never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The map as `addr` sees it, once no plan is running and `holds` says
/// its members are as wanted.
async fn settled(addr: SocketAddr, holds: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok((200, body)) = http(addr, "GET", "/v1/plugins/shards/map", &[], b"").await {
            let map: Value = serde_json::from_slice(&body).unwrap();
            if map["planning"].is_null() && holds(&map) {
                return map;
            }
        }
        assert!(Instant::now() < deadline, "the map never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn members(map: &Value) -> Vec<String> {
    serde_json::from_value(map["members"].clone()).unwrap()
}

/// What each key should read: its last acknowledged value, or any of the
/// values sent since (a write whose outcome is unknown). A key none of
/// whose writes was acknowledged may also be absent.
#[derive(Default)]
struct Oracle {
    keys: BTreeMap<String, Writes>,
}

/// A key's last acknowledged value, and the values sent since.
type Writes = (Option<Vec<u8>>, Vec<Vec<u8>>);

impl Oracle {
    fn sent(&mut self, key: &str, value: &[u8]) {
        let e = self.keys.entry(key.to_string()).or_default();
        e.1.push(value.to_vec());
    }
    fn acked(&mut self, key: &str, value: &[u8]) {
        let e = self.keys.entry(key.to_string()).or_default();
        *e = (Some(value.to_vec()), Vec::new());
    }
    /// Whether a read of `key` answering `status` with `got` is one the
    /// writes allow.
    fn allows(&self, key: &str, status: u16, got: &[u8]) -> bool {
        let (acked, maybe) = &self.keys[key];
        match (status, acked) {
            (404, None) => true,
            (200, _) => acked.as_deref() == Some(got) || maybe.iter().any(|v| v == got),
            _ => false,
        }
    }
}

/// Writes `values` of `keys` (PUT, concurrency 32, through the nodes in
/// turn), recording each in `oracle`.
async fn write_all(
    nodes: &[SocketAddr],
    keys: Vec<(String, Vec<u8>)>,
    oracle: &Arc<Mutex<Oracle>>,
) {
    let mut set = tokio::task::JoinSet::new();
    for (i, (key, value)) in keys.into_iter().enumerate() {
        while set.len() >= 32 {
            set.join_next().await.unwrap().unwrap();
        }
        let (addr, oracle) = (nodes[i % nodes.len()], oracle.clone());
        set.spawn(async move {
            oracle.lock().unwrap().sent(&key, &value);
            match kv(addr, "PUT", &key, &value).await {
                Some((200, _)) => oracle.lock().unwrap().acked(&key, &value),
                Some((504, _)) | None => {}
                other => panic!("PUT {key}: {other:?}"),
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// Reads every `step`th key of `oracle` (and every hot key) through the
/// nodes in turn and checks it.
async fn check(nodes: &[SocketAddr], oracle: &Arc<Mutex<Oracle>>, step: usize) {
    let keys: Vec<String> = oracle
        .lock()
        .unwrap()
        .keys
        .keys()
        .enumerate()
        .filter(|(i, k)| i % step == 0 || k.starts_with("hot-"))
        .map(|(_, k)| k.clone())
        .collect();
    let mut set = tokio::task::JoinSet::new();
    for (i, key) in keys.into_iter().enumerate() {
        while set.len() >= 32 {
            set.join_next().await.unwrap().unwrap();
        }
        let (addr, oracle) = (nodes[i % nodes.len()], oracle.clone());
        set.spawn(async move {
            let (status, got) = kv(addr, "GET", &key, b"").await.expect("node up");
            let oracle = oracle.lock().unwrap();
            assert!(
                oracle.allows(&key, status, &got),
                "{key} on {addr}: {status} {} (acknowledged: {:?})",
                String::from_utf8_lossy(&got),
                oracle.keys[&key].0.as_deref().map(String::from_utf8_lossy)
            );
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// A writer that keeps overwriting keys `hot-0..100` until stopped.
fn writer(
    nodes: Vec<SocketAddr>,
    oracle: Arc<Mutex<Oracle>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let key = format!("hot-{}", n % 100);
            let value = format!("w{n}").into_bytes();
            oracle.lock().unwrap().sent(&key, &value);
            match kv(nodes[n as usize % nodes.len()], "PUT", &key, &value).await {
                Some((200, _)) => oracle.lock().unwrap().acked(&key, &value),
                Some((504, _)) | None => {}
                other => panic!("PUT {key}: {other:?}"),
            }
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_written_anywhere_are_read_anywhere_through_a_join_a_swap_and_a_drain() {
    let mut nodes = Processes::start(3, config).await;
    let first = settled(nodes.http[0], |m| members(m).len() == 3).await;
    assert_eq!(first["slots"], 256);
    let oracle: Arc<Mutex<Oracle>> = Arc::default();
    let keys: Vec<(String, Vec<u8>)> = (0..10_000)
        .map(|i| (format!("key-{i}"), format!("v{i}").into_bytes()))
        .collect();
    write_all(&nodes.http, keys, &oracle).await;
    check(&nodes.http, &oracle, 1).await;

    // A fourth node joins the log while a writer writes.
    let stop = Arc::new(AtomicBool::new(false));
    let hot = writer(nodes.http.clone(), oracle.clone(), stop.clone());
    let (http4, peer4) = join_fourth(&nodes).await;
    let _node4 = Process::up(
        nodes.dir.path(),
        &nodes.dir.path().join("node-4.toml"),
        http4,
    )
    .await;
    let body = format!(r#"{{"id": "node-4", "addr": "{peer4}"}}"#);
    let (status, answer) = http(
        nodes.http[0],
        "POST",
        "/v1/admin/cluster/members",
        &[AUTH],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    // And the plugin is swapped cluster-wide meanwhile.
    let component = plexus_tests::variant(&plexus_tests::wasm("sharding"), 4);
    let (status, answer) = http(
        nodes.http[1],
        "POST",
        "/v1/admin/plugins/shards/swap?scope=cluster",
        &[AUTH],
        &component,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let map = settled(http4, |m| members(m).len() == 4).await;
    assert!(
        map["nodes"]["node-4"]["primary_slots"].as_u64().unwrap() > 30,
        "{map}"
    );
    let mut all = nodes.http.clone();
    all.push(http4);
    check(&all, &oracle, 5).await;

    // node-2 is drained, then leaves, and is gone.
    let (status, _) = http(
        nodes.http[0],
        "POST",
        "/v1/plugins/shards/drain/node-2",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let map = settled(http4, |m| !members(m).contains(&"node-2".to_string())).await;
    assert!(map["nodes"]["node-2"].is_null(), "{map}");
    stop.store(true, Ordering::Relaxed);
    let writes = hot.await.unwrap();
    let (status, _) = http(
        nodes.http[0],
        "DELETE",
        "/v1/admin/cluster/members/node-2",
        &[AUTH],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    nodes.procs[1].take().unwrap().kill();
    let left = vec![nodes.http[0], nodes.http[2], http4];
    check(&left, &oracle, 1).await;
    eprintln!("{writes} writes during the join, the swap and the drain");
}

/// Writes node-4's config (it joins an existing cluster): its HTTP and
/// peer addresses.
async fn join_fourth(nodes: &Processes) -> (SocketAddr, SocketAddr) {
    let http4: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let peer4: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let base = std::fs::read_to_string(nodes.dir.path().join("node-1.toml")).unwrap();
    let line = |start: &str| {
        base.lines()
            .find(|l| l.starts_with(start))
            .unwrap()
            .to_string()
    };
    let (peers, listen) = (line("peers = "), line("listen = "));
    let listen1 = listen
        .trim_start_matches("listen = ")
        .trim_matches('"')
        .to_string();
    let config = base
        .replace("id = \"node-1\"", "id = \"node-4\"")
        .replace("data-1", "data-4")
        .replace(&nodes.http[0].to_string(), &http4.to_string())
        .replace(&listen, &format!("listen = \"{peer4}\""))
        .replace(
            &peers,
            &format!(
                "{}, \"node-1@{listen1}\"]\njoin = true",
                peers.trim_end_matches(']')
            ),
        );
    std::fs::write(nodes.dir.path().join("node-4.toml"), config).unwrap();
    (http4, peer4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_move_leaves_its_slots_to_their_replicas() {
    let mut nodes = Processes::start(3, config).await;
    settled(nodes.http[0], |m| members(m).len() == 3).await;
    let oracle: Arc<Mutex<Oracle>> = Arc::default();
    let keys: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|i| (format!("key-{i}"), format!("v{i}").into_bytes()))
        .collect();
    write_all(&nodes.http, keys, &oracle).await;
    // node-3 is drained, and killed before its slots are all copied.
    let (status, _) = http(
        nodes.http[0],
        "POST",
        "/v1/plugins/shards/drain/node-3",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, plan) = nodes.call(0, "GET", "/v1/plugins/shards/plan", b"").await;
        if plan["plan"].is_object() {
            break;
        }
        assert!(Instant::now() < deadline, "no plan: {plan}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes.procs[2].take().unwrap().kill();
    let stop = Arc::new(AtomicBool::new(false));
    let two = vec![nodes.http[0], nodes.http[1]];
    let hot = writer(two.clone(), oracle.clone(), stop.clone());
    // Declared dead, node-3 is dropped from its slots: each is served by
    // its replica, and copied to a new second holder.
    let map = settled(nodes.http[0], |m| {
        m["nodes"]["node-3"].is_null() && m["nodes"]["node-1"]["replica_slots"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(members(&map), ["node-1", "node-2"]);
    stop.store(true, Ordering::Relaxed);
    hot.await.unwrap();
    check(&two, &oracle, 3).await;
    // node-3 comes back, drained: it holds nothing, and the keys stay.
    let p = nodes.spawn(2).await;
    nodes.procs[2] = Some(p);
    check(&nodes.http, &oracle, 1).await;
}
