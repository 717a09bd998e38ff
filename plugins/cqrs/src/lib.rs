//! cqrs: the command side and the query side of an application over the
//! `event-store` plugin.
//!
//! **Commands.** `POST /commands/{aggregate}/{id}/{command}` with a JSON
//! body: the aggregate's stream `{aggregate}-{id}` is read from the event
//! store and folded into its state, the command is checked against its
//! definition and that state, and one event (its type from the
//! definition, its data the body) is appended with the version read as the
//! expected version. A conflict (another command won) reads and checks
//! again, up to five times. The answer: `{"stream", "version",
//! "position"}`; a refusal is a 422 naming the rule.
//!
//! Validation rules are config, not code: `required` fields and `rules`
//! over the body and the state (see [`model`]). A schema in the config is
//! checked the same way on every node, changes with a live config edit,
//! and needs no second component per aggregate; logic beyond it belongs in
//! a plugin of its own that appends to the event store.
//!
//! **Projections.** Each projection (read model) is kept on every node in
//! node-local storage, fed from the event store's `$all` in batches of up
//! to 1000 events (one storage commit per batch) with waiting reads when
//! caught up. `GET /projections/{name}/docs/{key}` answers the document
//! and the position the projection has reached; `?min_position=P&wait_ms=W`
//! waits until it has reached P, so a read after a command sees it
//! (read-your-writes). An event a projection cannot apply is parked
//! (`GET /projections/{name}/parked`) and the projection goes on.
//!
//! **Blue/green rebuild.** `POST /projections/{name}/rebuild` (or a
//! config whose `version` is higher) starts a new version replaying from
//! the start beside the serving one. When a node sees it caught up, it
//! commits a switch through this plugin's log: every node switches at
//! that index, and reads after it wait until the new version has reached
//! the position the switch names, so no read is stale. `POST
//! /projections/{name}/rollback` switches back in one step (the previous
//! version keeps running). `GET /projections` shows each version's
//! position, lag and parked events.
//!
//! **`POST /fold`** folds `{"stream", "state", "events"}` by the stream's
//! aggregate: the event store's `state?reducer=<this plugin>` uses it.

use std::collections::{BTreeMap, BTreeSet};

