//! The accepting side: the listener, its limits on connections still in
//! their handshake, and serving an authenticated link from a peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::frame::{Frame, READ_BUFFER, frame_name, read_frame, writer};
use super::{HANDSHAKE_TIMEOUT, Peer, Transport};
use crate::cluster::junk;
use crate::cluster::secure::{self, Cipher};

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

impl Transport {
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
}
