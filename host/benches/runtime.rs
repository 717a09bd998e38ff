//! Runtime benchmarks: a program that prints figures.
//!
//!     cargo bench -p plexus --bench runtime
//!
//! Measures, with the real components built from `plugins/`:
//! - hook dispatch of a 64 B message into a no-op handler, side by side with
//!   the same loop calling a native Rust closure, one message per call and
//!   batched (256 entries per `apply` call);
//! - the same dispatch through a plugin's mailbox (the production path);
//! - compile time of a plugin, load time from the compile cache, and
//!   instantiate time of a cached (pre-linked) plugin;
//! - hot-swap pause p50 / p99 / max under a steady request load, and the
//!   requests lost or failed meanwhile;
//! - calls that never hold a plugin: a request answered through one
//!   `messaging.call` (to the node itself) against one answered at once,
//!   and how many `plugins.call`s one instance keeps in flight, at what
//!   memory per call.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plexus::node::{LoadSpec, Node, NodeOptions};
use plexus::primitives::CallLimits;
use plexus::runtime::actor::{Channels, Mail, PluginLimits, new_store};
use plexus::runtime::bindings::pattern::{Method, Request};
use plexus::runtime::bindings::types::CommittedEntry;
use plexus::runtime::engine::Runtime;
use plexus::runtime::{Capability, prepare};
use tokio::sync::mpsc;

fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(|a, b| a.total_cmp(b));
    (pct(&xs, 0.5), pct(&xs, 0.99), *xs.last().unwrap_or(&0.0))
}

