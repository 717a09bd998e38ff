//! Shared helpers for the integration tests: nodes in this process on real
//! redb files, `plexus` processes on 127.0.0.1, a small HTTP client, and a
//! linearizability checker and a fencing-token checker for the torture
//! harness.

pub mod backend;
pub mod fencing;
pub mod linearizability;
pub mod queues;
pub mod streams;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use plexus::node::{LoadSpec, Node, NodeOptions};
use plexus::primitives::CallLimits;
use plexus::primitives::timers::{Clock, SystemClock};
use plexus::runtime::Capability;
use plexus::runtime::actor::PluginLimits;
use plexus::runtime::bindings::pattern::{Method, Request, Response};

/// The real component built from `plugins/<name>`.
pub fn wasm(name: &str) -> Arc<[u8]> {
    Arc::from(plexus::bundled::get(name).unwrap_or_else(|| panic!("no bundled plugin {name}")))
}

/// The same component with a custom section appended: identical code, a
/// different content hash, so swaps between the two change version.
pub fn variant(bytes: &[u8], tag: u8) -> Arc<[u8]> {
    let name = b"plexus-variant";
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    out.push((1 + name.len() + 1) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.push(tag);
    Arc::from(out)
}

/// Capabilities from names.
pub fn caps(names: &[&str]) -> BTreeSet<Capability> {
    names
        .iter()
        .map(|n| n.parse().expect("capability"))
        .collect()
}

/// Every capability.
pub fn all_caps() -> BTreeSet<Capability> {
    Capability::ALL.into_iter().collect()
}

/// A node in this process with its data in a temporary directory.
pub struct TestNode {
    /// The node.
    pub node: Arc<Node>,
    /// Its data directory (kept alive with the node).
    pub dir: tempfile::TempDir,
}

impl TestNode {
    /// Opens a fresh node on the system clock.
    pub fn new() -> TestNode {
        TestNode::with_clock(Arc::new(SystemClock))
    }

    /// Opens a fresh node whose plugins read the wall clock from `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> TestNode {
        TestNode::open(clock, plexus::runtime::engine::DEFAULT_INSTANCE_SLOTS)
    }

    /// Opens a fresh node that holds at most `slots` plugin instances.
    pub fn with_instance_slots(slots: usize) -> TestNode {
        TestNode::open(Arc::new(SystemClock), slots)
    }

    fn open(clock: Arc<dyn Clock>, slots: usize) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = Node::open(NodeOptions {
            id: "node-1".into(),
            data_dir: dir.path().to_path_buf(),
            call_limits: CallLimits::default(),
            max_plugin_instances: slots,
            metadata: Vec::new(),
            clock,
        })
        .expect("open node");
        TestNode { node, dir }
    }

    /// Loads a bundled plugin under `name` with `caps` and `limits`.
    pub async fn load(
        &self,
        name: &str,
        plugin: &str,
        caps: BTreeSet<Capability>,
        limits: PluginLimits,
        config: &str,
    ) {
        self.node
            .load(LoadSpec {
                name: name.into(),
                component: wasm(plugin),
                capabilities: caps,
                limits,
                config_json: config.into(),
                access: Default::default(),
            })
            .await
            .unwrap_or_else(|e| panic!("loading {name}: {e}"));
    }

    /// As [`TestNode::load`], with whom the plugin may call.
    pub async fn load_with(
        &self,
        name: &str,
        plugin: &str,
        caps: BTreeSet<Capability>,
        limits: PluginLimits,
        config: &str,
        access: plexus::runtime::actor::Access,
    ) {
        self.node
            .load(LoadSpec {
                name: name.into(),
                component: wasm(plugin),
                capabilities: caps,
                limits,
                config_json: config.into(),
                access,
            })
            .await
            .unwrap_or_else(|e| panic!("loading {name}: {e}"));
    }

    /// Sends a request to a plugin and returns the response (panics if the
    /// plugin did not answer).
    pub async fn call(&self, plugin: &str, method: Method, path: &str, body: &[u8]) -> Response {
        self.try_call(plugin, method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{plugin} {path}: {e}"))
    }

    /// Sends a request to a plugin.
    pub async fn try_call(
        &self,
        plugin: &str,
        method: Method,
        path: &str,
        body: &[u8],
    ) -> Result<Response, plexus::node::RequestError> {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let req = Request {
            method,
            path: path.into(),
            query: query.into(),
            headers: Vec::new(),
            body: body.to_vec(),
            source: plexus::runtime::bindings::pattern::RequestSource::Client,
        };
        self.node
            .request(plugin, req, Duration::from_secs(20))
            .await
    }

    /// Waits until `plugin` answers `GET path` with 200, up to `timeout`.
    /// Waits (up to 20 s) until `plugin` has taken at least `n` client
    /// requests in all.
    pub async fn wait_requests(&self, plugin: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.node.plugin(plugin).map_or(0, |s| s.requests);
            if seen >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{plugin} took {seen} of {n} requests"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub async fn wait_ok(&self, plugin: &str, path: &str, timeout: Duration) -> Response {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.try_call(plugin, Method::Get, path, b"").await
                && r.status == 200
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{plugin} {path} did not answer 200 within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Default for TestNode {
    fn default() -> Self {
        TestNode::new()
    }
}

/// Parses a response body as JSON.
pub fn body_json(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| {
        panic!(
            "status {}: body is not JSON ({e}): {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )
    })
}

/// Limits with a given memory cap and CPU deadline.
pub fn limits(memory_mib: u64, cpu_ms: u64) -> PluginLimits {
    PluginLimits {
        memory_bytes: memory_mib << 20,
        cpu: Duration::from_millis(cpu_ms),
        mailbox: 1024,
        ..PluginLimits::default()
    }
}

/// The `plexus` binary of this build, built first if this test run did not
/// build it (cargo builds a package's binaries only for that package's own
/// tests).
pub fn plexus_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("current exe");
            // Test binaries live in `target/<profile>/deps`, programs such
            // as the torture harness in `target/<profile>`.
            let mut dir = exe.parent().expect("target dir");
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir = dir.parent().expect("target dir");
            }
            let bin = dir.join(format!("plexus{}", std::env::consts::EXE_SUFFIX));
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", "plexus", "--bin", "plexus"]);
            if profile != "debug" {
                cmd.args(["--profile", profile]);
            }
            if let Some(target_dir) = dir.parent() {
                cmd.arg("--target-dir").arg(target_dir);
            }
            let status = cmd
                .status()
                .expect("running cargo build for the plexus binary");
            assert!(
                status.success() && bin.exists(),
                "building {} failed",
                bin.display()
            );
            bin
        })
        .clone()
}

