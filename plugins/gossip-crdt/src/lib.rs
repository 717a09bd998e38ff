//! gossip-crdt: replicated data types that converge on every node without
//! a leader or a log.
//!
//! Each node changes its own replica at once and spreads its whole state
//! to every alive member by gossip; a node that receives a state merges it
//! into its own. Merging is commutative, associative and idempotent, so
//! replicas that have seen the same updates hold the same value, in
//! whatever order and however often the states arrived. A node that was
//! cut off keeps serving its own replica and catches up when it hears the
//! others again.
//!
//! Types, each named by the client:
//! - counters (PN-counter): one increment and one decrement total per
//!   replica;
//! - sets (observed-remove set): a remove takes out the adds it has seen,
//!   so an add concurrent with a remove wins;
//! - registers (last-writer-wins): the write with the latest timestamp
//!   wins, ties broken by replica id, then by value; a delete is a write
//!   of nothing. A write is stamped with the wall clock, or just past the
//!   value it replaces when the clock is behind that one.
//!
//! A replica is known by the node's id and the time its state was first
//! created (`node-1#1764...`): a node whose data directory was wiped
//! starts a new replica, and its counts and set tags cannot collide with
//! those of its old one, which the others still hold.
//!
//! Gossip: every `gossip_ms` (10..=60000, default 500) the node broadcasts
//! its state when it changed here since the last round, and every tenth
//! round in any case, so a member that missed a round catches up; a state
//! merged from a peer goes out with those refresh rounds. A member that
//! turns alive gets the state at once. The replica is kept in storage, so
//! a restarted node starts from what it had. The whole state must fit in
//! one message and one stored value (the node's limits, 1 MiB by default):
//! a change that would outgrow them is refused with 413.
//!
//! HTTP (below `/v1/plugins/<name>`):
//! - `GET /counters/{name}`; `POST /counters/{name}/incr` and
//!   `/decr` with an optional `{"by": N}`;
//! - `GET /sets/{name}`; `POST /sets/{name}/add` and `/remove`, the
//!   element as the body;
//! - `GET /registers/{key}`; `PUT` and `DELETE /registers/{key}`;
//! - `GET /peers/{node}/counters/{name}`: that node's replica of a counter,
//!   asked with a request over the cluster.

use std::collections::{BTreeMap, BTreeSet};

use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::{
    InitContext, MemberEvent, MemberState, Pattern, Reply, Request, Response, codec,
    export_pattern, messaging, storage, timers,
};
use serde::{Deserialize, Serialize};

const GOSSIP_TIMER: u64 = 1;
/// Storage key of the replica.
const STATE_KEY: &str = "state";
/// Storage key of this node's [`Local`] identity.
const LOCAL_KEY: &str = "local";
/// Topic of a gossiped state.
const STATE: &str = "state";
/// Topic of a request for one counter's local value.
const COUNTER: &str = "counter";
/// Rounds after which the state goes out even when unchanged.
const REFRESH_ROUNDS: u32 = 10;
const MAX_NAME: usize = 256;
/// How long a peer has to answer a request.
const PEER_TIMEOUT_MS: u32 = 5000;

/// A replica's id: `node#created_ms`.
type ReplicaId = String;

/// The node a replica id belongs to.
fn node_of(id: &str) -> &str {
    id.rsplit_once('#').map_or(id, |(node, _)| node)
}

#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
struct PnCounter {
    /// Per replica: (increments, decrements), each only ever growing.
    per_replica: BTreeMap<ReplicaId, (u64, u64)>,
}

impl PnCounter {
    fn value(&self) -> i128 {
        self.per_replica
            .values()
            .map(|(p, n)| i128::from(*p) - i128::from(*n))
            .sum()
    }

    /// The value by node, the replicas of one node summed.
    fn by_node(&self) -> BTreeMap<&str, i128> {
        let mut out = BTreeMap::new();
        for (id, (p, n)) in &self.per_replica {
            *out.entry(node_of(id)).or_default() += i128::from(*p) - i128::from(*n);
        }
        out
    }

    fn merge(&mut self, other: &PnCounter) {
        for (id, (p, n)) in &other.per_replica {
            let mine = self.per_replica.entry(id.clone()).or_default();
            mine.0 = mine.0.max(*p);
            mine.1 = mine.1.max(*n);
        }
    }
}

#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
struct OrSet {
    /// Element → the tags of the adds seen: (replica, its sequence number).
    adds: BTreeMap<String, BTreeSet<(ReplicaId, u64)>>,
    /// Tags whose adds were removed.
    removed: BTreeSet<(ReplicaId, u64)>,
}

