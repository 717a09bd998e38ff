//! relay: a small plugin that makes every kind of call the contract has,
//! so each can be seen working (and failing) from outside.
//!
//! Routes:
//! - `* /echo/...`: answers here with 200, an `x-answered-by` header and a
//!   JSON body naming this node, the request's source, path, query,
//!   headers and body.
//! - `* /on/{node}/...`: forwards the request to this plugin on `{node}`,
//!   which answers the client (`/on/b/echo/x` is answered by `/echo/x`
//!   there... after the prefix is dropped by the receiver).
//! - `POST /ask/{node}`: `messaging.call` to `{node}` with the body; its
//!   `on-message` echoes it back, prefixed with its node id.
//! - `POST /call/{plugin}/...`: `plugins.call` of `{plugin}` (on this node,
//!   or on `?node=`) with the rest of the path and the body; answers with
//!   the callee's response, or 502/504 and the error.
//! - `GET /fetch?url=URL`: `outbound-http.fetch` of URL; answers with its
//!   response, or 502/504 and the error kind.
//! - `* /hold`: parks the request (`replies::hold`) until `POST /release`
//!   answers every parked one with 200 (a long poll, or a callee that keeps
//!   its callers' calls in flight).
//! - `POST /burst/{node}?n=N`: `messaging.send` of N messages on topic
//!   `seq` to `{node}`, numbered 0..N; `GET /seen` lists the `seq`
//!   messages this node received, as `[from, number]` in arrival order.
//! - `GET /stats`: calls made and outcomes received.
//!
//! Config: `timeout_ms` (default 2000) for every call.

use plexus_sdk::http::{FetchError, OutgoingRequest};
use plexus_sdk::{
    InitContext, Method, Pattern, Pending, Reply, Request, RequestSource, Response, export_pattern,
    http, messaging, plugins, replies,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_timeout")]
    timeout_ms: u32,
}

fn default_timeout() -> u32 {
    2000
}

#[derive(Default, serde::Serialize)]
struct Stats {
    calls: u64,
    outcomes: u64,
    echoes: u64,
}

struct Relay {
    node: String,
    timeout_ms: u32,
    stats: Stats,
    held: Vec<Pending>,
    /// `seq` messages received, in arrival order.
    seen: Vec<(String, u64)>,
}

fn source(s: &RequestSource) -> serde_json::Value {
    match s {
        RequestSource::Client => serde_json::json!({ "client": null }),
        RequestSource::Forwarded(node) => serde_json::json!({ "forwarded": node }),
        RequestSource::Plugin(c) => serde_json::json!({ "plugin": c.plugin, "node": c.node }),
    }
}

fn error(status: u16, kind: &str, why: String) -> Response {
    Response::json(status, &serde_json::json!({ "error": why, "kind": kind }))
}

fn fetch_failure(e: FetchError) -> Response {
    match e {
        FetchError::Timeout => error(504, "timeout", "no response in time".into()),
        FetchError::Broken(why) => error(504, "broken", why),
        FetchError::TooLarge(max) => error(502, "too-large", format!("response over {max} bytes")),
        FetchError::Connect(why) => error(502, "connect", why),
        FetchError::NotAllowed(origin) => error(502, "not-allowed", origin),
        FetchError::InvalidRequest(why) => error(502, "invalid-request", why),
        FetchError::Busy(max) => error(503, "busy", format!("{max} calls in flight")),
    }
}

fn plugin_failure(e: plugins::Error) -> Response {
    match e {
        plugins::Error::NotAllowed(p) => error(403, "not-allowed", p),
        plugins::Error::NoSuchPlugin(p) => error(404, "no-such-plugin", p),
        plugins::Error::UnknownNode(n) => error(502, "unknown-node", n),
        plugins::Error::Failed(why) => error(502, "failed", why),
        plugins::Error::TooLarge(max) => error(413, "too-large", format!("over {max} bytes")),
        plugins::Error::Timeout => error(504, "timeout", "no answer in time".into()),
        plugins::Error::Busy(max) => error(503, "busy", format!("{max} calls in flight")),
    }
}

impl Relay {
    fn echo(&mut self, req: &Request, path: &str) -> Response {
        self.stats.echoes += 1;
        let body = serde_json::json!({
            "node": self.node,
            "source": source(&req.source),
            "method": req.method.as_str(),
            "path": path,
            "query": req.query,
            "headers": req.headers,
            "body": String::from_utf8_lossy(&req.body),
        });
        Response::json(200, &body).with_header("x-answered-by", &self.node)
    }

