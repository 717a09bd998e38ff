//! event-store: streams of events with expected versions, atomic appends
//! across streams, reads forwards and backwards, the global log `$all`,
//! catch-up and persistent subscriptions, stream metadata, soft delete and
//! tombstones, and a stream's state as of any version.
//!
//! Every append is a command of the consensus log, so every node holds
//! every stream, an append is durable on a majority before its 2xx, and
//! the checks of expected versions are made in one order everywhere.
//! Semantics after EventStoreDB (KurrentDB):
//! - a stream's events have versions 0, 1, 2, ...; `$all` orders every
//!   event of every stream by a position 1, 2, 3, ...;
//! - an append names its expected version: `any`, `no_stream` (the stream
//!   has no events), `stream_exists` (it has), or a number (its last
//!   event's version). A mismatch is a 409 naming the current version;
//! - events carry an `id`; an append whose ids are the stream's last
//!   events already (a retry) answers what the first append did and
//!   writes nothing;
//! - a soft-deleted stream reads as absent; appending to it again
//!   continues its versions. A tombstoned stream is gone for good: its
//!   events are erased, and reads and appends answer 410.
//!
//! HTTP (below `/v1/plugins/<name>`); an event in and out is
//! `{"type", "data" (any JSON) | "data_b64", "metadata"?, "id"?}`, and out
//! it also has `"stream", "version", "position", "created_ms"`:
//! - `POST /streams/{stream}?expected_version=E` with an event or a list
//!   of events (`ES-ExpectedVersion` header also works): `{"stream",
//!   "first_version", "version" (the last), "position" (of the last),
//!   "duplicate"}`; 409 `{"error", "stream", "expected", "current"}`
//!   (`current` is null for no stream).
//! - `POST /append` with `[{"stream", "expected_version", "events": [..]}]`:
//!   all or none; `{"streams": [{"stream", "first_version", "version"}],
//!   "position"}`, or the 409 of the first stream whose check failed.
//! - `GET /streams/{stream}?from=V&direction=forward|backward&max=N&wait_ms=W`:
//!   `{"events": [..], "next": V'}` (`next` is where to read on, null at
//!   the end going backwards); `from` defaults to 0 forwards and to the
//!   last event backwards; 404 no such stream, 410 tombstoned. With
//!   `wait_ms` a forward read that finds nothing waits up to W ms for the
//!   next append to the stream (a catch-up subscription is this read in a
//!   loop).
//! - `GET /all?from=P&max=N&direction=...&type=T&prefix=S&wait_ms=W`:
//!   the same over `$all` from position P, only events whose type is `T`
//!   (a comma list) and whose stream starts with `S`: `{"events", "next",
//!   "head"}` (`head`: the last position written).
//! - `GET /streams/{stream}/metadata`, `PUT` it with `{"max_count",
//!   "max_age_ms", "truncate_before"}` (null or absent: no limit): events
//!   beyond a limit are erased at the next append or metadata change.
//! - `DELETE /streams/{stream}` soft delete; `DELETE
//!   /streams/{stream}?hard=true` tombstone.
//! - `GET /streams/{stream}/state?version=N&reducer=PLUGIN`: the events up
//!   to version N (all by default) folded by the plugin `PLUGIN` (which
//!   the `plugins` capability and `allowed_plugins` must grant): it is
//!   sent `POST /fold` with `{"stream", "state", "events"}` in batches of
//!   up to 500 events, `state` null at first and then what it answered,
//!   and answers the new state as JSON. `reducer=count` and
//!   `reducer=merge` (a shallow merge of the events' data objects) need
//!   no plugin. Answers `{"stream", "version", "state"}`.
//! - persistent subscriptions (consumer groups): `PUT
//!   /subscriptions/{group}` with `{"stream": "$all" | name, "from": 0 |
//!   "end", "ack_wait_ms", "max_retry", "max_in_flight", "type",
//!   "prefix"}`; `GET` it for its checkpoint, what is out and parked;
//!   `POST /subscriptions/{group}/fetch?max=N&consumer=C&wait_ms=W`
//!   hands events to a consumer (each to one consumer at a time, `"retry"`
//!   counts earlier deliveries); `POST /subscriptions/{group}/ack` with a
//!   list of positions; `POST /subscriptions/{group}/nack?action=retry|park|skip`
//!   with a list of positions; unacked after `ack_wait_ms` an event goes
//!   out again, after `max_retry` retries it is parked;
//!   `GET /subscriptions/{group}/parked`, `POST
//!   /subscriptions/{group}/replay-parked` hands the parked events out
//!   again. The checkpoint is the position below which every event is
//!   acked (or parked).

