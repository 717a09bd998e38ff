//! Unit tests of the peer transport over real sockets on 127.0.0.1:
//! requests, lanes, authentication, secret rotation and hostile input.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::cluster::secure;

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
    fn request(&self, _: String, _: u8, _: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, String>> {
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
