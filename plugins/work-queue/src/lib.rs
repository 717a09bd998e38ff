//! work-queue: tasks handed to workers under leases with fencing tokens,
//! on the consensus log (the master–worker pattern, as users of Celery or
//! Sidekiq run it).
//!
//! A task is submitted to a queue; a worker leases the next one (highest
//! priority, then oldest) and gets it with a fencing token. While it works
//! it sends heartbeats; a lease that runs out puts the task back, and the
//! next lease carries a higher token. So does a lease taken through a node
//! that membership declares dead (a worker beside that node, or a client
//! of it). A result or failure is accepted only with the current token, so
//! a worker that lost its lease cannot overwrite the work of the one after
//! it: execution is at least once, acceptance of results exactly once. A
//! failed attempt is retried after a backoff (1 s, doubling to a minute)
//! until `max_attempts`, then the task is failed with its last error. A
//! finished task's result is kept for `result_ttl_ms`, then dropped. A
//! worker may serve several queues, taken in turn by weight, so that a
//! busy queue does not starve the others. Every change is a log entry, and
//! time is the proposer's clock carried in it.
//!
//! HTTP (below `/v1/plugins/<name>`):
//! - `POST /queues/{queue}/tasks` `{"payload": any JSON, "priority": 0..=9,
//!   "max_attempts": 3, "key": "an idempotency key", "timeout_ms": N,
//!   "result_ttl_ms": N}`: `{"id", "duplicate"}`. A JSON list of such
//!   tasks (up to 1000) is submitted in one log entry and answered with a
//!   list. `timeout_ms` is how long an attempt may go without a heartbeat
//!   (it overrides the lease's `lease_ms`).
//! - `POST /queues/{queue}/lease?worker=W&lease_ms=30000&wait_ms=W&max=N`:
//!   the task as `{"id", "queue", "token", "attempt", "until_ms",
//!   "submitted_ms", "payload"}`, or 204 when none is ready; with `max`,
//!   a list of up to N (at most 100) tasks. With `wait_ms`, a lease that
//!   finds nothing waits up to that long for a task (a long poll).
//! - `POST /lease?queues=a:3,b,c&...`: the same from several queues, each
//!   with a weight (default 1).
//! - `POST /tasks/{id}/heartbeat?token=T&lease_ms=N`,
//!   `POST /tasks/{id}/complete?token=T` (the body is the result, JSON;
//!   with `next=QUEUES` and a lease's parameters, the worker's next lease
//!   is taken in the same log entry: `{"completed", "next"}`, `next`
//!   null when nothing is ready),
//!   `POST /tasks/{id}/fail?token=T` (the body is the error): 409 with
//!   the current token when `T` is stale.
//! - `GET /tasks/{id}`: its state, attempts, result or last error; 404
//!   once its result has been dropped.
//!
//! Config: `lease_ms` (default 30000), the lease when a request names
//! none; `result_ttl_ms` (default 86400000, one day; 0 keeps results for
//! good), when a task names none.