impl OrSet {
    fn elements(&self) -> Vec<&str> {
        self.adds
            .iter()
            .filter(|(_, tags)| tags.iter().any(|t| !self.removed.contains(t)))
            .map(|(e, _)| e.as_str())
            .collect()
    }

    fn merge(&mut self, other: &OrSet) {
        for (element, tags) in &other.adds {
            self.adds
                .entry(element.clone())
                .or_default()
                .extend(tags.iter().cloned());
        }
        self.removed.extend(other.removed.iter().cloned());
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Lww {
    /// `None` once deleted.
    value: Option<String>,
    at_ms: u64,
    replica: ReplicaId,
}

impl Lww {
    fn newer_than(&self, other: &Lww) -> bool {
        (self.at_ms, &self.replica, &self.value) > (other.at_ms, &other.replica, &other.value)
    }
}

/// One replica's state: what a node gossips and keeps in storage.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
struct Replica {
    counters: BTreeMap<String, PnCounter>,
    sets: BTreeMap<String, OrSet>,
    registers: BTreeMap<String, Lww>,
}

impl Replica {
    /// Merges `other` in.
    fn merge(&mut self, other: &Replica) {
        for (name, c) in &other.counters {
            self.counters.entry(name.clone()).or_default().merge(c);
        }
        for (name, s) in &other.sets {
            self.sets.entry(name.clone()).or_default().merge(s);
        }
        for (key, r) in &other.registers {
            match self.registers.get(key) {
                Some(mine) if !r.newer_than(mine) => {}
                _ => {
                    self.registers.insert(key.clone(), r.clone());
                }
            }
        }
    }

    /// The highest set tag of replica `id` in this state.
    fn last_tag_of(&self, id: &str) -> u64 {
        self.sets
            .values()
            .flat_map(|s| s.adds.values().flatten().chain(&s.removed))
            .filter(|(r, _)| r == id)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    }
}

/// This node's replica identity, kept in storage apart from the state.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Local {
    id: ReplicaId,
    /// The last sequence number given to a set add.
    tag: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_gossip_ms")]
    gossip_ms: u64,
}

fn default_gossip_ms() -> u64 {
    500
}

struct Gossip {
    node: String,
    settings: Settings,
    local: Local,
    replica: Replica,
    /// The largest state that can be stored and gossiped.
    max_state_bytes: usize,
    /// Changed here since the last broadcast.
    dirty: bool,
    /// Rounds since the last broadcast.
    quiet: u32,
}

impl Gossip {
    /// Makes `next` the replica (and `local`, when given, the identity)
    /// once both are in storage; the hook's writes commit when it returns.
    /// Refused, changing nothing, when the state outgrows the limits.
    fn commit(&mut self, next: Replica, local: Option<Local>) -> http::Result<()> {
        let encoded = codec::encode(&next);
        if encoded.len() > self.max_state_bytes {
            return Err(Response::error(
                413,
                &format!(
                    "the replica would be {} bytes, over the {} a message and a stored value can hold",
                    encoded.len(),
                    self.max_state_bytes
                ),
            ));
        }
        let stored = storage::put(STATE_KEY, &encoded).and_then(|_| match &local {
            Some(l) => storage::put_typed(LOCAL_KEY, l).map(drop),
            None => Ok(()),
        });
        stored?;
        self.replica = next;
        if let Some(l) = local {
            self.local = l;
        }
        Ok(())
    }

    /// [`commit`](Self::commit) of a change made here: it goes out with
    /// the next round.
    fn change(&mut self, next: Replica, local: Option<Local>) -> http::Result<()> {
        self.commit(next, local)?;
        self.dirty = true;
        Ok(())
    }

    /// Merges a state from elsewhere (a peer, a swapped-out version).
    fn absorb(&mut self, theirs: &Replica) -> Result<(), String> {
        let mut next = self.replica.clone();
        next.merge(theirs);
        if next == self.replica {
            return Ok(());
        }
        // A tag of ours that we no longer know of (our storage went back):
        // never give it out again.
        let seen = next.last_tag_of(&self.local.id);
        let local = (seen > self.local.tag).then(|| Local {
            tag: seen,
            ..self.local.clone()
        });
        self.commit(next, local)
            .map_err(|r| String::from_utf8_lossy(&r.body).into_owned())
    }

