//! The torture harness: real `plexus` processes on 127.0.0.1, many clients,
//! faults on a random schedule, and every history checked.
//!
//! ```sh
//! cargo run -p plexus-tests --bin torture -- --seconds 600 --seed 42
//! ```
//!
//! It starts a 3-node cluster (`--nodes 5` for five) running
//! `replicated-kv`, and runs at once:
//! - **clients** (`--clients`, default 12) on every node, reading, writing
//!   and compare-and-swapping a few keys (`--keys`, default 4): contention on
//!   purpose. Every operation is recorded with its invocation and
//!   completion time and its outcome: ok, failed (definite: 409, 503, a
//!   refused connection) or unknown (504, a timeout, a connection lost after
//!   the request was sent).
//! - **election clients** (`--election-clients`, default 4) acquiring,
//!   renewing, reading and releasing two `leader-election` roles under
//!   short leases; every grant and every lease seen is checked for fencing
//!   tokens that never go back and never go to two holders.
//! - **queue clients** (`--queue-clients`, default 2 of each): publishers
//!   and consumers of a `pubsub` topic (every publish with an id, sent
//!   again with it after an unknown outcome; every delivery acked), and
//!   submitters and workers of a `work-queue` queue (every submit with a
//!   key; every lease completed under its token). After the faults, what
//!   is left is drained, and the topic is read back whole.
//! - **stream clients** (`--stream-clients`, default 2) appending to three
//!   `event-store` streams with expected versions (each event with an id,
//!   sent again with it after an unknown outcome or a lost race); the
//!   streams are read back whole at the end.
//! - **a nemesis** whose schedule comes from the seed: kill -9 and restart
//!   of the leader or another node, SIGSTOP and SIGCONT, a cluster-wide hot
//!   swap of one of the plugins, a crash of the whole cluster, and network faults
//!   between the nodes: a node cut off, a one-way cut, a bridge (two sides
//!   that reach only a node in the middle), and packet loss. Each node has
//!   an address of its own on the loopback network (127.a.b.n), and the
//!   faults are `iptables` rules on those addresses in a chain of the
//!   harness's own, removed at the end; clients keep reaching every node.
//!   Without `iptables` (or the right to use it) network faults are left
//!   out, and the run says so.
//!
//! At the end every key's history goes through the linearizability checker
//! ([`plexus_tests::linearizability`]), and the topic's and the tasks'
//! histories through [`plexus_tests::queues`], the streams' through
//! [`plexus_tests::streams`]. The figures are printed with the
//! seed; the exit status is 1 if any history is not linearizable, so a
//! failing seed can be run again as it is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use plexus_tests::fencing::{self, Observation};
use plexus_tests::linearizability::{Event, Op, check};
use plexus_tests::queues::{self, Ack, Delivery, Lease};
use plexus_tests::streams::{self, Appended};
use plexus_tests::{Process, cluster_node_config, loopback_addrs, variant, wasm};

const TOKEN: &str = "torture-token";
/// Longest a client waits for an answer before calling it unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Search steps allowed per key before a history is reported unchecked.
const CHECK_STEPS: u64 = 20_000_000;

struct Args {
    seconds: u64,
    seed: u64,
    nodes: usize,
    clients: usize,
    election_clients: usize,
    queue_clients: usize,
    stream_clients: usize,
    keys: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        seconds: 60,
        seed: std::time::UNIX_EPOCH
            .elapsed()
            .map_or(1, |d| d.as_nanos() as u64),
        nodes: 3,
        clients: 12,
        election_clients: 4,
        queue_clients: 2,
        stream_clients: 2,
        keys: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--seconds" => a.seconds = value("--seconds")?,
            "--seed" => a.seed = value("--seed")?,
            "--nodes" => a.nodes = value("--nodes")? as usize,
            "--clients" => a.clients = value("--clients")? as usize,
            "--election-clients" => a.election_clients = value("--election-clients")? as usize,
            "--queue-clients" => a.queue_clients = value("--queue-clients")? as usize,
            "--stream-clients" => a.stream_clients = value("--stream-clients")? as usize,
            "--keys" => a.keys = value("--keys")? as usize,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(3..=7).contains(&a.nodes) || a.clients == 0 || a.keys == 0 || a.seconds == 0 {
        return Err("--nodes in 3..=7, --clients, --keys and --seconds above 0".into());
    }
    Ok(a)
}

/// A small seeded generator (xorshift64*): the same seed, the same choices.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// How a request ended, as far as the client can tell.
enum Answer {
    /// Status, the `x-version` header, the body.
    Got(u16, Option<u64>, Vec<u8>),
    /// No connection: nothing was sent.
    NotSent,
    /// Sent, then no complete answer.
    Lost,
}

async fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Answer {
    let Ok(Ok(stream)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await
    else {
        return Answer::NotSent;
    };
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .body(Full::new(Bytes::copy_from_slice(body)))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let version = resp
            .headers()
            .get("x-version")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        anyhow::Ok(Answer::Got(status, version, body))
    };
    match tokio::time::timeout(OP_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => answer,
        _ => Answer::Lost,
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    not_sent: u64,
    unknown: u64,
}

struct Recorder {
    started: Instant,
    histories: Mutex<BTreeMap<usize, Vec<Event>>>,
    leases: Mutex<BTreeMap<String, Vec<Observation>>>,
    topic: Mutex<queues::Topic>,
    tasks: Mutex<queues::Tasks>,
    streams: Mutex<streams::Streams>,
    tally: Mutex<Tally>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn record(&self, key: usize, call: u64, ret: Option<u64>, op: Op) {
        {
            let mut t = self.tally.lock().unwrap();
            if ret.is_some() {
                t.ok += 1;
            } else {
                t.unknown += 1;
            }
        }
        self.histories
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push(Event { call, ret, op });
    }

    /// A definite failure, or a request that could not be sent; either
    /// changed nothing.
    async fn failed(&self, answer: &Answer) {
        if matches!(answer, Answer::NotSent) {
            self.tally.lock().unwrap().not_sent += 1;
            // The node is down: give the others the load meanwhile.
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            self.tally.lock().unwrap().failed += 1;
        }
    }
}

fn version_of(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("version")?
        .as_u64()
}

/// One client: random operations on random keys through random nodes.
async fn client(
    id: usize,
    mut rng: Rng,
    http: Arc<Vec<SocketAddr>>,
    keys: usize,
    until: Instant,
    rec: Arc<Recorder>,
) {
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let addr = http[rng.below(http.len() as u64) as usize];
        let key = rng.below(keys as u64) as usize;
        let path = format!("/v1/plugins/kv/kv/k{key}");
        match rng.below(10) {
            0..=3 => {
                let call = rec.now();
                match request(addr, "GET", &path, b"").await {
                    Answer::Got(200, Some(version), body) => {
                        rec.record(key, call, Some(rec.now()), Op::Read(Some((body, version))))
                    }
                    Answer::Got(404, _, _) => {
                        rec.record(key, call, Some(rec.now()), Op::Read(None))
                    }
                    // A read that failed changed nothing.
                    other => rec.failed(&other).await,
                }
            }
            4..=7 => {
                let value = format!("c{id}-{n}").into_bytes();
                let call = rec.now();
                match request(addr, "PUT", &path, &value).await {
                    Answer::Got(200, _, body) if version_of(&body).is_some() => rec.record(
                        key,
                        call,
                        Some(rec.now()),
                        Op::Write(value, version_of(&body)),
                    ),
                    Answer::Got(504, ..) | Answer::Lost => {
                        rec.record(key, call, None, Op::Write(value, None))
                    }
                    other => rec.failed(&other).await,
                }
            }
            _ => {
                // Compare-and-swap on the version just read.
                let call = rec.now();
                let expected = match request(addr, "GET", &path, b"").await {
                    Answer::Got(200, Some(version), body) => {
                        rec.record(key, call, Some(rec.now()), Op::Read(Some((body, version))));
                        version
                    }
                    other => {
                        rec.failed(&other).await;
                        continue;
                    }
                };
                let value = format!("c{id}-{n}").into_bytes();
                let call = rec.now();
                let cas = |result| Op::Cas {
                    expected,
                    value: value.clone(),
                    result,
                };
                match request(addr, "PUT", &format!("{path}?version={expected}"), &value).await {
                    Answer::Got(200, _, body) if version_of(&body).is_some() => {
                        rec.record(key, call, Some(rec.now()), cas(Ok(version_of(&body))))
                    }
                    Answer::Got(409, ..) => rec.record(key, call, Some(rec.now()), cas(Err(()))),
                    Answer::Got(504, ..) | Answer::Lost => {
                        rec.record(key, call, None, cas(Ok(None)))
                    }
                    other => rec.failed(&other).await,
                }
            }
        }
    }
}

/// The lease in an election answer: holder and token.
fn lease_of(body: &[u8]) -> Option<(String, u64)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some((v["holder"].as_str()?.to_string(), v["token"].as_u64()?))
}

