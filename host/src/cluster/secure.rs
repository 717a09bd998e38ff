//! Peer link security: a Noise handshake keyed by the cluster secret, then
//! sealed records.
//!
//! The handshake is `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`: fresh
//! ephemeral keys on both sides (forward secrecy), and a pre-shared key
//! derived from the cluster secret mixed in before the first message, so
//! only a holder of the secret can complete it. The Noise prologue names
//! the dialler, the listener, the direction and the lane; the listener
//! builds its prologue from its own id and the id and lane the dialler
//! claims, so a handshake meant for another pair of nodes (a relayed one)
//! or another lane fails its first message's tag. After the handshake every byte travels in records
//! sealed with ChaCha20-Poly1305 under per-direction keys and counters: a
//! changed, dropped, replayed or injected record fails to open and closes
//! the connection.
//!
//! Wire format: the dialler sends a [`Hello`] (a 4-byte big-endian length
//! and a postcard body, in clear, since the listener needs the claimed id
//! and the [`Lane`] to build its prologue); then each handshake message
//! and each record is a 2-byte big-endian length and the Noise message.
//!
//! Rotation: a node seals new connections with its first secret and
//! accepts any of its secrets; a dialler whose first secret is refused
//! tries the next. See the README's security section for the steps.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The Noise protocol of peer links.
pub const PROTOCOL: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// The peer protocol this node speaks; a different one is refused by name.
pub const PEER_PROTOCOL: u32 = 3;
/// Largest Noise message.
const MAX_MESSAGE: usize = 65535;
/// Bytes the AEAD tag adds to a record.
const TAG_LEN: usize = 16;
/// Most plaintext bytes in one record.
pub const MAX_PLAIN: usize = MAX_MESSAGE - TAG_LEN;
/// Largest hello accepted.
const MAX_HELLO: usize = 512;

/// The cluster's link keys, derived from its secrets: the first seals new
/// connections, every one is accepted.
#[derive(Clone)]
pub struct Keys {
    psks: Arc<[[u8; 32]]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} secrets)", self.psks.len())
    }
}

impl Keys {
    /// Keys from `secrets`, the one to seal with first. An empty list gives
    /// keys that no peer can match.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Keys {
        let psks = secrets
            .iter()
            .map(|s| {
                let mut h = Sha256::new();
                h.update(b"plexus peer link key v2\0");
                h.update(s.as_ref());
                h.finalize().into()
            })
            .collect::<Vec<[u8; 32]>>();
        Keys { psks: psks.into() }
    }

    /// How many secrets there are to try.
    pub fn len(&self) -> usize {
        self.psks.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.psks.is_empty()
    }
}

/// What a dialler says in clear before the handshake.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// [`PEER_PROTOCOL`] of the dialler.
    pub protocol: u32,
    /// The id the dialler claims; the handshake proves it.
    pub from: String,
    /// The id the dialler means to reach.
    pub to: String,
    /// What the link carries.
    pub lane: Lane,
}

/// What a link carries. Two nodes keep one link per lane in each
/// direction, so plugin traffic (a forwarded request of megabytes, say)
/// never queues in front of a heartbeat, and each lane is served on the
/// threads of the work it feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lane {
    /// Raft: appends, votes, snapshots, proposals.
    Consensus,
    /// Plugins: messages, requests, forwarded requests and calls.
    Plugins,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a handshake message.
    #[error("malformed handshake: {0}")]
    Malformed(String),
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks peer protocol {0}; this node speaks {PEER_PROTOCOL}: run the same plexus version on every node"
    )]
    Protocol(u32),
    /// The dialler meant to reach another node.
    #[error("handshake addressed to `{to}`, but this node is `{me}`")]
    WrongNode {
        /// Whom it was for.
        to: String,
        /// Who got it.
        me: String,
    },
    /// No secret opened the first message: a wrong cluster secret, or a
    /// handshake made for another pair of nodes (relayed).
    #[error(
        "`{0}` failed authentication: wrong cluster secret, or a handshake made for another pair of nodes"
    )]
    Refused(String),
}

