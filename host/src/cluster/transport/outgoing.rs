//! The dialling side: one connection to each peer per lane, dialled on
//! first use and again after it drops, and the requests and one-way
//! messages sent on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::frame::{Frame, READ_BUFFER, frame_name, read_frame, writer};
use super::{
    Conn, HANDSHAKE_TIMEOUT, MAX_FRAME, Peer, Pending, Transport, TransportError, lane_of,
};
use crate::cluster::secure::{self, Cipher, Lane};

const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

impl Transport {
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
