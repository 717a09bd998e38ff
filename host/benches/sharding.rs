//! Sharding benchmark: a program that prints figures.
//!
//!     cargo bench -p plexus --bench sharding [-- --keys 50000 --clients 64
//!         --seconds 5 --rounds 2]
//!
//! Starts three `plexus` processes on 127.0.0.1 with the `sharding`
//! plugin (two holders per slot) and loads `--keys` keys of 64 B through
//! `--clients` keep-alive connections. Then, in `--rounds` rounds of
//! phases of `--seconds` each, in a different order each round, it
//! measures writes and reads sent to a random node (which forwards all
//! but a third of them to the key's primary) beside the same sent to the
//! primary directly (the client routes by the map, as a smart client
//! would), with the CPU time of the nodes per request.
//!
//! Last, a rebalance: with writers running, node-3 is drained (its slots
//! move to the other two, copied before the map switches), then let back
//! (they move again). It prints the keys node-3 held, how long each move
//! took and the keys per second that makes, and the write latency while
//! the slots move beside the latency just before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{Conn, Errors, Meter, Plexus, Usage, arg, percentile};

const PLUGIN: &str = "[[plugins]]\nname = \"shards\"\ncomponent = \"bundled:sharding\"\n\
                      capabilities = [\"consensus\", \"storage\", \"timers\", \"messaging\", \"membership\"]\n\
                      limits = { mailbox = 4096 }\n[plugins.config]\nreplicas = 2\n";

/// The slot of a key, as the plugin computes it (FNV-1a, then a
/// splitmix64 finaliser, modulo the slot count).
fn slot_of(key: &[u8], slots: u64) -> usize {
    let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut x = h;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((x ^ (x >> 31)) % slots) as usize
}

/// Each slot's primary, as an index into the nodes.
async fn primaries(addr: SocketAddr) -> Vec<usize> {
    let mut c = Conn::open(addr).await.unwrap();
    c.call("GET", "/v1/plugins/shards/map?slots=true", b"")
        .await
        .unwrap();
    let map: serde_json::Value = serde_json::from_slice(c.body()).unwrap();
    map["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            h[0].as_str()
                .unwrap()
                .trim_start_matches("node-")
                .parse::<usize>()
                .unwrap()
                - 1
        })
        .collect()
}

/// How the clients pick a node.
#[derive(Clone, Copy, PartialEq)]
enum Route {
    /// A random node: forwarded unless it is the primary.
    Any,
    /// The key's primary.
    Primary,
}

/// One phase of the load: `clients` clients sending `method` for random
/// keys of `keys`, routed by `route`, until `until`.
#[derive(Clone, Copy)]
struct Phase {
    method: &'static str,
    route: Route,
    keys: u64,
    clients: u64,
    until: Instant,
}

