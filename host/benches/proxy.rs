//! Proxy benchmark: a program that prints figures.
//!
//!     cargo bench -p plexus --bench proxy -- --nginx PATH --haproxy PATH --wrk PATH
//!         [--seconds 10 --rounds 3 --connections 64,256 --forward-seconds 10
//!          --forward-connections 64,256]
//!
//! The proxy path, side by side in one run: an nginx with one worker
//! answers a small body; `wrk` (two threads, keep-alive connections) loads
//! it directly, through HAProxy (one thread), and through a `plexus` node
//! running the `http-proxy` plugin, which makes one outbound HTTP call per
//! request. The three phases alternate in `--rounds` rounds, each in a
//! different order, so that the machine speeding up or slowing down falls
//! on all alike. For each proxy it prints requests per second, the p50 and
//! p99 latency it adds over the direct phase, and its CPU time (user and
//! system, from `/proc`) per request.
//!
//! Then forwarding between nodes: three `plexus` processes on loopback run
//! the `relay` plugin; the same request is sent straight to the node that
//! answers it, and to another node that forwards it there
//! (`reply::forward`), alternating, at each of `--forward-connections`.
//!
//! Then balancing (`--balance-seconds`, 0 skips it): three backends in
//! this process (hyper, one thread), one of which answers after
//! `--slow-ms` (20); `wrk` loads HAProxy with `balance leastconn` and with
//! `balance random(2)`, and a `plexus` node whose `load-balancer` plugin
//! runs `least_request` (two choices) and `peak_ewma`, in front of the
//! same three, at each of `--balance-connections`, phases alternating.
//! For each it prints requests per second, p50 and p99, CPU per request,
//! and the share of requests the slow backend took.
//!
//! Then the edge patterns (`--edge-seconds`, 0 by default, skips them),
//! each beside HAProxy and an NGINX proxy set up for the same job, in
//! front of nginx backends, at each of `--edge-connections`, phases
//! alternating:
//! - retries: HAProxy with `retries 2` and `retry-on` connect failures,
//!   empty responses, response timeouts and 500, 502, 503, 504,
//!   NGINX with `proxy_next_upstream error timeout http_502 http_503
//!   http_504` and 3 tries, and the `ambassador` plugin with 2 retries
//!   and its budget, to a backend that answers (the cost of the path that
//!   would retry);
//! - prefix routing with a split: `/orders` sent 30% to a second backend
//!   and 70% to the first, everything else to the first: HAProxy with a
//!   `path_beg` ACL and a weighted backend, NGINX with `split_clients`,
//!   and the `strangler-fig` plugin with a route of weight 30.
//!
//! Then a failing upstream (`--failing-seconds`, 0 by default, skips it):
//! three `plexus` nodes in front of a service that answers every request
//! 503, loaded through all three at once (`wrk` on each, `--rounds`
//! rounds): how many requests per second reach the service through
//! `http-proxy` (no protection), through the `ambassador` (2 retries)
//! with a retry budget per node and with one counted over the cluster,
//! and through the `circuit-breaker` with a breaker per node and one
//! shared by the cluster.
//!
//! `--seconds 0` skips the proxy path.
//!
//! `PLEXUS_BIN=path` runs another `plexus` build.
//! `host/benches/proxy-vs-haproxy.sh [ARGS]` installs nginx, HAProxy and
//! wrk when missing and runs this.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{Procs, arg, arg_str, cpu_time, free_port, spawn_plexus};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn wait_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr}");
}

/// Waits until `GET path` on `addr` answers 200 (through wrk's own
/// client would be overkill: one plain request).
fn wait_ok(addr: SocketAddr, path: &str) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            let mut out = String::new();
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_to_string(&mut out).is_ok()
                && out.starts_with("HTTP/1.1 200")
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr}{path} did not answer 200");
}

/// Waits until `GET path` on `addr` gets an answer from the plugin (any
/// status but 404, which a route not loaded yet gets).
fn wait_answered(addr: SocketAddr, path: &str) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            let mut out = String::new();
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_to_string(&mut out).is_ok()
                && out.starts_with("HTTP/1.1 ")
                && !out.starts_with("HTTP/1.1 404")
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr}{path} never answered");
}

fn start_nginx(nginx: &str, dir: &Path) -> (Child, u16) {
    let port = free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{\n    listen 127.0.0.1:{port};\n    location / {{ return 200 \"hello, world\\n\"; }}\n  }}\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nginx");
    wait_port(local(port));
    (child, port)
}

fn start_haproxy(haproxy: &str, dir: &Path, backend: u16) -> (Child, u16) {
    let port = free_port();
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  nbthread 1\n  maxconn 8000\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  http-reuse always\n\
             frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n\
             backend b\n  server s1 127.0.0.1:{backend}\n"
        ),
    )
    .unwrap();
    let child = Command::new(haproxy)
        .arg("-f")
        .arg(&conf)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn haproxy");
    wait_port(local(port));
    (child, port)
}