use plexus_sdk::consensus::{self, Committed, Pending, Rejected};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::polls::{self, LongPolls, Poll};
use plexus_sdk::{
    InitContext, Method, Pattern, Reply, Request, Response, export_pattern, plugins, timers,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

mod store;
mod subs;

use store::{Direction, Expected, Filter, Meta, NewEvent, Page, StreamAppend, Unreadable};
use subs::{Delivery, NackAction, SubConfig};

/// Most events one read answers.
const MAX_READ: usize = 4096;
/// Longest a read or a fetch may wait.
const MAX_WAIT_MS: u64 = 60_000;
/// Events sent to a reducer plugin at once.
const FOLD_BATCH: usize = 500;
/// The timers of waiting reads and of waiting fetches.
const READS: u64 = 1;
const FETCHES: u64 = 2;
/// The key waiting fetches of every subscription wake on.
const ANY_APPEND: &str = "$append";

/// A command of the log. Add variants at the end; never change these.
#[derive(Serialize, Deserialize)]
pub enum Command {
    Append {
        appends: Vec<StreamAppend>,
        now_ms: u64,
    },
    Metadata {
        stream: String,
        meta: Meta,
        now_ms: u64,
    },
    Delete {
        stream: String,
        hard: bool,
    },
    Subscribe {
        group: String,
        config: SubConfig,
    },
    Unsubscribe {
        group: String,
    },
    Fetch {
        group: String,
        consumer: String,
        max: u32,
        now_ms: u64,
    },
    Ack {
        group: String,
        positions: Vec<u64>,
    },
    Nack {
        group: String,
        positions: Vec<u64>,
        action: NackAction,
        reason: String,
        now_ms: u64,
    },
    ReplayParked {
        group: String,
        now_ms: u64,
    },
}

/// What applying a command gave.
pub enum Outcome {
    Appended {
        written: Vec<store::Written>,
        duplicate: bool,
    },
    Delivered(Vec<Delivery>),
    Done(Value),
}

pub struct EventStore {
    /// Forward reads waiting for an append (keyed by stream, or `$all`).
    reads: LongPolls<Read>,
    /// Fetches of persistent subscriptions waiting for an append.
    fetches: LongPolls<Fetch>,
}

/// A read that waits: what it reads and until when it may.
struct Read {
    stream: Option<String>,
    from: u64,
    max: usize,
    filter: Filter,
    until_ms: u64,
}

struct Fetch {
    group: String,
    consumer: String,
    max: u32,
}

fn answer(_: &mut EventStore, done: Committed<Outcome>) -> Response {
    match done.output {
        Outcome::Appended { written, duplicate } => {
            if let [w] = written.as_slice() {
                Response::json(
                    200,
                    &json!({
                        "stream": w.stream,
                        "first_version": w.first_version,
                        "version": w.version,
                        "position": w.position,
                        "duplicate": duplicate,
                    }),
                )
            } else {
                let position = written.iter().map(|w| w.position).max();
                let streams: Vec<Value> = written
                    .iter()
                    .map(|w| {
                        json!({
                            "stream": w.stream,
                            "first_version": w.first_version,
                            "version": w.version,
                        })
                    })
                    .collect();
                Response::json(
                    200,
                    &json!({ "streams": streams, "position": position, "duplicate": duplicate }),
                )
            }
        }
        Outcome::Delivered(list) => {
            let shown: Vec<Value> = list
                .iter()
                .map(|d| {
                    let mut v = d.event.show();
                    v["retry"] = d.retry.into();
                    v
                })
                .collect();
            Response::json(200, &shown)
        }
        Outcome::Done(v) => Response::json(200, &v),
    }
}

fn submit(p: &mut EventStore, cmd: Command) -> http::Result<Pending> {
    Ok(consensus::submit(p, &cmd, answer)?)
}

fn bad(why: impl std::fmt::Display) -> Response {
    Response::error(400, &why.to_string())
}

/// The events of a body: one event object or a list of them.
fn events_of(v: &Value) -> http::Result<Vec<NewEvent>> {
    let list = match v {
        Value::Array(list) => list.iter().collect::<Vec<_>>(),
        one @ Value::Object(_) => vec![one],
        _ => return Err(bad("the body is an event or a list of events")),
    };
    if !(1..=store::MAX_EVENTS).contains(&list.len()) {
        return Err(bad(format!(
            "an append carries 1 to {} events",
            store::MAX_EVENTS
        )));
    }
    list.into_iter()
        .map(|e| NewEvent::from_json(e).map_err(bad))
        .collect()
}

fn expected_of(req: &Request) -> http::Result<Expected> {
    let given = req
        .query_param("expected_version")
        .or_else(|| req.header("es-expectedversion").map(str::to_string));
    given.map_or(Ok(Expected::Any), |e| Expected::parse(&e).map_err(bad))
}

fn append(p: &mut EventStore, req: &Request, params: &Params) -> http::Result<Pending> {
    let stream = params.ident("stream")?;
    let expected = expected_of(req)?;
    let events = events_of(&req.json::<Value>()?)?;
    submit(
        p,
        Command::Append {
            appends: vec![StreamAppend {
                stream,
                expected,
                events,
            }],
            now_ms: timers::now_ms(),
        },
    )
}

fn append_many(p: &mut EventStore, req: &Request, _: &Params) -> http::Result<Pending> {
    let body: Vec<Value> = req.json()?;
    if body.is_empty() {
        return Err(bad(
            "the body is a list of {stream, expected_version, events}",
        ));
    }
    let mut appends = Vec::with_capacity(body.len());
    for a in &body {
        let stream = a["stream"]
            .as_str()
            .filter(|s| http::is_ident(s))
            .ok_or_else(|| bad("each append names a `stream` (1 to 128 of A-Z a-z 0-9 . _ -)"))?;
        let expected = match &a["expected_version"] {
            Value::Null => Expected::Any,
            Value::Number(n) => Expected::parse(&n.to_string()).map_err(bad)?,
            Value::String(s) => Expected::parse(s).map_err(bad)?,
            _ => return Err(bad("expected_version is a string or a number")),
        };
        appends.push(StreamAppend {
            stream: stream.to_string(),
            expected,
            events: events_of(&a["events"])?,
        });
    }
    let total: usize = appends.iter().map(|a| a.events.len()).sum();
    if total > store::MAX_EVENTS {
        return Err(bad(format!(
            "an append carries at most {} events in all",
            store::MAX_EVENTS
        )));
    }
    submit(
        p,
        Command::Append {
            appends,
            now_ms: timers::now_ms(),
        },
    )
}

fn direction_of(req: &Request) -> http::Result<Direction> {
    match req.query_param("direction").as_deref() {
        None | Some("forward") | Some("forwards") => Ok(Direction::Forward),
        Some("backward") | Some("backwards") => Ok(Direction::Backward),
        Some(d) => Err(bad(format!("direction `{d}` is forward or backward"))),
    }
}

fn wait_of(req: &Request) -> http::Result<u64> {
    Ok(req.query::<u64>("wait_ms")?.unwrap_or(0).min(MAX_WAIT_MS))
}

fn max_of(req: &Request) -> http::Result<usize> {
    Ok(req.query::<usize>("max")?.unwrap_or(100).clamp(1, MAX_READ))
}

/// A page as clients see it.
fn page_body(page: &Page, head: Option<u64>) -> Value {
    let events: Vec<Value> = page.events.iter().map(store::Event::show).collect();
    let mut v = json!({ "events": events, "next": page.next });
    if let Some(h) = head {
        v["head"] = h.into();
    }
    v
}

/// Reads for `read` on this node's copy: the answer, or `None` when it
/// found nothing and may wait.
fn look(read: &Read) -> Result<Option<Response>, Response> {
    let now = timers::now_ms();
    let may_wait = timers::monotonic_ms() < read.until_ms;
    match &read.stream {
        None => {
            let page = store::read_all(read.from, Direction::Forward, read.max, &read.filter, now)?;
            if page.events.is_empty() && may_wait && page.next.unwrap_or(0) > store::head()? {
                return Ok(None);
            }
            Ok(Some(Response::json(
                200,
                &page_body(&page, Some(store::head()?)),
            )))
        }
        Some(stream) => {
            match store::read_stream(stream, Some(read.from), Direction::Forward, read.max, now) {
                Ok(page) if page.events.is_empty() && may_wait => Ok(None),
                Ok(page) => Ok(Some(Response::json(200, &page_body(&page, None)))),
                Err(Unreadable::Missing) if may_wait => Ok(None),
                Err(e) => Err(unreadable(stream, e)),
            }
        }
    }
}

fn unreadable(stream: &str, e: Unreadable) -> Response {
    match e {
        Unreadable::Missing => Response::error(404, &format!("no stream `{stream}`")),
        Unreadable::Gone => Response::error(410, &format!("stream `{stream}` is tombstoned")),
        Unreadable::Storage(e) => e.into(),
    }
}

/// Answers a read now, or holds it until an append (or its wait ends).
fn read_or_wait(p: &mut EventStore, read: Read) -> http::Result<Reply> {
    match look(&read)? {
        Some(r) => Ok(r.into()),
        None => {
            let key = read.stream.clone().unwrap_or_else(|| "$all".into());
            // Held past its own deadline: `look` answers it at that
            // deadline, with the place to read on.
            let wait = read.until_ms.saturating_sub(timers::monotonic_ms()) + 1000;
            Ok(p.reads.hold(&key, wait, read).into())
        }
    }
}

fn read_stream(p: &mut EventStore, req: &Request, params: &Params) -> http::Result<Reply> {
    let stream = params.ident("stream")?;
    let direction = direction_of(req)?;
    let from = req.query::<u64>("from")?;
    let max = max_of(req)?;
    let wait = wait_of(req)?;
    consensus::read_barrier(p)?;
    if direction == Direction::Backward || wait == 0 {
        return match store::read_stream(&stream, from, direction, max, timers::now_ms()) {
            Ok(page) => Ok(Response::json(200, &page_body(&page, None)).into()),
            Err(e) => Err(unreadable(&stream, e)),
        };
    }
    let read = Read {
        stream: Some(stream),
        from: from.unwrap_or(0),
        max,
        filter: Filter::default(),
        until_ms: timers::monotonic_ms() + wait,
    };
    read_or_wait(p, read)
}

fn filter_of(req: &Request) -> Filter {
    Filter {
        types: req
            .query_param("type")
            .map(|t| t.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
        prefix: req.query_param("prefix"),
        stream: None,
    }
}

fn read_all(p: &mut EventStore, req: &Request, _: &Params) -> http::Result<Reply> {
    let direction = direction_of(req)?;
    let max = max_of(req)?;
    let wait = wait_of(req)?;
    let filter = filter_of(req);
    consensus::read_barrier(p)?;
    let head = store::head()?;
    let from = req.query::<u64>("from")?.unwrap_or(match direction {
        Direction::Forward => 1,
        Direction::Backward => head,
    });
    if direction == Direction::Backward || wait == 0 {
        let page = store::read_all(from, direction, max, &filter, timers::now_ms())?;
        return Ok(Response::json(200, &page_body(&page, Some(head))).into());
    }
    let read = Read {
        stream: None,
        from,
        max,
        filter,
        until_ms: timers::monotonic_ms() + wait,
    };
    read_or_wait(p, read)
}

fn get_meta(p: &mut EventStore, _: &Request, params: &Params) -> http::Result {
    let stream = params.ident("stream")?;
    consensus::read_barrier(p)?;
    match store::show_stream(&stream)? {
        Some(v) => Ok(Response::json(200, &v)),
        None => Ok(Response::error(404, &format!("no stream `{stream}`"))),
    }
}

fn put_meta(p: &mut EventStore, req: &Request, params: &Params) -> http::Result<Pending> {
    let stream = params.ident("stream")?;
    let meta: Meta = req.json()?;
    submit(
        p,
        Command::Metadata {
            stream,
            meta,
            now_ms: timers::now_ms(),
        },
    )
}

fn delete_stream(p: &mut EventStore, req: &Request, params: &Params) -> http::Result<Pending> {
    let stream = params.ident("stream")?;
    let hard = req.query::<bool>("hard")?.unwrap_or(false);
    submit(p, Command::Delete { stream, hard })
}

/// A stream folded up to a version: by `count` or `merge` here, or by a
/// reducer plugin in batches.
fn state(p: &mut EventStore, req: &Request, params: &Params) -> http::Result<Reply> {
    let stream = params.ident("stream")?;
    let reducer = req
        .query_param("reducer")
        .ok_or_else(|| bad("name a reducer: count, merge or a plugin"))?;
    consensus::read_barrier(p)?;
    let s = match store::stream(&stream)? {
        Some(s) if s.tombstoned => return Err(unreadable(&stream, Unreadable::Gone)),
        Some(s) if !s.deleted && s.next > 0 => s,
        _ => return Err(unreadable(&stream, Unreadable::Missing)),
    };
    let last = s.next - 1;
    let version = req.query::<u64>("version")?.unwrap_or(last);
    if version > last {
        return Err(Response::error(
            404,
            &format!("stream `{stream}` has no version {version}: it is at {last}"),
        ));
    }
    if version < s.first {
        return Err(Response::error(
            410,
            &format!("stream `{stream}` is erased below version {}", s.first),
        ));
    }
    let fold = Fold {
        stream,
        version,
        next: s.first,
        state: Value::Null,
    };
    match reducer.as_str() {
        "count" | "merge" => {
            let mut fold = fold;
            loop {
                let events = fold.batch()?;
                if events.is_empty() {
                    return Ok(fold.done().into());
                }
                for e in &events {
                    fold.state = builtin(&reducer, std::mem::take(&mut fold.state), e);
                }
            }
        }
        plugin => fold.call(p, plugin.to_string()),
    }
}

/// A fold under way.
struct Fold {
    stream: String,
    version: u64,
    /// The next version to fold.
    next: u64,
    state: Value,
}

impl Fold {
    /// The next batch of events, moving on past them.
    fn batch(&mut self) -> Result<Vec<store::Event>, Response> {
        if self.next > self.version {
            return Ok(Vec::new());
        }
        let max = FOLD_BATCH.min((self.version - self.next + 1) as usize);
        let page = store::read_stream(
            &self.stream,
            Some(self.next),
            Direction::Forward,
            max,
            timers::now_ms(),
        )
        .map_err(|e| unreadable(&self.stream, e))?;
        let events: Vec<_> = page
            .events
            .into_iter()
            .filter(|e| e.stored.version <= self.version)
            .collect();
        self.next = page.next.unwrap_or(self.version + 1);
        if events.is_empty() && self.next <= self.version {
            // Erased meanwhile.
            return Err(unreadable(&self.stream, Unreadable::Gone));
        }
        Ok(events)
    }

    fn done(self) -> Response {
        Response::json(
            200,
            &json!({ "stream": self.stream, "version": self.version, "state": self.state }),
        )
    }

    /// Sends the next batch to `plugin` and goes on from its answer.
    fn call(mut self, p: &mut EventStore, plugin: String) -> http::Result<Reply> {
        let events = self.batch()?;
        if events.is_empty() {
            return Ok(self.done().into());
        }
        let body = json!({
            "stream": self.stream,
            "state": self.state,
            "events": events.iter().map(store::Event::show).collect::<Vec<_>>(),
        });
        let req = plugins::request(Method::Post, "/fold", body.to_string().into_bytes());
        let to = plugin.clone();
        let pending = plugins::call(p, &to, None, req, 10_000, move |p, result| -> Reply {
            let r = match result {
                Ok(r) if r.status == 200 => r,
                Ok(r) => {
                    return Response::error(
                        502,
                        &format!(
                            "reducer `{plugin}` answered {}: {}",
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        ),
                    )
                    .into();
                }
                Err(e) => {
                    return Response::error(502, &format!("reducer `{plugin}`: {e:?}")).into();
                }
            };
            match serde_json::from_slice(&r.body) {
                Ok(state) => {
                    self.state = state;
                    self.call(p, plugin).unwrap_or_else(Reply::from)
                }
                Err(e) => {
                    Response::error(502, &format!("reducer `{plugin}` answered no JSON: {e}"))
                        .into()
                }
            }
        })
        .map_err(|e| Response::error(502, &format!("reducer `{to}`: {e:?}")))?;
        Ok(pending.into())
    }
}

/// The reducers that need no plugin: `count` counts the events, `merge`
/// merges their data objects key by key (later events win).
fn builtin(reducer: &str, state: Value, e: &store::Event) -> Value {
    match reducer {
        "count" => (state.as_u64().unwrap_or(0) + 1).into(),
        _ => {
            let mut state = match state {
                Value::Object(m) => m,
                _ => serde_json::Map::new(),
            };
            if e.stored.json
                && let Ok(Value::Object(data)) = serde_json::from_slice(&e.stored.data)
            {
                state.extend(data);
            }
            Value::Object(state)
        }
    }
}

fn put_sub(p: &mut EventStore, req: &Request, params: &Params) -> http::Result<Pending> {
    let group = params.ident("group")?;
    let config: SubConfig = if req.body.is_empty() {
        SubConfig::default()
    } else {
        req.json()?
    };
    config.check().map_err(bad)?;
    submit(p, Command::Subscribe { group, config })
}

fn get_sub(p: &mut EventStore, _: &Request, params: &Params) -> http::Result {
    let group = params.ident("group")?;
    consensus::read_barrier(p)?;
    match subs::view(&group)? {
        Some(v) => Ok(Response::json(200, &v)),
        None => Ok(Response::error(404, &format!("no subscription `{group}`"))),
    }
}

fn delete_sub(p: &mut EventStore, _: &Request, params: &Params) -> http::Result<Pending> {
    let group = params.ident("group")?;
    submit(p, Command::Unsubscribe { group })
}

fn fetch(p: &mut EventStore, req: &Request, params: &Params) -> http::Result<Pending> {
    let group = params.ident("group")?;
    let max = req.query::<u32>("max")?.unwrap_or(1).clamp(1, 1000);
    let consumer = req.query_param("consumer").unwrap_or_default();
    let wait_ms = wait_of(req)?;
    let cmd = Command::Fetch {
        group: group.clone(),
        consumer: consumer.clone(),
        max,
        now_ms: timers::now_ms(),
    };
    Ok(consensus::submit(
        p,
        &cmd,
        move |p: &mut EventStore, done| -> Reply {
            match &done.output {
                Outcome::Delivered(found) if found.is_empty() && wait_ms > 0 => {
                    let fetch = Fetch {
                        group,
                        consumer,
                        max,
                    };
                    p.fetches.hold(ANY_APPEND, wait_ms, fetch).into()
                }
                _ => answer(p, done).into(),
            }
        },
    )?)
}

fn positions_of(req: &Request) -> http::Result<Vec<u64>> {
    let positions: Vec<u64> = req.json()?;
    if !(1..=1000).contains(&positions.len()) {
        return Err(bad("the body is a list of 1 to 1000 positions"));
    }
    Ok(positions)
}

fn ack(p: &mut EventStore, req: &Request, params: &Params) -> http::Result<Pending> {
    let group = params.ident("group")?;
    let positions = positions_of(req)?;
    submit(p, Command::Ack { group, positions })
}

fn nack(p: &mut EventStore, req: &Request, params: &Params) -> http::Result<Pending> {
    let group = params.ident("group")?;
    let positions = positions_of(req)?;
    let action =
        NackAction::parse(&req.query_param("action").unwrap_or("retry".into())).map_err(bad)?;
    let reason = req
        .query_param("reason")
        .unwrap_or_else(|| "nacked".into())
        .chars()
        .take(256)
        .collect();
    submit(
        p,
        Command::Nack {
            group,
            positions,
            action,
            reason,
            now_ms: timers::now_ms(),
        },
    )
}

fn get_parked(p: &mut EventStore, req: &Request, params: &Params) -> http::Result {
    let group = params.ident("group")?;
    let max = req.query::<u32>("max")?.unwrap_or(100).clamp(1, 1000);
    consensus::read_barrier(p)?;
    match subs::parked(&group, max)? {
        Some(v) => Ok(Response::json(200, &v)),
        None => Ok(Response::error(404, &format!("no subscription `{group}`"))),
    }
}

fn replay_parked(p: &mut EventStore, _: &Request, params: &Params) -> http::Result<Pending> {
    let group = params.ident("group")?;
    submit(
        p,
        Command::ReplayParked {
            group,
            now_ms: timers::now_ms(),
        },
    )
}

impl Pattern for EventStore {
    type Command = Command;
    type Output = Outcome;

    fn init(_ctx: InitContext) -> Result<Self, String> {
        Ok(EventStore {
            // Waiting reads look again now and then, to answer at their
            // own deadline with the place to read on.
            reads: LongPolls::new(READS, Response::json(200, &json!({ "events": [] }))).every(100),
            fetches: LongPolls::new(FETCHES, Response::json(200, &json!([]))),
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        const SUB: &str = "/subscriptions/{group}";
        Router::new()
            .post("/streams/{stream}", append)
            .get("/streams/{stream}", read_stream)
            .delete("/streams/{stream}", delete_stream)
            .get("/streams/{stream}/metadata", get_meta)
            .put("/streams/{stream}/metadata", put_meta)
            .get("/streams/{stream}/state", state)
            .post("/append", append_many)
            .get("/all", read_all)
            .put(SUB, put_sub)
            .get(SUB, get_sub)
            .delete(SUB, delete_sub)
            .post(&format!("{SUB}/fetch"), fetch)
            .post(&format!("{SUB}/ack"), ack)
            .post(&format!("{SUB}/nack"), nack)
            .get(&format!("{SUB}/parked"), get_parked)
            .post(&format!("{SUB}/replay-parked"), replay_parked)
            .handle(self, req)
    }

    fn apply(&mut self, _index: u64, cmd: Command) -> Result<Outcome, Rejected> {
        match cmd {
            Command::Append { appends, now_ms } => {
                let (written, duplicate) = store::append(appends, now_ms)?;
                if !duplicate {
                    // Waiting reads and fetches look again after this hook.
                    self.reads.wake("$all");
                    for w in &written {
                        self.reads.wake(&w.stream);
                    }
                    self.fetches.wake(ANY_APPEND);
                }
                Ok(Outcome::Appended { written, duplicate })
            }
            Command::Metadata {
                stream,
                meta,
                now_ms,
            } => store::set_meta(&stream, meta, now_ms).map(Outcome::Done),
            Command::Delete { stream, hard } => store::delete(&stream, hard).map(Outcome::Done),
            Command::Subscribe { group, config } => subs::put(&group, config).map(Outcome::Done),
            Command::Unsubscribe { group } => subs::remove(&group).map(Outcome::Done),
            Command::Fetch {
                group,
                consumer,
                max,
                now_ms,
            } => subs::fetch(&group, &consumer, max, now_ms).map(Outcome::Delivered),
            Command::Ack { group, positions } => subs::ack(&group, &positions).map(Outcome::Done),
            Command::Nack {
                group,
                positions,
                action,
                reason,
                now_ms,
            } => subs::nack(&group, &positions, action, &reason, now_ms).map(Outcome::Done),
            Command::ReplayParked { group, now_ms } => {
                let replayed = subs::replay_parked(&group, now_ms);
                self.fetches.wake(ANY_APPEND);
                replayed.map(Outcome::Done)
            }
        }
    }

    fn on_timer(&mut self, id: u64) {
        for poll in self.reads.due(id) {
            self.read_again(poll);
        }
        for poll in self.fetches.due(id) {
            let cmd = Command::Fetch {
                group: poll.item.group.clone(),
                consumer: poll.item.consumer.clone(),
                max: poll.item.max,
                now_ms: timers::now_ms(),
            };
            let found = |o: &Outcome| !matches!(o, Outcome::Delivered(v) if v.is_empty());
            polls::submit_again(self, poll, &cmd, |p| &mut p.fetches, found, answer);
        }
    }

    // Writes the version before a swap accepted are answered as it would
    // have: the answer depends on the outcome only.
    fn answer_inherited(&mut self, done: Committed<Outcome>) -> Option<Response> {
        Some(answer(self, done))
    }
}

impl EventStore {
    /// Reads again for a waiting read: answers it, or parks it again.
    fn read_again(&mut self, poll: Poll<Read>) {
        match look(&poll.item) {
            Ok(None) => self.reads.park(poll),
            Ok(Some(r)) | Err(r) => plexus_sdk::replies::answer(poll.held, r),
        }
    }
}

export_pattern!(EventStore);

#[cfg(test)]
mod tests;
