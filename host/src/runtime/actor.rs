//! The plugin actor: one task per plugin that owns the live instance and
//! drains its bounded mailbox, one hook call at a time.
//!
//! Everything that reaches a plugin — client requests, messages, timers,
//! committed log entries, a swap — goes through here, so a swap happens
//! between two mailbox items and nothing queued is lost or seen twice. A
//! hook that traps kills only its instance: the actor restarts the plugin
//! with backoff while the mailbox keeps what arrives meanwhile.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;

use super::bindings::Plugin;
use super::bindings::pattern::{ForwardTo, InitContext, Reply, Request, Response};
use super::bindings::types::{CommittedEntry, MemberEvent};
use super::metrics::PluginMetrics;
use super::state::{PluginState, WaitClock};
use super::{Capability, LoadError, Prepared};
use crate::cluster::log::{ConsensusBackend, LogError, RestorePoint};
use crate::cluster::state_store::{KvBackend, Persist, StoreError};
use crate::primitives::calls::{CallFuture, Calls, Done};
use crate::primitives::consensus::{ConsensusCtx, Control, Dropped, is_control};
use crate::primitives::log::LogCtx;
use crate::primitives::membership::{MembershipCtx, MembershipView};
use crate::primitives::messaging::{MessagingCtx, Remote};
use crate::primitives::outbound::{Origin, OutboundClient, OutboundCtx};
use crate::primitives::plugins::{Directory, PluginsCtx};
use crate::primitives::storage::StorageCtx;
use crate::primitives::timers::TimersCtx;
use crate::primitives::wire::{Answered, Forwarded, KIND_FORWARD, MAX_HOPS, WireRequest};
use crate::primitives::{CallLimits, CallQuota};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

/// Hook names, as metric labels.
const HOOKS: [&str; 9] = [
    "init",
    "on-request",
    "on-message",
    "on-reply",
    "apply",
    "on-membership",
    "on-timer",
    "snapshot",
    "restore",
];

/// Most committed entries handed to one `apply` call.
const APPLY_BATCH: usize = 256;
/// Swap pauses kept per plugin for reporting.
const PAUSES_KEPT: usize = 4096;

/// Per-plugin resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PluginLimits {
    /// Linear memory cap, in bytes.
    pub memory_bytes: u64,
    /// Longest a single hook call may run.
    pub cpu: Duration,
    /// Mailbox capacity.
    pub mailbox: usize,
    /// Calls to other parties.
    #[serde(skip)]
    pub quota: CallQuota,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            memory_bytes: 64 << 20,
            cpu: Duration::from_millis(1000),
            mailbox: 1024,
            quota: CallQuota::default(),
        }
    }
}

/// Whom a plugin may call: plugins (`plugins`) and origins outside the
/// cluster (`outbound-http`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// `allowed_plugins`.
    pub plugins: Arc<BTreeSet<String>>,
    /// `allowed_outbound_hosts`.
    pub outbound: Arc<Vec<Origin>>,
}

/// Node services a plugin instance is wired to.
#[derive(Clone)]
pub struct Services {
    /// Durable node-local storage.
    pub kv: Arc<dyn KvBackend>,
    /// The consensus log.
    pub log: Arc<dyn ConsensusBackend>,
    /// The membership view.
    pub view: Arc<MembershipView>,
    /// Limits on every host call.
    pub call_limits: CallLimits,
    /// The peer transport, in a cluster.
    pub transport: Option<Arc<crate::cluster::transport::Transport>>,
    /// The engine, for versions that arrive through the log.
    pub runtime: Arc<super::engine::Runtime>,
    /// The wall clock behind `timers.now-ms`.
    pub clock: Arc<dyn crate::primitives::timers::Clock>,
    /// The plugins of this node, for `plugins.call`.
    pub directory: Arc<dyn Directory>,
    /// The pooled client behind `outbound-http`.
    pub http: Arc<OutboundClient>,
}

/// Where a plugin is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Serving.
    Running,
    /// Its instance failed; a new one starts after a backoff.
    Restarting,
    /// Unloaded.
    Stopped,
}

/// What a plugin reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    /// Name.
    pub name: String,
    /// Content version of the running component.
    pub version: String,
    /// Life state.
    pub state: RunState,
    /// Granted capabilities.
    pub capabilities: Vec<Capability>,
    /// Unix ms when it was loaded.
    pub loaded_at_ms: u64,
    /// Instances restarted after a failure.
    pub restarts: u64,
    /// Hook calls that trapped (including deadline and memory overruns).
    pub traps: u64,
    /// Client requests handled.
    pub requests: u64,
    /// Hook calls that failed.
    pub errors: u64,
    /// Completed hot swaps.
    pub swaps: u64,
    /// Pause of the last swap, in microseconds.
    pub last_swap_pause_us: Option<u64>,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Log index of the last cluster-wide swap this node applied.
    pub swapped_at_index: Option<u64>,
    /// Stream index of the last consensus snapshot this node's state was
    /// restored from.
    pub restored_at_index: Option<u64>,
    /// Log index of the last host control entry this node processed.
    pub control_index: u64,
    /// Mailbox items waiting.
    pub mailbox_depth: usize,
    /// Pauses of recent swaps, in microseconds, oldest first.
    #[serde(skip)]
    pub swap_pauses_us: Vec<u64>,
}

/// Why a call into a plugin did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The mailbox stayed full, or no reply came, within the deadline.
    #[error("plugin did not answer in time")]
    Timeout,
    /// The hook trapped; the instance is being restarted.
    #[error("plugin failed: {0}")]
    Trap(String),
    /// The hook's storage transaction could not be committed.
    #[error("storage commit failed: {0}")]
    Storage(String),
    /// The plugin was unloaded.
    #[error("plugin stopped")]
    Stopped,
}

