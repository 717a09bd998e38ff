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

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::runtime::Capability;
use crate::runtime::actor::PluginLimits;

pub mod reconcile;

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

/// `[node]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Node id, `[a-z0-9-]`, 1..=64 bytes.
    #[serde(default = "default_id")]
    pub id: String,
    /// Data directory (relative to the config file).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// HTTP listen address for clients and admin.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// Largest request body, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How long a client request may wait for its plugin, in ms.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// The head of each HTTP request must arrive within this many ms of
    /// the connection opening or of the previous response; a keep-alive
    /// connection idle that long is closed.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_ms: u64,
    /// A request's whole body must arrive within this many ms of its head
    /// (408 otherwise).
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_ms: u64,
    /// Most HTTP connections served at once; one more is answered 503 and
    /// closed. Lowered at start to leave 256 descriptors of the process's
    /// limit to peers, storage and plugins.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most HTTP connections from one client address at once (default:
    /// 512, or `max_connections` if lower); one more is answered 429 and
    /// closed.
    #[serde(default)]
    pub max_connections_per_client: Option<usize>,
    /// Plugin instances the node holds at once: a plugin holds one, two
    /// while it is swapped. Each takes a slot of address space reserved
    /// at start; an idle plugin's memory is what its instance touched.
    #[serde(default = "default_max_plugin_instances")]
    pub max_plugin_instances: usize,
    /// Metadata announced to other members.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: default_id(),
            data_dir: default_data_dir(),
            http: default_http(),
            max_body_bytes: default_max_body(),
            request_timeout_ms: default_request_timeout(),
            header_read_timeout_ms: default_header_read_timeout(),
            body_read_timeout_ms: default_body_read_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_client: None,
            max_plugin_instances: default_max_plugin_instances(),
            metadata: BTreeMap::new(),
        }
    }
}

fn default_id() -> String {
    "node-1".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("plexus-data")
}
fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}
fn default_max_body() -> usize {
    16 << 20
}
fn default_request_timeout() -> u64 {
    10_000
}
fn default_header_read_timeout() -> u64 {
    10_000
}
fn default_body_read_timeout() -> u64 {
    30_000
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_plugin_instances() -> usize {
    crate::runtime::engine::DEFAULT_INSTANCE_SLOTS
}

impl NodeSection {
    /// The per-client connection cap in force.
    pub fn connections_per_client(&self) -> usize {
        self.max_connections_per_client
            .unwrap_or(512)
            .min(self.max_connections)
    }
}

/// `[cluster]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Address for peer traffic.
    pub listen: Option<SocketAddr>,
    /// Other members: `id@host:port`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Shared secret that peers authenticate with (at least 16 bytes). New
    /// peer connections are sealed with it.
    pub secret: Option<String>,
    /// Earlier secrets, still accepted from peers and tried after `secret`
    /// when a peer refuses it: for rotating the secret one node at a time
    /// (README, "Security").
    #[serde(default)]
    pub previous_secrets: Vec<String>,
    /// Raft entries between snapshots of the replicated state; older log
    /// entries are then purged and a lagging node catches up from the
    /// snapshot.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// How often the leader sends heartbeats, in milliseconds.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// `[min, max]`: a follower that hears no heartbeat for a random time
    /// in this range (milliseconds) starts an election. The upper bound is
    /// also the leader's lease. Failover takes about the upper bound.
    #[serde(default = "default_election_timeout_ms")]
    pub election_timeout_ms: [u64; 2],
    /// This node joins a running cluster: it never initialises one, and
    /// waits until a member adds it (`plexus cluster join`). `peers` then
    /// lists members to reach.
    #[serde(default)]
    pub join: bool,
}

fn default_snapshot_every() -> u64 {
    20_000
}
fn default_heartbeat_ms() -> u64 {
    crate::cluster::raft::Timing::default().heartbeat_ms
}
fn default_election_timeout_ms() -> [u64; 2] {
    let t = crate::cluster::raft::Timing::default();
    [t.election_min_ms, t.election_max_ms]
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            listen: None,
            peers: Vec::new(),
            secret: None,
            previous_secrets: Vec::new(),
            snapshot_every: default_snapshot_every(),
            heartbeat_ms: default_heartbeat_ms(),
            election_timeout_ms: default_election_timeout_ms(),
            join: false,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Bearer token for `/v1/admin`; without one the admin API is off.
    pub token: Option<String>,
}