    fn round(&mut self) {
        self.quiet += 1;
        if self.dirty || self.quiet >= REFRESH_ROUNDS {
            match messaging::broadcast(STATE, &codec::encode(&self.replica)) {
                Ok(_) => {
                    self.dirty = false;
                    self.quiet = 0;
                }
                Err(e) => plexus_sdk::warn!("gossip round failed: {}", e),
            }
        }
        timers::set(GOSSIP_TIMER, self.settings.gossip_ms);
    }
}

/// A counter as the client sees it. The sums can pass `i64`: serialised
/// by serde_json as plain numbers.
#[derive(Serialize)]
struct CounterView<'a> {
    name: &'a str,
    value: i128,
    by_node: BTreeMap<&'a str, i128>,
}

fn counter_view<'a>(name: &'a str, c: Option<&'a PnCounter>) -> CounterView<'a> {
    CounterView {
        name,
        value: c.map_or(0, PnCounter::value),
        by_node: c.map(PnCounter::by_node).unwrap_or_default(),
    }
}

fn get_counter(g: &mut Gossip, _: &Request, params: &Params) -> http::Result {
    let name = params.text("name", MAX_NAME)?;
    Ok(Response::json(
        200,
        &counter_view(&name, g.replica.counters.get(&name)),
    ))
}

#[derive(Deserialize)]
struct By {
    #[serde(default = "one")]
    by: u64,
}

fn one() -> u64 {
    1
}

fn add_to_counter(g: &mut Gossip, req: &Request, params: &Params, up: bool) -> http::Result {
    let name = params.text("name", MAX_NAME)?;
    let by = if req.body.is_empty() {
        1
    } else {
        req.json::<By>()?.by
    };
    let mut next = g.replica.clone();
    let mine = next
        .counters
        .entry(name.clone())
        .or_default()
        .per_replica
        .entry(g.local.id.clone())
        .or_default();
    let total = if up { &mut mine.0 } else { &mut mine.1 };
    *total = total
        .checked_add(by)
        .ok_or_else(|| Response::error(400, "this node's total would overflow"))?;
    g.change(next, None)?;
    Ok(Response::json(
        200,
        &counter_view(&name, g.replica.counters.get(&name)),
    ))
}

fn incr(g: &mut Gossip, req: &Request, params: &Params) -> http::Result {
    add_to_counter(g, req, params, true)
}

fn decr(g: &mut Gossip, req: &Request, params: &Params) -> http::Result {
    add_to_counter(g, req, params, false)
}

fn element(req: &Request) -> http::Result<String> {
    match std::str::from_utf8(&req.body) {
        Ok(e) if !e.is_empty() && e.len() <= MAX_NAME => Ok(e.to_string()),
        _ => Err(Response::error(
            400,
            &format!("the element must be 1..={MAX_NAME} bytes of UTF-8"),
        )),
    }
}

fn set_json(name: &str, s: Option<&OrSet>) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "elements": s.map(OrSet::elements).unwrap_or_default(),
    })
}

fn get_set(g: &mut Gossip, _: &Request, params: &Params) -> http::Result {
    let name = params.text("name", MAX_NAME)?;
    Ok(Response::json(
        200,
        &set_json(&name, g.replica.sets.get(&name)),
    ))
}

fn add_to_set(g: &mut Gossip, req: &Request, params: &Params) -> http::Result {
    let name = params.text("name", MAX_NAME)?;
    let element = element(req)?;
    let local = Local {
        tag: g.local.tag + 1,
        ..g.local.clone()
    };
    let mut next = g.replica.clone();
    next.sets
        .entry(name.clone())
        .or_default()
        .adds
        .entry(element)
        .or_default()
        .insert((local.id.clone(), local.tag));
    g.change(next, Some(local))?;
    Ok(Response::json(
        200,
        &set_json(&name, g.replica.sets.get(&name)),
    ))
}

fn remove_from_set(g: &mut Gossip, req: &Request, params: &Params) -> http::Result {
    let name = params.text("name", MAX_NAME)?;
    let element = element(req)?;
    let mut next = g.replica.clone();
    if let Some(set) = next.sets.get_mut(&name) {
        let seen: Vec<(ReplicaId, u64)> = set
            .adds
            .get(&element)
            .map(|tags| tags.iter().cloned().collect())
            .unwrap_or_default();
        set.removed.extend(seen);
        g.change(next, None)?;
    }
    Ok(Response::json(
        200,
        &set_json(&name, g.replica.sets.get(&name)),
    ))
}

fn get_register(g: &mut Gossip, _: &Request, params: &Params) -> http::Result {
    let key = params.text("key", MAX_NAME)?;
    match g.replica.registers.get(&key) {
        Some(Lww {
            value: Some(v),
            at_ms,
            replica,
        }) => Ok(Response::text(200, v)
            .with_header("x-written-at-ms", &at_ms.to_string())
            .with_header("x-written-by", node_of(replica))),
        _ => Ok(Response::error(404, "no such register")),
    }
}

