//! Native unit tests of a plugin, with the `testing` feature: a
//! [`TestHost`] runs a [`Pattern`] on an in-memory host (storage, the log,
//! timers on a clock the test moves, membership, messages, calls and
//! replies) under plain `cargo test`, in milliseconds.
//!
//! It runs the plugin's own code through the SDK exactly as a node does:
//! commands are encoded, committed to a log and decoded for `apply`;
//! submitted writes are answered when their entry is applied; a swap hands
//! a snapshot to a fresh instance. What it cannot show (other nodes,
//! faults, the real host's limits and timing) is for the integration test
//! that loads the plugin's `.wasm` on real nodes.
//!
//! ```
//! use plexus_sdk::testing::TestHost;
//! use plexus_sdk::{http::Router, consensus, InitContext, Pattern, Reply, Request, Response};
//!
//! struct Counter;
//!
//! impl Pattern for Counter {
//!     type Command = u64;
//!     type Output = u64;
//!
//!     fn init(_: InitContext) -> Result<Self, String> {
//!         Ok(Counter)
//!     }
//!
//!     fn on_request(&mut self, req: Request) -> Reply {
//!         Router::new()
//!             .post("/add/{n}", |c: &mut Counter, _req, params| {
//!                 let n: u64 = params.parse("n")?;
//!                 Ok(consensus::submit(c, &n, |_c: &mut Counter, done| {
//!                     Response::json(200, &done.output)
//!                 })?)
//!             })
//!             .handle(self, req)
//!     }
//!
//!     fn apply(&mut self, _index: u64, n: u64) -> Result<u64, consensus::Rejected> {
//!         let total = plexus_sdk::storage::get_typed::<u64>("total")?.map_or(0, |(t, _)| t) + n;
//!         plexus_sdk::storage::put_typed("total", &total)?;
//!         Ok(total)
//!     }
//! }
//!
//! let mut host = TestHost::<Counter>::start().unwrap();
//! assert_eq!(host.post("/add/2", "").body, b"2");
//! assert_eq!(host.post("/add/3", "").body, b"5");
//! assert_eq!(host.entries().len(), 2);
//! ```

use crate::bindings::plexus::cluster::outbound_http::OutgoingRequest;
use crate::bindings::plexus::cluster::types::{HttpError, MessagingError, PluginError};
use crate::memory::{self, World, with};
use crate::{
    CommittedEntry, ForwardTo, InitContext, Member, MemberEvent, MemberState, Method, NodeId,
    Pattern, Reply, Request, RequestSource, Response,
};

pub use crate::memory::{LogLine, Sent};
pub use crate::replies::Pending;

/// How a request was answered.
#[derive(Debug)]
pub enum Answer {
    /// With this response, at once or once what it waited on was done.
    Done(Response),
    /// Forwarded to another node, which the test host does not run.
    Forwarded(ForwardTo),
    /// Not yet: held, or waiting on a write the log has not committed
    /// (see [`TestHost::pause_log`]). [`TestHost::answer_of`] tells later.
    Waiting(Pending),
}

impl Answer {
    /// The response; panics, naming what happened instead, if there is none.
    #[track_caller]
    pub fn response(self) -> Response {
        match self {
            Answer::Done(r) => r,
            other => panic!("the request was not answered: {other:?}"),
        }
    }
}

/// How to start a [`TestHost`]: the node, its members and the plugin's
/// config. `TestHost::<P>::setup().config(json!({...})).start()`.
pub struct Setup<P> {
    plugin: std::marker::PhantomData<P>,
    node: String,
    members: Vec<String>,
    config: serde_json::Value,
    name: String,
    version: String,
}

impl<P: Pattern> Setup<P> {
    /// This node's id (default `n1`).
    pub fn node(mut self, id: &str) -> Setup<P> {
        self.node = id.to_string();
        self
    }

