//! Opening a node: a single node on its local log, or a member of a
//! replicated cluster with its peer transport, Raft log and gossip.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::peers::PeerHandler;
use super::plugins::{PluginMap, WeakDirectory};
use super::snapshot::Captor;
use super::{ClusterOptions, Node, NodeOptions};
use crate::cluster::local_log::LocalLog;
use crate::cluster::raft::{RaftLog, RaftOptions};
use crate::cluster::state_store::RedbKv;
use crate::cluster::swim;
use crate::cluster::transport::Transport;
use crate::primitives::membership::MembershipView;
use crate::runtime::actor::Services;
use crate::runtime::engine::Runtime;

/// The threads Raft and its peer connections run on, apart from those of the
/// plugins and the HTTP ingress: a replication round trip or a heartbeat
/// never waits in a run queue behind plugin work, so a busy node neither
/// slows every commit nor misses its heartbeats and loses its leadership.
pub(super) struct ConsensusThreads(Option<tokio::runtime::Runtime>);

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
            inboxes: Default::default(),
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
            transport: transport.map(|t| t as Arc<dyn crate::cluster::transport::PeerLinks>),
            runtime: runtime.clone(),
            clock: opts.clock,
            directory: Arc::new(WeakDirectory(Arc::downgrade(&plugins))),
            http: Arc::new(crate::primitives::outbound::OutboundClient::default()),
            journal: Arc::default(),
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
}
