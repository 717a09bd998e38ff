//! sharding: a key–value store whose keys are spread over the member
//! nodes, each key held by `replicas` nodes, a request for any key
//! accepted by any node and forwarded to the key's primary.
//!
//! Keys fall into a fixed number of slots, placed on members by
//! rendezvous hashing with bounded loads ([`placement`]). The **shard
//! map** (each slot's holders, the primary first) is decided in the
//! consensus log and carries an **epoch**, so every node switches at the
//! same index. A request forwarded to a primary carries the epoch of the
//! map that chose it; a node that is not the primary under its own map
//! passes it on, and one that is behind catches up first, so no request
//! is served by a node that no longer holds the key.
//!
//! A write goes to the slot's other holders first (`messaging.call`),
//! each refusing a write of another epoch, and then to the primary's own
//! storage: whatever a primary shows is on every holder, and a holder
//! keeps the newer of two versions, `(epoch, sequence)`. The data is
//! node-local storage (`plexus_sdk::storage::local`), never written
//! through the log, so a node holds only its slots.
//!
//! **Rebalancing.** The log's leader watches membership: a voter that
//! joins (`plexus cluster join`), a voter dead for `dead_grace_ms`, or one
//! the operator drains (`POST /drain/{node}`, before `plexus cluster
//! leave`) makes it propose a new placement. Applying it
//! first drops dead members from their slots (a replica becomes primary
//! at once, a new epoch) and starts a **plan** toward the new placement.
//! While the plan runs, writes go to the old and the new holders of a
//! moving slot; each slot's primary copies the slot to its new holders
//! in batches and then proposes that the slot caught up. When every
//! moving slot has, the map switches to the plan at that index (a new
//! epoch), and the old holders drop the slots they no longer hold. Reads
//! and writes go on throughout; a node killed mid-move resumes its copies
//! when it comes back, and a plan is replaced when membership changes
//! again (or `POST /plan/abort` drops it: a rollback in one step).
//!
//! HTTP (below `/v1/plugins/<name>`):
//! - `GET|PUT|DELETE /kv/{key}`: the value (`x-shard-slot`,
//!   `x-shard-epoch` and `x-shard-node` headers say who served it). A
//!   read is served by the primary under its map; with
//!   `?linearizable=true` the primary first confirms with the log that
//!   its map is current (otherwise a primary cut off from the others can
//!   answer from its copy until it hears of a new map);
//! - `GET /map` (`?slots=true` lists every slot's holders);
//! - `GET /plan`: the plan, its moves and what is left;
//!   `GET /plan?members=a,b,c`: a dry run, the moves that membership
//!   would cause and the keys in them; `POST /plan/abort`;
//! - `POST /drain/{node}`, `DELETE /drain/{node}`: move every slot off a
//!   node (before `plexus cluster leave`), or let it hold slots again;
//! - `GET /stats`: this node's slots, keys and bytes, as primary and as
//!   replica.
//!
//! Config: `replicas` (1..=3, default 2), `slots` (default 1024),
//! `balance_factor` (percent, at least 100, default 105),
//! `dead_grace_ms` (default 3000), `copy_batch` (keys per copy message,
//! default 256). `slots` and `replicas` are fixed by the first map.

use std::collections::{BTreeMap, BTreeSet};