/// Why a swap did not happen. The old version keeps serving.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SwapError {
    /// The new component could not be prepared or initialised.
    #[error("new version refused: {0}")]
    Load(#[from] LoadError),
    /// The old instance failed in `snapshot`.
    #[error("old version failed to snapshot: {0}")]
    Snapshot(String),
    /// The new instance refused or failed `restore`.
    #[error("new version failed to restore: {0}")]
    Restore(String),
    /// The plugin is stopped or did not answer.
    #[error("{0}")]
    Call(#[from] CallError),
}

/// What a completed swap measured.
#[derive(Debug, Clone, Serialize)]
pub struct SwapReport {
    /// Version before.
    pub from: String,
    /// Version after.
    pub to: String,
    /// How long the mailbox was not served.
    pub pause_us: u64,
    /// Bytes handed over by snapshot/restore.
    pub state_bytes: usize,
}

/// A mailbox item.
pub enum Mail {
    /// A client request.
    Request {
        /// The request.
        req: Request,
        /// How many times it was forwarded to get here.
        hops: u8,
        /// When its client stops waiting.
        deadline: Instant,
        /// Where the response goes.
        reply: oneshot::Sender<Result<Response, CallError>>,
    },
    /// A message from the same plugin on some node.
    Message {
        /// Sender node.
        from: String,
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
        /// Where the reply goes, for requests.
        reply: Option<oneshot::Sender<Result<Option<Vec<u8>>, CallError>>>,
    },
    /// A timer fired.
    Timer {
        /// Instance generation that set it.
        generation: u64,
        /// Timer id.
        id: u64,
        /// Which setting of the id.
        seq: u64,
    },
    /// The membership view changed.
    Membership(Vec<MemberEvent>),
    /// Replace the instance.
    Swap {
        /// The new, initialised instance.
        next: Box<Instance>,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<SwapReport, SwapError>>,
    },
    /// Stop the actor.
    Stop {
        /// Signalled once stopped.
        reply: oneshot::Sender<()>,
    },
}

/// State shared between a plugin's actor and its handle.
pub struct PluginEnv {
    name: String,
    services: Services,
    limits: PluginLimits,
    capabilities: BTreeSet<Capability>,
    access: Access,
    config_json: Mutex<String>,
    generation: AtomicU64,
    /// Where instances report submissions that failed.
    drops: mpsc::UnboundedSender<Dropped>,
    status: Mutex<PluginStatus>,
    metrics: Mutex<PluginMetrics>,
}

impl PluginEnv {
    /// The config of the installed version.
    fn config(&self) -> String {
        self.config_json.lock().expect("config poisoned").clone()
    }

    fn update(&self, f: impl FnOnce(&mut PluginStatus)) {
        f(&mut self.status.lock().expect("status poisoned"));
    }

    /// Runs `f` on the plugin's storage namespace, off the async workers.
    async fn kv<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn KvBackend, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let kv = self.services.kv.clone();
        let ns = self.name.clone();
        tokio::task::spawn_blocking(move || f(kv.as_ref(), &ns))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

/// A live instance: its store and bindings.
pub struct Instance {
    store: Store<PluginState>,
    bindings: Plugin,
    prepared: Prepared,
    /// The config this instance was initialised with; it becomes the
    /// plugin's config (used by restarts) when the instance is installed.
    config_json: String,
    /// The applied index last committed to storage.
    persisted: u64,
    /// This instance's generation (timers and submissions carry it).
    generation: u64,
    /// Requests answered by a later `apply`, by ticket.
    waiting: HashMap<u64, oneshot::Sender<Result<Response, CallError>>>,
    /// Failed tickets to pass to the next `apply`.
    dropped: Vec<u64>,
    /// Tickets of writes an earlier version submitted and this one took
    /// over at a swap: answered by this version's `apply` if it can, by the
    /// host otherwise.
    inherited: HashSet<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn describe(hook: &str, e: &wasmtime::Error, limits: &PluginLimits) -> String {
    let cause = match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => {
            format!("exceeded its CPU deadline of {} ms", limits.cpu.as_millis())
        }
        Some(Trap::UnreachableCodeReached) => {
            "trapped: unreachable executed (the guest panicked or aborted)".into()
        }
        Some(trap) => format!("trapped: {trap}"),
        None => {
            let root = e.root_cause().to_string();
            if root.contains("memory") {
                format!(
                    "exceeded its memory cap of {} MiB ({root})",
                    limits.memory_bytes >> 20
                )
            } else {
                root
            }
        }
    };
    format!("{hook}: {cause}")
}

/// Where an instance sends what happens outside its hook calls.
pub struct Channels {
    /// Timers and local messages.
    pub mailbox: mpsc::WeakSender<Mail>,
    /// Submissions that failed.
    pub drops: mpsc::UnboundedSender<Dropped>,
}

/// A store for one instance of plugin `name`: its WASI context (no files,
/// sockets or environment; stderr goes to the node's), its limits, and the
/// contexts of every interface, wired to `services`. Timers, local messages
/// and failed submissions go to `channels`, tagged with `generation`;
/// `applied` is the plugin's delivery cursor in the log.
#[allow(clippy::too_many_arguments)]
pub fn new_store(
    prepared: &Prepared,
    name: &str,
    services: &Services,
    limits: &PluginLimits,
    access: &Access,
    channels: Channels,
    generation: u64,
    applied: u64,
) -> Store<PluginState> {
    let Channels { mailbox, drops } = channels;
    let calls = Calls::new(generation, limits.quota.max_in_flight);
    let waited = WaitClock::default();
    let mut consensus =
        ConsensusCtx::new(name, services.log.clone(), services.call_limits, applied)
            .with_submissions(generation, drops);
    consensus.waited = waited.clone();
    let state = PluginState {
        wasi: WasiCtxBuilder::new().inherit_stderr().build(),
        table: ResourceTable::new(),
        limits: StoreLimitsBuilder::new()
            .memory_size(usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX))
            .trap_on_grow_failure(true)
            .build(),
        storage: StorageCtx::new(name, services.kv.clone(), services.call_limits),
        consensus,
        membership: MembershipCtx::new(services.view.clone()),
        messaging: MessagingCtx::new(
            mailbox.clone(),
            services.view.clone(),
            services.call_limits,
            services.transport.clone().map(|transport| Remote {
                transport,
                plugin: name.to_string(),
            }),
            waited.clone(),
            calls.clone(),
        ),
        timers: TimersCtx::new(services.clock.clone(), mailbox, generation),
        log: LogCtx::new(name, &prepared.version),
        plugins: PluginsCtx::new(
            calls.clone(),
            name,
            access.plugins.clone(),
            services.directory.clone(),
            services.view.clone(),
            services.transport.clone(),
            services.call_limits,
        ),
        outbound: OutboundCtx::new(
            calls.clone(),
            services.http.clone(),
            access.outbound.clone(),
            limits.quota.max_response_bytes,
        ),
        calls,
        waited,
        call_started: Instant::now(),
        cpu_budget: limits.cpu,
    };
    let mut store = Store::new(prepared.pre.engine(), state);
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_callback(|ctx| {
        let data = ctx.data();
        if data
            .call_started
            .elapsed()
            .saturating_sub(data.waited.waited())
            > data.cpu_budget
        {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store.set_epoch_deadline(1);
    store
}

impl Instance {
    /// Instantiates `prepared` and runs `init` with `config_json` and the
    /// first membership event. Nothing is shared with a running instance
    /// until it is installed by the actor.
    async fn start(
        env: &Arc<PluginEnv>,
        prepared: Prepared,
        mailbox: mpsc::WeakSender<Mail>,
        config_json: String,
    ) -> Result<Instance, LoadError> {
        let generation = env.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let services = &env.services;
        let applied = services
            .kv
            .applied_index(&env.name)
            .map_err(|e| LoadError::Init(e.to_string()))?;
        let mut store = new_store(
            &prepared,
            &env.name,
            services,
            &env.limits,
            &env.access,
            Channels {
                mailbox,
                drops: env.drops.clone(),
            },
            generation,
            applied,
        );
        let bindings = prepared
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| LoadError::Init(format!("instantiation failed: {e:#}")))?;
        let mut inst = Instance {
            store,
            bindings,
            prepared,
            config_json,
            persisted: applied,
            generation,
            waiting: HashMap::new(),
            dropped: Vec::new(),
            inherited: HashSet::new(),
        };
        let ctx = InitContext {
            config: inst.config_json.clone(),
            node: services.view.local().to_string(),
            name: env.name.clone(),
            version: inst.prepared.version.clone(),
            limits: services.call_limits.to_wit(env.limits.quota),
        };
        inst.begin();
        let r = inst
            .bindings
            .plexus_cluster_pattern()
            .call_init(&mut inst.store, &ctx)
            .await;
        match inst.finish(env, "init", r).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(LoadError::Init(msg)),
            Err(e) => return Err(LoadError::Init(e.to_string())),
        }
        let (epoch, members) = services.view.snapshot();
        let events: Vec<MemberEvent> = members
            .into_iter()
            .map(|member| MemberEvent { member, epoch })
            .collect();
        inst.begin();
        let r = inst
            .bindings
            .plexus_cluster_pattern()
            .call_on_membership(&mut inst.store, &events)
            .await;
        inst.finish(env, "on-membership", r)
            .await
            .map_err(|e| LoadError::Init(format!("on-membership: {e}")))?;
        Ok(inst)
    }

    /// Calls the guest's `snapshot`.
    async fn snapshot(&mut self, env: &PluginEnv) -> Result<Vec<u8>, CallError> {
        self.begin();
        let r = self
            .bindings
            .plexus_cluster_pattern()
            .call_snapshot(&mut self.store)
            .await;
        self.finish(env, "snapshot", r).await
    }

    /// Calls the guest's `restore` with `state`.
    async fn restore(
        &mut self,
        env: &PluginEnv,
        state: &[u8],
    ) -> Result<Result<(), String>, CallError> {
        self.begin();
        let r = self
            .bindings
            .plexus_cluster_pattern()
            .call_restore(&mut self.store, state)
            .await;
        self.finish(env, "restore", r).await
    }

    fn begin(&mut self) {
        self.store.data().calls.begin();
        self.store.data_mut().call_started = Instant::now();
        self.store.data().waited.reset();
        self.store.set_epoch_deadline(1);
    }

    /// Ends a hook call: commits its storage writes and delivery cursor, or
    /// discards them if it failed. An error means the instance is unusable.
    async fn finish<R>(
        &mut self,
        env: &PluginEnv,
        hook: &str,
        r: wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let started = self.store.data().call_started;
        let result = self.settle(env, hook, r).await;
        let hook: &'static str = HOOKS
            .iter()
            .find(|h| **h == hook)
            .copied()
            .unwrap_or("other");
        let elapsed = started.elapsed().as_secs_f64();
        env.metrics
            .lock()
            .expect("metrics poisoned")
            .calls
            .entry(hook)
            .or_default()
            .observe(elapsed);
        result
    }

    async fn settle<R>(
        &mut self,
        env: &PluginEnv,
        hook: &str,
        r: wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        match r {
            Ok(value) => {
                let data = self.store.data_mut();
                let writes = data.storage.take_writes();
                let delivered = data.consensus.delivered;
                let applied = (delivered != self.persisted).then_some(delivered);
                if !writes.is_empty() || applied.is_some() {
                    // What `apply` wrote follows from the entries it applied,
                    // which a restart applies again from the cursor on disk.
                    let persist = if hook == "apply" && applied.is_some() {
                        Persist::Replayable
                    } else {
                        Persist::Now
                    };
                    // Without an fsync (but at a checkpoint) the commit is
                    // short enough to run here, on the async worker.
                    let result = if persist == Persist::Replayable {
                        env.services
                            .kv
                            .commit(&env.name, writes, applied, persist)
                            .map_err(|e| CallError::Storage(e.to_string()))
                    } else {
                        env.kv(move |kv, ns| kv.commit(ns, writes, applied, persist))
                            .await
                            .map_err(CallError::Storage)
                    };
                    if let Err(e) = result {
                        env.update(|s| {
                            s.errors += 1;
                            s.last_error = Some(e.to_string());
                        });
                        return Err(e);
                    }
                    self.persisted = delivered;
                }
                Ok(value)
            }
            Err(e) => {
                self.store.data_mut().storage.discard();
                // What it said to clients goes with its writes.
                self.store.data().calls.discard();
                let msg = describe(hook, &e, &env.limits);
                tracing::warn!(plugin = %env.name, version = %self.prepared.version, "hook failed: {msg}");
                env.update(|s| {
                    s.traps += 1;
                    s.errors += 1;
                    s.last_error = Some(msg.clone());
                });
                Err(CallError::Trap(msg))
            }
        }
    }

    fn delivered(&self) -> u64 {
        self.store.data().consensus.delivered
    }

    /// Sends the answers the last hook gave (`replies.answer`) and moves
    /// the clients it chained to other tickets. A request whose entry was
    /// applied without an answer gets a 500.
    fn route(&mut self) {
        let said = self.store.data().calls.take_said();
        for (from, to) in said.chains {
            if let Some(w) = self.waiting.remove(&from) {
                if self.inherited.remove(&from) {
                    self.inherited.insert(to);
                }
                self.waiting.insert(to, w);
            }
        }
        for (ticket, response) in said.answers {
            self.inherited.remove(&ticket);
            if let Some(w) = self.waiting.remove(&ticket) {
                let _ = w.send(Ok(response));
            }
        }
        for t in std::mem::take(&mut self.store.data_mut().consensus.surfaced) {
            let Some(w) = self.waiting.remove(&t) else {
                continue;
            };
            let response = if self.inherited.remove(&t) {
                // Submitted by the version before a swap and applied once
                // by this one, which has no answer of its own for it: what
                // the write did is in the log and storage, not known here.
                error_response(
                    504,
                    "outcome unknown to this version: the write was applied once, by the version swapped in after it was submitted, which gave no answer for it",
                )
            } else {
                let msg = "the entry was applied, but the plugin gave no answer for it";
                error_response(500, msg)
            };
            let _ = w.send(Ok(response));
        }
    }

    /// Takes over the writes `old` has in flight and the requests waiting
    /// on them, at a swap: their entries are applied by this instance, and
    /// every client is answered once, with the write's real outcome.
    ///
    /// A client waiting on anything else (a call whose outcome had not come
    /// by the end of the drain, or a ticket from `replies.hold`) is
    /// answered 504 here: the new version never learns of it.
    fn inherit(&mut self, old: &mut Instance) {
        let tickets = old.store.data_mut().consensus.take_submitted();
        for (ticket, w) in old.waiting.drain() {
            if tickets.contains(&ticket) || old.inherited.contains(&ticket) {
                self.inherited.insert(ticket);
                self.waiting.insert(ticket, w);
            } else {
                let _ = w.send(Ok(error_response(
                    504,
                    "outcome unknown: the plugin was swapped while a call made for this request was in flight",
                )));
            }
        }
        self.inherited.extend(tickets.iter().copied());
        self.inherited.extend(old.inherited.drain());
        self.store.data_mut().consensus.inherit(tickets);
    }

    /// Answers every request still waiting on this instance, which is
    /// going away: their entries may yet be applied, by another instance.
    fn abandon(&mut self, why: &str) {
        for (_, w) in self.waiting.drain() {
            let _ = w.send(Ok(error_response(
                504,
                &format!("outcome unknown: {why} before the write was applied"),
            )));
        }
    }

    /// Whether writes it submitted or calls it made are still out: what a
    /// local swap waits for. (A request parked with `replies.hold` waits on
    /// nothing the host could wait for.)
    fn outstanding(&self) -> bool {
        let data = self.store.data();
        data.consensus.in_flight() > 0 || data.calls.in_flight() > 0
    }

    /// Whether a request handler may return `pending(ticket)`.
    fn may_wait_on(&self, ticket: u64) -> bool {
        let data = self.store.data();
        data.consensus.knows(ticket) || data.calls.may_wait_on(ticket)
    }
}

/// A JSON error response made by the host on a plugin's behalf.
fn error_response(status: u16, message: &str) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::to_vec(&serde_json::json!({ "error": message }))
            .expect("JSON of a string"),
    }
}

