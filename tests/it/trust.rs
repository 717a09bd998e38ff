//! Trust: peer links that cannot be relayed, HTTP that holds against idle,
//! slow and flooding clients, admin input checked like config, and joins
//! and leaves that keep the quorum safe. Real `plexus` processes on
//! 127.0.0.1 throughout.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plexus_tests::{Process, cluster_node_config, free_port, http, loopback_addrs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::cluster::{Cluster, admin, counter as metric, put, read, status, voters};

const TOKEN: &str = "trust-token";

/// Reads a dialler's hello and first handshake message, as a relay would.
async fn read_handshake(s: &mut TcpStream) -> (Vec<u8>, Vec<u8>) {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut hello = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut hello).await.unwrap();
    let mut mlen = [0u8; 2];
    s.read_exact(&mut mlen).await.unwrap();
    let mut first = vec![0u8; usize::from(u16::from_be_bytes(mlen))];
    s.read_exact(&mut first).await.unwrap();
    (hello, [mlen.to_vec(), first].concat())
}

/// The hello a dialler claiming `from` sends to `to` (postcard: protocol
/// as a varint, then two length-prefixed strings).
fn forged_hello(from: &str, to: &str) -> Vec<u8> {
    let mut body = vec![2u8];
    for s in [from, to] {
        body.push(s.len() as u8);
        body.extend_from_slice(s.as_bytes());
    }
    [(body.len() as u32).to_be_bytes().to_vec(), body].concat()
}

