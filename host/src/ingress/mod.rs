//! HTTP ingress: client requests to plugins, a small admin API, health and
//! metrics.
//!
//! - `ANY /v1/plugins/{name}/{path..}` → that plugin's `on-request`;
//! - `GET /v1/admin/plugins`, `POST /v1/admin/plugins/{name}/swap` (body: a
//!   component, `application/wasm`), `DELETE /v1/admin/plugins/{name}`:
//!   need `Authorization: Bearer <admin.token>`;
//! - `GET /healthz`, `GET /metrics` (Prometheus text).

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

mod limits;

pub use limits::RESERVED_DESCRIPTORS;

use crate::cluster::raft::MemberChange;
use crate::node::{Node, RequestError};
use crate::runtime::actor::{CallError, PluginStatus, SwapError};
use crate::runtime::bindings::pattern;
use crate::runtime::metrics::VersionMetrics;

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
        (&Method::GET, ["metrics"]) => metrics(node, conns),
        (_, ["v1", "plugins", name, ..]) => {
            let name = name.to_string();
            let rest = segments.get(3).map_or(String::new(), |s| format!("/{s}"));
            plugin_request(node, opts, &name, rest, req).await
        }
        (_, ["v1", "admin", ..]) => admin(node, opts, req).await,
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

async fn admin(node: &Arc<Node>, opts: &IngressOptions, req: hyper::Request<Incoming>) -> Resp {
    let Some(token) = &opts.admin_token else {
        return error(
            StatusCode::FORBIDDEN,
            "the admin API is off: set admin.token in the config",
        );
    };
    let presented = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method().clone(), &segments[2..]) {
        (Method::GET, ["plugins"]) => json(
            StatusCode::OK,
            &serde_json::to_value(node.plugins()).unwrap_or_default(),
        ),
        (Method::GET, ["plugins", name]) => match node.plugin(name) {
            Some(s) => json(StatusCode::OK, &serde_json::to_value(s).unwrap_or_default()),
            None => error(StatusCode::NOT_FOUND, &format!("no plugin named `{name}`")),
        },
        (Method::POST, ["plugins"]) => {
            let (_, body) = match read_body(req, ADMIN_BODY_LIMIT, opts.body_read_timeout).await {
                Ok(x) => x,
                Err(resp) => return resp,
            };
            admin_load(node, &body).await
        }
        (Method::POST, ["plugins", name, "swap"]) => {
            let name = name.to_string();
            let req_query = req.uri().query().unwrap_or_default().to_string();
            let is_json = req
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
            let (_, body) = match read_body(req, ADMIN_BODY_LIMIT, opts.body_read_timeout).await {
                Ok(x) => x,
                Err(resp) => return resp,
            };
            let (component, config) = if is_json {
                let de = &mut serde_json::Deserializer::from_slice(&body);
                let swap: AdminSwap = match serde_path_to_error::deserialize(de) {
                    Ok(s) => s,
                    Err(e) => return parse_error(e),
                };
                let config = swap
                    .config
                    .map(|c| serde_json::to_string(&c).unwrap_or_else(|_| "{}".into()));
                match swap.component.resolve().await {
                    Ok(bytes) => (bytes, config),
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e),
                }
            } else {
                (body.to_vec(), None)
            };
            let cluster_wide = req_query.split('&').any(|p| p == "scope=cluster");
            let component = Arc::from(component);
            let result = if cluster_wide {
                node.swap_cluster(&name, component, config)
                    .await
                    .map(|done| serde_json::to_value(done).unwrap_or_default())
            } else {
                node.swap(&name, component, config)
                    .await
                    .map(|report| serde_json::to_value(report).unwrap_or_default())
            };
            match result {
                Ok(answer) => json(StatusCode::OK, &answer),
                Err(SwapError::Call(CallError::Stopped)) => {
                    error(StatusCode::NOT_FOUND, &format!("no plugin named `{name}`"))
                }
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
            }
        }
        (Method::DELETE, ["plugins", name]) => {
            let purge = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .any(|p| p == "purge=true" || p == "purge");
            if let Err(e) = node.unload(name).await {
                return error(StatusCode::NOT_FOUND, &e.to_string());
            }
            if !purge {
                return json(StatusCode::OK, &serde_json::json!({ "unloaded": name }));
            }
            match node.purge(name).await {
                Ok(keys) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "unloaded": name, "purged_keys": keys }),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (Method::GET, ["status"]) => {
            let services = node.services();
            let (epoch, members) = services.view.snapshot();
            let members: Vec<_> = members
                .iter()
                .map(|m| serde_json::json!({ "id": m.id, "state": member_state(m.state), "voter": m.voter }))
                .collect();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "node": node.id(),
                    "members": members,
                    "membership_epoch": epoch,
                    "leader": services.log.leader(),
                    "term": services.log.term(),
                    "commit_index": node.commit_index(),
                    "removed_at": node.removed_at(),
                    "plugins": node.plugins().len(),
                }),
            )
        }
        (Method::POST, ["cluster", "members"]) => {
            let (_, body) = match read_body(req, 64 << 10, opts.body_read_timeout).await {
                Ok(x) => x,
                Err(resp) => return resp,
            };
            let de = &mut serde_json::Deserializer::from_slice(&body);
            match serde_path_to_error::deserialize::<_, AdminJoin>(de) {
                Ok(j) if j.addr.ip().is_unspecified() || j.addr.port() == 0 => field_error(
                    "addr",
                    "must be an address the members can reach, not a wildcard or port 0",
                ),
                Ok(j) => {
                    let change = MemberChange::Join {
                        name: j.id,
                        addr: j.addr,
                    };
                    admin_members(node, change).await
                }
                Err(e) => parse_error(e),
            }
        }
        (Method::DELETE, ["cluster", "members", name]) => {
            let change = MemberChange::Leave {
                name: name.to_string(),
            };
            admin_members(node, change).await
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no admin route for {path}")),
    }
}

