//! task-worker: a worker of the `work-queue` plugin that runs as a plugin
//! instance on every node it is loaded on (the master–worker pattern with
//! the workers inside the cluster).
//!
//! It leases up to `batch` tasks at a time from the queue plugin on its
//! own node (`plugins.call`, a long poll of `wait_ms`), runs each, and
//! reports each result or error under the task's fencing token. Leases
//! are taken through its node, so if the node dies the queue puts them
//! back as soon as membership declares it dead; a result it sends after
//! losing a lease is refused with 409, counted as `stale`.
//!
//! The work is what a task's payload names, as `{"op": ..}`:
//! - `{"op": "sum", "args": [numbers]}`: their sum;
//! - `{"op": "words", "text": ".."}`: how many words, and how many
//!   distinct;
//! - `{"op": "hash", "text": "..", "rounds": N}`: a 64-bit FNV-1a hash of
//!   the text applied N times (up to a million), as hex: CPU work;
//! - `{"op": "fail", "error": ".."}`: fails with that error (retries and
//!   dead tasks, on purpose).
//!
//! Anything else fails with "unknown op". A plugin of your own runs your
//! work instead: this one is the loop around it.
//!
//! Config: `queue` (default `jobs`), `plugin` (the queue plugin's name,
//! default `wq`), `batch` (1..=100, default 10), `lease_ms` (default
//! 30000), `wait_ms` (the long poll, default 5000). Needs `plugins` with
//! the queue plugin in `allowed_plugins`, and `timers`.
//!
//! HTTP: `GET /stats`: leases, tasks done and failed, stale results,
//! errors, and the last error; `POST /pause` and `POST /resume`.

use plexus_sdk::plugins;
use plexus_sdk::{InitContext, Method, Pattern, Reply, Request, Response, export_pattern, timers};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The timer that starts the next lease.
const NEXT: u64 = 1;
/// After a failed lease call, wait this long before the next.
const BACKOFF_MS: u64 = 1000;
const MAX_ROUNDS: u64 = 1_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    queue: String,
    plugin: String,
    batch: u32,
    lease_ms: u64,
    wait_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            queue: "jobs".into(),
            plugin: "wq".into(),
            batch: 10,
            lease_ms: 30_000,
            wait_ms: 5000,
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Stats {
    leases: u64,
    done: u64,
    failed: u64,
    stale: u64,
    errors: u64,
    last_error: Option<String>,
}

pub struct Worker {
    settings: Settings,
    node: String,
    stats: Stats,
    /// Calls in flight: the lease, or the results of its tasks.
    in_flight: usize,
    paused: bool,
    /// The last lease failed, or found nothing without waiting: the
    /// next waits [`BACKOFF_MS`].
    wait_first: bool,
}