/// Runs a phase; requests done, and their latencies in µs, sorted.
async fn load(
    nodes: &[SocketAddr],
    map: &Arc<Vec<usize>>,
    phase: Phase,
    errors: &Errors,
) -> (u64, Vec<f64>) {
    let Phase {
        method,
        route,
        keys,
        clients,
        until,
    } = phase;
    let mut set = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (nodes, map, errors) = (nodes.to_vec(), map.clone(), errors.clone());
        set.spawn(async move {
            let mut conns = Vec::new();
            for a in &nodes {
                conns.push(Conn::open(*a).await.unwrap());
            }
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (c + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
            let mut lat = Vec::new();
            let value = [b'v'; 64];
            while Instant::now() < until {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let key = format!("key-{}", rng % keys);
                let node = match route {
                    Route::Any => (rng >> 32) as usize % nodes.len(),
                    Route::Primary => map[slot_of(key.as_bytes(), map.len() as u64)],
                };
                let body: &[u8] = if method == "PUT" { &value } else { b"" };
                let t = Instant::now();
                match conns[node]
                    .call(method, &format!("/v1/plugins/shards/kv/{key}"), body)
                    .await
                {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                    Err(e) => {
                        errors.note(e);
                        conns[node] = Conn::open(nodes[node]).await.unwrap();
                    }
                }
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.unwrap());
    }
    all.sort_by(f64::total_cmp);
    (all.len() as u64, all)
}

fn line(what: &str, n: u64, secs: f64, lat: &[f64], usage: &Usage) {
    println!(
        "{what:<34} {:>9.0}/s  p50 {:>6.0} µs  p99 {:>6.0} µs  {:>5.1} µs CPU of the nodes each",
        n as f64 / secs,
        percentile(lat, 0.5),
        percentile(lat, 0.99),
        usage.servers.as_secs_f64() * 1e6 / n.max(1) as f64
    );
}

/// Node-3's keys as primary and replica, by its `/stats`.
async fn keys_on(addr: SocketAddr) -> u64 {
    let mut c = Conn::open(addr).await.unwrap();
    c.call("GET", "/v1/plugins/shards/stats", b"")
        .await
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(c.body()).unwrap();
    s["primary"]["keys"].as_u64().unwrap_or(0) + s["replica"]["keys"].as_u64().unwrap_or(0)
}

/// Waits until the map has no plan and `members` members.
async fn settled(addr: SocketAddr, members: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(mut c) = Conn::open(addr).await
            && c.call("GET", "/v1/plugins/shards/map", b"").await.is_ok()
        {
            let m: serde_json::Value = serde_json::from_slice(c.body()).unwrap_or_default();
            if m["planning"].is_null() && m["members"].as_array().map(Vec::len) == Some(members) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the map never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writers until `stop`; the latencies of writes sent while `moving`,
/// and of the others.
async fn writers(
    nodes: Vec<SocketAddr>,
    keys: u64,
    stop: Arc<AtomicBool>,
    moving: Arc<AtomicBool>,
    errors: Errors,
) -> (Vec<f64>, Vec<f64>) {
    let mut set = tokio::task::JoinSet::new();
    for c in 0..16u64 {
        let (nodes, stop, moving, errors) =
            (nodes.clone(), stop.clone(), moving.clone(), errors.clone());
        set.spawn(async move {
            let mut conn = Conn::open(nodes[c as usize % 2]).await.unwrap();
            let (mut during, mut before) = (Vec::new(), Vec::new());
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let key = format!("key-{}", (n >> 16) % keys);
                let was = moving.load(Ordering::Relaxed);
                let t = Instant::now();
                match conn
                    .call("PUT", &format!("/v1/plugins/shards/kv/{key}"), &[b'w'; 64])
                    .await
                {
                    Ok(_) => {
                        let us = t.elapsed().as_secs_f64() * 1e6;
                        if was {
                            during.push(us)
                        } else {
                            before.push(us)
                        }
                    }
                    Err(e) => {
                        errors.note(e);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        conn = Conn::open(nodes[c as usize % 2]).await.unwrap();
                    }
                }
            }
            (during, before)
        });
    }
    let (mut during, mut before) = (Vec::new(), Vec::new());
    while let Some(r) = set.join_next().await {
        let (d, b) = r.unwrap();
        during.extend(d);
        before.extend(b);
    }
    during.sort_by(f64::total_cmp);
    before.sort_by(f64::total_cmp);
    (during, before)
}

/// Drains node-3 (or lets it back) and times the move.
async fn move_slots(p: &Plexus, drain: bool, keys_moving: u64, moving: &AtomicBool) -> Duration {
    let method = if drain { "POST" } else { "DELETE" };
    moving.store(true, Ordering::Relaxed);
    let t = Instant::now();
    let mut c = Conn::open(p.http[0]).await.unwrap();
    c.call(method, "/v1/plugins/shards/drain/node-3", b"")
        .await
        .unwrap();
    settled(p.http[0], if drain { 2 } else { 3 }).await;
    let took = t.elapsed();
    moving.store(false, Ordering::Relaxed);
    println!(
        "{:<34} {keys_moving} keys of node-3 in {:.2} s: {:.0} keys/s",
        if drain { "drain node-3" } else { "node-3 back" },
        took.as_secs_f64(),
        keys_moving as f64 / took.as_secs_f64()
    );
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let keys = arg("--keys", 50_000);
    let clients = arg("--clients", 64);
    let seconds = arg("--seconds", 5);
    let rounds = arg("--rounds", 2);
    let dir = tempfile::tempdir().unwrap();
    let p = Plexus::start(dir.path(), PLUGIN).await;
    settled(p.http[0], 3).await;
    let pids = p.procs.pids();
    let errors = Errors::default();
    println!("# sharding: 3 nodes, 2 holders per slot, {keys} keys of 64 B, {clients} clients");

    // The load: every key once, through random nodes.
    let t = Instant::now();
    let meter = Meter::start(&pids);
    let map = Arc::new(primaries(p.http[0]).await);
    let done = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (nodes, done, errors) = (p.http.clone(), done.clone(), errors.clone());
        set.spawn(async move {
            let mut conn = Conn::open(nodes[c as usize % 3]).await.unwrap();
            for k in (c..keys).step_by(clients as usize) {
                if let Err(e) = conn
                    .call(
                        "PUT",
                        &format!("/v1/plugins/shards/kv/key-{k}"),
                        &[b'v'; 64],
                    )
                    .await
                {
                    errors.note(e);
                    conn = Conn::open(nodes[c as usize % 3]).await.unwrap();
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while set.join_next().await.is_some() {}
    let usage = meter.stop();
    println!(
        "{:<34} {:>9.0}/s  {}",
        "load (PUT, random node)",
        keys as f64 / t.elapsed().as_secs_f64(),
        usage.describe()
    );

    let phases = [
        ("PUT", Route::Any, "writes through a random node"),
        ("PUT", Route::Primary, "writes to the primary"),
        ("GET", Route::Any, "reads through a random node"),
        ("GET", Route::Primary, "reads from the primary"),
    ];
    for round in 0..rounds {
        println!("round {}", round + 1);
        let mut order: Vec<usize> = (0..phases.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (method, route, what) = phases[i];
            let meter = Meter::start(&pids);
            let until = Instant::now() + Duration::from_secs(seconds);
            let phase = Phase {
                method,
                route,
                keys,
                clients,
                until,
            };
            let (n, lat) = load(&p.http, &map, phase, &errors).await;
            let usage = meter.stop();
            line(what, n, seconds as f64, &lat, &usage);
        }
    }

    // The rebalance, under 16 writers on node-1 and node-2.
    let stop = Arc::new(AtomicBool::new(false));
    let moving = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writers(
        p.http.clone(),
        keys,
        stop.clone(),
        moving.clone(),
        errors.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let on3 = keys_on(p.http[2]).await;
    move_slots(&p, true, on3, &moving).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    move_slots(&p, false, on3, &moving).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (during, before) = w.await.unwrap();
    println!(
        "{:<34} while slots move: p50 {:.0} µs, p99 {:.0} µs ({} writes); otherwise p50 {:.0} µs, p99 {:.0} µs ({} writes)",
        "write latency",
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len(),
        percentile(&before, 0.5),
        percentile(&before, 0.99),
        before.len()
    );
    let errors = errors.counts();
    if !errors.is_empty() {
        println!("errors: {errors:?}");
    }
}
