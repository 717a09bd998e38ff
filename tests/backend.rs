//! A real HTTP service on 127.0.0.1 for outbound calls to reach: answers
//! at once, late, too much, not at all, or holds requests until told.
//!
//! - `/echo...`: 200, `x-backend: 1`, body `METHOD PATH?QUERY BODY`;
//! - `/slow?ms=N`: 200 after N ms;
//! - `/big?bytes=N`: 200 with N bytes;
//! - `/die`: reads the request and closes the connection unanswered;
//! - `/hold`: counted in [`Backend::held`], answered 200 once
//!   [`Backend::release`] is called.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

/// A running backend; stops when dropped.
pub struct Backend {
    /// Its address.
    pub addr: SocketAddr,
    held: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Die;

impl std::fmt::Display for Die {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closing the connection unanswered")
    }
}

impl std::error::Error for Die {}

fn param(query: &str, name: &str) -> Option<u64> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.parse().ok())?
    })
}

impl Backend {
    /// Starts a backend on a free port of 127.0.0.1.
    pub async fn start() -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the backend");
        let addr = listener.local_addr().expect("backend address");
        let held = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let (h, s) = (held.clone(), served.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (held, served, released) = (h.clone(), s.clone(), released.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (held, served, mut released) =
                        (held.clone(), served.clone(), released.clone());
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_string();
                        let query = req.uri().query().unwrap_or("").to_string();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        served.fetch_add(1, Ordering::SeqCst);
                        let ok = |body: Bytes| {
                            Ok::<_, Die>(
                                hyper::Response::builder()
                                    .header("x-backend", "1")
                                    .body(Full::new(body))
                                    .expect("a response"),
                            )
                        };
                        if path.starts_with("/echo") {
                            let text = format!(
                                "{method} {path}?{query} {}",
                                String::from_utf8_lossy(&body)
                            );
                            return ok(Bytes::from(text));
                        }
                        match path.as_str() {
                            "/slow" => {
                                let ms = param(&query, "ms").unwrap_or(1000);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                                ok(Bytes::from_static(b"late"))
                            }
                            "/big" => {
                                let n = param(&query, "bytes").unwrap_or(1 << 20);
                                ok(Bytes::from(vec![b'x'; n as usize]))
                            }
                            "/die" => Err(Die),
                            "/hold" => {
                                held.fetch_add(1, Ordering::SeqCst);
                                let _ = released.wait_for(|r| *r).await;
                                ok(Bytes::from_static(b"released"))
                            }
                            _ => Ok(hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"no such path")))
                                .expect("a response")),
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            addr,
            held,
            served,
            release,
            task,
        }
    }

    /// Its origin, as `allowed_outbound_hosts` lists it.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests waiting in `/hold`.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Requests read so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Answers every request in `/hold`, and those that come later.
    pub fn release(&self) {
        let _ = self.release.send(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `cond` holds, checking every few milliseconds, for at most
/// `limit`. Returns whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cond()
}
