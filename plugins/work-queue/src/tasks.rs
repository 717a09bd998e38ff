//! Tasks as stored, and what each command does to them. Everything here
//! runs inside `apply`: it decides from the command and storage only.
//!
//! Keys, each an index that a scan reads in the order it needs, so that
//! no command reads more than a page of any of them:
//! - `t/{id}` a task;
//! - `r/{queue}/{9 - priority}/{seq}` a task ready to lease: highest
//!   priority first, then oldest;
//! - `w/{not_before}/{id}` a task waiting out a backoff before it is ready;
//! - `l/{until}/{id}` a task's lease, so the ones run out come first;
//! - `x/{expires}/{id}` a finished task, dropped once its result has been
//!   kept for its `result_ttl_ms`.

use plexus_sdk::consensus::Rejected;
use plexus_sdk::storage;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// At most this many entries of an index are handled per command when
/// putting back, promoting or dropping tasks; the rest wait for the next
/// command, so that one command never does unbounded work.
const PAGE: u32 = 64;

/// Where a task is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum State {
    /// Waiting for a worker (not before `Task::not_before_ms`).
    Queued,
    /// Leased to `worker` under `Task::token` until `until_ms`.
    Leased { worker: String, until_ms: u64 },
    /// Completed with this result (JSON text).
    Done { result: String, at_ms: u64 },
    /// Out of attempts; the last error.
    Failed { error: String, at_ms: u64 },
}

/// A task to submit.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct NewTask {
    /// The idempotency key, which becomes the task's id.
    pub key: Option<String>,
    /// JSON text.
    pub payload: String,
    pub priority: u8,
    pub max_attempts: u32,
    /// How long one attempt may go without a heartbeat before the task is
    /// given to another worker; 0 leaves it to the lease request.
    pub timeout_ms: u64,
    /// How long the result (or error) is kept once the task is finished;
    /// 0 keeps it for good.
    pub result_ttl_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Task {
    queue: String,
    payload: String,
    priority: u8,
    max_attempts: u32,
    /// Leases so far, and so the fencing token of the current one.
    token: u64,
    /// The order of submission, for first-in first-out within a priority.
    seq: u64,
    not_before_ms: u64,
    submitted_ms: u64,
    last_error: Option<String>,
    state: State,
    // Fields after this line were added in the second layout; a task
    // stored in the first one is read by `task` with their defaults.
    timeout_ms: u64,
    result_ttl_ms: u64,
    /// The node the current lease was taken through.
    node: String,
}

/// The first layout of a stored task, before timeouts, retention and
/// lease nodes.
#[derive(Serialize, Deserialize)]
struct TaskV1 {
    queue: String,
    payload: String,
    priority: u8,
    max_attempts: u32,
    token: u64,
    seq: u64,
    not_before_ms: u64,
    submitted_ms: u64,
    last_error: Option<String>,
    state: State,
}

impl From<TaskV1> for Task {
    fn from(t: TaskV1) -> Task {
        Task {
            queue: t.queue,
            payload: t.payload,
            priority: t.priority,
            max_attempts: t.max_attempts,
            token: t.token,
            seq: t.seq,
            not_before_ms: t.not_before_ms,
            submitted_ms: t.submitted_ms,
            last_error: t.last_error,
            state: t.state,
            timeout_ms: 0,
            result_ttl_ms: 0,
            node: String::new(),
        }
    }
}

/// What a command did.
pub enum Outcome {
    /// Each task's id and whether its key was seen before; `list` when
    /// the client sent a list.
    Submitted {
        tasks: Vec<(String, bool)>,
        list: bool,
    },
    /// The tasks leased; `list` when the client asked for several.
    Leased {
        tasks: Vec<Leased>,
        list: bool,
    },
    Done(serde_json::Value),
    /// A task completed (its view) and the next leased.
    Next {
        completed: serde_json::Value,
        tasks: Vec<Leased>,
        list: bool,
    },
}

/// A task handed to a worker.
pub struct Leased {
    id: String,
    token: u64,
    payload: String,
    until_ms: u64,
    queue: String,
    submitted_ms: u64,
}

impl Leased {
    pub fn leased_view(&self) -> serde_json::Value {
        json!({
            "id": self.id,
            "queue": self.queue,
            "token": self.token,
            "attempt": self.token,
            "until_ms": self.until_ms,
            "submitted_ms": self.submitted_ms,
            "payload": parse(&self.payload),
        })
    }
}