/// A free port on 127.0.0.1, below the kernel's ephemeral range where it
/// can tell: a port from that range may be taken, between this check and
/// the node's bind (or while a node is down for a restart), as the local
/// port of any outgoing connection on the machine.
pub fn free_port() -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    // Where this process starts walking the range, and the range's span,
    // learned once. Test processes run side by side: each walks the range
    // from its own place, and never hands out one port twice.
    static RANGE: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let range = *RANGE.get_or_init(|| {
        let top = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
            .filter(|&top| top > LOWEST + 1_000)?;
        let start = std::process::id().wrapping_mul(2_654_435_761).wrapping_add(
            std::time::UNIX_EPOCH
                .elapsed()
                .map_or(0, |d| d.subsec_nanos()),
        );
        Some((start, top - LOWEST))
    });
    if let Some((start, span)) = range {
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = LOWEST + start.wrapping_add(n) % span;
            if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `n` free addresses on 127.0.0.1.
pub fn loopback_addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect()
}

/// The config of `node-{i+1}` of a cluster on 127.0.0.1, whose nodes listen
/// for HTTP on `http` and for peers on `peer`: `cluster` is added to its
/// `[cluster]` section, `rest` (its plugins, say) follows it.
pub fn cluster_node_config(
    i: usize,
    http: &[SocketAddr],
    peer: &[SocketAddr],
    cluster: &str,
    rest: &str,
) -> String {
    let peers: Vec<String> = (0..peer.len())
        .filter(|j| *j != i)
        .map(|j| format!("\"node-{}@{}\"", j + 1, peer[j]))
        .collect();
    format!(
        r#"version = 1
[node]
id = "node-{n}"
data_dir = "data-{n}"
http = "{http}"

[cluster]
listen = "{listen}"
peers = [{peers}]
secret = "a-cluster-secret-for-tests"
# Debug builds sharing two cores with other tests (and with cranelift
# compiling a swapped-in component) can stall a node for a few hundred
# milliseconds; slower timers keep elections to real failures.
heartbeat_ms = 100
election_timeout_ms = [600, 1200]
{cluster}
{rest}"#,
        n = i + 1,
        http = http[i],
        listen = peer[i],
        peers = peers.join(", ")
    )
}

/// Sends one HTTP/1.1 request and returns status, headers (lower-case
/// names) and body.
pub async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, Vec<(String, String)>, Vec<u8>)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::copy_from_slice(body)))?)
        .await?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, headers, body))
}

/// A `plexus up` process; killed when dropped.
pub struct Process {
    /// The child.
    pub child: Child,
    /// Its HTTP address.
    pub addr: SocketAddr,
    /// Its stderr log file.
    pub log: PathBuf,
}

impl Process {
    /// Starts `plexus up config` in `dir` and waits for `/healthz`.
    pub async fn up(dir: &Path, config: &Path, addr: SocketAddr) -> Process {
        let mut cmd = Command::new(plexus_bin());
        cmd.arg("up").arg(config);
        Process::start(cmd, dir, addr).await
    }

