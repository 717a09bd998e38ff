//! The node-wide tables: `[node]`, `[cluster]` and `[admin]`, with their
//! defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

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