use plexus_sdk::consensus::{self, Committed, Pending, Rejected};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::polls::{LongPolls, Poll};
use plexus_sdk::storage::{self, BatchOp};
use plexus_sdk::{
    InitContext, Method, Pattern, Reply, Request, Response, export_pattern, plugins, timers,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub mod model;

use model::{Config, Event, Expect, Projection};

/// The timer that starts (and restarts) projection feeds.
const TICK: u64 = 1;
/// The timer of reads waiting for a projection to reach a position.
const READS: u64 = 2;
/// Events asked of the event store at once.
const BATCH: u32 = 1000;
/// How long a feed that is caught up waits in the event store for more.
const FEED_WAIT_MS: u64 = 5_000;
const MAX_WAIT_MS: u64 = 60_000;
/// Attempts of a command that loses to another.
const ATTEMPTS: u32 = 5;

/// A command of this plugin's log. Add variants at the end.
#[derive(Serialize, Deserialize)]
pub enum Command {
    /// A projection version and its definition (JSON).
    Define {
        name: String,
        version: u64,
        def: String,
    },
    /// Reads of `name` go to `version` once it has reached `at`.
    Switch { name: String, version: u64, at: u64 },
    /// Back to the version serving before the last switch.
    Rollback { name: String },
}

/// Which versions of a projection there are (in consensus storage).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
struct Versions {
    /// The version serving, and the position reads wait for.
    active: Option<u64>,
    active_at: u64,
    /// The version serving before the last switch.
    previous: Option<u64>,
    /// The highest version defined.
    latest: u64,
    /// A version rolled back from: not switched to again by itself.
    rolled_back: Option<u64>,
}

pub struct Cqrs {
    config: Config,
    /// Feeds with a call to the event store out.
    running: BTreeSet<(String, u64)>,
    /// Versions whose switch this node has proposed.
    proposed: BTreeSet<(String, u64)>,
    reads: LongPolls<DocRead>,
}

/// A read waiting for its projection to reach a position.
struct DocRead {
    name: String,
    key: Option<String>,
    min_position: u64,
    until_ms: u64,
}

fn versions(name: &str) -> Result<Versions, storage::Error> {
    Ok(storage::get_typed(format!("v/{name}"))?
        .map(|(v, _)| v)
        .unwrap_or_default())
}

fn definition(name: &str, version: u64) -> Result<Option<Projection>, storage::Error> {
    Ok(storage::get(format!("d/{name}/{version:020}"))?
        .and_then(|v| serde_json::from_slice(&v.value).ok()))
}

// Node-local keys of a projection version: its documents, the next
// position it reads, and its parked events.
fn doc_key(name: &str, version: u64, key: &str) -> String {
    format!("doc/{name}/{version}/{key}")
}

fn pos_key(name: &str, version: u64) -> String {
    format!("pos/{name}/{version}")
}

fn parked_key(name: &str, version: u64, position: u64) -> String {
    format!("park/{name}/{version}/{position:020}")
}

fn local_u64(key: &str) -> u64 {
    storage::local::get(key)
        .ok()
        .flatten()
        .and_then(|v| v.value.try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0)
}

/// The position a projection version has read up to (the next to read).
fn reached(name: &str, version: u64) -> u64 {
    local_u64(&pos_key(name, version)).max(1)
}

impl Cqrs {
    /// The versions of `name` to keep fed here: the serving one, the
    /// previous (for a rollback) and one being built.
    fn wanted(name: &str) -> Vec<u64> {
        let Ok(v) = versions(name) else {
            return Vec::new();
        };
        let mut out: Vec<u64> = v.active.into_iter().chain(v.previous).collect();
        if v.active.is_none_or(|a| v.latest > a) && v.latest > 0 {
            out.push(v.latest);
        }
        out.sort();
        out.dedup();
        out
    }

    /// Starts the feeds wanted and not running; defines the config's
    /// versions the log does not know yet.
    fn tick(&mut self) {
        let names: Vec<String> = self.config.projections.keys().cloned().collect();
        for name in names {
            let def = self.config.projections[&name].clone();
            if versions(&name).is_ok_and(|v| v.latest < def.version)
                && consensus::leader().is_some()
            {
                let cmd = Command::Define {
                    name: name.clone(),
                    version: def.version,
                    def: serde_json::to_string(&def).unwrap_or_default(),
                };
                let _ = consensus::submit(self, &cmd, |_: &mut Cqrs, _| {
                    Response::json(200, &json!({}))
                });
            }
            for version in Self::wanted(&name) {
                if !self.running.contains(&(name.clone(), version)) {
                    self.feed(name.clone(), version);
                }
            }
        }
        timers::set(TICK, 1000);
    }

    /// Asks the event store for the next batch of a projection version.
    fn feed(&mut self, name: String, version: u64) {
        let Ok(Some(def)) = definition(&name, version) else {
            return;
        };
        let from = reached(&name, version);
        let types: Vec<&str> = def.on.keys().map(String::as_str).collect();
        let mut req = plugins::request(Method::Get, "/all", Vec::new());
        req.query = format!(
            "from={from}&max={BATCH}&wait_ms={FEED_WAIT_MS}&type={}{}",
            types.join(","),
            def.streams
                .as_ref()
                .map(|s| format!("&prefix={s}"))
                .unwrap_or_default()
        );
        let store = self.config.store.clone();
        let key = (name.clone(), version);
        let sent = plugins::call(
            self,
            &store,
            None,
            req,
            FEED_WAIT_MS as u32 + 5_000,
            move |p: &mut Cqrs, result| {
                p.running.remove(&(name.clone(), version));
                match result {
                    Ok(r) if r.status == 200 => {
                        if let Ok(page) = serde_json::from_slice::<Value>(&r.body) {
                            p.project(&name, version, &def, &page);
                        }
                    }
                    Ok(r) => plexus_sdk::warn!(
                        "projection {name} v{version}: the event store answered {}",
                        r.status
                    ),
                    Err(e) => plexus_sdk::warn!("projection {name} v{version}: {e:?}"),
                }
                // Fed again at once while it still wants feeding; a failure
                // waits for the next tick.
                if Cqrs::wanted(&name).contains(&version)
                    && !p.running.contains(&(name.clone(), version))
                {
                    p.feed(name, version);
                }
                Response::json(200, &json!({}))
            },
        );
        if sent.is_ok() {
            self.running.insert(key);
        }
    }

    /// Applies a page of events to a projection version: one commit of
    /// its documents, parked events and position.
    fn project(&mut self, name: &str, version: u64, def: &Projection, page: &Value) {
        let mut docs: BTreeMap<String, Option<Value>> = BTreeMap::new();
        let mut ops = Vec::new();
        for e in page["events"].as_array().into_iter().flatten() {
            let event = Event(e);
            let Some(update) = e["type"].as_str().and_then(|t| def.on.get(t)) else {
                continue;
            };
            let position = e["position"].as_u64().unwrap_or(0);
            let applied = event
                .value(&Value::String(def.key.clone()))
                .map(|k| match k {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
                .and_then(|key| {
                    let doc = match docs.get(&key) {
                        Some(d) => d.clone(),
                        None => storage::local::get(doc_key(name, version, &key))
                            .ok()
                            .flatten()
                            .and_then(|v| serde_json::from_slice(&v.value).ok()),
                    };
                    let after = update.apply(doc, &event)?;
                    docs.insert(key, after);
                    Ok(())
                });
            if let Err(why) = applied {
                let parked = json!({ "event": e, "error": why });
                ops.push(BatchOp::Put((
                    storage::local::key(parked_key(name, version, position)),
                    parked.to_string().into_bytes(),
                )));
            }
        }
        for (key, doc) in docs {
            let k = storage::local::key(doc_key(name, version, &key));
            ops.push(match doc {
                Some(d) => BatchOp::Put((k, d.to_string().into_bytes())),
                None => BatchOp::Delete(k),
            });
        }
        let next = page["next"].as_u64().unwrap_or(0);
        if next > reached(name, version) {
            ops.push(BatchOp::Put((
                storage::local::key(pos_key(name, version)),
                next.to_be_bytes().to_vec(),
            )));
        }
        if let Err(e) = storage::batch(&ops) {
            plexus_sdk::error!("projection {name} v{version}: {e:?}");
            return;
        }
        self.reads.wake(name);
        // Caught up: this page reached the head as it was when read.
        let head = page["head"].as_u64().unwrap_or(0);
        if next > head {
            self.maybe_switch(name, version, head);
        }
    }

    /// Proposes that reads go to `version`, once, if it is being built.
    fn maybe_switch(&mut self, name: &str, version: u64, head: u64) {
        let Ok(v) = versions(name) else { return };
        let building = v.latest == version
            && v.active.is_none_or(|a| a < version)
            && v.rolled_back != Some(version);
        if !building || !self.proposed.insert((name.to_string(), version)) {
            return;
        }
        let cmd = Command::Switch {
            name: name.to_string(),
            version,
            at: head + 1,
        };
        let key = (name.to_string(), version);
        let sent = consensus::submit(self, &cmd, move |p: &mut Cqrs, _| {
            p.proposed.remove(&key);
            Response::json(200, &json!({}))
        });
        if sent.is_err() {
            self.proposed.remove(&(name.to_string(), version));
        }
    }
}

fn submit(p: &mut Cqrs, cmd: Command) -> http::Result<Pending> {
    Ok(consensus::submit(
        p,
        &cmd,
        |_: &mut Cqrs, done: Committed<Value>| Response::json(200, &done.output),
    )?)
}

/// `POST /commands/{aggregate}/{id}/{command}`.
fn command(p: &mut Cqrs, req: &Request, params: &Params) -> http::Result<Reply> {
    let (aggregate, id, name) = (
        params.ident("aggregate")?,
        params.ident("id")?,
        params.ident("command")?,
    );
    let Some(def) = p
        .config
        .aggregates
        .get(&aggregate)
        .and_then(|a| a.commands.get(&name))
    else {
        return Err(Response::error(
            404,
            &format!("no command `{aggregate}/{name}`"),
        ));
    };
    let body: Value = req.json()?;
    model::check(def, &body, &Some(Value::Null)).or_else(|e| {
        // State rules are checked once the state is read.
        if def
            .rules
            .iter()
            .any(|r| r.state.is_some() || r.at_most_state.is_some())
        {
            Ok(())
        } else {
            Err(Response::error(422, &e))
        }
    })?;
    let attempt = Attempt {
        stream: format!("{aggregate}-{id}"),
        aggregate,
        command: name,
        body,
        left: ATTEMPTS,
    };
    attempt.load(p)
}

/// A command under way: read, check, append; again on a conflict.
struct Attempt {
    aggregate: String,
    stream: String,
    command: String,
    body: Value,
    left: u32,
}

impl Attempt {
    fn load(self, p: &mut Cqrs) -> http::Result<Reply> {
        let mut req = plugins::request(
            Method::Get,
            &format!("/streams/{}", self.stream),
            Vec::new(),
        );
        req.query = "max=4096".into();
        let store = p.config.store.clone();
        let pending = plugins::call(
            p,
            &store,
            None,
            req,
            10_000,
            move |p: &mut Cqrs, r| -> Reply {
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        return Response::error(502, &format!("the event store: {e:?}")).into();
                    }
                };
                let events = match r.status {
                    200 => serde_json::from_slice::<Value>(&r.body)
                        .ok()
                        .and_then(|v| v["events"].as_array().cloned())
                        .unwrap_or_default(),
                    404 => Vec::new(),
                    s => return Response::new(s, "application/json", r.body).into(),
                };
                self.decide(p, events).unwrap_or_else(Reply::from)
            },
        )
        .map_err(|e| Response::error(502, &format!("the event store: {e:?}")))?;
        Ok(pending.into())
    }

    fn decide(self, p: &mut Cqrs, events: Vec<Value>) -> http::Result<Reply> {
        let aggregate = &p.config.aggregates[&self.aggregate];
        let def = &aggregate.commands[&self.command];
        let last = events.last().and_then(|e| e["version"].as_u64());
        match (def.expect, last) {
            (Expect::New, Some(_)) => {
                return Err(Response::error(
                    409,
                    &format!("`{}` exists already", self.stream),
                ));
            }
            (Expect::Exists, None) => {
                return Err(Response::error(404, &format!("no `{}`", self.stream)));
            }
            _ => {}
        }
        let state = model::fold(aggregate, None, &events).map_err(|e| Response::error(500, &e))?;
        model::check(def, &self.body, &state).map_err(|e| Response::error(422, &e))?;
        let event = json!({
            "type": def.event,
            "data": self.body,
            "metadata": { "command": self.command },
        });
        let mut req = plugins::request(
            Method::Post,
            &format!("/streams/{}", self.stream),
            event.to_string().into_bytes(),
        );
        req.query = format!(
            "expected_version={}",
            last.map_or("no_stream".to_string(), |v| v.to_string())
        );
        let store = p.config.store.clone();
        let pending = plugins::call(
            p,
            &store,
            None,
            req,
            10_000,
            move |p: &mut Cqrs, r| -> Reply {
                match r {
                    Ok(r) if r.status == 409 && self.left > 1 => Attempt {
                        left: self.left - 1,
                        ..self
                    }
                    .load(p)
                    .unwrap_or_else(Reply::from),
                    Ok(r) if r.status == 200 => {
                        let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
                        Response::json(
                            200,
                            &json!({
                                "stream": v["stream"],
                                "version": v["version"],
                                "position": v["position"],
                            }),
                        )
                        .into()
                    }
                    Ok(r) => Response::new(r.status, "application/json", r.body).into(),
                    Err(e) => Response::error(502, &format!("the event store: {e:?}")).into(),
                }
            },
        )
        .map_err(|e| Response::error(502, &format!("the event store: {e:?}")))?;
        Ok(pending.into())
    }
}

/// `POST /fold`: the event store's reducer hook.
fn fold(p: &mut Cqrs, req: &Request, _: &Params) -> http::Result {
    let body: Value = req.json()?;
    let stream = body["stream"].as_str().unwrap_or_default();
    let Some(aggregate) = p.config.aggregate_of(stream) else {
        return Err(Response::error(
            404,
            &format!("no aggregate for stream `{stream}`"),
        ));
    };
    let state = (!body["state"].is_null()).then(|| body["state"].clone());
    let events = body["events"].as_array().cloned().unwrap_or_default();
    let state = model::fold(aggregate, state, &events).map_err(|e| Response::error(422, &e))?;
    Ok(Response::json(200, &state))
}

/// The version reads of `name` go to, and the position they wait for.
fn serving(name: &str) -> Result<Option<(u64, u64)>, storage::Error> {
    let v = versions(name)?;
    Ok(v.active.map(|a| (a, v.active_at)))
}

/// Answers a read now, or `None` if the projection has not reached what
/// it must and the read may wait.
fn look(read: &DocRead) -> Result<Option<Response>, Response> {
    let Some((version, at)) = serving(&read.name)? else {
        return Err(Response::error(
            503,
            &format!("projection `{}` is not built yet", read.name),
        ));
    };
    let position = reached(&read.name, version);
    // `position` is the next to read: it has applied everything below.
    if position <= read.min_position.max(at.saturating_sub(1)) {
        if timers::monotonic_ms() < read.until_ms {
            return Ok(None);
        }
        return Err(Response::json(
            504,
            &json!({
                "error": format!("projection `{}` has not reached position {} yet", read.name, read.min_position),
                "position": position - 1,
            }),
        ));
    }
    let body = match &read.key {
        Some(key) => {
            let doc = storage::local::get(doc_key(&read.name, version, key))?
                .and_then(|v| serde_json::from_slice::<Value>(&v.value).ok());
            let Some(doc) = doc else {
                return Err(Response::json(
                    404,
                    &json!({ "error": format!("no document `{key}`"), "position": position - 1, "version": version }),
                ));
            };
            json!({ "doc": doc, "position": position - 1, "version": version })
        }
        None => {
            let prefix = format!("doc/{}/{version}/", read.name);
            let docs: BTreeMap<String, Value> = storage::local::scan(&prefix, None, 1000)?
                .into_iter()
                .filter_map(|kv| {
                    let key = String::from_utf8_lossy(&kv.key[prefix.len()..]).to_string();
                    serde_json::from_slice(&kv.value.value)
                        .ok()
                        .map(|d| (key, d))
                })
                .collect();
            json!({ "docs": docs, "position": position - 1, "version": version })
        }
    };
    Ok(Some(Response::json(200, &body)))
}

fn read_docs(p: &mut Cqrs, req: &Request, params: &Params) -> http::Result<Reply> {
    let name = params.ident("name")?;
    if !p.config.projections.contains_key(&name) && versions(&name)?.active.is_none() {
        return Err(Response::error(404, &format!("no projection `{name}`")));
    }
    let key = params
        .get("key")
        .map(|_| params.text("key", 512))
        .transpose()?;
    let wait = req.query::<u64>("wait_ms")?.unwrap_or(0).min(MAX_WAIT_MS);
    // The switch a read must see is committed: catch up with the log.
    consensus::read_barrier(p)?;
    let read = DocRead {
        name: name.clone(),
        key,
        min_position: req.query::<u64>("min_position")?.unwrap_or(0),
        until_ms: timers::monotonic_ms() + wait,
    };
    match look(&read)? {
        Some(r) => Ok(r.into()),
        None => Ok(p.reads.hold(&name, wait + 1000, read).into()),
    }
}

fn status(p: &mut Cqrs, _: &Request, _: &Params) -> http::Result {
    consensus::read_barrier(p)?;
    let mut out = serde_json::Map::new();
    let names: BTreeSet<String> = p.config.projections.keys().cloned().collect();
    for name in names {
        let v = versions(&name)?;
        let mut vs = serde_json::Map::new();
        for version in Cqrs::wanted(&name) {
            let position = reached(&name, version) - 1;
            let parked = storage::local::scan(format!("park/{name}/{version}/"), None, 1000)?.len();
            vs.insert(
                version.to_string(),
                json!({
                    "position": position,
                    "parked": parked,
                    "feeding": p.running.contains(&(name.clone(), version)),
                }),
            );
        }
        out.insert(
            name,
            json!({
                "active": v.active,
                "active_at": v.active_at,
                "previous": v.previous,
                "latest": v.latest,
                "versions": vs,
            }),
        );
    }
    Ok(Response::json(200, &out))
}

fn parked(p: &mut Cqrs, _: &Request, params: &Params) -> http::Result {
    let name = params.ident("name")?;
    let Some((version, _)) = serving(&name)? else {
        return Err(Response::error(
            404,
            &format!("projection `{name}` is not built"),
        ));
    };
    let _ = p;
    let list: Vec<Value> = storage::local::scan(format!("park/{name}/{version}/"), None, 1000)?
        .into_iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value.value).ok())
        .collect();
    Ok(Response::json(200, &list))
}

