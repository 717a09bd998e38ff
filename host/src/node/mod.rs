//! A node: the runtime, the storage and log engines, and the plugins it
//! runs.
//!
//! Layout: `open` (opening a single node or a cluster member and wiring
//! its parts), `plugins` (the plugin map and directory; load, swap,
//! unload, purge), `members` (voter changes, the commit index, the
//! summary a node gives of itself), `peers` (what other nodes send to
//! this node's plugins), `snapshot` (capturing plugin state for a
//! consensus snapshot).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::raft::RaftLog;
use crate::primitives::CallLimits;
use crate::runtime::actor::{
    Access, CallError, PluginHandle, PluginLimits, PluginStatus, Services,
};
use crate::runtime::bindings::pattern::{Request, Response};
use crate::runtime::engine::Runtime;
use crate::runtime::{Capability, LoadError};

mod members;
mod open;
mod peers;
mod plugins;
mod snapshot;

pub use members::{KIND_SUMMARY, NodeSummary, PluginBrief};
use open::ConsensusThreads;
use plugins::PluginMap;

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
    #[error("plugin `{name}`: {reason}")]
    Load {
        /// Plugin name.
        name: String,
        /// Why.
        reason: LoadError,
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

impl Node {
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

    fn get(&self, name: &str) -> Result<Arc<PluginHandle>, NodeError> {
        self.plugins
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| NodeError::NoSuchPlugin(name.to_string()))
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