/// `POST /v1/admin/cluster/members`: the member to add.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminJoin {
    /// Its node id.
    id: String,
    /// Its peer address (`cluster.listen` in its config).
    addr: std::net::SocketAddr,
}

async fn admin_members(node: &Arc<Node>, change: MemberChange) -> Resp {
    use crate::cluster::log::LogError;
    use crate::node::NodeError;
    if let MemberChange::Join { name, .. } = &change
        && let Err(e) = crate::config::check_name(name)
    {
        return field_error("id", &e);
    }
    match node.change_members(change).await {
        Ok(voters) => json(StatusCode::OK, &serde_json::json!({ "voters": voters })),
        Err(e @ NodeError::NotACluster) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ NodeError::Members(LogError::NotLeader(_))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Err(e @ NodeError::Members(LogError::Timeout)) => {
            error(StatusCode::GATEWAY_TIMEOUT, &e.to_string())
        }
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
    }
}

/// Largest component accepted by the admin API.
const ADMIN_BODY_LIMIT: usize = 64 << 20;

/// Where a component comes from in an admin request: `component` is
/// `bundled:NAME` or a path on the node's file system; `wasm_base64` carries
/// the bytes themselves.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentRef {
    component: Option<String>,
    wasm_base64: Option<String>,
}

impl ComponentRef {
    /// The component's bytes. A path is read off the async runtime (a slow
    /// disk or a special file must not stall the node) and must name a
    /// regular file of at most [`crate::config::MAX_COMPONENT_BYTES`].
    async fn resolve(&self) -> Result<Vec<u8>, String> {
        use base64::Engine;
        match (&self.component, &self.wasm_base64) {
            (Some(_), Some(_)) => Err("give either `component` or `wasm_base64`, not both".into()),
            (None, None) => Err("missing `component` or `wasm_base64`".into()),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("wasm_base64: {e}")),
            (Some(c), None) => match c.strip_prefix("bundled:") {
                Some(name) => crate::bundled::get(name)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| format!("no bundled plugin `{name}`")),
                None => {
                    let path = std::path::PathBuf::from(c);
                    tokio::task::spawn_blocking(move || crate::config::read_component_file(&path))
                        .await
                        .map_err(|e| format!("reading {c}: {e}"))?
                }
            },
        }
    }

    /// What the config file would say in `component`.
    fn shown(&self) -> String {
        self.component
            .clone()
            .unwrap_or_else(|| "wasm_base64".into())
    }
}

