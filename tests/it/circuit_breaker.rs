//! circuit-breaker on its real `.wasm`, on `plexus` processes, in front
//! of HTTP upstreams started here that can be made to fail, to answer
//! slowly or to hang: a breaker that opens after failures and refuses
//! without calling, half-opens after its wait and closes after its
//! probes; slow and hanging upstreams opening theirs; a cluster-scope
//! breaker on three nodes opened on every node at one log index by
//! failures no node saw enough of alone, probed by one node and closed
//! everywhere; and swaps under load that keep the breakers' state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use plexus_tests::{Processes, cluster_node_config, http, http_full};
use serde_json::{Value, json};

const TOKEN: &str = "cb-admin-token";

/// What an [`Upstream`] does with a request.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// 200 at once.
    Ok = 0,
    /// 500 at once.
    Fail = 1,
    /// 200 after `delay_ms`.
    Slow = 2,
    /// No answer (until the test ends).
    Hang = 3,
}

/// An HTTP upstream on 127.0.0.1 that counts the requests reaching it.
struct Upstream {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Ok as u8));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let hits = Arc::new(AtomicU64::new(0));
        let (m, d, h) = (mode.clone(), delay_ms.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (m, d, h) = (m.clone(), d.clone(), h.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (m, d, h) = (m.clone(), d.clone(), h.clone());
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        let status = match m.load(Ordering::SeqCst) {
                            1 => 500,
                            2 => {
                                let ms = d.load(Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                                200
                            }
                            3 => {
                                tokio::time::sleep(Duration::from_secs(120)).await;
                                200
                            }
                            _ => 200,
                        };
                        let body = format!("{} {}", req.method(), req.uri());
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            mode,
            delay_ms,
            hits,
            task,
        }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A JSON value as TOML (inline tables and arrays).
fn toml_value(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let fields: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k} = {}", toml_value(v)))
                .collect();
            format!("{{ {} }}", fields.join(", "))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

/// The plugin's config: `upstreams` as `(name, upstream, own options)`
/// and `defaults`.
fn cb_config(upstreams: &[(&str, &Upstream, Value)], defaults: Value) -> Value {
    let list: Vec<Value> = upstreams
        .iter()
        .map(|(name, up, own)| {
            let mut u = json!({ "name": name, "url": up.origin() });
            for (k, v) in own.as_object().unwrap() {
                u[k] = v.clone();
            }
            u
        })
        .collect();
    json!({
        "admin_token": TOKEN,
        "report_interval_ms": 100,
        "defaults": defaults,
        "upstreams": list,
    })
}

/// The `[admin]` table and the plugin `cb` with `config`.
fn plugin_toml(ups: &[&Upstream], config: &Value) -> String {
    let origins: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.origin())).collect();
    let body: String = config
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k} = {}\n", toml_value(v)))
        .collect();
    format!(
        r#"
[admin]
token = "{TOKEN}"

[[plugins]]
name = "cb"
component = "bundled:circuit-breaker"
capabilities = ["outbound-http", "consensus", "storage", "messaging", "timers", "log"]
allowed_outbound_hosts = [{origins}]
limits = {{ mailbox = 4096, max_calls_in_flight = 4096 }}
[plugins.config]
{body}"#,
        origins = origins.join(", ")
    )
}

/// One node, alone.
async fn single(plugins: String) -> Processes {
    Processes::start(1, move |_, h, _| {
        format!(
            "version = 1\n[node]\nid = \"node-1\"\ndata_dir = \"data-1\"\nhttp = \"{}\"\n{plugins}",
            h[0]
        )
    })
    .await
}

/// Three nodes.
async fn three(plugins: String) -> Processes {
    Processes::start(3, move |i, h, p| cluster_node_config(i, h, p, "", &plugins)).await
}