fn start_plexus_proxy(dir: &Path, backend: u16) -> (Child, u16) {
    let port = free_port();
    let config = dir.join("proxy-node.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n[node]\nid = \"proxy\"\ndata_dir = \"proxy-data\"\nhttp = \"127.0.0.1:{port}\"\n\
             max_connections_per_client = 4096\n\
             [[plugins]]\nname = \"proxy\"\ncomponent = \"bundled:http-proxy\"\ncapabilities = [\"outbound-http\"]\n\
             allowed_outbound_hosts = [\"http://127.0.0.1:{backend}\"]\n\
             limits = {{ mailbox = 8192, max_calls_in_flight = 16384 }}\n\
             config = {{ upstream = \"http://127.0.0.1:{backend}\" }}\n"
        ),
    )
    .unwrap();
    let child = spawn_plexus(dir, &config);
    wait_ok(local(port), "/v1/plugins/proxy/");
    (child, port)
}

/// What one wrk run reported.
#[derive(Debug, Default, Clone)]
struct Run {
    requests: u64,
    seconds: f64,
    errors: u64,
    p50_us: f64,
    p99_us: f64,
    cpu: Duration,
}

fn micros(value: &str) -> Option<f64> {
    let (num, unit) = value
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| value.split_at(i))?;
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => return None,
    })
}

/// Runs wrk against `url` with `connections` for `seconds`, measuring the
/// CPU time of `pids` meanwhile.
fn wrk(wrk: &str, url: &str, connections: u64, seconds: u64, pids: &[u32]) -> Run {
    wrk_threads(wrk, 2, url, connections, seconds, pids)
}

