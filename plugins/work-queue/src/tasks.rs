//! Tasks as stored, and what each command does to them. Everything here
//! runs inside `apply`: it decides from the command and storage only.
//!
//! Keys: `t/{id}` a task; `r/{queue}/{9 - priority}/{seq}` a task ready to
//! lease, so a scan finds the highest priority, then the oldest;
//! `l/{until}/{id}` a task's lease, so a scan finds the ones run out.

use plexus_sdk::consensus::Rejected;
use plexus_sdk::storage;
use serde::{Deserialize, Serialize};
use serde_json::json;

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
}

/// What a command did.
pub enum Outcome {
    Submitted { id: String, duplicate: bool },
    Leased(Option<Leased>),
    Done(serde_json::Value),
}

/// A task handed to a worker.
pub struct Leased {
    id: String,
    token: u64,
    attempt: u64,
    payload: String,
    until_ms: u64,
}

impl Leased {
    pub fn leased_view(&self) -> serde_json::Value {
        json!({
            "id": self.id,
            "token": self.token,
            "attempt": self.attempt,
            "until_ms": self.until_ms,
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
            "submitted_ms": t.submitted_ms,
            "last_error": t.last_error,
        });
        match &t.state {
            State::Queued => v["state"] = "queued".into(),
            State::Leased { worker, until_ms } => {
                v["state"] = "leased".into();
                v["worker"] = worker.as_str().into();
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

fn ready_key(t: &Task) -> String {
    format!("r/{}/{}/{:020}", t.queue, 9 - t.priority.min(9), t.seq)
}

fn lease_key(until_ms: u64, id: &str) -> String {
    format!("l/{until_ms:020}/{id}")
}

pub fn task(id: &str) -> Result<Option<Task>, storage::Error> {
    Ok(storage::get_typed::<Task>(format!("t/{id}"))?.map(|(t, _)| t))
}

fn save(id: &str, t: &Task) -> Result<(), storage::Error> {
    storage::put_typed(format!("t/{id}"), t).map(drop)
}

pub fn submit(
    queue: &str,
    id: String,
    payload: String,
    priority: u8,
    max_attempts: u32,
    now: u64,
) -> Result<Outcome, Rejected> {
    if task(&id)?.is_some() {
        return Ok(Outcome::Submitted {
            id,
            duplicate: true,
        });
    }
    let seq = storage::get_typed::<u64>("meta/seq")?.map_or(0, |(n, _)| n) + 1;
    storage::put_typed("meta/seq", &seq)?;
    let t = Task {
        queue: queue.to_string(),
        payload,
        priority,
        max_attempts,
        token: 0,
        seq,
        not_before_ms: now,
        submitted_ms: now,
        last_error: None,
        state: State::Queued,
    };
    storage::put(ready_key(&t), id.as_bytes())?;
    save(&id, &t)?;
    Ok(Outcome::Submitted {
        id,
        duplicate: false,
    })
}

/// Puts back every task whose lease ran out by `now`, or fails it when it
/// has no attempts left.
fn expire(now: u64) -> Result<(), storage::Error> {
    for kv in storage::scan_all("l/")? {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        let Some((until, id)) = key["l/".len()..].split_once('/') else {
            continue;
        };
        if until.parse::<u64>().unwrap_or(0) > now {
            break;
        }
        storage::delete(&key)?;
        let Some(mut t) = task(id)? else { continue };
        if !matches!(t.state, State::Leased { .. }) {
            continue;
        }
        let why = format!("lease {} ran out", t.token);
        requeue_or_fail(id, &mut t, why, now, now)?;
    }
    Ok(())
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
    } else {
        t.state = State::Queued;
        t.not_before_ms = after;
        storage::put(ready_key(t), id.as_bytes())?;
    }
    t.last_error = Some(error);
    save(id, t)
}

pub fn lease(queue: &str, worker: &str, lease_ms: u64, now: u64) -> Result<Outcome, Rejected> {
    expire(now)?;
    for kv in storage::scan_all(format!("r/{queue}/"))? {
        let id = String::from_utf8_lossy(&kv.value.value).into_owned();
        let Some(mut t) = task(&id)? else {
            storage::delete(&kv.key)?;
            continue;
        };
        if t.not_before_ms > now {
            continue;
        }
        storage::delete(&kv.key)?;
        t.token += 1;
        let until_ms = now.saturating_add(lease_ms);
        t.state = State::Leased {
            worker: worker.to_string(),
            until_ms,
        };
        storage::put(lease_key(until_ms, &id), b"")?;
        save(&id, &t)?;
        return Ok(Outcome::Leased(Some(Leased {
            id,
            token: t.token,
            attempt: t.token,
            payload: t.payload,
            until_ms,
        })));
    }
    Ok(Outcome::Leased(None))
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
    expire(now)?;
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
    expire(now)?;
    let (mut t, until) = leased(id, token)?;
    storage::delete(lease_key(until, id))?;
    match result {
        Ok(result) => {
            t.state = State::Done { result, at_ms: now };
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
