//! Pubsub benchmark: a program that prints figures.
//!
//!     cargo bench -p plexus --bench pubsub [-- --seconds 20 --rounds 2 --publishers 64
//!         --consumers 4 --batch 100 --sizes 64,1024 --nats PATH --nats-sync always]
//!
//! Starts three `plexus` processes on 127.0.0.1 with the `pubsub` plugin
//! and, with `--nats PATH` (a `nats-server` 2.10+ binary), a three-server
//! NATS cluster on loopback with JetStream, and puts the same load on
//! both in the same run:
//! - `--publishers` clients, each on a connection of its own, publish
//!   messages of each of `--sizes` bytes to one topic, one at a time: each
//!   waits for its publish to be acknowledged as durable before the next;
//! - `--consumers` clients of one durable group (a JetStream durable pull
//!   consumer with explicit acks) take the messages in batches of at most
//!   `--batch` and acknowledge them.
//!
//! Clients are spread over the three servers of each system. A message
//! carries its id and when it was sent, so the consumers measure the
//! latency from publish to delivery, and every acknowledged publish is
//! looked for among the deliveries: a message acknowledged and never
//! delivered is counted lost. Each phase (one system, one size) runs the
//! publishers for its share of `--seconds`, then lets the consumers drain
//! what is left. The systems' phases alternate in `--rounds` rounds
//! (plexus first, then NATS first, ...), so that the machine speeding up
//! or slowing down falls on both alike. Each phase has a topic (a stream)
//! of its own, kept to the end of the run on both systems. A message out
//! to a consumer goes out again if not acknowledged within 5 s.
//!
//! On the NATS side the stream keeps its messages in files (`file`
//! storage) on three replicas, and a publish is acknowledged once a
//! majority has it. nats-server writes to its files without an fsync per
//! message by default (`sync_interval` of two minutes); with
//! `--nats-sync always` it syncs every write, as plexus's Raft log does
//! before it acknowledges an append.
//!
//! `PLEXUS_BIN=path` runs that `plexus` binary instead of this build's.
//! `host/benches/pubsub-vs-jetstream.sh [ARGS]` installs nats-server when
//! it is missing and runs this with `--nats`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use futures_util::StreamExt;
use serde::Deserialize;

mod common;

use common::{
    Conn, Errors, Meter, Plexus, Procs, Usage, arg, arg_list, arg_str, free_port, percentile,
    until_ok,
};

const PLUGIN: &str = "[[plugins]]\nname = \"pubsub\"\ncomponent = \"bundled:pubsub\"\n\
                      capabilities = [\"consensus\", \"storage\", \"timers\"]\n\
                      limits = { mailbox = 4096 }\n";

/// How long a consumer has to ack a message before it goes out again.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// How long consumers may go without a delivery, once the publishers
/// stopped, before what is still missing counts as lost: long enough for
/// a message fetched by a consumer that failed to go out again.
const DRAIN: Duration = Duration::from_secs(15);

/// Microseconds since the start of the run, the clock of the messages'
/// send times.
fn now_us() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A message: `{id}:{sent_us}:`, padded with `x` to `size` bytes.
fn message(id: u64, size: usize) -> Vec<u8> {
    let mut m = format!("{id}:{}:", now_us()).into_bytes();
    m.resize(size.max(m.len()), b'x');
    m
}

/// A message's id and send time.
fn parse(data: &[u8]) -> Option<(u64, u64)> {
    let mut parts = data.split(|b| *b == b':');
    let mut number = || std::str::from_utf8(parts.next()?).ok()?.parse().ok();
    Some((number()?, number()?))
}

/// Where the clients of one system connect.
#[derive(Clone)]
enum Target {
    Plexus(Vec<SocketAddr>),
    Nats(Vec<String>),
}

/// One phase's topic (stream) and group (durable consumer).
#[derive(Clone)]
struct Topic {
    name: String,
    batch: usize,
}

impl Topic {
    fn path(&self) -> String {
        format!("/v1/plugins/pubsub/topics/{}", self.name)
    }

    fn group_path(&self) -> String {
        format!("{}/groups/g", self.path())
    }

    /// Most messages the group may have out: every consumer's batch, twice.
    fn max_ack_pending(&self, consumers: usize) -> usize {
        (consumers * self.batch * 2).clamp(1, 1_000_000)
    }
}

