//! Event-store benchmark: a program that prints figures.
//!
//!     cargo bench -p plexus --bench event-store [-- --seconds 10 --rounds 2 --writers 32
//!         --size 256 --batch 1 --streams N --page 1000 --only plexus|postgres
//!         --postgres "host=127.0.0.1 port=5432 user=postgres"]
//!
//! Puts the same load on the `event-store` plugin (as `events`) of three
//! `plexus` processes on 127.0.0.1, on one `plexus` process alone (its own
//! local log, no Raft), and, with `--postgres CONNINFO`, on PostgreSQL used
//! as an event store:
//! - `--writers` clients, each on a connection of its own, append events
//!   of `--size` bytes of JSON data (`{"n": .., "pad": "xx.."}`),
//!   `--batch` events an append, one append at a time, each with the
//!   version it expects the stream to be at;
//! - by default each writer owns a stream and expects its own last
//!   version; with `--streams N` writer `w` appends to stream `w % N`, which
//!   it shares with the others: a conflict (a 409) tells it the current
//!   version, and it tries again from there. The same events go again,
//!   with the same ids, so that an append whose answer was lost (a failed
//!   connection, a leader change) is recognised as a retry by plexus.
//!
//! Plexus writers are spread over the nodes. Each phase (one system)
//! appends for `--seconds` on streams of its own; the phases alternate in
//! `--rounds` rounds, in a different order each round, so that the machine
//! speeding up or slowing down falls on every system alike. At the end of
//! each phase the events stored in its streams are counted and compared
//! with the acknowledged appends times `--batch`: fewer is a loss. The
//! report gives appends and events per second, the latency of an
//! acknowledged append (the try that succeeded), conflicts, failed
//! requests, and the CPU time per append of the servers (the nodes; the
//! postmaster and its processes) and of this load generator. Then every
//! system's global log is read from its start in pages of `--page`
//! events (plexus: `GET /all`, `$all`; PostgreSQL: by `position`), and
//! the events read per second are reported. Last, the `cqrs` plugin's
//! projection `per_stream` (a document per stream, fed from `$all`) is
//! rebuilt on each plexus system: a new version replays every event
//! beside the serving one, and the time until reads switch to it gives
//! the events replayed per second.
//!
//! On the PostgreSQL side the schema is the usual one for an event store:
//! `events` (a `bigserial` position, the stream, the version in it, type,
//! `jsonb` data and metadata, an id, `unique (stream, version)`) and
//! `streams` (a row per stream with its current version, as Marten keeps
//! `mt_streams`). An append is one transaction: `SELECT version FROM
//! streams WHERE stream = $1 FOR UPDATE`, compared with the expected
//! version (a mismatch rolls back and is a conflict), the stream's row
//! created or its version moved on, and the events inserted in one
//! statement. The row lock orders appends to a stream; a unique violation
//! (two writers creating a stream at once) is a conflict too. The server
//! should run with `synchronous_commit = on` and `fsync = on`, so that a
//! commit is on disk before it is acknowledged, as a plexus append is in
//! a majority's Raft log (or the local log of a node alone); the report
//! prints what the server says of both. The database must not have tables
//! `events` or `streams` yet.
//!
//! `--only plexus` or `--only postgres` runs the phases of one side.
//! `PLEXUS_BIN=path` runs that `plexus` binary instead of this build's.
//! `host/benches/event-store-vs-postgres.sh [ARGS]` starts a PostgreSQL
//! server of its own (installing it when missing) and runs this with
//! `--postgres`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

mod common;

use common::{Conn, Errors, Meter, Plexus, Usage, arg, arg_str, percentile};