/// One election client: takes a role, renews it a few times, releases
/// it or lets it lapse; reads roles in between.
async fn election_client(
    id: usize,
    mut rng: Rng,
    http: Arc<Vec<SocketAddr>>,
    until: Instant,
    rec: Arc<Recorder>,
) {
    let holder = format!("e{id}");
    while Instant::now() < until {
        let addr = http[rng.below(http.len() as u64) as usize];
        let role = format!("r{}", rng.below(2));
        let observe = |call: u64, body: &[u8], grant: bool| {
            if let Some((holder, token)) = lease_of(body) {
                rec.leases
                    .lock()
                    .unwrap()
                    .entry(role.clone())
                    .or_default()
                    .push(Observation {
                        call,
                        ret: rec.now(),
                        holder,
                        token,
                        grant,
                    });
            }
        };
        if rng.below(3) == 0 {
            let call = rec.now();
            match request(
                addr,
                "GET",
                &format!("/v1/plugins/election/roles/{role}"),
                b"",
            )
            .await
            {
                Answer::Got(200, _, body) => observe(call, &body, false),
                Answer::Got(404, ..) => {}
                other => rec.failed(&other).await,
            }
            continue;
        }
        let ttl = 300 + rng.below(1200);
        let body = format!(r#"{{"holder":"{holder}","ttl_ms":{ttl}}}"#);
        let mut token = None;
        for _ in 0..1 + rng.below(3) {
            let call = rec.now();
            match request(
                addr,
                "POST",
                &format!("/v1/plugins/election/roles/{role}/acquire"),
                body.as_bytes(),
            )
            .await
            {
                Answer::Got(200, _, b) => {
                    observe(call, &b, true);
                    token = lease_of(&b).map(|(_, t)| t);
                }
                // Held by another: what it says is a lease seen.
                Answer::Got(409, _, b) => {
                    observe(call, &b, false);
                    break;
                }
                other => {
                    rec.failed(&other).await;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.below(ttl / 2))).await;
        }
        if let Some(token) = token
            && rng.below(2) == 0
        {
            let body = format!(r#"{{"holder":"{holder}","token":{token}}}"#);
            let path = format!("/v1/plugins/election/roles/{role}/release");
            if let other @ (Answer::NotSent | Answer::Lost) =
                request(addr, "POST", &path, body.as_bytes()).await
            {
                rec.failed(&other).await;
            }
        }
    }
}

const TOPIC: &str = "/v1/plugins/pubsub/topics/torture";
const QUEUE: &str = "/v1/plugins/wq/queues/torture";

/// Sends `method path body` through random nodes, up to three times while
/// the outcome is not known (the body carries an id or key that makes a
/// second copy harmless): the body of a 200, or `None`.
async fn at_most_thrice(
    rng: &mut Rng,
    http: &[SocketAddr],
    rec: &Recorder,
    path: &str,
    body: &[u8],
) -> Option<Vec<u8>> {
    for _ in 0..3 {
        let addr = http[rng.below(http.len() as u64) as usize];
        match request(addr, "POST", path, body).await {
            Answer::Got(200, _, answer) => return Some(answer),
            other => rec.failed(&other).await,
        }
    }
    None
}

/// One publisher: messages whose data is their id.
async fn publisher(
    id: usize,
    mut rng: Rng,
    http: Arc<Vec<SocketAddr>>,
    until: Instant,
    rec: Arc<Recorder>,
) {
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let msg = format!("p{id}-{n}");
        let path = format!("{TOPIC}/publish?id={msg}");
        let ok = at_most_thrice(&mut rng, &http, &rec, &path, msg.as_bytes())
            .await
            .is_some();
        let mut topic = rec.topic.lock().unwrap();
        if ok {
            topic.acknowledged.insert(msg);
        } else {
            topic.unknown.insert(msg);
        }
    }
}

/// One fetch of the group `g` and an ack of each message got; whether
/// any came.
async fn consume_once(
    rng: &mut Rng,
    http: &[SocketAddr],
    rec: &Recorder,
    consumer: &str,
    wait_ms: u64,
) -> bool {
    let addr = http[rng.below(http.len() as u64) as usize];
    let call = rec.now();
    let fetch = format!("{TOPIC}/groups/g/fetch?max=20&consumer={consumer}&wait_ms={wait_ms}");
    let msgs = match request(addr, "POST", &fetch, b"").await {
        Answer::Got(200, _, body) => {
            serde_json::from_slice::<Vec<serde_json::Value>>(&body).unwrap_or_default()
        }
        other => {
            rec.failed(&other).await;
            return false;
        }
    };
    let ret = rec.now();
    for m in &msgs {
        let (Some(seq), Some(data)) = (m["seq"].as_u64(), m["data"].as_str()) else {
            continue;
        };
        rec.topic.lock().unwrap().deliveries.push(Delivery {
            call,
            ret,
            seq,
            id: data.to_string(),
        });
        let addr = http[rng.below(http.len() as u64) as usize];
        let call = rec.now();
        match request(addr, "POST", &format!("{TOPIC}/groups/g/ack/{seq}"), b"").await {
            Answer::Got(200, _, body) if body_says(&body, "acked", true) => {
                let ret = rec.now();
                rec.topic.lock().unwrap().acks.push(Ack { call, ret, seq });
            }
            Answer::Got(200, ..) => {}
            other => rec.failed(&other).await,
        }
    }
    !msgs.is_empty()
}

fn body_says(body: &[u8], field: &str, value: bool) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v[field] == value)
}

async fn consumer(
    id: usize,
    mut rng: Rng,
    http: Arc<Vec<SocketAddr>>,
    until: Instant,
    rec: Arc<Recorder>,
) {
    while Instant::now() < until {
        consume_once(&mut rng, &http, &rec, &format!("c{id}"), 300).await;
    }
}