/// A client that publishes and waits for each publish to be durable.
enum Publisher {
    Plexus { conn: Conn, path: String },
    Nats(jetstream::Context, String),
}

impl Publisher {
    async fn open(target: &Target, i: usize, topic: &Topic) -> anyhow::Result<Publisher> {
        Ok(match target {
            Target::Plexus(http) => Publisher::Plexus {
                conn: Conn::open(http[i % http.len()]).await?,
                path: format!("{}/publish", topic.path()),
            },
            Target::Nats(urls) => {
                let client = async_nats::connect(urls[i % urls.len()].as_str()).await?;
                Publisher::Nats(jetstream::new(client), topic.name.clone())
            }
        })
    }

    async fn publish(&mut self, data: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Publisher::Plexus { conn, path } => {
                conn.call("POST", path, &data).await.context("publish")?;
            }
            Publisher::Nats(js, subject) => {
                let ack = js.publish(subject.clone(), data.into()).await;
                ack.context("publish")?.await.context("publish")?;
            }
        }
        Ok(())
    }
}

/// One message as a plexus fetch answers it.
#[derive(Deserialize)]
struct Fetched {
    seq: u64,
    #[serde(default)]
    data: String,
}

/// A member of the group, which takes messages and acknowledges them.
enum Consumer {
    Plexus {
        conn: Conn,
        fetch: String,
        ack: String,
    },
    Nats(Box<jetstream::consumer::pull::Stream>),
}

impl Consumer {
    async fn open(target: &Target, i: usize, topic: &Topic) -> anyhow::Result<Consumer> {
        Ok(match target {
            Target::Plexus(http) => Consumer::Plexus {
                conn: Conn::open(http[i % http.len()]).await?,
                fetch: format!(
                    "{}/fetch?max={}&consumer=c{i}&wait_ms=500",
                    topic.group_path(),
                    topic.batch
                ),
                ack: format!("{}/ack", topic.group_path()),
            },
            Target::Nats(urls) => {
                let client = async_nats::connect(urls[i % urls.len()].as_str()).await?;
                let consumer: jetstream::consumer::PullConsumer = jetstream::new(client)
                    .get_stream(&topic.name)
                    .await?
                    .get_consumer("g")
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?;
                let messages = consumer
                    .stream()
                    .max_messages_per_batch(topic.batch)
                    .messages()
                    .await?;
                Consumer::Nats(Box::new(messages))
            }
        })
    }

    /// The next messages, each acknowledged (on plexus, the batch in one
    /// request); none when none came within half a second.
    async fn next(&mut self) -> anyhow::Result<Vec<Vec<u8>>> {
        match self {
            Consumer::Plexus { conn, fetch, ack } => {
                let (_, body) = conn.call("POST", fetch, b"").await.context("fetch")?;
                let fetched: Vec<Fetched> = serde_json::from_slice(body)?;
                let seqs: Vec<u64> = fetched.iter().map(|f| f.seq).collect();
                if seqs.is_empty() {
                    return Ok(Vec::new());
                }
                let acks = serde_json::to_vec(&seqs)?;
                conn.call("POST", ack, &acks).await.context("ack")?;
                Ok(fetched.into_iter().map(|f| f.data.into_bytes()).collect())
            }
            Consumer::Nats(messages) => {
                let Ok(next) =
                    tokio::time::timeout(Duration::from_millis(500), messages.next()).await
                else {
                    return Ok(Vec::new());
                };
                let message = next
                    .ok_or_else(|| anyhow::anyhow!("the consumer's stream ended"))?
                    .map_err(|e| anyhow::anyhow!(e))?;
                message.ack().await.map_err(|e| anyhow::anyhow!(e))?;
                Ok(vec![message.payload.to_vec()])
            }
        }
    }
}

/// What phases of one system and size measured, kept raw so that they
/// can be added up.
#[derive(Default)]
struct Sample {
    /// Publishes acknowledged, and how long the publishers ran.
    published: u64,
    publishing: Duration,
    /// Messages delivered and acknowledged (each counted once), and the
    /// time from the start of their phase to the last.
    delivered: u64,
    delivering: Duration,
    /// Publish-to-delivery latencies, ms, of first deliveries.
    latencies: Vec<f64>,
    /// Deliveries of a message delivered before.
    redelivered: u64,
    /// Acknowledged publishes never delivered.
    lost: u64,
    /// Failed requests, by what they said.
    errors: BTreeMap<String, u64>,
    usage: Usage,
    /// Proposals the plexus leaders took, and the Raft entries they
    /// wrote them in.
    proposals: u64,
    entries: u64,
}