fn prologue(dialler: &str, listener: &str, lane: Lane) -> Vec<u8> {
    let mut p = b"plexus peer link v3\0dialler\0".to_vec();
    p.extend_from_slice(&(dialler.len() as u32).to_be_bytes());
    p.extend_from_slice(dialler.as_bytes());
    p.extend_from_slice(b"\0listener\0");
    p.extend_from_slice(&(listener.len() as u32).to_be_bytes());
    p.extend_from_slice(listener.as_bytes());
    p.extend_from_slice(b"\0lane\0");
    p.push(lane as u8);
    p
}

fn builder<'a>(psk: &'a [u8; 32], prologue: &'a [u8]) -> Result<snow::Builder<'a>, snow::Error> {
    let params: snow::params::NoiseParams = PROTOCOL.parse()?;
    snow::Builder::new(params).psk(0, psk)?.prologue(prologue)
}

fn noise(e: snow::Error) -> HandshakeError {
    HandshakeError::Malformed(e.to_string())
}

async fn write_message(w: &mut (impl AsyncWrite + Unpin), msg: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    w.write_all(&out).await
}

async fn read_message(r: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    r.read_exact(buf).await?;
    Ok(())
}

/// The dialler's side: says hello as `me` to `peer` for a link of `lane`,
/// runs the handshake with key number `key` of `keys`, and returns the
/// link's cipher.
pub async fn dial(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    keys: &Keys,
    key: usize,
    (me, peer): (&str, &str),
    lane: Lane,
) -> Result<Cipher, HandshakeError> {
    let psk = keys
        .psks
        .get(key)
        .ok_or_else(|| HandshakeError::Refused(peer.to_string()))?;
    let hello = postcard::to_allocvec(&Hello {
        protocol: PEER_PROTOCOL,
        from: me.to_string(),
        to: peer.to_string(),
        lane,
    })
    .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    let mut out = (hello.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&hello);
    let prologue = prologue(me, peer, lane);
    let mut hs = builder(psk, &prologue)
        .and_then(|b| b.build_initiator())
        .map_err(noise)?;
    let mut msg = vec![0u8; MAX_MESSAGE];
    let n = hs.write_message(&[], &mut msg).map_err(noise)?;
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&msg[..n]);
    stream.write_all(&out).await?;
    let mut reply = Vec::new();
    read_message(stream, &mut reply).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HandshakeError::Refused(peer.to_string())
        } else {
            e.into()
        }
    })?;
    hs.read_message(&reply, &mut msg)
        .map_err(|_| HandshakeError::Refused(peer.to_string()))?;
    Ok(Cipher {
        state: Arc::new(hs.into_stateless_transport_mode().map_err(noise)?),
    })
}