fn write_register(g: &mut Gossip, key: String, value: Option<String>) -> http::Result {
    let mut write = Lww {
        value,
        at_ms: timers::now_ms(),
        replica: g.local.id.clone(),
    };
    // The client saw the current value: the write must win over it here,
    // even when this node's clock is behind the one that stamped it.
    if let Some(current) = g.replica.registers.get(&key)
        && !write.newer_than(current)
    {
        write.at_ms = current
            .at_ms
            .checked_add(1)
            .ok_or_else(|| Response::error(409, "the register's timestamp is exhausted"))?;
    }
    let at_ms = write.at_ms;
    let mut next = g.replica.clone();
    next.registers.insert(key, write);
    g.change(next, None)?;
    Ok(Response::json(200, &serde_json::json!({ "at_ms": at_ms })))
}

fn put_register(g: &mut Gossip, req: &Request, params: &Params) -> http::Result {
    let key = params.text("key", MAX_NAME)?;
    let value = String::from_utf8(req.body.clone())
        .map_err(|_| Response::error(400, "the value must be UTF-8"))?;
    write_register(g, key, Some(value))
}

fn delete_register(g: &mut Gossip, _: &Request, params: &Params) -> http::Result {
    let key = params.text("key", MAX_NAME)?;
    write_register(g, key, None)
}

fn peer_counter(g: &mut Gossip, _: &Request, params: &Params) -> http::Result {
    let node = params.text("node", MAX_NAME)?;
    let counter = params.text("name", MAX_NAME)?;
    if node == g.node {
        return Ok(Response::json(
            200,
            &counter_view(&counter, g.replica.counters.get(&counter)),
        ));
    }
    let answer = messaging::request(&node, COUNTER, counter.as_bytes(), PEER_TIMEOUT_MS)?;
    Ok(Response::new(200, "application/json", answer))
}

impl Pattern for Gossip {
    type Command = ();
    type Output = ();

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        if !(10..=60_000).contains(&settings.gossip_ms) {
            return Err("gossip_ms must be in 10..=60000".into());
        }
        let replica = storage::get_typed::<Replica>(STATE_KEY)
            .map_err(|e| format!("reading the replica: {e}"))?
            .map(|(r, _)| r)
            .unwrap_or_default();
        // An identity of another node (storage copied from elsewhere) is
        // not ours: start a replica of our own.
        let local = match storage::get_typed::<Local>(LOCAL_KEY)
            .map_err(|e| format!("reading the replica id: {e}"))?
        {
            Some((l, _)) if node_of(&l.id) == ctx.node => l,
            _ => {
                let fresh = Local {
                    id: format!("{}#{}", ctx.node, timers::now_ms()),
                    tag: 0,
                };
                storage::put_typed(LOCAL_KEY, &fresh)
                    .map_err(|e| format!("storing the replica id: {e}"))?;
                fresh
            }
        };
        let max_state_bytes = ctx.limits.max_message_bytes.min(ctx.limits.max_value_bytes) as usize;
        timers::set(GOSSIP_TIMER, settings.gossip_ms);
        Ok(Gossip {
            node: ctx.node,
            settings,
            local,
            replica,
            max_state_bytes,
            dirty: true,
            quiet: 0,
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .get("/counters/{name}", get_counter)
            .post("/counters/{name}/incr", incr)
            .post("/counters/{name}/decr", decr)
            .get("/sets/{name}", get_set)
            .post("/sets/{name}/add", add_to_set)
            .post("/sets/{name}/remove", remove_from_set)
            .get("/registers/{key}", get_register)
            .put("/registers/{key}", put_register)
            .delete("/registers/{key}", delete_register)
            .get("/peers/{node}/counters/{name}", peer_counter)
            .handle(self, req)
    }

    fn on_message(&mut self, from: String, topic: String, payload: Vec<u8>) -> Option<Vec<u8>> {
        match topic.as_str() {
            STATE if from != self.node => {
                let merged = codec::decode::<Replica>(&payload)
                    .map_err(|e| e.to_string())
                    .and_then(|theirs| self.absorb(&theirs));
                if let Err(e) = merged {
                    plexus_sdk::warn!("the state from {} was not merged: {}", from, e);
                }
                None
            }
            COUNTER => {
                let name = String::from_utf8_lossy(&payload);
                let view = counter_view(&name, self.replica.counters.get(name.as_ref()));
                serde_json::to_vec(&view).ok()
            }
            _ => None,
        }
    }

    fn on_membership(&mut self, events: Vec<MemberEvent>) {
        for e in events {
            if e.member.state == MemberState::Alive
                && e.member.id != self.node
                && let Err(err) =
                    messaging::send(&e.member.id, STATE, &codec::encode(&self.replica))
            {
                plexus_sdk::debug!("greeting {} failed: {}", e.member.id, err);
            }
        }
    }

    fn on_timer(&mut self, id: u64) {
        if id == GOSSIP_TIMER {
            self.round();
        }
    }

    fn snapshot(&mut self) -> Vec<u8> {
        codec::encode_versioned(1, &self.replica)
    }

    // Format 1 and the unversioned format before it hold the same replica.
    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        let theirs: Replica = codec::versioned(&state)?.decode()?;
        self.absorb(&theirs)?;
        self.dirty = true;
        Ok(())
    }
}

