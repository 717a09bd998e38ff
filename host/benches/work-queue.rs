//! Work-queue benchmark: a program that prints figures.
//!
//!     cargo bench -p plexus --bench work-queue [-- --tasks 20000 --workers 4
//!         --submitters 4 --submit-batch 500 --modes first,concurrent --rounds 1
//!         --redis PATH --rq-python PATH [--redis-fsync]]
//!
//! Starts three `plexus` processes on 127.0.0.1 with the `work-queue`
//! plugin (as `wq`) and runs `--tasks` no-op tasks through it on
//! `--workers` workers: each worker is a client on a keep-alive HTTP
//! connection of its own that leases a task, and completes it with its
//! fencing token, one task at a time, taking the next lease with the
//! completion (`complete?next=QUEUE`, one log entry for both); workers and `--submitters` are
//! spread over the three nodes. A submitter sends lists of
//! `--submit-batch` tasks, each list one request and one log entry, as
//! RQ's side submits 500 jobs to a Redis pipeline with `enqueue_many`. With `--redis PATH` (a `redis-server`)
//! and `--rq-python PATH` (a Python with RQ installed) it runs the same
//! tasks on RQ in the same run, through `host/benches/rq_bench.py`: as
//! many standard `rq worker` processes, once with RQ's default `Worker`
//! (which forks a work horse per job) and once with its `SimpleWorker`
//! (which runs the job in the worker itself).
//!
//! Two modes: `first` submits every task before the workers start;
//! `concurrent` starts the workers and submits while they work. For each
//! it prints tasks per second from the first submit to the last task
//! done, and the queue-to-start latency: for plexus, from the instant a
//! task's submit was sent to the instant a worker's lease of it answered;
//! for RQ, from a job's `enqueued_at` to its `started_at`. And the CPU
//! time (user and system, from `/proc`) per task of the servers (the
//! three nodes; Redis) and of the clients (this program's submitters and
//! workers; RQ's driver, workers and the work horses they fork), and how
//! much of the machine was idle. The systems' phases alternate in
//! `--rounds` rounds, in a different order each round.
//!
//! Redis runs with its defaults (snapshots now and then, no append-only
//! file); with `--redis-fsync` it appends every write to its log and
//! fsyncs it before answering, as each plexus node does with its Raft log.
//!
//! `PLEXUS_BIN=path` runs that `plexus` binary instead of this build's.
//! `host/benches/work-queue-vs-rq.sh [ARGS]` installs Redis and RQ when
//! missing and runs this with `--redis` and `--rq-python`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

mod common;

use common::{Conn, Errors, Meter, Plexus, Procs, Usage, arg, arg_str, free_port, percentile};

/// How long the workers go on without a task done before they give up.
const STALL: Duration = Duration::from_secs(30);

const PLUGIN: &str = "[[plugins]]\nname = \"wq\"\ncomponent = \"bundled:work-queue\"\n\
                      capabilities = [\"consensus\", \"storage\", \"timers\"]\n\
                      limits = { mailbox = 4096 }\n";

/// What the phases of one system and mode measured.
#[derive(Default)]
struct Sample {
    tasks: u64,
    /// From the first submit to the last task done.
    elapsed: Duration,
    /// Queue-to-start latencies, ms.
    latencies: Vec<f64>,
    /// Requests that failed (plexus), jobs that did not finish (RQ).
    /// Failed requests (plexus) by what they said; jobs that did not
    /// finish (RQ).
    errors: BTreeMap<String, u64>,
    usage: Usage,
    /// Proposals the plexus leaders took, and the Raft entries they
    /// wrote them in.
    proposals: u64,
    entries: u64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.tasks as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn add(&mut self, other: Sample) {
        self.tasks += other.tasks;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        for (what, n) in other.errors {
            *self.errors.entry(what).or_default() += n;
        }
        self.usage.add(other.usage);
        self.proposals += other.proposals;
        self.entries += other.entries;
    }