const PLUGIN: &str = "[[plugins]]\nname = \"events\"\ncomponent = \"bundled:event-store\"\n\
                      capabilities = [\"consensus\", \"storage\", \"timers\", \"plugins\"]\n\
                      limits = { mailbox = 4096 }\n\
                      [[plugins]]\nname = \"proj\"\ncomponent = \"bundled:cqrs\"\n\
                      capabilities = [\"consensus\", \"storage\", \"timers\", \"plugins\", \"log\"]\n\
                      allowed_plugins = [\"events\"]\n\
                      config = { store = \"events\", projections = { per_stream = { key = \"$stream\", \
                      on = { bench = { add = { events = 1, n = \"$.n\" } } } } } }\n";

/// Where the plugin answers.
const BASE: &str = "/v1/plugins/events";

/// The PostgreSQL schema.
const SCHEMA: &str = "
CREATE TABLE streams (
    stream text PRIMARY KEY,
    version bigint NOT NULL
);
CREATE TABLE events (
    position bigserial PRIMARY KEY,
    stream text NOT NULL,
    version bigint NOT NULL,
    type text NOT NULL,
    data jsonb NOT NULL,
    metadata jsonb,
    id text NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, version)
);";

/// The load of one phase.
#[derive(Clone, Copy)]
struct Load {
    writers: usize,
    /// Bytes of an event's data, as JSON text.
    size: usize,
    /// Events an append.
    batch: usize,
    /// Streams the writers share; `None`: each writer its own.
    streams: Option<usize>,
    seconds: f64,
}

impl Load {
    /// The streams of a phase named `tag`, and the one writer `w`
    /// appends to.
    fn streams(&self, tag: &str) -> Vec<String> {
        let n = self.streams.unwrap_or(self.writers).max(1);
        (0..n).map(|s| format!("{tag}-s{s}")).collect()
    }

    fn stream_of(&self, tag: &str, w: usize) -> String {
        let n = self.streams.unwrap_or(self.writers).max(1);
        format!("{tag}-s{}", w % n)
    }
}

/// An event of the load: its id and its data.
struct Event {
    id: String,
    data: serde_json::Value,
}

/// The data of event `n`: `{"n":n,"pad":"xx.."}`, `size` bytes as compact
/// JSON (more when `size` is too small for the number).
fn event_data(n: u64, size: usize) -> serde_json::Value {
    // `{"n":` + digits + `,"pad":"` + `"}`
    let frame = 15 + n.to_string().len();
    serde_json::json!({ "n": n, "pad": "x".repeat(size.saturating_sub(frame)) })
}