export_pattern!(Gossip);

#[cfg(test)]
mod hosted;

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(entries: &[(&str, u64, u64)]) -> PnCounter {
        PnCounter {
            per_replica: entries
                .iter()
                .map(|(r, p, d)| (r.to_string(), (*p, *d)))
                .collect(),
        }
    }

    fn lww(value: &str, at_ms: u64, replica: &str) -> Lww {
        Lww {
            value: Some(value.into()),
            at_ms,
            replica: replica.into(),
        }
    }

    #[test]
    fn merging_is_order_insensitive_and_idempotent() {
        let mut a = Replica::default();
        a.counters.insert("c".into(), counter(&[("n1#1", 3, 1)]));
        a.registers.insert("k".into(), lww("a", 5, "n1#1"));
        a.registers.insert("t".into(), lww("x", 7, "n1#1"));
        let mut b = Replica::default();
        b.counters
            .insert("c".into(), counter(&[("n1#1", 2, 0), ("n2#1", 4, 0)]));
        b.registers.insert("k".into(), lww("b", 5, "n2#1"));
        b.registers.insert("t".into(), lww("y", 7, "n1#1"));
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        let mut again = ab.clone();
        again.merge(&a);
        assert_eq!(again, ab, "merging again changes nothing");
        assert_eq!(ab.counters["c"].value(), 3 - 1 + 4);
        assert_eq!(
            ab.registers["k"].value.as_deref(),
            Some("b"),
            "ties go to the larger replica id"
        );
        assert_eq!(
            ab.registers["t"].value.as_deref(),
            Some("y"),
            "then to the larger value"
        );
    }

    #[test]
    fn a_concurrent_add_survives_a_remove() {
        let mut s = OrSet::default();
        s.adds
            .entry("x".into())
            .or_default()
            .insert(("n1#1".into(), 1));
        let mut removed = s.clone();
        removed.removed.insert(("n1#1".into(), 1));
        let mut added_again = s.clone();
        added_again
            .adds
            .entry("x".into())
            .or_default()
            .insert(("n2#1".into(), 1));
        removed.merge(&added_again);
        assert_eq!(removed.elements(), ["x"]);
        let mut only_removed = s.clone();
        only_removed.removed.insert(("n1#1".into(), 1));
        assert!(only_removed.elements().is_empty());
    }

    #[test]
    fn a_new_replica_of_a_node_counts_apart_from_its_old_one() {
        let c = counter(&[("n1#1", 10, 0), ("n1#2", 2, 1), ("n2#1", 5, 0)]);
        assert_eq!(c.value(), 16);
        assert_eq!(c.by_node(), BTreeMap::from([("n1", 11), ("n2", 5)]));
    }

    #[test]
    fn the_last_tag_of_a_replica_is_found_in_adds_and_removes() {
        let mut r = Replica::default();
        let s = r.sets.entry("s".into()).or_default();
        s.adds
            .entry("x".into())
            .or_default()
            .insert(("n1#1".into(), 3));
        s.removed.insert(("n1#1".into(), 9));
        s.removed.insert(("n2#1".into(), 20));
        assert_eq!(r.last_tag_of("n1#1"), 9);
        assert_eq!(r.last_tag_of("n3#1"), 0);
    }

    #[test]
    fn counters_past_i64_still_encode() {
        let c = counter(&[("a#1", u64::MAX, 0), ("b#1", u64::MAX, 0)]);
        let json = serde_json::to_string(&counter_view("big", Some(&c))).unwrap();
        assert!(json.contains("\"value\":36893488147419103230"), "{json}");
    }
}