use plexus_sdk::consensus::{self, Rejected};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::storage;
use plexus_sdk::{
    InitContext, MemberEvent, MemberState, NodeId, Pattern, Reply, Request, Response, codec,
    export_pattern, membership, messaging, timers,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub mod placement;
mod shard;

use shard::{Item, Version};

pub const DEFAULT_SLOTS: u32 = 1024;
pub const DEFAULT_BALANCE: u32 = 105;
/// The leader looks at membership this often.
const CHECK_EVERY_MS: u64 = 1000;
/// Copies and clean-up go on this often while there is work.
const WORK_EVERY_MS: u64 = 50;
const TIMER_CHECK: u64 = 1;
const TIMER_WORK: u64 = 2;
/// The header that carries the epoch of the map a request was routed by.
const EPOCH_HEADER: &str = "x-shard-epoch";
const CALL_TIMEOUT_MS: u32 = 2000;
/// A report of caught-up slots not applied by then is made again.
const REPORT_TIMEOUT_MS: u64 = 5000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    replicas: u8,
    slots: u32,
    balance_factor: u32,
    dead_grace_ms: u64,
    copy_batch: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            replicas: 2,
            slots: DEFAULT_SLOTS,
            balance_factor: DEFAULT_BALANCE,
            dead_grace_ms: 3000,
            copy_batch: 256,
        }
    }
}

/// The shard map.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Map {
    pub epoch: u64,
    pub replicas: u8,
    pub members: Vec<String>,
    /// Each slot's holders, the primary first.
    pub holders: Vec<Vec<String>>,
}

/// Where the map is going.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Plan {
    /// The epoch the map gets when the plan is done.
    pub epoch: u64,
    pub members: Vec<String>,
    pub target: Vec<Vec<String>>,
    /// Moving slots not yet caught up on their new holders.
    pub pending: BTreeSet<u32>,
    pub started_ms: u64,
}

/// A command of the log. Add variants at the end; never change these.
#[derive(Serialize, Deserialize)]
pub enum Command {
    /// Place the slots on `members`, dropping `dead` from their slots now.
    Rebalance {
        members: Vec<String>,
        dead: Vec<String>,
        slots: u32,
        replicas: u8,
        balance_factor: u32,
        now_ms: u64,
    },
    /// The new holders of these slots have all of them, for the plan of
    /// `epoch`.
    Caught {
        epoch: u64,
        slots: Vec<u32>,
    },
    Abort {
        epoch: u64,
    },
    /// The operator drains a node (`drain`), or lets it back.
    Drain {
        node: String,
        drain: bool,
    },
}

/// What a replica answers a write or a copy.
#[derive(Serialize, Deserialize, Debug)]
enum Ack {
    Done,
    /// Its map has another epoch (its own given).
    Epoch(u64),
    NotHolder,
    Failed(String),
}

/// A write or a copy sent to a slot's other holders.
#[derive(Serialize, Deserialize)]
struct Put {
    epoch: u64,
    slot: u32,
    items: Vec<(Vec<u8>, Item)>,
}

/// The copy this node is running: one slot to its new holders.
struct Copy {
    /// Which copy this is (of [`Sharding::copies`]).
    id: u64,
    slot: u32,
    to: Vec<String>,
    after: Option<Vec<u8>>,
    keys: u64,
    in_flight: bool,
}

pub struct Sharding {
    settings: Settings,
    node: String,
    map: Option<Map>,
    plan: Option<Plan>,
    drained: BTreeSet<String>,
    /// When this node first saw each member dead.
    dead_since: BTreeMap<String, u64>,
    /// A rebalance this node proposed and has not seen applied yet.
    proposed_at: Option<u64>,
    copy: Option<Copy>,
    /// Slots copied and not yet reported caught up.
    caught: Vec<u32>,
    /// Since when a report of caught-up slots is on its way to the log.
    reporting: Option<u64>,
    /// Counts copies started, so an answer for an abandoned one is known.
    copies: u64,
    /// Keys copied by this node for the current plan.
    copied: u64,
    /// This instance has seen the log up to date once.
    caught_up: bool,
}

/// A value `apply` kept under `key`.
fn load<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, String> {
    storage::get(key)
        .map_err(|e| format!("reading {key}: {e:?}"))?
        .map(|v| codec::decode(&v.value))
        .transpose()
        .map_err(String::from)
}

fn keep<T: Serialize>(key: &str, value: &T) -> Result<(), storage::Error> {
    storage::put_typed(key, value).map(drop)
}

