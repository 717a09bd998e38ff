//! work-queue: tasks handed to workers under leases with fencing tokens,
//! on the consensus log (the master–worker pattern, as users of Celery or
//! Sidekiq run it).
//!
//! A task is submitted to a queue; a worker leases the next one (highest
//! priority, then oldest) and gets it with a fencing token. While it works
//! it sends heartbeats; a lease that runs out puts the task back, and the
//! next lease carries a higher token. A result or failure is accepted only
//! with the current token, so a worker that lost its lease cannot
//! overwrite the work of the one after it: execution is at least once,
//! acceptance of results exactly once. A failed attempt is retried after
//! a backoff (1 s, doubling to a minute) until `max_attempts`, then the
//! task is failed with its last error. Every change is a log entry, and
//! time is the proposer's clock carried in it.
//!
//! HTTP (below `/v1/plugins/<name>`):
//! - `POST /queues/{queue}/tasks` `{"payload": any JSON, "priority": 0..=9,
//!   "max_attempts": 3, "key": "an idempotency key"}`: `{"id", "duplicate"}`.
//! - `POST /queues/{queue}/lease?worker=W&lease_ms=30000&wait_ms=W`: the
//!   task as `{"id", "token", "attempt", "payload"}`, or 204 when none is
//!   ready; with `wait_ms`, a lease that finds nothing waits up to that
//!   long for a task (a long poll).
//! - `POST /tasks/{id}/heartbeat?token=T&lease_ms=N`,
//!   `POST /tasks/{id}/complete?token=T` (the body is the result, JSON),
//!   `POST /tasks/{id}/fail?token=T` (the body is the error): 409 with
//!   the current token when `T` is stale.
//! - `GET /tasks/{id}`: its state, attempts, result or last error.

use plexus_sdk::consensus::{self, Committed, Pending, Rejected};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::polls::{self, LongPolls, Poll};
use plexus_sdk::{InitContext, Pattern, Reply, Request, Response, export_pattern, timers};
use serde::{Deserialize, Serialize};
use serde_json::json;

mod tasks;

use tasks::{Outcome, Task};

const DEFAULT_LEASE_MS: u64 = 30_000;
/// Longest a lease may wait for a task.
const MAX_WAIT_MS: u64 = 60_000;
/// The timer of the waiting leases.
const POLLS: u64 = 1;
/// Waiting leases look again this often: a lease that ran out frees a
/// task without a submit to wake them.
const LOOK_EVERY_MS: u64 = 1000;

/// A command of the log. Add variants at the end; never change these.
#[derive(Serialize, Deserialize)]
pub enum Command {
    Submit {
        queue: String,
        key: Option<String>,
        payload: String,
        priority: u8,
        max_attempts: u32,
        now_ms: u64,
    },
    Lease {
        queue: String,
        worker: String,
        lease_ms: u64,
        now_ms: u64,
    },
    Heartbeat {
        id: String,
        token: u64,
        lease_ms: u64,
        now_ms: u64,
    },
    Complete {
        id: String,
        token: u64,
        result: String,
        now_ms: u64,
    },
    Fail {
        id: String,
        token: u64,
        error: String,
        now_ms: u64,
    },
}

pub struct WorkQueue {
    /// Leases waiting for a task, by queue.
    polls: LongPolls<Ask>,
}

/// What a waiting lease asks for (its queue is the poll's key).
struct Ask {
    worker: String,
    lease_ms: u64,
}

