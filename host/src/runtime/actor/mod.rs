//! The plugin actor: one task per plugin that owns the live instance and
//! drains its bounded mailbox, one hook call at a time.
//!
//! Everything that reaches a plugin — client requests, messages, timers,
//! committed log entries, a swap — goes through here, so a swap happens
//! between two mailbox items and nothing queued is lost or seen twice. A
//! hook that traps kills only its instance: the actor restarts the plugin
//! with backoff while the mailbox keeps what arrives meanwhile.
//!
//! The mailbox items, [`Mail`], are defined in [`super::mail`], below the
//! primitives that post timers and local messages into a mailbox.

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
use super::journal::{SwapRecord, SwapScope};
use super::mail::SwapOrder;
pub use super::mail::{CallError, Mail};
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

/// Runs one hook on an instance: starts its clock and its book of calls,
/// calls the guest inside a debug span (fields after `;`), and finishes
/// the call (its storage writes committed or discarded, its latency
/// observed). Evaluates to the hook's result.
macro_rules! hook {
    ($inst:expr, $env:expr, $name:literal, $call:ident($($arg:expr),*) $(; $($field:tt)*)?) => {{
        let inst = &mut *$inst;
        inst.begin();
        let span = tracing::debug_span!(
            "hook",
            hook = $name,
            plugin = %$env.name,
            version = %inst.prepared.version
            $(, $($field)*)?
        );
        let r = inst
            .bindings
            .plexus_cluster_pattern()
            .$call(&mut inst.store $(, $arg)*)
            .instrument(span)
            .await;
        inst.finish(&$env, $name, r).await
    }};
}

mod handle;
mod instance;
mod run;
mod stream;
mod swap;

pub use instance::new_store;
use instance::now_ms;
use swap::Swap;

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
/// Times in a row one entry's `apply` may fail (with restarts and
/// backoff between) before the plugin is marked failed at its index.
const APPLY_ATTEMPTS: u32 = 5;
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
    pub transport: Option<Arc<dyn crate::cluster::transport::PeerLinks>>,
    /// The engine, for versions that arrive through the log.
    pub runtime: Arc<super::engine::Runtime>,
    /// The wall clock behind `timers.now-ms`.
    pub clock: Arc<dyn crate::primitives::timers::Clock>,
    /// The plugins of this node, for `plugins.call`.
    pub directory: Arc<dyn Directory>,
    /// The pooled client behind `outbound-http`.
    pub http: Arc<OutboundClient>,
    /// Where swaps and failures are recorded for the operator.
    pub journal: Arc<super::journal::Journal>,
}

/// Where a plugin is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Serving.
    Running,
    /// Its instance failed; a new one starts after a backoff.
    Restarting,
    /// A committed entry keeps failing its `apply`: no instance runs
    /// until a swap brings a version that applies it (see `last_error`).
    Failed,
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
    /// Why the last change of its entry in the config file was refused
    /// (the plugin runs as it was); cleared when a change is applied.
    pub reload_error: Option<String>,
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

    /// Records a failure as the plugin's `last_error`, after `count`
    /// has counted it, and in the node's journal.
    fn failure(&self, message: String, count: impl FnOnce(&mut PluginStatus)) {
        self.services.journal.error(&self.name, &message);
        self.update(|s| {
            count(s);
            s.last_error = Some(message);
        });
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

/// Where an instance sends what happens outside its hook calls.
pub struct Channels {
    /// Timers and local messages.
    pub mailbox: mpsc::WeakSender<Mail>,
    /// Submissions that failed.
    pub drops: mpsc::UnboundedSender<Dropped>,
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
    /// The entry whose `apply` failed last, and how many times in a row:
    /// while set, entries are applied one at a time, so the failing one
    /// is known exactly.
    suspect: Option<(u64, u32)>,
    /// Why the plugin is [`RunState::Failed`].
    failed: Option<String>,
}

/// What ended a wait with no instance ([`Actor::idle`]).
enum Idle {
    /// The time given came.
    Woke,
    /// A swap installed a new version.
    SwappedIn,
    /// The actor is to stop.
    Stopped,
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