    /// The cluster's members, all alive voters (default: this node only).
    pub fn members(mut self, ids: &[&str]) -> Setup<P> {
        self.members = ids.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The plugin's `config` table, as the node hands it over: the TOML
    /// table in JSON form.
    pub fn config(mut self, config: serde_json::Value) -> Setup<P> {
        self.config = config;
        self
    }

    /// The plugin's name and version as `init` sees them (default `test`, `0.0.0`).
    pub fn named(mut self, name: &str, version: &str) -> Setup<P> {
        self.name = name.to_string();
        self.version = version.to_string();
        self
    }

    /// Runs `init` on a fresh world.
    pub fn start(self) -> Result<TestHost<P>, String> {
        crate::consensus::forget_all();
        crate::replies::forget_all();
        let mut world = World {
            node: self.node.clone(),
            ..World::default()
        };
        let mut ids = self.members.clone();
        if !ids.contains(&self.node) {
            ids.push(self.node.clone());
        }
        ids.sort();
        world.members = ids
            .iter()
            .map(|id| member(id, MemberState::Alive))
            .collect();
        world.leader = Some(self.node.clone());
        with(|w| *w = world);
        let config = serde_json::to_string(&self.config).map_err(|e| e.to_string())?;
        let mut host = TestHost {
            plugin: None,
            ctx: InitContext {
                config,
                node: self.node,
                name: self.name,
                version: self.version,
                limits: with(|w| w.limits),
            },
            paused: false,
        };
        host.plugin = Some(P::init(host.ctx.clone())?);
        host.settle();
        Ok(host)
    }
}

fn member(id: &str, state: MemberState) -> Member {
    Member {
        id: id.to_string(),
        state,
        voter: true,
        metadata: Vec::new(),
    }
}

/// One plugin instance on an in-memory host. One per thread at a time
/// (each `#[test]` has its own thread).
pub struct TestHost<P: Pattern> {
    plugin: Option<P>,
    ctx: InitContext,
    paused: bool,
}

impl<P: Pattern> TestHost<P> {
    /// How to start one, to set the config, node or members.
    pub fn setup() -> Setup<P> {
        Setup {
            plugin: std::marker::PhantomData,
            node: "n1".into(),
            members: Vec::new(),
            config: serde_json::json!({}),
            name: "test".into(),
            version: "0.0.0".into(),
        }
    }

    /// Starts the plugin on node `n1`, alone, with an empty config.
    pub fn start() -> Result<TestHost<P>, String> {
        Self::setup().start()
    }

    /// Starts the plugin with `config` as its `config` table.
    pub fn with_config(config: serde_json::Value) -> Result<TestHost<P>, String> {
        Self::setup().config(config).start()
    }

    /// The instance, to look at its fields.
    pub fn plugin(&mut self) -> &mut P {
        self.plugin.as_mut().expect("an instance")
    }

    /// Sends a client request and runs what it starts (writes, calls) to
    /// the end.
    pub fn request(&mut self, req: Request) -> Answer {
        let reply = self.plugin().on_request(req);
        self.settle();
        match reply {
            Reply::Done(r) => Answer::Done(r),
            Reply::Forward(to) => Answer::Forwarded(to),
            Reply::Pending(t) => match self.answer_of(Pending(t)) {
                Some(r) => Answer::Done(r),
                None => Answer::Waiting(Pending(t)),
            },
        }
    }

    /// `GET path` (with `?query` if any); panics if it is not answered.
    #[track_caller]
    pub fn get(&mut self, path: &str) -> Response {
        self.request(request(Method::Get, path, Vec::new()))
            .response()
    }

    /// `PUT path` with `body`.
    #[track_caller]
    pub fn put(&mut self, path: &str, body: impl Into<Vec<u8>>) -> Response {
        self.request(request(Method::Put, path, body.into()))
            .response()
    }

    /// `POST path` with `body`.
    #[track_caller]
    pub fn post(&mut self, path: &str, body: impl Into<Vec<u8>>) -> Response {
        self.request(request(Method::Post, path, body.into()))
            .response()
    }