/// As [`wrk`], with `threads` threads of wrk.
fn wrk_threads(
    wrk: &str,
    threads: u64,
    url: &str,
    connections: u64,
    seconds: u64,
    pids: &[u32],
) -> Run {
    let before = cpu_time(pids);
    let started = Instant::now();
    let out = Command::new(wrk)
        .args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args([
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "--timeout",
            "10s",
        ])
        .arg(url)
        .output()
        .expect("running wrk");
    let cpu = cpu_time(pids) - before;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run {
        cpu,
        seconds: started.elapsed().as_secs_f64(),
        ..Run::default()
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => run.p50_us = micros(v).unwrap_or(f64::NAN),
            ["99%", v] => run.p99_us = micros(v).unwrap_or(f64::NAN),
            [n, "requests", "in", secs, ..] => {
                run.requests = n.parse().unwrap_or(0);
                run.seconds = secs
                    .trim_end_matches(',')
                    .trim_end_matches('s')
                    .parse()
                    .unwrap_or(run.seconds);
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                run.errors += n.parse::<u64>().unwrap_or(0)
            }
            ["Socket", "errors:", rest @ ..] => {
                run.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    if run.requests == 0 {
        eprintln!(
            "wrk printed nothing usable for {url}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    run
}

/// Runs of one target, summed over rounds.
#[derive(Default)]
struct Totals {
    runs: Vec<Run>,
}

impl Totals {
    fn rps(&self) -> f64 {
        let reqs: u64 = self.runs.iter().map(|r| r.requests).sum();
        let secs: f64 = self.runs.iter().map(|r| r.seconds).sum();
        reqs as f64 / secs.max(1e-9)
    }

    fn median(&self, f: impl Fn(&Run) -> f64) -> f64 {
        let mut v: Vec<f64> = self.runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn cpu_per_request_us(&self) -> f64 {
        let cpu: f64 = self.runs.iter().map(|r| r.cpu.as_secs_f64()).sum();
        let reqs: u64 = self.runs.iter().map(|r| r.requests).sum();
        cpu * 1e6 / reqs.max(1) as f64
    }

    fn errors(&self) -> u64 {
        self.runs.iter().map(|r| r.errors).sum()
    }
}

fn proxy_path(dir: &Path, nginx: &str, haproxy: &str, wrk_bin: &str) {
    let seconds = arg("--seconds", 10);
    let rounds = arg("--rounds", 3);
    let connections = connection_counts("--connections");
    let mut procs = Procs(Vec::new());
    let (child, backend) = start_nginx(nginx, dir);
    procs.0.push(Some(child));
    let (child, hport) = start_haproxy(haproxy, dir, backend);
    let hpid = child.id();
    procs.0.push(Some(child));
    let (child, pport) = start_plexus_proxy(dir, backend);
    let ppid = child.id();
    procs.0.push(Some(child));
    let targets = [
        (
            "direct (nginx)",
            format!("http://127.0.0.1:{backend}/"),
            vec![],
        ),
        ("HAProxy", format!("http://127.0.0.1:{hport}/"), vec![hpid]),
        (
            "plexus http-proxy",
            format!("http://127.0.0.1:{pport}/v1/plugins/proxy/"),
            vec![ppid],
        ),
    ];
    // Warm up every path: connection pools, caches, the plugin.
    for (_, url, pids) in &targets {
        wrk(wrk_bin, url, 64, 2, pids);
    }
    println!("proxy path: wrk -t2, {seconds} s per phase, {rounds} rounds, phases alternating");
    for &c in &connections {
        let mut totals: Vec<Totals> = (0..targets.len()).map(|_| Totals::default()).collect();
        for round in 0..rounds as usize {
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                let (_, url, pids) = &targets[i];
                totals[i].runs.push(wrk(wrk_bin, url, c, seconds, pids));
            }
        }
        let direct = (
            totals[0].median(|r| r.p50_us),
            totals[0].median(|r| r.p99_us),
        );
        println!("\n{c} connections:");
        println!(
            "  {:<20} {:>10} {:>12} {:>12} {:>14} {:>8}",
            "target", "req/s", "added p50", "added p99", "CPU/request", "errors"
        );
        for (i, (name, _, pids)) in targets.iter().enumerate() {
            let t = &totals[i];
            let (added50, added99) = if i == 0 {
                (0.0, 0.0)
            } else {
                (
                    t.median(|r| r.p50_us) - direct.0,
                    t.median(|r| r.p99_us) - direct.1,
                )
            };
            let cpu = if pids.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1} us", t.cpu_per_request_us())
            };
            println!(
                "  {name:<20} {:>10.0} {:>9.0} us {:>9.0} us {:>14} {:>8}",
                t.rps(),
                added50,
                added99,
                cpu,
                t.errors()
            );
        }
        println!(
            "  plexus / HAProxy: {:.2}x req/s (direct p50 {:.0} us, p99 {:.0} us)",
            totals[2].rps() / totals[1].rps().max(1e-9),
            direct.0,
            direct.1
        );
    }
}

/// The connection counts listed after `name` (`64,256` unless given).
fn connection_counts(name: &str) -> Vec<u64> {
    arg_str(name)
        .unwrap_or_else(|| "64,256".into())
        .split(',')
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// Writes the config of node `i` (of three on loopback, `http` and `peer`
/// their ports) as `dir/{name}-{i+1}.toml`, with `plugins` (TOML) after
/// its node and cluster sections; returns its path.
fn cluster_config(
    dir: &Path,
    name: &str,
    i: usize,
    http: &[u16],
    peer: &[u16],
    plugins: &str,
) -> std::path::PathBuf {
    let peers: Vec<String> = (0..peer.len())
        .filter(|j| *j != i)
        .map(|j| format!("\"node-{}@127.0.0.1:{}\"", j + 1, peer[j]))
        .collect();
    let config = dir.join(format!("{name}-{}.toml", i + 1));
    std::fs::write(
        &config,
        format!(
            "version = 1\n[node]\nid = \"node-{n}\"\ndata_dir = \"{name}-data-{n}\"\nhttp = \"127.0.0.1:{h}\"\n\
             max_connections_per_client = 4096\n\
             [cluster]\nlisten = \"127.0.0.1:{l}\"\npeers = [{p}]\nsecret = \"bench-cluster-secret\"\n{plugins}",
            n = i + 1,
            h = http[i],
            l = peer[i],
            p = peers.join(", ")
        ),
    )
    .unwrap();
    config
}

fn forwarding(dir: &Path, wrk_bin: &str) {
    let seconds = arg("--forward-seconds", 10);
    let rounds = arg("--rounds", 3);
    let http: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let relay = "[[plugins]]\nname = \"relay\"\ncomponent = \"bundled:relay\"\n\
                 capabilities = [\"messaging\", \"plugins\", \"outbound-http\"]\nlimits = { mailbox = 8192 }\n";
    let mut children = Vec::new();
    for i in 0..3 {
        let config = cluster_config(dir, "fwd", i, &http, &peer, relay);
        children.push(spawn_plexus(dir, &config));
    }
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let _procs = Procs(children.into_iter().map(Some).collect());
    // node-2 answers `/on/node-2/...` itself; node-1 forwards it there.
    let path = "/v1/plugins/relay/on/node-2/k";
    wait_ok(local(http[1]), path);
    wait_ok(local(http[0]), path);
    let targets = [
        (
            "straight to the owner",
            format!("http://127.0.0.1:{}{path}", http[1]),
        ),
        (
            "forwarded by another node",
            format!("http://127.0.0.1:{}{path}", http[0]),
        ),
    ];
    for (_, url) in &targets {
        wrk(wrk_bin, url, 64, 2, &pids);
    }
    for connections in connection_counts("--forward-connections") {
        println!(
            "\nforwarding between nodes: 3 plexus processes, relay plugin, {connections} connections, {seconds} s per phase, {rounds} rounds"
        );
        let mut totals = [Totals::default(), Totals::default()];
        for round in 0..rounds as usize {
            for k in 0..2 {
                let i = (k + round) % 2;
                totals[i]
                    .runs
                    .push(wrk(wrk_bin, &targets[i].1, connections, seconds, &pids));
            }
        }
        report_forwarding(&targets, &totals);
    }
}

fn report_forwarding(targets: &[(&str, String); 2], totals: &[Totals; 2]) {
    for (i, (name, _)) in targets.iter().enumerate() {
        let t = &totals[i];
        println!(
            "  {name:<26} {:>10.0} req/s  p50 {:>6.0} us  p99 {:>6.0} us  CPU/request (3 nodes) {:>6.1} us  errors {}",
            t.rps(),
            t.median(|r| r.p50_us),
            t.median(|r| r.p99_us),
            t.cpu_per_request_us(),
            t.errors()
        );
    }
    println!(
        "  forwarded / direct: {:.2}x req/s",
        totals[1].rps() / totals[0].rps().max(1e-9)
    );
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wrk_bin = arg_str("--wrk").unwrap_or_else(|| "wrk".into());
    match (arg_str("--nginx"), arg_str("--haproxy")) {
        _ if arg("--seconds", 10) == 0 => {}
        (Some(nginx), Some(haproxy)) => proxy_path(dir.path(), &nginx, &haproxy, &wrk_bin),
        _ => println!("proxy path skipped: give --nginx PATH and --haproxy PATH"),
    }
    if arg("--forward-seconds", 10) > 0 {
        forwarding(dir.path(), &wrk_bin);
    }
    if arg("--balance-seconds", 10) > 0 {
        match arg_str("--haproxy") {
            Some(haproxy) => balancing(dir.path(), &haproxy, &wrk_bin),
            None => println!("balancing skipped: give --haproxy PATH"),
        }
    }
    if arg("--failing-seconds", 0) > 0 {
        failing(dir.path(), &wrk_bin);
    }
    if arg("--edge-seconds", 0) > 0 {
        match (arg_str("--nginx"), arg_str("--haproxy")) {
            (Some(nginx), Some(haproxy)) => edge(dir.path(), &nginx, &haproxy, &wrk_bin),
            _ => println!("edge patterns skipped: give --nginx PATH and --haproxy PATH"),
        }
    }
}

/// Starts a process from a config file written to `dir/name`.
fn start_with_config(bin: &str, args: &[&str], dir: &Path, name: &str, text: &str) -> Child {
    let conf = dir.join(name);
    std::fs::write(&conf, text).unwrap();
    let mut cmd = Command::new(bin);
    for a in args {
        cmd.arg(a.replace("{conf}", &conf.display().to_string()));
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"))
}

/// HAProxy for the edge jobs: a frontend on `retry` that retries to
/// `legacy`, and one on `split` that sends `/orders` 30/70 to `new` and
/// `legacy` and the rest to `legacy`.
fn start_haproxy_edge(haproxy: &str, dir: &Path, legacy: u16, new: u16) -> (Child, u16, u16) {
    let (retry, split) = (free_port(), free_port());
    let text = format!(
        "global\n  nbthread 1\n  maxconn 8000\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  http-reuse always\n\
         frontend retry\n  bind 127.0.0.1:{retry}\n  default_backend retrying\n\
         backend retrying\n  retries 2\n  retry-on conn-failure empty-response response-timeout 500 502 503 504\n  server s1 127.0.0.1:{legacy}\n\
         frontend split\n  bind 127.0.0.1:{split}\n  acl orders path_beg /orders\n  use_backend moving if orders\n  default_backend legacy\n\
         backend moving\n  balance random\n  server new 127.0.0.1:{new} weight 30\n  server old 127.0.0.1:{legacy} weight 70\n\
         backend legacy\n  server old 127.0.0.1:{legacy}\n"
    );
    let child = start_with_config(
        haproxy,
        &["-f", "{conf}", "-db"],
        dir,
        "haproxy-edge.cfg",
        &text,
    );
    wait_port(local(retry));
    wait_port(local(split));
    (child, retry, split)
}

/// An NGINX proxy (one worker) for the same two jobs.
fn start_nginx_edge(nginx: &str, dir: &Path, legacy: u16, new: u16) -> (Child, u16, u16) {
    let (retry, split) = (free_port(), free_port());
    let edge = dir.join("nginx-edge");
    std::fs::create_dir_all(&edge).unwrap();
    let text = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
         client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         upstream legacy {{ server 127.0.0.1:{legacy}; keepalive 512; }}\n\
         upstream new {{ server 127.0.0.1:{new}; keepalive 512; }}\n\
         split_clients \"${{request_id}}\" $side {{ 30% new; * legacy; }}\n\
         server {{\n    listen 127.0.0.1:{retry};\n    location / {{ proxy_pass http://legacy; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
           proxy_next_upstream error timeout http_502 http_503 http_504; proxy_next_upstream_tries 3; }}\n  }}\n\
         server {{\n    listen 127.0.0.1:{split};\n    location /orders {{ proxy_pass http://$side; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n\
           location / {{ proxy_pass http://legacy; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        d = edge.display()
    );
    let child = start_with_config(
        nginx,
        &["-c", "{conf}", "-p", &edge.display().to_string()],
        &edge,
        "nginx.conf",
        &text,
    );
    wait_port(local(retry));
    wait_port(local(split));
    (child, retry, split)
}

/// One node with `ambassador` (upstream `b`, 2 retries) and
/// `strangler-fig` (`/orders` weight 30 to `new`).
fn start_plexus_edge(dir: &Path, legacy: u16, new: u16) -> (Child, u16) {
    let port = free_port();
    let config = dir.join("edge-node.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n[node]\nid = \"edge\"\ndata_dir = \"edge-data\"\nhttp = \"127.0.0.1:{port}\"\n\
             max_connections_per_client = 4096\n\
             [[plugins]]\nname = \"amb\"\ncomponent = \"bundled:ambassador\"\n\
             capabilities = [\"outbound-http\", \"timers\", \"messaging\", \"log\"]\n\
             allowed_outbound_hosts = [\"http://127.0.0.1:{legacy}\"]\n\
             limits = {{ mailbox = 8192, max_calls_in_flight = 16384 }}\n\
             config = {{ access_log = false, upstreams = [{{ name = \"b\", url = \"http://127.0.0.1:{legacy}\", num_retries = 2 }}] }}\n\
             [[plugins]]\nname = \"fig\"\ncomponent = \"bundled:strangler-fig\"\n\
             capabilities = [\"outbound-http\", \"consensus\", \"storage\", \"plugins\"]\n\
             allowed_outbound_hosts = [\"http://127.0.0.1:{legacy}\", \"http://127.0.0.1:{new}\"]\n\
             limits = {{ mailbox = 8192, max_calls_in_flight = 16384 }}\n\
             config = {{ legacy = \"http://127.0.0.1:{legacy}\", routes = [{{ prefix = \"/orders\", new = {{ url = \"http://127.0.0.1:{new}\" }}, weight = 30 }}] }}\n"
        ),
    )
    .unwrap();
    let child = spawn_plexus(dir, &config);
    wait_ok(local(port), "/v1/plugins/amb/b/");
    wait_ok(local(port), "/v1/plugins/fig/orders/1");
    (child, port)
}

fn edge(dir: &Path, nginx: &str, haproxy: &str, wrk_bin: &str) {
    let seconds = arg("--edge-seconds", 0);
    let rounds = arg("--rounds", 3);
    let legacy_dir = dir.join("legacy");
    let new_dir = dir.join("new");
    std::fs::create_dir_all(&legacy_dir).unwrap();
    std::fs::create_dir_all(&new_dir).unwrap();
    let mut procs = Procs(Vec::new());
    let (child, legacy) = start_nginx(nginx, &legacy_dir);
    procs.0.push(Some(child));
    let (child, new) = start_nginx(nginx, &new_dir);
    procs.0.push(Some(child));
    let (child, h_retry, h_split) = start_haproxy_edge(haproxy, dir, legacy, new);
    let hpid = child.id();
    procs.0.push(Some(child));
    let (child, n_retry, n_split) = start_nginx_edge(nginx, dir, legacy, new);
    let npid = child.id();
    procs.0.push(Some(child));
    let (child, pport) = start_plexus_edge(dir, legacy, new);
    let ppid = child.id();
    procs.0.push(Some(child));
    let jobs = [
        (
            "retries (2, on 5xx and connect failures)",
            [
                ("HAProxy", format!("http://127.0.0.1:{h_retry}/"), hpid),
                ("NGINX", format!("http://127.0.0.1:{n_retry}/"), npid),
                (
                    "plexus ambassador",
                    format!("http://127.0.0.1:{pport}/v1/plugins/amb/b/"),
                    ppid,
                ),
            ],
        ),
        (
            "prefix routing, /orders split 30/70",
            [
                (
                    "HAProxy",
                    format!("http://127.0.0.1:{h_split}/orders/1"),
                    hpid,
                ),
                (
                    "NGINX",
                    format!("http://127.0.0.1:{n_split}/orders/1"),
                    npid,
                ),
                (
                    "plexus strangler-fig",
                    format!("http://127.0.0.1:{pport}/v1/plugins/fig/orders/1"),
                    ppid,
                ),
            ],
        ),
    ];
    let direct = format!("http://127.0.0.1:{legacy}/");
    for (_, targets) in &jobs {
        for (_, url, pid) in targets {
            wrk(wrk_bin, url, 64, 2, &[*pid]);
        }
    }
    println!(
        "\nedge patterns: wrk -t2, {seconds} s per phase, {rounds} rounds, phases alternating"
    );
    for c in connection_counts("--edge-connections") {
        let mut base = Totals::default();
        for _ in 0..rounds {
            base.runs.push(wrk(wrk_bin, &direct, c, seconds, &[]));
        }
        let (d50, d99) = (base.median(|r| r.p50_us), base.median(|r| r.p99_us));
        for (job, targets) in &jobs {
            let mut totals: Vec<Totals> = (0..targets.len()).map(|_| Totals::default()).collect();
            for round in 0..rounds as usize {
                for k in 0..targets.len() {
                    let i = (k + round) % targets.len();
                    let (_, url, pid) = &targets[i];
                    totals[i].runs.push(wrk(wrk_bin, url, c, seconds, &[*pid]));
                }
            }
            println!(
                "\n{job}, {c} connections (direct: {:.0} req/s, p50 {d50:.0} us, p99 {d99:.0} us):",
                base.rps()
            );
            println!(
                "  {:<22} {:>10} {:>12} {:>12} {:>14} {:>8}",
                "target", "req/s", "added p50", "added p99", "CPU/request", "errors"
            );
            for (i, (name, _, _)) in targets.iter().enumerate() {
                let t = &totals[i];
                println!(
                    "  {name:<22} {:>10.0} {:>9.0} us {:>9.0} us {:>11.1} us {:>8}",
                    t.rps(),
                    t.median(|r| r.p50_us) - d50,
                    t.median(|r| r.p99_us) - d99,
                    t.cpu_per_request_us(),
                    t.errors()
                );
            }
            println!(
                "  plexus / HAProxy: {:.2}x req/s; plexus / NGINX: {:.2}x req/s",
                totals[2].rps() / totals[0].rps().max(1e-9),
                totals[2].rps() / totals[1].rps().max(1e-9)
            );
        }
    }
}

/// Three HTTP backends on one thread of their own; the last answers after
/// `slow_ms`. Their ports, and each one's count of requests served.
fn start_backends(slow_ms: u64) -> (Vec<u16>, Vec<std::sync::Arc<std::sync::atomic::AtomicU64>>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime for the backends");
    let mut ports = Vec::new();
    let mut served = Vec::new();
    for i in 0..3 {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding a backend");
        ports.push(listener.local_addr().expect("backend address").port());
        let count = Arc::new(AtomicU64::new(0));
        served.push(count.clone());
        let delay = if i == 2 { slow_ms } else { 0 };
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let count = count.clone();
                let service = hyper::service::service_fn(
                    move |_req: hyper::Request<hyper::body::Incoming>| {
                        let count = count.clone();
                        async move {
                            count.fetch_add(1, Ordering::Relaxed);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(
                                    b"hello, world\n",
                                )),
                            ))
                        }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    // The runtime serves until the program ends.
    std::mem::forget(runtime);
    (ports, served)
}

fn start_haproxy_balance(
    haproxy: &str,
    dir: &Path,
    balance: &str,
    backends: &[u16],
) -> (Child, u16) {
    let port = free_port();
    let conf = dir.join(format!("haproxy-{}.cfg", port));
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, p)| format!("  server s{i} 127.0.0.1:{p}\n"))
        .collect();
    std::fs::write(
        &conf,
        format!(
            "global\n  nbthread 1\n  maxconn 8000\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  http-reuse always\n\
             frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n\
             backend b\n  balance {balance}\n{servers}"
        ),
    )
    .unwrap();
    let child = Command::new(haproxy)
        .arg("-f")
        .arg(&conf)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn haproxy");
    wait_port(local(port));
    (child, port)
}

/// One node with the `load-balancer` plugin twice: `lr` (least request,
/// two choices) and `ewma` (peak EWMA), in front of `backends`.
fn start_plexus_balancer(dir: &Path, backends: &[u16]) -> (Child, u16) {
    let port = free_port();
    let config = dir.join("balance-node.toml");
    let origins: Vec<String> = backends
        .iter()
        .map(|p| format!("\"http://127.0.0.1:{p}\""))
        .collect();
    let list: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{{ name = \"s{i}\", url = \"http://127.0.0.1:{p}\" }}"))
        .collect();
    let plugin = |name: &str, policy: &str| {
        format!(
            "[[plugins]]\nname = \"{name}\"\ncomponent = \"bundled:load-balancer\"\n\
             capabilities = [\"outbound-http\", \"plugins\", \"consensus\", \"storage\", \"timers\"]\n\
             allowed_outbound_hosts = [{}]\n\
             limits = {{ mailbox = 8192, max_calls_in_flight = 16384 }}\n\
             config = {{ lb_policy = \"{policy}\", backends = [{}] }}\n",
            origins.join(", "),
            list.join(", ")
        )
    };
    std::fs::write(
        &config,
        format!(
            "version = 1\n[node]\nid = \"balancer\"\ndata_dir = \"balance-data\"\nhttp = \"127.0.0.1:{port}\"\n\
             max_connections_per_client = 4096\n{}{}",
            plugin("lr", "least_request"),
            plugin("ewma", "peak_ewma")
        ),
    )
    .unwrap();
    let child = spawn_plexus(dir, &config);
    wait_ok(local(port), "/v1/plugins/lr/");
    wait_ok(local(port), "/v1/plugins/ewma/");
    (child, port)
}

fn balancing(dir: &Path, haproxy: &str, wrk_bin: &str) {
    use std::sync::atomic::Ordering;
    let seconds = arg("--balance-seconds", 10);
    let rounds = arg("--rounds", 3);
    let slow_ms = arg("--slow-ms", 20);
    let (backends, served) = start_backends(slow_ms);
    let mut procs = Procs(Vec::new());
    let (child, leastconn) = start_haproxy_balance(haproxy, dir, "leastconn", &backends);
    let hpid1 = child.id();
    procs.0.push(Some(child));
    let (child, random2) = start_haproxy_balance(haproxy, dir, "random(2)", &backends);
    let hpid2 = child.id();
    procs.0.push(Some(child));
    let (child, pport) = start_plexus_balancer(dir, &backends);
    let ppid = child.id();
    procs.0.push(Some(child));
    let targets = [
        (
            "HAProxy leastconn",
            format!("http://127.0.0.1:{leastconn}/"),
            hpid1,
        ),
        (
            "HAProxy random(2)",
            format!("http://127.0.0.1:{random2}/"),
            hpid2,
        ),
        (
            "plexus least_request",
            format!("http://127.0.0.1:{pport}/v1/plugins/lr/"),
            ppid,
        ),
        (
            "plexus peak_ewma",
            format!("http://127.0.0.1:{pport}/v1/plugins/ewma/"),
            ppid,
        ),
    ];
    for (_, url, pid) in &targets {
        wrk(wrk_bin, url, 64, 2, &[*pid]);
    }
    let slow_count = || served[2].load(Ordering::Relaxed);
    let all_count = || {
        served
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    println!(
        "\nbalancing: three backends, one answering after {slow_ms} ms; wrk -t2, {seconds} s per phase, {rounds} rounds, phases alternating"
    );
    for c in connection_counts("--balance-connections") {
        let mut totals: Vec<Totals> = (0..targets.len()).map(|_| Totals::default()).collect();
        let mut slow = vec![(0u64, 0u64); targets.len()];
        for round in 0..rounds as usize {
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                let (_, url, pid) = &targets[i];
                let (s0, a0) = (slow_count(), all_count());
                totals[i].runs.push(wrk(wrk_bin, url, c, seconds, &[*pid]));
                slow[i].0 += slow_count() - s0;
                slow[i].1 += all_count() - a0;
            }
        }
        println!("\n{c} connections:");
        println!(
            "  {:<22} {:>10} {:>10} {:>10} {:>14} {:>12} {:>8}",
            "target", "req/s", "p50", "p99", "CPU/request", "to slow", "errors"
        );
        for (i, (name, _, _)) in targets.iter().enumerate() {
            let t = &totals[i];
            println!(
                "  {name:<22} {:>10.0} {:>7.0} us {:>7.0} us {:>11.1} us {:>11.2}% {:>8}",
                t.rps(),
                t.median(|r| r.p50_us),
                t.median(|r| r.p99_us),
                t.cpu_per_request_us(),
                slow[i].0 as f64 * 100.0 / slow[i].1.max(1) as f64,
                t.errors()
            );
        }
        println!(
            "  plexus least_request / HAProxy leastconn: {:.2}x req/s; plexus peak_ewma / HAProxy random(2): {:.2}x req/s",
            totals[2].rps() / totals[0].rps().max(1e-9),
            totals[3].rps() / totals[1].rps().max(1e-9)
        );
    }
}

/// A service on a thread of its own that answers every request 503; its
/// port and its count of requests.
fn start_failing() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime for the service");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("binding the service");
    let port = listener.local_addr().expect("service address").port();
    let hits = Arc::new(AtomicU64::new(0));
    let count = hits.clone();
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            let service =
                hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    count.fetch_add(1, Ordering::Relaxed);
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(503)
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                    b"down\n",
                                )))
                                .unwrap(),
                        )
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    std::mem::forget(runtime);
    (port, hits)
}

