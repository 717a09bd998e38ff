//! HTTP ingress: client requests to plugins, a small admin API, health and
//! metrics.
//!
//! - `ANY /v1/plugins/{name}/{path..}` → that plugin's `on-request`;
//! - `GET /v1/admin/plugins`, `POST /v1/admin/plugins/{name}/swap` (body: a
//!   component, `application/wasm`), `DELETE /v1/admin/plugins/{name}`:
//!   need `Authorization: Bearer <admin.token>`;
//! - `GET /healthz`, `GET /metrics` (Prometheus text);
//! - `GET /ui`, the operator's page, and `GET /v1/ui/state`, the JSON it
//!   polls (read-only, no token).
//!
//! Layout: `admin` (the admin API), `metrics` (`/metrics`), `ui` (the
//! operator's page), `limits` (connection caps); client requests and
//! routing here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

mod admin;
mod limits;
mod metrics;
mod ui;

pub use limits::RESERVED_DESCRIPTORS;

use crate::node::{Node, RequestError};
use crate::runtime::actor::CallError;
use crate::runtime::bindings::pattern;

/// Ingress settings.
#[derive(Debug, Clone)]
pub struct IngressOptions {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// How long a request may wait for its plugin.
    pub request_timeout: Duration,
    /// How long a request's head may take to arrive (and a keep-alive
    /// connection may stay idle).
    pub header_read_timeout: Duration,
    /// How long a request's body may take to arrive.
    pub body_read_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
    /// Most connections at once from one client address.
    pub max_connections_per_client: usize,
    /// Admin bearer token; `None` turns the admin API off.
    pub admin_token: Option<String>,
}

type Resp = hyper::Response<Full<Bytes>>;

fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("static response parts are valid")
}

fn error(status: StatusCode, message: &str) -> Resp {
    json(status, &serde_json::json!({ "error": message }))
}

/// Binds `addr` and serves until the task is dropped. Returns the bound
/// address (useful with port 0) and the server task.
pub async fn serve(
    node: Arc<Node>,
    addr: SocketAddr,
    opts: IngressOptions,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding HTTP listener on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let connections =
        limits::Connections::new(opts.max_connections, opts.max_connections_per_client);
    let opts = Arc::new(opts);
    let task = tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match connections.admit(remote.ip()) {
                Ok(slot) => slot,
                Err(refusal) => {
                    // Answered without waiting: the socket's send buffer
                    // takes the few bytes, and the descriptor is closed at
                    // once.
                    let _ = stream.try_write(&refusal.response());
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let node = node.clone();
            let opts = opts.clone();
            let conns = connections.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let header_read_timeout = opts.header_read_timeout;
                let service = service_fn(move |req| {
                    let node = node.clone();
                    let opts = opts.clone();
                    let conns = conns.clone();
                    async move { Ok::<_, Infallible>(route(&node, &opts, &conns, req).await) }
                });
                if let Err(e) = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!("connection ended: {e}");
                }
            });
        }
    });
    Ok((local, task))
}

async fn read_body(
    req: hyper::Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<(hyper::http::request::Parts, Bytes), Resp> {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("too-large: body exceeds {limit} bytes"),
        ));
    }
    let Ok(collected) = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await
    else {
        return Err(error(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ),
        ));
    };
    match collected {
        Ok(b) => Ok((parts, b.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("too-large: body exceeds {limit} bytes"),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("reading body: {e}"),
        )),
    }
}

async fn route(
    node: &Arc<Node>,
    opts: &IngressOptions,
    conns: &limits::Connections,
    req: hyper::Request<Incoming>,
) -> Resp {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(4, '/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => json(
            StatusCode::OK,
            &serde_json::json!({ "status": "ok", "node": node.id() }),
        ),
        (&Method::GET, ["metrics"]) => metrics::metrics(node, conns),
        (&Method::GET, ["ui"] | ["ui", ""]) => ui::page(),
        (&Method::GET, ["v1", "ui", "state"]) => ui::state(node, opts).await,
        (_, ["v1", "plugins", name, ..]) => {
            let name = name.to_string();
            let rest = segments.get(3).map_or(String::new(), |s| format!("/{s}"));
            plugin_request(node, opts, &name, rest, req).await
        }
        (_, ["v1", "admin", ..]) => admin::admin(node, opts, req).await,
        _ => error(StatusCode::NOT_FOUND, &format!("no route for {path}")),
    }
}

fn to_method(m: &Method) -> Option<pattern::Method> {
    Some(match *m {
        Method::GET => pattern::Method::Get,
        Method::HEAD => pattern::Method::Head,
        Method::POST => pattern::Method::Post,
        Method::PUT => pattern::Method::Put,
        Method::DELETE => pattern::Method::Delete,
        Method::PATCH => pattern::Method::Patch,
        Method::OPTIONS => pattern::Method::Options,
        _ => return None,
    })
}

async fn plugin_request(
    node: &Arc<Node>,
    opts: &IngressOptions,
    name: &str,
    path: String,
    req: hyper::Request<Incoming>,
) -> Resp {
    let Some(method) = to_method(req.method()) else {
        return error(StatusCode::METHOD_NOT_ALLOWED, "unsupported method");
    };
    let query = req.uri().query().unwrap_or_default().to_string();
    let (parts, body) = match read_body(req, opts.max_body_bytes, opts.body_read_timeout).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let request = pattern::Request {
        method,
        path: if path.is_empty() { "/".into() } else { path },
        query,
        headers,
        body: body.to_vec(),
        source: pattern::RequestSource::Client,
    };
    match node.request(name, request, opts.request_timeout).await {
        Ok(resp) => {
            let status =
                StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut builder = hyper::Response::builder().status(status);
            for (k, v) in &resp.headers {
                builder = builder.header(k.as_str(), v.as_str());
            }
            builder
                .body(Full::new(Bytes::from(resp.body)))
                .unwrap_or_else(|_| {
                    error(StatusCode::BAD_GATEWAY, "plugin returned an invalid header")
                })
        }
        Err(RequestError::NoSuchPlugin(n)) => {
            error(StatusCode::NOT_FOUND, &format!("no plugin named `{n}`"))
        }
        Err(RequestError::Call(CallError::Timeout)) => {
            error(StatusCode::GATEWAY_TIMEOUT, "plugin did not answer in time")
        }
        Err(RequestError::Call(e @ (CallError::Trap(_) | CallError::Stopped))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Err(RequestError::Call(e @ CallError::Storage(_))) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
    }
}
