//! A 3-node cluster of real `plexus` processes on 127.0.0.1: replication,
//! leader failover under writes, catch-up after restart, and leader
//! election across failover.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexus_tests::{Process, cluster_node_config, free_port, http, loopback_addrs};

const TOKEN: &str = "cluster-token";

pub(crate) struct Cluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) http: Vec<SocketAddr>,
    pub(crate) peer: Vec<SocketAddr>,
    pub(crate) nodes: Vec<Option<Process>>,
}

fn node_config(
    i: usize,
    http: &[SocketAddr],
    peer: &[SocketAddr],
    ttl_ms: u64,
    snapshot_every: u64,
) -> String {
    cluster_node_config(
        i,
        http,
        peer,
        &format!("snapshot_every = {snapshot_every}"),
        &format!(
            r#"
[admin]
token = "{TOKEN}"

[[plugins]]
name = "kv"
component = "bundled:replicated-kv"
capabilities = ["consensus", "storage", "log"]

[[plugins]]
name = "election"
component = "bundled:leader-election"
capabilities = ["consensus", "storage", "timers", "log"]
config = {{ campaign = ["primary"], ttl_ms = {ttl_ms} }}
"#
        ),
    )
}

impl Cluster {
    pub(crate) async fn start(ttl_ms: u64) -> Cluster {
        Cluster::start_with(ttl_ms, 20_000).await
    }

    pub(crate) async fn start_with(ttl_ms: u64, snapshot_every: u64) -> Cluster {
        Cluster::start_edited(ttl_ms, snapshot_every, |_, config| config).await
    }

    /// Starts three nodes whose configs `edit(i, config)` changes first.
    pub(crate) async fn start_edited(
        ttl_ms: u64,
        snapshot_every: u64,
        edit: impl Fn(usize, String) -> String,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (http, peer) = (loopback_addrs(3), loopback_addrs(3));
        for i in 0..3 {
            std::fs::write(
                dir.path().join(format!("node-{}.toml", i + 1)),
                edit(i, node_config(i, &http, &peer, ttl_ms, snapshot_every)),
            )
            .unwrap();
        }
        let mut c = Cluster {
            dir,
            http,
            peer,
            nodes: Vec::new(),
        };
        for i in 0..3 {
            let p = c.spawn(i).await;
            c.nodes.push(Some(p));
        }
        c
    }

    pub(crate) fn config(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{}.toml", i + 1))
    }

    pub(crate) async fn spawn(&self, i: usize) -> Process {
        Process::up(self.dir.path(), &self.config(i), self.http[i]).await
    }

