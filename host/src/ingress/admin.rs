//! The admin API under `/v1/admin`: plugin status, load, swap and
//! unload, the node's status, and voter changes. Every route needs the
//! bearer token.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, StatusCode};

use super::{IngressOptions, Resp, error, json, read_body};
use crate::cluster::raft::MemberChange;
use crate::node::Node;
use crate::runtime::actor::{CallError, SwapError};

pub(super) async fn admin(
    node: &Arc<Node>,
    opts: &IngressOptions,
    req: hyper::Request<Incoming>,
) -> Resp {
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
                node.swap_cluster_by(&name, component, config, "admin API")
                    .await
                    .map(|done| serde_json::to_value(done).unwrap_or_default())
            } else {
                node.swap_by(&name, component, config, "admin API")
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

pub(super) fn member_state(s: crate::runtime::bindings::types::MemberState) -> &'static str {
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