/// One `[[plugins]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// Unique name, `[a-z0-9-]`, 1..=64 bytes.
    pub name: String,
    /// `bundled:NAME` or a path to a `.wasm` component.
    pub component: String,
    /// Interfaces granted; anything else the component imports is refused.
    #[serde(default)]
    pub capabilities: BTreeSet<Capability>,
    /// Resource limits.
    #[serde(default)]
    pub limits: LimitsEntry,
    /// Passed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// Plugins it may call (`plugins` capability).
    #[serde(default)]
    pub allowed_plugins: BTreeSet<String>,
    /// Origins it may send HTTP requests to (`outbound-http` capability):
    /// `http://HOST`, `http://HOST:PORT` or `http://HOST:*`.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
}

/// `limits` of a plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsEntry {
    /// Linear memory cap in MiB (1..=1024).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// CPU deadline per hook call in ms (1..=60000).
    #[serde(default = "default_cpu")]
    pub cpu_ms: u64,
    /// Mailbox capacity (1..=65536).
    #[serde(default = "default_mailbox")]
    pub mailbox: usize,
    /// Most calls (messaging, plugins, outbound HTTP) in flight at once
    /// (1..=65536).
    #[serde(default = "default_calls")]
    pub max_calls_in_flight: u32,
    /// Largest outbound HTTP response body, in bytes (1..=64 MiB).
    #[serde(default = "default_response")]
    pub max_response_bytes: u64,
}

impl Default for LimitsEntry {
    fn default() -> Self {
        LimitsEntry {
            memory_mib: default_memory(),
            cpu_ms: default_cpu(),
            mailbox: default_mailbox(),
            max_calls_in_flight: default_calls(),
            max_response_bytes: default_response(),
        }
    }
}

fn default_calls() -> u32 {
    crate::primitives::CallQuota::default().max_in_flight
}
fn default_response() -> u64 {
    crate::primitives::CallQuota::default().max_response_bytes
}

fn default_memory() -> u64 {
    64
}
fn default_cpu() -> u64 {
    1000
}
fn default_mailbox() -> usize {
    1024
}

impl LimitsEntry {
    /// As runtime limits.
    pub fn to_limits(&self) -> PluginLimits {
        PluginLimits {
            memory_bytes: self.memory_mib << 20,
            cpu: Duration::from_millis(self.cpu_ms),
            mailbox: self.mailbox,
            quota: crate::primitives::CallQuota {
                max_in_flight: self.max_calls_in_flight,
                max_response_bytes: self.max_response_bytes,
            },
        }
    }
}

