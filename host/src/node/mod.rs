//! A node: the runtime, the storage and log engines, and the plugins it
//! runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use crate::cluster::local_log::LocalLog;
use crate::cluster::log::BoxFuture;
use crate::cluster::raft::{RaftLog, RaftOptions};
use crate::cluster::state_store::RedbKv;
use crate::cluster::swim;
use crate::cluster::transport::{Handler, Transport};
use crate::primitives::CallLimits;
use crate::primitives::consensus::Control;
use crate::primitives::membership::MembershipView;
use crate::primitives::messaging::{Delivery, Envelope, KIND_MESSAGE, KIND_REQUEST};
use crate::primitives::plugins::Directory;
use crate::primitives::wire::{Answered, Forwarded, KIND_CALL, KIND_FORWARD, PluginCall};
use crate::runtime::actor::{
    Access, CallError, PluginHandle, PluginLimits, PluginSpec, PluginStatus, Services, SwapError,
    SwapReport,
};
use crate::runtime::bindings::pattern::{Request, RequestSource, Response};
use crate::runtime::engine::Runtime;
use crate::runtime::{Capability, LoadError, prepare};

/// How to open a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// This node's id.
    pub id: String,
    /// Where the redb files and the compile cache live.
    pub data_dir: PathBuf,
    /// Limits on every plugin's host calls.
    pub call_limits: CallLimits,
    /// Metadata announced in the member list.
    pub metadata: Vec<(String, String)>,
    /// Plugin instances the node holds at once.
    pub max_plugin_instances: usize,
    /// The wall clock plugins read ([`SystemClock`](crate::primitives::timers::SystemClock)
    /// but in tests).
    pub clock: Arc<dyn crate::primitives::timers::Clock>,
}

/// How a node joins a replicated cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Address for peer traffic.
    pub listen: SocketAddr,
    /// The other voters: name and peer address.
    pub peers: Vec<(String, SocketAddr)>,
    /// The shared secrets peers authenticate with: the first seals new
    /// connections, every one is accepted (rotation).
    pub secrets: Vec<String>,
    /// Raft entries between snapshots.
    pub snapshot_every: u64,
    /// Heartbeat and election timeouts.
    pub timing: crate::cluster::raft::Timing,
    /// The node joins a running cluster: it never initialises one, and
    /// waits for a member to add it as a voter.
    pub join: bool,
}

/// Routes peer requests to consensus or to plugins.
struct PeerHandler {
    raft: Arc<RaftLog>,
    node: Weak<Node>,
}

impl Handler for PeerHandler {
    fn request(
        &self,
        from: String,
        kind: u8,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        if kind == KIND_FORWARD || kind == KIND_CALL {
            return self.plugin_request(from, kind, body);
        }
        if kind != KIND_REQUEST {
            return self.raft.handle(kind, body).unwrap_or_else(|| {
                Box::pin(async move { Err(format!("unknown request kind {kind}")) })
            });
        }
        let node = self.node.clone();
        Box::pin(async move {
            let env: Envelope = postcard::from_bytes(&body)
                .map_err(|e| format!("malformed plugin request: {e}"))?;
            let node = node.upgrade().ok_or("node stopping")?;
            let delivery = match node
                .message(
                    &env.plugin,
                    &from,
                    &env.topic,
                    env.payload,
                    Duration::from_secs(60),
                )
                .await
            {
                Ok(reply) => Delivery::Reply(reply.unwrap_or_default()),
                // In the mailbox or running, but no answer in time: it may
                // still run, or have run.
                Err(e @ RequestError::Call(CallError::Timeout)) => Delivery::Unknown(e.to_string()),
                Err(e) => Delivery::Failed(e.to_string()),
            };
            postcard::to_allocvec(&delivery).map_err(|e| e.to_string())
        })
    }

    fn oneway(&self, from: String, kind: u8, body: Vec<u8>) {
        if kind != KIND_MESSAGE {
            tracing::debug!(%from, kind, "ignoring unknown one-way frame");
            return;
        }
        let Ok(env) = postcard::from_bytes::<Envelope>(&body) else {
            tracing::warn!(%from, "dropping a malformed plugin message");
            return;
        };
        let node = self.node.clone();
        tokio::spawn(async move {
            if let Some(node) = node.upgrade() {
                // At most once: a plugin that is not loaded here drops it.
                let _ = node
                    .deliver(&env.plugin, &from, &env.topic, env.payload)
                    .await;
            }
        });
    }
}

