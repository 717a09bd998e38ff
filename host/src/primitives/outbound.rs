//! `plexus:cluster/outbound-http`: requests to services outside the
//! cluster, through one pooled keep-alive client per node, only to the
//! origins a plugin's config allows. The guest gets a ticket at once; the
//! response reaches its `on-reply`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use wasmtime::component::{HasData, Linker};

use super::calls::{Calls, clamp_timeout};
use crate::runtime::bindings::plexus::cluster::outbound_http::{self as wit, OutgoingRequest};
use crate::runtime::bindings::plexus::cluster::types::{CallOutcome, HttpError, Method, Response};
use crate::runtime::state::PluginState;

/// An origin a plugin may send requests to: `http://HOST[:PORT]`, or
/// `http://HOST:*` for any port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    host: String,
    /// `None`: any port.
    port: Option<u16>,
}

impl FromStr for Origin {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = match s.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => {
                return Err(format!(
                    "`{s}`: https is not supported by the outbound client yet; use http://"
                ));
            }
            _ => return Err(format!("`{s}`: expected http://HOST or http://HOST:PORT")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "`{s}`: an origin is a scheme, a host and a port, with no path or user"
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                let port = if port == "*" {
                    None
                } else {
                    Some(
                        port.parse::<u16>()
                            .ok()
                            .filter(|p| *p != 0)
                            .ok_or_else(|| format!("`{s}`: bad port `{port}`"))?,
                    )
                };
                (host, port)
            }
            _ => (rest, Some(80)),
        };
        if host.is_empty() {
            return Err(format!("`{s}`: no host"));
        }
        Ok(Origin {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "http://{}:{p}", self.host),
            None => write!(f, "http://{}:*", self.host),
        }
    }
}

impl Origin {
    fn allows(&self, host: &str, port: u16) -> bool {
        self.host == host && self.port.is_none_or(|p| p == port)
    }
}

/// The node's pooled HTTP client.
pub struct OutboundClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for OutboundClient {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        OutboundClient { client }
    }
}

fn method(m: Method) -> hyper::Method {
    match m {
        Method::Get => hyper::Method::GET,
        Method::Head => hyper::Method::HEAD,
        Method::Post => hyper::Method::POST,
        Method::Put => hyper::Method::PUT,
        Method::Delete => hyper::Method::DELETE,
        Method::Patch => hyper::Method::PATCH,
        Method::Options => hyper::Method::OPTIONS,
    }
}

/// Checks `url` against `allowed` and builds the request.
fn build(
    req: OutgoingRequest,
    allowed: &[Origin],
) -> Result<hyper::Request<Full<Bytes>>, HttpError> {
    let uri: Uri = req
        .url
        .parse()
        .map_err(|e| HttpError::InvalidRequest(format!("url `{}`: {e}", req.url)))?;
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(HttpError::InvalidRequest(format!(
            "url `{}` is not absolute",
            req.url
        )));
    };
    if scheme != "http" {
        return Err(HttpError::InvalidRequest(format!(
            "url `{}`: only http:// is supported",
            req.url
        )));
    }
    let host = host.to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(80);
    if !allowed.iter().any(|o| o.allows(&host, port)) {
        return Err(HttpError::NotAllowed(format!("http://{host}:{port}")));
    }
    let mut builder = hyper::Request::builder()
        .method(method(req.method))
        .uri(uri);
    for (name, value) in req.headers {
        if name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::from(req.body)))
        .map_err(|e| HttpError::InvalidRequest(e.to_string()))
}

impl OutboundClient {
    /// Sends `req` and reads the whole response, at most `max_body` bytes
    /// of body.
    pub async fn send(
        &self,
        req: hyper::Request<Full<Bytes>>,
        max_body: u64,
    ) -> Result<Response, HttpError> {
        let response = self.client.request(req).await.map_err(|e| {
            let why = format!(
                "{e:#}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            if e.is_connect() {
                HttpError::Connect(why)
            } else {
                HttpError::Broken(why)
            }
        })?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    HttpError::TooLarge(max_body)
                } else {
                    HttpError::Broken(format!("reading the response body: {e}"))
                }
            })?
            .to_bytes();
        Ok(Response {
            status,
            headers,
            body: body.to_vec(),
        })
    }
}