impl PluginEntry {
    /// The `config` table as JSON text.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".into())
    }

    /// What the node loads for this entry, given the component's bytes.
    pub fn load_spec(&self, component: Vec<u8>) -> crate::node::LoadSpec {
        crate::node::LoadSpec {
            name: self.name.clone(),
            component: std::sync::Arc::from(component),
            capabilities: self.capabilities.clone(),
            limits: self.limits.to_limits(),
            config_json: self.config_json(),
            access: self.access(),
        }
    }

    /// Whom the plugin may call. Call after [`PluginEntry::validate`].
    pub fn access(&self) -> crate::runtime::actor::Access {
        crate::runtime::actor::Access {
            plugins: std::sync::Arc::new(self.allowed_plugins.clone()),
            outbound: std::sync::Arc::new(
                self.allowed_outbound_hosts
                    .iter()
                    .filter_map(|o| o.parse().ok())
                    .collect(),
            ),
        }
    }

    /// The component's bytes: bundled or read from disk.
    pub fn component_bytes(&self, base_dir: &Path) -> anyhow::Result<Vec<u8>> {
        if let Some(name) = self.component.strip_prefix("bundled:") {
            let bytes = crate::bundled::get(name).ok_or_else(|| {
                let known: Vec<_> = crate::bundled::names().collect();
                anyhow::anyhow!("no bundled plugin `{name}` (bundled: {})", known.join(", "))
            })?;
            return Ok(bytes.to_vec());
        }
        read_component_file(&base_dir.join(&self.component)).map_err(|e| anyhow::anyhow!(e))
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// The span of the value (or table header) at a dotted path such as
/// `plugins[1].limits.cpu_ms`, found by walking the document.
fn span_of(text: &str, key: &str) -> Option<Range<usize>> {
    let doc: toml::Spanned<toml::de::DeTable<'_>> = toml::de::DeTable::parse(text).ok()?;
    let mut span = doc.span();
    let mut current: Option<&toml::de::DeValue<'_>> = None;
    let mut table = Some(doc.get_ref());
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let t = match current {
            None => table?,
            Some(toml::de::DeValue::Table(t)) => t,
            Some(_) => return Some(span),
        };
        let value = t.get(name)?;
        span = value.span();
        current = Some(value.get_ref());
        table = None;
        if let (Some(i), toml::de::DeValue::Array(items)) = (index, value.get_ref()) {
            let item = items.get(i)?;
            span = item.span();
            current = Some(item.get_ref());
        }
    }
    Some(span)
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

    /// Places an error about plugin `name` in the file: `FILE:LINE:COL:
    /// plugins[N].KEY: what`. A message naming a key of the plugin's
    /// config as the SDK does (`config.KEY: what`) points at that key;
    /// any other at the plugin's entry.
    pub fn locate_plugin_error(&self, name: &str, message: &str) -> String {
        let (Some(source), Some(index)) = (
            &self.source,
            self.plugins.iter().position(|p| p.name == name),
        ) else {
            return message.to_string();
        };
        let entry = format!("plugins[{index}]");
        let found = message
            .match_indices("config")
            .filter(|(at, _)| *at == 0 || message[..*at].ends_with(": "))
            .find_map(|(at, _)| {
                let rest = &message[at..];
                let (path, what) = rest.split_once(": ")?;
                let valid = path == "config"
                    || path
                        .strip_prefix("config.")
                        .is_some_and(|k| !k.is_empty() && !k.contains(char::is_whitespace));
                valid.then(|| (path.to_string(), what.to_string()))
            });
        let (key, what) = match found {
            Some((path, what)) => (format!("{entry}.{path}"), what),
            None => (entry.clone(), message.to_string()),
        };
        // The deepest part of the key the file holds: a missing key is
        // placed at the table that lacks it.
        let mut probe = key.as_str();
        let span = loop {
            if let Some(span) = span_of(&source.text, probe) {
                break Some(span);
            }
            match probe.rfind('.') {
                Some(dot) => probe = &probe[..dot],
                None => break None,
            }
        };
        let (line, column) = span.map_or((1, 1), |s| line_col(&source.text, s.start));
        format!("{}:{line}:{column}: {key}: {what}", source.file)
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

    fn validate(&self) -> Result<(), (String, String)> {
        if self.version != 1 {
            return Err((
                "version".into(),
                format!(
                    "unsupported config version {}; this node reads version 1",
                    self.version
                ),
            ));
        }
        check_name(&self.node.id).map_err(|m| ("node.id".to_string(), m))?;
        if self.node.request_timeout_ms == 0 || self.node.request_timeout_ms > 600_000 {
            return Err((
                "node.request_timeout_ms".into(),
                "must be in 1..=600000".into(),
            ));
        }
        for (key, value) in [
            (
                "node.header_read_timeout_ms",
                self.node.header_read_timeout_ms,
            ),
            ("node.body_read_timeout_ms", self.node.body_read_timeout_ms),
        ] {
            if !(100..=600_000).contains(&value) {
                return Err((key.into(), "must be in 100..=600000".into()));
            }
        }
        if !(1..=1_000_000).contains(&self.node.max_connections) {
            return Err((
                "node.max_connections".into(),
                "must be in 1..=1000000".into(),
            ));
        }
        if self
            .node
            .max_connections_per_client
            .is_some_and(|n| !(1..=self.node.max_connections).contains(&n))
        {
            return Err((
                "node.max_connections_per_client".into(),
                "must be in 1..=node.max_connections".into(),
            ));
        }
        if !(1..=16_384).contains(&self.node.max_plugin_instances) {
            return Err((
                "node.max_plugin_instances".into(),
                "must be in 1..=16384".into(),
            ));
        }
        if self.node.max_body_bytes == 0 || self.node.max_body_bytes > 256 << 20 {
            return Err((
                "node.max_body_bytes".into(),
                "must be in 1..=268435456".into(),
            ));
        }
        if self.cluster.secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(("cluster.secret".into(), "must be at least 16 bytes".into()));
        }
        for (i, s) in self.cluster.previous_secrets.iter().enumerate() {
            if s.len() < 16 {
                return Err((
                    format!("cluster.previous_secrets[{i}]"),
                    "must be at least 16 bytes".into(),
                ));
            }
        }
        for (i, peer) in self.cluster.peers.iter().enumerate() {
            let ok = peer.split_once('@').is_some_and(|(id, addr)| {
                check_name(id).is_ok() && addr.parse::<SocketAddr>().is_ok()
            });
            if !ok {
                return Err((
                    format!("cluster.peers[{i}]"),
                    format!("`{peer}` is not of the form id@host:port"),
                ));
            }
        }
        if self.cluster.join && self.cluster.peers.is_empty() {
            return Err((
                "cluster.join".into(),
                "needs cluster.peers: the members to reach".into(),
            ));
        }
        if !self.cluster.peers.is_empty() {
            // Other members dial the address recorded for this node in the
            // Raft membership, which is `listen`.
            if self.cluster.listen.is_some_and(|a| a.ip().is_unspecified()) {
                return Err((
                    "cluster.listen".into(),
                    "must be an address the other members can reach, not a wildcard".into(),
                ));
            }
            if self.cluster.listen.is_none() {
                return Err((
                    "cluster.listen".into(),
                    "required when cluster.peers is set".into(),
                ));
            }
            if self.cluster.secret.is_none() {
                return Err((
                    "cluster.secret".into(),
                    "required when cluster.peers is set".into(),
                ));
            }
            if self
                .cluster
                .peers
                .iter()
                .any(|p| p.split_once('@').is_some_and(|(id, _)| id == self.node.id))
            {
                return Err((
                    "cluster.peers".into(),
                    "must not list this node itself".into(),
                ));
            }
        }
        if !(10..=10_000_000).contains(&self.cluster.snapshot_every) {
            return Err((
                "cluster.snapshot_every".into(),
                "must be in 10..=10000000".into(),
            ));
        }
        let [low, high] = self.cluster.election_timeout_ms;
        if !(10..=60_000).contains(&self.cluster.heartbeat_ms) {
            return Err((
                "cluster.heartbeat_ms".into(),
                "must be in 10..=60000".into(),
            ));
        }
        if low <= self.cluster.heartbeat_ms * 2 || high <= low || high > 600_000 {
            return Err((
                "cluster.election_timeout_ms".into(),
                "must be [min, max] with heartbeat_ms * 2 < min < max <= 600000".into(),
            ));
        }
        if self.admin.token.as_ref().is_some_and(|t| t.len() < 8) {
            return Err(("admin.token".into(), "must be at least 8 bytes".into()));
        }
        let mut seen = BTreeSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            let at = |k: &str| format!("plugins[{i}].{k}");
            check_name(&p.name).map_err(|m| (at("name"), m))?;
            if !seen.insert(p.name.as_str()) {
                return Err((at("name"), format!("plugin `{}` is listed twice", p.name)));
            }
            p.validate().map_err(|(k, m)| (at(&k), m))?;
        }
        Ok(())
    }
}

