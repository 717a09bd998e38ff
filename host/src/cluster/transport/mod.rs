//! Peer transport: authenticated, sealed, length-delimited frames over TCP.
//!
//! Each node dials every peer once per [`Lane`] and keeps those
//! connections (redialling when one drops); requests and their replies are
//! multiplexed on them by id. Raft's frames travel on the consensus lane,
//! whose connections are served on the consensus threads; plugin frames
//! (kinds from [`PLUGIN_KINDS`] up) on the plugin lane, served on the
//! threads of the plugins they feed, so a forwarded request crosses no
//! thread it does not need and never queues in front of a heartbeat.
//! Frames are a 4-byte big-endian length and a postcard body, at most
//! [`MAX_FRAME`] bytes, carried inside the sealed records of
//! [`super::secure`].
//!
//! Authentication: a Noise handshake keyed by the cluster secret that
//! binds the dialler's id, the listener's id and the direction
//! ([`super::secure`]); every byte after it is sealed. A peer that cannot
//! prove it knows the secret for the ids it claims, or that sends a
//! malformed, oversized or tampered frame, has its connection closed with
//! a counted and sampled log line ([`junk`](super::junk)); nothing else is
//! affected.
//!
//! Layout: `frame` (the frames and how they are written and read),
//! `incoming` (the listener: handshake limits and serving accepted
//! links), `outgoing` (dialling, one connection per lane, requests and
//! one-way messages); tests in `tests`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use self::frame::Frame;
use super::log::BoxFuture;
use super::secure::Keys;
pub use super::secure::Lane;

mod frame;
mod incoming;
mod outgoing;

/// What plugin traffic needs of the peer links: the backend behind
/// `messaging`, `plugins.call` and forwarding, as [`ConsensusBackend`]
/// is behind `consensus`. [`Transport`] is the real one.
///
/// To be correct, an implementation must deliver the one-way messages one
/// caller sends to one peer, awaiting each send before the next, in that
/// order and at most once; and must tell a definite failure (an unknown
/// peer, a body too large, a peer that refused) from an unknown outcome
/// (no reply before the timeout, a connection lost after sending).
///
/// [`ConsensusBackend`]: crate::cluster::log::ConsensusBackend
pub trait PeerLinks: Send + Sync {
    /// Queues a one-way message of `kind` for `to`.
    fn send<'a>(
        &'a self,
        to: &'a str,
        kind: u8,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Sends a request of `kind` to `to` and waits up to `timeout` for its
    /// reply.
    fn request<'a>(
        &'a self,
        to: &'a str,
        kind: u8,
        body: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, TransportError>>;
}

impl PeerLinks for Transport {
    fn send<'a>(
        &'a self,
        to: &'a str,
        kind: u8,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(Transport::send(self, to, kind, body))
    }

    fn request<'a>(
        &'a self,
        to: &'a str,
        kind: u8,
        body: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        Box::pin(Transport::request(self, to, kind, body, timeout))
    }
}

#[cfg(test)]
mod tests;

/// Frame kinds from this one up carry plugin traffic and travel on the
/// plugin lane; those below carry Raft's.
pub const PLUGIN_KINDS: u8 = 20;

/// The lane a frame of `kind` travels on.
pub fn lane_of(kind: u8) -> Lane {
    if kind >= PLUGIN_KINDS {
        Lane::Plugins
    } else {
        Lane::Consensus
    }
}

/// Largest frame accepted, in bytes.
pub const MAX_FRAME: usize = 32 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a transport call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The peer is not in the configured member list.
    #[error("unknown peer `{0}`")]
    UnknownPeer(String),
    /// No connection could be made or it broke before the reply; the
    /// request may or may not have been handled.
    #[error("peer `{0}` unreachable: {1}")]
    Unreachable(String, String),
    /// The connection dropped after the request was sent: it may have been
    /// handled.
    #[error("connection to `{0}` dropped after the request was sent; it may have been handled")]
    Lost(String),
    /// No reply in time; the request may have been handled.
    #[error("request to `{0}` timed out")]
    Timeout(String),
    /// The peer's handler returned an error.
    #[error("peer `{0}` failed the request: {1}")]
    Remote(String, String),
    /// The frame would exceed [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(usize),
}