impl WorkQueue {
    /// Asks for a task for `poll` again: answers it with the task, or
    /// parks it again if none was ready and it may still wait.
    fn retry(&mut self, poll: Poll<Ask>) {
        let cmd = Command::Lease {
            queue: poll.key.clone(),
            worker: poll.item.worker.clone(),
            lease_ms: poll.item.lease_ms,
            now_ms: timers::now_ms(),
        };
        let found = |o: &Outcome| !matches!(o, Outcome::Leased(None));
        polls::submit_again(self, poll, &cmd, |q| &mut q.polls, found, answer);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Submit {
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    priority: u8,
    #[serde(default = "default_attempts")]
    max_attempts: u32,
    key: Option<String>,
}

fn default_attempts() -> u32 {
    3
}

fn answer(_: &mut WorkQueue, done: Committed<Outcome>) -> Response {
    match done.output {
        Outcome::Submitted { id, duplicate } => {
            Response::json(200, &json!({ "id": id, "duplicate": duplicate }))
        }
        Outcome::Leased(None) => Response::new(204, "application/json", Vec::new()),
        Outcome::Leased(Some(task)) => Response::json(200, &task.leased_view()),
        Outcome::Done(value) => Response::json(200, &value),
    }
}

fn submit(w: &mut WorkQueue, cmd: Command) -> http::Result<Pending> {
    Ok(consensus::submit(w, &cmd, answer)?)
}

fn token(req: &Request) -> http::Result<u64> {
    req.query::<u64>("token")?
        .ok_or_else(|| Response::error(400, "query parameter `token` is required"))
}

fn post_task(w: &mut WorkQueue, req: &Request, params: &Params) -> http::Result<Pending> {
    let queue = params.ident("queue")?;
    let body: Submit = req.json()?;
    if body.priority > 9 || body.max_attempts == 0 {
        return Err(Response::error(
            400,
            "priority must be in 0..=9 and max_attempts at least 1",
        ));
    }
    // A key becomes the task's id, addressed as `/tasks/{id}`.
    if let Some(key) = &body.key
        && (key.is_empty()
            || key.len() > 128
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    {
        return Err(Response::error(
            400,
            "key must be 1 to 128 of A-Z, a-z, 0-9, `.`, `_` and `-`",
        ));
    }
    submit(
        w,
        Command::Submit {
            queue,
            key: body.key,
            payload: body.payload.to_string(),
            priority: body.priority,
            max_attempts: body.max_attempts,
            now_ms: timers::now_ms(),
        },
    )
}

fn lease(w: &mut WorkQueue, req: &Request, params: &Params) -> http::Result<Pending> {
    let queue = params.ident("queue")?;
    let worker = req.query_param("worker").unwrap_or_default();
    let lease_ms = req
        .query::<u64>("lease_ms")?
        .unwrap_or(DEFAULT_LEASE_MS)
        .clamp(100, 86_400_000);
    let wait_ms = req.query::<u64>("wait_ms")?.unwrap_or(0).min(MAX_WAIT_MS);
    let cmd = Command::Lease {
        queue: queue.clone(),
        worker: worker.clone(),
        lease_ms,
        now_ms: timers::now_ms(),
    };
    Ok(consensus::submit(
        w,
        &cmd,
        move |q: &mut WorkQueue, done| -> Reply {
            match &done.output {
                // Nothing ready: the worker waits for the next task instead.
                Outcome::Leased(None) if wait_ms > 0 => {
                    let ask = Ask { worker, lease_ms };
                    q.polls.hold(&queue, wait_ms, ask).into()
                }
                _ => answer(q, done).into(),
            }
        },
    )?)
}

fn heartbeat(w: &mut WorkQueue, req: &Request, params: &Params) -> http::Result<Pending> {
    let id = params.ident("id")?;
    let lease_ms = req
        .query::<u64>("lease_ms")?
        .unwrap_or(DEFAULT_LEASE_MS)
        .clamp(100, 86_400_000);
    submit(
        w,
        Command::Heartbeat {
            id,
            token: token(req)?,
            lease_ms,
            now_ms: timers::now_ms(),
        },
    )
}

fn complete(w: &mut WorkQueue, req: &Request, params: &Params) -> http::Result<Pending> {
    let id = params.ident("id")?;
    let result: serde_json::Value = if req.body.is_empty() {
        serde_json::Value::Null
    } else {
        req.json()?
    };
    submit(
        w,
        Command::Complete {
            id,
            token: token(req)?,
            result: result.to_string(),
            now_ms: timers::now_ms(),
        },
    )
}

fn fail(w: &mut WorkQueue, req: &Request, params: &Params) -> http::Result<Pending> {
    let id = params.ident("id")?;
    let error = String::from_utf8_lossy(&req.body).into_owned();
    submit(
        w,
        Command::Fail {
            id,
            token: token(req)?,
            error,
            now_ms: timers::now_ms(),
        },
    )
}

fn get_task(w: &mut WorkQueue, _: &Request, params: &Params) -> http::Result {
    let id = params.ident("id")?;
    consensus::read_barrier(w)?;
    match tasks::task(&id)? {
        Some(t) => Ok(Response::json(200, &Task::view(&id, &t))),
        None => Ok(Response::error(404, "no such task")),
    }
}

impl Pattern for WorkQueue {
    type Command = Command;
    type Output = Outcome;

    fn init(_ctx: InitContext) -> Result<Self, String> {
        let on_timeout = Response::new(204, "application/json", Vec::new());
        Ok(WorkQueue {
            polls: LongPolls::new(POLLS, on_timeout).every(LOOK_EVERY_MS),
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .post("/queues/{queue}/tasks", post_task)
            .post("/queues/{queue}/lease", lease)
            .post("/tasks/{id}/heartbeat", heartbeat)
            .post("/tasks/{id}/complete", complete)
            .post("/tasks/{id}/fail", fail)
            .get("/tasks/{id}", get_task)
            .handle(self, req)
    }

    fn apply(&mut self, index: u64, cmd: Command) -> Result<Outcome, Rejected> {
        match cmd {
            Command::Submit {
                queue,
                key,
                payload,
                priority,
                max_attempts,
                now_ms,
            } => {
                let id = key.unwrap_or_else(|| format!("t{index}"));
                // Leases waiting here look again once this hook is over.
                self.polls.wake(&queue);
                tasks::submit(&queue, id, payload, priority, max_attempts, now_ms)
            }
            Command::Lease {
                queue,
                worker,
                lease_ms,
                now_ms,
            } => tasks::lease(&queue, &worker, lease_ms, now_ms),
            Command::Heartbeat {
                id,
                token,
                lease_ms,
                now_ms,
            } => tasks::heartbeat(&id, token, lease_ms, now_ms),
            Command::Complete {
                id,
                token,
                result,
                now_ms,
            } => tasks::finish(&id, token, Ok(result), now_ms),
            Command::Fail {
                id,
                token,
                error,
                now_ms,
            } => tasks::finish(&id, token, Err(error), now_ms),
        }
    }

    fn on_timer(&mut self, id: u64) {
        for poll in self.polls.due(id) {
            self.retry(poll);
        }
    }

    // Writes the version before a swap accepted are answered as it would
    // have: the answer depends on the outcome only.
    fn answer_inherited(&mut self, done: Committed<Outcome>) -> Option<Response> {
        Some(answer(self, done))
    }
}

export_pattern!(WorkQueue);

#[cfg(test)]
mod tests;