impl Sample {
    fn published_rate(&self) -> f64 {
        self.published as f64 / self.publishing.as_secs_f64().max(1e-9)
    }

    fn delivered_rate(&self) -> f64 {
        self.delivered as f64 / self.delivering.as_secs_f64().max(1e-9)
    }

    fn add(&mut self, other: Sample) {
        self.published += other.published;
        self.publishing += other.publishing;
        self.delivered += other.delivered;
        self.delivering += other.delivering;
        self.latencies.extend(other.latencies);
        self.redelivered += other.redelivered;
        self.lost += other.lost;
        for (what, n) in other.errors {
            *self.errors.entry(what).or_default() += n;
        }
        self.usage.add(other.usage);
        self.proposals += other.proposals;
        self.entries += other.entries;
    }

    fn print(&mut self, label: &str) {
        self.latencies.sort_by(|a, b| a.total_cmp(b));
        let per_msg = |cpu: Duration| cpu.as_secs_f64() * 1e6 / self.published.max(1) as f64;
        println!(
            "{label:<36} {:>9.0} {:>11.0} {:>8.1} {:>8.1} {:>6} {:>7} {:>11.0} {:>11.0}",
            self.published_rate(),
            self.delivered_rate(),
            percentile(&self.latencies, 0.5),
            percentile(&self.latencies, 0.99),
            self.lost,
            self.errors.values().sum::<u64>(),
            per_msg(self.usage.servers),
            per_msg(self.usage.client)
        );
        println!(
            "{:<36} {} published, {} delivered, {} redelivered",
            "", self.published, self.delivered, self.redelivered
        );
        println!("{:<36} {}", "", self.usage.describe());
        for (what, n) in &self.errors {
            println!("{:<36} {n} failed: {what}", "");
        }
        if self.entries > 0 {
            println!(
                "{:<36} {} proposals in {} Raft entries ({:.1} per entry)",
                "",
                self.proposals,
                self.entries,
                self.proposals as f64 / self.entries as f64
            );
        }
    }
}

/// The load of one phase.
struct Load {
    publishers: usize,
    consumers: usize,
    size: usize,
    seconds: f64,
}

