//! Cluster benchmark: a program that prints figures.
//!
//!     cargo bench -p plexus --bench cluster [-- --seconds 10 --clients 256 --trials 20
//!         --rounds 4 --heartbeat-ms 50 --election-min-ms 150 --election-max-ms 300]
//!
//! Starts three `plexus` processes on 127.0.0.1 and drives `replicated-kv`
//! through the real HTTP path: 64 B values from concurrent clients, each
//! with its own keep-alive connection, spread over the three nodes. With
//! `--etcd PATH` (an `etcd` 3.4+ binary, e.g. from Debian's `etcd-server`)
//! it runs the same load against a 3-member etcd on loopback through its
//! HTTP gateway, in the same run. Both clusters then stay up, and the load
//! alternates between them in `--rounds` pairs of phases (plexus first,
//! then etcd first, and so on; `--seconds` in all for each), so that the
//! machine speeding up or slowing down during the run falls on both alike.
//! Each run also prints the CPU time (user and system, from `/proc`) the
//! three servers used per acknowledged write, and what this load
//! generator used, and how much of the machine's CPU time was idle,
//! waiting for I/O, or taken by the hypervisor (steal).
//! Then it measures leader failover: kill -9 the leader, time until a
//! surviving node acknowledges a write.
//!
//! `PLEXUS_BIN=path` runs that `plexus` binary instead of this build's, to
//! compare two builds under the same load generator.
//! `host/benches/cluster-vs-etcd.sh [ARGS]` installs etcd when it is
//! missing and runs this with `--etcd`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{Conn, Meter, Plexus, Procs, Usage, arg, free_port, once, percentile};

/// What one load phase measured, kept raw so that phases of one system
/// can be added up.
#[derive(Default)]
struct Sample {
    /// Latencies of acknowledged writes, in ms, by server.
    by_target: Vec<Vec<f64>>,
    errors: u64,
    elapsed: Duration,
    /// CPU the servers and this load generator used.
    usage: Usage,
}

impl Sample {
    fn writes(&self) -> usize {
        self.by_target.iter().map(Vec::len).sum()
    }

    fn ops(&self) -> f64 {
        self.writes() as f64 / self.elapsed.as_secs_f64()
    }

    fn add(&mut self, other: Sample) {
        if self.by_target.len() < other.by_target.len() {
            self.by_target.resize(other.by_target.len(), Vec::new());
        }
        for (mine, theirs) in self.by_target.iter_mut().zip(other.by_target) {
            mine.extend(theirs);
        }
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.usage.add(other.usage);
    }

    fn print(&self, label: &str) {
        let mut all: Vec<f64> = self.by_target.iter().flatten().copied().collect();
        all.sort_by(|a, b| a.total_cmp(b));
        let per_write = |cpu: Duration| cpu.as_secs_f64() * 1e6 / all.len().max(1) as f64;
        println!(
            "{label:<40} {:>10.0} {:>9.1} {:>9.1} {:>8} {:>12.0} {:>12.0}",
            self.ops(),
            percentile(&all, 0.5),
            percentile(&all, 0.99),
            self.errors,
            per_write(self.usage.servers),
            per_write(self.usage.client)
        );
        let by: Vec<String> = self
            .by_target
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.sort_by(|a, b| a.total_cmp(b));
                format!("{:.1}", percentile(&l, 0.5))
            })
            .collect();
        println!("{:<40} p50 by server: {} ms", "", by.join(" / "));
        println!("{:<40} {}", "", self.usage.describe());
    }
}

/// Sends `PUT`s of 64 B from `clients` connections for `seconds` to the
/// servers `pids` listening on `targets`.
async fn load(
    targets: &[SocketAddr],
    pids: &[u32],
    clients: usize,
    seconds: f64,
    request: fn(u64) -> (String, Vec<u8>),
) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = targets[c % targets.len()];
        let (stop, errors) = (stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let Ok(mut conn) = Conn::open(addr).await else {
                errors.fetch_add(1, Ordering::Relaxed);
                return lat;
            };
            let mut i = c as u64 * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (path, body) = request(i);
                let t = Instant::now();
                match conn.send("POST", &path, &body).await {
                    Ok(200) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        match Conn::open(addr).await {
                            Ok(c) => conn = c,
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                }
            }
            lat
        }));
    }
    let started = Instant::now();
    let meter = Meter::start(pids);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let usage = meter.stop();
    let mut by_target: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for (c, t) in tasks.into_iter().enumerate() {
        by_target[c % targets.len()].extend(t.await.unwrap_or_default());
    }
    Sample {
        by_target,
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        usage,
    }
}

fn kv_put(i: u64) -> (String, Vec<u8>) {
    (
        format!("/v1/plugins/kv/kv/k{}", i % 100_000),
        vec![b'x'; 64],
    )
}

fn etcd_put(i: u64) -> (String, Vec<u8>) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        b64.encode(format!("k{}", i % 100_000)),
        b64.encode([b'x'; 64])
    );
    ("/v3/kv/put".into(), body.into_bytes())
}