impl PeerHandler {
    /// A client request forwarded here, or a plugin's call: the plugin's
    /// answer, or how it failed, is the reply.
    fn plugin_request(
        &self,
        from: String,
        kind: u8,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let node = self.node.clone();
        Box::pin(async move {
            let (plugin, req, hops, timeout_ms) = if kind == KIND_FORWARD {
                let f: Forwarded = postcard::from_bytes(&body)
                    .map_err(|e| format!("malformed forwarded request: {e}"))?;
                let req = f
                    .request
                    .into_request(RequestSource::Forwarded(from.clone()))
                    .ok_or("malformed forwarded request: unknown method")?;
                (f.plugin, req, f.hops, f.timeout_ms)
            } else {
                let c: PluginCall = postcard::from_bytes(&body)
                    .map_err(|e| format!("malformed plugin call: {e}"))?;
                let timeout_ms = c.timeout_ms;
                let (plugin, req) = c
                    .into_request(&from)
                    .ok_or("malformed plugin call: unknown method")?;
                (plugin, req, 0, timeout_ms)
            };
            let node = node.upgrade().ok_or("node stopping")?;
            let timeout = Duration::from_millis(u64::from(timeout_ms.clamp(1, 60_000)));
            let answered = node.plugins.call(&plugin, req, hops, timeout).await;
            Ok(answered.encode())
        })
    }
}

/// The plugins of a node, by name.
#[derive(Default)]
struct PluginMap(RwLock<BTreeMap<String, Arc<PluginHandle>>>);

impl PluginMap {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<PluginHandle>>> {
        self.0.read().expect("plugin map poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<PluginHandle>>> {
        self.0.write().expect("plugin map poisoned")
    }
}

/// What a plugin's answer to a request handed to it means to the caller.
fn answered(plugin: &str, r: Result<Response, CallError>) -> Answered {
    match r {
        Ok(response) => Answered::Response(response.into()),
        Err(e @ CallError::Timeout) => Answered::Unknown(format!("`{plugin}`: {e}")),
        Err(e) => Answered::Failed(format!("`{plugin}`: {e}")),
    }
}

impl Directory for PluginMap {
    fn call(
        &self,
        plugin: &str,
        req: Request,
        hops: u8,
        timeout: Duration,
    ) -> BoxFuture<'static, Answered> {
        let handle = self.read().get(plugin).cloned();
        let plugin = plugin.to_string();
        Box::pin(async move {
            let Some(handle) = handle else {
                return Answered::NoSuchPlugin(plugin);
            };
            answered(&plugin, handle.forwarded(req, hops, timeout).await)
        })
    }
}

/// The directory handed to plugins: weak, so that plugins holding it do
/// not keep their own map alive.
struct WeakDirectory(Weak<PluginMap>);

impl Directory for WeakDirectory {
    fn call(
        &self,
        plugin: &str,
        req: Request,
        hops: u8,
        timeout: Duration,
    ) -> BoxFuture<'static, Answered> {
        match self.0.upgrade() {
            Some(map) => map.call(plugin, req, hops, timeout),
            None => Box::pin(std::future::ready(Answered::Failed(
                "the node is stopping".into(),
            ))),
        }
    }
}

/// The outcome of a cluster-wide swap on this node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterSwap {
    /// The log index every node switches at.
    pub index: u64,
    /// The version now running here.
    pub version: String,
}

