//! Live reconcile: make the running plugins match an edited config.
//!
//! Added plugins load; a changed component or `config` table swaps (with
//! state handoff); changed capabilities or limits reload the plugin (its
//! storage stays, its in-memory state does not); removed plugins unload.
//! An invalid file changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::{Config, PluginEntry};
use crate::node::Node;

/// What a plugin entry resolved to when it was last applied.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Applied {
    component_hash: [u8; 32],
    entry_shape: String,
    config_json: String,
}

fn shape(entry: &PluginEntry) -> String {
    // Capabilities, limits and whom it may call: changing them needs a new
    // linker and store, so a reload rather than a swap.
    format!(
        "{:?}|{:?}|{:?}|{:?}",
        entry.capabilities,
        entry.limits.to_limits(),
        entry.allowed_plugins,
        entry.allowed_outbound_hosts
    )
}

/// One action taken by a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Loaded a new plugin.
    Loaded(String),
    /// Swapped to a new component or config.
    Swapped(String),
    /// Unloaded and loaded again with new capabilities or limits.
    Reloaded(String),
    /// Unloaded.
    Unloaded(String),
    /// Failed; the plugin is left as it was.
    Failed(String, String),
}

/// Keeps a node in line with its config file.
pub struct Reconciler {
    node: Arc<Node>,
    base_dir: PathBuf,
    applied: BTreeMap<String, Applied>,
}

impl Reconciler {
    /// A reconciler for a node that has just loaded `config`.
    pub fn new(node: Arc<Node>, config: &Config) -> anyhow::Result<Reconciler> {
        let mut applied = BTreeMap::new();
        for entry in &config.plugins {
            let bytes = entry.component_bytes(&config.base_dir)?;
            applied.insert(entry.name.clone(), resolve(entry, &bytes));
        }
        Ok(Reconciler {
            node,
            base_dir: config.base_dir.clone(),
            applied,
        })
    }

    /// Applies `config`, returning what was done. Each plugin is handled on
    /// its own: one failure does not stop the others.
    pub async fn apply(&mut self, config: &Config) -> Vec<Action> {
        self.base_dir = config.base_dir.clone();
        let mut actions = Vec::new();
        let wanted: BTreeMap<&str, &PluginEntry> = config
            .plugins
            .iter()
            .map(|p| (p.name.as_str(), p))
            .collect();
        let removed: Vec<String> = self
            .applied
            .keys()
            .filter(|n| !wanted.contains_key(n.as_str()))
            .cloned()
            .collect();
        for name in removed {
            match self.node.unload(&name).await {
                Ok(()) => actions.push(Action::Unloaded(name.clone())),
                Err(e) => actions.push(Action::Failed(name.clone(), e.to_string())),
            }
            self.applied.remove(&name);
        }
        for (name, entry) in wanted {
            let bytes = match entry.component_bytes(&self.base_dir) {
                Ok(b) => b,
                Err(e) => {
                    actions.push(Action::Failed(name.to_string(), e.to_string()));
                    continue;
                }
            };
            let next = resolve(entry, &bytes);
            let action = match self.applied.get(name) {
                None => self
                    .load(entry, bytes)
                    .await
                    .map(|()| Action::Loaded(name.to_string())),
                Some(current) if *current == next => continue,
                Some(current) if current.entry_shape != next.entry_shape => {
                    let _ = self.node.unload(name).await;
                    self.applied.remove(name);
                    self.load(entry, bytes)
                        .await
                        .map(|()| Action::Reloaded(name.to_string()))
                }
                Some(_) => self
                    .node
                    .swap_by(
                        name,
                        Arc::from(bytes),
                        Some(next.config_json.clone()),
                        "config file",
                    )
                    .await
                    .map(|_| Action::Swapped(name.to_string()))
                    .map_err(|e| e.to_string()),
            };
            match action {
                Ok(a) => {
                    self.applied.insert(name.to_string(), next);
                    self.node.set_reload_error(name, None);
                    actions.push(a);
                }
                Err(e) => {
                    let located = config.locate_plugin_error(name, &e);
                    // Visible in the plugin's status, not only in the log.
                    self.node.set_reload_error(name, Some(located.clone()));
                    actions.push(Action::Failed(name.to_string(), located));
                }
            }
        }
        actions
    }

    async fn load(&self, entry: &PluginEntry, bytes: Vec<u8>) -> Result<(), String> {
        self.node
            .load(entry.load_spec(bytes))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn resolve(entry: &PluginEntry, bytes: &[u8]) -> Applied {
    Applied {
        component_hash: Sha256::digest(bytes).into(),
        entry_shape: shape(entry),
        config_json: entry.config_json(),
    }
}

/// What the watcher compares between polls: the config's bytes and the
/// modification times of the component files it names.
pub type Fingerprint = Option<(Vec<u8>, Vec<Option<SystemTime>>)>;

/// The [`Fingerprint`] of the config at `path` now. Take it before the
/// node starts from the file, so that an edit made while it starts is
/// seen.
pub fn fingerprint(path: &Path) -> Fingerprint {
    let text = std::fs::read(path).ok()?;
    let base = path.parent().unwrap_or(Path::new("."));
    let times = Config::load(path)
        .map(|c| {
            c.plugins
                .iter()
                .filter(|p| !p.component.starts_with("bundled:"))
                .map(|p| {
                    std::fs::metadata(base.join(&p.component))
                        .and_then(|m| m.modified())
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    Some((text, times))
}

/// Polls `path` every `interval` and reconciles the node whenever the file
/// (or a component file it names) differs from `last`, taken when the node
/// read `started` from it. Runs until the task is dropped.
pub async fn watch(
    mut reconciler: Reconciler,
    path: PathBuf,
    interval: Duration,
    mut last: Fingerprint,
    started: &Config,
) {
    // `[node]`, `[cluster]` and `[admin]` take effect at a restart; an edit
    // of them is reported, not silently ignored.
    let sections = |c: &Config| {
        [
            ("node", format!("{:?}", c.node)),
            ("cluster", format!("{:?}", c.cluster)),
            ("admin", format!("{:?}", c.admin)),
        ]
    };
    let running = Some(sections(started));
    loop {
        tokio::time::sleep(interval).await;
        let now = fingerprint(&path);
        if now == last {
            continue;
        }
        last = now;
        match Config::load(&path) {
            Err(e) => tracing::error!("config change rejected, running set unchanged: {e}"),
            Ok(config) => {
                if let Some(running) = &running {
                    let changed: Vec<&str> = sections(&config)
                        .iter()
                        .zip(running)
                        .filter(|(now, was)| now.1 != was.1)
                        .map(|(now, _)| now.0)
                        .collect();
                    if !changed.is_empty() {
                        tracing::warn!(
                            config = %path.display(),
                            sections = %changed.join(", "),
                            "changes to these sections take effect when the node restarts; plugins are reconciled now"
                        );
                    }
                }
                let actions = reconciler.apply(&config).await;
                if actions.is_empty() {
                    tracing::info!(config = %path.display(), "config changed; plugins already match");
                }
                for action in actions {
                    match action {
                        Action::Failed(name, e) => {
                            tracing::error!(plugin = %name, "reconcile failed, plugin left as it was: {e}")
                        }
                        other => tracing::info!(config = %path.display(), "reconcile: {other:?}"),
                    }
                }
            }
        }
    }
}
