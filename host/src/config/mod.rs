//! The node config file (TOML).
//!
//! ```toml
//! version = 1
//!
//! [node]
//! id = "node-1"
//! data_dir = "./plexus-data"
//! http = "127.0.0.1:7070"
//!
//! [[plugins]]
//! name = "kv"
//! component = "bundled:replicated-kv"
//! capabilities = ["consensus", "storage", "log"]
//! limits = { memory_mib = 64, cpu_ms = 1000, mailbox = 1024 }
//! config = {}
//! ```
//!
//! Every table rejects unknown keys. Errors name the file, line, column and
//! the key's dotted path.
//!
//! Layout: `sections` (`[node]`, `[cluster]`, `[admin]`), `plugin` (a
//! `[[plugins]]` entry and reading its component), `validate` (the rules
//! beyond the types), `locate` (placing an error at its line and column),
//! `reconcile` (making the running plugins match an edited file); tests in
//! `tests`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

mod locate;
mod plugin;
pub mod reconcile;
mod sections;
#[cfg(test)]
mod tests;
mod validate;

use locate::{line_col, span_of};
pub use plugin::{LimitsEntry, MAX_COMPONENT_BYTES, PluginEntry, read_component_file};
pub use sections::{AdminSection, ClusterSection, NodeSection};
pub use validate::check_name;

/// A config error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}: {message}")]
pub struct ConfigError {
    /// The file (or `<embedded>`).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted path of the offending key (`.` for the document).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Schema version; must be 1.
    pub version: u32,
    /// This node.
    #[serde(default)]
    pub node: NodeSection,
    /// Cluster membership (used once the node joins a cluster).
    #[serde(default)]
    pub cluster: ClusterSection,
    /// The admin API.
    #[serde(default)]
    pub admin: AdminSection,
    /// Plugins to load at start.
    #[serde(default)]
    pub plugins: Vec<PluginEntry>,
    /// Directory of the config file, for resolving relative paths.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file's name and text, to place errors found later (a plugin's
    /// `init` refusing its config) at their line and column.
    #[serde(skip)]
    pub source: Option<Arc<Source>>,
}

/// The text a [`Config`] was parsed from.
#[derive(Debug)]
pub struct Source {
    /// The file (or `<embedded>`).
    pub file: String,
    /// Its text.
    pub text: String,
}

impl Config {
    /// The config `plexus up` uses without a file: one node on
    /// 127.0.0.1:7070, data in `./plexus-data`, the pattern plugins loaded.
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_CONFIG, "<embedded>", Path::new("."))
            .expect("the embedded default config is valid")
    }

    /// The cluster this node joins, or `None` for a single node (no
    /// `[cluster]` peers).
    pub fn cluster_options(&self) -> anyhow::Result<Option<crate::node::ClusterOptions>> {
        if self.cluster.peers.is_empty() {
            return Ok(None);
        }
        let (Some(listen), Some(secret)) = (self.cluster.listen, self.cluster.secret.clone())
        else {
            anyhow::bail!("cluster.peers needs cluster.listen and cluster.secret");
        };
        let peers = self
            .cluster
            .peers
            .iter()
            .map(|p| {
                let (id, addr) = p.split_once('@').expect("validated");
                (id.to_string(), addr.parse().expect("validated"))
            })
            .collect();
        Ok(Some(crate::node::ClusterOptions {
            listen,
            peers,
            secrets: std::iter::once(secret)
                .chain(self.cluster.previous_secrets.iter().cloned())
                .collect(),
            snapshot_every: self.cluster.snapshot_every,
            timing: crate::cluster::raft::Timing {
                heartbeat_ms: self.cluster.heartbeat_ms,
                election_min_ms: self.cluster.election_timeout_ms[0],
                election_max_ms: self.cluster.election_timeout_ms[1],
            },
            join: self.cluster.join,
        }))
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            key: ".".into(),
            message: format!("cannot read: {e}"),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, &path.display().to_string(), &base)
    }

    /// Parses and validates config text. `file` names it in errors;
    /// relative paths resolve against `base_dir`.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let located = |key: String, span: Option<Range<usize>>, message: String| {
            let span = span.or_else(|| span_of(text, &key));
            let (line, column) = span.map_or((1, 1), |s| line_col(text, s.start));
            ConfigError {
                file: file.to_string(),
                line,
                column,
                key,
                message,
            }
        };
        let de = toml::de::Deserializer::parse(text)
            .map_err(|e| located(".".into(), e.span(), e.message().to_string()))?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            located(key, inner.span(), inner.message().to_string())
        })?;
        config.base_dir = base_dir.to_path_buf();
        config.source = Some(Arc::new(Source {
            file: file.to_string(),
            text: text.to_string(),
        }));
        if config.node.data_dir.is_relative() {
            config.node.data_dir = base_dir.join(&config.node.data_dir);
        }
        config
            .validate()
            .map_err(|(key, message)| located(key, None, message))?;
        Ok(config)
    }
}

/// The embedded single-node default.
pub const DEFAULT_CONFIG: &str = r#"
version = 1

[node]
id = "node-1"
data_dir = "plexus-data"
http = "127.0.0.1:7070"

[[plugins]]
name = "kv"
component = "bundled:replicated-kv"
capabilities = ["consensus", "storage", "log"]

[[plugins]]
name = "election"
component = "bundled:leader-election"
capabilities = ["consensus", "storage", "timers", "log"]
config = { campaign = ["primary"], ttl_ms = 3000 }

[[plugins]]
name = "pubsub"
component = "bundled:pubsub"
capabilities = ["consensus", "storage", "timers"]

[[plugins]]
name = "wq"
component = "bundled:work-queue"
capabilities = ["consensus", "storage", "timers"]

[[plugins]]
name = "shards"
component = "bundled:sharding"
capabilities = ["consensus", "storage", "timers", "messaging", "membership"]
[[plugins]]
name = "events"
component = "bundled:event-store"
capabilities = ["consensus", "storage", "timers", "plugins"]
allowed_plugins = ["bank"]

[[plugins]]
name = "bank"
component = "bundled:cqrs"
capabilities = ["consensus", "storage", "timers", "plugins", "log"]
allowed_plugins = ["events"]
[plugins.config]
store = "events"
[plugins.config.aggregates.account.on]
Opened = { set = { owner = "$.owner", balance = 0 } }
Deposited = { add = { balance = "$.amount" } }
Withdrawn = { sub = { balance = "$.amount" } }
[plugins.config.aggregates.account.commands]
open = { event = "Opened", expect = "new", required = ["owner"] }
deposit = { event = "Deposited", required = ["amount"], rules = [{ field = "amount", min = 1 }] }
withdraw = { event = "Withdrawn", required = ["amount"], rules = [{ field = "amount", min = 1, at_most_state = "balance", message = "insufficient funds" }] }
[plugins.config.projections.balances]
streams = "account-"
[plugins.config.projections.balances.on]
Opened = { set = { owner = "$.owner", balance = 0 } }
Deposited = { add = { balance = "$.amount" } }
Withdrawn = { sub = { balance = "$.amount" } }
"#;