fn rebuild(p: &mut Cqrs, _: &Request, params: &Params) -> http::Result<Pending> {
    let name = params.ident("name")?;
    let Some(def) = p.config.projections.get(&name).cloned() else {
        return Err(Response::error(
            404,
            &format!("no projection `{name}` in the config"),
        ));
    };
    consensus::read_barrier(p)?;
    let version = versions(&name)?.latest.max(def.version) + 1;
    let def = serde_json::to_string(&Projection { version, ..def }).unwrap_or_default();
    submit(p, Command::Define { name, version, def })
}

fn rollback(p: &mut Cqrs, _: &Request, params: &Params) -> http::Result<Pending> {
    let name = params.ident("name")?;
    submit(p, Command::Rollback { name })
}

impl Pattern for Cqrs {
    type Command = Command;
    type Output = Value;

    fn init(ctx: InitContext) -> Result<Self, String> {
        let config: Config = ctx.config()?;
        config.check()?;
        timers::set(TICK, 0);
        Ok(Cqrs {
            config,
            running: BTreeSet::new(),
            proposed: BTreeSet::new(),
            reads: LongPolls::new(
                READS,
                Response::error(504, "the projection did not get there in time"),
            )
            .every(100),
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .post("/commands/{aggregate}/{id}/{command}", command)
            .post("/fold", fold)
            .get("/projections", status)
            .get("/projections/{name}/docs", read_docs)
            .get("/projections/{name}/docs/{key}", read_docs)
            .get("/projections/{name}/parked", parked)
            .post("/projections/{name}/rebuild", rebuild)
            .post("/projections/{name}/rollback", rollback)
            .handle(self, req)
    }

    fn apply(&mut self, _index: u64, cmd: Command) -> Result<Value, Rejected> {
        match cmd {
            Command::Define { name, version, def } => {
                let mut v = versions(&name)?;
                if version <= v.latest {
                    return Ok(
                        json!({ "projection": name, "version": v.latest, "defined": false }),
                    );
                }
                storage::put(format!("d/{name}/{version:020}"), def.as_bytes())?;
                v.latest = version;
                storage::put_typed(format!("v/{name}"), &v)?;
                timers::set(TICK, 0);
                Ok(json!({ "projection": name, "version": version, "building": true }))
            }
            Command::Switch { name, version, at } => {
                let mut v = versions(&name)?;
                if v.active.is_some_and(|a| a >= version) {
                    return Ok(
                        json!({ "projection": name, "active": v.active, "switched": false }),
                    );
                }
                v.previous = v.active;
                v.active = Some(version);
                v.active_at = at;
                storage::put_typed(format!("v/{name}"), &v)?;
                plexus_sdk::info!(
                    "projection {name}: reads go to version {version} from position {at}"
                );
                Ok(json!({ "projection": name, "active": version, "switched": true }))
            }
            Command::Rollback { name } => {
                let mut v = versions(&name)?;
                let Some(previous) = v.previous else {
                    return Err(Rejected::new(
                        409,
                        &format!("projection `{name}` has no previous version"),
                    ));
                };
                v.rolled_back = v.active;
                v.previous = v.active;
                v.active = Some(previous);
                storage::put_typed(format!("v/{name}"), &v)?;
                Ok(json!({ "projection": name, "active": previous, "rolled_back": true }))
            }
        }
    }

    fn on_timer(&mut self, id: u64) {
        if id == TICK {
            self.tick();
        }
        for poll in self.reads.due(id) {
            self.read_again(poll);
        }
    }

    fn answer_inherited(&mut self, done: Committed<Value>) -> Option<Response> {
        Some(Response::json(200, &done.output))
    }
}

impl Cqrs {
    fn read_again(&mut self, poll: Poll<DocRead>) {
        match look(&poll.item) {
            Ok(None) => self.reads.park(poll),
            Ok(Some(r)) | Err(r) => plexus_sdk::replies::answer(poll.held, r),
        }
    }
}

export_pattern!(Cqrs);

#[cfg(test)]
mod tests;
