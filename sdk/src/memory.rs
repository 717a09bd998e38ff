//! An in-memory host for native builds: the same functions as the
//! component's imports, over one [`World`] per thread. [`crate::testing`]
//! drives it; without that feature a native build still links, and its
//! host calls act on an empty world.
#![cfg_attr(not(feature = "testing"), allow(dead_code))]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::bindings::plexus::cluster::outbound_http::OutgoingRequest;
use crate::bindings::plexus::cluster::types::{
    CallOutcome, CommittedEntry, HttpError, Limits, Member, MessagingError, PluginError, Request,
    Response,
};

/// Answers a blocking or ticketed message to another node.
pub(crate) type MessageFn = Box<dyn FnMut(&str, &str, &[u8]) -> Result<Vec<u8>, MessagingError>>;
/// Answers a call to another plugin.
pub(crate) type PluginFn =
    Box<dyn FnMut(&str, Option<&str>, &Request) -> Result<Response, PluginError>>;
/// Answers an outbound HTTP request.
pub(crate) type FetchFn = Box<dyn FnMut(&OutgoingRequest) -> Result<Response, HttpError>>;

/// A message the plugin sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The receiving node; `None` for a broadcast.
    pub to: Option<String>,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// One line the plugin logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Its level.
    pub level: log::Level,
    /// Its message.
    pub message: String,
    /// Its fields, in order.
    pub fields: Vec<(String, String)>,
}

/// A call in flight, waiting for its outcome.
pub(crate) enum Outgoing {
    Message {
        node: String,
        topic: String,
        payload: Vec<u8>,
    },
    Plugin {
        plugin: String,
        node: Option<String>,
        req: Request,
    },
    Fetch(OutgoingRequest),
}

/// Everything the in-memory host holds for one node.
pub(crate) struct World {
    pub node: String,
    pub members: Vec<Member>,
    pub epoch: u64,
    pub limits: Limits,
    pub storage: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    pub last_version: u64,
    pub log: Vec<CommittedEntry>,
    /// Entries of `log` the instance has been handed.
    pub delivered: usize,
    pub submitted: Vec<(u64, Vec<u8>)>,
    pub term: u64,
    pub leader: Option<String>,
    pub next_ticket: u64,
    pub answers: HashMap<u64, Response>,
    pub chains: HashMap<u64, u64>,
    pub wall_ms: u64,
    pub mono_ms: u64,
    pub timers: BTreeMap<u64, u64>,
    pub max_timers: usize,
    pub sent: Vec<Sent>,
    pub outgoing: VecDeque<(u64, Outgoing)>,
    pub on_message: Option<MessageFn>,
    pub on_plugin: Option<PluginFn>,
    pub on_fetch: Option<FetchFn>,
    pub logs: Vec<LogLine>,
}

impl Default for World {
    fn default() -> World {
        World {
            node: "n1".into(),
            members: Vec::new(),
            epoch: 1,
            limits: Limits {
                max_entry_bytes: 1 << 20,
                max_value_bytes: 1 << 20,
                max_key_bytes: 1024,
                max_message_bytes: 1 << 20,
                max_calls_in_flight: 1024,
                max_response_bytes: 4 << 20,
            },
            storage: BTreeMap::new(),
            last_version: 0,
            log: Vec::new(),
            delivered: 0,
            submitted: Vec::new(),
            term: 1,
            leader: Some("n1".into()),
            next_ticket: 1,
            answers: HashMap::new(),
            chains: HashMap::new(),
            // 2026-01-01T00:00:00Z: a fixed start, so tests are repeatable.
            wall_ms: 1_767_225_600_000,
            mono_ms: 0,
            timers: BTreeMap::new(),
            max_timers: 1024,
            sent: Vec::new(),
            outgoing: VecDeque::new(),
            on_message: None,
            on_plugin: None,
            on_fetch: None,
            logs: Vec::new(),
        }
    }
}