    /// `DELETE path`.
    #[track_caller]
    pub fn delete(&mut self, path: &str) -> Response {
        self.request(request(Method::Delete, path, Vec::new()))
            .response()
    }

    /// The response to a request that was waiting, once it has one.
    pub fn answer_of(&mut self, pending: Pending) -> Option<Response> {
        with(|w| {
            let mut t = pending.0;
            for _ in 0..1024 {
                if let Some(r) = w.answers.remove(&t) {
                    return Some(r);
                }
                t = *w.chains.get(&t)?;
            }
            None
        })
    }

    /// Delivers a message from `from`; returns the plugin's reply.
    pub fn message(&mut self, from: &str, topic: &str, payload: &[u8]) -> Option<Vec<u8>> {
        let out = self
            .plugin()
            .on_message(from.to_string(), topic.to_string(), payload.to_vec());
        self.settle();
        out
    }

    /// Commits `command` as if another node had proposed it, and applies it.
    pub fn commit(&mut self, command: &P::Command) {
        self.commit_raw(crate::codec::encode(command));
    }

    /// Commits `data` as an entry another node proposed (one written by
    /// another version, or not a command at all), and applies it.
    pub fn commit_raw(&mut self, data: Vec<u8>) {
        with(|w| w.append(data, None));
        self.settle();
    }

    /// Moves both clocks forward by `ms`, firing the timers that fall due
    /// in order of their time, each at its time.
    pub fn advance(&mut self, ms: u64) {
        let until = with(|w| w.mono_ms.saturating_add(ms));
        loop {
            let due = with(|w| {
                let (&id, &at) = w
                    .timers
                    .iter()
                    .filter(|(_, at)| **at <= until)
                    .min_by_key(|(_, at)| **at)?;
                w.timers.remove(&id);
                w.wall_ms += at.saturating_sub(w.mono_ms);
                w.mono_ms = w.mono_ms.max(at);
                Some(id)
            });
            match due {
                Some(id) => {
                    self.plugin().on_timer(id);
                    self.settle();
                }
                None => break,
            }
        }
        with(|w| {
            w.wall_ms += until - w.mono_ms;
            w.mono_ms = until;
        });
    }

    /// The timers pending, as `(id, milliseconds until due)`.
    pub fn timers(&self) -> Vec<(u64, u64)> {
        with(|w| {
            w.timers
                .iter()
                .map(|(&id, &at)| (id, at.saturating_sub(w.mono_ms)))
                .collect()
        })
    }

    /// Changes a member's state (adding it if new) and tells the plugin.
    pub fn member(&mut self, id: &str, state: MemberState) {
        let event = with(|w| {
            w.epoch += 1;
            let m = member(id, state);
            match w.members.iter_mut().find(|m| m.id == id) {
                Some(old) => *old = m.clone(),
                None => {
                    w.members.push(m.clone());
                    w.members.sort_by(|a, b| a.id.cmp(&b.id));
                }
            }
            MemberEvent {
                member: m,
                epoch: w.epoch,
            }
        });
        self.plugin().on_membership(vec![event]);
        self.settle();
    }

    /// Makes this node a follower that knows `leader` (or no leader):
    /// proposals and read barriers fail with `not-leader`. `Some(self)`
    /// makes it the leader again.
    pub fn set_leader(&mut self, leader: Option<&NodeId>) {
        let me = self.ctx.node.clone();
        with(|w| {
            w.leader = leader.cloned();
            if w.leader.as_deref() != Some(me.as_str()) {
                w.term += 1;
            }
        });
    }

    /// Holds submitted writes uncommitted (the log has no quorum) until
    /// [`TestHost::resume_log`]; their requests stay [`Answer::Waiting`].
    pub fn pause_log(&mut self) {
        self.paused = true;
    }

    /// Commits the writes held since [`TestHost::pause_log`] and applies them.
    pub fn resume_log(&mut self) {
        self.paused = false;
        self.settle();
    }