fn parse(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

impl Task {
    /// The task as a client sees it.
    pub fn view(id: &str, t: &Task) -> serde_json::Value {
        let mut v = json!({
            "id": id,
            "queue": t.queue,
            "priority": t.priority,
            "attempts": t.token,
            "max_attempts": t.max_attempts,
            "timeout_ms": t.timeout_ms,
            "result_ttl_ms": t.result_ttl_ms,
            "submitted_ms": t.submitted_ms,
            "last_error": t.last_error,
        });
        match &t.state {
            State::Queued => {
                v["state"] = "queued".into();
                v["not_before_ms"] = t.not_before_ms.into();
            }
            State::Leased { worker, until_ms } => {
                v["state"] = "leased".into();
                v["worker"] = worker.as_str().into();
                v["node"] = t.node.as_str().into();
                v["token"] = t.token.into();
                v["until_ms"] = (*until_ms).into();
            }
            State::Done { result, at_ms } => {
                v["state"] = "done".into();
                v["result"] = parse(result);
                v["finished_ms"] = (*at_ms).into();
            }
            State::Failed { error, at_ms } => {
                v["state"] = "failed".into();
                v["error"] = error.as_str().into();
                v["finished_ms"] = (*at_ms).into();
            }
        }
        v
    }
}

impl Task {
    /// Whether it is finished and its result kept long enough by `now`.
    pub fn expired(&self, now: u64) -> bool {
        let at = match self.state {
            State::Done { at_ms, .. } | State::Failed { at_ms, .. } => at_ms,
            _ => return false,
        };
        self.result_ttl_ms > 0 && at.saturating_add(self.result_ttl_ms) <= now
    }
}

fn ready_key(t: &Task) -> String {
    format!("r/{}/{}/{:020}", t.queue, 9 - t.priority.min(9), t.seq)
}

fn waiting_key(not_before_ms: u64, id: &str) -> String {
    format!("w/{not_before_ms:020}/{id}")
}

fn lease_key(until_ms: u64, id: &str) -> String {
    format!("l/{until_ms:020}/{id}")
}

fn expiry_key(expires_ms: u64, id: &str) -> String {
    format!("x/{expires_ms:020}/{id}")
}

pub fn task(id: &str) -> Result<Option<Task>, storage::Error> {
    let Some(v) = storage::get(format!("t/{id}"))? else {
        return Ok(None);
    };
    let first_layout = || plexus_sdk::codec::decode::<TaskV1>(&v.value).map(Task::from);
    plexus_sdk::codec::decode::<Task>(&v.value)
        .or_else(|_| first_layout())
        .map(Some)
        .map_err(|e| storage::Error::Io(format!("task `{id}`: {e}")))
}

fn save(id: &str, t: &Task) -> Result<(), storage::Error> {
    storage::put_typed(format!("t/{id}"), t).map(drop)
}

/// The entries of an index under `prefix` whose first key part (a time)
/// is at most `now`, one page of them: `(full key, id)`.
fn due(prefix: &str, now: u64) -> Result<Vec<(String, String)>, storage::Error> {
    let mut out = Vec::new();
    for kv in storage::scan(prefix, None, PAGE)? {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        let Some((at, id)) = key[prefix.len()..].split_once('/') else {
            continue;
        };
        if at.parse::<u64>().unwrap_or(0) > now {
            break;
        }
        let id = id.to_string();
        out.push((key, id));
    }
    Ok(out)
}

/// The upkeep every command does first, as of `now`: drops finished
/// tasks kept long enough, makes ready the tasks whose backoff is over,
/// and puts back (or fails) the tasks whose lease ran out.
pub fn upkeep(now: u64) -> Result<(), storage::Error> {
    for (key, id) in due("x/", now)? {
        storage::delete(&key)?;
        storage::delete(format!("t/{id}"))?;
    }
    for (key, id) in due("w/", now)? {
        storage::delete(&key)?;
        if let Some(t) = task(&id)?
            && t.state == State::Queued
        {
            storage::put(ready_key(&t), id.as_bytes())?;
        }
    }
    for (key, id) in due("l/", now)? {
        storage::delete(&key)?;
        let Some(mut t) = task(&id)? else { continue };
        if let State::Leased { until_ms, .. } = t.state
            && until_ms <= now
        {
            let why = format!("lease {} ran out", t.token);
            requeue_or_fail(&id, &mut t, why, now, now)?;
        }
    }
    Ok(())
}

pub fn submit(
    queue: &str,
    tasks: Vec<NewTask>,
    now: u64,
    index: u64,
) -> Result<Vec<(String, bool)>, Rejected> {
    let mut seq = storage::get_typed::<u64>("meta/seq")?.map_or(0, |(n, _)| n);
    let mut out = Vec::with_capacity(tasks.len());
    for (i, new) in tasks.into_iter().enumerate() {
        let id = new.key.unwrap_or_else(|| match i {
            0 => format!("t{index}"),
            i => format!("t{index}.{i}"),
        });
        if task(&id)?.is_some() {
            out.push((id, true));
            continue;
        }
        seq += 1;
        let t = Task {
            queue: queue.to_string(),
            payload: new.payload,
            priority: new.priority,
            max_attempts: new.max_attempts,
            token: 0,
            seq,
            not_before_ms: now,
            submitted_ms: now,
            last_error: None,
            state: State::Queued,
            timeout_ms: new.timeout_ms,
            result_ttl_ms: new.result_ttl_ms,
            node: String::new(),
        };
        storage::put(ready_key(&t), id.as_bytes())?;
        save(&id, &t)?;
        out.push((id, false));
    }
    storage::put_typed("meta/seq", &seq)?;
    Ok(out)
}

/// After a failed attempt: queued again from `after`, or failed for good
/// when it had all its attempts.
fn requeue_or_fail(
    id: &str,
    t: &mut Task,
    error: String,
    after: u64,
    now: u64,
) -> Result<(), storage::Error> {
    if t.token >= u64::from(t.max_attempts) {
        t.state = State::Failed {
            error: error.clone(),
            at_ms: now,
        };
        keep_until_expiry(id, t, now)?;
    } else {
        t.state = State::Queued;
        t.not_before_ms = after;
        if after > now {
            storage::put(waiting_key(after, id), b"")?;
        } else {
            storage::put(ready_key(t), id.as_bytes())?;
        }
    }
    t.last_error = Some(error);
    save(id, t)
}

/// Indexes a finished task for dropping after its `result_ttl_ms`.
fn keep_until_expiry(id: &str, t: &Task, now: u64) -> Result<(), storage::Error> {
    if t.result_ttl_ms > 0 {
        storage::put(expiry_key(now.saturating_add(t.result_ttl_ms), id), b"")?;
    }
    Ok(())
}

/// Who asks for tasks, and for how long by default.
pub struct Worker<'a> {
    pub name: &'a str,
    pub node: &'a str,
    pub lease_ms: u64,
}

