//! What the benchmark programs that start a cluster share: their command
//! line, `plexus` processes on loopback (three, or one alone), a keep-alive HTTP/1.1
//! client light enough to leave the machine to the servers, and CPU
//! accounting from `/proc`.

// Each program uses part of this.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// The value after `name` on the command line.
pub fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The number after `name` on the command line, or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    arg_str(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The comma-separated numbers after `name`, or `default`.
pub fn arg_list(name: &str, default: &[u64]) -> Vec<u64> {
    arg_str(name)
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<u64>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` loopback addresses on free ports.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect()
}

/// One keep-alive HTTP/1.1 connection of the load: a request is written
/// and its response read by the client's own task, so the load generator
/// spends little CPU of the machine the servers share.
pub struct Conn {
    stream: tokio::net::TcpStream,
    pub addr: SocketAddr,
    out: Vec<u8>,
    /// Bytes read and not yet consumed.
    inp: Vec<u8>,
    /// The body of the last response.
    body: Vec<u8>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            addr,
            out: Vec::with_capacity(512),
            inp: Vec::with_capacity(4096),
            body: Vec::new(),
        })
    }

    /// Sends one request and reads its whole response; returns the status
    /// (the body is [`Conn::body`]).
    pub async fn send(&mut self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<u16> {
        use std::io::Write;
        use tokio::io::AsyncWriteExt;
        self.out.clear();
        write!(
            self.out,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n\r\n",
            self.addr,
            body.len()
        )?;
        self.out.extend_from_slice(body);
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
        self.body.clear();
        match body_len {
            Some(len) => {
                while self.inp.len() < len {
                    self.fill().await?;
                }
                self.body.extend(self.inp.drain(..len));
            }
            None => self.read_chunked().await?,
        }
        Ok(status)
    }

    /// Sends one request: a 2xx answer's status and body, or an error
    /// with the status and the start of the body.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, &[u8])> {
        let status = self.send(method, path, body).await?;
        let body = &self.body;
        anyhow::ensure!(
            (200..300).contains(&status),
            "{status} {}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        Ok((status, body))
    }

    /// The body of the last response.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Reads a chunked body into `body`.
    async fn read_chunked(&mut self) -> anyhow::Result<()> {
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
            self.body
                .extend_from_slice(&self.inp[line_end + 2..line_end + 2 + size]);
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

/// One request on a connection of its own, with the admin token on admin
/// paths; `None` on any failure.
pub async fn once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
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

/// Sends one request until it answers 2xx (an election answers 421 or
/// 503 for a while), for at most 30 s; returns the body.
pub async fn until_ok(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match once(addr, method, path, body).await {
            Some((status, body)) if (200..300).contains(&status) => return body,
            other => {
                let status = other.map(|(s, b)| format!("{s} {}", String::from_utf8_lossy(&b)));
                assert!(
                    Instant::now() < deadline,
                    "{method} {path} on {addr} failed: {status:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU time (user + system) the processes `pids` have used so far.
pub fn cpu_time(pids: &[u32]) -> Duration {
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
pub struct MachineTicks {
    pub idle: u64,
    pub iowait: u64,
    /// Taken by the hypervisor for other guests while this one was ready.
    pub steal: u64,
    pub total: u64,
}

impl MachineTicks {
    pub fn now() -> MachineTicks {
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

    pub fn since(self, before: MachineTicks) -> MachineTicks {
        MachineTicks {
            idle: self.idle.saturating_sub(before.idle),
            iowait: self.iowait.saturating_sub(before.iowait),
            steal: self.steal.saturating_sub(before.steal),
            total: self.total.saturating_sub(before.total),
        }
    }

    pub fn add(&mut self, other: MachineTicks) {
        self.idle += other.idle;
        self.iowait += other.iowait;
        self.steal += other.steal;
        self.total += other.total;
    }

    /// How the machine's time went, as a line of the report.
    pub fn describe(&self) -> String {
        let share = |t: u64| 100.0 * t as f64 / self.total.max(1) as f64;
        format!(
            "machine: {:.0}% idle, {:.0}% I/O wait, {:.0}% stolen by the hypervisor",
            share(self.idle),
            share(self.iowait),
            share(self.steal)
        )
    }
}

/// CPU time used over a stretch of a run: by the servers, by this load
/// generator, and how the whole machine's went.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub servers: Duration,
    pub client: Duration,
    pub machine: MachineTicks,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.servers += other.servers;
        self.client += other.client;
        self.machine.add(other.machine);
    }

    /// How the machine's time went, as a line of the report, with the
    /// share that neither the servers nor the clients used (other work on
    /// the machine).
    pub fn describe(&self) -> String {
        let m = &self.machine;
        let busy = m.total.saturating_sub(m.idle + m.iowait + m.steal);
        // `/proc/stat` counts in ticks of 10 ms.
        let ours = (self.servers + self.client).as_millis() as u64 / 10;
        format!(
            "{}, {:.0}% other processes",
            m.describe(),
            100.0 * busy.saturating_sub(ours) as f64 / m.total.max(1) as f64
        )
    }
}

/// Counts CPU time from its start; [`Meter::stop`] says how much went.
pub struct Meter {
    pids: Vec<u32>,
    servers: Duration,
    client: Duration,
    machine: MachineTicks,
}

impl Meter {
    /// Starts counting the CPU of the servers `pids` and of this process.
    pub fn start(pids: &[u32]) -> Meter {
        Meter {
            pids: pids.to_vec(),
            servers: cpu_time(pids),
            client: cpu_time(&[std::process::id()]),
            machine: MachineTicks::now(),
        }
    }

    pub fn stop(&self) -> Usage {
        Usage {
            servers: cpu_time(&self.pids).saturating_sub(self.servers),
            client: cpu_time(&[std::process::id()]).saturating_sub(self.client),
            machine: MachineTicks::now().since(self.machine),
        }
    }
}

/// Failures of a load, counted by what they said.
#[derive(Clone, Default)]
pub struct Errors(std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>);

impl Errors {
    /// Counts one failure; `what` is cut short so that failures of a kind
    /// (a status, a connection refused) fall together.
    pub fn note(&self, what: impl std::fmt::Display) {
        let what: String = what.to_string().chars().take(80).collect();
        if let Ok(mut all) = self.0.lock() {
            *all.entry(what).or_default() += 1;
        }
    }

    /// Every failure counted, by what it said.
    pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.0.lock().map(|all| all.clone()).unwrap_or_default()
    }
}

/// The `p` quantile of `sorted` (NaN when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Processes killed when dropped; a slot is `None` while its process is
/// down.
pub struct Procs(pub Vec<Option<Child>>);

impl Procs {
    /// The process ids of those running.
    pub fn pids(&self) -> Vec<u32> {
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

/// `plexus` processes on loopback: a cluster of three, or a node alone.
pub struct Plexus {
    pub procs: Procs,
    /// Their client (HTTP) addresses.
    pub http: Vec<SocketAddr>,
    pub configs: Vec<PathBuf>,
    dir: PathBuf,
}

impl Plexus {
    /// Starts three nodes in `dir` that load the `[[plugins]]` tables
    /// `plugins`, and waits until they are healthy and have a leader.
    /// The Raft timers come from `--heartbeat-ms`, `--election-min-ms` and
    /// `--election-max-ms`.
    pub async fn start(dir: &Path, plugins: &str) -> Plexus {
        Plexus::start_nodes(dir, 3, plugins).await
    }

    /// Starts `n` nodes in `dir` as [`Plexus::start`] does; one node has
    /// no peers, and so runs on its own local log instead of Raft.
    pub async fn start_nodes(dir: &Path, n: usize, plugins: &str) -> Plexus {
        let http = free_addrs(n);
        let peer = free_addrs(n);
        let configs: Vec<PathBuf> = (0..n)
            .map(|i| plexus_config(dir, i, &http, &peer, plugins))
            .collect();
        let procs = Procs(configs.iter().map(|c| Some(spawn_plexus(dir, c))).collect());
        for a in &http {
            wait_healthy(*a, "/healthz").await;
        }
        let plexus = Plexus {
            procs,
            http,
            configs,
            dir: dir.to_path_buf(),
        };
        plexus.leader(&vec![true; n]).await;
        plexus
    }

    /// Starts node `i` again from its config.
    pub async fn restart(&mut self, i: usize) {
        self.procs.0[i] = Some(spawn_plexus(&self.dir, &self.configs[i]));
        wait_healthy(self.http[i], "/healthz").await;
    }

    /// The leader among the nodes `alive`, once there is one.
    pub async fn leader(&self, alive: &[bool]) -> usize {
        loop {
            for i in 0..self.http.len() {
                if !alive[i] {
                    continue;
                }
                if let Some((200, body)) = once(self.http[i], "GET", "/v1/admin/status", b"").await
                {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if let Some(l) = v["leader"].as_str() {
                        let l = l.trim_start_matches("node-").parse::<usize>().unwrap_or(1) - 1;
                        if alive.get(l) == Some(&true) {
                            return l;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposals and Raft entries written by the leaders so far, summed
    /// over the nodes (each counts only while it leads).
    pub async fn raft_counters(&self) -> (u64, u64) {
        let mut sums = (0, 0);
        for addr in &self.http {
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

    /// Proposals and Raft entries since `before`, a
    /// [`Plexus::raft_counters`].
    pub async fn raft_since(&self, before: (u64, u64)) -> (u64, u64) {
        let now = self.raft_counters().await;
        (
            now.0.saturating_sub(before.0),
            now.1.saturating_sub(before.1),
        )
    }
}

/// The raft timers of the command line, as the report's second line.
pub fn raft_timers() -> String {
    format!(
        "# raft timers: heartbeat {} ms, election timeout {}-{} ms",
        arg("--heartbeat-ms", 50),
        arg("--election-min-ms", 150),
        arg("--election-max-ms", 300)
    )
}

fn plexus_config(
    dir: &Path,
    i: usize,
    http: &[SocketAddr],
    peer: &[SocketAddr],
    plugins: &str,
) -> PathBuf {
    let peers: Vec<String> = (0..http.len())
        .filter(|j| *j != i)
        .map(|j| format!("\"node-{}@{}\"", j + 1, peer[j]))
        .collect();
    // A node alone has no `[cluster]`: it commits to its local log.
    let cluster = if peers.is_empty() {
        String::new()
    } else {
        format!(
            "[cluster]\nlisten = \"{l}\"\npeers = [{p}]\nsecret = \"bench-cluster-secret\"\n\
             heartbeat_ms = {hb}\nelection_timeout_ms = [{emin}, {emax}]\n",
            l = peer[i],
            p = peers.join(", "),
            hb = arg("--heartbeat-ms", 50),
            emin = arg("--election-min-ms", 150),
            emax = arg("--election-max-ms", 300),
        )
    };
    let text = format!(
        "version = 1\n[node]\nid = \"node-{n}\"\ndata_dir = \"data-{n}\"\nhttp = \"{h}\"\nrequest_timeout_ms = 30000\n\
         {cluster}[admin]\ntoken = \"bench-token\"\n{plugins}",
        n = i + 1,
        h = http[i],
    );
    let path = dir.join(format!("node-{}.toml", i + 1));
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `plexus up config` in `dir`; what it prints goes to the
/// config's name with `.log` in place of `.toml`, in `dir`.
pub fn spawn_plexus(dir: &Path, config: &Path) -> Child {
    // PLEXUS_BIN runs another build of the node under the same load.
    let bin = std::env::var("PLEXUS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_plexus").into());
    let log = std::fs::File::create(config.with_extension("log")).expect("node log");
    Command::new(bin)
        .arg("up")
        .arg(config)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
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