/// Starts a 3-member etcd on loopback; returns it with its client
/// addresses once it answers a put.
async fn start_etcd(etcd: &Path, dir: &Path) -> anyhow::Result<(Procs, Vec<SocketAddr>)> {
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let initial: Vec<String> = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peer[i]))
        .collect();
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let child = Command::new(etcd)
            .args(["--name", &format!("e{i}")])
            .args([
                "--data-dir",
                &dir.join(format!("etcd-{i}")).display().to_string(),
            ])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        procs.0.push(Some(child));
    }
    let targets: Vec<SocketAddr> = client
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, _)) =
            once(targets[0], "POST", "/v3/kv/put", etcd_put(0).1.as_slice()).await
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "etcd did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((procs, targets))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let seconds = arg("--seconds", 10);
    let clients = arg("--clients", 256) as usize;
    let trials = arg("--trials", 20);
    let etcd = std::env::args()
        .skip_while(|a| a != "--etcd")
        .nth(1)
        .map(PathBuf::from);
    if let Some(etcd) = &etcd {
        anyhow::ensure!(
            etcd.is_file(),
            "no etcd at {}: install Debian's etcd-server, or run host/benches/cluster-vs-etcd.sh, which does",
            etcd.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let plugin = "[[plugins]]\nname = \"kv\"\ncomponent = \"bundled:replicated-kv\"\n\
                  capabilities = [\"consensus\", \"storage\"]\nlimits = { mailbox = 4096 }\n";
    let mut plexus = Plexus::start(dir.path(), plugin).await;
    let http = plexus.http.clone();

    println!(
        "# plexus cluster benchmark: 3 nodes on 127.0.0.1, {clients} clients, 64 B values, {seconds} s"
    );
    println!("{}", common::raft_timers());
    println!();
    println!(
        "{:<40} {:>10} {:>9} {:>9} {:>8} {:>12} {:>12}",
        "", "writes/s", "p50 ms", "p99 ms", "errors", "CPU µs/write", "client µs/w"
    );
    // Both clusters stay up, and their load phases alternate (ABBA), so
    // that the machine's drift over the run falls on both alike.
    let etcd = match &etcd {
        Some(etcd) => match start_etcd(etcd, dir.path()).await {
            Ok(started) => Some(started),
            Err(e) => {
                println!("etcd: {e}");
                None
            }
        },
        None => None,
    };
    // Alone, plexus gets one phase: there is nothing to alternate with.
    let rounds = if etcd.is_some() {
        arg("--rounds", 4).max(1)
    } else {
        1
    };
    let phase = seconds as f64 / rounds as f64;
    let (mut ours, mut theirs) = (Sample::default(), Sample::default());
    let mut by_round = Vec::new();
    let before = plexus.raft_counters().await;
    for round in 0..rounds {
        let mut line = format!("round {}:", round + 1);
        for plexus_turn in [round % 2 == 0, round % 2 == 1] {
            if plexus_turn {
                let s = load(&http, &plexus.procs.pids(), clients, phase, kv_put).await;
                line += &format!(" plexus {:.0}/s", s.ops());
                ours.add(s);
            } else if let Some((etcd, targets)) = &etcd {
                let s = load(targets, &etcd.pids(), clients, phase, etcd_put).await;
                line += &format!(" etcd {:.0}/s", s.ops());
                theirs.add(s);
            }
        }
        by_round.push(line);
    }
    let (proposals, entries) = plexus.raft_since(before).await;
    ours.print("plexus replicated-kv (HTTP PUT)");
    println!(
        "{:<40} {proposals} writes in {entries} Raft entries ({:.1} per entry)",
        "",
        proposals as f64 / entries.max(1) as f64
    );
    if let Some((etcd, _)) = etcd {
        theirs.print("etcd (v3 HTTP gateway put)");
        println!(
            "{:<40} plexus/etcd writes/s: {:.2}x",
            "",
            ours.ops() / theirs.ops().max(f64::MIN_POSITIVE)
        );
        for line in by_round {
            println!("{:<40} {line}", "");
        }
        drop(etcd);
    }
    println!();

    // Failover: kill -9 the leader, time the first acknowledged write.
    let mut alive = [true; 3];
    let mut times = Vec::new();
    for _ in 0..trials {
        let l = plexus.leader(&alive).await;
        let survivor = (l + 1) % 3;
        if let Some(mut c) = plexus.procs.0[l].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        alive[l] = false;
        let t = Instant::now();
        let mut i = 0u64;
        loop {
            i += 1;
            if let Some((200, _)) = once(
                http[survivor],
                "PUT",
                &format!("/v1/plugins/kv/kv/f{i}"),
                b"x",
            )
            .await
            {
                break;
            }
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
        plexus.restart(l).await;
        alive[l] = true;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if times.is_empty() {
        return Ok(());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "leader failover, {trials} trials (kill -9 leader -> first acknowledged write): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
    Ok(())
}