impl PluginEntry {
    /// Checks one plugin entry, from the config file or from the admin
    /// API: the same rules, the key named relative to the entry
    /// (`limits.mailbox`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        check_name(&self.name).map_err(|m| ("name".to_string(), m))?;
        if self.component.is_empty() {
            return Err(("component".into(), "must not be empty".into()));
        }
        for (i, name) in self.allowed_plugins.iter().enumerate() {
            check_name(name).map_err(|m| (format!("allowed_plugins[{i}]"), m))?;
        }
        for (i, origin) in self.allowed_outbound_hosts.iter().enumerate() {
            origin
                .parse::<crate::primitives::outbound::Origin>()
                .map_err(|m| (format!("allowed_outbound_hosts[{i}]"), m))?;
        }
        for (listed, key, cap) in [
            (
                !self.allowed_plugins.is_empty(),
                "allowed_plugins",
                Capability::Plugins,
            ),
            (
                !self.allowed_outbound_hosts.is_empty(),
                "allowed_outbound_hosts",
                Capability::OutboundHttp,
            ),
        ] {
            if listed && !self.capabilities.contains(&cap) {
                return Err((
                    key.into(),
                    format!(
                        "lists whom the plugin may call, but it is not granted `{cap}`: add \"{cap}\" to its capabilities"
                    ),
                ));
            }
        }
        self.limits.validate()
    }
}

impl LimitsEntry {
    /// Checks the limits' ranges; the key is named `limits.FIELD`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(1..=1024).contains(&self.memory_mib) {
            return Err(("limits.memory_mib".into(), "must be in 1..=1024".into()));
        }
        if !(1..=60_000).contains(&self.cpu_ms) {
            return Err(("limits.cpu_ms".into(), "must be in 1..=60000".into()));
        }
        if !(1..=65_536).contains(&self.mailbox) {
            return Err(("limits.mailbox".into(), "must be in 1..=65536".into()));
        }
        if !(1..=65_536).contains(&self.max_calls_in_flight) {
            return Err((
                "limits.max_calls_in_flight".into(),
                "must be in 1..=65536".into(),
            ));
        }
        if !(1..=64 << 20).contains(&self.max_response_bytes) {
            return Err((
                "limits.max_response_bytes".into(),
                "must be in 1..=67108864".into(),
            ));
        }
        Ok(())
    }
}

