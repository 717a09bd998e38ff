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
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One keep-alive HTTP/1.1 connection of the load: a request is written
/// and its response read by the client's own task, so the load generator
/// spends little CPU of the machine the servers share.
struct Conn {
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    out: Vec<u8>,
    /// Bytes read and not yet consumed.
    inp: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            addr,
            out: Vec::with_capacity(512),
            inp: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads its whole response; returns the status.
    async fn send(&mut self, method: &str, path: &str, body: Vec<u8>) -> anyhow::Result<u16> {
        use std::io::Write;
        use tokio::io::AsyncWriteExt;
        self.out.clear();
        write!(
            self.out,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n\r\n",
            self.addr,
            body.len()
        )?;
        self.out.extend_from_slice(&body);
        self.stream.write_all(&self.out).await?;
        // The head.
        let (status, head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&self.inp)? {
                let status = resp.code.unwrap_or(0);
                let header = |name: &str| {
                    resp.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                };
                let body_len = match header("content-length") {
                    Some(v) => Some(v.trim().parse::<usize>()?),
                    None if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) => {
                        None
                    }
                    None => Some(0),
                };
                break (status, n, body_len);
            }
            self.fill().await?;
        };
        self.inp.drain(..head_len);
        match body_len {
            Some(len) => {
                while self.inp.len() < len {
                    self.fill().await?;
                }
                self.inp.drain(..len);
            }
            None => self.skip_chunked().await?,
        }
        Ok(status)
    }

    /// Consumes a chunked body.
    async fn skip_chunked(&mut self) -> anyhow::Result<()> {
        loop {
            let line_end = loop {
                if let Some(i) = self.inp.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                self.fill().await?;
            };
            let line = std::str::from_utf8(&self.inp[..line_end])?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)?;
            // The chunk and its CRLF; the last chunk is followed by an
            // empty trailer line.
            let need = line_end + 2 + size + 2;
            while self.inp.len() < need {
                self.fill().await?;
            }
            self.inp.drain(..need);
            if size == 0 {
                return Ok(());
            }
        }
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let n = self.stream.read_buf(&mut self.inp).await?;
        anyhow::ensure!(n > 0, "connection closed");
        Ok(())
    }
}

async fn once(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if path.starts_with("/v1/admin") {
        req = req.header("authorization", "Bearer bench-token");
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body))).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes().to_vec();
    Some((status, body))
}

/// CPU time (user + system) the processes `pids` have used so far.
fn cpu_time(pids: &[u32]) -> Duration {
    // Clock ticks per second as `/proc` counts them: 100 on Linux.
    const TICKS: u64 = 100;
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            // Fields after the parenthesised command name; utime and
            // stime are the 14th and 15th of the whole line.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            field(11).unwrap_or(0) + field(12).unwrap_or(0)
        })
        .sum();
    Duration::from_millis(ticks * 1000 / TICKS)
}

/// The machine's CPU time so far, in clock ticks, from `/proc/stat`.
#[derive(Debug, Default, Clone, Copy)]
struct MachineTicks {
    idle: u64,
    iowait: u64,
    /// Taken by the hypervisor for other guests while this one was ready.
    steal: u64,
    total: u64,
}

impl MachineTicks {
    fn now() -> MachineTicks {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal; guest time is
        // counted in user already.
        MachineTicks {
            idle: field(3),
            iowait: field(4),
            steal: field(7),
            total: (0..8).map(field).sum(),
        }
    }

    fn since(self, before: MachineTicks) -> MachineTicks {
        MachineTicks {
            idle: self.idle.saturating_sub(before.idle),
            iowait: self.iowait.saturating_sub(before.iowait),
            steal: self.steal.saturating_sub(before.steal),
            total: self.total.saturating_sub(before.total),
        }
    }

    fn add(&mut self, other: MachineTicks) {
        self.idle += other.idle;
        self.iowait += other.iowait;
        self.steal += other.steal;
        self.total += other.total;
    }
}