/// Runs one phase on `target` (servers `pids`) with `topic` set up.
async fn phase(target: &Target, pids: &[u32], topic: &Topic, load: &Load) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let drained = Arc::new(AtomicBool::new(false));
    let errors = Errors::default();
    let delivered = Arc::new(Mutex::new(HashSet::new()));
    let last_delivery = Arc::new(AtomicU64::new(0));
    let started = now_us();
    let meter = Meter::start(pids);

    let mut consumers = Vec::new();
    for c in 0..load.consumers {
        let (target, topic, drained, errors) = (
            target.clone(),
            topic.clone(),
            drained.clone(),
            errors.clone(),
        );
        let (delivered, last_delivery) = (delivered.clone(), last_delivery.clone());
        consumers.push(tokio::spawn(async move {
            let (mut latencies, mut redelivered) = (Vec::new(), 0u64);
            let mut consumer = None;
            while !drained.load(Ordering::Relaxed) {
                if consumer.is_none() {
                    match Consumer::open(&target, c, &topic).await {
                        Ok(opened) => consumer = Some(opened),
                        Err(e) => {
                            errors.note(format_args!("connect: {e}"));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
                let Some(open) = consumer.as_mut() else {
                    continue;
                };
                let batch = match open.next().await {
                    Ok(batch) => batch,
                    Err(e) => {
                        errors.note(format_args!("{e:#}"));
                        consumer = None;
                        continue;
                    }
                };
                if batch.is_empty() {
                    continue;
                }
                let at = now_us();
                {
                    let mut seen = delivered.lock().unwrap();
                    for (id, sent) in batch.iter().filter_map(|m| parse(m)) {
                        if seen.insert(id) {
                            latencies.push(at.saturating_sub(sent) as f64 / 1e3);
                        } else {
                            redelivered += 1;
                        }
                    }
                }
                last_delivery.fetch_max(at, Ordering::Relaxed);
            }
            (latencies, redelivered)
        }));
    }

    let mut publishers = Vec::new();
    for p in 0..load.publishers {
        let (target, topic, stop, errors) =
            (target.clone(), topic.clone(), stop.clone(), errors.clone());
        let size = load.size;
        publishers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut publisher = None;
            let mut id = p as u64 * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                if publisher.is_none() {
                    match Publisher::open(&target, p, &topic).await {
                        Ok(opened) => publisher = Some(opened),
                        Err(e) => {
                            errors.note(format_args!("connect: {e}"));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
                let Some(open) = publisher.as_mut() else {
                    continue;
                };
                id += 1;
                match open.publish(message(id, size)).await {
                    Ok(()) => acked.push(id),
                    Err(e) => {
                        errors.note(format_args!("{e:#}"));
                        publisher = None;
                    }
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(load.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for p in publishers {
        acked.extend(p.await.unwrap_or_default());
    }
    let publishing = Duration::from_micros(now_us() - started);

    // The consumers drain what is left, until every acknowledged publish
    // was delivered or they went `DRAIN` without a delivery.
    loop {
        let all_in = {
            let seen = delivered.lock().unwrap();
            seen.len() >= acked.len() && acked.iter().all(|id| seen.contains(id))
        };
        let quiet = now_us().saturating_sub(last_delivery.load(Ordering::Relaxed).max(started));
        if all_in || Duration::from_micros(quiet) > DRAIN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drained.store(true, Ordering::Relaxed);
    let mut sample = Sample::default();
    for c in consumers {
        let (latencies, redelivered) = c.await.unwrap_or_default();
        sample.latencies.extend(latencies);
        sample.redelivered += redelivered;
    }
    sample.usage = meter.stop();
    let seen = delivered.lock().unwrap();
    sample.published = acked.len() as u64;
    sample.publishing = publishing;
    sample.delivered = seen.len() as u64;
    sample.delivering = Duration::from_micros(
        last_delivery
            .load(Ordering::Relaxed)
            .saturating_sub(started),
    );
    sample.lost = acked.iter().filter(|id| !seen.contains(id)).count() as u64;
    sample.errors = errors.counts();
    sample
}

/// The servers of one system.
enum Servers {
    Plexus(Plexus),
    Nats(Procs),
}

impl Servers {
    fn pids(&self) -> Vec<u32> {
        match self {
            Servers::Plexus(p) => p.procs.pids(),
            Servers::Nats(p) => p.pids(),
        }
    }
}

/// Makes `topic` and its group on `target`.
async fn create(target: &Target, topic: &Topic, consumers: usize) -> anyhow::Result<()> {
    let max_ack_pending = topic.max_ack_pending(consumers);
    match target {
        Target::Plexus(http) => {
            until_ok(http[0], "PUT", &topic.path(), b"{}").await;
            let group = format!(
                r#"{{"deliver": "all", "ack_wait_ms": {}, "max_ack_pending": {max_ack_pending}}}"#,
                ACK_WAIT.as_millis()
            );
            until_ok(http[0], "PUT", &topic.group_path(), group.as_bytes()).await;
        }
        Target::Nats(urls) => {
            let js = jetstream::new(async_nats::connect(urls[0].as_str()).await?);
            let stream = js
                .create_stream(jetstream::stream::Config {
                    name: topic.name.clone(),
                    subjects: vec![topic.name.clone()],
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: 3,
                    ..Default::default()
                })
                .await?;
            stream
                .create_consumer(jetstream::consumer::pull::Config {
                    durable_name: Some("g".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: max_ack_pending as i64,
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(())
}

/// Starts three nats-servers with JetStream, clustered on loopback, and
/// waits until they can make a replicated stream; returns their client
/// URLs.
async fn start_nats(nats: &Path, dir: &Path) -> anyhow::Result<(Procs, Vec<String>)> {
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let route: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let sync = match arg_str("--nats-sync").as_deref() {
        Some("always") => "  sync_interval: always\n",
        _ => "",
    };
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let routes: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| format!("nats://127.0.0.1:{}", route[j]))
            .collect();
        let conf = dir.join(format!("nats-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n\
                 cluster {{\n  name: bench\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                client[i],
                dir.join(format!("nats-{i}")).display(),
                route[i],
                routes.join(", ")
            ),
        )?;
        let child = Command::new(nats)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        procs.0.push(Some(child));
    }
    let urls: Vec<String> = client
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    let target = Target::Nats(urls.clone());
    let probe = Topic {
        name: "ready".into(),
        batch: 1,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match create(&target, &probe, 1).await {
            Ok(()) => break,
            Err(e) => anyhow::ensure!(Instant::now() < deadline, "JetStream did not come up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let js = jetstream::new(async_nats::connect(urls[0].as_str()).await?);
    js.delete_stream(&probe.name).await?;
    Ok((procs, urls))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let seconds = arg("--seconds", 20) as f64;
    let publishers = arg("--publishers", 64) as usize;
    let consumers = arg("--consumers", 4) as usize;
    let batch = arg("--batch", 100) as usize;
    let sizes = arg_list("--sizes", &[64, 1024]);
    let nats = arg_str("--nats").map(std::path::PathBuf::from);
    if let Some(nats) = &nats {
        anyhow::ensure!(
            nats.is_file(),
            "no nats-server at {}: run host/benches/pubsub-vs-jetstream.sh, which installs it",
            nats.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let plexus = Plexus::start(dir.path(), PLUGIN).await;
    let mut systems = vec![(
        "plexus pubsub",
        Target::Plexus(plexus.http.clone()),
        Servers::Plexus(plexus),
    )];
    if let Some(nats) = &nats {
        let (procs, urls) = start_nats(nats, dir.path()).await?;
        systems.push(("nats jetstream", Target::Nats(urls), Servers::Nats(procs)));
    }
    // Alone, plexus gets one phase a size: there is nothing to alternate with.
    let rounds = if systems.len() > 1 {
        arg("--rounds", 2).max(1)
    } else {
        1
    };
    let sync = if arg_str("--nats-sync").as_deref() == Some("always") {
        "fsync per write"
    } else {
        "default sync"
    };
    println!(
        "# pubsub benchmark: 3 nodes each on 127.0.0.1, {publishers} publishers, {consumers} consumers \
         (batches of {batch}), {seconds} s of publishing a size"
    );
    println!("{}", common::raft_timers());
    if nats.is_some() {
        println!(
            "# jetstream: file storage, 3 replicas, {sync}; durable pull consumer, explicit acks"
        );
    }
    let phase_seconds = seconds / rounds as f64;
    for size in sizes {
        let load = Load {
            publishers,
            consumers,
            size: size as usize,
            seconds: phase_seconds,
        };
        let mut samples: Vec<Sample> = systems.iter().map(|_| Sample::default()).collect();
        let mut by_round = Vec::new();
        for round in 0..rounds as usize {
            let mut line = format!("round {}:", round + 1);
            for turn in 0..systems.len() {
                let s = (turn + round) % systems.len();
                let (name, target, servers) = &systems[s];
                let topic = Topic {
                    name: format!("r{round}s{size}"),
                    batch,
                };
                create(target, &topic, consumers).await?;
                let before = match servers {
                    Servers::Plexus(p) => Some(p.raft_counters().await),
                    Servers::Nats(_) => None,
                };
                let mut sample = phase(target, &servers.pids(), &topic, &load).await;
                if let (Servers::Plexus(p), Some(before)) = (servers, before) {
                    (sample.proposals, sample.entries) = p.raft_since(before).await;
                }
                line += &format!(" {name} {:.0}/s", sample.published_rate());
                samples[s].add(sample);
            }
            by_round.push(line);
        }
        println!();
        println!(
            "{:<36} {:>9} {:>11} {:>8} {:>8} {:>6} {:>7} {:>11} {:>11}",
            format!("{size} B messages"),
            "publ./s",
            "delivered/s",
            "p50 ms",
            "p99 ms",
            "lost",
            "errors",
            "CPU µs/msg",
            "client µs/m"
        );
        for ((name, _, _), sample) in systems.iter().zip(samples.iter_mut()) {
            sample.print(name);
        }
        if let [ours, theirs] = &samples[..] {
            println!(
                "{:<36} plexus/jetstream published/s: {:.2}x, delivered/s: {:.2}x",
                "",
                ours.published_rate() / theirs.published_rate().max(f64::MIN_POSITIVE),
                ours.delivered_rate() / theirs.delivered_rate().max(f64::MIN_POSITIVE)
            );
            for line in by_round {
                println!("{:<36} {line}", "");
            }
        }
    }
    Ok(())
}