impl World {
    fn ticket(&mut self) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        t
    }

    /// Commits `data` as the next entry of the log.
    pub fn append(&mut self, data: Vec<u8>, ticket: Option<u64>) {
        let index = self.log.len() as u64 + 1;
        let term = self.term;
        self.log.push(CommittedEntry {
            index,
            term,
            data,
            ticket,
        });
    }

    /// Commits every submitted entry, in the order submitted.
    pub fn commit_submitted(&mut self) {
        for (ticket, data) in std::mem::take(&mut self.submitted) {
            self.append(data, Some(ticket));
        }
    }

    /// The committed entries the instance has not been handed yet.
    pub fn undelivered(&mut self) -> Vec<CommittedEntry> {
        let out = self.log[self.delivered..].to_vec();
        self.delivered = self.log.len();
        out
    }

    fn write(&mut self, key: &[u8], value: Option<&[u8]>) -> Option<u64> {
        match value {
            Some(v) => {
                self.last_version += 1;
                self.storage
                    .insert(key.to_vec(), (v.to_vec(), self.last_version));
                Some(self.last_version)
            }
            None => {
                self.storage.remove(key);
                None
            }
        }
    }
}

thread_local! {
    static WORLD: RefCell<World> = RefCell::new(World::default());
}

/// Runs `f` on this thread's world.
pub(crate) fn with<R>(f: impl FnOnce(&mut World) -> R) -> R {
    WORLD.with(|w| f(&mut w.borrow_mut()))
}

pub mod storage {
    pub use crate::bindings::plexus::cluster::storage::{
        BatchOp, KeyValue, StorageError, Version, Versioned,
    };

    use super::with;

    fn check(key: &[u8], value: Option<&[u8]>) -> Result<(), StorageError> {
        with(|w| {
            if key.len() > w.limits.max_key_bytes as usize {
                return Err(StorageError::TooLarge(w.limits.max_key_bytes));
            }
            match value {
                Some(v) if v.len() > w.limits.max_value_bytes as usize => {
                    Err(StorageError::TooLarge(w.limits.max_value_bytes))
                }
                _ => Ok(()),
            }
        })
    }

    pub fn get(key: &[u8]) -> Result<Option<Versioned>, StorageError> {
        Ok(with(|w| {
            w.storage.get(key).map(|(value, version)| Versioned {
                value: value.clone(),
                version: *version,
            })
        }))
    }

    pub fn put(key: &[u8], value: &[u8]) -> Result<Version, StorageError> {
        check(key, Some(value))?;
        Ok(with(|w| w.write(key, Some(value)).unwrap_or_default()))
    }

    pub fn delete(key: &[u8]) -> Result<bool, StorageError> {
        check(key, None)?;
        Ok(with(|w| w.storage.remove(key).is_some()))
    }

    pub fn scan(
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<KeyValue>, StorageError> {
        Ok(with(|w| {
            w.storage
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(k, _)| start_after.is_none_or(|a| k.as_slice() > a))
                .take(limit as usize)
                .map(|(k, (value, version))| KeyValue {
                    key: k.clone(),
                    value: Versioned {
                        value: value.clone(),
                        version: *version,
                    },
                })
                .collect()
        }))
    }

    pub fn compare_and_swap(
        key: &[u8],
        expected: Option<Version>,
        value: Option<&[u8]>,
    ) -> Result<Option<Version>, StorageError> {
        check(key, value)?;
        with(|w| {
            let now = w.storage.get(key).map(|(_, v)| *v);
            if now != expected {
                return Err(StorageError::VersionMismatch(now));
            }
            Ok(w.write(key, value))
        })
    }

    pub fn batch(ops: &[BatchOp]) -> Result<Vec<Version>, StorageError> {
        for op in ops {
            match op {
                BatchOp::Put((k, v)) => check(k, Some(v))?,
                BatchOp::Delete(k) | BatchOp::Check((k, _)) => check(k, None)?,
            }
        }
        with(|w| {
            for op in ops {
                if let BatchOp::Check((k, expected)) = op {
                    let now = w.storage.get(k).map(|(_, v)| *v);
                    if now != *expected {
                        return Err(StorageError::VersionMismatch(now));
                    }
                }
            }
            let mut versions = Vec::new();
            for op in ops {
                match op {
                    BatchOp::Put((k, v)) => versions.push(w.write(k, Some(v)).unwrap_or_default()),
                    BatchOp::Delete(k) => {
                        w.write(k, None);
                    }
                    BatchOp::Check(_) => {}
                }
            }
            Ok(versions)
        })
    }
}