/// One submitter: tasks whose key is their id, with attempts enough to
/// outlast the faults.
async fn submitter(
    id: usize,
    mut rng: Rng,
    http: Arc<Vec<SocketAddr>>,
    until: Instant,
    rec: Arc<Recorder>,
) {
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let key = format!("s{id}-{n}");
        let task = format!(r#"{{"key": "{key}", "max_attempts": 1000}}"#);
        let path = format!("{QUEUE}/tasks");
        let ok = at_most_thrice(&mut rng, &http, &rec, &path, task.as_bytes())
            .await
            .is_some();
        let mut tasks = rec.tasks.lock().unwrap();
        tasks.submitted.insert(key.clone());
        if ok {
            tasks.acknowledged.insert(key);
        }
    }
}

/// One lease and the completion of what it got, with the token as the
/// result; whether a task came.
async fn work_once(
    rng: &mut Rng,
    http: &[SocketAddr],
    rec: &Recorder,
    worker: &str,
    wait_ms: u64,
) -> bool {
    let addr = http[rng.below(http.len() as u64) as usize];
    let call = rec.now();
    let path = format!("{QUEUE}/lease?worker={worker}&lease_ms=1500&wait_ms={wait_ms}");
    let task = match request(addr, "POST", &path, b"").await {
        Answer::Got(200, _, body) => {
            serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default()
        }
        Answer::Got(204, ..) => return false,
        other => {
            rec.failed(&other).await;
            return false;
        }
    };
    let (Some(id), Some(token)) = (task["id"].as_str(), task["token"].as_u64()) else {
        return false;
    };
    let ret = rec.now();
    rec.tasks.lock().unwrap().leases.push(Lease {
        call,
        ret,
        id: id.to_string(),
        token,
    });
    let addr = http[rng.below(http.len() as u64) as usize];
    let done = format!("/v1/plugins/wq/tasks/{id}/complete?token={token}");
    match request(addr, "POST", &done, token.to_string().as_bytes()).await {
        Answer::Got(200, ..) => rec
            .tasks
            .lock()
            .unwrap()
            .accepted
            .push((id.to_string(), token)),
        Answer::Got(409, ..) => {}
        other => rec.failed(&other).await,
    }
    true
}

async fn worker(
    id: usize,
    mut rng: Rng,
    http: Arc<Vec<SocketAddr>>,
    until: Instant,
    rec: Arc<Recorder>,
) {
    while Instant::now() < until {
        work_once(&mut rng, &http, &rec, &format!("w{id}"), 300).await;
    }
}

/// After the faults: consumes and works until a few looks in a row find
/// nothing (each longer than an ack wait or a lease), or `limit` passes.
async fn drain(rng: &mut Rng, http: &[SocketAddr], rec: &Recorder, limit: Duration) {
    let until = Instant::now() + limit;
    let (mut idle_topic, mut idle_tasks) = (0, 0);
    while Instant::now() < until && (idle_topic < 3 || idle_tasks < 3) {
        if idle_topic < 3 {
            let got = consume_once(rng, http, rec, "drain", 2500).await;
            idle_topic = if got { 0 } else { idle_topic + 1 };
        }
        if idle_tasks < 3 {
            let got = work_once(rng, http, rec, "drain", 2000).await;
            idle_tasks = if got { 0 } else { idle_tasks + 1 };
        }
    }
}

/// The topic as stored, read by a new group from the start, and each
/// task as it ends.
async fn read_back(http: &[SocketAddr], rec: &Recorder) -> Result<(), String> {
    let addr = http[0];
    let group = format!("{TOPIC}/groups/audit");
    match request(addr, "PUT", &group, br#"{"deliver": "all"}"#).await {
        Answer::Got(200, ..) => {}
        _ => return Err("could not create the audit group".into()),
    }
    loop {
        let fetch = format!("{group}/fetch?max=1000&consumer=audit");
        let Answer::Got(200, _, body) = request(addr, "POST", &fetch, b"").await else {
            return Err("could not read the topic back".into());
        };
        let msgs: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap_or_default();
        if msgs.is_empty() {
            break;
        }
        let mut seqs = Vec::new();
        {
            let mut topic = rec.topic.lock().unwrap();
            for m in msgs {
                if let (Some(seq), Some(data)) = (m["seq"].as_u64(), m["data"].as_str()) {
                    topic.stored.push((seq, data.to_string()));
                    seqs.push(seq);
                }
            }
        }
        // Acked, so that the group's `max_ack_pending` lets the next come.
        let ack = serde_json::to_vec(&seqs).unwrap_or_default();
        let Answer::Got(200, ..) = request(addr, "POST", &format!("{group}/ack"), &ack).await
        else {
            return Err("could not ack the audit group's messages".into());
        };
    }
    let submitted = rec.tasks.lock().unwrap().submitted.clone();
    for id in submitted {
        let path = format!("/v1/plugins/wq/tasks/{id}");
        let end = match request(addr, "GET", &path, b"").await {
            Answer::Got(200, _, body) => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                (
                    v["state"].as_str().unwrap_or("?").to_string(),
                    v["result"].as_u64(),
                )
            }
            Answer::Got(404, ..) => continue,
            _ => return Err(format!("could not read task {id}")),
        };
        rec.tasks.lock().unwrap().finally.insert(id, end);
    }
    Ok(())
}

const STREAMS: &str = "/v1/plugins/events/streams";
/// The streams the stream clients append to.
const LEDGERS: u64 = 3;

