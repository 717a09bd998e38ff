//! A node's plugins: the map of them by name, the directory plugins call
//! each other through, and loading, swapping, unloading and purging.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use super::{ClusterSwap, LoadSpec, Node, NodeError};
use crate::cluster::log::BoxFuture;
use crate::primitives::consensus::Control;
use crate::primitives::plugins::Directory;
use crate::primitives::wire::Answered;
use crate::runtime::actor::{
    CallError, PluginHandle, PluginSpec, PluginStatus, SwapError, SwapReport,
};
use crate::runtime::bindings::pattern::{Request, Response};
use crate::runtime::journal::{self, SwapRecord, SwapScope};
use crate::runtime::{Capability, LoadError, prepare};

/// The plugins of a node, by name.
#[derive(Default)]
pub(super) struct PluginMap(RwLock<BTreeMap<String, Arc<PluginHandle>>>);

impl PluginMap {
    pub(super) fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<PluginHandle>>> {
        self.0.read().expect("plugin map poisoned")
    }

    pub(super) fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<PluginHandle>>> {
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
pub(super) struct WeakDirectory(pub(super) Weak<PluginMap>);

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

impl Node {
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
                reason: LoadError::Invalid(e.to_string()),
            })?
            .map_err(|reason| NodeError::Load {
                name: name.to_string(),
                reason,
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
        .map_err(|reason| NodeError::Load {
            name: name.clone(),
            reason,
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
            reason: LoadError::Init(reason),
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
        self.swap_by(name, component, config_json, "api").await
    }

    /// As [`Node::swap`], naming who asked (`admin API`, `config file`) in
    /// the node's swap history.
    pub async fn swap_by(
        &self,
        name: &str,
        component: Arc<[u8]>,
        config_json: Option<String>,
        by: &str,
    ) -> Result<SwapReport, SwapError> {
        let from = self.plugin(name).map(|s| s.version);
        let result = async {
            let (handle, prepared) = self.prepare_swap(name, component).await?;
            handle.swap(prepared, config_json).await
        }
        .await;
        if let Some(from) = from {
            self.services.journal.swap(SwapRecord {
                at_ms: journal::now_ms(),
                plugin: name.to_string(),
                from,
                to: result.as_ref().ok().map(|r| r.to.clone()),
                pause_us: result.as_ref().map_or(0, |r| r.pause_us),
                state_bytes: result.as_ref().map_or(0, |r| r.state_bytes),
                scope: SwapScope::Local,
                index: None,
                by: by.to_string(),
                error: result.as_ref().err().map(ToString::to_string),
            });
        }
        result
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
                NodeError::Load { reason, .. } => SwapError::Load(reason),
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
        self.swap_cluster_by(name, component, config_json, "api")
            .await
    }

    /// As [`Node::swap_cluster`], naming who asked in this node's swap
    /// history (other nodes say `log`).
    pub async fn swap_cluster_by(
        &self,
        name: &str,
        component: Arc<[u8]>,
        config_json: Option<String>,
        by: &str,
    ) -> Result<ClusterSwap, SwapError> {
        // Refuse here what would fail everywhere, before it is in the log.
        // This also leaves the compiled form in this node's cache.
        let (handle, _) = match self.prepare_swap(name, component.clone()).await {
            Ok(prepared) => prepared,
            Err(e) => {
                if let Some(status) = self.plugin(name) {
                    self.services.journal.swap(SwapRecord {
                        at_ms: journal::now_ms(),
                        plugin: name.to_string(),
                        from: status.version,
                        to: None,
                        pause_us: 0,
                        state_bytes: 0,
                        scope: SwapScope::Cluster,
                        index: None,
                        by: by.to_string(),
                        error: Some(e.to_string()),
                    });
                }
                return Err(e);
            }
        };
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
                self.services.journal.asked(name, index, by);
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
        tokio::task::spawn_blocking(move || kv.purge(&name, through))
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
}