/// A handle to a running plugin.
pub struct PluginHandle {
    env: Arc<PluginEnv>,
    tx: mpsc::Sender<Mail>,
    /// Requests for the plugin's state, served ahead of the mailbox.
    captures: mpsc::Sender<CaptureReply>,
    task: tokio::task::JoinHandle<()>,
}

/// How a plugin is to be started.
pub struct PluginSpec {
    /// Unique name on the node; also its storage namespace and log stream.
    pub name: String,
    /// Granted capabilities.
    pub capabilities: BTreeSet<Capability>,
    /// Resource limits.
    pub limits: PluginLimits,
    /// The `config` table as JSON.
    pub config_json: String,
    /// Whom it may call.
    pub access: Access,
}

impl PluginHandle {
    /// Starts a plugin: instantiates and initialises it, then spawns its
    /// actor. Fails without side effects when the instance cannot start.
    pub async fn start(
        spec: PluginSpec,
        prepared: Prepared,
        services: Services,
    ) -> Result<PluginHandle, LoadError> {
        let (tx, rx) = mpsc::channel(spec.limits.mailbox.max(1));
        let (drops_tx, drops) = mpsc::unbounded_channel();
        let commits = services
            .log
            .subscribe(&spec.name)
            .map_err(|e| LoadError::Init(e.to_string()))?;
        let env = Arc::new(PluginEnv {
            metrics: Mutex::new(PluginMetrics::default()),
            status: Mutex::new(PluginStatus {
                name: spec.name.clone(),
                version: prepared.version.clone(),
                state: RunState::Running,
                capabilities: spec.capabilities.iter().copied().collect(),
                loaded_at_ms: now_ms(),
                restarts: 0,
                traps: 0,
                requests: 0,
                errors: 0,
                swaps: 0,
                last_swap_pause_us: None,
                last_error: None,
                swapped_at_index: None,
                restored_at_index: None,
                control_index: 0,
                mailbox_depth: 0,
                swap_pauses_us: Vec::new(),
            }),
            name: spec.name,
            services,
            limits: spec.limits,
            capabilities: spec.capabilities,
            access: spec.access,
            config_json: Mutex::new(spec.config_json),
            generation: AtomicU64::new(0),
            drops: drops_tx,
        });
        let config = env.config();
        let instance = Instance::start(&env, prepared, tx.downgrade(), config).await?;
        let (captures_tx, captures) = mpsc::channel(4);
        let actor = Actor {
            env: env.clone(),
            rx,
            captures,
            mailbox: tx.downgrade(),
            deferred: VecDeque::new(),
            commits,
            commits_open: true,
            drops,
            calls: FuturesUnordered::new(),
            instance: Some(instance),
            last_prepared: None,
            failures: 0,
        };
        let span =
            tracing::info_span!("plugin", node = %env.services.view.local(), name = %env.name);
        let task = tokio::spawn(actor.run().instrument(span));
        Ok(PluginHandle {
            env,
            tx,
            captures: captures_tx,
            task,
        })
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.env.name
    }