/// An id in the form of a UUID, unique to the phase, the writer and the
/// event.
fn event_id(phase: u64, writer: usize, n: u64) -> String {
    let v = (u128::from(phase) << 96) | ((writer as u128) << 64) | u128::from(n);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Where the writers of a system connect.
#[derive(Clone)]
enum Target {
    Plexus(Vec<SocketAddr>),
    Postgres(String),
}

/// What an append came to.
enum Appended {
    /// Stored; the stream's last version now.
    Yes(u64),
    /// The stream was not at the expected version; where it is.
    Conflict(Option<u64>),
}

/// A writer's connection.
enum Writer {
    Plexus(Conn),
    Postgres(Box<Pg>),
}

/// A PostgreSQL connection with the statements of an append prepared.
struct Pg {
    client: Client,
    lock: Statement,
    create: Statement,
    bump: Statement,
    insert: Statement,
}

/// A 409's body.
#[derive(Deserialize)]
struct Conflict {
    current: Option<u64>,
}

/// A 200's body.
#[derive(Deserialize)]
struct Written {
    version: u64,
}

impl Writer {
    async fn open(target: &Target, w: usize) -> anyhow::Result<Writer> {
        Ok(match target {
            Target::Plexus(http) => Writer::Plexus(Conn::open(http[w % http.len()]).await?),
            Target::Postgres(conninfo) => {
                let client = pg_connect(conninfo).await?;
                let lock = client
                    .prepare("SELECT version FROM streams WHERE stream = $1 FOR UPDATE")
                    .await?;
                let create = client
                    .prepare("INSERT INTO streams (stream, version) VALUES ($1, $2)")
                    .await?;
                let bump = client
                    .prepare("UPDATE streams SET version = $2 WHERE stream = $1")
                    .await?;
                let insert = client
                    .prepare(
                        "INSERT INTO events (stream, version, type, data, id) \
                         SELECT $1, $2 + e.i - 1, e.type, e.data, e.id \
                         FROM unnest($3::text[], $4::jsonb[], $5::text[]) \
                         WITH ORDINALITY AS e(type, data, id, i)",
                    )
                    .await?;
                Writer::Postgres(Box::new(Pg {
                    client,
                    lock,
                    create,
                    bump,
                    insert,
                }))
            }
        })
    }

    /// Appends `events` to `stream` if its last version is `expected`
    /// (`None`: it has no events). An error leaves the outcome unknown.
    async fn append(
        &mut self,
        stream: &str,
        expected: Option<u64>,
        events: &[Event],
    ) -> anyhow::Result<Appended> {
        match self {
            Writer::Plexus(conn) => {
                let expected = expected.map_or("no_stream".to_string(), |v| v.to_string());
                let path = format!("{BASE}/streams/{stream}?expected_version={expected}");
                let list: Vec<serde_json::Value> = events
                    .iter()
                    .map(|e| serde_json::json!({ "type": "bench", "data": e.data, "id": e.id }))
                    .collect();
                let body = serde_json::to_vec(&list)?;
                match conn.send("POST", &path, &body).await? {
                    200 => Ok(Appended::Yes(
                        serde_json::from_slice::<Written>(conn.body())?.version,
                    )),
                    409 => Ok(Appended::Conflict(
                        serde_json::from_slice::<Conflict>(conn.body())?.current,
                    )),
                    status => {
                        let body = conn.body();
                        anyhow::bail!(
                            "append: {status} {}",
                            String::from_utf8_lossy(&body[..body.len().min(60)])
                        )
                    }
                }
            }
            Writer::Postgres(pg) => pg.append(stream, expected, events).await,
        }
    }
}

impl Pg {
    async fn append(
        &mut self,
        stream: &str,
        expected: Option<u64>,
        events: &[Event],
    ) -> anyhow::Result<Appended> {
        let version = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let first = expected.map_or(0, |v| version(v) + 1);
        let last = first + events.len() as i64 - 1;
        let tx = self.client.transaction().await?;
        let current = tx
            .query_opt(&self.lock, &[&stream])
            .await?
            .map(|row| row.get::<_, i64>(0));
        if current != expected.map(version) {
            tx.rollback().await?;
            return Ok(Appended::Conflict(
                current.and_then(|v| u64::try_from(v).ok()),
            ));
        }
        let moved = match current {
            None => tx.execute(&self.create, &[&stream, &last]).await,
            Some(_) => tx.execute(&self.bump, &[&stream, &last]).await,
        };
        let inserted = match moved {
            Ok(_) => {
                let types: Vec<&str> = events.iter().map(|_| "bench").collect();
                let data: Vec<&serde_json::Value> = events.iter().map(|e| &e.data).collect();
                let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
                tx.execute(&self.insert, &[&stream, &first, &types, &data, &ids])
                    .await
            }
            Err(e) => Err(e),
        };
        match inserted {
            Ok(_) => {
                tx.commit().await?;
                Ok(Appended::Yes(u64::try_from(last)?))
            }
            // Another writer created the stream first: the next try reads
            // where it is.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tx.rollback().await?;
                Ok(Appended::Conflict(None))
            }
            Err(e) => Err(e.into()),
        }
    }
}