/// `GET /v1/plugins/cb{path}` on `addr`: status, the breaker state header,
/// and the body as JSON (`null` when it is not).
async fn get(addr: SocketAddr, path: &str) -> (u16, String, Value) {
    let (status, headers, body) =
        http_full(addr, "GET", &format!("/v1/plugins/cb{path}"), &[], b"")
            .await
            .unwrap();
    let state = headers
        .iter()
        .find(|(k, _)| k == "x-circuit-breaker-state")
        .map_or("-".to_string(), |(_, v)| v.clone());
    (
        status,
        state,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

async fn breaker(addr: SocketAddr, name: &str) -> Value {
    let (status, _, b) = get(addr, &format!("/_cb/breakers/{name}")).await;
    assert_eq!(status, 200, "{b}");
    b
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits until `name` is in `state` on every node; each node's log index
/// of that state (cluster scope).
async fn wait_state(nodes: &Processes, name: &str, state: &str, limit: Duration) -> Vec<u64> {
    let started = Instant::now();
    loop {
        let mut indexes = Vec::new();
        let mut seen = Vec::new();
        for &addr in &nodes.http {
            let b = breaker(addr, name).await;
            if b["state"] == state {
                indexes.push(b["cluster"]["index"].as_u64().unwrap_or(0));
            }
            seen.push(b["state"].clone());
        }
        if indexes.len() == nodes.http.len() {
            return indexes;
        }
        assert!(
            started.elapsed() < limit,
            "{name} not {state} on every node within {limit:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn transitions(b: &Value) -> Vec<(String, String)> {
    b["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["from"].as_str().unwrap().to_string(),
                t["to"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_open_the_breaker_which_refuses_without_calling_then_half_opens_and_closes() {
    let up = Upstream::start().await;
    let config = cb_config(
        &[("users", &up, json!({}))],
        json!({
            "sliding_window_size": 10,
            "minimum_number_of_calls": 4,
            "failure_rate_threshold": 50,
            "wait_duration_in_open_state": "1500ms",
            "permitted_number_of_calls_in_half_open_state": 3,
        }),
    );
    let nodes = single(plugin_toml(&[&up], &config)).await;
    let a = nodes.http[0];

    up.set(Mode::Fail);
    for n in 1..=4 {
        let (status, state, _) = get(a, "/users/list?page=1").await;
        assert_eq!(status, 500, "the upstream's own answer");
        assert_eq!(state, if n < 4 { "CLOSED" } else { "OPEN" }, "call {n}");
    }
    let b = breaker(a, "users").await;
    assert_eq!(b["state"], "OPEN", "{b}");
    assert_eq!(b["window"]["failed"], 4, "{b}");
    assert_eq!(b["failure_rate"], 100.0, "{b}");

    // Open: refused at once, and the upstream is not called.
    let mut refused = 0;
    let mut half_open_at = 0;
    for _ in 0..20 {
        let (status, state, body) = get(a, "/users/list").await;
        assert_eq!((status, state.as_str()), (503, "OPEN"), "{body}");
        half_open_at = body["half_open_at_ms"].as_u64().unwrap();
        refused += 1;
    }
    assert_eq!(up.hits(), 4);

    // The upstream recovers. Refused until the wait is over; then the
    // next call is the first of three probes.
    up.set(Mode::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, state, body) = get(a, "/users/list").await;
        if status == 200 {
            assert_eq!(state, "HALF_OPEN");
            assert!(now_ms() >= half_open_at, "a probe before the wait was over");
            break;
        }
        assert_eq!((status, state.as_str()), (503, "OPEN"), "{body}");
        refused += 1;
        assert!(Instant::now() < deadline, "never half-opened");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let b = breaker(a, "users").await;
    assert_eq!(b["state"], "HALF_OPEN", "{b}");
    assert_eq!(b["half_open"]["left"], 2, "{b}");
    for n in 2..=3 {
        let (status, state, _) = get(a, "/users/list").await;
        assert_eq!(status, 200);
        assert_eq!(state, if n < 3 { "HALF_OPEN" } else { "CLOSED" });
    }
    let b = breaker(a, "users").await;
    assert_eq!(b["state"], "CLOSED", "{b}");
    assert_eq!(
        transitions(&b),
        pairs(&[
            ("CLOSED", "OPEN"),
            ("OPEN", "HALF_OPEN"),
            ("HALF_OPEN", "CLOSED")
        ])
    );
    assert_eq!(b["calls"]["failed"], 4, "{b}");
    assert_eq!(b["calls"]["successful"], 3, "{b}");
    assert_eq!(b["calls"]["not_permitted"], refused, "{b}");
    assert_eq!(
        b["window"]["calls"], 0,
        "a closed breaker starts a new window"
    );
    assert_eq!(up.hits(), 7);
    println!("opened after 4 failures, refused {refused} calls, closed after 3 probes");

    let (_, metrics) = http(a, "GET", "/v1/plugins/cb/_cb/metrics", &[], b"")
        .await
        .unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    for line in [
        "plexus_cb_state{breaker=\"users\",state=\"CLOSED\"} 1".to_string(),
        format!("plexus_cb_not_permitted_calls_total{{breaker=\"users\"}} {refused}"),
        "plexus_cb_calls_total{breaker=\"users\",kind=\"failed\"} 4".to_string(),
        "plexus_cb_transitions_total{breaker=\"users\",from=\"HALF_OPEN\",to=\"CLOSED\"} 1"
            .to_string(),
    ] {
        assert!(metrics.contains(&line), "no `{line}` in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_and_hanging_calls_open_their_breakers() {
    let slow = Upstream::start().await;
    let stuck = Upstream::start().await;
    let config = cb_config(
        &[
            (
                "slow",
                &slow,
                json!({ "slow_call_duration_threshold": "100ms", "slow_call_rate_threshold": 50 }),
            ),
            ("stuck", &stuck, json!({ "timeout_duration": "300ms" })),
        ],
        json!({ "minimum_number_of_calls": 3, "wait_duration_in_open_state": "1h" }),
    );
    let nodes = single(plugin_toml(&[&slow, &stuck], &config)).await;
    let a = nodes.http[0];

    slow.set(Mode::Slow);
    slow.delay_ms.store(300, Ordering::SeqCst);
    for _ in 0..3 {
        let (status, _, _) = get(a, "/slow/x").await;
        assert_eq!(status, 200, "slow, but answered");
    }
    let b = breaker(a, "slow").await;
    assert_eq!(b["state"], "OPEN", "{b}");
    assert_eq!(b["calls"]["slow_successful"], 3, "{b}");
    assert_eq!(b["transitions"][0]["why"], "rates_exceeded");

    stuck.set(Mode::Hang);
    for _ in 0..3 {
        let (status, _, body) = get(a, "/stuck/x").await;
        assert_eq!(status, 504, "timed out: {body}");
    }
    let b = breaker(a, "stuck").await;
    assert_eq!(b["state"], "OPEN", "{b}");
    assert_eq!(b["calls"]["failed"], 3, "{b}");
    // Refused at once now, without waiting on the upstream.
    let started = Instant::now();
    let (status, state, _) = get(a, "/stuck/x").await;
    assert_eq!((status, state.as_str()), (503, "OPEN"));
    println!("a refusal took {:?}", started.elapsed());
    assert_eq!((slow.hits(), stuck.hits()), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_breaker_opens_on_every_node_from_failures_no_node_saw_enough_of_alone() {
    let up = Upstream::start().await;
    let config = cb_config(
        &[("users", &up, json!({}))],
        json!({
            "scope": "cluster",
            "sliding_window_size": 10,
            "minimum_number_of_calls": 6,
            "failure_rate_threshold": 50,
            "wait_duration_in_open_state": "2s",
            "permitted_number_of_calls_in_half_open_state": 2,
        }),
    );
    let nodes = three(plugin_toml(&[&up], &config)).await;

    // Two failures through each node: six in all, at least six needed.
    up.set(Mode::Fail);
    for &addr in &nodes.http {
        for _ in 0..2 {
            let (status, _, body) = get(addr, "/users/x").await;
            assert_eq!(status, 500, "{body}");
        }
    }
    let opened = Instant::now();
    let indexes = wait_state(&nodes, "users", "OPEN", Duration::from_secs(10)).await;
    println!(
        "open on all three nodes {:?} after the sixth failure, at log index {indexes:?}",
        opened.elapsed()
    );
    assert!(indexes.iter().all(|i| *i == indexes[0]), "{indexes:?}");
    for &addr in &nodes.http {
        let b = breaker(addr, "users").await;
        assert_eq!(b["window"]["calls"], 2, "each node saw two calls: {b}");
        assert_eq!(b["minimum_number_of_calls"], 6);
        let (status, state, _) = get(addr, "/users/x").await;
        assert_eq!((status, state.as_str()), (503, "OPEN"));
    }
    assert_eq!(up.hits(), 6, "no call after the opening");

    // The upstream recovers. After the wait, node-2's next call
    // half-opens the breaker for every node, with node-2 probing.
    up.set(Mode::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, state, body) = get(nodes.http[1], "/users/x").await;
        if status == 200 {
            assert_eq!(state, "HALF_OPEN");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "never half-opened");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    wait_state(&nodes, "users", "HALF_OPEN", Duration::from_secs(10)).await;
    let (status, state, body) = get(nodes.http[0], "/users/x").await;
    assert_eq!((status, state.as_str()), (503, "HALF_OPEN"), "{body}");
    assert_eq!(body["prober"], "node-2", "{body}");
    // node-2's second probe passes: closed on every node, at one index.
    let (status, _, _) = get(nodes.http[1], "/users/x").await;
    assert_eq!(status, 200);
    let indexes = wait_state(&nodes, "users", "CLOSED", Duration::from_secs(10)).await;
    assert!(indexes.iter().all(|i| *i == indexes[0]), "{indexes:?}");
    assert_eq!(up.hits(), 8);
    let mut histories = Vec::new();
    for &addr in &nodes.http {
        let b = breaker(addr, "users").await;
        assert_eq!(
            transitions(&b),
            pairs(&[
                ("CLOSED", "OPEN"),
                ("OPEN", "HALF_OPEN"),
                ("HALF_OPEN", "CLOSED")
            ]),
            "{b}"
        );
        let at: Vec<u64> = b["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["index"].as_u64().unwrap())
            .collect();
        histories.push(at);
        let (status, state, _) = get(addr, "/users/x").await;
        assert_eq!((status, state.as_str()), (200, "CLOSED"));
    }
    println!("transitions at log indexes {histories:?} on the three nodes");
    assert!(
        histories.iter().all(|h| *h == histories[0]),
        "{histories:?}"
    );
}

/// Swaps `cb` to `config`: on every node through the log, or on node `i`.
async fn swap(nodes: &Processes, config: &Value, on: Option<usize>) {
    let body = json!({ "component": "bundled:circuit-breaker", "config": config }).to_string();
    let auth = format!("Bearer {TOKEN}");
    let (addr, path) = match on {
        None => (nodes.http[0], "/v1/admin/plugins/cb/swap?scope=cluster"),
        Some(i) => (nodes.http[i], "/v1/admin/plugins/cb/swap"),
    };
    let (status, answer) = http(
        addr,
        "POST",
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_load_keep_every_breakers_state_and_counts() {
    let shared = Upstream::start().await;
    let own = Upstream::start().await;
    let config = |interval: u64| {
        let mut c = cb_config(
            &[
                ("shared", &shared, json!({ "scope": "cluster" })),
                ("own", &own, json!({})),
            ],
            json!({
                "sliding_window_size": 10,
                "minimum_number_of_calls": 4,
                "wait_duration_in_open_state": "1h",
            }),
        );
        c["report_interval_ms"] = interval.into();
        c
    };
    let nodes = Arc::new(three(plugin_toml(&[&shared, &own], &config(100))).await);

    // Open both: the cluster breaker with four failures through node-1,
    // each node's own breaker with four through that node.
    shared.set(Mode::Fail);
    own.set(Mode::Fail);
    for _ in 0..4 {
        assert_eq!(get(nodes.http[0], "/shared/x").await.0, 500);
    }
    for &addr in &nodes.http {
        for _ in 0..4 {
            assert_eq!(get(addr, "/own/x").await.0, 500);
        }
    }
    let open_at = wait_state(&nodes, "shared", "OPEN", Duration::from_secs(10)).await;
    wait_state(&nodes, "own", "OPEN", Duration::from_secs(10)).await;
    assert_eq!((shared.hits(), own.hits()), (4, 12));

    // Clients on every node, both breakers, while the plugin is swapped
    // on every node through the log, then on node-3 alone.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for &addr in &nodes.http {
        for c in 0..2 {
            let (stop, sent) = (stop.clone(), sent.clone());
            clients.push(tokio::spawn(async move {
                let mut refused = 0u64;
                let mut other = Vec::new();
                let mut n = c;
                while !stop.load(Ordering::SeqCst) {
                    let path = if n % 2 == 0 { "/shared/x" } else { "/own/x" };
                    n += 1;
                    match get(addr, path).await {
                        (503, state, _) if state == "OPEN" => refused += 1,
                        (status, state, body) => other.push((status, state, body)),
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                (refused, other)
            }));
        }
    }
    let progress = |sent: &Arc<AtomicU64>, more: u64| {
        let until = sent.load(Ordering::SeqCst) + more;
        let sent = sent.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while sent.load(Ordering::SeqCst) < until {
                assert!(Instant::now() < deadline, "the clients stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    progress(&sent, 60).await;
    swap(&nodes, &config(150), None).await;
    progress(&sent, 60).await;
    swap(&nodes, &config(200), Some(2)).await;
    progress(&sent, 60).await;
    stop.store(true, Ordering::SeqCst);
    let mut refused = 0;
    for c in clients {
        let (r, other) = c.await.unwrap();
        assert!(
            other.is_empty(),
            "answers other than the breaker's 503: {other:?}"
        );
        refused += r;
    }
    println!("{refused} calls refused through a cluster-wide swap and a swap on node-3");

    // Still open everywhere, the cluster breaker at the same index, no
    // call reached an upstream, and every refusal was counted once.
    assert_eq!((shared.hits(), own.hits()), (4, 12));
    let mut counted = 0;
    for (i, &addr) in nodes.http.iter().enumerate() {
        let s = breaker(addr, "shared").await;
        let o = breaker(addr, "own").await;
        assert_eq!(s["state"], "OPEN", "node-{}: {s}", i + 1);
        assert_eq!(s["cluster"]["index"], open_at[0], "{s}");
        assert_eq!(transitions(&s), pairs(&[("CLOSED", "OPEN")]), "{s}");
        assert_eq!(o["state"], "OPEN", "node-{}: {o}", i + 1);
        assert_eq!(o["calls"]["failed"], 4, "{o}");
        assert_eq!(transitions(&o), pairs(&[("CLOSED", "OPEN")]), "{o}");
        counted += s["calls"]["not_permitted"].as_u64().unwrap()
            + o["calls"]["not_permitted"].as_u64().unwrap();
    }
    assert_eq!(counted, refused, "refusals counted across the swaps");
}