    /// Answers the plugin's messages sent with `messaging::request` or
    /// `messaging::call`: `f(node, topic, payload)`. Without one they fail
    /// with `no-handler`.
    pub fn on_message_to(
        &mut self,
        f: impl FnMut(&str, &str, &[u8]) -> Result<Vec<u8>, MessagingError> + 'static,
    ) {
        with(|w| w.on_message = Some(Box::new(f)));
    }

    /// Answers the plugin's calls to other plugins: `f(plugin, node, req)`.
    /// Without one they fail with `no-such-plugin`.
    pub fn on_plugin_call(
        &mut self,
        f: impl FnMut(&str, Option<&str>, &Request) -> Result<Response, PluginError> + 'static,
    ) {
        with(|w| w.on_plugin = Some(Box::new(f)));
    }

    /// Answers the plugin's outbound HTTP requests. Without one they fail
    /// with `connect`.
    pub fn on_fetch(
        &mut self,
        f: impl FnMut(&OutgoingRequest) -> Result<Response, HttpError> + 'static,
    ) {
        with(|w| w.on_fetch = Some(Box::new(f)));
    }

    /// The messages sent with `send` and `broadcast` since the last look.
    pub fn sent(&mut self) -> Vec<Sent> {
        with(|w| std::mem::take(&mut w.sent))
    }

    /// The lines logged since the last look.
    pub fn logs(&mut self) -> Vec<LogLine> {
        with(|w| std::mem::take(&mut w.logs))
    }

    /// Every committed entry of the plugin's log.
    pub fn entries(&self) -> Vec<CommittedEntry> {
        with(|w| w.log.clone())
    }

    /// A stored value, as the plugin's storage holds it.
    pub fn stored(&self, key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        with(|w| w.storage.get(key.as_ref()).map(|(v, _)| v.clone()))
    }

    /// The keys in storage, in order.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        with(|w| w.storage.keys().cloned().collect())
    }

    /// What a trap does: the instance is dropped (its fields and the
    /// closures waiting on writes and calls go with it) and a new one is
    /// started with the same config; storage and the log stay.
    pub fn restart(self) -> Result<TestHost<P>, String> {
        self.replace::<P>(None)
    }

    /// A hot swap to `Q` (the same type for a restart with a snapshot):
    /// the old instance's snapshot is restored into a new one. Storage and
    /// the log stay; writes in flight are answered by the new version.
    pub fn swap<Q: Pattern>(mut self) -> Result<TestHost<Q>, String> {
        let state = self.plugin().snapshot();
        self.replace::<Q>(Some(state))
    }

    fn replace<Q: Pattern>(mut self, state: Option<Vec<u8>>) -> Result<TestHost<Q>, String> {
        self.plugin = None;
        crate::consensus::forget_all();
        crate::replies::forget_all();
        let mut next = Q::init(self.ctx.clone())?;
        if let Some(state) = state {
            next.restore(state)?;
        }
        let mut host = TestHost {
            plugin: Some(next),
            ctx: self.ctx.clone(),
            paused: self.paused,
        };
        host.settle();
        Ok(host)
    }

    /// Runs committed writes and calls in flight until none is left.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            let paused = self.paused;
            let entries = with(|w| {
                if !paused {
                    w.commit_submitted();
                }
                w.undelivered()
            });
            if !entries.is_empty() {
                crate::consensus::deliver_all(self.plugin(), entries);
                continue;
            }
            if let Some((ticket, call)) = with(|w| w.outgoing.pop_front()) {
                let outcome = memory::resolve(call);
                crate::replies::arrived(self.plugin(), ticket, outcome);
                continue;
            }
            return;
        }
        panic!("the plugin kept the test host busy for 100,000 steps: a loop of writes or calls?");
    }
}

/// A client request for [`TestHost::request`]; `path` may carry `?query`.
pub fn request(method: Method, path: &str, body: Vec<u8>) -> Request {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        headers: Vec::new(),
        body,
        source: RequestSource::Client,
    }
}