/// One stream client: events appended with the version it believes each
/// stream is at; an append that loses a race learns the current version
/// and goes again with the same event, as does one whose outcome is
/// unknown (the store answers a retry of a written event as before).
async fn appender(
    id: usize,
    mut rng: Rng,
    http: Arc<Vec<SocketAddr>>,
    until: Instant,
    rec: Arc<Recorder>,
) {
    let mut known: BTreeMap<String, Option<u64>> = BTreeMap::new();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let stream = format!("ledger-{}", rng.below(LEDGERS));
        let event_id = format!("a{id}-{n}");
        let body = format!(r#"{{"type": "Entry", "data": {n}, "id": "{event_id}"}}"#);
        let mut written = false;
        for _ in 0..5 {
            let expected = known.get(&stream).copied().flatten();
            let e = expected.map_or("no_stream".to_string(), |v| v.to_string());
            let addr = http[rng.below(http.len() as u64) as usize];
            let path = format!("{STREAMS}/{stream}?expected_version={e}");
            let answer = request(addr, "POST", &path, body.as_bytes()).await;
            let v = match &answer {
                Answer::Got(200 | 409, _, b) => {
                    serde_json::from_slice::<serde_json::Value>(b).unwrap_or_default()
                }
                other => {
                    rec.failed(other).await;
                    continue;
                }
            };
            if let Answer::Got(409, ..) = answer {
                known.insert(stream.clone(), v["current"].as_u64());
                continue;
            }
            let Some(version) = v["version"].as_u64() else {
                break;
            };
            // A retry's answer names the first write's version, whose
            // expected version this client did not send.
            let expected = if v["duplicate"] == true {
                version.checked_sub(1)
            } else {
                expected
            };
            rec.streams.lock().unwrap().acknowledged.push(Appended {
                stream: stream.clone(),
                id: event_id.clone(),
                expected,
                version,
            });
            known.insert(stream.clone(), Some(version));
            written = true;
            break;
        }
        if !written {
            rec.streams.lock().unwrap().unknown.insert(event_id);
        }
    }
}

/// Every stream as stored, read through node 1.
async fn read_streams(http: &[SocketAddr], rec: &Recorder) -> Result<(), String> {
    for s in 0..LEDGERS {
        let stream = format!("ledger-{s}");
        let mut from = 0;
        loop {
            let path = format!("{STREAMS}/{stream}?from={from}&max=1000");
            let page = match request(http[0], "GET", &path, b"").await {
                Answer::Got(200, _, b) => {
                    serde_json::from_slice::<serde_json::Value>(&b).unwrap_or_default()
                }
                Answer::Got(404, ..) => break,
                _ => return Err(format!("could not read {stream} back")),
            };
            let events = page["events"].as_array().cloned().unwrap_or_default();
            if events.is_empty() {
                break;
            }
            let mut streams = rec.streams.lock().unwrap();
            let held = streams.stored.entry(stream.clone()).or_default();
            for e in events {
                if let (Some(v), Some(id)) = (e["version"].as_u64(), e["id"].as_str()) {
                    held.push((v, id.to_string()));
                }
            }
            from = page["next"].as_u64().unwrap_or(u64::MAX);
        }
    }
    Ok(())
}

struct Cluster {
    dir: tempfile::TempDir,
    http: Vec<SocketAddr>,
    nodes: Vec<Option<Process>>,
    stopped: Vec<bool>,
    net: (u8, u8),
}

/// The loopback network of this run: 127.a.b.0/24, from the process id,
/// so runs side by side do not share addresses (or firewall rules).
fn node_net() -> (u8, u8) {
    let pid = std::process::id();
    (100 + (pid % 100) as u8, ((pid / 100) % 250) as u8)
}

/// Node `i`'s address.
fn node_ip(net: (u8, u8), i: usize) -> std::net::IpAddr {
    std::net::IpAddr::from([127, net.0, net.1, i as u8 + 1])
}

/// Network faults between nodes: `iptables` rules in a chain of this
/// run's own, jumped to from `INPUT` and removed when dropped.
struct Firewall {
    chain: String,
}

