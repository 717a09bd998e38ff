//! Messages to the same plugin on other nodes, and requests forwarded to
//! it.

use crate::host::messaging as wit;
use crate::replies;
pub use crate::replies::Pending;
use crate::{CallOutcome, ForwardTo, NodeId, Pattern, Reply};

pub use crate::bindings::plexus::cluster::types::MessagingError as Error;

/// Queues `payload` for `node`'s instance of this plugin.
pub fn send(node: &str, topic: &str, payload: &[u8]) -> Result<(), Error> {
    wit::send(node, topic, payload)
}

/// Queues `payload` for every alive member, this node included.
pub fn broadcast(topic: &str, payload: &[u8]) -> Result<u32, Error> {
    wit::broadcast(topic, payload)
}

/// Sends a request and waits for the reply of the receiver's `on_message`.
///
/// The plugin serves nothing else meanwhile: use it in a timer or at
/// start. On a request path, use [`call`].
pub fn request(node: &str, topic: &str, payload: &[u8], timeout_ms: u32) -> Result<Vec<u8>, Error> {
    wit::request(node, topic, payload, timeout_ms)
}

/// Sends a request to `node`'s instance of this plugin without waiting.
/// When the reply of its `on_message` arrives (or the call fails, or
/// `timeout_ms` passes), `then` runs; what it returns answers the client
/// of the request that returned the [`Pending`].
///
/// Errors returned here are definite: nothing was sent.
///
/// ```no_run
/// # use plexus_sdk::{messaging, Pattern, Request, Response, InitContext, http};
/// # struct Cache;
/// # impl Pattern for Cache { type Command = (); type Output = (); fn init(_: InitContext) -> Result<Self, String> { Ok(Cache) } }
/// fn lookup(c: &mut Cache, req: &Request, p: &http::Params) -> http::Result<messaging::Pending> {
///     let key = p.get("key").unwrap_or_default().as_bytes().to_vec();
///     messaging::call(c, "node-b", "get", &key, 500, |_c: &mut Cache, reply| match reply {
///         Ok(value) => Response::new(200, "application/octet-stream", value),
///         Err(e) => Response::error(502, &format!("node-b: {e:?}")),
///     })
///     .map_err(|e| Response::error(503, &format!("{e:?}")))
/// }
/// ```
pub fn call<P: Pattern, R: Into<Reply>>(
    pattern: &mut P,
    node: &str,
    topic: &str,
    payload: &[u8],
    timeout_ms: u32,
    then: impl FnOnce(&mut P, Result<Vec<u8>, Error>) -> R + 'static,
) -> Result<Pending, Error> {
    let _ = pattern;
    let ticket = wit::call(node, topic, payload, timeout_ms)?;
    replies::expect::<P>(ticket, move |p, outcome| {
        let result = match outcome {
            CallOutcome::Message(r) => r,
            _ => Err(Error::NoHandler),
        };
        then(p, result).into()
    });
    Ok(Pending(ticket))
}

/// Hands the client's request, unchanged, to this plugin on `node`, whose
/// `on_request` answers the client directly (it sees
/// `RequestSource::Forwarded(this node)`). Return it from the request
/// handler. If the forward fails the host answers: 502 when nothing was
/// handled there, 504 when the outcome is unknown.
pub fn forward(node: &str) -> Reply {
    forward_with(node, Vec::new())
}

/// As [`forward`], adding `headers` to the request (for example the epoch
/// of the map that chose `node`, for it to refuse a stale one).
pub fn forward_with(node: &str, headers: Vec<(String, String)>) -> Reply {
    Reply::Forward(ForwardTo {
        node: node.to_string(),
        headers,
    })
}

/// This node's id, for addressing replies.
pub fn local_node() -> NodeId {
    crate::membership::local_node()
}