    fn print(&mut self, label: &str) {
        self.latencies.sort_by(|a, b| a.total_cmp(b));
        let per_task = |cpu: Duration| cpu.as_secs_f64() * 1e6 / self.tasks.max(1) as f64;
        println!(
            "{label:<36} {:>8.0} {:>9.0} {:>9.0} {:>7} {:>12.0} {:>12.0}",
            self.rate(),
            percentile(&self.latencies, 0.5),
            percentile(&self.latencies, 0.99),
            self.errors.values().sum::<u64>(),
            per_task(self.usage.servers),
            per_task(self.usage.client)
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
#[derive(Clone, Copy)]
struct Load {
    tasks: usize,
    workers: usize,
    submitters: usize,
    /// Tasks a submit request carries.
    submit_batch: usize,
    /// Submit everything before the workers start.
    first: bool,
}

#[derive(Deserialize)]
struct Submitted {
    id: String,
}

#[derive(Deserialize)]
struct Leased {
    id: String,
    token: u64,
}

/// Submits lists of up to `batch` tasks, numbered from `next`, until
/// `tasks` are; returns each task's id with the instant its submit was
/// sent.
async fn submitter(
    addr: SocketAddr,
    path: String,
    (tasks, batch): (usize, usize),
    next: Arc<AtomicUsize>,
    errors: Errors,
) -> Vec<(String, Instant)> {
    let mut sent = Vec::new();
    let mut conn = None;
    let mut n = next.fetch_add(batch, Ordering::Relaxed);
    while n < tasks {
        let Some(open) = connected(&mut conn, addr, &errors).await else {
            continue;
        };
        let list: Vec<String> = (n..tasks.min(n + batch))
            .map(|i| format!(r#"{{"payload": {{"n": {i}}}, "priority": 0, "max_attempts": 3}}"#))
            .collect();
        let body = format!("[{}]", list.join(","));
        let at = Instant::now();
        let submitted = match open.call("POST", &path, body.as_bytes()).await {
            Ok((_, body)) => serde_json::from_slice::<Vec<Submitted>>(body).map_err(Into::into),
            Err(e) => Err(e),
        };
        match submitted {
            Ok(list) => {
                sent.extend(list.into_iter().map(|s| (s.id, at)));
                n = next.fetch_add(batch, Ordering::Relaxed);
            }
            Err(e) => {
                errors.note(format_args!("submit: {e}"));
                conn = None;
            }
        }
    }
    sent
}

/// The connection in `conn`, opened to `addr` if there is none; `None`,
/// after a pause and with the failure counted, when it cannot be.
async fn connected<'a>(
    conn: &'a mut Option<Conn>,
    addr: SocketAddr,
    errors: &Errors,
) -> Option<&'a mut Conn> {
    if conn.is_none() {
        match Conn::open(addr).await {
            Ok(opened) => *conn = Some(opened),
            Err(e) => {
                errors.note(format_args!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                return None;
            }
        }
    }
    conn.as_mut()
}

/// A completion's answer: the next task, when one was ready.
#[derive(Deserialize)]
struct Next {
    next: Option<Leased>,
}

/// How far the workers of a phase got.
#[derive(Clone, Default)]
struct Progress {
    /// Tasks done.
    done: Arc<AtomicU64>,
    /// When the last was.
    last_done: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// Leases tasks of `queue` and completes them until `tasks` are done, or
/// until no worker completed one for `STALL`; returns each lease's task
/// id and the instant it answered.
async fn worker(
    addr: SocketAddr,
    queue: String,
    w: usize,
    tasks: u64,
    progress: Progress,
    errors: Errors,
    started: Instant,
) -> Vec<(String, Instant)> {
    let Progress { done, last_done } = progress;
    let lease =
        format!("/v1/plugins/wq/queues/{queue}/lease?worker=w{w}&lease_ms=30000&wait_ms=1000");
    let mut leased = Vec::new();
    let mut conn = None;
    // The task the last completion leased in the same entry, if any.
    let mut next: Option<Leased> = None;
    while done.load(Ordering::Relaxed) < tasks {
        let last = *last_done.lock().unwrap();
        if last.unwrap_or(started).elapsed() > STALL {
            errors.note("stalled: no task done for 30 s");
            break;
        }
        let Some(open) = connected(&mut conn, addr, &errors).await else {
            continue;
        };
        let task = match next.take() {
            Some(task) => Ok(task),
            None => match open.call("POST", &lease, b"").await {
                Ok((204, _)) => continue,
                Ok((_, body)) => serde_json::from_slice::<Leased>(body).map_err(Into::into),
                Err(e) => Err(e),
            },
        };
        let task = match task {
            Ok(task) => task,
            Err(e) => {
                errors.note(format_args!("lease: {e}"));
                conn = None;
                continue;
            }
        };
        leased.push((task.id.clone(), Instant::now()));
        // Completed, and the next task leased, in one request and entry.
        let complete = format!(
            "/v1/plugins/wq/tasks/{}/complete?token={}&next={queue}&worker=w{w}&lease_ms=30000",
            task.id, task.token
        );
        match open.call("POST", &complete, b"null").await {
            Ok((_, body)) => {
                done.fetch_add(1, Ordering::Relaxed);
                *last_done.lock().unwrap() = Some(Instant::now());
                next = serde_json::from_slice::<Next>(body)
                    .ok()
                    .and_then(|n| n.next);
            }
            Err(e) => {
                errors.note(format_args!("complete: {e}"));
                conn = None;
            }
        }
    }
    leased
}

/// Runs `load` through the plexus nodes `http` (pids `pids`) on `queue`.
async fn plexus_phase(http: &[SocketAddr], pids: &[u32], queue: &str, load: Load) -> Sample {
    let next = Arc::new(AtomicUsize::new(0));
    let progress = Progress::default();
    let errors = Errors::default();
    let meter = Meter::start(pids);
    let started = Instant::now();
    let submit_path = format!("/v1/plugins/wq/queues/{queue}/tasks");
    let mut submitters: Vec<_> = (0..load.submitters)
        .map(|s| {
            tokio::spawn(submitter(
                http[s % http.len()],
                submit_path.clone(),
                (load.tasks, load.submit_batch),
                next.clone(),
                errors.clone(),
            ))
        })
        .collect();
    let mut sent = HashMap::new();
    if load.first {
        for s in submitters.drain(..) {
            sent.extend(s.await.unwrap_or_default());
        }
    }
    let workers: Vec<_> = (0..load.workers)
        .map(|w| {
            tokio::spawn(worker(
                http[w % http.len()],
                queue.to_string(),
                w,
                load.tasks as u64,
                progress.clone(),
                errors.clone(),
                Instant::now(),
            ))
        })
        .collect();
    // Those still submitting (none when all came first).
    for s in submitters {
        sent.extend(s.await.unwrap_or_default());
    }
    let mut leased = Vec::new();
    for w in workers {
        leased.extend(w.await.unwrap_or_default());
    }
    let end = progress
        .last_done
        .lock()
        .unwrap()
        .unwrap_or_else(Instant::now);
    let mut latencies = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (id, at) in leased {
        // The first lease of a task is its start; a later one is a retry.
        if let Some(submitted) = sent.get(&id)
            && seen.insert(id)
        {
            latencies.push(at.saturating_duration_since(*submitted).as_secs_f64() * 1e3);
        }
    }
    Sample {
        tasks: progress.done.load(Ordering::Relaxed),
        elapsed: end - started,
        latencies,
        errors: errors.counts(),
        usage: meter.stop(),
        ..Sample::default()
    }
}

/// What `rq_bench.py` prints.
#[derive(Deserialize)]
struct RqRun {
    done: u64,
    failed: u64,
    seconds: f64,
    latencies_ms: Vec<f64>,
    driver_cpu_s: f64,
    workers_cpu_s: f64,
}

/// Runs `load` on RQ with `worker_class`, through Redis at `port` (pid
/// `redis`).
async fn rq_phase(
    python: &Path,
    port: u16,
    redis: u32,
    worker_class: &str,
    queue: &str,
    load: Load,
) -> anyhow::Result<Sample> {
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/rq_bench.py");
    let meter = Meter::start(&[redis]);
    let out = tokio::process::Command::new(python)
        .arg(driver)
        .args(["--url", &format!("redis://127.0.0.1:{port}")])
        .args(["--queue", queue])
        .args(["--tasks", &load.tasks.to_string()])
        .args(["--workers", &load.workers.to_string()])
        .args(["--worker-class", worker_class])
        .args(["--mode", if load.first { "first" } else { "concurrent" }])
        .stderr(Stdio::inherit())
        .output()
        .await?;
    let mut usage = meter.stop();
    anyhow::ensure!(out.status.success(), "rq_bench.py failed: {}", out.status);
    let run: RqRun = serde_json::from_slice(&out.stdout)?;
    // The driver, the workers and their work horses are clients of Redis.
    usage.client = Duration::from_secs_f64(run.driver_cpu_s + run.workers_cpu_s);
    Ok(Sample {
        tasks: run.done,
        elapsed: Duration::from_secs_f64(run.seconds),
        latencies: run.latencies_ms,
        errors: [("job did not finish".to_string(), run.failed)]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect(),
        usage,
        ..Sample::default()
    })
}

/// Starts a redis-server of its own on a free port in `dir`.
fn start_redis(redis: &Path, dir: &Path) -> anyhow::Result<(Procs, u16)> {
    let port = free_port();
    let mut command = Command::new(redis);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir);
    if std::env::args().any(|a| a == "--redis-fsync") {
        command.args(["--appendonly", "yes", "--appendfsync", "always"]);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let procs = Procs(vec![Some(child)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((procs, port))
}

/// One of the systems a phase runs on.
#[derive(Clone, Copy, PartialEq)]
enum System {
    Plexus,
    RqFork,
    RqSimple,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Plexus => "plexus work-queue",
            System::RqFork => "rq Worker (fork per job)",
            System::RqSimple => "rq SimpleWorker",
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let tasks = arg("--tasks", 20_000) as usize;
    let workers = arg("--workers", 4) as usize;
    let submitters = arg("--submitters", 4) as usize;
    let submit_batch = arg("--submit-batch", 500).clamp(1, 1000) as usize;
    let modes = arg_str("--modes").unwrap_or_else(|| "first,concurrent".into());
    let redis = arg_str("--redis").map(PathBuf::from);
    let python = arg_str("--rq-python").map(PathBuf::from);
    let dir = tempfile::tempdir()?;
    let plexus = Plexus::start(dir.path(), PLUGIN).await;
    let mut systems = vec![System::Plexus];
    let rq = match (&redis, &python) {
        (Some(redis), Some(python)) => {
            anyhow::ensure!(
                redis.is_file() && python.is_file(),
                "no redis-server at {} or no python at {}: run host/benches/work-queue-vs-rq.sh, which installs them",
                redis.display(),
                python.display()
            );
            systems.extend([System::RqFork, System::RqSimple]);
            Some(start_redis(redis, dir.path())?)
        }
        _ => None,
    };
    let rounds = if rq.is_some() {
        arg("--rounds", 1).max(1) as usize
    } else {
        1
    };
    println!(
        "# work-queue benchmark: 3 plexus nodes on 127.0.0.1, {tasks} no-op tasks, {workers} workers; \
         {submitters} plexus submitters, {submit_batch} tasks a request"
    );
    println!("{}", common::raft_timers());
    if rq.is_some() {
        let fsync = if std::env::args().any(|a| a == "--redis-fsync") {
            "append-only file, fsync per write"
        } else {
            "default persistence (snapshots, no append-only file)"
        };
        println!(
            "# redis: one server, {fsync}; rq jobs submitted with enqueue_many, 500 a pipeline"
        );
    }
    for mode in modes.split(',') {
        let first = match mode.trim() {
            "first" => true,
            "concurrent" => false,
            other => anyhow::bail!("no mode {other:?}: first or concurrent"),
        };
        let load = Load {
            tasks,
            workers,
            submitters,
            submit_batch,
            first,
        };
        let mut samples: Vec<Sample> = systems.iter().map(|_| Sample::default()).collect();
        let mut by_round = Vec::new();
        for round in 0..rounds {
            let mut line = format!("round {}:", round + 1);
            for turn in 0..systems.len() {
                let s = (turn + round) % systems.len();
                let queue = format!("q{round}{}{s}", mode.trim());
                let sample = match (systems[s], &rq, &python) {
                    (System::Plexus, _, _) => {
                        let before = plexus.raft_counters().await;
                        let mut sample =
                            plexus_phase(&plexus.http, &plexus.procs.pids(), &queue, load).await;
                        (sample.proposals, sample.entries) = plexus.raft_since(before).await;
                        sample
                    }
                    (system, Some((redis, port)), Some(python)) => {
                        let class = if system == System::RqFork {
                            "rq.worker.Worker"
                        } else {
                            "rq.worker.SimpleWorker"
                        };
                        rq_phase(python, *port, redis.pids()[0], class, &queue, load).await?
                    }
                    _ => continue,
                };
                line += &format!(" {} {:.0}/s", systems[s].label(), sample.rate());
                samples[s].add(sample);
            }
            by_round.push(line);
        }
        println!();
        println!(
            "{:<36} {:>8} {:>9} {:>9} {:>7} {:>12} {:>12}",
            if first {
                "submitted first"
            } else {
                "submitted while working"
            },
            "tasks/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "server µs/t",
            "client µs/t"
        );
        for (system, sample) in systems.iter().zip(samples.iter_mut()) {
            sample.print(system.label());
        }
        if samples.len() == 3 {
            let faster = samples[1].rate().max(samples[2].rate());
            println!(
                "{:<36} plexus / the faster rq, tasks/s: {:.2}x",
                "",
                samples[0].rate() / faster.max(f64::MIN_POSITIVE)
            );
            for line in by_round {
                println!("{:<36} {line}", "");
            }
        }
    }
    Ok(())
}