fn iptables(args: &[&str]) -> bool {
    std::process::Command::new("iptables")
        .arg("-w")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Firewall {
    /// `None` when `iptables` is missing or not allowed.
    fn new() -> Option<Firewall> {
        let chain = format!("PLEXUS-TORTURE-{}", std::process::id());
        if !iptables(&["-N", &chain]) {
            return None;
        }
        if !iptables(&["-I", "INPUT", "-j", &chain]) {
            iptables(&["-X", &chain]);
            return None;
        }
        Some(Firewall { chain })
    }

    /// Drops what `from` sends to `to` (or, with `loss`, that share of it).
    fn cut(&self, from: std::net::IpAddr, to: std::net::IpAddr, loss: Option<f64>) {
        let (src, dst) = (from.to_string(), to.to_string());
        let mut rule = vec!["-A", &self.chain, "-s", &src, "-d", &dst];
        let p = loss.map(|p| p.to_string());
        if let Some(p) = &p {
            rule.extend(["-m", "statistic", "--mode", "random", "--probability", p]);
        }
        rule.extend(["-j", "DROP"]);
        iptables(&rule);
    }

    fn heal(&self) {
        iptables(&["-F", &self.chain]);
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        iptables(&["-D", "INPUT", "-j", &self.chain]);
        iptables(&["-F", &self.chain]);
        iptables(&["-X", &self.chain]);
    }
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        // Each node on an address of its own, so network faults can name it.
        let net = node_net();
        let on = |i: usize, port: SocketAddr| SocketAddr::new(node_ip(net, i), port.port());
        let http: Vec<SocketAddr> = loopback_addrs(n)
            .into_iter()
            .enumerate()
            .map(|(i, a)| on(i, a))
            .collect();
        let peer: Vec<SocketAddr> = loopback_addrs(n)
            .into_iter()
            .enumerate()
            .map(|(i, a)| on(i, a))
            .collect();
        for i in 0..n {
            let config = cluster_node_config(
                i,
                &http,
                &peer,
                "",
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

[[plugins]]
name = "pubsub"
component = "bundled:pubsub"
capabilities = ["consensus", "storage", "timers"]

[[plugins]]
name = "wq"
component = "bundled:work-queue"
capabilities = ["consensus", "storage", "timers"]

[[plugins]]
name = "events"
component = "bundled:event-store"
capabilities = ["consensus", "storage", "timers", "plugins"]
"#
                ),
            );
            std::fs::write(dir.path().join(format!("node-{}.toml", i + 1)), config)
                .expect("config");
        }
        let mut c = Cluster {
            dir,
            http,
            nodes: Vec::new(),
            stopped: vec![false; n],
            net,
        };
        for i in 0..n {
            let p = c.spawn(i).await;
            c.nodes.push(Some(p));
        }
        c
    }

    async fn spawn(&self, i: usize) -> Process {
        let config = self.dir.path().join(format!("node-{}.toml", i + 1));
        Process::up(self.dir.path(), &config, self.http[i]).await
    }

    async fn leader(&self) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.is_none() || self.stopped[i] {
                continue;
            }
            let auth = format!("Bearer {TOKEN}");
            if let Ok((200, body)) = plexus_tests::http(
                self.http[i],
                "GET",
                "/v1/admin/status",
                &[("authorization", auth.as_str())],
                b"",
            )
            .await
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                && let Some(l) = v["leader"].as_str()
                && let Some(n) = l
                    .strip_prefix("node-")
                    .and_then(|n| n.parse::<usize>().ok())
            {
                return Some(n - 1);
            }
        }
        None
    }

    fn signal(&mut self, i: usize, sig: &str) {
        if let Some(p) = &self.nodes[i] {
            let _ = std::process::Command::new("kill")
                .args([sig, &p.child.id().to_string()])
                .status();
            self.stopped[i] = sig == "-STOP";
        }
    }
}

#[derive(Default)]
struct Nemesis {
    events: BTreeMap<&'static str, u64>,
}

impl Nemesis {
    fn count(&mut self, kind: &'static str) {
        *self.events.entry(kind).or_default() += 1;
        println!("nemesis: {kind}");
    }
}