fn variant(bytes: &[u8], tag: u8) -> Arc<[u8]> {
    let name = b"plexus-variant";
    let mut out = bytes.to_vec();
    out.extend_from_slice(&[0, (name.len() + 2) as u8, name.len() as u8]);
    out.extend_from_slice(name);
    out.push(tag);
    Arc::from(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let dir = tempfile::tempdir()?;
    let node = open_node("bench", dir.path())?;
    let chaos: Arc<[u8]> = Arc::from(plexus::bundled::get("chaos").expect("chaos plugin"));
    let kv: Arc<[u8]> = Arc::from(plexus::bundled::get("replicated-kv").expect("kv plugin"));
    let all: std::collections::BTreeSet<Capability> = Capability::ALL.into_iter().collect();

    println!(
        "# plexus runtime benchmark ({} cores)",
        std::thread::available_parallelism()?.get()
    );
    println!();

    // Compile and cache.
    let uncached = Runtime::new(None, 4)?;
    let mut compile = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        uncached.compile(&kv).map_err(|e| anyhow::anyhow!("{e}"))?;
        compile.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cache_dir = dir.path().join("bench-cache");
    let cached = Runtime::new(Some(cache_dir), 64)?;
    cached.compile(&kv).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut from_cache = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        cached.compile(&kv).map_err(|e| anyhow::anyhow!("{e}"))?;
        from_cache.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (c50, _, _) = summary(compile);
    let (k50, _, _) = summary(from_cache);
    println!(
        "compile replicated-kv ({} KiB):       {c50:>9.1} ms (median of 3)",
        kv.len() / 1024
    );
    println!("load from compile cache (.cwasm):    {k50:>9.1} us (median of 20)");

    // Instantiate a pre-linked component in a fresh store.
    let prepared = prepare(node.runtime(), &chaos, &all).map_err(|e| anyhow::anyhow!("{e}"))?;
    let limits = PluginLimits {
        memory_bytes: 64 << 20,
        cpu: Duration::from_secs(3600),
        mailbox: 1024,
        ..PluginLimits::default()
    };
    let access = plexus::runtime::actor::Access::default();
    let (tx, _rx) = mpsc::channel::<Mail>(1);
    let (drops, _dropped) = mpsc::unbounded_channel();
    let mut inst_times = Vec::new();
    for i in 0..(2000 / scale) {
        let t = Instant::now();
        let mut store = new_store(
            &prepared,
            "chaos",
            node.services(),
            &limits,
            &access,
            Channels {
                mailbox: tx.downgrade(),
                drops: drops.clone(),
            },
            i as u64,
            0,
        );
        let plugin = prepared
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(wt)?;
        inst_times.push(t.elapsed().as_secs_f64() * 1e6);
        black_box(plugin);
    }
    let (i50, i99, _) = summary(inst_times);
    println!("instantiate cached plugin (store + instance): p50 {i50:.1} us, p99 {i99:.1} us");
    println!();

    // Direct dispatch: one 64 B message per call into a no-op handler.
    let mut store = new_store(
        &prepared,
        "chaos",
        node.services(),
        &limits,
        &access,
        Channels {
            mailbox: tx.downgrade(),
            drops: drops.clone(),
        },
        0,
        0,
    );
    let plugin = prepared
        .pre
        .instantiate_async(&mut store)
        .await
        .map_err(wt)?;
    let pattern = plugin.plexus_cluster_pattern();
    let ctx = plexus::runtime::bindings::pattern::InitContext {
        config: "{}".into(),
        node: "bench".into(),
        name: "chaos".into(),
        version: prepared.version.clone(),
        limits: CallLimits::default().to_wit(Default::default()),
    };
    pattern
        .call_init(&mut store, &ctx)
        .await
        .map_err(wt)?
        .map_err(|e| anyhow::anyhow!(e))?;
    let payload = vec![7u8; 64];
    let (from, topic) = (String::from("bench"), String::from("noop"));
    let n = 1_000_000 / scale;
    for _ in 0..10_000 {
        pattern
            .call_on_message(&mut store, &from, &topic, &payload)
            .await
            .map_err(wt)?;
    }
    let t = Instant::now();
    for _ in 0..n {
        black_box(
            pattern
                .call_on_message(&mut store, &from, &topic, &payload)
                .await
                .map_err(wt)?,
        );
    }
    let wasm = t.elapsed();

    let native = |from: &str, topic: &str, payload: &[u8]| -> Option<Vec<u8>> {
        if topic == "trap" {
            panic!("unreachable in the benchmark");
        }
        black_box((from, payload));
        None
    };
    let t = Instant::now();
    for _ in 0..n {
        black_box(native(
            black_box("bench"),
            black_box("noop"),
            black_box(&payload),
        ));
    }
    let native_time = t.elapsed();

    // Batched: 256 entries of 64 B per `apply` call.
    let batch: Vec<CommittedEntry> = (0..256)
        .map(|i| CommittedEntry {
            index: i + 1,
            term: 1,
            data: vec![0u8; 64],
            ticket: None,
        })
        .collect();
    let calls = (n / 256).max(1);
    let t = Instant::now();
    for _ in 0..calls {
        pattern
            .call_apply(&mut store, &batch, &[])
            .await
            .map_err(wt)?;
    }
    let batched = t.elapsed();
    let batched_msgs = calls * 256;

    let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64();
    let ns = |count: usize, d: Duration| d.as_nanos() as f64 / count as f64;
    println!("dispatch, 64 B, one task, {n} messages:");
    println!("  {:<44} {:>12} {:>10}", "", "msgs/s", "ns/msg");
    println!(
        "  {:<44} {:>12.0} {:>10.1}",
        "native Rust closure",
        rate(n, native_time),
        ns(n, native_time)
    );
    println!(
        "  {:<44} {:>12.0} {:>10.1}",
        "plugin on-message, one message per call",
        rate(n, wasm),
        ns(n, wasm)
    );
    println!(
        "  {:<44} {:>12.0} {:>10.1}",
        "plugin apply, 256 entries per call",
        rate(batched_msgs, batched),
        ns(batched_msgs, batched)
    );
    drop(store);

    // Through the mailbox: one-way messages into a loaded plugin.
    node.load(LoadSpec {
        name: "noop".into(),
        component: chaos.clone(),
        capabilities: all.clone(),
        limits: PluginLimits {
            mailbox: 4096,
            ..limits
        },
        config_json: "{}".into(),
        access: Default::default(),
    })
    .await?;
    let m = 300_000 / scale;
    let t = Instant::now();
    for _ in 0..m {
        node.deliver("noop", "bench", "noop", payload.clone())
            .await?;
    }
    // A request behind them returns once every message before it ran.
    node.message(
        "noop",
        "bench",
        "noop",
        payload.clone(),
        Duration::from_secs(60),
    )
    .await?;
    let mailbox = t.elapsed();
    println!(
        "  {:<44} {:>12.0} {:>10.1}",
        "through the plugin mailbox (actor task)",
        rate(m, mailbox),
        ns(m, mailbox)
    );
    println!();

    // Hot-swap pause under steady load.
    node.load(LoadSpec {
        name: "kv".into(),
        component: kv.clone(),
        capabilities: all.clone(),
        limits: PluginLimits::default(),
        config_json: "{}".into(),
        access: Default::default(),
    })
    .await?;
    let req = |method: Method, path: &str, body: &[u8]| Request {
        method,
        path: path.into(),
        query: if method == Method::Get {
            "consistency=local".into()
        } else {
            String::new()
        },
        headers: Vec::new(),
        body: body.to_vec(),
        source: plexus::runtime::bindings::pattern::RequestSource::Client,
    };
    node.request(
        "kv",
        req(Method::Put, "/kv/hot", b"0"),
        Duration::from_secs(10),
    )
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (node, stop, ok, failed) = (node.clone(), stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = if i.is_multiple_of(8) {
                    node.request(
                        "kv",
                        req(Method::Put, &format!("/kv/c{c}"), &i.to_le_bytes()),
                        Duration::from_secs(10),
                    )
                    .await
                } else {
                    node.request(
                        "kv",
                        req(Method::Get, "/kv/hot", b""),
                        Duration::from_secs(10),
                    )
                    .await
                };
                match r {
                    Ok(resp) if resp.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let versions = [variant(&kv, 1), variant(&kv, 2)];
    let swaps = 200 / scale;
    let mut pauses = Vec::new();
    let t = Instant::now();
    for s in 0..swaps {
        let report = node.swap("kv", versions[s % 2].clone(), None).await?;
        pauses.push(report.pause_us as f64);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await?;
    }
    let (p50, p99, max) = summary(pauses);
    let served = ok.load(Ordering::Relaxed);
    println!(
        "hot swap of replicated-kv, {swaps} swaps under load (4 clients, 7:1 reads:writes, {:.0} req/s):",
        served as f64 / elapsed.as_secs_f64()
    );
    println!("  pause p50 {p50:.0} us, p99 {p99:.0} us, max {max:.0} us");
    println!(
        "  requests ok {served}, failed {}, lost 0 (every request got an answer)",
        failed.load(Ordering::Relaxed)
    );
    bench_calls(&node, scale).await?;
    node.shutdown().await;
    bench_many_plugins(&kv, 1000 / scale).await?;
    Ok(())
}

/// Loads `count` copies of replicated-kv into a fresh node, one after
/// another, and reports the load times and the memory each idle copy
/// holds.
async fn bench_many_plugins(kv: &Arc<[u8]>, count: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = open_node("many", dir.path())?;
    let caps = [Capability::Consensus, Capability::Storage, Capability::Log]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>();
    let spec = |name: String| LoadSpec {
        name,
        component: kv.clone(),
        capabilities: caps.clone(),
        limits: PluginLimits::default(),
        config_json: "{}".into(),
        access: Default::default(),
    };
    // The first load compiles (or reads the compile cache); the rest
    // instantiate the same compiled component.
    node.load(spec("kv-0".into())).await?;
    let before = rss();
    let mut times = Vec::with_capacity(count);
    for i in 1..count {
        let t = Instant::now();
        node.load(spec(format!("kv-{i}"))).await?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let last = times.last().copied().unwrap_or(0.0);
    let grown = rss().saturating_sub(before);
    let r = node
        .request(
            &format!("kv-{}", count - 1),
            request(Method::Put, "/kv/k", b"v"),
            Duration::from_secs(10),
        )
        .await?;
    anyhow::ensure!(r.status == 200, "the last copy did not serve: {}", r.status);
    let (p50, p99, max) = summary(times);
    println!("\n{count} copies of replicated-kv on one node, loaded one after another:");
    println!(
        "  load p50 {:.0} us, p99 {:.0} us, max {:.0} us; the {count}th took {:.0} us",
        p50, p99, max, last
    );
    println!(
        "  {:.0} KiB resident per idle copy ({:.1} MiB for {} copies); the last one serves",
        grown as f64 / 1024.0 / (count - 1) as f64,
        grown as f64 / (1 << 20) as f64,
        count - 1
    );
    node.shutdown().await;
    Ok(())
}

/// A node of this process with its data in `dir`.
fn open_node(id: &str, dir: &std::path::Path) -> anyhow::Result<Arc<Node>> {
    Node::open(NodeOptions {
        id: id.into(),
        data_dir: dir.to_path_buf(),
        call_limits: CallLimits::default(),
        max_plugin_instances: plexus::runtime::engine::DEFAULT_INSTANCE_SLOTS,
        metadata: Vec::new(),
        clock: Arc::new(plexus::primitives::timers::SystemClock),
    })
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Requests from `clients` concurrent tasks, `n` in all; returns the time.
async fn drive(
    node: &Arc<Node>,
    plugin: &str,
    path: &str,
    n: u64,
    clients: u64,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let node = node.clone();
        let (plugin, path) = (plugin.to_string(), path.to_string());
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / clients {
                let r = node
                    .request(
                        &plugin,
                        request(Method::Post, &path, b"ping"),
                        Duration::from_secs(60),
                    )
                    .await?;
                anyhow::ensure!(
                    r.status == 200,
                    "{path}: {}",
                    String::from_utf8_lossy(&r.body)
                );
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(t.elapsed())
}

fn request(method: Method, path: &str, body: &[u8]) -> Request {
    Request {
        method,
        path: path.into(),
        query: String::new(),
        headers: Vec::new(),
        body: body.to_vec(),
        source: plexus::runtime::bindings::pattern::RequestSource::Client,
    }
}

async fn bench_calls(node: &Arc<Node>, scale: usize) -> anyhow::Result<()> {
    let relay = plexus::bundled::get("relay").expect("relay is bundled");
    let grant: std::collections::BTreeSet<Capability> = [
        Capability::Messaging,
        Capability::Plugins,
        Capability::OutboundHttp,
    ]
    .into_iter()
    .collect();
    let limits = PluginLimits {
        mailbox: 8192,
        quota: plexus::primitives::CallQuota {
            max_in_flight: 65_536,
            ..Default::default()
        },
        ..PluginLimits::default()
    };
    for name in ["relay", "peer"] {
        node.load(LoadSpec {
            name: name.into(),
            component: Arc::from(relay),
            capabilities: grant.clone(),
            limits,
            config_json: r#"{"timeout_ms": 60000}"#.into(),
            access: plexus::runtime::actor::Access {
                plugins: Arc::new(["peer".to_string()].into_iter().collect()),
                ..Default::default()
            },
        })
        .await?;
    }
    let n = 100_000 / scale as u64;
    let ask = format!("/ask/{}", node.id());
    drive(node, "relay", "/echo/x", n / 10, 64).await?;
    drive(node, "relay", &ask, n / 10, 64).await?;
    let at_once = drive(node, "relay", "/echo/x", n, 64).await?;
    let called = drive(node, "relay", &ask, n, 64).await?;
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    println!();
    println!("calls that never hold a plugin (relay plugin, 64 concurrent clients, {n} requests):");
    println!(
        "  answered at once                              {:>10.0} req/s {:>8.0} ns/req",
        n as f64 / at_once.as_secs_f64(),
        per(at_once)
    );
    println!(
        "  answered through one messaging.call to self   {:>10.0} req/s {:>8.0} ns/req",
        n as f64 / called.as_secs_f64(),
        per(called)
    );
    println!(
        "  a call costs {:.0} ns more: its ticket, its task, a mailbox round trip, on-message and on-reply",
        per(called) - per(at_once)
    );

    // Calls in flight: relay calls peer, which parks every request.
    let held = 50_000 / scale as u64;
    let before = rss();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..held {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            node.request(
                "relay",
                request(Method::Post, "/call/peer/hold", b""),
                Duration::from_secs(120),
            )
            .await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    // Out means parked at the callee: every call has reached it.
    loop {
        let parked = node.plugin("peer").map_or(0, |s| s.requests);
        if parked >= held {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {parked} of {held} calls out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let issued = t.elapsed();
    let grown = rss().saturating_sub(before);
    let t = Instant::now();
    node.request(
        "peer",
        request(Method::Post, "/release", b""),
        Duration::from_secs(60),
    )
    .await?;
    for task in tasks {
        let r = task.await??;
        anyhow::ensure!(r.status == 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let drained = t.elapsed();
    println!(
        "  {held} plugins.call in flight from one instance: out in {:.0} ms ({:.0} calls/s), \
         {:.1} KiB resident per call in flight (client task, caller and callee state), \
         all answered {:.0} ms after the callee released them",
        issued.as_secs_f64() * 1e3,
        held as f64 / issued.as_secs_f64(),
        grown as f64 / held as f64 / 1024.0,
        drained.as_secs_f64() * 1e3
    );
    Ok(())
}
