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
//! - counters (PN-counter): one increment and one decrement total per node;
//! - sets (observed-remove set): a remove takes out the adds it has seen,
//!   so an add concurrent with a remove wins;
//! - registers (last-writer-wins): the write with the latest wall-clock
//!   time wins, ties broken by node id; a delete is a write of nothing.
//!
//! Gossip: every `gossip_ms` (default 500) the node broadcasts its state
//! when it changed since the last round, and every tenth round in any
//! case, so a member that missed a round catches up. A member that turns
//! alive gets the state at once. The replica is kept in storage, so a
//! restarted node starts from what it had.
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
const STATE_KEY: &str = "state";
/// Topic of a gossiped state.
const STATE: &str = "state";
/// Topic of a request for one counter's local value.
const COUNTER: &str = "counter";
/// Rounds after which the state goes out even when unchanged.
const REFRESH_ROUNDS: u32 = 10;
const MAX_NAME: usize = 256;

/// A node's id, as the tags and tie-breaks use it.
type Node = String;

#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
struct PnCounter {
    /// Per node: (increments, decrements), each only ever growing.
    per_node: BTreeMap<Node, (u64, u64)>,
}

impl PnCounter {
    fn value(&self) -> i128 {
        self.per_node
            .values()
            .map(|(p, n)| i128::from(*p) - i128::from(*n))
            .sum()
    }

    fn merge(&mut self, other: &PnCounter) {
        for (node, (p, n)) in &other.per_node {
            let mine = self.per_node.entry(node.clone()).or_default();
            mine.0 = mine.0.max(*p);
            mine.1 = mine.1.max(*n);
        }
    }
}

#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
struct OrSet {
    /// Element → the tags of the adds seen.
    adds: BTreeMap<String, BTreeSet<(Node, u64)>>,
    /// Tags whose adds were removed.
    removed: BTreeSet<(Node, u64)>,
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
    node: Node,
}

impl Lww {
    fn newer_than(&self, other: &Lww) -> bool {
        (self.at_ms, &self.node) > (other.at_ms, &other.node)
    }
}

/// One replica: what a node gossips and keeps in storage.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
struct Replica {
    counters: BTreeMap<String, PnCounter>,
    sets: BTreeMap<String, OrSet>,
    registers: BTreeMap<String, Lww>,
    /// The last tag this node gave a set add.
    tag: u64,
}

impl Replica {
    /// Merges `other` in; returns whether anything changed.
    fn merge(&mut self, other: &Replica) -> bool {
        let before = self.clone();
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
        *self != before
    }
}

#[derive(Deserialize)]
struct Settings {
    #[serde(default = "default_gossip_ms")]
    gossip_ms: u64,
}

fn default_gossip_ms() -> u64 {
    500
}

struct Gossip {
    node: Node,
    settings: Settings,
    replica: Replica,
    /// Changed since the last broadcast.
    dirty: bool,
    /// Rounds since the last broadcast.
    quiet: u32,
}

impl Gossip {
    /// Keeps the replica in storage (the hook's writes commit when it
    /// returns) and marks it for the next round.
    fn changed(&mut self) -> http::Result<()> {
        self.dirty = true;
        storage::put_typed(STATE_KEY, &self.replica)
            .map(drop)
            .map_err(|e| Response::error(503, &format!("storing the replica: {e}")))
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

fn name(params: &Params, key: &str) -> http::Result<String> {
    let name = params.get(key).unwrap_or_default();
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Response::error(
            400,
            &format!("{key} must be 1..={MAX_NAME} bytes"),
        ));
    }
    Ok(name.to_string())
}

fn counter_json(name: &str, c: Option<&PnCounter>) -> serde_json::Value {
    let by_node: BTreeMap<&str, i128> = c
        .map(|c| {
            c.per_node
                .iter()
                .map(|(n, (p, d))| (n.as_str(), i128::from(*p) - i128::from(*d)))
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "name": name,
        "value": c.map_or(0, PnCounter::value),
        "by_node": by_node,
    })
}