    /// As [`Process::up`], with `env` set for the process.
    pub async fn up_with_env(
        dir: &Path,
        config: &Path,
        addr: SocketAddr,
        env: &[(&str, &str)],
    ) -> Process {
        let mut cmd = Command::new(plexus_bin());
        cmd.arg("up").arg(config).envs(env.iter().copied());
        Process::start(cmd, dir, addr).await
    }

    /// As [`Process::up`], with the process's open-file limit set to
    /// `open_files` (`ulimit -n`).
    pub async fn up_with_open_files(
        dir: &Path,
        config: &Path,
        addr: SocketAddr,
        open_files: u32,
    ) -> Process {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {open_files} && exec \"$0\" up \"$1\""))
            .arg(plexus_bin())
            .arg(config);
        Process::start(cmd, dir, addr).await
    }

    async fn start(mut cmd: Command, dir: &Path, addr: SocketAddr) -> Process {
        let log = dir.join(format!("node-{}.log", addr.port()));
        let child = cmd
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn plexus");
        let mut p = Process { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http(addr, "GET", "/healthz", &[], b"").await {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "plexus exited with {status}: {}",
                    std::fs::read_to_string(&p.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "plexus did not come up: {}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` `plexus` processes on 127.0.0.1 in one temporary directory, each
/// started from `node-{i+1}.toml` as `config(i, http, peer)` writes it (the
/// addresses of every node's HTTP and peer listeners).
pub struct Processes {
    /// Where the configs, data and logs are.
    pub dir: tempfile::TempDir,
    /// Each node's HTTP address.
    pub http: Vec<SocketAddr>,
    /// The running processes; `None` for one killed and not restarted.
    pub procs: Vec<Option<Process>>,
}

impl Processes {
    /// Writes the configs and starts every node, waiting for each.
    pub async fn start(
        n: usize,
        config: impl Fn(usize, &[SocketAddr], &[SocketAddr]) -> String,
    ) -> Processes {
        let dir = tempfile::tempdir().expect("tempdir");
        let (http, peer) = (loopback_addrs(n), loopback_addrs(n));
        for i in 0..n {
            let path = dir.path().join(format!("node-{}.toml", i + 1));
            std::fs::write(path, config(i, &http, &peer)).expect("writing a config");
        }
        let mut nodes = Processes {
            dir,
            http,
            procs: Vec::new(),
        };
        for i in 0..n {
            let p = nodes.spawn(i).await;
            nodes.procs.push(Some(p));
        }
        nodes
    }

    /// Starts node `i` (again) from its config.
    pub async fn spawn(&self, i: usize) -> Process {
        let path = self.dir.path().join(format!("node-{}.toml", i + 1));
        Process::up(self.dir.path(), &path, self.http[i]).await
    }

    /// `method path` on node `i`, sent again (up to 30 s) while the answer
    /// is 421, 503 or 504 (no leader yet, or an outcome unknown); the
    /// status and the body as JSON (`null` when it is not).
    pub async fn call(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(answer)) = call_once(self.http[i], method, path, body).await {
                return answer;
            }
            assert!(
                Instant::now() < deadline,
                "{method} {path} on node-{} never answered",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// As [`Processes::call`] on `addr`, but `None` once the node cannot
    /// be reached (it was killed): for clients that stop with their node.
    pub async fn call_while_up(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Option<(u16, serde_json::Value)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(answer) = call_once(addr, method, path, body).await.ok()? {
                return Some(answer);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{method} {path} on {addr} never answered");
    }

    /// The node that says it leads (another node's view may lag behind an
    /// election), asked with the admin `token`; waits up to 15 s for one.
    pub async fn leader(&self, token: &str) -> usize {
        let auth = format!("Bearer {token}");
        let said = |i: usize| {
            let (addr, auth) = (self.http[i], auth.clone());
            async move {
                let (_, body) = http(
                    addr,
                    "GET",
                    "/v1/admin/status",
                    &[("authorization", &auth)],
                    b"",
                )
                .await
                .ok()?;
                let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
                let l = v["leader"]
                    .as_str()?
                    .strip_prefix("node-")?
                    .parse::<usize>()
                    .ok()?;
                l.checked_sub(1)
            }
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            for i in (0..self.procs.len()).filter(|i| self.procs[*i].is_some()) {
                if let Some(l) = said(i).await
                    && self.procs.get(l).is_some_and(Option::is_some)
                    && said(l).await == Some(l)
                {
                    return l;
                }
            }
            assert!(Instant::now() < deadline, "no leader elected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One request: `Ok(None)` for 421, 503 or 504 (to be sent again),
/// otherwise the status and the body as JSON (`null` when it is not).
async fn call_once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<Option<(u16, serde_json::Value)>> {
    let (status, bytes) = http(addr, method, path, &[], body).await?;
    if [421, 503, 504].contains(&status) {
        return Ok(None);
    }
    let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok(Some((status, v)))
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 request on a fresh connection; returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::copy_from_slice(body)))?)
        .await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}