    /// Granted capabilities.
    pub fn capabilities(&self) -> &BTreeSet<Capability> {
        &self.env.capabilities
    }

    /// Latency histograms.
    pub fn metrics(&self) -> PluginMetrics {
        self.env.metrics.lock().expect("metrics poisoned").clone()
    }

    /// Current status.
    pub fn status(&self) -> PluginStatus {
        let mut s = self.env.status.lock().expect("status poisoned").clone();
        s.mailbox_depth = self.tx.max_capacity() - self.tx.capacity();
        s
    }

    async fn send(&self, mail: Mail, deadline: Instant) -> Result<(), CallError> {
        match tokio::time::timeout_at(deadline.into(), self.tx.send(mail)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CallError::Stopped),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// Delivers a client request and waits up to `timeout` for the answer.
    pub async fn request(&self, req: Request, timeout: Duration) -> Result<Response, CallError> {
        self.forwarded(req, 0, timeout).await
    }

    /// Delivers a request that was forwarded `hops` times and waits up to
    /// `timeout` for the answer.
    pub async fn forwarded(
        &self,
        req: Request,
        hops: u8,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let deadline = Instant::now() + timeout;
        let (reply, rx) = oneshot::channel();
        let mail = Mail::Request {
            req,
            hops,
            deadline,
            reply,
        };
        self.send(mail, deadline).await?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Stopped),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// Delivers a message (as if from `from`) and waits for `on-message`.
    pub async fn message(
        &self,
        from: &str,
        topic: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, CallError> {
        let deadline = Instant::now() + timeout;
        let (reply, rx) = oneshot::channel();
        let mail = Mail::Message {
            from: from.to_string(),
            topic: topic.to_string(),
            payload,
            reply: Some(reply),
        };
        self.send(mail, deadline).await?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Stopped),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// Queues membership events for `on-membership`.
    pub async fn membership(&self, events: Vec<MemberEvent>) {
        let _ = self.tx.send(Mail::Membership(events)).await;
    }

    /// Queues a one-way message, waiting only for mailbox space.
    pub async fn deliver(
        &self,
        from: &str,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), CallError> {
        let mail = Mail::Message {
            from: from.to_string(),
            topic: topic.to_string(),
            payload,
            reply: None,
        };
        self.tx.send(mail).await.map_err(|_| CallError::Stopped)
    }

    /// Replaces the running version by `prepared`, handing state over with
    /// snapshot/restore. `config_json`, when given, replaces the config
    /// passed to `init`. On any failure the old version keeps serving.
    pub async fn swap(
        &self,
        prepared: Prepared,
        config_json: Option<String>,
    ) -> Result<SwapReport, SwapError> {
        // Instantiate and init the new version here, off the actor, while the
        // old one keeps serving. Its config takes effect only if it is
        // installed.
        let config = config_json.unwrap_or_else(|| self.env.config());
        let next = Instance::start(&self.env, prepared, self.tx.downgrade(), config)
            .await
            .map_err(SwapError::Load)?;
        let (reply, rx) = oneshot::channel();
        let mail = Mail::Swap {
            next: Box::new(next),
            reply,
        };
        self.tx.send(mail).await.map_err(|_| CallError::Stopped)?;
        rx.await.map_err(|_| SwapError::Call(CallError::Stopped))?
    }

    /// Records that the running version came from the cluster-wide swap at
    /// `index`.
    pub fn mark_swapped(&self, index: u64) {
        self.env.update(|s| {
            s.swapped_at_index = Some(index);
            s.control_index = index;
        });
    }

    /// The plugin's state between two hooks, for a consensus snapshot.
    ///
    /// Served ahead of the mailbox, between two hooks.
    pub async fn capture(&self) -> Option<RestorePoint> {
        let (reply, rx) = oneshot::channel();
        self.captures.send(reply).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Stops the actor after the mail already queued, dropping the instance.
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Mail::Stop { reply }).await.is_ok()
            && tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .is_err()
        {
            self.task.abort();
        }
        self.env.update(|s| s.state = RunState::Stopped);
    }
}

/// Where a captured [`RestorePoint`] goes; `None` when it could not be
/// taken.
type CaptureReply = oneshot::Sender<Option<RestorePoint>>;

struct Actor {
    env: Arc<PluginEnv>,
    rx: mpsc::Receiver<Mail>,
    captures: mpsc::Receiver<CaptureReply>,
    /// For the instances it starts; weak so that dropping the handle ends
    /// the actor.
    mailbox: mpsc::WeakSender<Mail>,
    /// Mail read while waiting out a restart backoff, served first.
    deferred: VecDeque<Mail>,
    commits: watch::Receiver<u64>,
    commits_open: bool,
    /// Submissions that failed after `submit` returned.
    drops: mpsc::UnboundedReceiver<Dropped>,
    /// The work of calls in flight (and of forwards), polled beside the
    /// mailbox.
    calls: FuturesUnordered<CallFuture>,
    instance: Option<Instance>,
    /// What to restart from after the instance died.
    last_prepared: Option<Prepared>,
    failures: u32,
}

enum Next {
    Mail(Mail),
    Capture(CaptureReply),
    Commits,
    Dropped(Dropped),
    Reply(Done),
    Closed,
}

/// Longest a local swap waits for the old version's writes in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Most submitted writes one instance has in flight. Past it the actor
/// takes no new mail until some are applied or dropped, so overload backs
/// up into the bounded mailbox instead of growing memory.
const MAX_IN_FLIGHT: usize = 8192;

impl Actor {
    async fn run(mut self) {
        loop {
            if self.instance.is_none() && !self.restart().await {
                break;
            }
            self.collect().await;
            self.adopt();
            let Some(inst) = &self.instance else { continue };
            let target = *self.commits.borrow_and_update();
            if target > inst.delivered() {
                self.deliver(target).await;
                continue;
            }
            let saturated = inst.store.data().consensus.in_flight() >= MAX_IN_FLIGHT;
            let next = if !saturated && let Some(mail) = self.deferred.pop_front() {
                Next::Mail(mail)
            } else {
                tokio::select! {
                    biased;
                    changed = self.commits.changed(), if self.commits_open => {
                        if changed.is_err() {
                            self.commits_open = false;
                        }
                        Next::Commits
                    }
                    Some(dropped) = self.drops.recv() => Next::Dropped(dropped),
                    Some(done) = self.calls.next(), if !self.calls.is_empty() => match done {
                        Some(done) => Next::Reply(done),
                        None => Next::Commits,
                    },
                    Some(reply) = self.captures.recv() => Next::Capture(reply),
                    mail = self.rx.recv(), if !saturated => mail.map_or(Next::Closed, Next::Mail),
                }
            };
            match next {
                Next::Commits => {}
                Next::Dropped(d) => self.dropped(d),
                Next::Reply(done) => self.reply(done).await,
                Next::Capture(reply) => self.capture(reply).await,
                Next::Closed => break,
                Next::Mail(mail) => {
                    if !self.handle(mail).await {
                        break;
                    }
                }
            }
        }
        self.env.update(|s| s.state = RunState::Stopped);
    }