pub mod consensus {
    pub use crate::bindings::plexus::cluster::consensus::ConsensusError;

    use super::with;
    use crate::CommittedEntry;

    fn check(data: &[u8]) -> Result<(), ConsensusError> {
        with(|w| {
            if w.leader.as_deref() != Some(w.node.as_str()) {
                return Err(ConsensusError::NotLeader(w.leader.clone()));
            }
            if data.len() > w.limits.max_entry_bytes as usize {
                return Err(ConsensusError::TooLarge(w.limits.max_entry_bytes));
            }
            Ok(())
        })
    }

    pub fn propose(data: &[u8]) -> Result<Vec<CommittedEntry>, ConsensusError> {
        check(data)?;
        Ok(with(|w| {
            w.commit_submitted();
            w.append(data.to_vec(), None);
            w.undelivered()
        }))
    }

    pub fn submit(data: &[u8]) -> Result<u64, ConsensusError> {
        check(data)?;
        Ok(with(|w| {
            let t = w.ticket();
            w.submitted.push((t, data.to_vec()));
            t
        }))
    }

    pub fn read_barrier() -> Result<Vec<CommittedEntry>, ConsensusError> {
        with(|w| {
            if w.leader.as_deref() != Some(w.node.as_str()) {
                return Err(ConsensusError::NotLeader(w.leader.clone()));
            }
            w.commit_submitted();
            Ok(w.undelivered())
        })
    }

    pub fn leader() -> Option<String> {
        with(|w| w.leader.clone())
    }

    pub fn current_term() -> u64 {
        with(|w| w.term)
    }

    pub fn commit_index() -> u64 {
        with(|w| w.log.len() as u64)
    }
}

pub mod messaging {
    use super::{Outgoing, Sent, with};
    use crate::bindings::plexus::cluster::types::MessagingError;

    fn check(node: Option<&str>, payload: &[u8]) -> Result<(), MessagingError> {
        with(|w| {
            if payload.len() > w.limits.max_message_bytes as usize {
                return Err(MessagingError::TooLarge(w.limits.max_message_bytes));
            }
            match node {
                Some(n) if n != w.node && !w.members.iter().any(|m| m.id == n) => {
                    Err(MessagingError::UnknownNode(n.to_string()))
                }
                _ => Ok(()),
            }
        })
    }

    pub fn send(node: &str, topic: &str, payload: &[u8]) -> Result<(), MessagingError> {
        check(Some(node), payload)?;
        with(|w| {
            w.sent.push(Sent {
                to: Some(node.to_string()),
                topic: topic.to_string(),
                payload: payload.to_vec(),
            })
        });
        Ok(())
    }

    pub fn broadcast(topic: &str, payload: &[u8]) -> Result<u32, MessagingError> {
        check(None, payload)?;
        Ok(with(|w| {
            w.sent.push(Sent {
                to: None,
                topic: topic.to_string(),
                payload: payload.to_vec(),
            });
            w.members.iter().filter(|m| m.id != w.node).count() as u32
        }))
    }

    pub fn request(
        node: &str,
        topic: &str,
        payload: &[u8],
        _timeout_ms: u32,
    ) -> Result<Vec<u8>, MessagingError> {
        check(Some(node), payload)?;
        if with(|w| w.node == node) {
            return Err(MessagingError::Loopback);
        }
        super::respond(|w| &mut w.on_message, |f| f(node, topic, payload))
            .unwrap_or(Err(MessagingError::NoHandler))
    }

    pub fn call(
        node: &str,
        topic: &str,
        payload: &[u8],
        _timeout_ms: u32,
    ) -> Result<u64, MessagingError> {
        check(Some(node), payload)?;
        Ok(with(|w| {
            let t = w.ticket();
            w.outgoing.push_back((
                t,
                Outgoing::Message {
                    node: node.to_string(),
                    topic: topic.to_string(),
                    payload: payload.to_vec(),
                },
            ));
            t
        }))
    }
}

pub mod plugins {
    use super::{Outgoing, with};
    use crate::bindings::plexus::cluster::types::{PluginError, Request};