impl Sharding {
    fn slots(&self) -> u32 {
        self.map
            .as_ref()
            .map_or(self.settings.slots, |m| m.holders.len() as u32)
    }

    /// The nodes a write to `slot` must reach: its holders, and during a
    /// plan its new holders too.
    fn write_set(&self, slot: u32) -> Vec<String> {
        let Some(map) = &self.map else {
            return Vec::new();
        };
        let mut set = map.holders[slot as usize].clone();
        if let Some(plan) = &self.plan {
            for n in &plan.target[slot as usize] {
                if !set.contains(n) {
                    set.push(n.clone());
                }
            }
        }
        set
    }

    fn primary(&self, slot: u32) -> Option<&str> {
        self.map.as_ref()?.holders[slot as usize]
            .first()
            .map(String::as_str)
    }

    fn epoch(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.epoch)
    }

    /// Routes a key request: served here when this node is the primary,
    /// otherwise forwarded to it with this map's epoch.
    fn route(&mut self, req: &Request, params: &Params) -> http::Result<Reply> {
        let key = params.text("key", 512)?;
        // A request routed by a newer map than this node's: catch up first.
        let theirs: Option<u64> = req
            .headers
            .iter()
            .find(|(k, _)| k == EPOCH_HEADER)
            .and_then(|(_, v)| v.parse().ok());
        // A node that just started, or a request routed by a newer map
        // than this node's: catch up with the log first, so that no
        // request is served by a map that is no longer current.
        if !self.caught_up || theirs.is_some_and(|e| e > self.epoch()) {
            consensus::read_barrier(self)?;
            self.caught_up = true;
        }
        if req.query_param("linearizable").as_deref() == Some("true") {
            consensus::read_barrier(self)?;
        }
        let Some(map) = &self.map else {
            return Err(Response::error(
                503,
                "no shard map yet: the cluster is starting",
            ));
        };
        let slot = placement::slot_of(key.as_bytes(), map.holders.len() as u32);
        let Some(primary) = self.primary(slot).map(str::to_string) else {
            return Err(Response::error(503, &format!("slot {slot} has no holder")));
        };
        if primary != self.node {
            return Ok(messaging::forward_with(
                &primary,
                vec![(EPOCH_HEADER.into(), self.epoch().to_string())],
            ));
        }
        let served = |r: Response| {
            r.with_header("x-shard-slot", &slot.to_string())
                .with_header("x-shard-epoch", &self.epoch().to_string())
                .with_header("x-shard-node", &self.node)
        };
        match req.method {
            plexus_sdk::Method::Get => Ok(served(match shard::get(slot, key.as_bytes())? {
                Some(value) => Response::new(200, "application/octet-stream", value),
                None => Response::error(404, "no such key"),
            })
            .into()),
            plexus_sdk::Method::Put => self.write(slot, key, Some(req.body.clone())),
            plexus_sdk::Method::Delete => self.write(slot, key, None),
            _ => Err(Response::error(405, "GET, PUT or DELETE")),
        }
    }

    /// A write at the primary: to the other holders first, one after the
    /// other, then here.
    fn write(&mut self, slot: u32, key: String, value: Option<Vec<u8>>) -> http::Result<Reply> {
        let epoch = self.epoch();
        let item = Item {
            version: Version {
                epoch,
                seq: shard::next_seq(slot)?,
            },
            value,
        };
        let others: Vec<String> = self
            .write_set(slot)
            .into_iter()
            .filter(|n| *n != self.node)
            .collect();
        let put = Put {
            epoch,
            slot,
            items: vec![(key.into_bytes(), item)],
        };
        Ok(replicate(self, codec::encode(&put), others, 0))
    }

    fn on_put(&mut self, payload: &[u8]) -> Ack {
        let Ok(put) = codec::decode::<Put>(payload) else {
            return Ack::Failed("not a write".into());
        };
        if put.epoch > self.epoch() && consensus::read_barrier(self).is_err() {
            return Ack::Failed("cannot catch up with the log".into());
        }
        if put.epoch != self.epoch() {
            return Ack::Epoch(self.epoch());
        }
        if put.slot >= self.slots() || !self.write_set(put.slot).contains(&self.node) {
            return Ack::NotHolder;
        }
        match shard::keep_newer(put.slot, &put.items) {
            Ok(()) => Ack::Done,
            Err(e) => Ack::Failed(format!("{e:?}")),
        }
    }
}