    pub(crate) async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            for i in 0..3 {
                if self.nodes[i].is_none() {
                    continue;
                }
                if let Some(view) = status(self.http[i]).await
                    && let Some(l) = view["leader"].as_str()
                {
                    let l: usize = l.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
                    // Another node's view may lag behind an election: the
                    // leader is the one that says so itself.
                    let claimed = format!("node-{}", l + 1);
                    if self.nodes[l].is_some()
                        && let Some(own) = status(self.http[l]).await
                        && own["leader"].as_str() == Some(claimed.as_str())
                    {
                        return l;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader elected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill();
        }
    }

    pub(crate) fn alive(&self) -> Vec<usize> {
        (0..3).filter(|i| self.nodes[*i].is_some()).collect()
    }
}

pub(crate) async fn get(addr: SocketAddr, key: &str) -> Option<Vec<u8>> {
    match http(addr, "GET", &format!("/v1/plugins/kv/kv/{key}"), &[], b"").await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// Reads `key` for a durability check: the value on 200, `None` on 404.
/// A node that cannot serve the read yet (503/504, refused connection) is
/// asked again for up to 20 s; after that the test fails with the status,
/// so a lost write and a read that could not be served are told apart.
pub(crate) async fn read(addr: SocketAddr, key: &str) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let last = match http(addr, "GET", &format!("/v1/plugins/kv/kv/{key}"), &[], b"").await {
            Ok((200, body)) => return Some(body),
            Ok((404, _)) => return None,
            Ok((status, body)) => format!("{status} {}", String::from_utf8_lossy(&body)),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            Instant::now() < deadline,
            "read of {key} on {addr} still fails: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn put(addr: SocketAddr, key: &str, value: &str) -> bool {
    matches!(
        http(
            addr,
            "PUT",
            &format!("/v1/plugins/kv/kv/{key}"),
            &[],
            value.as_bytes()
        )
        .await,
        Ok((200, _))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_node_is_read_on_the_others() {
    let c = Cluster::start(3000).await;
    c.leader().await;
    assert!(put(c.http[0], "greeting", "hello").await);
    assert!(put(c.http[2], "other", "from-3").await);
    for i in 0..3 {
        assert_eq!(
            get(c.http[i], "greeting").await.as_deref(),
            Some(&b"hello"[..]),
            "node-{}",
            i + 1
        );
        assert_eq!(
            get(c.http[i], "other").await.as_deref(),
            Some(&b"from-3"[..]),
            "node-{}",
            i + 1
        );
    }
    // Versions are log indices, so a compare-and-swap works on any node.
    let (_, body) = http(c.http[1], "GET", "/v1/plugins/kv/kv?prefix=greet", &[], b"")
        .await
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let version = listed[0]["version"].as_u64().unwrap();
    let (status, _) = http(
        c.http[1],
        "PUT",
        &format!("/v1/plugins/kv/kv/greeting?version={version}"),
        &[],
        b"hi",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let (status, _) = http(
        c.http[2],
        "PUT",
        &format!("/v1/plugins/kv/kv/greeting?version={version}"),
        &[],
        b"late",
    )
    .await
    .unwrap();
    assert_eq!(status, 409);
    // One holder of the campaigned role, the same on every node.
    let mut holders = Vec::new();
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((200, body)) = http(
                c.http[i],
                "GET",
                "/v1/plugins/election/roles/primary",
                &[],
                b"",
            )
            .await
            {
                let lease: serde_json::Value = serde_json::from_slice(&body).unwrap();
                holders.push((
                    lease["holder"].as_str().unwrap().to_string(),
                    lease["token"].as_u64().unwrap(),
                ));
                break;
            }
            assert!(Instant::now() < deadline, "role never held");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(holders.windows(2).all(|w| w[0] == w[1]), "{holders:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3000).await;
    let leader = c.leader().await;
    let writer = (leader + 1) % 3;
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut failed = 0;
    for i in 0..60 {
        if i == 20 {
            c.kill(leader);
        }
        let (key, value) = (format!("k{}", i % 15), format!("v{i}"));
        // Retry through whichever survivor answers; only a 200 counts.
        let mut ok = false;
        for attempt in 0..3 {
            let node = c.alive()[(writer + attempt) % c.alive().len()];
            if put(c.http[node], &key, &value).await {
                ok = true;
                break;
            }
        }
        if ok {
            acked.retain(|(k, _)| *k != key);
            acked.push((key, value));
        } else {
            failed += 1;
        }
    }
    assert!(failed <= 5, "{failed} writes failed around the failover");
    let new_leader = c.leader().await;
    assert_ne!(new_leader, leader);
    for i in c.alive() {
        for (key, value) in &acked {
            assert_eq!(
                read(c.http[i], key).await.as_deref(),
                Some(value.as_bytes()),
                "node-{} lost {key}",
                i + 1
            );
        }
    }
    // The killed node restarts and catches up.
    let p = c.spawn(leader).await;
    c.nodes[leader] = Some(p);
    for (key, value) in &acked {
        assert_eq!(
            read(c.http[leader], key).await.as_deref(),
            Some(value.as_bytes()),
            "restarted node missing {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_moves_on_with_a_larger_fencing_token_when_its_holder_dies() {
    let mut c = Cluster::start(1000).await;
    let read = |c: &Cluster, i: usize| {
        let addr = c.http[i];
        async move {
            match http(addr, "GET", "/v1/plugins/election/roles/primary", &[], b"").await {
                Ok((200, body)) => {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    Some((
                        v["holder"].as_str().unwrap().to_string(),
                        v["token"].as_u64().unwrap(),
                        v["expired"].as_bool().unwrap(),
                    ))
                }
                _ => None,
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (holder, token) = loop {
        if let Some((h, t, false)) = read(&c, 0).await {
            break (h, t);
        }
        assert!(Instant::now() < deadline, "nobody took the role");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let holder_index: usize = holder.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
    c.kill(holder_index);
    let survivor = c.alive()[0];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((h, t, false)) = read(&c, survivor).await
            && h != holder
        {
            assert!(t > token, "fencing token went from {token} to {t}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the role never moved from {holder}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_minority_node_rejoins_and_catches_up() {
    let c = Cluster::start(3000).await;
    let leader = c.leader().await;
    let paused = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let pid = c.nodes[paused].as_ref().unwrap().child.id().to_string();
    let signal = |sig: &str| signal(sig, std::slice::from_ref(&pid));
    signal("-STOP");
    // The majority keeps serving writes and reads.
    for i in 0..20 {
        assert!(
            put(
                c.http[if i % 2 == 0 { leader } else { other }],
                &format!("p{i}"),
                &format!("v{i}")
            )
            .await,
            "write {i}"
        );
    }
    assert_eq!(
        get(c.http[other], "p19").await.as_deref(),
        Some(&b"v19"[..])
    );
    signal("-CONT");
    // Back, it answers linearizable reads with everything written meanwhile.
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..20 {
        loop {
            if get(c.http[paused], &format!("p{i}")).await.as_deref()
                == Some(format!("v{i}").as_bytes())
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "paused node never caught up on p{i}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_swap_switches_every_node_at_one_index_under_writes() {
    let mut c = Cluster::start(3000).await;
    c.leader().await;
    let writer_addr = c.http[0];
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = done.clone();
    let writes = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut failed = 0;
        for i in 0..150 {
            let key = format!("s{}", i % 10);
            let value = format!("v{i}");
            if put(writer_addr, &key, &value).await {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                acked.retain(|(k, _): &(String, String)| *k != key);
                acked.push((key, value));
            } else {
                failed += 1;
            }
        }
        (acked, failed)
    });
    // The writes are under way before the swap.
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.load(std::sync::atomic::Ordering::Relaxed) < 10 {
        assert!(Instant::now() < deadline, "no writes acknowledged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (index, version) = swap_cluster_wide(c.http[1], 42).await;

    let (acked, failed) = writes.await.unwrap();
    // A write whose entry landed behind the swap entry while its proposer
    // was still the old version reports an unknown outcome (504), and
    // writes queued behind a node compiling the new version may time out;
    // neither is acknowledged, and no acknowledged write may be lost.
    assert!(
        failed <= 50,
        "{failed} of 150 writes failed: the load did not go on through the swap"
    );
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = kv_status(c.http[i]).await;
            if s["swapped_at_index"].as_u64() == Some(index) {
                assert_eq!(
                    s["version"].as_str(),
                    Some(version.as_str()),
                    "node-{}",
                    i + 1
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node-{} never switched: {s}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (key, value) in &acked {
            assert_eq!(
                read(c.http[i], key).await.as_deref(),
                Some(value.as_bytes()),
                "node-{} lost {key}",
                i + 1
            );
        }
    }

    // A node restarted from its config comes back on the swapped version,
    // switching at the swap's index: at once when its cursor on disk is
    // past the swap, or when it applies the swap entry again when its
    // last checkpoint was before it (its config's version applies the
    // entries up to the swap, as it did the first time).
    c.kill(2);
    let p = c.spawn(2).await;
    c.nodes[2] = Some(p);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = kv_status(c.http[2]).await;
        if s["swapped_at_index"].as_u64().is_some() {
            assert_eq!(
                (s["version"].as_str(), s["swapped_at_index"].as_u64()),
                (Some(version.as_str()), Some(index)),
                "restarted node-3: {s}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted node-3 never switched: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(put(c.http[2], "after-restart", "1").await);
    assert_eq!(
        read(c.http[0], "after-restart").await.as_deref(),
        Some(&b"1"[..])
    );
}

/// An admin API call to the node at `addr`, with the cluster's token.
pub(crate) async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    let auth = format!("Bearer {TOKEN}");
    http(addr, method, path, &[("authorization", &auth)], body).await
}

/// The node's `/v1/admin/status`, if it answers 200.
pub(crate) async fn status(addr: SocketAddr) -> Option<serde_json::Value> {
    let (code, body) = admin(addr, "GET", "/v1/admin/status", b"").await.ok()?;
    if code != 200 {
        return None;
    }
    serde_json::from_slice(&body).ok()
}

async fn states(addr: SocketAddr) -> Option<Vec<(String, String)>> {
    let v = status(addr).await?;
    Some(
        v["members"]
            .as_array()?
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or("").to_string(),
                    m["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect(),
    )
}

async fn wait_state(addr: SocketAddr, member: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = states(addr).await
            && s.iter().any(|(id, st)| id == member && st == state)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{member} never became {state} as seen from {addr}: {:?}",
            states(addr).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_detector_sees_a_member_die_and_come_back() {
    let mut c = Cluster::start(3000).await;
    for i in 0..3 {
        for m in 1..=3 {
            wait_state(c.http[i], &format!("node-{m}"), "alive").await;
        }
    }
    c.kill(2);
    wait_state(c.http[0], "node-3", "dead").await;
    wait_state(c.http[1], "node-3", "dead").await;
    let p = c.spawn(2).await;
    c.nodes[2] = Some(p);
    wait_state(c.http[0], "node-3", "alive").await;
    wait_state(c.http[2], "node-1", "alive").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_compacted_entries_catches_up_from_a_snapshot() {
    let mut c = Cluster::start_with(3000, 20).await;
    let leader = c.leader().await;
    let lagging = (leader + 1) % 3;
    let writer = (leader + 2) % 3;
    assert!(put(c.http[writer], "before", "1").await);
    c.kill(lagging);
    // Far more entries than a snapshot interval: the log the lagging node
    // needs is purged, so it can only catch up from a snapshot. A
    // cluster-wide swap lies in the compacted part.
    let mut swapped = None;
    for i in 0..120 {
        assert!(
            put(c.http[writer], &format!("s{}", i % 30), &format!("v{i}")).await,
            "write {i}"
        );
        if i == 40 {
            swapped = Some(swap_cluster_wide(c.http[writer], 7).await);
        }
    }
    let (swap_index, swap_version) = swapped.unwrap();
    let p = c.spawn(lagging).await;
    c.nodes[lagging] = Some(p);
    for i in 90..120 {
        let key = format!("s{}", i % 30);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if get(c.http[lagging], &key).await.as_deref() == Some(format!("v{i}").as_bytes()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "restarted node never caught up on {key}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        get(c.http[lagging], "before").await.as_deref(),
        Some(&b"1"[..])
    );
    let (_, stats) = http(c.http[lagging], "GET", "/v1/plugins/kv/stats", &[], b"")
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats).unwrap();
    assert_eq!(
        stats["applied"], 121,
        "every write applied exactly once on the caught-up node"
    );

    // The writer compacted its stream behind the plugin's own state, and
    // the restarted node took that state (storage and `snapshot` bytes)
    // in place of the entries it missed.
    assert!(counter(c.http[writer], "plexus_consensus_snapshots_built_total").await > 0);
    assert!(
        counter(
            c.http[lagging],
            "plexus_consensus_snapshots_installed_total"
        )
        .await
            > 0
    );
    let s = kv_status(c.http[lagging]).await;
    assert!(
        s["restored_at_index"]
            .as_u64()
            .is_some_and(|i| i > swap_index),
        "the plugin was restored from a snapshot taken after the swap: {s}"
    );
    assert_eq!(
        (s["swapped_at_index"].as_u64(), s["version"].as_str()),
        (Some(swap_index), Some(swap_version.as_str())),
        "the swap in the compacted part was applied before the restore"
    );
    // Writes go on after the restore, on every node.
    assert!(put(c.http[lagging], "after", "2").await);
    for i in 0..3 {
        assert_eq!(read(c.http[i], "after").await.as_deref(), Some(&b"2"[..]));
    }
}

/// Waits until the `kv` plugin's status on `addr` satisfies `check`.
async fn wait_kv(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = kv_status(addr).await;
        if check(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} not seen: {status:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nodes whose configs grant a plugin different capabilities: a
/// cluster-wide swap to a component that needs one node-3 does not grant
/// switches nodes 1 and 2, and leaves node-3 on the old version, saying
/// why in its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_load_a_cluster_wide_swap_keeps_the_old_version_and_says_why() {
    const KV_CAPS: &str = r#"capabilities = ["consensus", "storage", "log"]"#;
    let c = Cluster::start_edited(600_000, 20_000, |i, config| {
        assert!(config.contains(KV_CAPS));
        if i < 2 {
            config.replacen(
                KV_CAPS,
                r#"capabilities = ["consensus", "storage", "log", "timers"]"#,
                1,
            )
        } else {
            config
        }
    })
    .await;
    c.leader().await;
    assert!(put(c.http[0], "before", "1").await);
    let old = kv_status(c.http[2]).await["version"]
        .as_str()
        .unwrap()
        .to_string();
    // leader-election's component imports `timers`.
    let (index, new) = swap_kv_to(c.http[0], &plexus_tests::wasm("leader-election")).await;
    for i in 0..2 {
        wait_kv(c.http[i], "the switch", |s| s["version"] == new.as_str()).await;
    }
    let refused = wait_kv(c.http[2], "the refusal", |s| s["control_index"] == index).await;
    assert_eq!(refused["version"], old.as_str());
    let why = refused["last_error"].as_str().unwrap();
    assert!(
        why.starts_with(&format!("cluster-wide swap at index {index} failed: "))
            && why.contains("add \"timers\" to its capabilities"),
        "{why}"
    );
    // It still serves what the old version holds.
    assert_eq!(read(c.http[2], "before").await.as_deref(), Some(&b"1"[..]));
}

/// Swaps `kv` cluster-wide, through `addr`, to a variant of
/// `replicated-kv`; returns the swap's log index and the new version.
async fn swap_cluster_wide(addr: SocketAddr, variant: u8) -> (u64, String) {
    let component = plexus_tests::variant(&plexus_tests::wasm("replicated-kv"), variant);
    swap_kv_to(addr, &component).await
}

/// Swaps `kv` cluster-wide, through `addr`, to `component`; returns the
/// swap's log index and the new version.
async fn swap_kv_to(addr: SocketAddr, component: &[u8]) -> (u64, String) {
    let (status, body) = admin(
        addr,
        "POST",
        "/v1/admin/plugins/kv/swap?scope=cluster",
        component,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let done: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (
        done["index"].as_u64().unwrap(),
        done["version"].as_str().unwrap().to_string(),
    )
}

/// The `kv` plugin's status on the node at `addr`.
async fn kv_status(addr: SocketAddr) -> serde_json::Value {
    let (_, body) = admin(addr, "GET", "/v1/admin/plugins/kv", b"")
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// The value of the counter or gauge `name` (with its labels, if any) in
/// `addr`'s `/metrics`.
pub(crate) async fn counter(addr: SocketAddr, name: &str) -> u64 {
    let (_, body) = http(addr, "GET", "/metrics", &[], b"").await.unwrap();
    let body = String::from_utf8(body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}"))
}

/// Sends `sig` (`-STOP`, `-CONT`) to the processes `pids`.
///
/// A stop is delivered to each thread when it next runs, which on a busy
/// machine can be some milliseconds later; `-STOP` returns only once every
/// thread of every process has stopped.
fn signal(sig: &str, pids: &[String]) {
    for pid in pids {
        let ok = std::process::Command::new("kill")
            .args([sig, pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid} failed");
    }
    if sig != "-STOP" {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in pids {
        while !all_threads_stopped(pid) {
            assert!(Instant::now() < deadline, "process {pid} never stopped");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Whether every thread of process `pid` is stopped (state `T`).
fn all_threads_stopped(pid: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        })
    })
}

/// Runs the `plexus` CLI against the node at `addr`.
pub(crate) fn cli(addr: SocketAddr, args: &[&str]) -> std::process::Output {
    std::process::Command::new(plexus_tests::plexus_bin())
        .args(args)
        .env("PLEXUS_ADDR", addr.to_string())
        .env("PLEXUS_TOKEN", TOKEN)
        .output()
        .unwrap()
}

pub(crate) async fn voters(addr: SocketAddr) -> Vec<String> {
    let status = status(addr).await.expect("the node answers its status");
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["voter"].as_bool() == Some(true))
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_as_a_voter_and_a_voter_leaves() {
    // Snapshots every 10 entries: the log before the join is purged, so
    // the new node starts from a snapshot and its plugin from the
    // snapshot's state.
    let mut c = Cluster::start_with(3000, 10).await;
    let leader = c.leader().await;
    for i in 0..20 {
        assert!(put(c.http[0], &format!("j{i}"), &format!("v{i}")).await);
    }

    // A fourth node starts with `join = true`: it does not form a cluster
    // of its own, and waits to be added.
    let http4: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let peer4: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let base = std::fs::read_to_string(c.config(0)).unwrap();
    let peers_line = base
        .lines()
        .find(|l| l.starts_with("peers = "))
        .unwrap()
        .to_string();
    let listen1 = base
        .lines()
        .find(|l| l.starts_with("listen = "))
        .unwrap()
        .trim_start_matches("listen = ")
        .trim_matches('"')
        .to_string();
    let config4 = base
        .replace("id = \"node-1\"", "id = \"node-4\"")
        .replace("data-1", "data-4")
        .replace(&c.http[0].to_string(), &http4.to_string())
        .replace(
            &format!("listen = \"{listen1}\""),
            &format!("listen = \"{peer4}\""),
        )
        .replace(
            &peers_line,
            &format!(
                "{}, \"node-1@{listen1}\"]\njoin = true",
                peers_line.trim_end_matches(']')
            ),
        );
    let path4 = c.dir.path().join("node-4.toml");
    std::fs::write(&path4, &config4).unwrap();
    let _node4 = Process::up(c.dir.path(), &path4, http4).await;

    let out = cli(
        c.http[1],
        &["cluster", "join", "node-4", &peer4.to_string()],
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "join failed: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("node-4 joined; voters: node-1, node-2, node-3, node-4"),
        "{printed}"
    );
    // The new voter caught up, serves linearizable reads, and takes writes.
    for i in 0..20 {
        assert_eq!(
            read(http4, &format!("j{i}")).await.as_deref(),
            Some(format!("v{i}").as_bytes())
        );
    }
    assert!(put(http4, "from-4", "hello").await);
    assert_eq!(
        read(c.http[0], "from-4").await.as_deref(),
        Some(&b"hello"[..])
    );
    assert!(counter(http4, "plexus_consensus_snapshots_installed_total").await > 0);
    let s = kv_status(http4).await;
    assert!(
        s["restored_at_index"].as_u64().is_some(),
        "node-4's plugin started from the snapshot's state: {s}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while voters(http4).await.len() != 4 {
        assert!(Instant::now() < deadline, "node-4 never saw four voters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A follower leaves. With three voters left, two of them are a
    // quorum: after the leaver and one more node are gone, writes still
    // commit (with four voters they could not).
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (gone, also_gone) = (followers[0], followers[1]);
    let out = cli(
        c.http[leader],
        &["cluster", "leave", &format!("node-{}", gone + 1)],
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "leave failed: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<String> = (1..=4)
        .filter(|n| *n != gone + 1)
        .map(|n| format!("node-{n}"))
        .collect();
    assert!(
        printed.contains(&format!(
            "node-{} left; voters: {}",
            gone + 1,
            left.join(", ")
        )),
        "{printed}"
    );
    c.kill(gone);
    c.kill(also_gone);
    assert!(
        put(c.http[leader], "after-leave", "still-here").await,
        "the remaining two of three voters did not commit"
    );
    assert_eq!(
        read(http4, "after-leave").await.as_deref(),
        Some(&b"still-here"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_quorum_is_answered_504_and_the_node_keeps_serving() {
    let c = Cluster::start(3000).await;
    let leader = c.leader().await;
    assert!(put(c.http[leader], "before", "v0").await);
    let pids: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| c.nodes[i].as_ref().unwrap().child.id().to_string())
        .collect();
    let signal = |sig: &str| signal(sig, &pids);
    signal("-STOP");
    // The writes were submitted and the plugin went on; with no quorum the
    // host gives up on them and answers for the plugin: outcome unknown.
    // The second is queued behind the first, which cannot commit; its
    // deadline runs from its own submission, so it too is answered by the
    // host before the request times out.
    let addr = c.http[leader];
    let stuck = |key: &'static str| async move {
        let (status, body) = http(addr, "PUT", &format!("/v1/plugins/kv/kv/{key}"), &[], b"x")
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let taken = |addr| async move {
        let (_, body) = http(addr, "GET", "/metrics", &[], b"").await.unwrap();
        String::from_utf8(body)
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("plexus_plugin_requests_total{plugin=\"kv\"")?
                    .rsplit(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let before = taken(addr).await;
    let first = tokio::spawn(stuck("stuck-1"));
    // The second goes in once the plugin has taken the first.
    let deadline = Instant::now() + Duration::from_secs(10);
    while taken(addr).await <= before {
        assert!(
            Instant::now() < deadline,
            "the first write never reached kv"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = tokio::spawn(stuck("stuck-2"));
    for answer in [first, second] {
        let (status, body) = answer.await.unwrap();
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("outcome unknown"), "{body}");
    }
    // Meanwhile the node and the plugin kept serving local reads.
    let (status, body) = http(
        c.http[leader],
        "GET",
        "/v1/plugins/kv/kv/before?consistency=local",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"v0"[..]));
    signal("-CONT");
    // With the quorum back, writes are acknowledged again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !put(c.http[leader], "after", "v1").await {
        assert!(Instant::now() < deadline, "writes never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        read(c.http[leader], "after").await.as_deref(),
        Some(&b"v1"[..])
    );
}

/// Applied state reaches the disk at checkpoints, up to a second behind the
/// Raft log; a crash of every node at once, right after the writes, must
/// still lose none of them: each node applies them again from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_every_node_right_after_writes_loses_no_acknowledged_write() {
    let mut c = Cluster::start(600_000).await;
    c.leader().await;
    let acked = concurrent_writes(&c, "crash").await;
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        let p = c.spawn(i).await;
        c.nodes[i] = Some(p);
    }
    for node in 0..3 {
        for i in &acked {
            assert_eq!(
                read(c.http[node], &format!("crash-{i}")).await.as_deref(),
                Some(format!("v{i}").as_bytes()),
                "node-{} lost crash-{i}",
                node + 1
            );
        }
    }
}

/// 60 writes at once, 20 through each node; returns those acknowledged
/// (most must be).
async fn concurrent_writes(c: &Cluster, prefix: &str) -> Vec<usize> {
    let writes = (0..60).map(|i| {
        let addr = c.http[i % 3];
        let key = format!("{prefix}-{i}");
        async move { put(addr, &key, &format!("v{i}")).await.then_some(i) }
    });
    let acked: Vec<usize> = futures_join(writes).await.into_iter().flatten().collect();
    assert!(
        acked.len() >= 55,
        "only {} of 60 writes acknowledged",
        acked.len()
    );
    acked
}

/// Writes submitted together, on the leader and through both followers,
/// share Raft entries; the nodes time their durable log appends. The
/// counters are read until they settle: each is updated a moment after the
/// write it counts is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_raft_entries_and_log_appends_are_timed() {
    // A long lease: no role renewals share the entries counted below.
    let c = Cluster::start(600_000).await;
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    const APPENDS: &str = "plexus_consensus_log_write_duration_seconds_count";
    const PROPOSALS: &str = "plexus_consensus_proposals_total";
    const WRITES: &str = "plexus_consensus_log_writes_total";
    let before = (
        counter(c.http[leader], PROPOSALS).await,
        counter(c.http[leader], WRITES).await,
        counter(c.http[leader], APPENDS).await,
        counter(c.http[follower], APPENDS).await,
    );
    concurrent_writes(&c, "batch").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let proposals = counter(c.http[leader], PROPOSALS).await - before.0;
        let log_writes = counter(c.http[leader], WRITES).await - before.1;
        let appends = counter(c.http[leader], APPENDS).await - before.2;
        let follower_appends = counter(c.http[follower], APPENDS).await - before.3;
        // Batching: at least two writes per entry on average, a margin that
        // holds on a busy machine (unloaded, it is five to twenty).
        let batched = proposals >= 55 && proposals >= 2 * log_writes;
        // Both the leader and a follower timed their durable appends of
        // these entries. Raft may hand several entries queued together to
        // one append, so there can be fewer appends than entries.
        let timed = appends >= 1 && follower_appends >= 1;
        if batched && timed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{proposals} proposals in {log_writes} Raft entries; {appends} appends timed on the leader, {follower_appends} on a follower"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `futures` concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