/// Largest component file read from disk.
pub const MAX_COMPONENT_BYTES: u64 = 64 << 20;

/// Reads a component file: a regular file only (not a FIFO, a device or a
/// directory, which could block or never end), at most
/// [`MAX_COMPONENT_BYTES`]. Blocking: call it off the async runtime.
pub fn read_component_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    // Opened without blocking (a FIFO's open would wait for a writer),
    // then checked on the open file itself, so it cannot be swapped
    // between the check and the read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("reading component {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("reading component {shown}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("reading component {shown}: not a regular file"));
    }
    if meta.len() > MAX_COMPONENT_BYTES {
        return Err(format!(
            "reading component {shown}: {} bytes, more than the {MAX_COMPONENT_BYTES} byte limit",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_COMPONENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading component {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        return Err(format!(
            "reading component {shown}: more than the {MAX_COMPONENT_BYTES} byte limit"
        ));
    }
    Ok(bytes)
}

/// Checks a node or plugin name: `[a-z0-9-]`, 1..=64 bytes, not starting
/// with `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be 1..=64 of [a-z0-9-], not starting with `-`"
        ))
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
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::Rng;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "node.toml", Path::new("/etc/plexus"))
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default();
        assert_eq!(c.plugins.len(), 2);
        assert_eq!(c.plugins[0].name, "kv");
    }

    #[test]
    fn type_error_names_file_line_column_and_key() {
        let text = "version = 1\n\n[[plugins]]\nname = \"kv\"\ncomponent = \"bundled:replicated-kv\"\nlimits = { memory_mib = \"lots\" }\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.file, "node.toml");
        assert_eq!(e.key, "plugins[0].limits.memory_mib");
        assert_eq!(e.line, 6);
        assert!(e.column > 1, "{e}");
        assert!(e.message.contains("string"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_path() {
        let e = parse("version = 1\n[node]\nid = \"a\"\nport = 3\n").unwrap_err();
        assert_eq!(e.key, "node.port");
        assert!(e.message.contains("port"), "{e}");
        assert_eq!(e.line, 4);
    }

    #[test]
    fn semantic_error_points_at_the_value() {
        let e = parse("version = 1\n[[plugins]]\nname = \"Bad Name\"\ncomponent = \"x.wasm\"\n")
            .unwrap_err();
        assert_eq!(e.key, "plugins[0].name");
        assert_eq!((e.line, e.column), (3, 8));
    }

    #[test]
    fn unknown_capability_is_rejected() {
        let e = parse("version = 1\n[[plugins]]\nname = \"a\"\ncomponent = \"x.wasm\"\ncapabilities = [\"filesystem\"]\n").unwrap_err();
        assert_eq!(e.key, "plugins[0].capabilities[0]");
        assert!(e.message.contains("filesystem"), "{e}");
    }

    /// Mutated configs (bytes changed, cut, repeated, multi-byte characters
    /// put in anywhere) are accepted or refused with an error, never a
    /// panic, and an error always points inside the text.
    #[test]
    fn mutated_configs_never_panic_the_parser() {
        let base = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/cluster/node-1.toml"
        ))
        .unwrap();
        let pieces = [
            "é",
            "日本",
            "\u{1F600}",
            "\"",
            "[",
            "]]",
            "=",
            "\n",
            "#",
            "'''",
            "0x",
            "-1",
            "1e999",
        ];
        let mut rng = Rng(0x5eed_0001);
        for case in 0..2_000 {
            let mut text = base.clone().into_bytes();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(text.len());
                match rng.below(4) {
                    0 => text[at] = rng.next() as u8,
                    1 => {
                        let end = (at + rng.below(40)).min(text.len());
                        text.drain(at..end);
                    }
                    2 => {
                        let piece = pieces[rng.below(pieces.len())].as_bytes();
                        text.splice(at..at, piece.iter().copied());
                    }
                    _ => {
                        let end = (at + rng.below(40)).min(text.len());
                        let copy = text[at..end].to_vec();
                        text.splice(at..at, copy);
                    }
                }
            }
            let Ok(text) = String::from_utf8(text) else {
                continue;
            };
            if let Err(e) = parse(&text) {
                let lines = text.lines().count().max(1);
                assert!(e.line >= 1 && e.line <= lines + 1, "case {case}: {e}");
            }
        }
    }
}
