//! Calls to other plugins' `on_request`, on this node or another.
//!
//! Needs the `plugins` capability, and the callee's name in the caller's
//! `allowed_plugins`.

use crate::host::plugins as wit;
use crate::replies::{self, Pending};
use crate::{CallOutcome, Method, Pattern, Reply, Request, RequestSource, Response};

pub use crate::bindings::plexus::cluster::types::PluginError as Error;

/// A request to send to another plugin.
pub fn request(method: Method, path: &str, body: Vec<u8>) -> Request {
    Request {
        method,
        path: path.to_string(),
        query: String::new(),
        headers: Vec::new(),
        body,
        source: RequestSource::Client,
    }
}

/// Sends `req` to plugin `plugin` on `node` (this node when `None`)
/// without waiting. When its response arrives (or the call fails, or
/// `timeout_ms` passes), `then` runs; what it returns answers the client
/// of the request that returned the [`Pending`]. The callee sees the
/// request with `RequestSource::Plugin` naming this plugin and node.
///
/// Errors returned here are definite: nothing was sent.
pub fn call<P: Pattern, R: Into<Reply>>(
    pattern: &mut P,
    plugin: &str,
    node: Option<&str>,
    req: Request,
    timeout_ms: u32,
    then: impl FnOnce(&mut P, Result<Response, Error>) -> R + 'static,
) -> Result<Pending, Error> {
    let _ = pattern;
    let ticket = wit::call(plugin, node, &req, timeout_ms)?;
    replies::expect::<P>(ticket, move |p, outcome| {
        let result = match outcome {
            CallOutcome::Plugin(r) => r,
            _ => Err(Error::Failed("a different kind of outcome".into())),
        };
        then(p, result).into()
    });
    Ok(Pending(ticket))
}