use plexus_sdk::consensus::{self, Committed, Pending, Rejected};
use plexus_sdk::http::{self, Params, Router, is_ident};
use plexus_sdk::polls::{self, LongPolls, Poll};
use plexus_sdk::{
    InitContext, MemberEvent, MemberState, Pattern, Reply, Request, Response, export_pattern,
    timers,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

mod tasks;

use tasks::{NewTask, Outcome, Task, Worker};

/// Longest a lease may wait for a task.
const MAX_WAIT_MS: u64 = 60_000;
/// Most tasks one lease may take, and one submit may carry.
const MAX_LEASE: u32 = 100;
const MAX_SUBMIT: usize = 1000;
/// The timer of the waiting leases.
const POLLS: u64 = 1;
/// Waiting leases look again this often: a lease that ran out frees a
/// task without a submit to wake them.
const LOOK_EVERY_MS: u64 = 1000;
/// Where leases on several queues wait; every submit wakes them.
const ANY_QUEUE: &str = "*";

/// A command of the log. Add variants at the end; never change these.
#[derive(Serialize, Deserialize)]
pub enum Command {
    /// One task, as the first version wrote it.
    Submit {
        queue: String,
        key: Option<String>,
        payload: String,
        priority: u8,
        max_attempts: u32,
        now_ms: u64,
    },
    /// One lease, as the first version wrote it.
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
    /// Tasks to one queue; `list` when the client sent a list.
    Enqueue {
        queue: String,
        tasks: Vec<NewTask>,
        list: bool,
        now_ms: u64,
    },
    /// Up to `max` tasks from weighted queues; `list` when the client
    /// asked for a list.
    Take { ask: Ask, now_ms: u64 },
    /// Membership declared `node` dead: the leases taken through it go back.
    NodeDead { node: String, now_ms: u64 },
    /// A result under `token`, and the next lease for the same worker,
    /// in one entry.
    CompleteAndTake {
        id: String,
        token: u64,
        result: String,
        ask: Ask,
        now_ms: u64,
    },
}

/// What a lease asks for.
#[derive(Serialize, Deserialize, Clone)]
pub struct Ask {
    queues: Vec<(String, u32)>,
    worker: String,
    node: String,
    lease_ms: u64,
    max: u32,
    list: bool,
}

impl Ask {
    /// Where it waits: its queue, or [`ANY_QUEUE`] for several.
    fn key(&self) -> &str {
        match self.queues.as_slice() {
            [(queue, _)] => queue,
            _ => ANY_QUEUE,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    lease_ms: u64,
    result_ttl_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lease_ms: 30_000,
            result_ttl_ms: 86_400_000,
        }
    }
}

pub struct WorkQueue {
    settings: Settings,
    node: String,
    /// Leases waiting for a task, by queue.
    polls: LongPolls<Ask>,
}

impl WorkQueue {
    /// Asks for tasks for `poll` again: answers it with them, or parks it
    /// again if none was ready and it may still wait.
    fn retry(&mut self, poll: Poll<Ask>) {
        let cmd = Command::Take {
            ask: poll.item.clone(),
            now_ms: timers::now_ms(),
        };
        let found = |o: &Outcome| !matches!(o, Outcome::Leased { tasks, .. } if tasks.is_empty());
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
    #[serde(default)]
    timeout_ms: u64,
    result_ttl_ms: Option<u64>,
}

fn default_attempts() -> u32 {
    3
}

fn answer(_: &mut WorkQueue, done: Committed<Outcome>) -> Response {
    match done.output {
        Outcome::Submitted { tasks, list } => {
            let view =
                |(id, duplicate): &(String, bool)| json!({ "id": id, "duplicate": duplicate });
            match (list, tasks.first()) {
                (false, Some(one)) => Response::json(200, &view(one)),
                _ => Response::json(200, &tasks.iter().map(view).collect::<Vec<_>>()),
            }
        }
        Outcome::Leased { tasks, .. } if tasks.is_empty() => {
            Response::new(204, "application/json", Vec::new())
        }
        Outcome::Leased { tasks, list: false } => Response::json(200, &tasks[0].leased_view()),
        Outcome::Leased { tasks, list: true } => {
            let views: Vec<_> = tasks.iter().map(|t| t.leased_view()).collect();
            Response::json(200, &views)
        }
        Outcome::Done(value) => Response::json(200, &value),
        Outcome::Next {
            completed,
            tasks,
            list,
        } => {
            let next = match (list, tasks.first()) {
                (true, _) => json!(tasks.iter().map(|t| t.leased_view()).collect::<Vec<_>>()),
                (false, Some(t)) => t.leased_view(),
                (false, None) => serde_json::Value::Null,
            };
            Response::json(200, &json!({ "completed": completed, "next": next }))
        }
    }
}

fn submit(w: &mut WorkQueue, cmd: Command) -> http::Result<Pending> {
    Ok(consensus::submit(w, &cmd, answer)?)
}

fn token(req: &Request) -> http::Result<u64> {
    req.query::<u64>("token")?
        .ok_or_else(|| Response::error(400, "query parameter `token` is required"))
}

fn new_task(w: &WorkQueue, body: Submit) -> http::Result<NewTask> {
    if body.priority > 9 || body.max_attempts == 0 {
        return Err(Response::error(
            400,
            "priority must be in 0..=9 and max_attempts at least 1",
        ));
    }
    // A key becomes the task's id, addressed as `/tasks/{id}`.
    if let Some(key) = &body.key
        && !is_ident(key)
    {
        return Err(Response::error(
            400,
            "key must be 1 to 128 of A-Z, a-z, 0-9, `.`, `_` and `-`",
        ));
    }
    Ok(NewTask {
        key: body.key,
        payload: body.payload.to_string(),
        priority: body.priority,
        max_attempts: body.max_attempts,
        timeout_ms: body.timeout_ms.min(86_400_000),
        result_ttl_ms: body.result_ttl_ms.unwrap_or(w.settings.result_ttl_ms),
    })
}

fn post_tasks(w: &mut WorkQueue, req: &Request, params: &Params) -> http::Result<Pending> {
    let queue = params.ident("queue")?;
    // One task, or a list of them.
    let list = req.body.trim_ascii_start().starts_with(b"[");
    let bodies: Vec<Submit> = if list { req.json()? } else { vec![req.json()?] };
    if !(1..=MAX_SUBMIT).contains(&bodies.len()) {
        return Err(Response::error(
            400,
            &format!("a list holds 1 to {MAX_SUBMIT} tasks"),
        ));
    }
    let tasks = bodies
        .into_iter()
        .map(|b| new_task(w, b))
        .collect::<http::Result<Vec<_>>>()?;
    submit(
        w,
        Command::Enqueue {
            queue,
            tasks,
            list,
            now_ms: timers::now_ms(),
        },
    )
}

/// `a:3,b,c` as queues with weights.
fn parse_queues(text: &str) -> http::Result<Vec<(String, u32)>> {
    let bad = || {
        Response::error(
            400,
            "queues is a list like `a:3,b,c` of up to 16 queue names, each with a weight of 1 to 100",
        )
    };
    let mut out: Vec<(String, u32)> = Vec::new();
    for part in text.split(',') {
        let (name, weight) = match part.split_once(':') {
            Some((n, w)) => (n, w.parse::<u32>().map_err(|_| bad())?),
            None => (part, 1),
        };
        if !is_ident(name) || !(1..=100).contains(&weight) || out.iter().any(|(q, _)| q == name) {
            return Err(bad());
        }
        out.push((name.to_string(), weight));
    }
    if out.len() > 16 {
        return Err(bad());
    }
    Ok(out)
}

fn lease_queue(w: &mut WorkQueue, req: &Request, params: &Params) -> http::Result<Pending> {
    let queue = params.ident("queue")?;
    lease(w, req, vec![(queue, 1)])
}

fn lease_queues(w: &mut WorkQueue, req: &Request, _: &Params) -> http::Result<Pending> {
    let text = req
        .query_param("queues")
        .ok_or_else(|| Response::error(400, "query parameter `queues` is required"))?;
    let queues = parse_queues(&text)?;
    lease(w, req, queues)
}

/// What a lease request asks for, from its query.
fn ask(w: &WorkQueue, req: &Request, queues: Vec<(String, u32)>) -> http::Result<Ask> {
    let max = req.query::<u32>("max")?;
    Ok(Ask {
        queues,
        worker: req.query_param("worker").unwrap_or_default(),
        node: w.node.clone(),
        lease_ms: req
            .query::<u64>("lease_ms")?
            .unwrap_or(w.settings.lease_ms)
            .clamp(100, 86_400_000),
        max: max.unwrap_or(1).clamp(1, MAX_LEASE),
        list: max.is_some(),
    })
}

fn lease(w: &mut WorkQueue, req: &Request, queues: Vec<(String, u32)>) -> http::Result<Pending> {
    let ask = ask(w, req, queues)?;
    let wait_ms = req.query::<u64>("wait_ms")?.unwrap_or(0).min(MAX_WAIT_MS);
    let cmd = Command::Take {
        ask: ask.clone(),
        now_ms: timers::now_ms(),
    };
    Ok(consensus::submit(
        w,
        &cmd,
        move |q: &mut WorkQueue, done| -> Reply {
            match &done.output {
                // Nothing ready: the worker waits for the next task instead.
                Outcome::Leased { tasks, .. } if tasks.is_empty() && wait_ms > 0 => {
                    let key = ask.key().to_string();
                    q.polls.hold(&key, wait_ms, ask).into()
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
        .unwrap_or(w.settings.lease_ms)
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
    let (token, result, now_ms) = (token(req)?, result.to_string(), timers::now_ms());
    // `next=QUEUES`: the worker's next lease in the same entry.
    if let Some(next) = req.query_param("next") {
        let ask = ask(w, req, parse_queues(&next)?)?;
        return submit(
            w,
            Command::CompleteAndTake {
                id,
                token,
                result,
                ask,
                now_ms,
            },
        );
    }
    submit(
        w,
        Command::Complete {
            id,
            token,
            result,
            now_ms,
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
        // Dropped at the next write; not shown after its time meanwhile.
        Some(t) if !t.expired(timers::now_ms()) => Ok(Response::json(200, &Task::view(&id, &t))),
        _ => Ok(Response::error(404, "no such task")),
    }
}

impl Pattern for WorkQueue {
    type Command = Command;
    type Output = Outcome;

    fn init(ctx: InitContext) -> Result<Self, String> {
        let on_timeout = Response::new(204, "application/json", Vec::new());
        Ok(WorkQueue {
            settings: ctx.config()?,
            node: ctx.node,
            polls: LongPolls::new(POLLS, on_timeout).every(LOOK_EVERY_MS),
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .post("/queues/{queue}/tasks", post_tasks)
            .post("/queues/{queue}/lease", lease_queue)
            .post("/lease", lease_queues)
            .post("/tasks/{id}/heartbeat", heartbeat)
            .post("/tasks/{id}/complete", complete)
            .post("/tasks/{id}/fail", fail)
            .get("/tasks/{id}", get_task)
            .handle(self, req)
    }

    fn apply(&mut self, index: u64, cmd: Command) -> Result<Outcome, Rejected> {
        let now_ms = match &cmd {
            Command::Submit { now_ms, .. }
            | Command::Lease { now_ms, .. }
            | Command::Heartbeat { now_ms, .. }
            | Command::Complete { now_ms, .. }
            | Command::Fail { now_ms, .. }
            | Command::Enqueue { now_ms, .. }
            | Command::Take { now_ms, .. }
            | Command::NodeDead { now_ms, .. }
            | Command::CompleteAndTake { now_ms, .. } => *now_ms,
        };
        tasks::upkeep(now_ms)?;
        match cmd {
            Command::Submit {
                queue,
                key,
                payload,
                priority,
                max_attempts,
                now_ms,
            } => {
                let task = NewTask {
                    key,
                    payload,
                    priority,
                    max_attempts,
                    timeout_ms: 0,
                    result_ttl_ms: 0,
                };
                self.enqueue(index, queue, vec![task], false, now_ms)
            }
            Command::Enqueue {
                queue,
                tasks,
                list,
                now_ms,
            } => self.enqueue(index, queue, tasks, list, now_ms),
            Command::Lease {
                queue,
                worker,
                lease_ms,
                now_ms,
            } => {
                let w = Worker {
                    name: &worker,
                    node: "",
                    lease_ms,
                };
                let tasks = tasks::lease(&[(queue, 1)], &w, 1, index, now_ms)?;
                Ok(Outcome::Leased { tasks, list: false })
            }
            Command::Take { ask, now_ms } => {
                let w = Worker {
                    name: &ask.worker,
                    node: &ask.node,
                    lease_ms: ask.lease_ms,
                };
                let tasks = tasks::lease(&ask.queues, &w, ask.max, index, now_ms)?;
                Ok(Outcome::Leased {
                    tasks,
                    list: ask.list,
                })
            }
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
            Command::NodeDead { node, now_ms } => {
                tasks::node_dead(&node, now_ms)?;
                Ok(Outcome::Done(json!({ "node": node })))
            }
            Command::CompleteAndTake {
                id,
                token,
                result,
                ask,
                now_ms,
            } => {
                let Outcome::Done(completed) = tasks::finish(&id, token, Ok(result), now_ms)?
                else {
                    unreachable!("a completion answers with the task")
                };
                let w = Worker {
                    name: &ask.worker,
                    node: &ask.node,
                    lease_ms: ask.lease_ms,
                };
                let tasks = tasks::lease(&ask.queues, &w, ask.max, index, now_ms)?;
                Ok(Outcome::Next {
                    completed,
                    tasks,
                    list: ask.list,
                })
            }
        }
    }

    fn on_membership(&mut self, events: Vec<MemberEvent>) {
        for e in events {
            if e.member.state != MemberState::Dead || e.member.id == self.node {
                continue;
            }
            // Every node that hears of it proposes; putting back is done
            // once, and a second entry finds nothing leased through it.
            let cmd = Command::NodeDead {
                node: e.member.id,
                now_ms: timers::now_ms(),
            };
            let _ = consensus::submit(self, &cmd, answer);
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

impl WorkQueue {
    fn enqueue(
        &mut self,
        index: u64,
        queue: String,
        new: Vec<NewTask>,
        list: bool,
        now_ms: u64,
    ) -> Result<Outcome, Rejected> {
        // Leases waiting here look again once this hook is over.
        self.polls.wake(&queue);
        self.polls.wake(ANY_QUEUE);
        let tasks = tasks::submit(&queue, new, now_ms, index)?;
        Ok(Outcome::Submitted { tasks, list })
    }
}

export_pattern!(WorkQueue);

#[cfg(test)]
mod tests;