/// Leases the next ready task of `queue`, if any: the highest priority,
/// then the oldest.
fn lease_one(queue: &str, w: &Worker, now: u64) -> Result<Option<Leased>, Rejected> {
    let prefix = format!("r/{queue}/");
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = storage::scan(&prefix, after.as_deref(), PAGE)?;
        let Some(last) = page.last() else {
            return Ok(None);
        };
        after = Some(last.key.clone());
        for kv in &page {
            let id = String::from_utf8_lossy(&kv.value.value).into_owned();
            let Some(mut t) = task(&id)? else {
                storage::delete(&kv.key)?;
                continue;
            };
            // Only a task stored by the first layout can be in the ready
            // index before its time; it stays until then.
            if t.not_before_ms > now {
                continue;
            }
            storage::delete(&kv.key)?;
            t.token += 1;
            let lease_ms = if t.timeout_ms > 0 {
                t.timeout_ms
            } else {
                w.lease_ms
            };
            let until_ms = now.saturating_add(lease_ms);
            t.state = State::Leased {
                worker: w.name.to_string(),
                until_ms,
            };
            t.node = w.node.to_string();
            storage::put(lease_key(until_ms, &id), b"")?;
            save(&id, &t)?;
            return Ok(Some(Leased {
                id,
                token: t.token,
                payload: t.payload,
                until_ms,
                queue: queue.to_string(),
                submitted_ms: t.submitted_ms,
            }));
        }
        if page.len() < PAGE as usize {
            return Ok(None);
        }
    }
}