/// `POST /v1/admin/plugins`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminLoad {
    name: String,
    #[serde(flatten)]
    component: ComponentRef,
    #[serde(default)]
    capabilities: std::collections::BTreeSet<crate::runtime::Capability>,
    #[serde(default)]
    limits: crate::config::LimitsEntry,
    /// As the `config` table of a `[[plugins]]` entry: an object whose
    /// values TOML can hold (no nulls).
    #[serde(default)]
    config: toml::Table,
    #[serde(default)]
    allowed_plugins: std::collections::BTreeSet<String>,
    #[serde(default)]
    allowed_outbound_hosts: Vec<String>,
}

/// `POST /v1/admin/plugins/{name}/swap` with a JSON body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSwap {
    #[serde(flatten)]
    component: ComponentRef,
    /// As the `config` table of a `[[plugins]]` entry.
    #[serde(default)]
    config: Option<toml::Table>,
}

/// A 400 naming the field, as a config error names its key.
fn field_error(field: &str, message: &str) -> Resp {
    json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({ "error": format!("{field}: {message}"), "field": field }),
    )
}

/// A body that does not fit its route's schema: the field where it went
/// wrong, and why.
fn parse_error(e: serde_path_to_error::Error<serde_json::Error>) -> Resp {
    let field = match e.path().to_string() {
        p if p == "." => "body".to_string(),
        p => p,
    };
    field_error(&field, &e.into_inner().to_string())
}

async fn admin_load(node: &Arc<Node>, body: &[u8]) -> Resp {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let load: AdminLoad = match serde_path_to_error::deserialize(de) {
        Ok(l) => l,
        Err(e) => return parse_error(e),
    };
    // The same rules as a `[[plugins]]` entry of the config file.
    let entry = crate::config::PluginEntry {
        name: load.name,
        component: load.component.shown(),
        capabilities: load.capabilities,
        limits: load.limits,
        config: load.config,
        allowed_plugins: load.allowed_plugins,
        allowed_outbound_hosts: load.allowed_outbound_hosts,
    };
    if let Err((field, message)) = entry.validate() {
        return field_error(&field, &message);
    }
    let bytes = match load.component.resolve().await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let name = entry.name.clone();
    let leftover = node.leftover_storage(&name);
    match node.load(entry.load_spec(bytes)).await {
        Ok(status) => {
            let mut answer = serde_json::to_value(status).unwrap_or_default();
            if let Some(applied) = leftover {
                let note = format!(
                    "this node kept storage from an earlier load of `{name}` (applied through \
                     log index {applied}), which the plugin now sees; \
                     `plexus plugin unload {name} --purge` removes it"
                );
                tracing::info!(plugin = %name, "{note}");
                answer["note"] = note.into();
            }
            json(StatusCode::CREATED, &answer)
        }
        Err(e @ crate::node::NodeError::AlreadyLoaded(_)) => {
            error(StatusCode::CONFLICT, &e.to_string())
        }
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
    }
}