    fn ask(&mut self, node: &str, body: &[u8]) -> Reply {
        let sent = messaging::call(
            self,
            node,
            "echo",
            body,
            self.timeout_ms,
            |this: &mut Relay, r| {
                this.stats.outcomes += 1;
                match r {
                    Ok(reply) => Response::new(200, "text/plain", reply),
                    Err(messaging::Error::Timeout) => {
                        error(504, "timeout", "no reply in time".into())
                    }
                    Err(e) => error(502, "failed", format!("{e:?}")),
                }
            },
        );
        match sent {
            Ok(p) => {
                self.stats.calls += 1;
                p.into()
            }
            Err(e) => error(502, "refused", format!("{e:?}")).into(),
        }
    }

    fn call(&mut self, plugin: &str, rest: &str, req: &Request) -> Reply {
        let node = req.query_param("node");
        let mut call = plugins::request(req.method, rest, req.body.clone());
        call.headers = req.headers.clone();
        let sent = plugins::call(
            self,
            plugin,
            node.as_deref(),
            call,
            self.timeout_ms,
            |this: &mut Relay, r| {
                this.stats.outcomes += 1;
                match r {
                    Ok(response) => response,
                    Err(e) => plugin_failure(e),
                }
            },
        );
        match sent {
            Ok(p) => {
                self.stats.calls += 1;
                p.into()
            }
            Err(e) => plugin_failure(e).into(),
        }
    }

    fn fetch(&mut self, url: &str) -> Reply {
        let sent = http::fetch(
            self,
            OutgoingRequest::get(url),
            self.timeout_ms,
            |this: &mut Relay, r| {
                this.stats.outcomes += 1;
                r.unwrap_or_else(fetch_failure)
            },
        );
        match sent {
            Ok(p) => {
                self.stats.calls += 1;
                p.into()
            }
            Err(e) => fetch_failure(e).into(),
        }
    }
}

/// `/a/b/c` split into `a` and `/b/c`.
fn head(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    match path.find('/') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, "/"),
    }
}

impl Pattern for Relay {
    type Command = ();
    type Output = ();

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        Ok(Relay {
            node: ctx.node,
            timeout_ms: settings.timeout_ms,
            stats: Stats::default(),
            held: Vec::new(),
            seen: Vec::new(),
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        let (first, rest) = head(&req.path);
        match (first, req.method) {
            ("echo", _) => self.echo(&req, rest).into(),
            ("on", _) => {
                let (node, _) = head(rest);
                // The receiver sees the same path; it answers `/on/{itself}/...`
                // as an echo instead of forwarding again.
                if node == self.node {
                    let (_, after) = head(rest);
                    return self.echo(&req, after).into();
                }
                let hops = format!(
                    "{}",
                    req.headers
                        .iter()
                        .filter(|(k, _)| k == "x-relayed-by")
                        .count()
                        + 1
                );
                messaging::forward_with(
                    node,
                    vec![
                        ("x-relayed-by".into(), self.node.clone()),
                        ("x-relay-hop".into(), hops),
                    ],
                )
            }
            ("ask", Method::Post) => {
                let (node, _) = head(rest);
                let node = node.to_string();
                self.ask(&node, &req.body)
            }
            ("call", _) => {
                let (plugin, after) = head(rest);
                let plugin = plugin.to_string();
                let after = after.to_string();
                self.call(&plugin, &after, &req)
            }
            ("fetch", Method::Get) => match req.query_param("url") {
                Some(url) => self.fetch(&url),
                None => error(400, "bad-request", "?url= is required".into()).into(),
            },
            ("hold", _) => {
                let pending = replies::hold();
                self.held.push(pending);
                pending.into()
            }
            ("release", Method::Post) => {
                let n = self.held.len();
                for pending in self.held.drain(..) {
                    replies::answer(pending, Response::text(200, "released"));
                }
                Response::json(200, &serde_json::json!({ "released": n })).into()
            }
            ("burst", Method::Post) => {
                let (node, _) = head(rest);
                let n: u64 = req
                    .query_param("n")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100);
                for i in 0..n {
                    if let Err(e) = messaging::send(node, "seq", &i.to_le_bytes()) {
                        return error(502, "refused", format!("message {i}: {e:?}")).into();
                    }
                }
                Response::json(200, &serde_json::json!({ "sent": n })).into()
            }
            ("seen", Method::Get) => Response::json(200, &self.seen).into(),
            ("stats", Method::Get) => Response::json(200, &self.stats).into(),
            _ => error(
                404,
                "no-route",
                format!("no route {} {}", req.method, req.path),
            )
            .into(),
        }
    }

    fn on_message(&mut self, from: String, topic: String, payload: Vec<u8>) -> Option<Vec<u8>> {
        if topic == "seq" {
            let n = <[u8; 8]>::try_from(payload.as_slice()).map_or(u64::MAX, u64::from_le_bytes);
            self.seen.push((from, n));
            return None;
        }
        (topic == "echo").then(|| {
            let mut out = format!("{}:", self.node).into_bytes();
            out.extend_from_slice(&payload);
            out
        })
    }
}

export_pattern!(Relay);

#[cfg(test)]
mod tests;