    /// Takes the calls the last hook started, to poll them beside the
    /// mailbox.
    fn adopt(&mut self) {
        if let Some(inst) = &self.instance {
            self.calls.extend(inst.store.data().calls.take_started());
        }
    }

    /// Marks the instance dead after a failed hook.
    fn kill(&mut self) {
        if let Some(mut inst) = self.instance.take() {
            inst.abandon("the plugin failed");
            self.last_prepared = Some(inst.prepared.clone());
        }
        self.failures += 1;
        self.env.update(|s| s.state = RunState::Restarting);
    }

    fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Starts a fresh instance after a backoff. Returns false if the actor
    /// was told to stop meanwhile.
    async fn restart(&mut self) -> bool {
        let backoff = Duration::from_millis(100u64 << self.failures.saturating_sub(1).min(7))
            .min(Duration::from_secs(10));
        let wake = tokio::time::Instant::now() + backoff;
        // Wait out the backoff, but stay responsive to stop and swap: a swap
        // to a fixed version is how an operator ends a crash loop.
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                // Forwards still answer their clients; the dead instance's
                // call outcomes are dropped.
                Some(_) = self.calls.next(), if !self.calls.is_empty() => {}
                mail = self.rx.recv() => match mail {
                    None => return false,
                    Some(Mail::Stop { reply }) => {
                        let _ = reply.send(());
                        return false;
                    }
                    Some(Mail::Swap { next, reply }) => {
                        let _ = reply.send(Ok(self.take_over(*next)));
                        return true;
                    }
                    Some(other) => self.deferred.push_back(other),
                },
            }
        }
        let Some(prepared) = self.last_prepared.clone() else {
            return false;
        };
        let version = prepared.version.clone();
        let config = self.env.config();
        match Instance::start(&self.env, prepared, self.mailbox.clone(), config).await {
            Ok(inst) => {
                tracing::info!(plugin = %self.env.name, %version, "plugin restarted");
                self.instance = Some(inst);
                self.env.update(|s| {
                    s.restarts += 1;
                    s.state = RunState::Running;
                });
            }
            Err(e) => {
                tracing::warn!(plugin = %self.env.name, %version, "restart failed: {e}");
                self.failures += 1;
                self.env.update(|s| {
                    s.restarts += 1;
                    s.last_error = Some(e.to_string());
                });
            }
        }
        true
    }

    /// Installs `next` in place of a dead instance: no state to hand over.
    fn take_over(&mut self, next: Instance) -> SwapReport {
        let from = self
            .last_prepared
            .as_ref()
            .map(|p| p.version.clone())
            .unwrap_or_default();
        let report = SwapReport {
            from,
            to: next.prepared.version.clone(),
            pause_us: 0,
            state_bytes: 0,
        };
        self.install(next, &report);
        report
    }

    fn install(&mut self, next: Instance, report: &SwapReport) {
        *self.env.config_json.lock().expect("config poisoned") = next.config_json.clone();
        if let Some(mut old) = self.instance.replace(next) {
            old.abandon("the plugin was swapped");
        }
        self.failures = 0;
        self.env
            .metrics
            .lock()
            .expect("metrics poisoned")
            .swap_pause
            .observe(report.pause_us as f64 / 1e6);
        self.env.update(|s| {
            s.version = report.to.clone();
            s.state = RunState::Running;
            s.swaps += 1;
            s.last_swap_pause_us = Some(report.pause_us);
            if s.swap_pauses_us.len() >= PAUSES_KEPT {
                s.swap_pauses_us.remove(0);
            }
            s.swap_pauses_us.push(report.pause_us);
        });
    }

    async fn deliver(&mut self, target: u64) {
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        let from = inst.delivered();
        let entries = match self
            .env
            .services
            .log
            .entries(&self.env.name, from, target, APPLY_BATCH)
        {
            Ok(e) => e,
            Err(LogError::Compacted(_)) => {
                self.catch_up().await;
                return;
            }
            Err(e) => {
                tracing::error!(plugin = %self.env.name, "reading committed entries: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        };
        // A host control entry splits the batch: what comes before it is
        // applied by the current version, what comes after by the next.
        let mut entries = entries;
        let mut cut = false;
        if let Some(pos) = entries.iter().position(is_control) {
            if pos == 0 {
                let control = entries.swap_remove(0);
                self.control(control.index, &control.data).await;
                return;
            }
            entries.truncate(pos);
            cut = true;
        }
        let through = if cut || entries.len() >= APPLY_BATCH {
            entries.last().map_or(target, |e| e.index)
        } else {
            target
        };
        let consensus = &mut inst.store.data_mut().consensus;
        let entries: Vec<_> = entries.into_iter().map(|e| consensus.surface(e)).collect();
        consensus.delivered = through;
        self.apply(&entries).await;
    }

    /// Takes the plugin's state between two hooks: what `snapshot`
    /// returns, and the storage namespace with its cursor.
    async fn capture(&mut self, reply: CaptureReply) {
        let env = self.env.clone();
        let Some(inst) = self.instance.as_mut() else {
            let _ = reply.send(None);
            return;
        };
        if reply.is_closed() {
            return;
        }
        let state = match inst.snapshot(&env).await {
            Ok(state) => state,
            Err(_) => {
                self.kill();
                let _ = reply.send(None);
                return;
            }
        };
        self.succeeded();
        let point = match env.kv(|kv, ns| kv.export(ns)).await {
            Ok((index, items)) => Some(RestorePoint {
                index,
                items,
                state,
                control: None,
            }),
            Err(e) => {
                tracing::warn!(plugin = %env.name, "reading storage for a snapshot: {e}");
                None
            }
        };
        let _ = reply.send(point);
    }

    /// The entries after this instance's cursor were compacted into a
    /// snapshot: replaces the plugin's storage and cursor by the snapshot's
    /// restore point and hands its state to `restore`.
    async fn catch_up(&mut self) {
        let env = self.env.clone();
        let point = match env.services.log.restore_point(&env.name) {
            Ok(Some(point)) => point,
            Ok(None) => {
                tracing::error!(plugin = %env.name, "stream compacted, but no restore point is stored");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            Err(e) => {
                tracing::error!(plugin = %env.name, "reading the restore point: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        };
        let Some(from) = self.instance.as_ref().map(|inst| inst.delivered()) else {
            return;
        };
        // A cluster-wide swap inside the compacted part: switch version
        // first, so the state goes to the version that produced it.
        let applied_control = env.status.lock().expect("status poisoned").control_index;
        if let Some((at, data)) = &point.control
            && *at > from
            && *at > applied_control
        {
            self.control(*at, data).await;
        }
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        let index = point.index;
        let items = point.items;
        if let Err(e) = env.kv(move |kv, ns| kv.replace(ns, items, index)).await {
            tracing::error!(plugin = %env.name, "replacing storage from a snapshot: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        // A fresh instance: its `init` sees the restored storage, then
        // `restore` gets the in-memory state.
        let prepared = inst.prepared.clone();
        inst.abandon("the plugin's state was replaced by a consensus snapshot");
        env.update(|s| s.restored_at_index = Some(index));
        tracing::info!(plugin = %env.name, from, to = index, "plugin state restored from a consensus snapshot");
        let next = Instance::start(&env, prepared, self.mailbox.clone(), env.config()).await;
        let mut next = match next {
            Ok(next) => next,
            Err(e) => {
                // The restart after the backoff starts from the restored
                // storage too.
                tracing::warn!(plugin = %env.name, "starting on the snapshot's state: {e}");
                self.kill();
                return;
            }
        };
        let restored = next.restore(&env, &point.state).await;
        self.instance = Some(next);
        match restored {
            Ok(Ok(())) => self.succeeded(),
            Ok(Err(msg)) => {
                // Storage is already the snapshot's; a fresh instance starts
                // from it without the in-memory part.
                tracing::warn!(plugin = %env.name, "restore refused the snapshot's state: {msg}");
                self.kill();
            }
            Err(_) => self.kill(),
        }
    }

    /// Collects the answers owed for ticketed entries that `propose` or
    /// `read-barrier` handed over during the last hook, with an `apply`
    /// of no entries.
    async fn collect(&mut self) {
        if self
            .instance
            .as_ref()
            .is_some_and(|inst| inst.store.data().consensus.owes_answers)
        {
            self.apply(&[]).await;
        }
    }

    /// Calls `apply` with `entries` (already surfaced and delivered) and
    /// the dropped tickets, and routes the answers it returns.
    async fn apply(&mut self, entries: &[CommittedEntry]) {
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        inst.store.data_mut().consensus.owes_answers = false;
        let dropped = std::mem::take(&mut inst.dropped);
        inst.begin();
        let span = tracing::debug_span!("hook", hook = "apply", plugin = %self.env.name, version = %inst.prepared.version, index = inst.delivered());
        let r = inst
            .bindings
            .plexus_cluster_pattern()
            .call_apply(&mut inst.store, entries, &dropped)
            .instrument(span)
            .await;
        match inst.finish(&self.env, "apply", r).await {
            Ok(()) => {
                inst.route();
                self.succeeded();
            }
            Err(_) => self.kill(),
        }
    }

    /// A call's outcome: to the guest's `on-reply` if the instance that
    /// made the call is still running and has not had it yet.
    async fn reply(&mut self, done: Done) {
        let env = self.env.clone();
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        if !inst.store.data().calls.settle(&done) {
            return;
        }
        inst.begin();
        let span = tracing::debug_span!("hook", hook = "on-reply", plugin = %env.name, version = %inst.prepared.version, ticket = done.ticket);
        let r = inst
            .bindings
            .plexus_cluster_pattern()
            .call_on_reply(&mut inst.store, done.ticket, &done.outcome)
            .instrument(span)
            .await;
        let r = inst.finish(&env, "on-reply", r).await;
        if r.is_ok() {
            inst.route();
        }
        self.after(&r);
    }

    /// Sends a request the plugin forwarded to its instance on `to.node`,
    /// whose answer goes to the client directly. The actor does not wait.
    fn forward(
        &mut self,
        mut req: Request,
        hops: u8,
        deadline: Instant,
        to: ForwardTo,
        reply: oneshot::Sender<Result<Response, CallError>>,
    ) {
        let env = &self.env;
        let refuse = |reply: oneshot::Sender<_>, status, msg: &str| {
            let _ = reply.send(Ok(error_response(status, msg)));
        };
        if !env.capabilities.contains(&Capability::Messaging) {
            return refuse(
                reply,
                500,
                "the plugin forwarded a request, which needs the `messaging` capability",
            );
        }
        if hops >= MAX_HOPS {
            return refuse(
                reply,
                508,
                &format!("the request was forwarded {hops} times without an answer; giving up"),
            );
        }
        req.headers.extend(to.headers);
        let local = env.services.view.local();
        req.source = super::bindings::types::RequestSource::Forwarded(local.to_string());
        if to.node == local {
            let Some(tx) = self.mailbox.upgrade() else {
                return refuse(reply, 503, "the plugin is stopping");
            };
            let mail = Mail::Request {
                req,
                hops: hops + 1,
                deadline,
                reply,
            };
            if let Err(mpsc::error::TrySendError::Full(Mail::Request { reply, .. })) =
                tx.try_send(mail)
            {
                let _ = reply.send(Ok(error_response(503, "the plugin's mailbox is full")));
            }
            return;
        }
        let Some(transport) = env.services.transport.clone() else {
            return refuse(
                reply,
                502,
                &format!(
                    "cannot forward to `{}`: this node is not in a cluster",
                    to.node
                ),
            );
        };
        if !env.services.view.is_reachable(&to.node) {
            return refuse(
                reply,
                502,
                &format!("cannot forward to `{}`: not a reachable member", to.node),
            );
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        let body = postcard::to_allocvec(&Forwarded {
            plugin: env.name.clone(),
            hops: hops + 1,
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            request: WireRequest::from_request(req),
        })
        .expect("a forwarded request encodes");
        let node = to.node;
        self.calls.push(Box::pin(async move {
            let sent = transport.request(&node, KIND_FORWARD, body, timeout).await;
            let response = match Answered::from_transport(sent) {
                Answered::Response(r) => r.into(),
                Answered::NoSuchPlugin(p) => error_response(
                    502,
                    &format!("forwarded to `{node}`, which does not run `{p}`"),
                ),
                Answered::Failed(why) => error_response(
                    502,
                    &format!("forwarded to `{node}`, which failed it: {why}"),
                ),
                Answered::Unknown(why) => error_response(
                    504,
                    &format!(
                        "outcome unknown: forwarded to `{node}`, which did not answer in time ({why})"
                    ),
                ),
            };
            let _ = reply.send(Ok(response));
            None
        }));
    }

    /// A submission failed: answer its request and tell the guest with
    /// the next `apply`.
    fn dropped(&mut self, d: Dropped) {
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        let mine = inst.generation == d.generation || inst.inherited.remove(&d.ticket);
        if !mine || !inst.store.data_mut().consensus.forget(d.ticket) {
            return;
        }
        inst.dropped.push(d.ticket);
        if let Some(w) = inst.waiting.remove(&d.ticket) {
            use crate::runtime::bindings::plexus::cluster::consensus::ConsensusError as E;
            let (status, msg) = match &d.error {
                E::Timeout => (504, "outcome unknown: no quorum before the deadline".into()),
                E::ShuttingDown => (504, "outcome unknown: the node is stopping".into()),
                E::NotLeader(l) => (
                    503,
                    format!("no leader could take the write (last known: {l:?})"),
                ),
                E::TooLarge(max) => (503, format!("entry larger than {max} bytes")),
                E::AccessDenied => (503, "consensus not granted".into()),
                E::Storage(e) => (503, format!("log store failed: {e}")),
            };
            let _ = w.send(Ok(error_response(status, &msg)));
        }
    }

    /// Before a local swap: lets the old version finish the writes and
    /// calls it has in flight, so their clients are answered by the code
    /// that accepted them. Bounded by [`DRAIN_LIMIT`].
    async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        while tokio::time::Instant::now() < deadline {
            self.collect().await;
            self.adopt();
            let Some(inst) = self.instance.as_ref() else {
                return;
            };
            if !inst.outstanding() {
                return;
            }
            let target = *self.commits.borrow_and_update();
            if target > inst.delivered() {
                self.deliver(target).await;
                continue;
            }
            tokio::select! {
                changed = self.commits.changed(), if self.commits_open => {
                    if changed.is_err() {
                        self.commits_open = false;
                    }
                }
                Some(d) = self.drops.recv() => self.dropped(d),
                Some(done) = self.calls.next(), if !self.calls.is_empty() => {
                    if let Some(done) = done {
                        self.reply(done).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Before a cluster-wide swap, which happens at a fixed place in the
    /// log: lets the old version have the outcomes of its calls (its
    /// writes in flight are handed over). Later entries wait meanwhile.
    /// Bounded by [`DRAIN_LIMIT`].
    async fn drain_calls(&mut self) {
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        while tokio::time::Instant::now() < deadline {
            self.collect().await;
            self.adopt();
            let Some(inst) = self.instance.as_ref() else {
                return;
            };
            if inst.store.data().calls.in_flight() == 0 {
                return;
            }
            tokio::select! {
                Some(d) = self.drops.recv() => self.dropped(d),
                Some(done) = self.calls.next(), if !self.calls.is_empty() => {
                    if let Some(done) = done {
                        self.reply(done).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Applies a host control entry at `index`: a cluster-wide swap. Every
    /// node reaches it at the same point of the plugin's stream; a node that
    /// cannot load the new version keeps the old one and reports it.
    async fn control(&mut self, index: u64, data: &[u8]) {
        let env = self.env.clone();
        let outcome = match Control::decode(data) {
            None => Err("undecodable control entry".to_string()),
            Some(Control::Swap { component, config }) => {
                self.drain_calls().await;
                self.cluster_swap(component, config).await
            }
        };
        match &outcome {
            Ok(report) => {
                tracing::info!(plugin = %env.name, index, from = %report.from, to = %report.to, pause_us = report.pause_us, "cluster-wide swap applied")
            }
            Err(e) => {
                tracing::error!(plugin = %env.name, index, "cluster-wide swap failed here; the old version keeps serving: {e}")
            }
        }
        env.update(|s| {
            s.control_index = index;
            if let Err(e) = &outcome {
                s.last_error = Some(format!("cluster-wide swap at index {index} failed: {e}"));
            } else {
                s.swapped_at_index = Some(index);
            }
        });
        if let Some(inst) = self.instance.as_mut() {
            inst.store.data_mut().consensus.delivered = index;
        }
    }

    async fn cluster_swap(
        &mut self,
        component: Vec<u8>,
        config: Option<String>,
    ) -> Result<SwapReport, String> {
        let env = self.env.clone();
        let runtime = env.services.runtime.clone();
        let caps = env.capabilities.clone();
        let prepared =
            tokio::task::spawn_blocking(move || super::prepare(&runtime, &component, &caps))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        let config = config.unwrap_or_else(|| env.config());
        let next = Instance::start(&env, prepared, self.mailbox.clone(), config)
            .await
            .map_err(|e| e.to_string())?;
        self.swap(next).await.map_err(|e| e.to_string())
    }

    async fn handle(&mut self, mail: Mail) -> bool {
        let env = self.env.clone();
        let Some(inst) = self.instance.as_mut() else {
            self.deferred.push_front(mail);
            return true;
        };
        let version = inst.prepared.version.clone();
        match mail {
            Mail::Request {
                req,
                hops,
                deadline,
                reply,
            } => {
                env.update(|s| s.requests += 1);
                inst.begin();
                let span = tracing::debug_span!("hook", hook = "on-request", plugin = %env.name, %version, path = %req.path);
                let r = inst
                    .bindings
                    .plexus_cluster_pattern()
                    .call_on_request(&mut inst.store, &req)
                    .instrument(span)
                    .await;
                match inst.finish(&env, "on-request", r).await {
                    Ok(Reply::Done(response)) => {
                        inst.route();
                        self.succeeded();
                        let _ = reply.send(Ok(response));
                    }
                    Ok(Reply::Pending(ticket)) => {
                        if inst.may_wait_on(ticket) {
                            inst.waiting.insert(ticket, reply);
                        } else {
                            let msg = format!(
                                "the plugin answered pending on ticket {ticket}, which no call of this request returned"
                            );
                            let _ = reply.send(Ok(error_response(500, &msg)));
                        }
                        inst.route();
                        self.succeeded();
                    }
                    Ok(Reply::Forward(to)) => {
                        inst.route();
                        self.succeeded();
                        self.forward(req, hops, deadline, to, reply);
                    }
                    Err(e) => {
                        self.kill();
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Mail::Message {
                from,
                topic,
                payload,
                reply,
            } => {
                inst.begin();
                let span = tracing::debug_span!("hook", hook = "on-message", plugin = %env.name, %version, %topic);
                let r = inst
                    .bindings
                    .plexus_cluster_pattern()
                    .call_on_message(&mut inst.store, &from, &topic, &payload)
                    .instrument(span)
                    .await;
                let r = inst.finish(&env, "on-message", r).await;
                if r.is_ok() {
                    inst.route();
                }
                self.after(&r);
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            Mail::Timer {
                generation,
                id,
                seq,
            } => {
                if !inst.store.data_mut().timers.take_fired(generation, id, seq) {
                    return true;
                }
                inst.begin();
                let span = tracing::debug_span!("hook", hook = "on-timer", plugin = %env.name, %version, id);
                let r = inst
                    .bindings
                    .plexus_cluster_pattern()
                    .call_on_timer(&mut inst.store, id)
                    .instrument(span)
                    .await;
                let r = inst.finish(&env, "on-timer", r).await;
                if r.is_ok() {
                    inst.route();
                }
                self.after(&r);
            }
            Mail::Membership(events) => {
                inst.begin();
                let r = inst
                    .bindings
                    .plexus_cluster_pattern()
                    .call_on_membership(&mut inst.store, &events)
                    .await;
                let r = inst.finish(&env, "on-membership", r).await;
                if r.is_ok() {
                    inst.route();
                }
                self.after(&r);
            }
            Mail::Swap { next, reply } => {
                self.drain().await;
                if self.instance.is_none() {
                    // The old version failed while draining: nothing is
                    // left to hand over, so the new one simply takes over.
                    let _ = reply.send(Ok(self.take_over(*next)));
                    return true;
                }
                let r = self.swap(*next).await;
                let _ = reply.send(r);
            }
            Mail::Stop { reply } => {
                self.instance = None;
                let _ = reply.send(());
                return false;
            }
        }
        true
    }

    fn after<R>(&mut self, r: &Result<R, CallError>) {
        if r.is_ok() {
            self.succeeded();
        } else {
            self.kill();
        }
    }

    async fn swap(&mut self, mut next: Instance) -> Result<SwapReport, SwapError> {
        let env = self.env.clone();
        let started = Instant::now();
        let Some(old) = self.instance.as_mut() else {
            return Err(SwapError::Call(CallError::Stopped));
        };
        let state = match old.snapshot(&env).await {
            Ok(state) => state,
            Err(e) => {
                self.kill();
                return Err(SwapError::Snapshot(e.to_string()));
            }
        };
        // The new instance was built off the hot path and may have read an
        // older cursor; the old instance's is the truth.
        next.store.data_mut().consensus.delivered = old.delivered();
        next.persisted = old.persisted;
        match next.restore(&env, &state).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(SwapError::Restore(msg)),
            Err(e) => return Err(SwapError::Restore(e.to_string())),
        }
        next.inherit(old);
        let report = SwapReport {
            from: old.prepared.version.clone(),
            to: next.prepared.version.clone(),
            pause_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            state_bytes: state.len(),
        };
        self.install(next, &report);
        tracing::info!(plugin = %env.name, from = %report.from, to = %report.to, pause_us = report.pause_us, "plugin swapped");
        Ok(report)
    }
}