/// What a node does with frames from its peers.
pub trait Handler: Send + Sync + 'static {
    /// Answers a request of `kind` from peer `from`.
    fn request(
        &self,
        from: String,
        kind: u8,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>>;
    /// Takes a one-way message of `kind` from peer `from`.
    fn oneway(&self, from: String, kind: u8, body: Vec<u8>);
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>, String>>>>>;

struct Peer {
    addr: SocketAddr,
    /// The outgoing connection of each lane, by `Lane as usize`.
    links: [Link; 2],
    /// Set when the peer is removed or moved: its incoming links close.
    gone: std::sync::atomic::AtomicBool,
}

/// A lane's outgoing connection to a peer.
#[derive(Default)]
struct Link {
    /// The current connection; replaced on redial.
    out: Mutex<Option<Conn>>,
    dialing: tokio::sync::Mutex<()>,
}

/// One outgoing connection.
#[derive(Clone)]
struct Conn {
    /// Frames to write on it.
    tx: mpsc::Sender<Frame>,
    /// Requests sent on it and waiting for their replies: failed together
    /// when it closes.
    pending: Pending,
}

impl Peer {
    fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            links: Default::default(),
            gone: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn link(&self, lane: Lane) -> &Link {
        &self.links[lane as usize]
    }

    /// Drops both outgoing connections: their writers end and close them.
    fn hang_up(&self) {
        for link in &self.links {
            link.out.lock().expect("peer poisoned").take();
        }
    }
}

/// The transport of one node.
pub struct Transport {
    node: String,
    keys: Keys,
    /// Known peers; members added at run time join this map.
    peers: RwLock<HashMap<String, Arc<Peer>>>,
    next_id: AtomicU64,
    handler: Mutex<Option<Arc<dyn Handler>>>,
    /// Where the consensus lane's tasks (and the listener) run: the
    /// runtime the transport was made on, whichever task dials or accepts.
    tasks: tokio::runtime::Handle,
    /// Where the plugin lane's tasks run, once set; until then, `tasks`.
    plugin_tasks: std::sync::OnceLock<tokio::runtime::Handle>,
    /// The address peers are accepted on; connections to peers are made
    /// from its IP (when it names one), so a peer sees this node's traffic
    /// come from the address it knows it by, and a firewall rule can name
    /// it.
    local_ip: Mutex<Option<std::net::IpAddr>>,
}

impl Transport {
    /// A transport for `node` that knows `peers` (id → address) and
    /// authenticates with `keys`.
    pub fn new(
        node: &str,
        keys: Keys,
        peers: impl IntoIterator<Item = (String, SocketAddr)>,
    ) -> Arc<Transport> {
        Arc::new(Transport {
            node: node.to_string(),
            keys,
            peers: RwLock::new(
                peers
                    .into_iter()
                    .map(|(id, addr)| (id, Arc::new(Peer::new(addr))))
                    .collect(),
            ),
            next_id: AtomicU64::new(1),
            handler: Mutex::new(None),
            tasks: tokio::runtime::Handle::current(),
            plugin_tasks: std::sync::OnceLock::new(),
            local_ip: Mutex::new(None),
        })
    }

    /// Serves the plugin lane's connections on `runtime`: the runtime the
    /// plugins run on. Connections already open stay where they are.
    pub fn serve_plugins_on(&self, runtime: tokio::runtime::Handle) {
        let _ = self.plugin_tasks.set(runtime);
    }

    /// The runtime a lane's connections are served on.
    fn runtime(&self, lane: Lane) -> &tokio::runtime::Handle {
        match lane {
            Lane::Consensus => &self.tasks,
            Lane::Plugins => self.plugin_tasks.get().unwrap_or(&self.tasks),
        }
    }

    /// Sets what incoming frames are handed to.
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        *self.handler.lock().expect("handler poisoned") = Some(handler);
    }

    fn handler(&self) -> Option<Arc<dyn Handler>> {
        self.handler.lock().expect("handler poisoned").clone()
    }

    /// The ids of the known peers.
    pub fn peers(&self) -> Vec<String> {
        self.peers
            .read()
            .expect("peers poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Adds a peer, or moves a known one to a new address (dropping its
    /// connection). Peers are accepted and dialled only once known.
    pub fn add_peer(&self, id: &str, addr: SocketAddr) {
        if id == self.node {
            return;
        }
        let mut peers = self.peers.write().expect("peers poisoned");
        if peers.get(id).is_some_and(|p| p.addr == addr) {
            return;
        }
        tracing::info!(peer = id, %addr, "peer added");
        if let Some(old) = peers.insert(id.to_string(), Arc::new(Peer::new(addr))) {
            // Dropping the sender ends the old connection's writer, which
            // closes it; its incoming links close at their next frame.
            old.gone.store(true, Ordering::Relaxed);
            old.hang_up();
        }
    }

    /// Forgets a peer: its connection is dropped and it is neither dialled
    /// nor accepted any more.
    pub fn remove_peer(&self, id: &str) {
        if let Some(old) = self.peers.write().expect("peers poisoned").remove(id) {
            tracing::info!(peer = id, "peer removed");
            old.gone.store(true, Ordering::Relaxed);
            old.hang_up();
        }
    }

    /// The address a peer is dialled at.
    pub fn peer_addr(&self, id: &str) -> Option<SocketAddr> {
        self.peer(id).map(|p| p.addr)
    }

    fn peer(&self, id: &str) -> Option<Arc<Peer>> {
        self.peers.read().expect("peers poisoned").get(id).cloned()
    }
}