/// A plugin to load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Unique name.
    pub name: String,
    /// The component's bytes.
    pub component: Arc<[u8]>,
    /// Granted capabilities.
    pub capabilities: BTreeSet<Capability>,
    /// Resource limits.
    pub limits: PluginLimits,
    /// The `config` table as JSON.
    pub config_json: String,
    /// Whom it may call.
    pub access: Access,
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No plugin of that name.
    #[error("no plugin named `{0}`")]
    NoSuchPlugin(String),
    /// A plugin of that name is already loaded.
    #[error("a plugin named `{0}` is already loaded")]
    AlreadyLoaded(String),
    /// The component was refused.
    #[error("plugin `{name}`: {source}")]
    Load {
        /// Plugin name.
        name: String,
        /// Why.
        source: LoadError,
    },
    /// Invalid limits in a spec.
    #[error("plugin `{name}`: {reason}")]
    Limits {
        /// Plugin name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A cluster operation on a single node.
    #[error("this node is not part of a cluster")]
    NotACluster,
    /// A voter change failed.
    #[error("changing the voters failed: {0}")]
    Members(crate::cluster::log::LogError),
    /// A plugin's storage could not be purged.
    #[error("purging storage: {0}")]
    Purge(String),
}

/// Takes a plugin's state for a consensus snapshot from its actor.
struct Captor(std::sync::Weak<Node>);

impl crate::cluster::log::Capture for Captor {
    fn capture(
        &self,
        deadline: Duration,
    ) -> crate::cluster::log::BoxFuture<
        'static,
        std::collections::HashMap<String, crate::cluster::log::RestorePoint>,
    > {
        let handles: Vec<Arc<PluginHandle>> = self.0.upgrade().map_or_else(Vec::new, |node| {
            node.plugins.read().values().cloned().collect()
        });
        Box::pin(async move {
            let mut set = tokio::task::JoinSet::new();
            for h in handles {
                set.spawn(async move {
                    let point = tokio::time::timeout(deadline, h.capture()).await;
                    (h.name().to_string(), point)
                });
            }
            let mut points = std::collections::HashMap::new();
            while let Some(done) = set.join_next().await {
                match done {
                    Ok((name, Ok(Some(point)))) => {
                        points.insert(name, point);
                    }
                    Ok((name, Err(_))) => tracing::warn!(
                        plugin = %name,
                        "plugin state not captured in time; its stream is not compacted by this snapshot"
                    ),
                    _ => {}
                }
            }
            points
        })
    }
}

/// A running node.
pub struct Node {
    id: String,
    runtime: Arc<Runtime>,
    services: Services,
    plugins: Arc<PluginMap>,
    /// The replicated log, in a cluster.
    raft: Option<Arc<RaftLog>>,
    /// Where the replicated log and the peer connections run, in a cluster.
    _consensus: Option<ConsensusThreads>,
}

/// The threads Raft and its peer connections run on, apart from those of the
/// plugins and the HTTP ingress: a replication round trip or a heartbeat
/// never waits in a run queue behind plugin work, so a busy node neither
/// slows every commit nor misses its heartbeats and loses its leadership.
struct ConsensusThreads(Option<tokio::runtime::Runtime>);

impl ConsensusThreads {
    fn start() -> anyhow::Result<ConsensusThreads> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            // Raft's log appends block this thread: Raft waits for each
            // one before it goes on anyway. Its rarer writes (votes,
            // snapshots, compaction) hand the other tasks to a second
            // thread meanwhile.
            .worker_threads(1)
            .thread_name("plexus-consensus")
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("starting the consensus threads: {e}"))?;
        Ok(ConsensusThreads(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("consensus runtime present until drop")
            .handle()
    }
}