async fn pg_connect(conninfo: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL with {conninfo:?}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// What one writer did in a phase.
#[derive(Default)]
struct Wrote {
    appends: u64,
    /// Latencies of acknowledged appends, ms.
    latencies: Vec<f64>,
    conflicts: u64,
}

/// Appends to `stream` until `stop`, one append at a time.
async fn writer(
    (target, w, phase): (Target, usize, u64),
    mut conn: Option<Writer>,
    stream: String,
    load: Load,
    stop: Arc<AtomicBool>,
    errors: Errors,
) -> Wrote {
    let mut wrote = Wrote::default();
    let mut expected = None;
    let mut n = 0u64;
    // The append being made, kept with its ids until it is acknowledged.
    let mut pending: Vec<Event> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            match Writer::open(&target, w).await {
                Ok(opened) => conn = Some(opened),
                Err(e) => {
                    errors.note(format_args!("connect: {e:#}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(open) = conn.as_mut() else {
            continue;
        };
        if pending.is_empty() {
            pending = (0..load.batch)
                .map(|_| {
                    n += 1;
                    Event {
                        id: event_id(phase, w, n),
                        data: event_data(n, load.size),
                    }
                })
                .collect();
        }
        let at = Instant::now();
        match open.append(&stream, expected, &pending).await {
            Ok(Appended::Yes(version)) => {
                wrote.appends += 1;
                wrote.latencies.push(at.elapsed().as_secs_f64() * 1e3);
                expected = Some(version);
                pending.clear();
            }
            Ok(Appended::Conflict(current)) => {
                wrote.conflicts += 1;
                expected = current;
            }
            Err(e) => {
                errors.note(format_args!("{e:#}"));
                conn = None;
                // An election answers 421 or 503 for a while.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    wrote
}

/// What the phases of one system measured, kept raw so that they can be
/// added up.
#[derive(Default)]
struct Sample {
    appends: u64,
    /// Events an append.
    batch: u64,
    elapsed: Duration,
    latencies: Vec<f64>,
    conflicts: u64,
    errors: BTreeMap<String, u64>,
    /// Events found in the phase's streams afterwards.
    stored: u64,
    usage: Usage,
    /// Proposals the plexus leaders took, and the log entries they wrote
    /// them in.
    proposals: u64,
    entries: u64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.appends as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn acked_events(&self) -> u64 {
        self.appends * self.batch
    }

    fn add(&mut self, other: Sample) {
        self.appends += other.appends;
        self.batch = other.batch;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.conflicts += other.conflicts;
        for (what, n) in other.errors {
            *self.errors.entry(what).or_default() += n;
        }
        self.stored += other.stored;
        self.usage.add(other.usage);
        self.proposals += other.proposals;
        self.entries += other.entries;
    }

    /// Whether the events stored are those acknowledged, as a phrase.
    fn verdict(&self) -> String {
        let acked = self.acked_events();
        match self.stored.cmp(&acked) {
            std::cmp::Ordering::Equal => format!("{} events stored, as acknowledged", self.stored),
            std::cmp::Ordering::Less => format!(
                "{} events stored of {acked} acknowledged: {} LOST",
                self.stored,
                acked - self.stored
            ),
            std::cmp::Ordering::Greater => format!(
                "{} events stored of {acked} acknowledged: {} more (unknown outcomes)",
                self.stored,
                self.stored - acked
            ),
        }
    }

    fn print(&mut self, label: &str) {
        self.latencies.sort_by(|a, b| a.total_cmp(b));
        let per_append = |cpu: Duration| cpu.as_secs_f64() * 1e6 / self.appends.max(1) as f64;
        println!(
            "{label:<28} {:>9.0} {:>9.0} {:>8.2} {:>8.2} {:>9} {:>7} {:>11.0} {:>11.0}",
            self.rate(),
            self.rate() * self.batch as f64,
            percentile(&self.latencies, 0.5),
            percentile(&self.latencies, 0.99),
            self.conflicts,
            self.errors.values().sum::<u64>(),
            per_append(self.usage.servers),
            per_append(self.usage.client)
        );
        println!("{:<28} {}", "", self.verdict());
        println!("{:<28} {}", "", self.usage.describe());
        for (what, n) in &self.errors {
            println!("{:<28} {n} failed: {what}", "");
        }
        if self.entries > 0 {
            println!(
                "{:<28} {} proposals in {} log entries ({:.1} per entry)",
                "",
                self.proposals,
                self.entries,
                self.proposals as f64 / self.entries as f64
            );
        }
    }
}

/// Runs one phase on `target` (servers `pids`, found once the writers'
/// connections are open) on the streams named `tag`.
async fn phase(
    target: &Target,
    pids: impl FnOnce() -> Vec<u32>,
    (tag, number): (&str, u64),
    load: Load,
) -> anyhow::Result<Sample> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Errors::default();
    // Connections first: a PostgreSQL backend is a process of its own,
    // which the meter counts only if it is there when it starts.
    let mut conns = Vec::new();
    for w in 0..load.writers {
        conns.push(Writer::open(target, w).await?);
    }
    let meter = Meter::start(&pids());
    let started = Instant::now();
    let writers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, conn)| {
            tokio::spawn(writer(
                (target.clone(), w, number),
                Some(conn),
                load.stream_of(tag, w),
                load,
                stop.clone(),
                errors.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(load.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sample = Sample {
        batch: load.batch as u64,
        ..Sample::default()
    };
    for w in writers {
        let wrote = w.await.unwrap_or_default();
        sample.appends += wrote.appends;
        sample.latencies.extend(wrote.latencies);
        sample.conflicts += wrote.conflicts;
    }
    sample.elapsed = started.elapsed();
    sample.usage = meter.stop();
    sample.errors = errors.counts();
    Ok(sample)
}

/// One event as a read of `$all` answers it.
#[derive(Deserialize)]
#[allow(dead_code)] // Read to be decoded, as a client of the log would.
struct Read {
    position: u64,
    stream: String,
    version: u64,
    #[serde(rename = "type")]
    kind: String,
    data: serde_json::Value,
}

/// A page of `$all`.
#[derive(Deserialize)]
struct Page {
    events: Vec<Read>,
    next: Option<u64>,
    head: u64,
}

/// The body of a 200 to `GET path`, asked again through an election for
/// up to 30 s; `None` for a 404.
async fn get(conn: &mut Conn, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match conn.send("GET", path, b"").await? {
            200 => return Ok(Some(conn.body().to_vec())),
            404 => return Ok(None),
            status => {
                let body = String::from_utf8_lossy(conn.body()).into_owned();
                anyhow::ensure!(Instant::now() < deadline, "GET {path}: {status} {body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The events stored in `streams` on the node `addr`: each stream's last
/// version and one.
async fn stored_plexus(addr: SocketAddr, streams: &[String]) -> anyhow::Result<u64> {
    #[derive(Deserialize)]
    struct Last {
        events: Vec<Read>,
    }
    let mut conn = Conn::open(addr).await?;
    let mut stored = 0;
    for stream in streams {
        let path = format!("{BASE}/streams/{stream}?direction=backward&max=1");
        if let Some(body) = get(&mut conn, &path).await? {
            let last: Last = serde_json::from_slice(&body)?;
            stored += last.events.first().map_or(0, |e| e.version + 1);
        }
    }
    Ok(stored)
}

/// The events stored in `streams` in PostgreSQL.
async fn stored_postgres(client: &Client, streams: &[String]) -> anyhow::Result<u64> {
    let row = client
        .query_one(
            "SELECT count(*) FROM events WHERE stream = ANY($1)",
            &[&streams],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0))?)
}

/// Reads `$all` of the node `addr` from position 1 to its head in pages
/// of `page`; the events read and how long it took.
async fn replay_plexus(addr: SocketAddr, page: u64) -> anyhow::Result<(u64, Duration)> {
    let mut conn = Conn::open(addr).await?;
    let started = Instant::now();
    let (mut from, mut read) = (1u64, 0u64);
    loop {
        let path = format!("{BASE}/all?from={from}&max={page}");
        let body = get(&mut conn, &path)
            .await?
            .context("GET /all answered 404")?;
        let page: Page = serde_json::from_slice(&body)?;
        read += page.events.len() as u64;
        match page.next {
            Some(next) if next > from && next <= page.head => from = next,
            _ => break,
        }
    }
    Ok((read, started.elapsed()))
}

/// Rebuilds the `cqrs` projection `per_stream` (a document per stream:
/// its events and the sum of their `n`) on node `addr`: asks for a new
/// version and waits until reads have switched to it; the events it
/// replayed (the head of `$all`) and how long it took.
async fn rebuild_plexus(addr: SocketAddr) -> anyhow::Result<(u64, Duration)> {
    let mut conn = Conn::open(addr).await?;
    let head: Page = serde_json::from_slice(
        &get(&mut conn, &format!("{BASE}/all?max=1"))
            .await?
            .context("GET /all answered 404")?,
    )?;
    let started = Instant::now();
    let status = conn
        .send(
            "POST",
            "/v1/plugins/proj/projections/per_stream/rebuild",
            b"",
        )
        .await?;
    anyhow::ensure!(status == 200, "rebuild: {status}");
    let version = serde_json::from_slice::<serde_json::Value>(conn.body())?["version"]
        .as_u64()
        .context("rebuild answered no version")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status: serde_json::Value = serde_json::from_slice(
            &get(&mut conn, "/v1/plugins/proj/projections")
                .await?
                .context("no projections")?,
        )?;
        if status["per_stream"]["active"].as_u64() == Some(version) {
            return Ok((head.head, started.elapsed()));
        }
        anyhow::ensure!(Instant::now() < deadline, "the rebuild never switched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads every event in PostgreSQL by position in pages of `page`; the
/// events read and how long it took.
async fn replay_postgres(client: &Client, page: u64) -> anyhow::Result<(u64, Duration)> {
    let select = client
        .prepare(
            "SELECT position, stream, version, type, data FROM events \
             WHERE position > $1 ORDER BY position LIMIT $2",
        )
        .await?;
    let limit = i64::try_from(page)?;
    let started = Instant::now();
    let (mut after, mut read) = (0i64, 0u64);
    loop {
        let rows = client.query(&select, &[&after, &limit]).await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.get(0);
        for row in &rows {
            let event = Read {
                position: u64::try_from(row.get::<_, i64>(0))?,
                stream: row.get(1),
                version: u64::try_from(row.get::<_, i64>(2))?,
                kind: row.get(3),
                data: row.get(4),
            };
            std::hint::black_box(event);
        }
        read += rows.len() as u64;
    }
    Ok((read, started.elapsed()))
}

/// The PostgreSQL server of the run: a connection for setting up,
/// counting and reading, and the postmaster's pid when it runs on this
/// machine.
struct Postgres {
    conninfo: String,
    client: Client,
    postmaster: Option<u32>,
}

impl Postgres {
    async fn open(conninfo: &str) -> anyhow::Result<Postgres> {
        let client = pg_connect(conninfo).await?;
        client.batch_execute(SCHEMA).await.context(
            "creating the tables `events` and `streams` (the database must not have them yet)",
        )?;
        let backend: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        // The server may be on another machine, where the pid means
        // nothing here.
        let postmaster = u32::try_from(backend)
            .ok()
            .filter(|pid| is_postgres(*pid))
            .and_then(parent)
            .filter(|pid| is_postgres(*pid));
        Ok(Postgres {
            conninfo: conninfo.to_string(),
            client,
            postmaster,
        })
    }

    /// The server's version and durability settings, as a report line.
    async fn describe(&self) -> anyhow::Result<String> {
        let mut settings = Vec::new();
        for name in [
            "server_version",
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
        ] {
            let row = self.client.query_one(&format!("SHOW {name}"), &[]).await?;
            settings.push(format!("{name}={}", row.get::<_, String>(0)));
        }
        Ok(settings.join(" "))
    }

    /// The postmaster and every process it started (backends, WAL
    /// writer, checkpointer, ...).
    fn pids(&self) -> Vec<u32> {
        let Some(postmaster) = self.postmaster else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        if let Ok(dir) = std::fs::read_dir("/proc") {
            pids.extend(
                dir.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|pid| parent(*pid) == Some(postmaster)),
            );
        }
        pids
    }
}

/// Whether process `pid` here is a PostgreSQL server process.
fn is_postgres(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres")
}

/// The parent of process `pid`, from `/proc`.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The field after the state, which follows the parenthesised name.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// One of the systems a phase runs on.
#[derive(Clone, Copy, PartialEq)]
enum System {
    Plexus3,
    Plexus1,
    Postgres,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Plexus3 => "plexus, 3 nodes",
            System::Plexus1 => "plexus, 1 node",
            System::Postgres => "postgresql",
        }
    }

    /// A short name for stream names.
    fn tag(self) -> &'static str {
        match self {
            System::Plexus3 => "three",
            System::Plexus1 => "one",
            System::Postgres => "pg",
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let load = Load {
        writers: arg("--writers", 32).max(1) as usize,
        size: arg("--size", 256) as usize,
        batch: arg("--batch", 1).max(1) as usize,
        streams: arg_str("--streams").and_then(|s| s.parse().ok()),
        seconds: arg("--seconds", 10) as f64,
    };
    let rounds = arg("--rounds", 2).max(1) as usize;
    let page = arg("--page", 1000).max(1);
    let only = arg_str("--only");
    let conninfo = arg_str("--postgres");
    let (with_plexus, with_postgres) = match only.as_deref() {
        None => (true, conninfo.is_some()),
        Some("plexus") => (true, false),
        Some("postgres") => (false, true),
        Some(other) => anyhow::bail!("no --only {other:?}: plexus or postgres"),
    };
    anyhow::ensure!(
        !with_postgres || conninfo.is_some(),
        "--only postgres needs --postgres CONNINFO: host/benches/event-store-vs-postgres.sh starts a server and passes it"
    );
    let mut systems = Vec::new();
    if with_plexus {
        systems.extend([System::Plexus3, System::Plexus1]);
    }
    if with_postgres {
        systems.push(System::Postgres);
    }

    let dir = tempfile::tempdir()?;
    let (mut three, mut one) = (None, None);
    if with_plexus {
        let sub = dir.path().join("three");
        std::fs::create_dir(&sub)?;
        three = Some(Plexus::start_nodes(&sub, 3, PLUGIN).await);
        let sub = dir.path().join("one");
        std::fs::create_dir(&sub)?;
        one = Some(Plexus::start_nodes(&sub, 1, PLUGIN).await);
    }
    let postgres = match &conninfo {
        Some(conninfo) if with_postgres => Some(Postgres::open(conninfo).await?),
        _ => None,
    };

    let sharing = match load.streams {
        Some(n) => format!("{n} streams shared"),
        None => "a stream each".into(),
    };
    println!(
        "# event-store benchmark: {} writers ({sharing}), {} B events, {} an append, \
         {} s a phase, {rounds} rounds",
        load.writers, load.size, load.batch, load.seconds
    );
    if three.is_some() {
        println!("{}", common::raft_timers());
    }
    if let Some(pg) = &postgres {
        println!(
            "# postgresql: {}; streams row locked FOR UPDATE, events inserted, one transaction an append",
            pg.describe().await?
        );
    }

    let mut samples: Vec<Sample> = systems.iter().map(|_| Sample::default()).collect();
    let mut by_round = Vec::new();
    let mut number = 0;
    for round in 0..rounds {
        let mut line = format!("round {}:", round + 1);
        for turn in 0..systems.len() {
            let s = (turn + round) % systems.len();
            let system = systems[s];
            let tag = format!("r{}-{}", round + 1, system.tag());
            let streams = load.streams(&tag);
            number += 1;
            let sample = match (system, &three, &one, &postgres) {
                (System::Plexus3, Some(p), _, _) | (System::Plexus1, _, Some(p), _) => {
                    let target = Target::Plexus(p.http.clone());
                    let before = p.raft_counters().await;
                    let mut sample =
                        phase(&target, || p.procs.pids(), (&tag, number), load).await?;
                    (sample.proposals, sample.entries) = p.raft_since(before).await;
                    let leader = p.leader(&vec![true; p.http.len()]).await;
                    sample.stored = stored_plexus(p.http[leader], &streams).await?;
                    sample
                }
                (System::Postgres, _, _, Some(pg)) => {
                    let target = Target::Postgres(pg.conninfo.clone());
                    let mut sample = phase(&target, || pg.pids(), (&tag, number), load).await?;
                    sample.stored = stored_postgres(&pg.client, &streams).await?;
                    sample
                }
                _ => continue,
            };
            println!(
                "round {} {}: {:.0} appends/s; {}",
                round + 1,
                system.label(),
                sample.rate(),
                sample.verdict()
            );
            line += &format!(" {} {:.0}/s", system.label(), sample.rate());
            samples[s].add(sample);
        }
        by_round.push(line);
    }

    println!();
    println!(
        "{:<28} {:>9} {:>9} {:>8} {:>8} {:>9} {:>7} {:>11} {:>11}",
        "appends",
        "appends/s",
        "events/s",
        "p50 ms",
        "p99 ms",
        "conflicts",
        "errors",
        "server µs/a",
        "client µs/a"
    );
    for (system, sample) in systems.iter().zip(samples.iter_mut()) {
        sample.print(system.label());
    }
    let rate = |system: System| {
        systems
            .iter()
            .position(|s| *s == system)
            .map(|i| samples[i].rate())
    };
    if let Some(theirs) = rate(System::Postgres) {
        for ours in [System::Plexus3, System::Plexus1] {
            if let Some(rate) = rate(ours) {
                println!(
                    "{:<28} {} / postgresql, appends/s: {:.2}x",
                    "",
                    ours.label(),
                    rate / theirs.max(f64::MIN_POSITIVE)
                );
            }
        }
    }
    if systems.len() > 1 {
        for line in by_round {
            println!("{:<28} {line}", "");
        }
    }

    println!();
    println!(
        "{:<28} {:>9} {:>9}",
        format!("replay, pages of {page}"),
        "events/s",
        "read"
    );
    for (system, sample) in systems.iter().zip(&samples) {
        let (read, took) = match (system, &three, &one, &postgres) {
            (System::Plexus3, Some(p), _, _) | (System::Plexus1, _, Some(p), _) => {
                replay_plexus(p.http[0], page).await?
            }
            (System::Postgres, _, _, Some(pg)) => replay_postgres(&pg.client, page).await?,
            _ => continue,
        };
        let check = if read == sample.stored {
            "every event stored".to_string()
        } else {
            format!("of {} stored", sample.stored)
        };
        println!(
            "{:<28} {:>9.0} {:>9} {check}",
            system.label(),
            read as f64 / took.as_secs_f64().max(1e-9),
            read
        );
    }

    println!();
    println!(
        "{:<28} {:>9} {:>9}",
        "projection rebuild (cqrs)", "events/s", "replayed"
    );
    for system in &systems {
        let node = match (system, &three, &one) {
            (System::Plexus3, Some(p), _) | (System::Plexus1, _, Some(p)) => p.http[0],
            _ => continue,
        };
        let (replayed, took) = rebuild_plexus(node).await?;
        println!(
            "{:<28} {:>9.0} {:>9} batches of up to 1000, one storage commit each",
            system.label(),
            replayed as f64 / took.as_secs_f64().max(1e-9),
            replayed
        );
    }
    Ok(())
}
