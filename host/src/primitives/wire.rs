//! Requests and responses between nodes: a client request forwarded to
//! this plugin on another node (`reply::forward`), and a call to a plugin
//! on another node (`plugins.call`).

use serde::{Deserialize, Serialize};

use crate::cluster::transport::TransportError;
use crate::runtime::bindings::plexus::cluster::types::{
    Caller, Method, Request, RequestSource, Response,
};

/// Transport kind of a forwarded client request.
pub const KIND_FORWARD: u8 = 22;
/// Transport kind of a plugin-to-plugin call.
pub const KIND_CALL: u8 = 23;

/// Most times one client request may be forwarded.
pub const MAX_HOPS: u8 = 4;

/// A request as it travels between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireRequest {
    method: u8,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

impl WireRequest {
    /// The wire form of `req` (its source is set by the receiver).
    pub fn from_request(req: Request) -> WireRequest {
        WireRequest {
            method: req.method as u8,
            path: req.path,
            query: req.query,
            headers: req.headers,
            body: req.body,
        }
    }

    /// The request, as coming from `source`.
    pub fn into_request(self, source: RequestSource) -> Option<Request> {
        let method = [
            Method::Get,
            Method::Head,
            Method::Post,
            Method::Put,
            Method::Delete,
            Method::Patch,
            Method::Options,
        ]
        .into_iter()
        .find(|m| *m as u8 == self.method)?;
        Some(Request {
            method,
            path: self.path,
            query: self.query,
            headers: self.headers,
            body: self.body,
            source,
        })
    }
}

/// A response as it travels between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireResponse {
    status: u16,
    headers: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

impl From<Response> for WireResponse {
    fn from(r: Response) -> Self {
        WireResponse {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }
    }
}

impl From<WireResponse> for Response {
    fn from(r: WireResponse) -> Self {
        Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }
    }
}

/// The body of a [`KIND_FORWARD`] request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Forwarded {
    /// The plugin it is for (the same as the sender's).
    pub plugin: String,
    /// How many times the request was forwarded, this time included.
    pub hops: u8,
    /// How long the receiver may take.
    pub timeout_ms: u32,
    /// The request.
    pub request: WireRequest,
}

/// The body of a [`KIND_CALL`] request.
#[derive(Debug, Serialize, Deserialize)]
pub struct PluginCall {
    /// The calling plugin.
    pub caller: String,
    /// The plugin called.
    pub plugin: String,
    /// How long the callee may take.
    pub timeout_ms: u32,
    /// The request.
    pub request: WireRequest,
}

impl PluginCall {
    /// The request as the callee sees it, called from node `from`.
    pub fn into_request(self, from: &str) -> Option<(String, Request)> {
        let source = RequestSource::Plugin(Caller {
            plugin: self.caller,
            node: from.to_string(),
        });
        let plugin = self.plugin;
        self.request.into_request(source).map(|r| (plugin, r))
    }
}

/// How a request handed to a plugin ended: on the node that ran it, and
/// as the reply of [`KIND_FORWARD`] and [`KIND_CALL`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Answered {
    /// The plugin's response.
    Response(WireResponse),
    /// No plugin of that name runs there. Definite.
    NoSuchPlugin(String),
    /// Its handler did not complete (trap, stopped, storage failure).
    /// Definite.
    Failed(String),
    /// It did not answer in time: it may still have had its effect.
    Unknown(String),
}

impl Answered {
    /// What the transport's result of a [`KIND_FORWARD`] or [`KIND_CALL`]
    /// means: definite only where the handler surely did not complete.
    pub fn from_transport(sent: Result<Vec<u8>, TransportError>) -> Answered {
        match sent {
            Ok(bytes) => postcard::from_bytes(&bytes)
                .unwrap_or_else(|e| Answered::Unknown(format!("garbled reply: {e}"))),
            Err(e @ (TransportError::Timeout(_) | TransportError::Lost(_))) => {
                Answered::Unknown(e.to_string())
            }
            Err(e) => Answered::Failed(e.to_string()),
        }
    }

    /// The reply's bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("an answer encodes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            method: Method::Patch,
            path: "/k/a%20b".into(),
            query: "x=1".into(),
            headers: vec![("x-epoch".into(), "3".into())],
            body: vec![0, 1, 2, 255],
            source: RequestSource::Client,
        }
    }

    #[test]
    fn a_request_crosses_the_wire_intact_with_the_source_the_receiver_sets() {
        let wire = WireRequest::from_request(request());
        let bytes = postcard::to_allocvec(&wire).unwrap();
        let back: WireRequest = postcard::from_bytes(&bytes).unwrap();
        let r = back
            .into_request(RequestSource::Forwarded("a".into()))
            .unwrap();
        let want = request();
        assert_eq!(
            (r.method, &r.path, &r.query, &r.headers, &r.body),
            (
                want.method,
                &want.path,
                &want.query,
                &want.headers,
                &want.body
            )
        );
        assert!(matches!(r.source, RequestSource::Forwarded(ref n) if n == "a"));
    }

    #[test]
    fn an_unknown_method_byte_is_refused() {
        let mut wire = WireRequest::from_request(request());
        wire.method = 99;
        assert!(wire.into_request(RequestSource::Client).is_none());
    }

    #[test]
    fn transport_failures_after_sending_are_unknown_and_before_are_definite() {
        let lost = Answered::from_transport(Err(TransportError::Lost("b".into())));
        assert!(matches!(lost, Answered::Unknown(_)), "{lost:?}");
        let late = Answered::from_transport(Err(TransportError::Timeout("b".into())));
        assert!(matches!(late, Answered::Unknown(_)), "{late:?}");
        let refused = Answered::from_transport(Err(TransportError::Unreachable(
            "b".into(),
            "refused".into(),
        )));
        assert!(matches!(refused, Answered::Failed(_)), "{refused:?}");
        let garbled = Answered::from_transport(Ok(vec![0xff, 0xff]));
        assert!(matches!(garbled, Answered::Unknown(_)), "{garbled:?}");
        let ok = Answered::Response(WireResponse {
            status: 201,
            headers: vec![],
            body: b"ok".to_vec(),
        });
        let back = Answered::from_transport(Ok(ok.encode()));
        assert!(matches!(back, Answered::Response(ref r) if r.status == 201 && r.body == b"ok"));
    }
}
