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
//! a counted and sampled log line ([`junk`]); nothing else is affected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::junk;
use super::log::BoxFuture;
pub use super::secure::Lane;
use super::secure::{self, Cipher, Keys, Opener, Sealer};

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
/// Incoming connections allowed in their handshake at once.
const MAX_HANDSHAKES: usize = 64;
/// Of those, from one source address.
const MAX_HANDSHAKES_PER_SOURCE: usize = 8;

/// A handshake's place in the per-source count; given back when dropped.
struct SourceSlot(
    Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    std::net::IpAddr,
);

impl Drop for SourceSlot {
    fn drop(&mut self) {
        release(&self.0, self.1);
    }
}

fn release(counts: &Mutex<HashMap<std::net::IpAddr, usize>>, ip: std::net::IpAddr) {
    let mut counts = counts.lock().expect("sources poisoned");
    if let Some(n) = counts.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&ip);
        }
    }
}
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

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

#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    Request {
        id: u64,
        kind: u8,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    Reply {
        id: u64,
        #[serde(with = "reply_bytes")]
        result: Result<Vec<u8>, String>,
    },
    Oneway {
        kind: u8,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
}

/// A reply's body as bytes, not as a sequence of numbers (the same postcard
/// encoding, decoded in one copy instead of byte by byte).
mod reply_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(r: &Result<Vec<u8>, String>, s: S) -> Result<S::Ok, S::Error> {
        r.as_ref().map(|b| Bytes::new(b)).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Result<Vec<u8>, String>, D::Error> {
        Ok(Result::<ByteBuf, String>::deserialize(d)?.map(ByteBuf::into_vec))
    }
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

/// Appends `frame`, length-prefixed, to `buf`.
fn encode_frame(frame: &Frame, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    *buf = postcard::to_extend(frame, std::mem::take(buf)).map_err(std::io::Error::other)?;
    let len = buf.len() - start - 4;
    if len > MAX_FRAME {
        buf.truncate(start);
        return Err(std::io::Error::other(TransportError::TooLarge(len)));
    }
    let len = u32::try_from(len).map_err(std::io::Error::other)?;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Reads the next frame from a link.
async fn read_frame<R: AsyncRead + Unpin>(link: &mut Opener<R>) -> std::io::Result<Frame> {
    let len = link.take(4).await?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME} byte limit"),
        ));
    }
    let body = link.take(len).await?;
    postcard::from_bytes(body).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed frame: {e}"),
        )
    })
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

    /// Accepts peer connections on `addr` until the task is dropped.
    pub async fn listen(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding peer listener on {addr}: {e}"))?;
        if !addr.ip().is_unspecified() {
            *self.local_ip.lock().expect("local ip poisoned") = Some(addr.ip());
        }
        let this = self.clone();
        Ok(self.tasks.spawn(async move {
            // Connections still in their handshake: bounded, so a flood of
            // half-open connections cannot take the descriptors that real
            // peers need.
            let handshaking = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
            // And at most a few from one address, so one source cannot
            // hold them all.
            let by_source: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
            loop {
                let (stream, remote) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        junk::PEER.note(format_args!("peer accept failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let ip = remote.ip();
                {
                    let mut counts = by_source.lock().expect("sources poisoned");
                    let n = counts.entry(ip).or_default();
                    if *n >= MAX_HANDSHAKES_PER_SOURCE {
                        drop(counts);
                        junk::PEER.note(format_args!(
                            "refusing a peer connection from {remote}: {MAX_HANDSHAKES_PER_SOURCE} handshakes from {ip} already under way"
                        ));
                        continue;
                    }
                    *n += 1;
                }
                let Ok(permit) = handshaking.clone().try_acquire_owned() else {
                    release(&by_source, ip);
                    junk::PEER.note(format_args!(
                        "refusing a peer connection from {remote}: {MAX_HANDSHAKES} handshakes already under way"
                    ));
                    continue;
                };
                let conn = this.clone();
                let by_source = by_source.clone();
                this.tasks.spawn(async move {
                    let source = SourceSlot(by_source, ip);
                    match conn.serve_incoming(stream, permit, source).await {
                        // A peer that closed its link (restarting, say).
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(%remote, "peer connection closed: {e}");
                        }
                        Err(e) => {
                            junk::PEER.note(format_args!("peer connection from {remote} closed: {e}"))
                        }
                        Ok(()) => {}
                    }
                });
            }
        }))
    }

    async fn serve_incoming(
        self: Arc<Self>,
        mut stream: TcpStream,
        permit: tokio::sync::OwnedSemaphorePermit,
        source: SourceSlot,
    ) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let (hello, known, cipher) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let hello = secure::hello(&mut stream, &self.node).await?;
            let Some(known) = self.peer(&hello.from) else {
                return Err(secure::HandshakeError::Malformed(format!(
                    "`{}` is not a member this node knows",
                    hello.from
                )));
            };
            let cipher = secure::accept(&mut stream, &self.keys, &hello, &self.node).await?;
            Ok((hello, known, cipher))
        })
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
        .map_err(std::io::Error::other)?;
        let runtime = self.runtime(hello.lane);
        if runtime.id() == tokio::runtime::Handle::current().id() {
            return self
                .serve_link(stream, cipher, hello.from, known, (permit, source))
                .await;
        }
        // Moved to the lane's runtime: its reactor then wakes the link's
        // tasks on the threads that serve them. The handshake read exactly
        // its own bytes, so nothing is left behind in a buffer.
        let stream = stream.into_std()?;
        let this = self.clone();
        runtime
            .spawn(async move {
                let stream = TcpStream::from_std(stream)?;
                this.serve_link(stream, cipher, hello.from, known, (permit, source))
                    .await
            })
            .await
            .map_err(std::io::Error::other)?
    }

    /// Serves an accepted, authenticated connection from `peer` until it
    /// closes.
    async fn serve_link(
        self: Arc<Self>,
        stream: TcpStream,
        cipher: Cipher,
        peer: String,
        known: Arc<Peer>,
        (permit, source): (tokio::sync::OwnedSemaphorePermit, SourceSlot),
    ) -> std::io::Result<()> {
        let (rd, wr) = stream.into_split();
        let mut rd = cipher.opener(tokio::io::BufReader::with_capacity(READ_BUFFER, rd));
        // A dialler sends its first frame right after the handshake. A
        // replayed first handshake message completes a handshake too, but
        // its sender has no keys to seal a frame with: the link counts as
        // a handshake until a sealed frame arrives, and is closed if none
        // does in time.
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd))
            .await
            .map_err(|_| std::io::Error::other("no sealed frame after the handshake"))??;
        drop(permit);
        drop(source);
        let (tx, rx) = mpsc::channel::<Frame>(1024);
        tokio::spawn(writer(wr, cipher.sealer(), rx));
        let mut next = Some(first);
        loop {
            let frame = match next.take() {
                Some(f) => f,
                None => read_frame(&mut rd).await?,
            };
            if known.gone.load(Ordering::Relaxed) {
                return Err(std::io::Error::other(format!(
                    "`{peer}` is no longer a member this node knows"
                )));
            }
            match frame {
                Frame::Request { id, kind, body } => {
                    let Some(handler) = self.handler() else {
                        continue;
                    };
                    let tx = tx.clone();
                    let from = peer.clone();
                    tokio::spawn(async move {
                        let result = handler.request(from, kind, body).await;
                        let _ = tx.send(Frame::Reply { id, result }).await;
                    });
                }
                Frame::Oneway { kind, body } => {
                    if let Some(handler) = self.handler() {
                        handler.oneway(peer.clone(), kind, body);
                    }
                }
                other => {
                    return Err(std::io::Error::other(format!(
                        "unexpected frame from `{peer}`: {}",
                        frame_name(&other)
                    )));
                }
            }
        }
    }

    /// Dials `peer` (named `id`) and runs the handshake, with the first
    /// secret and then, if that one is refused, with each other one (a
    /// peer that has not rotated yet).
    async fn dial(
        &self,
        id: &str,
        peer: &Peer,
        lane: Lane,
    ) -> Result<(TcpStream, Cipher), TransportError> {
        let unreachable = |e: String| TransportError::Unreachable(id.to_string(), e);
        let mut last = String::from("no cluster secret configured");
        for key in 0..self.keys.len() {
            // Dialled on the lane's runtime, whoever asks: a socket
            // belongs to the runtime it was made on, and the lane's traffic
            // reuses it.
            let from = *self.local_ip.lock().expect("local ip poisoned");
            let mut stream = self
                .runtime(lane)
                .spawn(tokio::time::timeout(
                    DIAL_TIMEOUT,
                    connect_from(from, peer.addr),
                ))
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .map_err(|_| unreachable("connect timed out".into()))?
                .map_err(|e| unreachable(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                secure::dial(&mut stream, &self.keys, key, (&self.node, id), lane),
            )
            .await
            {
                Ok(Ok(cipher)) => {
                    if key > 0 {
                        tracing::warn!(
                            peer = id,
                            "the peer accepted only an earlier secret (previous_secrets[{}]); finish the rotation and drop the earlier secrets",
                            key - 1
                        );
                    }
                    return Ok((stream, cipher));
                }
                Ok(Err(e @ secure::HandshakeError::Refused(_))) => last = e.to_string(),
                Ok(Err(e)) => return Err(unreachable(e.to_string())),
                Err(_) => return Err(unreachable("handshake timed out".into())),
            }
        }
        Err(unreachable(last))
    }

    /// The current connection of `lane` to `peer` (named `id`), dialled if
    /// needed, with the map its requests wait for their replies in.
    async fn connection(
        &self,
        id: &str,
        peer: &Arc<Peer>,
        lane: Lane,
    ) -> Result<Conn, TransportError> {
        let link = peer.link(lane);
        let current = || {
            link.out
                .lock()
                .expect("peer poisoned")
                .as_ref()
                .filter(|c| !c.tx.is_closed())
                .cloned()
        };
        if let Some(conn) = current() {
            return Ok(conn);
        }
        let _guard = link.dialing.lock().await;
        if let Some(conn) = current() {
            return Ok(conn);
        }
        let (stream, cipher) = self.dial(id, peer, lane).await?;
        let runtime = self.runtime(lane);
        let (rd, wr) = stream.into_split();
        let mut rd = cipher.opener(tokio::io::BufReader::with_capacity(READ_BUFFER, rd));
        let (tx, rx) = mpsc::channel::<Frame>(1024);
        runtime.spawn(writer(wr, cipher.sealer(), rx));
        let conn = Conn {
            tx,
            pending: Pending::default(),
        };
        let this_peer = peer.clone();
        let peer_id = id.to_string();
        let mine = conn.clone();
        runtime.spawn(async move {
            let reason = loop {
                match read_frame(&mut rd).await {
                    Ok(Frame::Reply { id, result }) => {
                        let waiter = mine.pending.lock().expect("pending poisoned").remove(&id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(result);
                        }
                    }
                    Ok(other) => break format!("unexpected frame {}", frame_name(&other)),
                    Err(e) => break e.to_string(),
                }
            };
            tracing::debug!(peer = %peer_id, ?lane, "connection closed: {reason}");
            // Redial on next use (unless that happened already), and fail
            // every request still waiting on this connection.
            let mut out = this_peer.link(lane).out.lock().expect("peer poisoned");
            if out.as_ref().is_some_and(|c| c.tx.same_channel(&mine.tx)) {
                out.take();
            }
            drop(out);
            mine.pending.lock().expect("pending poisoned").clear();
        });
        *link.out.lock().expect("peer poisoned") = Some(conn.clone());
        Ok(conn)
    }

    /// Sends a request and waits up to `timeout` for the reply. It travels
    /// on the lane of its `kind` ([`lane_of`]).
    pub async fn request(
        &self,
        to: &str,
        kind: u8,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        if body.len() > MAX_FRAME - 64 {
            return Err(TransportError::TooLarge(body.len()));
        }
        let peer = self
            .peer(to)
            .ok_or_else(|| TransportError::UnknownPeer(to.to_string()))?;
        let Conn { tx, pending } =
            tokio::time::timeout(timeout, self.connection(to, &peer, lane_of(kind)))
                .await
                .map_err(|_| TransportError::Timeout(to.to_string()))??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        pending.lock().expect("pending poisoned").insert(id, reply);
        if tx.send(Frame::Request { id, kind, body }).await.is_err() {
            pending.lock().expect("pending poisoned").remove(&id);
            return Err(TransportError::Unreachable(
                to.to_string(),
                "connection closed".into(),
            ));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(bytes))) => Ok(bytes),
            Ok(Ok(Err(e))) => Err(TransportError::Remote(to.to_string(), e)),
            Ok(Err(_)) => Err(TransportError::Lost(to.to_string())),
            Err(_) => {
                pending.lock().expect("pending poisoned").remove(&id);
                Err(TransportError::Timeout(to.to_string()))
            }
        }
    }

    /// Queues a one-way message on the lane of its `kind`. At most once:
    /// dropped if the peer cannot be reached.
    pub async fn send(&self, to: &str, kind: u8, body: Vec<u8>) -> Result<(), TransportError> {
        if body.len() > MAX_FRAME - 64 {
            return Err(TransportError::TooLarge(body.len()));
        }
        let peer = self
            .peer(to)
            .ok_or_else(|| TransportError::UnknownPeer(to.to_string()))?;
        let conn = self.connection(to, &peer, lane_of(kind)).await?;
        conn.tx
            .send(Frame::Oneway { kind, body })
            .await
            .map_err(|_| TransportError::Unreachable(to.to_string(), "connection closed".into()))
    }
}