fn failing(dir: &Path, wrk_bin: &str) {
    use std::sync::atomic::Ordering;
    let seconds = arg("--failing-seconds", 0);
    let rounds = arg("--rounds", 3);
    let (service, hits) = start_failing();
    let origin = format!("http://127.0.0.1:{service}");
    let http: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let breaker = |name: &str, scope: &str| {
        format!(
            "{{ name = \"{name}\", url = \"{origin}\", scope = \"{scope}\", sliding_window_size = 20, \
             minimum_number_of_calls = 10, failure_rate_threshold = 50, wait_duration_in_open_state = \"5s\" }}"
        )
    };
    let budget = |name: &str, scope: &str| {
        format!(
            "{{ name = \"{name}\", url = \"{origin}\", num_retries = 2, base_interval_ms = 5, max_interval_ms = 20, \
             budget = {{ retry_ratio = 0.2, min_retries_per_second = 10, ttl_ms = 10000, scope = \"{scope}\" }} }}"
        )
    };
    let plugins = format!(
        "[[plugins]]\nname = \"px\"\ncomponent = \"bundled:http-proxy\"\ncapabilities = [\"outbound-http\"]\n\
         allowed_outbound_hosts = [\"{origin}\"]\nlimits = {{ mailbox = 8192, max_calls_in_flight = 16384 }}\n\
         config = {{ upstream = \"{origin}\" }}\n\
         [[plugins]]\nname = \"amb\"\ncomponent = \"bundled:ambassador\"\n\
         capabilities = [\"outbound-http\", \"timers\", \"messaging\", \"log\"]\n\
         allowed_outbound_hosts = [\"{origin}\"]\nlimits = {{ mailbox = 8192, max_calls_in_flight = 16384 }}\n\
         config = {{ access_log = false, upstreams = [{}, {}] }}\n\
         [[plugins]]\nname = \"cb\"\ncomponent = \"bundled:circuit-breaker\"\n\
         capabilities = [\"outbound-http\", \"consensus\", \"storage\", \"messaging\", \"timers\", \"log\"]\n\
         allowed_outbound_hosts = [\"{origin}\"]\nlimits = {{ mailbox = 8192, max_calls_in_flight = 16384 }}\n\
         config = {{ upstreams = [{}, {}] }}\n",
        budget("node", "node"),
        budget("cluster", "cluster"),
        breaker("node", "node"),
        breaker("cluster", "cluster"),
    );
    let mut children = Vec::new();
    for i in 0..3 {
        let config = cluster_config(dir, "failing", i, &http, &peer, &plugins);
        children.push(spawn_plexus(dir, &config));
    }
    let _procs = Procs(children.into_iter().map(Some).collect());
    for port in &http {
        wait_port(local(*port));
    }
    let targets = [
        ("http-proxy (no protection)", "/v1/plugins/px/"),
        ("ambassador, budget per node", "/v1/plugins/amb/node/"),
        ("ambassador, cluster budget", "/v1/plugins/amb/cluster/"),
        ("breaker per node", "/v1/plugins/cb/node/"),
        ("breaker, cluster scope", "/v1/plugins/cb/cluster/"),
    ];
    // Each node answers each route (a 503 is an answer) before the load.
    for (_, path) in &targets {
        for port in &http {
            wait_answered(local(*port), path);
        }
    }
    println!(
        "\na failing upstream (every answer 503) behind three nodes, wrk -t1 -c16 on each node at once, {seconds} s per phase, {rounds} rounds"
    );
    println!(
        "  {:<30} {:>12} {:>16} {:>14}",
        "through", "client req/s", "upstream req/s", "per request"
    );
    let mut sums = vec![(0u64, 0u64, 0f64); targets.len()];
    for round in 0..rounds as usize {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let before = hits.load(Ordering::Relaxed);
            let runs: Vec<Run> = std::thread::scope(|scope| {
                let handles: Vec<_> = http
                    .iter()
                    .map(|port| {
                        let url = format!("http://127.0.0.1:{port}{}", targets[i].1);
                        scope.spawn(move || wrk_threads(wrk_bin, 1, &url, 16, seconds, &[]))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("wrk thread"))
                    .collect()
            });
            sums[i].0 += runs.iter().map(|r| r.requests).sum::<u64>();
            sums[i].1 += hits.load(Ordering::Relaxed) - before;
            sums[i].2 += seconds as f64;
        }
    }
    for (i, (name, _)) in targets.iter().enumerate() {
        let (reqs, up, secs) = sums[i];
        println!(
            "  {name:<30} {:>12.0} {:>16.0} {:>14.2}",
            reqs as f64 / secs,
            up as f64 / secs,
            up as f64 / reqs.max(1) as f64
        );
    }
}