fn get_counter(g: &mut Gossip, _: &Request, params: &Params) -> http::Result {
    let name = name(params, "name")?;
    Ok(Response::json(
        200,
        &counter_json(&name, g.replica.counters.get(&name)),
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
    let name = name(params, "name")?;
    let by = if req.body.is_empty() {
        1
    } else {
        req.json::<By>()?.by
    };
    let counter = g.replica.counters.entry(name.clone()).or_default();
    let mine = counter.per_node.entry(g.node.clone()).or_default();
    let total = if up { &mut mine.0 } else { &mut mine.1 };
    *total = total
        .checked_add(by)
        .ok_or_else(|| Response::error(400, "the counter would overflow"))?;
    g.changed()?;
    Ok(Response::json(
        200,
        &counter_json(&name, g.replica.counters.get(&name)),
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
    let name = name(params, "name")?;
    Ok(Response::json(
        200,
        &set_json(&name, g.replica.sets.get(&name)),
    ))
}

fn add_to_set(g: &mut Gossip, req: &Request, params: &Params) -> http::Result {
    let name = name(params, "name")?;
    let element = element(req)?;
    g.replica.tag += 1;
    let tag = (g.node.clone(), g.replica.tag);
    g.replica
        .sets
        .entry(name.clone())
        .or_default()
        .adds
        .entry(element)
        .or_default()
        .insert(tag);
    g.changed()?;
    Ok(Response::json(
        200,
        &set_json(&name, g.replica.sets.get(&name)),
    ))
}

fn remove_from_set(g: &mut Gossip, req: &Request, params: &Params) -> http::Result {
    let name = name(params, "name")?;
    let element = element(req)?;
    let Some(set) = g.replica.sets.get_mut(&name) else {
        return Ok(Response::json(200, &set_json(&name, None)));
    };
    let seen: Vec<(Node, u64)> = set
        .adds
        .get(&element)
        .map(|tags| tags.iter().cloned().collect())
        .unwrap_or_default();
    set.removed.extend(seen);
    g.changed()?;
    Ok(Response::json(
        200,
        &set_json(&name, g.replica.sets.get(&name)),
    ))
}

fn get_register(g: &mut Gossip, _: &Request, params: &Params) -> http::Result {
    let key = name(params, "key")?;
    match g.replica.registers.get(&key) {
        Some(Lww {
            value: Some(v),
            at_ms,
            node,
        }) => Ok(Response::text(200, v)
            .with_header("x-written-at-ms", &at_ms.to_string())
            .with_header("x-written-by", node)),
        _ => Ok(Response::error(404, "no such register")),
    }
}

fn write_register(g: &mut Gossip, key: String, value: Option<String>) -> http::Result {
    let mut write = Lww {
        value,
        at_ms: timers::now_ms(),
        node: g.node.clone(),
    };
    // A clock behind the current write's must still win over it here:
    // the client saw that value.
    if let Some(current) = g.replica.registers.get(&key)
        && !write.newer_than(current)
    {
        write.at_ms = current.at_ms + 1;
    }
    let at_ms = write.at_ms;
    g.replica.registers.insert(key, write);
    g.changed()?;
    Ok(Response::json(200, &serde_json::json!({ "at_ms": at_ms })))
}

fn put_register(g: &mut Gossip, req: &Request, params: &Params) -> http::Result {
    let key = name(params, "key")?;
    let value = String::from_utf8(req.body.clone())
        .map_err(|_| Response::error(400, "the value must be UTF-8"))?;
    write_register(g, key, Some(value))
}

fn delete_register(g: &mut Gossip, _: &Request, params: &Params) -> http::Result {
    let key = name(params, "key")?;
    write_register(g, key, None)
}

fn peer_counter(g: &mut Gossip, _: &Request, params: &Params) -> http::Result {
    let node = name(params, "node")?;
    let counter = name(params, "name")?;
    if node == g.node {
        return Ok(Response::json(
            200,
            &counter_json(&counter, g.replica.counters.get(&counter)),
        ));
    }
    match messaging::request(&node, COUNTER, counter.as_bytes(), 2000) {
        Ok(answer) => Ok(Response::new(200, "application/json", answer)),
        Err(messaging::Error::UnknownNode(n)) => {
            Err(Response::error(404, &format!("no member {n}")))
        }
        Err(messaging::Error::Timeout) => Err(Response::error(504, "the peer did not answer")),
        Err(e) => Err(Response::error(503, &e.to_string())),
    }
}

impl Pattern for Gossip {
    type Output = ();

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings =
            serde_json::from_str(&ctx.config).map_err(|e| format!("invalid config: {e}"))?;
        if !(10..=60_000).contains(&settings.gossip_ms) {
            return Err("gossip_ms must be in 10..=60000".into());
        }
        let replica = storage::get_typed::<Replica>(STATE_KEY)
            .map_err(|e| format!("reading the replica: {e}"))?
            .map(|(r, _)| r)
            .unwrap_or_default();
        timers::set(GOSSIP_TIMER, settings.gossip_ms);
        Ok(Gossip {
            node: ctx.node,
            settings,
            replica,
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
                match codec::decode::<Replica>(&payload) {
                    Ok(theirs) => {
                        if self.replica.merge(&theirs)
                            && let Err(e) = storage::put_typed(STATE_KEY, &self.replica)
                        {
                            plexus_sdk::warn!("storing the merged replica: {}", e);
                        }
                    }
                    Err(e) => plexus_sdk::warn!("a state from {} did not decode: {}", from, e),
                }
                None
            }
            COUNTER => {
                let name = String::from_utf8_lossy(&payload);
                let json = counter_json(&name, self.replica.counters.get(name.as_ref()));
                Some(json.to_string().into_bytes())
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
        codec::encode(&self.replica)
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        let theirs: Replica = codec::decode(&state).map_err(|e| e.to_string())?;
        self.replica.merge(&theirs);
        self.replica.tag = self.replica.tag.max(theirs.tag);
        Ok(())
    }
}

export_pattern!(Gossip);

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(entries: &[(&str, u64, u64)]) -> PnCounter {
        PnCounter {
            per_node: entries
                .iter()
                .map(|(n, p, d)| (n.to_string(), (*p, *d)))
                .collect(),
        }
    }

    #[test]
    fn merging_is_order_insensitive_and_idempotent() {
        let mut a = Replica::default();
        a.counters.insert("c".into(), counter(&[("n1", 3, 1)]));
        a.registers.insert(
            "k".into(),
            Lww {
                value: Some("a".into()),
                at_ms: 5,
                node: "n1".into(),
            },
        );
        let mut b = Replica::default();
        b.counters
            .insert("c".into(), counter(&[("n1", 2, 0), ("n2", 4, 0)]));
        b.registers.insert(
            "k".into(),
            Lww {
                value: Some("b".into()),
                at_ms: 5,
                node: "n2".into(),
            },
        );
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert!(!ab.clone().merge(&a), "merging again changes nothing");
        assert_eq!(ab.counters["c"].value(), 3 - 1 + 4);
        assert_eq!(
            ab.registers["k"].value.as_deref(),
            Some("b"),
            "ties go to the larger node id"
        );
    }

    #[test]
    fn a_concurrent_add_survives_a_remove() {
        let mut s = OrSet::default();
        s.adds
            .entry("x".into())
            .or_default()
            .insert(("n1".into(), 1));
        let mut removed = s.clone();
        removed.removed.insert(("n1".into(), 1));
        let mut added_again = s.clone();
        added_again
            .adds
            .entry("x".into())
            .or_default()
            .insert(("n2".into(), 1));
        removed.merge(&added_again);
        assert_eq!(removed.elements(), ["x"]);
        let mut only_removed = s.clone();
        only_removed.removed.insert(("n1".into(), 1));
        assert!(only_removed.elements().is_empty());
    }
}