/// With node-3 down, a process on node-3's peer port takes the leader's
/// handshake and relays it to each other node, claiming to be node-3. The
/// handshake binds both ids and the direction, so each refuses it,
/// counts it, and never answers; the cluster keeps committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_handshake_is_refused_by_every_node() {
    let mut c = Cluster::start(3000).await;
    let leader = c.leader().await;
    // A follower goes down; the relay takes its peer port.
    let absent = (leader + 1) % 3;
    let absent_name = format!("node-{}", absent + 1);
    assert!(put(c.http[leader], "before", "v").await);
    c.kill(absent);
    let relay = TcpListener::bind(c.peer[absent]).await.unwrap();
    // The leader redials the absent node for its heartbeats: take one
    // handshake.
    let (mut from_leader, _) = tokio::time::timeout(Duration::from_secs(30), relay.accept())
        .await
        .expect("the leader dialled the absent node's port")
        .unwrap();
    let (_, first) = read_handshake(&mut from_leader).await;
    for target in (0..3).filter(|i| *i != absent) {
        let junk = "plexus_network_junk_total{source=\"peer\"}";
        let before = metric(c.http[target], junk).await;
        let mut to = TcpStream::connect(c.peer[target]).await.unwrap();
        let mut out = forged_hello(&absent_name, &format!("node-{}", target + 1));
        out.extend_from_slice(&first);
        to.write_all(&out).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), to.read(&mut buf))
            .await
            .expect("the node closes the relayed connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "node-{} answered a relayed handshake", target + 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(c.http[target], junk).await <= before {
            assert!(Instant::now() < deadline, "the refusal was not counted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(from_leader);
    // The two real members still commit together.
    assert!(put(c.http[leader], "after", "still").await);
    let other = (0..3).find(|i| *i != absent && *i != leader).unwrap();
    assert_eq!(
        read(c.http[other], "after").await.as_deref(),
        Some(&b"still"[..])
    );
}

/// A connection from `src`, or `None` if the kernel refused it.
async fn connect_from(src: IpAddr, to: SocketAddr) -> Option<TcpStream> {
    let s = TcpSocket::new_v4().ok()?;
    s.bind(SocketAddr::new(src, 0)).ok()?;
    s.connect(to).await.ok()
}

/// One request from `src` on a fresh connection: status and body.
async fn request_from(
    src: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
    let mut s = connect_from(src, to).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {to}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(Vec::new(), |i| out[i + 4..].to_vec());
    Some((status, body))
}

/// 20,000 idle connections against a node whose open-file limit is 1,024:
/// past the per-client cap each is answered 429 and closed, those held
/// are closed after the header-read timeout, and meanwhile another client
/// is served, the node's peer links keep replicating, and nothing fails
/// for want of descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_flood_is_capped_and_peers_keep_replicating() {
    let dir = tempfile::tempdir().unwrap();
    let (h, p) = (loopback_addrs(3), loopback_addrs(3));
    let kv = r#"
[[plugins]]
name = "kv"
component = "bundled:replicated-kv"
capabilities = ["consensus", "storage", "log"]
"#;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut config = cluster_node_config(i, &h, &p, "", kv);
        // node-1 is flooded: a short header timeout, the default caps.
        if i == 0 {
            config = config.replace("[cluster]", "header_read_timeout_ms = 2000\n\n[cluster]");
        }
        let path = dir.path().join(format!("node-{}.toml", i + 1));
        std::fs::write(&path, config).unwrap();
        nodes.push(path);
    }
    let _n1 = Process::up_with_open_files(dir.path(), &nodes[0], h[0], 1024).await;
    let _n2 = Process::up(dir.path(), &nodes[1], h[1]).await;
    let _n3 = Process::up(dir.path(), &nodes[2], h[2]).await;
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let node1 = h[0];
    let gauge = move |name: &'static str| async move {
        let (_, body) = request_from(other, node1, "GET", "/metrics", b"")
            .await
            .expect("metrics answered");
        String::from_utf8(body)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let cap = gauge("plexus_http_connections_max").await;
    assert_eq!(
        cap,
        1024 - 256,
        "the cap leaves 256 descriptors to the node"
    );
    // A write through node-1 before the flood.
    let deadline = Instant::now() + Duration::from_secs(30);
    while request_from(other, h[0], "PUT", "/v1/plugins/kv/kv/k0", b"v0")
        .await
        .is_none_or(|(s, _)| s != 200)
    {
        assert!(Instant::now() < deadline, "no write before the flood");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (refused, closed, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let unconnected = Arc::new(AtomicU64::new(0));
    // At most 900 sockets of this process at once.
    let budget = Arc::new(tokio::sync::Semaphore::new(900));
    let target = h[0];
    let flood = tokio::spawn({
        let (refused, closed, failed) = (refused.clone(), closed.clone(), failed.clone());
        let unconnected = unconnected.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..20_000 {
                let permit = budget.clone().acquire_owned().await.unwrap();
                let (refused, closed, failed) = (refused.clone(), closed.clone(), failed.clone());
                let unconnected = unconnected.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    // A plain connect: the kernel picks a local port free for
                    // this destination (a bound one could meet the node's
                    // TIME_WAIT of an earlier connection on the same port).
                    let Ok(mut s) = TcpStream::connect(target).await else {
                        // The kernel's accept queue overflowed: refused
                        // before the node saw it.
                        unconnected.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    // Idle: nothing is sent. A refusal arrives at once; a
                    // held connection ends at the header-read timeout.
                    let mut buf = Vec::new();
                    match tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf))
                        .await
                    {
                        Ok(_) if buf.starts_with(b"HTTP/1.1 429") => {
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok(_) => closed.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
    });
    // While the flood runs: another client is served, node-1 replicates.
    let mut served = 0;
    let mut i = 0;
    while !flood.is_finished() {
        i += 1;
        let key = format!("during-{i}");
        if let Some((200, _)) = request_from(
            other,
            h[0],
            "PUT",
            &format!("/v1/plugins/kv/kv/{key}"),
            b"v",
        )
        .await
        {
            served += 1;
            assert_eq!(read(h[1], &key).await.as_deref(), Some(&b"v"[..]));
        }
        let open = gauge("plexus_http_connections").await;
        assert!(open <= cap, "{open} connections open, cap {cap}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flood.await.unwrap();
    let (refused, closed, failed) = (
        refused.load(Ordering::Relaxed),
        closed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    let unconnected = unconnected.load(Ordering::Relaxed);
    assert_eq!(refused + closed + failed + unconnected, 20_000);
    assert!(
        refused > 10_000,
        "refused {refused}, held {closed}, not connected {unconnected}"
    );
    assert!(unconnected < 1_000, "not connected {unconnected}");
    assert!(closed >= 512, "the per-client cap was held: {closed}");
    // Connections the node never saw: on a busy machine the kernel can
    // hold a handshake's last step while the accept queue is full, and
    // the client waits on a connection the node has not accepted yet.
    assert!(
        failed < 1_000,
        "{failed} connections neither answered nor closed (refused {refused}, closed {closed})"
    );
    // Every connection the node held is closed at the header-read timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open = gauge("plexus_http_connections").await;
        if open <= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} connections still open");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log =
        std::fs::read_to_string(dir.path().join(format!("node-{}.log", h[0].port()))).unwrap();
    assert!(
        served > 0,
        "the other client was never served during the flood"
    );
    // Every node still serves, with the flood's writes.
    assert!(!log.contains("Too many open files"), "{log}");
    assert_eq!(read(h[2], "k0").await.as_deref(), Some(&b"v0"[..]));
}

/// A client that sends its request head a byte at a time is cut off at
/// the header-read timeout; a body that never finishes gets 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_at_the_read_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n[node]\nhttp = \"{addr}\"\nheader_read_timeout_ms = 1000\nbody_read_timeout_ms = 1000\n"
        ),
    )
    .unwrap();
    let _node = Process::up(dir.path(), &config, addr).await;
    // A connection that never sends anything is closed.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut buf))
        .await
        .expect("an idle connection is closed at the header-read timeout")
        .unwrap();
    eprintln!("idle closed after {:?}", t0.elapsed());
    let t0 = Instant::now();
    // A keep-alive connection idle after a response is closed too.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), kept.read_to_end(&mut buf))
        .await
        .expect("an idle keep-alive connection is closed at the header-read timeout")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    eprintln!("kept closed after {:?}", t0.elapsed());
    // The head a byte every 100 ms: never complete within 1 s.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let head =
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut = false;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            // Closed (or answered 408) before the head was complete.
            assert!(!String::from_utf8_lossy(&buf[..r.unwrap_or(0)]).contains(" 200 "));
            cut = true;
            break;
        }
    }
    assert!(cut, "a head sent over {:?} was accepted", started.elapsed());
    // A body promised but never sent.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PUT /v1/plugins/x/y HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("the node answers an unfinished body")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // The node is fine.
    assert_eq!(
        http(addr, "GET", "/healthz", &[], b"").await.unwrap().0,
        200
    );
}