/// The `p` quantile of `sorted` (NaN when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// What one load phase measured, kept raw so that phases of one system
/// can be added up.
#[derive(Default)]
struct Sample {
    /// Latencies of acknowledged writes, in ms, by server.
    by_target: Vec<Vec<f64>>,
    errors: u64,
    elapsed: Duration,
    /// CPU the servers used.
    cpu: Duration,
    /// CPU this load generator used.
    client_cpu: Duration,
    /// How the whole machine's CPU time went.
    machine: MachineTicks,
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
        self.cpu += other.cpu;
        self.client_cpu += other.client_cpu;
        self.machine.add(other.machine);
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
            per_write(self.cpu),
            per_write(self.client_cpu)
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
        let m = &self.machine;
        let share = |t: u64| 100.0 * t as f64 / m.total.max(1) as f64;
        println!(
            "{:<40} machine: {:.0}% idle, {:.0}% I/O wait, {:.0}% stolen by the hypervisor",
            "",
            share(m.idle),
            share(m.iowait),
            share(m.steal)
        );
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
                match conn.send("POST", &path, body).await {
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
    let me = [std::process::id()];
    let (cpu_before, client_before) = (cpu_time(pids), cpu_time(&me));
    let machine_before = MachineTicks::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let cpu = cpu_time(pids) - cpu_before;
    let client_cpu = cpu_time(&me) - client_before;
    let machine = MachineTicks::now().since(machine_before);
    let mut by_target: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for (c, t) in tasks.into_iter().enumerate() {
        by_target[c % targets.len()].extend(t.await.unwrap_or_default());
    }
    Sample {
        by_target,
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        cpu,
        client_cpu,
        machine,
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

struct Procs(Vec<Option<Child>>);

impl Procs {
    /// The process ids of those running.
    fn pids(&self) -> Vec<u32> {
        self.0.iter().flatten().map(Child::id).collect()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn plexus_config(dir: &Path, i: usize, http: &[SocketAddr], peer: &[SocketAddr]) -> PathBuf {
    let peers: Vec<String> = (0..3)
        .filter(|j| *j != i)
        .map(|j| format!("\"node-{}@{}\"", j + 1, peer[j]))
        .collect();
    let text = format!(
        "version = 1\n[node]\nid = \"node-{n}\"\ndata_dir = \"data-{n}\"\nhttp = \"{h}\"\nrequest_timeout_ms = 30000\n\
         [cluster]\nlisten = \"{l}\"\npeers = [{p}]\nsecret = \"bench-cluster-secret\"\n\
         heartbeat_ms = {hb}\nelection_timeout_ms = [{emin}, {emax}]\n[admin]\ntoken = \"bench-token\"\n\
         [[plugins]]\nname = \"kv\"\ncomponent = \"bundled:replicated-kv\"\ncapabilities = [\"consensus\", \"storage\"]\n\
         limits = {{ mailbox = 4096 }}\n",
        n = i + 1,
        h = http[i],
        l = peer[i],
        p = peers.join(", "),
        hb = arg("--heartbeat-ms", 50),
        emin = arg("--election-min-ms", 150),
        emax = arg("--election-max-ms", 300),
    );
    let path = dir.join(format!("node-{}.toml", i + 1));
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn_plexus(dir: &Path, config: &Path) -> Child {
    // PLEXUS_BIN runs another build of the node under the same load.
    let bin = std::env::var("PLEXUS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_plexus").into());
    Command::new(bin)
        .arg("up")
        .arg(config)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn plexus")
}

async fn wait_healthy(addr: SocketAddr, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some((200, _)) = once(addr, "GET", path, b"").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} did not come up");
}

async fn leader(http: &[SocketAddr], alive: &[bool]) -> usize {
    loop {
        for i in 0..3 {
            if !alive[i] {
                continue;
            }
            if let Some((200, body)) = once(http[i], "GET", "/v1/admin/status", b"").await {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if let Some(l) = v["leader"].as_str() {
                    let l = l.trim_start_matches("node-").parse::<usize>().unwrap_or(1) - 1;
                    if alive[l] {
                        return l;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proposals and Raft entries written by the leaders so far, summed over
/// `http` (each counts only while it leads).
async fn raft_counters(http: &[SocketAddr]) -> (u64, u64) {
    let mut sums = (0, 0);
    for addr in http {
        let Some((200, body)) = once(*addr, "GET", "/metrics", b"").await else {
            continue;
        };
        for line in String::from_utf8_lossy(&body).lines() {
            let value = |name: &str| {
                line.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .map_or(0, |v| v as u64)
            };
            sums.0 += value("plexus_consensus_proposals_total ");
            sums.1 += value("plexus_consensus_log_writes_total ");
        }
    }
    sums
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
    let http: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let peer: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let configs: Vec<PathBuf> = (0..3)
        .map(|i| plexus_config(dir.path(), i, &http, &peer))
        .collect();
    let mut procs = Procs(
        configs
            .iter()
            .map(|c| Some(spawn_plexus(dir.path(), c)))
            .collect(),
    );
    for a in &http {
        wait_healthy(*a, "/healthz").await;
    }
    leader(&http, &[true; 3]).await;

    println!(
        "# plexus cluster benchmark: 3 nodes on 127.0.0.1, {clients} clients, 64 B values, {seconds} s"
    );
    println!(
        "# raft timers: heartbeat {} ms, election timeout {}-{} ms",
        arg("--heartbeat-ms", 50),
        arg("--election-min-ms", 150),
        arg("--election-max-ms", 300)
    );
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
    let before = raft_counters(&http).await;
    for round in 0..rounds {
        let mut line = format!("round {}:", round + 1);
        for plexus_turn in [round % 2 == 0, round % 2 == 1] {
            if plexus_turn {
                let s = load(&http, &procs.pids(), clients, phase, kv_put).await;
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
    let (proposals, entries) = raft_counters(&http).await;
    let (proposals, entries) = (
        proposals.saturating_sub(before.0),
        entries.saturating_sub(before.1),
    );
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
        let l = leader(&http, &alive).await;
        let survivor = (l + 1) % 3;
        if let Some(mut c) = procs.0[l].take() {
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
        procs.0[l] = Some(spawn_plexus(dir.path(), &configs[l]));
        wait_healthy(http[l], "/healthz").await;
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