/// What one task came to: a result, or an error to report.
pub fn run(payload: &Value) -> Result<Value, String> {
    match payload["op"].as_str() {
        Some("sum") => {
            let args = payload["args"]
                .as_array()
                .ok_or("sum needs `args`, a list")?;
            let mut sum = 0f64;
            for a in args {
                sum += a.as_f64().ok_or("sum adds numbers only")?;
            }
            Ok(json!({ "sum": sum }))
        }
        Some("words") => {
            let text = payload["text"].as_str().ok_or("words needs `text`")?;
            let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
            let mut distinct = words.clone();
            distinct.sort();
            distinct.dedup();
            Ok(json!({ "words": words.len(), "distinct": distinct.len() }))
        }
        Some("hash") => {
            let text = payload["text"].as_str().ok_or("hash needs `text`")?;
            let rounds = payload["rounds"].as_u64().unwrap_or(1);
            if rounds == 0 || rounds > MAX_ROUNDS {
                return Err(format!("rounds must be 1 to {MAX_ROUNDS}"));
            }
            let mut h = fnv1a(text.as_bytes());
            for _ in 1..rounds {
                h = fnv1a(&h.to_le_bytes());
            }
            Ok(json!({ "hash": format!("{h:016x}") }))
        }
        Some("fail") => Err(payload["error"].as_str().unwrap_or("failed").to_string()),
        Some(op) => Err(format!("unknown op `{op}`")),
        None => Err("the payload names no `op`".into()),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Worker {
    fn error(&mut self, what: String) {
        self.stats.errors += 1;
        self.stats.last_error = Some(what);
    }

    /// A call to the queue plugin; `then` gets its response.
    fn call(
        &mut self,
        path: String,
        body: Vec<u8>,
        timeout_ms: u64,
        then: impl FnOnce(&mut Worker, Result<Response, String>) + 'static,
    ) -> bool {
        let mut req = plugins::request(Method::Post, &path, body);
        if let Some((p, q)) = path.split_once('?') {
            req.path = p.to_string();
            req.query = q.to_string();
        }
        let plugin = self.settings.plugin.clone();
        let timeout = u32::try_from(timeout_ms).unwrap_or(u32::MAX);
        let sent = plugins::call(
            self,
            &plugin,
            None,
            req,
            timeout,
            move |w: &mut Worker, r| {
                w.in_flight -= 1;
                then(w, r.map_err(|e| format!("{path}: {e:?}")));
                w.next();
                Response::new(204, "text/plain", Vec::new())
            },
        );
        match sent {
            Ok(_) => {
                self.in_flight += 1;
                true
            }
            Err(e) => {
                self.error(format!("calling {}: {e:?}", self.settings.plugin));
                false
            }
        }
    }

    /// Leases the next batch once everything of the last is reported;
    /// after a lease that failed or found nothing at once, not before
    /// [`BACKOFF_MS`].
    fn next(&mut self) {
        if self.in_flight == 0 && !self.paused {
            let delay = if self.wait_first { BACKOFF_MS } else { 0 };
            timers::set(NEXT, delay);
        }
    }

    fn lease(&mut self) {
        let s = &self.settings;
        let path = format!(
            "/queues/{}/lease?worker=task-worker@{}&max={}&lease_ms={}&wait_ms={}",
            s.queue, self.node, s.batch, s.lease_ms, s.wait_ms
        );
        let timeout = s.wait_ms + 10_000;
        let sent = self.call(path, Vec::new(), timeout, |w, r| {
            w.wait_first = true;
            let tasks = match r {
                Ok(r) if r.status == 204 => Ok(Vec::new()),
                Ok(r) if r.status == 200 => serde_json::from_slice::<Vec<Value>>(&r.body)
                    .map_err(|e| format!("a lease answered {e}")),
                Ok(r) => Err(format!(
                    "a lease answered {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                )),
                Err(e) => Err(e),
            };
            match tasks {
                Ok(tasks) => {
                    w.wait_first = tasks.is_empty() && w.settings.wait_ms == 0;
                    w.stats.leases += u64::from(!tasks.is_empty());
                    tasks.iter().for_each(|t| w.work(t));
                }
                Err(e) => w.error(e),
            }
        });
        if !sent {
            self.wait_first = true;
            timers::set(NEXT, BACKOFF_MS);
        }
    }

    /// Runs one leased task and reports how it went.
    fn work(&mut self, task: &Value) {
        let (Some(id), Some(token)) = (task["id"].as_str(), task["token"].as_u64()) else {
            return self.error(format!("a leased task without id or token: {task}"));
        };
        let (path, body, ok) = match run(&task["payload"]) {
            Ok(result) => (
                format!("/tasks/{id}/complete?token={token}"),
                result.to_string(),
                true,
            ),
            Err(error) => (format!("/tasks/{id}/fail?token={token}"), error, false),
        };
        self.call(path, body.into_bytes(), 10_000, move |w, r| match r {
            Ok(r) if r.status == 200 && ok => w.stats.done += 1,
            Ok(r) if r.status == 200 => w.stats.failed += 1,
            Ok(r) if r.status == 409 => w.stats.stale += 1,
            Ok(r) => w.error(format!(
                "a report answered {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )),
            Err(e) => w.error(e),
        });
    }
}

impl Pattern for Worker {
    type Command = ();
    type Output = ();

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        if !(1..=100).contains(&settings.batch) || settings.wait_ms > 60_000 {
            return Err("config.batch must be 1..=100 and config.wait_ms at most 60000".into());
        }
        timers::set(NEXT, 0);
        Ok(Worker {
            settings,
            node: ctx.node,
            stats: Stats::default(),
            in_flight: 0,
            paused: false,
            wait_first: false,
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        match (req.method, req.path.as_str()) {
            (Method::Get, "/stats") => {
                let mut v = json!(self.stats);
                v["in_flight"] = self.in_flight.into();
                v["paused"] = self.paused.into();
                Response::json(200, &v).into()
            }
            (Method::Post, "/pause") => {
                self.paused = true;
                timers::cancel(NEXT);
                Response::json(200, &json!({ "paused": true })).into()
            }
            (Method::Post, "/resume") => {
                self.paused = false;
                self.next();
                Response::json(200, &json!({ "paused": false })).into()
            }
            _ => Response::error(404, "no such route").into(),
        }
    }

    fn apply(&mut self, _: u64, _: ()) -> Result<(), plexus_sdk::consensus::Rejected> {
        Ok(())
    }

    // The counts carry over a swap; the loop starts again by itself.
    fn snapshot(&mut self) -> Vec<u8> {
        plexus_sdk::codec::encode(&self.stats)
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        self.stats = plexus_sdk::codec::decode(&state)?;
        Ok(())
    }

    fn on_timer(&mut self, id: u64) {
        if id == NEXT && self.in_flight == 0 && !self.paused {
            self.lease();
        }
    }
}

export_pattern!(Worker);

#[cfg(test)]
mod tests;