async fn single_node_with_admin() -> (tempfile::TempDir, Process, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!("version = 1\n[node]\nhttp = \"{addr}\"\n[admin]\ntoken = \"{TOKEN}\"\n"),
    )
    .unwrap();
    let node = Process::up(dir.path(), &config, addr).await;
    (dir, node, addr)
}

async fn admin_call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(
        addr,
        method,
        path,
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
    .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Admin input goes through the config file's rules, each error naming
/// its field; nothing an admin sends panics the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_input_is_checked_like_config_and_names_the_field() {
    let (_dir, _node, addr) = single_node_with_admin().await;
    let load = |limits: &str| {
        format!(
            r#"{{"name":"x","component":"bundled:replicated-kv","capabilities":["consensus","storage","log"],"limits":{limits}}}"#
        )
    };
    let golden = [
        (
            load(r#"{"mailbox":2305843009213693952}"#),
            r#"{"error":"limits.mailbox: must be in 1..=65536","field":"limits.mailbox"}"#,
        ),
        (
            load(r#"{"mailbox":1000000}"#),
            r#"{"error":"limits.mailbox: must be in 1..=65536","field":"limits.mailbox"}"#,
        ),
        (
            load(r#"{"cpu_ms":600000000}"#),
            r#"{"error":"limits.cpu_ms: must be in 1..=60000","field":"limits.cpu_ms"}"#,
        ),
        (
            load(r#"{"memory_mib":0}"#),
            r#"{"error":"limits.memory_mib: must be in 1..=1024","field":"limits.memory_mib"}"#,
        ),
        (
            load(r#"{"mailbox":-1}"#),
            r#"{"error":"limits.mailbox: invalid value: integer `-1`, expected usize at line 1 column 115","field":"limits.mailbox"}"#,
        ),
        (
            r#"{"name":"x","component":"bundled:replicated-kv","config":{"a":null}}"#.to_string(),
            r#"{"error":"config.a: invalid type: null, expected any valid TOML value at line 1 column 66","field":"config.a"}"#,
        ),
        (
            r#"{"name":"Bad Name","component":"bundled:replicated-kv"}"#.to_string(),
            r#"{"error":"name: `Bad Name` must be 1..=64 of [a-z0-9-], not starting with `-`","field":"name"}"#,
        ),
    ];
    for (body, want) in &golden {
        let (status, got) = admin_call(addr, "POST", "/v1/admin/plugins", body).await;
        assert_eq!((status, got.as_str()), (400, *want), "for {body}");
    }
    let (status, got) = admin_call(
        addr,
        "POST",
        "/v1/admin/cluster/members",
        r#"{"id":"evil","addr":"0.0.0.0:9"}"#,
    )
    .await;
    assert_eq!(status, 400, "{got}");
    assert!(got.contains(r#""field":"addr""#), "{got}");
    // Nothing was loaded, and the node is up.
    let (_, list) = admin_call(addr, "GET", "/v1/admin/plugins", "").await;
    assert!(!list.contains(r#""name":"x""#), "{list}");
    assert_eq!(
        http(addr, "GET", "/healthz", &[], b"").await.unwrap().0,
        200
    );
}

/// A load naming a FIFO, a directory or a device is refused at once
/// without opening it for a blocking read; the node keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_load_of_a_special_file_is_refused_without_blocking() {
    let (dir, _node, addr) = single_node_with_admin().await;
    let fifo = dir.path().join("component.fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    for path in [
        fifo.clone(),
        fifo.clone(),
        dir.path().to_path_buf(),
        "/dev/zero".into(),
    ] {
        let body = format!(r#"{{"name":"x","component":"{}"}}"#, path.display());
        let (status, got) = tokio::time::timeout(
            Duration::from_secs(10),
            admin_call(addr, "POST", "/v1/admin/plugins", &body),
        )
        .await
        .expect("the load answered without blocking");
        assert_eq!(status, 400, "{got}");
        assert!(got.contains("not a regular file"), "{got}");
        assert_eq!(
            http(addr, "GET", "/healthz", &[], b"").await.unwrap().0,
            200
        );
    }
}

/// Random JSON, shaped like and unlike each admin route's body, never
/// panics the node or gets a 5xx; it stays healthy throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_admin_json_never_panics_the_node() {
    let (dir, node, addr) = single_node_with_admin().await;
    let seed: u64 = std::env::var("PLEXUS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::UNIX_EPOCH
                .elapsed()
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let mut rng = Rng(seed | 1);
    let routes = [
        ("POST", "/v1/admin/plugins"),
        ("POST", "/v1/admin/plugins/kv/swap"),
        ("POST", "/v1/admin/cluster/members"),
    ];
    for case in 0..300 {
        let (method, path) = routes[case % routes.len()];
        let body = random_json(&mut rng, 0).to_string();
        let (status, got) = admin_call(addr, method, path, &body).await;
        assert!(
            status < 500 || status == 503,
            "seed {seed}, case {case}: {method} {path} {body} → {status} {got}"
        );
    }
    assert_eq!(
        http(addr, "GET", "/healthz", &[], b"").await.unwrap().0,
        200
    );
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(!log.contains("panicked"), "seed {seed}: {log}");
    drop(dir);
}

/// A small seeded generator (xorshift), so a failing case is replayed
/// with `PLEXUS_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_json(rng: &mut Rng, depth: u32) -> serde_json::Value {
    use serde_json::{Value, json};
    const KEYS: &[&str] = &[
        "name",
        "component",
        "wasm_base64",
        "capabilities",
        "limits",
        "config",
        "memory_mib",
        "cpu_ms",
        "mailbox",
        "id",
        "addr",
        "x",
    ];
    const STRINGS: &[&str] = &[
        "",
        "kv",
        "bundled:replicated-kv",
        "bundled:nope",
        "/dev/zero",
        "/proc/self/fd/0",
        "/",
        "127.0.0.1:9",
        "0.0.0.0:0",
        "consensus",
        "storage",
        "AAAA",
        "-x",
        "\u{0}",
        "../../etc/passwd",
    ];
    let numbers = [
        json!(0),
        json!(1),
        json!(-1),
        json!(65536),
        json!(1u64 << 61),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1.5),
        json!(1e308),
    ];
    let pick = rng.below(if depth > 3 { 4 } else { 7 });
    match pick {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => numbers[rng.below(numbers.len() as u64) as usize].clone(),
        3 => Value::String(STRINGS[rng.below(STRINGS.len() as u64) as usize].to_string()),
        4 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(6))
                .map(|_| {
                    (
                        KEYS[rng.below(KEYS.len() as u64) as usize].to_string(),
                        random_json(rng, depth + 1),
                    )
                })
                .collect(),
        ),
    }
}

/// A join naming an address where nothing answers is refused at once
/// with a clear error, and the voters stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_of_an_unreachable_address_is_refused_and_the_voters_are_unchanged() {
    let c = Cluster::start(3000).await;
    let leader = c.leader().await;
    let before = voters(c.http[leader]).await;
    let (code, body) = admin(
        c.http[leader],
        "POST",
        "/v1/admin/cluster/members",
        br#"{"id":"evil","addr":"127.0.0.1:9"}"#,
    )
    .await
    .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(code, 422, "{body}");
    assert!(
        body.contains("`evil` at 127.0.0.1:9 did not answer") && body.contains("unchanged"),
        "{body}"
    );
    for i in 0..3 {
        assert_eq!(voters(c.http[i]).await, before, "node-{}", i + 1);
        let s = status(c.http[i]).await.unwrap();
        assert!(!s["members"].to_string().contains("evil"), "{s}");
    }
    assert!(put(c.http[leader], "after", "v").await);
}

/// A removed voter learns it was removed, stops campaigning, and leaves
/// every remaining node's membership view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_stops_campaigning_and_leaves_the_view() {
    let c = Cluster::start(3000).await;
    let leader = c.leader().await;
    let gone = (leader + 1) % 3;
    let name = format!("node-{}", gone + 1);
    let (status_code, body) = admin(
        c.http[leader],
        "DELETE",
        &format!("/v1/admin/cluster/members/{name}"),
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status_code, 200, "{}", String::from_utf8_lossy(&body));
    // Bound: the view drops it as soon as the change is applied, and it
    // hears of its removal within the notice's 2 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let views_clean = {
            let mut clean = true;
            for i in (0..3).filter(|i| *i != gone) {
                let s = status(c.http[i]).await.unwrap();
                clean &= !s["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["id"] == name.as_str());
            }
            clean
        };
        let told = status(c.http[gone])
            .await
            .is_some_and(|s| s["removed_at"].is_u64());
        if views_clean && told {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 10 s: views clean {views_clean}, told {told}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its term no longer rises: over five of its longest election
    // timeouts, it starts no campaign.
    let term = status(c.http[gone]).await.unwrap()["term"]
        .as_u64()
        .unwrap();
    let until = Instant::now() + Duration::from_millis(5 * 1200);
    while Instant::now() < until {
        let now = status(c.http[gone]).await.unwrap()["term"]
            .as_u64()
            .unwrap();
        assert_eq!(now, term, "a removed member campaigned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The two that remain are a quorum of two.
    assert!(put(c.http[leader], "after-leave", "v").await);
}

/// A flood of junk datagrams on the gossip port is counted in full and
/// logged at most about once a second, and membership keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gossip_junk_flood_is_counted_and_logged_sparingly() {
    let c = Cluster::start(3000).await;
    c.leader().await;
    let name = "plexus_network_junk_total{source=\"gossip\"}";
    let before = metric(c.http[0], name).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    let mut sent = 0u64;
    for i in 0..5_000u32 {
        if socket
            .send_to(&i.to_le_bytes().repeat(16), c.peer[0])
            .await
            .is_ok()
        {
            sent += 1;
        }
        if i % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // The kernel drops what overflows the socket's buffer; wait until the
    // count stops rising.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = 0;
    loop {
        let counted = metric(c.http[0], name).await - before;
        if counted > 0 && counted == last {
            break;
        }
        last = counted;
        assert!(Instant::now() < deadline, "{counted} of {sent} counted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = started.elapsed().as_secs();
    let log = std::fs::read_to_string(&c.nodes[0].as_ref().unwrap().log).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("without a valid cluster tag"))
        .count() as u64;
    assert!(
        (1..=seconds + 2).contains(&lines),
        "{lines} log lines for {sent} datagrams in {seconds} s"
    );
    // Gossip still works: every node sees the others alive.
    assert!(put(c.http[0], "after-junk", "v").await);
    let s = status(c.http[0]).await.unwrap();
    assert_eq!(s["members"].as_array().unwrap().len(), 3, "{s}");
}