/// Connects to `to`, from the IP `from` when given (and of the same
/// family).
async fn connect_from(
    from: Option<std::net::IpAddr>,
    to: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = match to {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(ip) = from.filter(|ip| ip.is_ipv4() == to.is_ipv4())
        && socket.bind(SocketAddr::new(ip, 0)).is_ok()
    {
        match socket.connect(to).await {
            Ok(stream) => return Ok(stream),
            // The routes do not let this address reach the peer (policy
            // routing, say): connect from whatever address they choose.
            Err(e) if e.kind() != std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
        return TcpStream::connect(to).await;
    }
    socket.connect(to).await
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Request { .. } => "request",
        Frame::Reply { .. } => "reply",
        Frame::Oneway { .. } => "oneway",
    }
}

/// Bytes read from a connection at a time.
const READ_BUFFER: usize = 64 * 1024;
/// Most bytes of queued frames gathered into one write.
const WRITE_BATCH: usize = 256 * 1024;

/// Writes the frames queued for a connection, gathering those already
/// waiting into one sealed write.
async fn writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut sealer: Sealer,
    mut rx: mpsc::Receiver<Frame>,
) {
    let mut buf = Vec::new();
    while let Some(frame) = rx.recv().await {
        buf.clear();
        let mut next = Some(frame);
        while let Some(frame) = next {
            if let Err(e) = encode_frame(&frame, &mut buf) {
                tracing::warn!("peer frame not sent: {e}");
                return;
            }
            next = if buf.len() < WRITE_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = sealer.write_all(&mut wr, &buf).await {
            tracing::debug!("peer write failed: {e}");
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Echo;

    impl Handler for Echo {
        fn request(
            &self,
            from: String,
            kind: u8,
            body: Vec<u8>,
        ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
            Box::pin(async move {
                if kind == 9 {
                    return Err("refused".into());
                }
                let mut out = from.into_bytes();
                out.push(kind);
                out.extend(body);
                Ok(out)
            })
        }
        fn oneway(&self, _: String, _: u8, _: Vec<u8>) {}
    }

    async fn pair(secret_b: &[u8]) -> (Arc<Transport>, Arc<Transport>) {
        let la = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let lb = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let a = Transport::new(
            "a",
            Keys::new(&[b"0123456789abcdef"]),
            [("b".to_string(), lb)],
        );
        let b = Transport::new("b", Keys::new(&[secret_b]), [("a".to_string(), la)]);
        a.set_handler(Arc::new(Echo));
        b.set_handler(Arc::new(Echo));
        a.listen(la).await.unwrap();
        b.listen(lb).await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn requests_are_answered_over_an_authenticated_connection() {
        let (a, _b) = pair(b"0123456789abcdef").await;
        let reply = a
            .request("b", 3, b"xy".to_vec(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(reply, b"a\x03xy");
        let err = a
            .request("b", 9, Vec::new(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::Remote(_, ref m) if m == "refused"),
            "{err}"
        );
        assert!(matches!(
            a.request("zz", 1, Vec::new(), Duration::from_secs(1)).await,
            Err(TransportError::UnknownPeer(_))
        ));
    }

    /// Answers with the name of the thread that handled the request.
    struct Where;

    impl Handler for Where {
        fn request(
            &self,
            _: String,
            _: u8,
            _: Vec<u8>,
        ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
            let name = std::thread::current().name().unwrap_or("").to_string();
            Box::pin(async move { Ok(name.into_bytes()) })
        }
        fn oneway(&self, _: String, _: u8, _: Vec<u8>) {}
    }

    #[tokio::test]
    async fn plugin_frames_are_served_on_the_plugin_threads_over_a_link_of_their_own() {
        let plugins = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lane-plugins")
            .enable_all()
            .build()
            .unwrap();
        let (a, b) = pair(b"0123456789abcdef").await;
        b.set_handler(Arc::new(Where));
        a.serve_plugins_on(plugins.handle().clone());
        b.serve_plugins_on(plugins.handle().clone());
        let on = |kind| {
            let a = a.clone();
            async move {
                let name = a
                    .request("b", kind, Vec::new(), Duration::from_secs(5))
                    .await
                    .unwrap();
                String::from_utf8(name).unwrap()
            }
        };
        assert_eq!(on(PLUGIN_KINDS + 2).await, "lane-plugins");
        assert_ne!(on(1).await, "lane-plugins");
        assert_eq!(on(PLUGIN_KINDS + 3).await, "lane-plugins");
        // One connection per lane, each with its own waiting requests.
        let peer = a.peer("b").unwrap();
        for lane in [Lane::Consensus, Lane::Plugins] {
            assert!(peer.link(lane).out.lock().unwrap().is_some(), "{lane:?}");
        }
        // A dropped plugin link fails nothing on the consensus link.
        peer.link(Lane::Plugins).out.lock().unwrap().take();
        assert_ne!(on(1).await, "lane-plugins");
        assert_eq!(on(PLUGIN_KINDS).await, "lane-plugins");
        drop(a);
        drop(b);
        plugins.shutdown_background();
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused() {
        let (a, _b) = pair(b"another-secret-entirely").await;
        let err = a
            .request("b", 1, Vec::new(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Unreachable(..)), "{err}");
        assert!(err.to_string().contains("authentication"), "{err}");
    }

    #[tokio::test]
    async fn malformed_and_oversized_frames_close_only_that_connection() {
        let (a, _b) = pair(b"0123456789abcdef").await;
        let addr = a.peer("b").unwrap().addr;
        // Garbage instead of a hello.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).await.unwrap(), 0, "connection closed");
        // A length beyond the limit.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 0, "connection closed");
        // The node still serves its real peer.
        assert!(
            a.request("b", 1, Vec::new(), Duration::from_secs(5))
                .await
                .is_ok()
        );
    }

    /// A process that took the address of an absent member (`c`) relays a
    /// real member's handshake to another, claiming to be `c`: refused,
    /// and nothing it sends reaches the handler.
    #[tokio::test]
    async fn a_relayed_handshake_is_refused() {
        let (lb, lc) = {
            let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = TcpListener::bind("127.0.0.1:0").await.unwrap();
            (b, c)
        };
        let (b_addr, c_addr) = (lb.local_addr().unwrap(), lc.local_addr().unwrap());
        drop(lb);
        let keys = Keys::new(&[b"0123456789abcdef"]);
        let a = Transport::new("a", keys.clone(), [("c".to_string(), c_addr)]);
        let b = Transport::new("b", keys, [("c".to_string(), c_addr)]);
        let seen = Arc::new(AtomicU64::new(0));
        struct Count(Arc<AtomicU64>);
        impl Handler for Count {
            fn request(
                &self,
                _: String,
                _: u8,
                _: Vec<u8>,
            ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(Vec::new()) })
            }
            fn oneway(&self, _: String, _: u8, _: Vec<u8>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        b.set_handler(Arc::new(Count(seen.clone())));
        b.listen(b_addr).await.unwrap();
        let relay = tokio::spawn(async move {
            let (mut from_a, _) = lc.accept().await.unwrap();
            // a's hello (a → c), then its first handshake message.
            let mut len = [0u8; 4];
            from_a.read_exact(&mut len).await.unwrap();
            let mut hello = vec![0u8; u32::from_be_bytes(len) as usize];
            from_a.read_exact(&mut hello).await.unwrap();
            let mut mlen = [0u8; 2];
            from_a.read_exact(&mut mlen).await.unwrap();
            let mut first = vec![0u8; usize::from(u16::from_be_bytes(mlen))];
            from_a.read_exact(&mut first).await.unwrap();
            // To b, as c.
            let mut to_b = TcpStream::connect(b_addr).await.unwrap();
            let forged = postcard::to_allocvec(&secure::Hello {
                protocol: secure::PEER_PROTOCOL,
                from: "c".into(),
                to: "b".into(),
                lane: Lane::Consensus,
            })
            .unwrap();
            let mut out = (forged.len() as u32).to_be_bytes().to_vec();
            out.extend(forged);
            out.extend(mlen);
            out.extend(first);
            to_b.write_all(&out).await.unwrap();
            // b closes without answering.
            let mut buf = [0u8; 64];
            to_b.read(&mut buf).await.unwrap_or(0)
        });
        let err = a
            .request("c", 1, b"forged".to_vec(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Unreachable(..)), "{err}");
        assert_eq!(relay.await.unwrap(), 0, "b answered the relayed handshake");
        assert_eq!(seen.load(Ordering::SeqCst), 0);
    }

    /// Mid-rotation: `a` seals with the new secret and still accepts the
    /// old one; `b` has only the old one. Both directions work.
    #[tokio::test]
    async fn a_node_mid_rotation_talks_to_one_that_has_not_rotated() {
        let (la, lb) = {
            let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
            (la.local_addr().unwrap(), lb.local_addr().unwrap())
        };
        let a = Transport::new(
            "a",
            Keys::new(&["the-new-cluster-secret", "the-old-cluster-secret"]),
            [("b".to_string(), lb)],
        );
        let b = Transport::new(
            "b",
            Keys::new(&["the-old-cluster-secret"]),
            [("a".to_string(), la)],
        );
        a.set_handler(Arc::new(Echo));
        b.set_handler(Arc::new(Echo));
        a.listen(la).await.unwrap();
        b.listen(lb).await.unwrap();
        let ab = a
            .request("b", 1, b"x".to_vec(), Duration::from_secs(5))
            .await;
        assert_eq!(ab.unwrap(), b"a\x01x");
        let ba = b
            .request("a", 2, b"y".to_vec(), Duration::from_secs(5))
            .await;
        assert_eq!(ba.unwrap(), b"b\x02y");
    }
}