/// Leases up to `max` tasks from `queues`, taken in turn by weight: with
/// `a:3,b:1`, three of every four turns start at `a`. The turn starts at
/// a place set by the entry's `index`, so every node takes the same
/// tasks, and over many leases each queue with work gets its share.
pub fn lease(
    queues: &[(String, u32)],
    w: &Worker,
    max: u32,
    index: u64,
    now: u64,
) -> Result<Vec<Leased>, Rejected> {
    let turns: Vec<&str> = queues
        .iter()
        .flat_map(|(q, weight)| std::iter::repeat_n(q.as_str(), (*weight).max(1) as usize))
        .collect();
    let mut empty: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    let mut turn = index as usize;
    while out.len() < max as usize && empty.len() < queues.len() {
        // The first queue from this turn on that may still have work.
        let Some(queue) = (0..turns.len())
            .map(|i| turns[(turn + i) % turns.len()])
            .find(|q| !empty.contains(q))
        else {
            break;
        };
        turn = turn.wrapping_add(1);
        match lease_one(queue, w, now)? {
            Some(leased) => out.push(leased),
            None => empty.push(queue),
        }
    }
    Ok(out)
}

/// Puts back (or fails, when out of attempts) every task leased through
/// `node`, which membership declared dead.
pub fn node_dead(node: &str, now: u64) -> Result<(), storage::Error> {
    for kv in storage::scan_all("l/")? {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        let Some((_, id)) = key["l/".len()..].split_once('/') else {
            continue;
        };
        let Some(mut t) = task(id)? else { continue };
        if matches!(t.state, State::Leased { .. }) && t.node == node {
            storage::delete(&key)?;
            let why = format!("node {node} of lease {} was declared dead", t.token);
            requeue_or_fail(id, &mut t, why, now, now)?;
        }
    }
    Ok(())
}

/// The task `id` if `token` is its current lease's; 409 with the current
/// token otherwise (a worker that lost its lease).
fn leased(id: &str, token: u64) -> Result<(Task, u64), Rejected> {
    let t = task(id)?.ok_or_else(|| Rejected::new(404, &format!("no task `{id}`")))?;
    match &t.state {
        State::Leased { until_ms, .. } if t.token == token => {
            let until = *until_ms;
            Ok((t, until))
        }
        _ => Err(Rejected::json(
            409,
            &json!({ "error": "stale token: the task is not leased under it", "token": t.token, "state": Task::view(id, &t)["state"] }),
        )),
    }
}

pub fn heartbeat(id: &str, token: u64, lease_ms: u64, now: u64) -> Result<Outcome, Rejected> {
    let (mut t, until) = leased(id, token)?;
    storage::delete(lease_key(until, id))?;
    let until_ms = now.saturating_add(lease_ms);
    if let State::Leased { worker, .. } = &t.state {
        t.state = State::Leased {
            worker: worker.clone(),
            until_ms,
        };
    }
    storage::put(lease_key(until_ms, id), b"")?;
    save(id, &t)?;
    Ok(Outcome::Done(
        json!({ "id": id, "token": token, "until_ms": until_ms }),
    ))
}

/// A worker's result (`Ok`) or error (`Err`) under `token`.
pub fn finish(
    id: &str,
    token: u64,
    result: Result<String, String>,
    now: u64,
) -> Result<Outcome, Rejected> {
    let (mut t, until) = leased(id, token)?;
    storage::delete(lease_key(until, id))?;
    match result {
        Ok(result) => {
            t.state = State::Done { result, at_ms: now };
            keep_until_expiry(id, &t, now)?;
            save(id, &t)?;
        }
        Err(error) => {
            let backoff = 1000u64
                .saturating_mul(1 << (t.token - 1).min(6))
                .min(60_000);
            requeue_or_fail(id, &mut t, error, now.saturating_add(backoff), now)?;
        }
    }
    Ok(Outcome::Done(Task::view(id, &t)))
}

#[cfg(test)]
pub(crate) fn store_first_layout(id: &str, queue: &str) {
    let t = TaskV1 {
        queue: queue.to_string(),
        payload: "1".to_string(),
        priority: 0,
        max_attempts: 3,
        token: 0,
        seq: 1,
        not_before_ms: 0,
        submitted_ms: 0,
        last_error: None,
        state: State::Queued,
    };
    storage::put_typed(format!("t/{id}"), &t).unwrap();
    storage::put(format!("r/{queue}/9/{:020}", 1), id.as_bytes()).unwrap();
}