/// Reads a dialler's hello: who it claims to be. `known` says whether an id
/// may connect at all; checked before any key work.
pub async fn hello(
    stream: &mut (impl AsyncRead + Unpin),
    me: &str,
) -> Result<Hello, HandshakeError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HELLO {
        return Err(HandshakeError::Malformed(format!(
            "hello of {len} bytes (at most {MAX_HELLO})"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    // The version first: another version's hello may not decode as ours.
    let (protocol, _) = postcard::take_from_bytes::<u32>(&body)
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    if protocol != PEER_PROTOCOL {
        return Err(HandshakeError::Protocol(protocol));
    }
    let hello: Hello =
        postcard::from_bytes(&body).map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    // Names only, before they reach a log line.
    for name in [&hello.from, &hello.to] {
        if crate::config::check_name(name).is_err() {
            return Err(HandshakeError::Malformed(
                "hello names a node id that is not [a-z0-9-], 1..=64 bytes".into(),
            ));
        }
    }
    if hello.to != me {
        return Err(HandshakeError::WrongNode {
            to: hello.to,
            me: me.to_string(),
        });
    }
    Ok(hello)
}

/// The listener's side, after [`hello`]: proves and checks knowledge of a
/// cluster key bound to `hello.from` → `me` on `hello.lane`, and returns
/// the link's cipher.
pub async fn accept(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    keys: &Keys,
    hello: &Hello,
    me: &str,
) -> Result<Cipher, HandshakeError> {
    let mut first = Vec::new();
    read_message(stream, &mut first).await?;
    let from = hello.from.as_str();
    let prologue = prologue(from, me, hello.lane);
    let mut payload = vec![0u8; MAX_MESSAGE];
    for psk in keys.psks.iter() {
        let mut hs = builder(psk, &prologue)
            .and_then(|b| b.build_responder())
            .map_err(noise)?;
        if hs.read_message(&first, &mut payload).is_err() {
            continue;
        }
        let n = hs.write_message(&[], &mut payload).map_err(noise)?;
        write_message(stream, &payload[..n]).await?;
        return Ok(Cipher {
            state: Arc::new(hs.into_stateless_transport_mode().map_err(noise)?),
        });
    }
    Err(HandshakeError::Refused(from.to_string()))
}

/// A link's keys after the handshake, shared by its reading and writing
/// halves.
#[derive(Clone)]
pub struct Cipher {
    state: Arc<StatelessTransportState>,
}

impl Cipher {
    /// The writing half: seals plaintext into records.
    pub fn sealer(&self) -> Sealer {
        Sealer {
            state: self.state.clone(),
            nonce: 0,
            out: Vec::new(),
        }
    }

    /// The reading half over `inner`.
    pub fn opener<R>(&self, inner: R) -> Opener<R> {
        Opener {
            inner,
            state: self.state.clone(),
            nonce: 0,
            record: vec![0u8; MAX_MESSAGE],
            plain: Vec::new(),
            pos: 0,
        }
    }
}

/// Seals outgoing bytes.
pub struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    out: Vec<u8>,
}

impl Sealer {
    /// Seals `plain` into records and writes them to `w` in one call.
    pub async fn write_all(
        &mut self,
        w: &mut (impl AsyncWrite + Unpin),
        plain: &[u8],
    ) -> std::io::Result<()> {
        self.out.clear();
        for chunk in plain.chunks(MAX_PLAIN) {
            let at = self.out.len();
            self.out.resize(at + 2 + chunk.len() + TAG_LEN, 0);
            let n = self
                .state
                .write_message(self.nonce, chunk, &mut self.out[at + 2..])
                .map_err(std::io::Error::other)?;
            self.nonce += 1;
            self.out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            self.out.truncate(at + 2 + n);
        }
        w.write_all(&self.out).await
    }
}

/// Opens incoming records and hands out their plaintext.
pub struct Opener<R> {
    inner: R,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    record: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
}

impl<R: AsyncRead + Unpin> Opener<R> {
    /// Opens one more record into the plaintext buffer.
    async fn fill(&mut self) -> std::io::Result<()> {
        let mut len = [0u8; 2];
        self.inner.read_exact(&mut len).await?;
        let len = usize::from(u16::from_be_bytes(len));
        if len < TAG_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "sealed record shorter than its tag",
            ));
        }
        self.inner.read_exact(&mut self.record[..len]).await?;
        if self.pos > 0 && self.pos == self.plain.len() {
            self.plain.clear();
            self.pos = 0;
        } else if self.pos > MAX_MESSAGE {
            self.plain.drain(..self.pos);
            self.pos = 0;
        }
        let at = self.plain.len();
        self.plain.resize(at + len - TAG_LEN, 0);
        let opened =
            self.state
                .read_message(self.nonce, &self.record[..len], &mut self.plain[at..]);
        match opened {
            Ok(n) => {
                self.nonce += 1;
                self.plain.truncate(at + n);
                Ok(())
            }
            Err(_) => {
                self.plain.truncate(at);
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a sealed record failed its integrity check (changed, replayed or injected)",
                ))
            }
        }
    }

    /// The next `n` plaintext bytes, borrowed until the next call.
    pub async fn take(&mut self, n: usize) -> std::io::Result<&[u8]> {
        while self.plain.len() - self.pos < n {
            self.fill().await?;
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.plain[start..start + n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::Rng;

    #[tokio::test]
    async fn a_handshake_binds_both_ids_and_records_round_trip() {
        let keys = Keys::new(&["cluster-secret-0001"]);
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let k = keys.clone();
        let listener = tokio::spawn(async move {
            let h = hello(&mut b, "b").await.unwrap();
            assert_eq!(h.from, "a");
            let c = accept(&mut b, &k, &h, "b").await.unwrap();
            let mut o = c.opener(b);
            let got = o.take(200_000).await.unwrap().to_vec();
            assert!(got.iter().enumerate().all(|(i, x)| *x == (i % 251) as u8));
        });
        let c = dial(&mut a, &keys, 0, ("a", "b"), Lane::Consensus)
            .await
            .unwrap();
        let big: Vec<u8> = (0..200_000).map(|i| (i % 251) as u8).collect();
        c.sealer().write_all(&mut a, &big).await.unwrap();
        listener.await.unwrap();
    }

    #[tokio::test]
    async fn a_handshake_claiming_another_pair_is_refused() {
        let keys = Keys::new(&["cluster-secret-0001"]);
        // A dialler's first message made for b (as a) is presented to b as
        // if it came from c: the prologues differ, so no key opens it.
        let (mut a, mut relay) = tokio::io::duplex(1 << 16);
        let k = keys.clone();
        let dialler =
            tokio::spawn(async move { dial(&mut a, &k, 0, ("a", "b"), Lane::Consensus).await });
        let h = hello(&mut relay, "b").await.unwrap();
        assert_eq!(h.from, "a");
        let relayed = Hello {
            from: "c".into(),
            ..h
        };
        let err = accept(&mut relay, &keys, &relayed, "b")
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, HandshakeError::Refused(ref who) if who == "c"),
            "{err}"
        );
        drop(relay);
        assert!(dialler.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_handshake_for_one_lane_does_not_open_another() {
        let keys = Keys::new(&["cluster-secret-0001"]);
        let (mut a, mut relay) = tokio::io::duplex(1 << 16);
        let k = keys.clone();
        let dialler =
            tokio::spawn(async move { dial(&mut a, &k, 0, ("a", "b"), Lane::Plugins).await });
        let h = hello(&mut relay, "b").await.unwrap();
        assert_eq!(h.lane, Lane::Plugins);
        let moved = Hello {
            lane: Lane::Consensus,
            ..h
        };
        let err = accept(&mut relay, &keys, &moved, "b").await.err().unwrap();
        assert!(matches!(err, HandshakeError::Refused(_)), "{err}");
        drop(relay);
        assert!(dialler.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn any_accepted_secret_opens_and_a_wrong_one_does_not() {
        let old_and_new = Keys::new(&["the-new-secret-123", "the-old-secret-123"]);
        let old = Keys::new(&["the-old-secret-123"]);
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let k = old_and_new.clone();
        let l = tokio::spawn(async move {
            let h = hello(&mut b, "b").await.unwrap();
            accept(&mut b, &k, &h, "b").await.map(|_| ())
        });
        dial(&mut a, &old, 0, ("a", "b"), Lane::Consensus)
            .await
            .unwrap();
        l.await.unwrap().unwrap();

        let stranger = Keys::new(&["some-other-secret"]);
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let l = tokio::spawn(async move {
            let h = hello(&mut b, "b").await.unwrap();
            accept(&mut b, &old_and_new, &h, "b").await.map(|_| ())
        });
        assert!(
            dial(&mut a, &stranger, 0, ("a", "b"), Lane::Consensus)
                .await
                .is_err()
        );
        assert!(matches!(l.await.unwrap(), Err(HandshakeError::Refused(_))));
    }

    #[tokio::test]
    async fn a_changed_record_closes_the_link() {
        let keys = Keys::new(&["cluster-secret-0001"]);
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let k = keys.clone();
        let l = tokio::spawn(async move {
            let h = hello(&mut b, "b").await.unwrap();
            let c = accept(&mut b, &k, &h, "b").await.unwrap();
            (c, b)
        });
        let c = dial(&mut a, &keys, 0, ("a", "b"), Lane::Consensus)
            .await
            .unwrap();
        let (cb, b) = l.await.unwrap();
        // Seal a record, flip one bit, and deliver it.
        let mut sealed = Vec::new();
        c.sealer()
            .write_all(&mut sealed, b"append entries")
            .await
            .unwrap();
        sealed[5] ^= 1;
        a.write_all(&sealed).await.unwrap();
        let mut o = cb.opener(b);
        let err = o.take(14).await.err().unwrap();
        assert!(err.to_string().contains("integrity"), "{err}");
    }

    /// Writes a hello as a dialler would, with any protocol and names.
    async fn send_hello(w: &mut (impl AsyncWrite + Unpin), protocol: u32, from: &str, to: &str) {
        let body = postcard::to_allocvec(&Hello {
            protocol,
            from: from.into(),
            to: to.into(),
            lane: Lane::Consensus,
        })
        .unwrap();
        w.write_all(&(body.len() as u32).to_be_bytes())
            .await
            .unwrap();
        w.write_all(&body).await.unwrap();
    }

    #[tokio::test]
    async fn a_hello_naming_no_valid_node_id_is_refused_before_any_log() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        send_hello(&mut a, PEER_PROTOCOL, "\u{1b}[31mevil\nnode", "b").await;
        let err = hello(&mut b, "b").await.err().unwrap();
        assert!(!err.to_string().contains('\u{1b}'), "{err}");
        assert!(err.to_string().contains("not [a-z0-9-]"), "{err}");
    }

    #[tokio::test]
    async fn another_protocol_version_is_named() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        send_hello(&mut a, 1, "a", "b").await;
        let err = hello(&mut b, "b").await.err().unwrap();
        assert!(err.to_string().contains("peer protocol 1"), "{err}");
    }

    /// Random bytes where a hello or the first handshake message belongs
    /// are refused with an error, never a panic or a hang.
    #[tokio::test]
    async fn random_handshake_bytes_are_refused() {
        let keys = Keys::new(&["cluster-secret-0001"]);
        let mut rng = Rng(0x5eed_0003);
        for _ in 0..500 {
            let mut input = if rng.below(2) == 0 {
                let body = rng.bytes(40);
                let mut v = (body.len() as u32).to_be_bytes().to_vec();
                v.extend(body);
                v
            } else {
                rng.bytes(64)
            };
            // At times a valid hello, then a random first message.
            if rng.below(3) == 0 {
                let hello = postcard::to_allocvec(&Hello {
                    protocol: PEER_PROTOCOL,
                    from: "a".into(),
                    to: "b".into(),
                    lane: Lane::Plugins,
                })
                .unwrap();
                input = (hello.len() as u32).to_be_bytes().to_vec();
                input.extend(hello);
                let first = rng.bytes(100);
                input.extend((first.len() as u16).to_be_bytes());
                input.extend(first);
            }
            let mut r = std::io::Cursor::new(input);
            let mut w = Vec::new();
            let mut io = tokio::io::join(&mut r, &mut w);
            let outcome = async {
                let h = hello(&mut io, "b").await?;
                accept(&mut io, &keys, &h, "b").await
            }
            .await;
            assert!(outcome.is_err());
        }
    }

    /// Records whose plaintext is random open to exactly what was sealed;
    /// a changed record fails its check. Never a panic.
    #[tokio::test]
    async fn random_records_never_panic_the_reader() {
        let keys = Keys::new(&["cluster-secret-0001"]);
        let mut rng = Rng(0x5eed_0004);
        for _ in 0..100 {
            let (mut a, mut b) = tokio::io::duplex(1 << 20);
            let k = keys.clone();
            let l = tokio::spawn(async move {
                let h = hello(&mut b, "b").await.unwrap();
                (accept(&mut b, &k, &h, "b").await.unwrap(), b)
            });
            let c = dial(&mut a, &keys, 0, ("a", "b"), Lane::Consensus)
                .await
                .unwrap();
            let (cb, b) = l.await.unwrap();
            let plain = rng.bytes(150_000);
            let mut sealed = Vec::new();
            c.sealer().write_all(&mut sealed, &plain).await.unwrap();
            let changed = rng.below(4) == 0 && !sealed.is_empty();
            if changed {
                let at = rng.below(sealed.len());
                sealed[at] ^= 1 << rng.below(8);
            }
            a.write_all(&sealed).await.unwrap();
            drop(a);
            let mut o = cb.opener(b);
            let mut got = Vec::new();
            while let Ok(bytes) = o.take(1 + rng.below(4096)).await {
                got.extend_from_slice(bytes);
            }
            assert!(plain.starts_with(&got), "only sealed bytes come out");
            if !changed {
                // All of it, but for a last read asking past the end.
                assert!(plain.len() - got.len() < 4096);
            }
        }
    }
}