/// Sends the write `put` to `others[i..]` in turn; once all took it,
/// applies it here and answers the client.
fn replicate(s: &mut Sharding, put: Vec<u8>, others: Vec<String>, i: usize) -> Reply {
    let Some(to) = others.get(i).cloned() else {
        let done: Put = codec::decode(&put).expect("encoded here");
        return match shard::keep_newer(done.slot, &done.items) {
            Ok(()) => {
                let (key, item) = &done.items[0];
                let body = json!({
                    "key": String::from_utf8_lossy(key),
                    "slot": done.slot,
                    "epoch": done.epoch,
                    "deleted": item.value.is_none(),
                });
                Response::json(200, &body)
                    .with_header("x-shard-slot", &done.slot.to_string())
                    .with_header("x-shard-epoch", &done.epoch.to_string())
                    .with_header("x-shard-node", &s.node)
                    .into()
            }
            Err(e) => Response::error(500, &format!("storage: {e:?}")).into(),
        };
    };
    let node = to.clone();
    let sent = messaging::call(
        s,
        &node,
        "put",
        &put.clone(),
        CALL_TIMEOUT_MS,
        move |s: &mut Sharding, reply| {
            match reply.map(|bytes| codec::decode::<Ack>(&bytes)) {
                Ok(Ok(Ack::Done)) => replicate(s, put, others, i + 1),
                // This node's map is behind or ahead of the holder's: the
                // client sends the write again once the maps agree.
                Ok(Ok(Ack::Epoch(theirs))) => {
                    let _ = consensus::read_barrier(s);
                    Response::error(
                        503,
                        &format!("the map changed (epoch {theirs} on {to}); send again"),
                    )
                    .into()
                }
                Ok(Ok(other)) => {
                    Response::error(503, &format!("{to} refused the write: {other:?}")).into()
                }
                Ok(Err(e)) => Response::error(502, &format!("{to}: {e}")).into(),
                // The holder may have it: the outcome is unknown.
                Err(e) => {
                    Response::error(504, &format!("{to} did not confirm the write: {e:?}")).into()
                }
            }
        },
    );
    match sent {
        Ok(pending) => pending.into(),
        Err(e) => Response::error(503, &format!("{node} cannot be reached: {e:?}")).into(),
    }
}

fn kv(s: &mut Sharding, req: &Request, params: &Params) -> http::Result<Reply> {
    s.route(req, params)
}