    pub fn call(
        plugin: &str,
        node: Option<&str>,
        req: &Request,
        _timeout_ms: u32,
    ) -> Result<u64, PluginError> {
        Ok(with(|w| {
            let t = w.ticket();
            w.outgoing.push_back((
                t,
                Outgoing::Plugin {
                    plugin: plugin.to_string(),
                    node: node.map(str::to_string),
                    req: req.clone(),
                },
            ));
            t
        }))
    }
}

pub mod outbound_http {
    use super::{Outgoing, with};
    use crate::bindings::plexus::cluster::outbound_http::OutgoingRequest;
    use crate::bindings::plexus::cluster::types::HttpError;

    pub fn fetch(req: &OutgoingRequest, _timeout_ms: u32) -> Result<u64, HttpError> {
        Ok(with(|w| {
            let t = w.ticket();
            w.outgoing.push_back((t, Outgoing::Fetch(req.clone())));
            t
        }))
    }
}

pub mod replies {
    use super::with;
    use crate::Response;

    pub fn answer(ticket: u64, response: &Response) {
        with(|w| {
            w.answers.insert(ticket, response.clone());
        })
    }

    pub fn chain(ticket: u64, next: u64) {
        with(|w| {
            w.chains.insert(ticket, next);
        })
    }

    pub fn hold() -> u64 {
        with(|w| w.ticket())
    }
}

pub mod timers {
    use super::with;

    pub fn now_ms() -> u64 {
        with(|w| w.wall_ms)
    }

    pub fn monotonic_ms() -> u64 {
        with(|w| w.mono_ms)
    }

    pub fn set_timer(id: u64, delay_ms: u64) -> bool {
        with(|w| {
            if w.timers.len() >= w.max_timers && !w.timers.contains_key(&id) {
                return false;
            }
            w.timers.insert(id, w.mono_ms.saturating_add(delay_ms));
            true
        })
    }

    pub fn cancel_timer(id: u64) -> bool {
        with(|w| w.timers.remove(&id).is_some())
    }
}

pub mod membership {
    use super::with;
    use crate::Member;

    pub fn local_node() -> String {
        with(|w| w.node.clone())
    }

    pub fn members() -> Vec<Member> {
        with(|w| w.members.clone())
    }

    pub fn epoch() -> u64 {
        with(|w| w.epoch)
    }
}

pub mod log {
    pub use crate::bindings::plexus::cluster::log::Level;

    use super::{LogLine, with};

    pub fn emit(level: Level, message: &str, fields: &[(String, String)]) {
        with(|w| {
            w.logs.push(LogLine {
                level,
                message: message.to_string(),
                fields: fields.to_vec(),
            })
        })
    }

    pub fn enabled(_level: Level) -> bool {
        true
    }
}

/// Runs the test's responder in `slot`, outside the world's borrow (it may
/// call the host), and puts it back; `None` when the test set none.
fn respond<F, R>(
    slot: fn(&mut World) -> &mut Option<F>,
    call: impl FnOnce(&mut F) -> R,
) -> Option<R> {
    let mut f = with(|w| slot(w).take())?;
    let out = call(&mut f);
    with(|w| *slot(w) = Some(f));
    Some(out)
}

/// The outcome a call in flight gets from the test's responders.
pub(crate) fn resolve(call: Outgoing) -> CallOutcome {
    match call {
        Outgoing::Message {
            node,
            topic,
            payload,
        } => CallOutcome::Message(
            respond(|w| &mut w.on_message, |f| f(&node, &topic, &payload))
                .unwrap_or(Err(MessagingError::NoHandler)),
        ),
        Outgoing::Plugin { plugin, node, req } => CallOutcome::Plugin(
            respond(|w| &mut w.on_plugin, |f| f(&plugin, node.as_deref(), &req))
                .unwrap_or_else(|| Err(PluginError::NoSuchPlugin(plugin.clone()))),
        ),
        Outgoing::Fetch(req) => CallOutcome::Http(
            respond(|w| &mut w.on_fetch, |f| f(&req)).unwrap_or_else(|| {
                Err(HttpError::Connect(format!(
                    "the test host has no fetch responder for {}",
                    req.url
                )))
            }),
        ),
    }
}