impl Drop for ConsensusThreads {
    fn drop(&mut self) {
        // A node may be dropped inside async code, where a runtime may not
        // block to join its threads.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Node {
    /// Opens a single-node cluster: the node's stores under `data_dir`
    /// (created if missing) and its local log. Must be called inside a
    /// tokio runtime.
    pub fn open(opts: NodeOptions) -> anyhow::Result<Arc<Node>> {
        use anyhow::Context;
        std::fs::create_dir_all(&opts.data_dir)
            .with_context(|| format!("creating data directory {}", opts.data_dir.display()))?;
        let log = LocalLog::open(&opts.data_dir.join("log.redb"), &opts.id)
            .with_context(|| format!("opening {}", opts.data_dir.join("log.redb").display()))?;
        let view = MembershipView::single(&opts.id, opts.metadata.clone());
        Node::assemble(opts, Arc::new(log), view, None, None, None)
    }

    /// Opens a member of a replicated cluster: starts the peer transport on
    /// `cluster.listen` and the Raft log shared with `cluster.peers`.
    pub async fn open_cluster(
        opts: NodeOptions,
        cluster: ClusterOptions,
    ) -> anyhow::Result<Arc<Node>> {
        use anyhow::Context;
        std::fs::create_dir_all(&opts.data_dir)
            .with_context(|| format!("creating data directory {}", opts.data_dir.display()))?;
        let mut members: BTreeMap<String, SocketAddr> = cluster.peers.iter().cloned().collect();
        members.insert(opts.id.clone(), cluster.listen);
        let consensus = ConsensusThreads::start()?;
        let (transport, raft) = {
            let (id, dir, members, cluster) = (
                opts.id.clone(),
                opts.data_dir.clone(),
                members.clone(),
                cluster.clone(),
            );
            consensus
                .handle()
                .spawn(async move {
                    let transport = Transport::new(
                        &id,
                        crate::cluster::secure::Keys::new(&cluster.secrets),
                        cluster.peers.iter().cloned(),
                    );
                    transport.listen(cluster.listen).await?;
                    let raft = RaftLog::start(RaftOptions {
                        me: &id,
                        members,
                        dir: &dir,
                        transport: transport.clone(),
                        snapshot_every: cluster.snapshot_every,
                        timing: cluster.timing,
                        bootstrap: !cluster.join,
                    })
                    .await
                    .context("starting the replicated log")?;
                    anyhow::Ok((transport, raft))
                })
                .await??
        };
        // Plugin traffic between nodes is served where the plugins run.
        transport.serve_plugins_on(tokio::runtime::Handle::current());
        let view =
            MembershipView::cluster(&opts.id, members.keys().cloned(), opts.metadata.clone());
        if cluster.join {
            // Not a voter until a member adds it; the Raft membership
            // corrects this once the node has one.
            let _ = view.set_voters(&cluster.peers.iter().map(|(n, _)| n.clone()).collect());
        }
        let me = opts.id.clone();
        let node = Node::assemble(
            opts,
            Arc::new(raft.clone()),
            view.clone(),
            Some(transport.clone()),
            Some(raft.clone()),
            Some(consensus),
        )?;
        // Gossip runs on the peer port, over UDP.
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let id = |name: &str, addr: SocketAddr, generation| swim::Id {
            name: name.to_string(),
            addr,
            generation,
        };
        let peers = cluster.peers.iter().map(|(n, a)| id(n, *a, 0)).collect();
        let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
        swim::start(
            id(&me, cluster.listen, generation),
            peers,
            cluster
                .secrets
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect::<Vec<_>>()
                .into(),
            view.clone(),
            events_tx.clone(),
        )
        .await?;
        // Voters come from the Raft membership: from the config at first,
        // then from every `cluster join` / `cluster leave`.
        // A member the membership drops leaves the view at once.
        let (mut voters, mut all) = (raft.voters(), raft.members());
        tokio::spawn(async move {
            loop {
                let now = voters.borrow_and_update().clone();
                let everyone = all.borrow_and_update().clone();
                if !now.is_empty() {
                    let events = view.set_members(&now, &everyone);
                    if !events.is_empty() && events_tx.send(events).is_err() {
                        return;
                    }
                }
                let changed = tokio::select! {
                    r = voters.changed() => r,
                    r = all.changed() => r,
                };
                if changed.is_err() {
                    return;
                }
            }
        });
        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            while let Some(events) = events_rx.recv().await {
                let Some(node) = weak.upgrade() else { return };
                let handles: Vec<_> = node.plugins.read().values().cloned().collect();
                for h in handles {
                    h.membership(events.clone()).await;
                }
            }
        });
        transport.set_handler(Arc::new(PeerHandler {
            raft,
            node: Arc::downgrade(&node),
        }));
        Ok(node)
    }

    fn assemble(
        opts: NodeOptions,
        log: Arc<dyn crate::cluster::log::ConsensusBackend>,
        view: Arc<MembershipView>,
        transport: Option<Arc<Transport>>,
        raft: Option<Arc<RaftLog>>,
        consensus: Option<ConsensusThreads>,
    ) -> anyhow::Result<Arc<Node>> {
        use anyhow::Context;
        let runtime = Runtime::new(Some(opts.data_dir.join("cache")), opts.max_plugin_instances)?;
        let kv = RedbKv::open(&opts.data_dir.join("state.redb"))
            .with_context(|| format!("opening {}", opts.data_dir.join("state.redb").display()))?;
        let plugins = Arc::new(PluginMap::default());
        let services = Services {
            kv: Arc::new(kv),
            log,
            view,
            call_limits: opts.call_limits,
            transport,
            runtime: runtime.clone(),
            clock: opts.clock,
            directory: Arc::new(WeakDirectory(Arc::downgrade(&plugins))),
            http: Arc::new(crate::primitives::outbound::OutboundClient::default()),
        };
        let node = Arc::new(Node {
            id: opts.id,
            runtime,
            services,
            plugins,
            raft,
            _consensus: consensus,
        });
        node.services
            .log
            .set_capture(Arc::new(Captor(Arc::downgrade(&node))));
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The runtime (engine and compile cache).
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The services plugins are wired to.
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// The membership index by which this node learned it was removed
    /// from the cluster (it no longer campaigns); `None` while a member
    /// or on a single node.
    pub fn removed_at(&self) -> Option<u64> {
        self.raft.as_ref().and_then(|r| r.removed_at())
    }

    /// Adds or removes a voter of the cluster (`plexus cluster join` /
    /// `leave`), through the leader. Returns the voters after the change.
    pub async fn change_members(
        &self,
        change: crate::cluster::raft::MemberChange,
    ) -> Result<BTreeSet<String>, NodeError> {
        let Some(raft) = &self.raft else {
            return Err(NodeError::NotACluster);
        };
        raft.change_members(change)
            .await
            .map_err(NodeError::Members)
    }

    /// The consensus commit index.
    pub fn commit_index(&self) -> u64 {
        self.services.log.commit_index()
    }

    fn get(&self, name: &str) -> Result<Arc<PluginHandle>, NodeError> {
        self.plugins
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| NodeError::NoSuchPlugin(name.to_string()))
    }

    /// Compiles and checks a component for `capabilities`, off the async
    /// threads.
    pub async fn prepare(
        &self,
        name: &str,
        component: Arc<[u8]>,
        capabilities: BTreeSet<Capability>,
    ) -> Result<crate::runtime::Prepared, NodeError> {
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || prepare(&runtime, &component, &capabilities))
            .await
            .map_err(|e| NodeError::Load {
                name: name.to_string(),
                source: LoadError::Invalid(e.to_string()),
            })?
            .map_err(|source| NodeError::Load {
                name: name.to_string(),
                source,
            })
    }

    /// Loads a plugin and starts serving it.
    ///
    /// When the log holds a cluster-wide swap of the plugin at or below
    /// the entries this node has already applied for it, the node runs
    /// the swapped version, not the one in `spec`: every node applies the
    /// plugin's stream with the same code.
    pub async fn load(&self, mut spec: LoadSpec) -> Result<PluginStatus, NodeError> {
        if self.plugins.read().contains_key(&spec.name) {
            return Err(NodeError::AlreadyLoaded(spec.name));
        }
        if spec.limits.memory_bytes > crate::runtime::engine::MAX_MEMORY_BYTES {
            return Err(NodeError::Limits {
                name: spec.name,
                reason: format!(
                    "memory limit exceeds the node maximum of {} MiB",
                    crate::runtime::engine::MAX_MEMORY_BYTES >> 20
                ),
            });
        }
        let swapped = self.swapped_version(&spec.name)?;
        if let Some((index, Control::Swap { component, config })) = &swapped {
            if component.as_slice() != &*spec.component {
                tracing::info!(
                    plugin = %spec.name,
                    index,
                    "running the version of the cluster-wide swap at this index, not the configured one"
                );
                spec.component = Arc::from(component.as_slice());
            }
            if let Some(config) = config {
                spec.config_json = config.clone();
            }
        }
        let prepared = self
            .prepare(
                &spec.name,
                spec.component.clone(),
                spec.capabilities.clone(),
            )
            .await?;
        let name = spec.name.clone();
        let handle = PluginHandle::start(
            PluginSpec {
                name: spec.name,
                capabilities: spec.capabilities,
                limits: spec.limits,
                config_json: spec.config_json,
                access: spec.access,
            },
            prepared,
            self.services.clone(),
        )
        .await
        .map_err(|source| NodeError::Load {
            name: name.clone(),
            source,
        })?;
        if let Some((index, _)) = swapped {
            handle.mark_swapped(index);
        }
        let status = handle.status();
        let mut plugins = self.plugins.write();
        if plugins.contains_key(&name) {
            return Err(NodeError::AlreadyLoaded(name));
        }
        plugins.insert(name, Arc::new(handle));
        Ok(status)
    }

    /// The last cluster-wide swap of `name` that this node has applied, if
    /// any: its index and entry.
    fn swapped_version(&self, name: &str) -> Result<Option<(u64, Control)>, NodeError> {
        let failed = |reason: String| NodeError::Load {
            name: name.to_string(),
            source: LoadError::Init(reason),
        };
        let applied = self
            .services
            .kv
            .applied_index(name)
            .map_err(|e| failed(e.to_string()))?;
        if applied == 0 {
            return Ok(None);
        }
        let Some((index, data)) = self
            .services
            .log
            .last_control(name, applied)
            .map_err(|e| failed(e.to_string()))?
        else {
            return Ok(None);
        };
        match Control::decode(&data) {
            Some(control) => Ok(Some((index, control))),
            None => Err(failed(format!(
                "undecodable control entry at index {index}"
            ))),
        }
    }

    /// Hot-swaps a plugin to a new component (and optionally new config).
    pub async fn swap(
        &self,
        name: &str,
        component: Arc<[u8]>,
        config_json: Option<String>,
    ) -> Result<SwapReport, SwapError> {
        let (handle, prepared) = self.prepare_swap(name, component).await?;
        handle.swap(prepared, config_json).await
    }

    /// The running plugin and the new component compiled and checked
    /// against its capabilities.
    async fn prepare_swap(
        &self,
        name: &str,
        component: Arc<[u8]>,
    ) -> Result<(Arc<PluginHandle>, crate::runtime::Prepared), SwapError> {
        let handle = self
            .get(name)
            .map_err(|_| SwapError::Call(CallError::Stopped))?;
        let prepared = self
            .prepare(name, component, handle.capabilities().clone())
            .await
            .map_err(|e| match e {
                NodeError::Load { source, .. } => SwapError::Load(source),
                other => SwapError::Load(LoadError::Invalid(other.to_string())),
            })?;
        Ok((handle, prepared))
    }

    /// Swaps a plugin on every node at the same log index: the component
    /// goes into the plugin's log stream as a control entry, and each node
    /// switches when it applies it, between the entries before and after.
    /// Returns the index once this node has switched; a node that cannot
    /// load the version keeps the old one and reports it in its status.
    pub async fn swap_cluster(
        &self,
        name: &str,
        component: Arc<[u8]>,
        config_json: Option<String>,
    ) -> Result<ClusterSwap, SwapError> {
        // Refuse here what would fail everywhere, before it is in the log.
        // This also leaves the compiled form in this node's cache.
        let (handle, _) = self.prepare_swap(name, component.clone()).await?;
        let entry = Control::Swap {
            component: component.to_vec(),
            config: config_json,
        }
        .encode();
        let index =
            self.services.log.propose(name, entry).await.map_err(|e| {
                SwapError::Load(LoadError::Invalid(format!("proposing the swap: {e}")))
            })?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = handle.status();
            if status.control_index >= index {
                return match status.swapped_at_index {
                    Some(i) if i == index => Ok(ClusterSwap {
                        index,
                        version: status.version,
                    }),
                    _ => Err(SwapError::Load(LoadError::Invalid(
                        status.last_error.unwrap_or_default(),
                    ))),
                };
            }
            if std::time::Instant::now() > deadline {
                return Err(SwapError::Call(CallError::Timeout));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops and removes a plugin. Its storage stays.
    pub async fn unload(&self, name: &str) -> Result<(), NodeError> {
        let handle = self
            .plugins
            .write()
            .remove(name)
            .ok_or_else(|| NodeError::NoSuchPlugin(name.to_string()))?;
        handle.stop().await;
        Ok(())
    }

    /// Records on plugin `name` (if loaded) why a change of its config
    /// entry was refused, or that one was applied.
    pub fn set_reload_error(&self, name: &str, error: Option<String>) {
        if let Ok(handle) = self.get(name) {
            handle.set_reload_error(error);
        }
    }

    /// Deletes this node's storage of plugin `name`, which must not be
    /// loaded, and moves its delivery cursor to the last committed entry,
    /// so that a later load starts empty instead of replaying what the
    /// log already holds for it. Other nodes keep their copies. Returns
    /// how many keys were removed.
    pub async fn purge(&self, name: &str) -> Result<usize, NodeError> {
        if self.plugins.read().contains_key(name) {
            return Err(NodeError::Purge(format!(
                "`{name}` is loaded: unload it first (`plexus plugin unload {name} --purge` does both)"
            )));
        }
        let kv = self.services.kv.clone();
        let through = self.services.log.commit_index();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let (_, items) = kv.export(&name)?;
            kv.replace(&name, Vec::new(), through)?;
            Ok::<_, crate::cluster::state_store::StoreError>(items.len())
        })
        .await
        .map_err(|e| NodeError::Purge(e.to_string()))?
        .map_err(|e| NodeError::Purge(e.to_string()))
    }

    /// What this node still holds of plugin `name` from an earlier load:
    /// its applied log index, when it holds any keys.
    pub fn leftover_storage(&self, name: &str) -> Option<u64> {
        let kv = &self.services.kv;
        let has_keys = kv
            .reader(name)
            .and_then(|r| r.scan(b"", None, 1))
            .is_ok_and(|keys| !keys.is_empty());
        has_keys.then(|| kv.applied_index(name).unwrap_or(0))
    }

    /// Sends a client request to a plugin.
    pub async fn request(
        &self,
        name: &str,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, RequestError> {
        let handle = self
            .get(name)
            .map_err(|_| RequestError::NoSuchPlugin(name.to_string()))?;
        handle
            .request(req, timeout)
            .await
            .map_err(RequestError::Call)
    }

    /// Delivers a message to a plugin as if sent by `from`.
    pub async fn message(
        &self,
        name: &str,
        from: &str,
        topic: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, RequestError> {
        let handle = self
            .get(name)
            .map_err(|_| RequestError::NoSuchPlugin(name.to_string()))?;
        handle
            .message(from, topic, payload, timeout)
            .await
            .map_err(RequestError::Call)
    }

    /// Queues a one-way message for a plugin as if sent by `from`, waiting
    /// for mailbox space (back-pressure) but not for the handler.
    pub async fn deliver(
        &self,
        name: &str,
        from: &str,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), RequestError> {
        let handle = self
            .get(name)
            .map_err(|_| RequestError::NoSuchPlugin(name.to_string()))?;
        handle
            .deliver(from, topic, payload)
            .await
            .map_err(RequestError::Call)
    }

    /// Status of every plugin, by name.
    pub fn plugins(&self) -> Vec<PluginStatus> {
        self.plugins.read().values().map(|h| h.status()).collect()
    }

    /// Status and latency histograms of every plugin, by name.
    pub fn plugin_metrics(&self) -> Vec<(PluginStatus, crate::runtime::metrics::PluginMetrics)> {
        self.plugins
            .read()
            .values()
            .map(|h| (h.status(), h.metrics()))
            .collect()
    }

    /// Status of one plugin.
    pub fn plugin(&self, name: &str) -> Option<PluginStatus> {
        self.get(name).ok().map(|h| h.status())
    }

    /// Stops every plugin.
    pub async fn shutdown(&self) {
        let all: Vec<_> = std::mem::take(&mut *self.plugins.write())
            .into_values()
            .collect();
        for handle in all {
            handle.stop().await;
        }
    }
}

/// Why a request to a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No plugin of that name.
    #[error("no plugin named `{0}`")]
    NoSuchPlugin(String),
    /// The plugin did not answer.
    #[error(transparent)]
    Call(CallError),
}