/// One plugin instance's `outbound-http` context.
pub struct OutboundCtx {
    calls: Calls,
    client: Arc<OutboundClient>,
    allowed: Arc<Vec<Origin>>,
    max_response_bytes: u64,
}

impl OutboundCtx {
    /// A context that may reach `allowed`.
    pub fn new(
        calls: Calls,
        client: Arc<OutboundClient>,
        allowed: Arc<Vec<Origin>>,
        max_response_bytes: u64,
    ) -> Self {
        OutboundCtx {
            calls,
            client,
            allowed,
            max_response_bytes,
        }
    }
}

impl wit::Host for OutboundCtx {
    fn fetch(
        &mut self,
        req: OutgoingRequest,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<u64, HttpError>> {
        let request = match build(req, &self.allowed) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let client = self.client.clone();
        let max = self.max_response_bytes;
        let work = async move { CallOutcome::Http(client.send(request, max).await) };
        let started = self.calls.start(
            clamp_timeout(timeout_ms),
            work,
            CallOutcome::Http(Err(HttpError::Timeout)),
        );
        Ok(started.map_err(|busy| HttpError::Busy(busy.0)))
    }
}

struct Outbound;

impl HasData for Outbound {
    type Data<'a> = &'a mut OutboundCtx;
}

/// Grants `outbound-http`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<PluginState, Outbound>(linker, |s| &mut s.outbound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(url: &str) -> OutgoingRequest {
        OutgoingRequest {
            method: Method::Get,
            url: url.into(),
            headers: vec![("host".into(), "evil".into()), ("x-a".into(), "1".into())],
            body: vec![],
        }
    }

    #[test]
    fn origins_parse_with_default_and_wildcard_ports_and_refuse_the_rest() {
        let o: Origin = "http://Backend.local".parse().unwrap();
        assert_eq!(o.to_string(), "http://backend.local:80");
        assert_eq!(
            "http://127.0.0.1:8080/".parse::<Origin>().unwrap().port,
            Some(8080)
        );
        assert_eq!("http://[::1]:*".parse::<Origin>().unwrap().port, None);
        for bad in [
            "127.0.0.1:80",
            "https://x",
            "http://x/path",
            "http://x:0",
            "http://:80",
            "http://u@x",
        ] {
            assert!(bad.parse::<Origin>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn only_listed_origins_are_reached_and_the_host_header_is_the_hosts() {
        let allowed = vec![
            "http://127.0.0.1:8080".parse().unwrap(),
            "http://api:*".parse().unwrap(),
        ];
        let r = build(get("http://127.0.0.1:8080/x?y=1"), &allowed).unwrap();
        assert_eq!(r.uri().path(), "/x");
        assert!(
            r.headers().get("host").is_none(),
            "a guest's host header is dropped"
        );
        assert_eq!(r.headers()["x-a"], "1");
        assert!(build(get("http://API:9/"), &allowed).is_ok());
        let refused = build(get("http://127.0.0.1:8081/"), &allowed).unwrap_err();
        assert!(
            matches!(refused, HttpError::NotAllowed(ref o) if o == "http://127.0.0.1:8081"),
            "{refused:?}"
        );
        let https = build(get("https://127.0.0.1:8080/"), &allowed).unwrap_err();
        assert!(matches!(https, HttpError::InvalidRequest(_)), "{https:?}");
        let relative = build(get("/x"), &allowed).unwrap_err();
        assert!(
            matches!(relative, HttpError::InvalidRequest(_)),
            "{relative:?}"
        );
    }
}