fn member_state(s: crate::runtime::bindings::types::MemberState) -> &'static str {
    use crate::runtime::bindings::types::MemberState;
    match s {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Dead => "dead",
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Appends the `# HELP` and `# TYPE` lines that open a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn metrics(node: &Arc<Node>, conns: &limits::Connections) -> Resp {
    use std::fmt::Write;
    let mut out = String::new();
    let plugins = node.plugins();
    let all = node.plugin_metrics();
    // Counts and latencies by the version that ran; gauges by the version
    // running now.
    type Counter = (&'static str, &'static str, fn(&VersionMetrics) -> u64);
    let counters: [Counter; 4] = [
        (
            "plexus_plugin_requests_total",
            "Client requests handled.",
            |m| m.requests,
        ),
        (
            "plexus_plugin_errors_total",
            "Hook calls that failed.",
            |m| m.errors,
        ),
        (
            "plexus_plugin_traps_total",
            "Hook calls that trapped.",
            |m| m.traps,
        ),
        (
            "plexus_plugin_restarts_total",
            "Instances restarted after a failure.",
            |m| m.restarts,
        ),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        for (s, m) in &all {
            for (version, v) in &m.versions {
                let _ = writeln!(
                    out,
                    "{name}{{plugin=\"{}\",version=\"{version}\"}} {}",
                    s.name,
                    value(v)
                );
            }
        }
    }
    type Gauge = (&'static str, &'static str, fn(&PluginStatus) -> f64);
    let gauges: [Gauge; 2] = [
        (
            "plexus_plugin_mailbox_depth",
            "Mailbox items waiting.",
            |s| s.mailbox_depth as f64,
        ),
        (
            "plexus_plugin_last_swap_pause_seconds",
            "Pause of the last hot swap.",
            |s| s.last_swap_pause_us.map_or(0.0, |us| us as f64 / 1e6),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        for s in &plugins {
            let _ = writeln!(
                out,
                "{name}{{plugin=\"{}\",version=\"{}\"}} {}",
                s.name,
                s.version,
                value(s)
            );
        }
    }
    family(
        &mut out,
        "plexus_plugin_call_duration_seconds",
        "histogram",
        "Hook call duration, including its storage commit.",
    );
    for (s, m) in &all {
        for (version, v) in &m.versions {
            for (hook, h) in &v.calls {
                let labels = format!(
                    "plugin=\"{}\",version=\"{version}\",hook=\"{hook}\"",
                    s.name
                );
                h.render(&mut out, "plexus_plugin_call_duration_seconds", &labels);
            }
        }
    }
    family(
        &mut out,
        "plexus_plugin_swap_pause_seconds",
        "histogram",
        "Mailbox pause of hot swaps.",
    );
    for (s, m) in &all {
        m.swap_pause.render(
            &mut out,
            "plexus_plugin_swap_pause_seconds",
            &format!("plugin=\"{}\"", s.name),
        );
    }
    let log = node.services().log.clone();
    let stats = log.stats();
    let gauges: [(&str, &str, &str, u64); 7] = [
        (
            "plexus_consensus_commit_index",
            "gauge",
            "Last committed log index.",
            node.commit_index(),
        ),
        (
            "plexus_consensus_term",
            "gauge",
            "Current term.",
            log.term(),
        ),
        (
            "plexus_consensus_is_leader",
            "gauge",
            "Whether this node leads.",
            u64::from(log.leader().as_deref() == Some(node.id())),
        ),
        (
            "plexus_consensus_proposals_total",
            "counter",
            "Entries proposed and committed.",
            stats.proposals,
        ),
        (
            "plexus_consensus_log_writes_total",
            "counter",
            "Durable log writes (fsyncs); proposals per write is the batching factor.",
            stats.writes,
        ),
        (
            "plexus_consensus_snapshots_built_total",
            "counter",
            "Snapshots built here (on a single node: compactions); each compacts the plugins' streams behind their state.",
            stats.snapshots_built,
        ),
        (
            "plexus_consensus_snapshots_installed_total",
            "counter",
            "Snapshots installed from the leader.",
            stats.snapshots_installed,
        ),
    ];
    for (name, kind, help, value) in gauges {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    let name = "plexus_consensus_log_write_duration_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Durable log writes on this node, commit and fsync.",
    );
    stats.log_writes.render(&mut out, name, "");
    let name = "plexus_network_junk_total";
    family(
        &mut out,
        name,
        "counter",
        "Input dropped from the network: failed or refused peer handshakes, malformed or tampered peer frames, gossip datagrams without a valid tag.",
    );
    for j in crate::cluster::junk::sources() {
        let _ = writeln!(out, "{name}{{source=\"{}\"}} {}", j.source(), j.count());
    }
    let http: [(&str, &str, &str, u64); 3] = [
        (
            "plexus_http_connections",
            "gauge",
            "HTTP connections open now.",
            conns.open() as u64,
        ),
        (
            "plexus_http_connections_max",
            "gauge",
            "Most HTTP connections served at once (node.max_connections, lowered to fit the open-file limit).",
            conns.max() as u64,
        ),
        (
            "plexus_http_connections_refused_total",
            "counter",
            "HTTP connections refused past a cap (in all or per client address).",
            conns.refused(),
        ),
    ];
    for (name, kind, help, value) in http {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    hyper::Response::builder()
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(out)))
        .expect("static response parts are valid")
}