fn get_map(s: &mut Sharding, req: &Request, _: &Params) -> http::Result {
    let Some(map) = &s.map else {
        return Ok(Response::error(404, "no shard map yet"));
    };
    let mut nodes: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for holders in &map.holders {
        for (i, n) in holders.iter().enumerate() {
            let e = nodes.entry(n).or_default();
            if i == 0 {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
    }
    let per_node: BTreeMap<&str, serde_json::Value> = nodes
        .into_iter()
        .map(|(n, (p, r))| (n, json!({ "primary_slots": p, "replica_slots": r })))
        .collect();
    let mut v = json!({
        "epoch": map.epoch,
        "slots": map.holders.len(),
        "replicas": map.replicas,
        "members": map.members,
        "nodes": per_node,
        "drained": s.drained,
        "planning": s.plan.as_ref().map(|p| p.epoch),
    });
    if req.query_param("slots").as_deref() == Some("true") {
        v["holders"] = json!(map.holders);
    }
    Ok(Response::json(200, &v))
}

/// The slots whose holders differ between `from` and `to`, with who
/// leaves and who comes.
fn moves(from: &[Vec<String>], to: &[Vec<String>]) -> Vec<serde_json::Value> {
    from.iter()
        .zip(to)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(slot, (a, b))| json!({ "slot": slot, "from": a, "to": b }))
        .collect()
}

fn get_plan(s: &mut Sharding, req: &Request, _: &Params) -> http::Result {
    let Some(map) = &s.map else {
        return Ok(Response::error(404, "no shard map yet"));
    };
    if let Some(members) = req.query_param("members") {
        // A dry run: what this membership would move, and how many keys
        // that is by this node's counts (its slots) and the mean of them
        // (the others).
        let mut members: Vec<String> = members.split(',').map(str::to_string).collect();
        members.sort();
        members.dedup();
        let target = placement::place(
            &members,
            map.holders.len() as u32,
            map.replicas as usize,
            s.settings.balance_factor,
        );
        let moving = moves(&map.holders, &target);
        // Keys per slot: this node's count for a slot it holds, and the
        // mean of those for the others.
        let counts = shard::counts()?;
        let held: Vec<u32> = (0..map.holders.len() as u32)
            .filter(|&slot| map.holders[slot as usize].contains(&s.node))
            .collect();
        let known: u64 = held
            .iter()
            .map(|slot| counts.get(slot).copied().unwrap_or(0))
            .sum();
        let mean = known as f64 / held.len().max(1) as f64;
        let keys: f64 = moving
            .iter()
            .map(|m| {
                let slot = m["slot"].as_u64().unwrap_or(0) as u32;
                match held.contains(&slot) {
                    true => counts.get(&slot).copied().unwrap_or(0) as f64,
                    false => mean,
                }
            })
            .sum();
        let primaries = map
            .holders
            .iter()
            .zip(&target)
            .filter(|(a, b)| a.first() != b.first())
            .count();
        return Ok(Response::json(
            200,
            &json!({
                "dry_run": true,
                "members": members,
                "slots_moving": moving.len(),
                "primaries_changing": primaries,
                "keys_moving_estimate": keys.round() as u64,
                "moves": moving,
            }),
        ));
    }
    let Some(plan) = &s.plan else {
        return Ok(Response::json(
            200,
            &json!({ "epoch": map.epoch, "plan": null }),
        ));
    };
    let copy = s
        .copy
        .as_ref()
        .map(|c| json!({ "slot": c.slot, "to": c.to, "keys": c.keys }));
    Ok(Response::json(
        200,
        &json!({
            "epoch": map.epoch,
            "plan": {
                "epoch": plan.epoch,
                "members": plan.members,
                "started_ms": plan.started_ms,
                "slots_moving": moves(&map.holders, &plan.target).len(),
                "slots_left": plan.pending.len(),
                "pending": plan.pending,
                "moves": moves(&map.holders, &plan.target),
            },
            "this_node": { "keys_copied": s.copied, "copying": copy },
        }),
    ))
}

fn abort(s: &mut Sharding, _: &Request, _: &Params) -> http::Result<consensus::Pending> {
    let Some(plan) = &s.plan else {
        return Err(Response::error(404, "no plan to abort"));
    };
    let cmd = Command::Abort { epoch: plan.epoch };
    Ok(consensus::submit(s, &cmd, |_: &mut Sharding, done| {
        Response::json(200, &json!({ "aborted": done.output }))
    })?)
}

fn drain(s: &mut Sharding, req: &Request, params: &Params) -> http::Result<consensus::Pending> {
    let node = params.ident("node")?;
    let drain = req.method == plexus_sdk::Method::Post;
    let cmd = Command::Drain {
        node: node.clone(),
        drain,
    };
    Ok(consensus::submit(s, &cmd, move |_: &mut Sharding, _| {
        Response::json(200, &json!({ "node": node, "drained": drain }))
    })?)
}

fn stats(s: &mut Sharding, _: &Request, _: &Params) -> http::Result {
    let Some(map) = &s.map else {
        return Ok(Response::error(404, "no shard map yet"));
    };
    let (mut primary, mut replica) = ((0u64, 0u64, 0u64), (0u64, 0u64, 0u64));
    for (slot, holders) in map.holders.iter().enumerate() {
        let Some(at) = holders.iter().position(|n| *n == s.node) else {
            continue;
        };
        let (keys, bytes) = shard::size(slot as u32)?;
        let row = if at == 0 { &mut primary } else { &mut replica };
        row.0 += 1;
        row.1 += keys;
        row.2 += bytes;
    }
    let row = |(slots, keys, bytes): (u64, u64, u64)| json!({ "slots": slots, "keys": keys, "bytes": bytes });
    Ok(Response::json(
        200,
        &json!({ "node": s.node, "epoch": map.epoch, "primary": row(primary), "replica": row(replica) }),
    ))
}

impl Sharding {
    /// The leader's look at membership: proposes a placement when the
    /// members that should hold slots are not the map's (or the plan's).
    fn check(&mut self) {
        timers::set(TIMER_CHECK, CHECK_EVERY_MS);
        if consensus::leader().as_deref() != Some(self.node.as_str()) {
            return;
        }
        let now = timers::now_ms();
        if self.proposed_at.is_some_and(|at| now < at + 5000) {
            return;
        }
        let mut live = Vec::new();
        // Voters of the log only: a node holds slots once it applies the
        // map (`plexus cluster join`).
        for m in membership::members().into_iter().filter(|m| m.voter) {
            if m.state == MemberState::Dead {
                self.dead_since.entry(m.id.clone()).or_insert(now);
            } else {
                self.dead_since.remove(&m.id);
                live.push(m.id);
            }
        }
        let grace = self.settings.dead_grace_ms;
        let dead: Vec<String> = self
            .dead_since
            .iter()
            .filter(|(_, since)| now >= **since + grace)
            .map(|(n, _)| n.clone())
            .collect();
        let mut members: Vec<String> = live
            .into_iter()
            .filter(|n| !self.drained.contains(n))
            .collect();
        members.sort();
        if members.is_empty() {
            return;
        }
        let holds_dead = self.map.as_ref().is_some_and(|m| {
            m.holders
                .iter()
                .any(|h| h.len() > 1 && h.iter().any(|n| dead.contains(n)))
        });
        let wanted = match (&self.map, &self.plan) {
            (None, _) => true,
            (Some(_), Some(plan)) => plan.members != members || holds_dead,
            (Some(map), None) => map.members != members || holds_dead,
        };
        if !wanted {
            return;
        }
        let cmd = Command::Rebalance {
            members,
            dead,
            slots: self.settings.slots,
            replicas: self.settings.replicas,
            balance_factor: self.settings.balance_factor,
            now_ms: now,
        };
        if consensus::submit(self, &cmd, |_: &mut Sharding, _| {
            Response::json(200, &json!({}))
        })
        .is_ok()
        {
            self.proposed_at = Some(now);
        }
    }

    /// One step of this node's work: the next batch of a copy, the report
    /// of copied slots, or some clean-up of slots it no longer holds.
    fn work(&mut self) {
        let now = timers::now_ms();
        if self
            .reporting
            .is_some_and(|since| now < since + REPORT_TIMEOUT_MS)
        {
            return;
        }
        self.reporting = None;
        if self.copy.as_ref().is_some_and(|c| c.in_flight) {
            return;
        }
        if self.copy.is_none() {
            self.copy = self.next_copy();
        }
        if self.copy.is_some() {
            self.copy_step();
            return;
        }
        if !self.caught.is_empty() {
            self.report();
            return;
        }
        match shard::drop_unheld(self.slots(), |slot| {
            self.write_set(slot).contains(&self.node)
        }) {
            Ok(true) => {
                timers::set(TIMER_WORK, WORK_EVERY_MS);
            }
            Ok(false) => {}
            Err(_) => {
                timers::set(TIMER_WORK, 1000);
            }
        }
    }

    /// Proposes that the slots copied so far caught up.
    fn report(&mut self) {
        let Some(plan) = &self.plan else {
            self.caught.clear();
            return;
        };
        let cmd = Command::Caught {
            epoch: plan.epoch,
            slots: std::mem::take(&mut self.caught),
        };
        self.reporting = Some(timers::now_ms());
        if consensus::submit(self, &cmd, |_: &mut Sharding, _| {
            Response::json(200, &json!({}))
        })
        .is_err()
        {
            self.reporting = None;
        }
        // Applying the report sets the work going again; this is in case
        // the report is lost.
        timers::set(TIMER_WORK, REPORT_TIMEOUT_MS);
    }

    /// The next slot this node must copy: one of the plan's pending slots
    /// whose primary it is.
    fn next_copy(&mut self) -> Option<Copy> {
        self.copies += 1;
        let id = self.copies;
        let (map, plan) = (self.map.as_ref()?, self.plan.as_ref()?);
        plan.pending.iter().find_map(|&slot| {
            let holders = &map.holders[slot as usize];
            if holders.first() != Some(&self.node) || self.caught.contains(&slot) {
                return None;
            }
            let to: Vec<String> = plan.target[slot as usize]
                .iter()
                .filter(|n| !holders.contains(n))
                .cloned()
                .collect();
            Some(Copy {
                id,
                slot,
                to,
                after: None,
                keys: 0,
                in_flight: false,
            })
        })
    }

    fn copy_step(&mut self) {
        let epoch = self.epoch();
        let Some(c) = &mut self.copy else { return };
        let page = match shard::page(c.slot, c.after.as_deref(), self.settings.copy_batch) {
            Ok(page) => page,
            Err(_) => {
                timers::set(TIMER_WORK, 1000);
                return;
            }
        };
        if page.is_empty() {
            // All of it is there: reported with others, a few hundred
            // slots to an entry.
            self.caught.push(c.slot);
            self.copy = None;
            if self.caught.len() >= 256 || self.next_copy().is_none() {
                self.report();
            } else {
                timers::set(TIMER_WORK, 0);
            }
            return;
        }
        c.after = page.last().map(|(k, _)| k.clone());
        c.keys += page.len() as u64;
        c.in_flight = true;
        let put = codec::encode(&Put {
            epoch,
            slot: c.slot,
            items: page,
        });
        let (id, to) = (c.id, c.to.clone());
        send_copy(self, id, put, to, 0);
    }
}

/// Sends a batch of copy `id` to `to[i..]` in turn, then goes on with it
/// (unless the copy was dropped meanwhile: the map changed).
fn send_copy(s: &mut Sharding, id: u64, put: Vec<u8>, to: Vec<String>, i: usize) {
    if s.copy.as_ref().is_none_or(|c| c.id != id) {
        return;
    }
    let Some(node) = to.get(i).cloned() else {
        if let Some(c) = &mut s.copy {
            c.in_flight = false;
            s.copied += 1;
        }
        timers::set(TIMER_WORK, 0);
        return;
    };
    let sent = messaging::call(
        s,
        &node,
        "copy",
        &put.clone(),
        CALL_TIMEOUT_MS,
        move |s: &mut Sharding, reply| {
            match reply.map(|b| codec::decode::<Ack>(&b)) {
                Ok(Ok(Ack::Done)) => send_copy(s, id, put, to, i + 1),
                // Start the slot again later: the maps differ, or the holder
                // is away.
                _ if s.copy.as_ref().is_some_and(|c| c.id == id) => {
                    s.copy = None;
                    timers::set(TIMER_WORK, 500);
                }
                _ => {}
            }
            Response::json(200, &json!({}))
        },
    );
    if sent.is_err() {
        s.copy = None;
        timers::set(TIMER_WORK, 500);
    }
}

impl Pattern for Sharding {
    type Command = Command;
    type Output = bool;

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        if !(1..=3).contains(&settings.replicas)
            || !(1..=65_536).contains(&settings.slots)
            || settings.balance_factor < 100
            || !(1..=10_000).contains(&settings.copy_batch)
        {
            return Err("config: replicas 1..=3, slots 1..=65536, balance_factor at least 100, copy_batch 1..=10000".into());
        }
        let drained: Option<BTreeSet<String>> = load("drained")?;
        timers::set(TIMER_CHECK, 0);
        timers::set(TIMER_WORK, 0);
        Ok(Sharding {
            settings,
            node: ctx.node,
            map: load::<Option<Map>>("map")?.flatten(),
            plan: load::<Option<Plan>>("plan")?.flatten(),
            drained: drained.unwrap_or_default(),
            dead_since: BTreeMap::new(),
            proposed_at: None,
            copy: None,
            caught: Vec::new(),
            reporting: None,
            copies: 0,
            copied: 0,
            caught_up: false,
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .get("/kv/{key}", kv)
            .put("/kv/{key}", kv)
            .delete("/kv/{key}", kv)
            .get("/map", get_map)
            .get("/plan", get_plan)
            .post("/plan/abort", abort)
            .post("/drain/{node}", drain)
            .delete("/drain/{node}", drain)
            .get("/stats", stats)
            .handle(self, req)
    }

    fn on_message(&mut self, _from: NodeId, topic: String, payload: Vec<u8>) -> Option<Vec<u8>> {
        let ack = match topic.as_str() {
            "put" | "copy" => self.on_put(&payload),
            _ => return None,
        };
        Some(codec::encode(&ack))
    }

    fn apply(&mut self, _index: u64, cmd: Command) -> Result<bool, Rejected> {
        let changed = match cmd {
            Command::Rebalance {
                members,
                dead,
                slots,
                replicas,
                balance_factor,
                now_ms,
            } => {
                self.proposed_at = None;
                let (map, plan) = shard::rebalance(
                    self.map.take(),
                    &members,
                    &dead,
                    (slots, replicas, balance_factor),
                    now_ms,
                );
                self.map = Some(map);
                self.plan = plan;
                true
            }
            Command::Caught { epoch, slots } => {
                let Some(plan) = self.plan.as_mut().filter(|p| p.epoch == epoch) else {
                    return Ok(false);
                };
                for slot in slots {
                    plan.pending.remove(&slot);
                }
                if plan.pending.is_empty() {
                    let plan = self.plan.take().expect("checked");
                    if let Some(map) = &mut self.map {
                        map.epoch = plan.epoch;
                        map.members = plan.members;
                        map.holders = plan.target;
                    }
                }
                true
            }
            Command::Abort { epoch } => {
                let matches = self.plan.as_ref().is_some_and(|p| p.epoch == epoch);
                if matches {
                    self.plan = None;
                }
                matches
            }
            Command::Drain { node, drain } => {
                if drain {
                    self.drained.insert(node);
                } else {
                    self.drained.remove(&node);
                }
                keep("drained", &self.drained)?;
                self.proposed_at = None;
                return Ok(true);
            }
        };
        keep("map", &self.map)?;
        keep("plan", &self.plan)?;
        if changed {
            self.copy = None;
            self.reporting = None;
            timers::set(TIMER_WORK, 0);
        }
        Ok(changed)
    }

    fn on_membership(&mut self, events: Vec<MemberEvent>) {
        let now = timers::now_ms();
        for e in events {
            if e.member.state == MemberState::Dead {
                self.dead_since.entry(e.member.id).or_insert(now);
            } else {
                self.dead_since.remove(&e.member.id);
            }
        }
    }

    fn on_timer(&mut self, id: u64) {
        match id {
            TIMER_CHECK => self.check(),
            TIMER_WORK => self.work(),
            _ => {}
        }
    }
}

export_pattern!(Sharding);

#[cfg(test)]
mod tests;