async fn nemesis(
    c: &mut Cluster,
    rng: &mut Rng,
    until: Instant,
    n: &mut Nemesis,
    firewall: Option<&Firewall>,
) {
    let plugins = [
        ("kv", wasm("replicated-kv")),
        ("pubsub", wasm("pubsub")),
        ("wq", wasm("work-queue")),
        ("events", wasm("event-store")),
    ];
    let mut swaps = 0u8;
    let nodes = c.nodes.len();
    let net = c.net;
    let ip = |i| node_ip(net, i);
    while Instant::now() + Duration::from_secs(3) < until {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(2500))).await;
        let target = match c.leader().await {
            Some(l) if rng.below(2) == 0 => l,
            _ => rng.below(c.nodes.len() as u64) as usize,
        };
        let pause = Duration::from_millis(300 + rng.below(2700));
        if let Some(fw) = firewall
            && rng.below(3) == 0
        {
            let others: Vec<usize> = (0..nodes).filter(|j| *j != target).collect();
            match rng.below(4) {
                0 => {
                    n.count("partition: one node cut off");
                    for &j in &others {
                        fw.cut(ip(target), ip(j), None);
                        fw.cut(ip(j), ip(target), None);
                    }
                }
                1 => {
                    n.count("partition: one way");
                    for &j in &others {
                        fw.cut(ip(target), ip(j), None);
                    }
                }
                2 => {
                    // `target` is the bridge; the others split into two
                    // sides that reach it but not each other.
                    n.count("partition: bridge");
                    let (left, right) = others.split_at(others.len() / 2);
                    for &a in left {
                        for &b in right {
                            fw.cut(ip(a), ip(b), None);
                            fw.cut(ip(b), ip(a), None);
                        }
                    }
                }
                _ => {
                    n.count("packet loss (25%) between every pair");
                    for a in 0..nodes {
                        for b in (0..nodes).filter(|b| *b != a) {
                            fw.cut(ip(a), ip(b), Some(0.25));
                        }
                    }
                }
            }
            tokio::time::sleep(pause).await;
            fw.heal();
            continue;
        }
        match rng.below(10) {
            0..=3 => {
                n.count(if c.leader().await == Some(target) {
                    "kill -9 leader"
                } else {
                    "kill -9 follower"
                });
                c.nodes[target] = None;
                c.stopped[target] = false;
                tokio::time::sleep(pause).await;
                c.nodes[target] = Some(c.spawn(target).await);
            }
            4..=6 => {
                n.count("pause (SIGSTOP) and resume");
                c.signal(target, "-STOP");
                tokio::time::sleep(pause).await;
                c.signal(target, "-CONT");
            }
            7..=8 => {
                let (name, component) = &plugins[rng.below(plugins.len() as u64) as usize];
                n.count(match *name {
                    "kv" => "cluster-wide hot swap of kv",
                    "pubsub" => "cluster-wide hot swap of pubsub",
                    "events" => "cluster-wide hot swap of events",
                    _ => "cluster-wide hot swap of wq",
                });
                swaps = swaps.wrapping_add(1);
                let bytes = variant(component, swaps);
                let auth = format!("Bearer {TOKEN}");
                let _ = plexus_tests::http(
                    c.http[target],
                    "POST",
                    &format!("/v1/admin/plugins/{name}/swap?scope=cluster"),
                    &[
                        ("authorization", auth.as_str()),
                        ("content-type", "application/wasm"),
                    ],
                    &bytes,
                )
                .await;
            }
            _ => {
                n.count("crash of every node");
                for node in c.nodes.iter_mut() {
                    *node = None;
                }
                c.stopped.iter_mut().for_each(|s| *s = false);
                tokio::time::sleep(pause).await;
                for i in 0..c.nodes.len() {
                    c.nodes[i] = Some(c.spawn(i).await);
                }
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("torture: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "torture: seed {} ({} nodes, {} clients, {} keys, {} s)",
        args.seed, args.nodes, args.clients, args.keys, args.seconds
    );
    let mut rng = Rng::new(args.seed);
    let mut cluster = Cluster::start(args.nodes).await;
    // A leader before the clients start.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.leader().await.is_none() {
        if Instant::now() > deadline {
            eprintln!("torture: no leader elected");
            return ExitCode::FAILURE;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rec = Arc::new(Recorder {
        started: Instant::now(),
        histories: Mutex::new(BTreeMap::new()),
        leases: Mutex::new(BTreeMap::new()),
        topic: Mutex::default(),
        tasks: Mutex::default(),
        streams: Mutex::default(),
        tally: Mutex::new(Tally::default()),
    });
    // The topic and its group, before anyone publishes.
    let setup = [
        (TOPIC.to_string(), &b""[..]),
        (
            format!("{TOPIC}/groups/g"),
            &br#"{"ack_wait_ms": 2000, "max_deliver": 0}"#[..],
        ),
    ];
    for (path, body) in setup {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(
            request(cluster.http[0], "PUT", &path, body).await,
            Answer::Got(200, ..)
        ) {
            if Instant::now() > deadline {
                eprintln!("torture: could not create {path}");
                return ExitCode::FAILURE;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let http = Arc::new(cluster.http.clone());
    let clients: Vec<_> = (0..args.clients)
        .map(|id| {
            let client_rng = Rng::new(rng.below(u64::MAX));
            tokio::spawn(client(
                id,
                client_rng,
                http.clone(),
                args.keys,
                until,
                rec.clone(),
            ))
        })
        .collect();
    let elections: Vec<_> = (0..args.election_clients)
        .map(|id| {
            let client_rng = Rng::new(rng.below(u64::MAX));
            tokio::spawn(election_client(
                id,
                client_rng,
                http.clone(),
                until,
                rec.clone(),
            ))
        })
        .collect();
    let mut queue_clients = Vec::new();
    for id in 0..args.queue_clients {
        for _ in 0..4 {
            let client_rng = Rng::new(rng.below(u64::MAX));
            let (http, rec) = (http.clone(), rec.clone());
            queue_clients.push(match queue_clients.len() % 4 {
                0 => tokio::spawn(publisher(id, client_rng, http, until, rec)),
                1 => tokio::spawn(consumer(id, client_rng, http, until, rec)),
                2 => tokio::spawn(submitter(id, client_rng, http, until, rec)),
                _ => tokio::spawn(worker(id, client_rng, http, until, rec)),
            });
        }
    }
    for id in 0..args.stream_clients {
        let client_rng = Rng::new(rng.below(u64::MAX));
        queue_clients.push(tokio::spawn(appender(
            id,
            client_rng,
            http.clone(),
            until,
            rec.clone(),
        )));
    }
    let firewall = Firewall::new();
    if firewall.is_none() {
        println!("torture: no iptables (or no right to use it): network faults left out");
    }
    let mut n = Nemesis::default();
    nemesis(&mut cluster, &mut rng, until, &mut n, firewall.as_ref()).await;
    drop(firewall);
    for i in 0..cluster.nodes.len() {
        if cluster.stopped[i] {
            cluster.signal(i, "-CONT");
        }
    }
    for c in clients.into_iter().chain(elections).chain(queue_clients) {
        let _ = c.await;
    }
    // What the queues still hold, then everything read back.
    let mut drain_rng = Rng::new(rng.below(u64::MAX));
    drain(&mut drain_rng, &http, &rec, Duration::from_secs(60)).await;
    let read_back = read_back(&http, &rec).await;
    let streams_back = read_streams(&http, &rec).await;
    drop(cluster);
    let topic = std::mem::take(&mut *rec.topic.lock().unwrap());
    let tasks = std::mem::take(&mut *rec.tasks.lock().unwrap());
    let mut queue_violations = queues::topic_violations(&topic);
    queue_violations.extend(queues::task_violations(&tasks));
    if let Err(e) = read_back {
        queue_violations.push(e);
    }
    let stream_history = std::mem::take(&mut *rec.streams.lock().unwrap());
    let mut stream_violations = streams::violations(&stream_history);
    if let Err(e) = streams_back {
        stream_violations.push(e);
    }

    let histories = std::mem::take(&mut *rec.histories.lock().unwrap());
    let leases = std::mem::take(&mut *rec.leases.lock().unwrap());
    let mut fencing_violations = Vec::new();
    for (role, seen) in &leases {
        for v in fencing::violations(seen) {
            fencing_violations.push(format!("role {role}: {v}"));
        }
    }
    let tally = std::mem::take(&mut *rec.tally.lock().unwrap());
    let mut violations = Vec::new();
    let mut unchecked = Vec::new();
    let checked_at = Instant::now();
    // Keys are independent registers: checked side by side.
    let verdicts: Vec<(usize, Option<bool>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = histories
            .iter()
            .map(|(key, history)| scope.spawn(move || (*key, check(history, CHECK_STEPS))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a checker thread panicked"))
            .collect()
    });
    for (key, verdict) in verdicts {
        match verdict {
            Some(true) => {}
            Some(false) => violations.push(key),
            None => unchecked.push(key),
        }
    }
    println!(
        "\noperations: {} ok, {} failed (definite), {} unknown outcome, {} not sent (node down); {} in the checked histories",
        tally.ok,
        tally.failed,
        tally.unknown,
        tally.not_sent,
        histories.values().map(Vec::len).sum::<usize>()
    );
    let events: Vec<String> = n.events.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "nemesis: {} events ({})",
        n.events.values().sum::<u64>(),
        events.join(", ")
    );
    println!(
        "linearizability: {} keys checked in {} ms, {} violations{}",
        histories.len() - unchecked.len(),
        checked_at.elapsed().as_millis(),
        violations.len(),
        if unchecked.is_empty() {
            String::new()
        } else {
            format!(
                ", {} keys too large to check (k{unchecked:?})",
                unchecked.len()
            )
        }
    );
    println!(
        "fencing tokens: {} grants and {} leases seen on {} roles, {} violations",
        leases.values().flatten().filter(|o| o.grant).count(),
        leases.values().flatten().filter(|o| !o.grant).count(),
        leases.len(),
        fencing_violations.len()
    );
    let redelivered = topic.deliveries.len()
        - topic
            .deliveries
            .iter()
            .map(|d| d.seq)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
    println!(
        "pubsub: {} publishes acknowledged, {} unknown, {} stored; {} deliveries ({} again), {} acks",
        topic.acknowledged.len(),
        topic.unknown.len(),
        topic.stored.len(),
        topic.deliveries.len(),
        redelivered,
        topic.acks.len()
    );
    println!(
        "work-queue: {} tasks acknowledged of {} submitted, {} done; {} leases, {} results accepted",
        tasks.acknowledged.len(),
        tasks.submitted.len(),
        tasks.finally.values().filter(|(s, _)| s == "done").count(),
        tasks.leases.len(),
        tasks.accepted.len()
    );
    println!("queues: {} violations", queue_violations.len());
    println!(
        "event-store: {} appends acknowledged, {} unknown, {} events stored in {} streams; {} violations",
        stream_history.acknowledged.len(),
        stream_history.unknown.len(),
        stream_history.stored.values().map(Vec::len).sum::<usize>(),
        stream_history.stored.len(),
        stream_violations.len()
    );
    println!("seed {}", args.seed);
    for v in fencing_violations
        .iter()
        .chain(&queue_violations)
        .chain(&stream_violations)
    {
        eprintln!("{v}");
    }
    if violations.is_empty()
        && fencing_violations.is_empty()
        && queue_violations.is_empty()
        && stream_violations.is_empty()
    {
        ExitCode::SUCCESS
    } else {
        for key in &violations {
            eprintln!("key k{key}: history is not linearizable");
        }
        eprintln!(
            "torture: run again with --seed {} --seconds {} --nodes {} --clients {} --keys {}",
            args.seed, args.seconds, args.nodes, args.clients, args.keys
        );
        ExitCode::FAILURE
    }
}
