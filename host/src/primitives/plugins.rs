//! `plexus:cluster/plugins`: one plugin calling another's `on-request`,
//! on this node or on another member, without waiting.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasData, Linker};

use super::calls::{Calls, clamp_timeout};
use super::membership::MembershipView;
use super::wire::{Answered, KIND_CALL, PluginCall, WireRequest};
use super::{CallLimits, over};
use crate::cluster::log::BoxFuture;
use crate::cluster::transport::PeerLinks;
use crate::runtime::bindings::plexus::cluster::plugins as wit;
use crate::runtime::bindings::plexus::cluster::types::{
    CallOutcome, Caller, PluginError, Request, RequestSource,
};
use crate::runtime::state::PluginState;

/// The plugins running on this node, as the callers of `plugins.call` and
/// the peer handler reach them.
pub trait Directory: Send + Sync {
    /// Hands `req` to plugin `plugin`'s `on-request` (as forwarded `hops`
    /// times) and waits up to `timeout` for its answer.
    fn call(
        &self,
        plugin: &str,
        req: Request,
        hops: u8,
        timeout: Duration,
    ) -> BoxFuture<'static, Answered>;
}

/// One plugin instance's `plugins` context.
pub struct PluginsCtx {
    calls: Calls,
    caller: String,
    allowed: Arc<BTreeSet<String>>,
    directory: Arc<dyn Directory>,
    view: Arc<MembershipView>,
    transport: Option<Arc<dyn PeerLinks>>,
    limits: CallLimits,
}

impl PluginsCtx {
    /// A context for plugin `caller`, which may call the plugins in
    /// `allowed`.
    pub fn new(
        calls: Calls,
        caller: &str,
        allowed: Arc<BTreeSet<String>>,
        directory: Arc<dyn Directory>,
        view: Arc<MembershipView>,
        transport: Option<Arc<dyn PeerLinks>>,
        limits: CallLimits,
    ) -> Self {
        PluginsCtx {
            calls,
            caller: caller.to_string(),
            allowed,
            directory,
            view,
            transport,
            limits,
        }
    }
}

/// What a plugin's answer means to its caller.
fn outcome(answered: Answered) -> CallOutcome {
    CallOutcome::Plugin(match answered {
        Answered::Response(r) => Ok(r.into()),
        Answered::NoSuchPlugin(p) => Err(PluginError::NoSuchPlugin(p)),
        Answered::Failed(why) => Err(PluginError::Failed(why)),
        Answered::Unknown(_) => Err(PluginError::Timeout),
    })
}

impl wit::Host for PluginsCtx {
    fn call(
        &mut self,
        plugin: String,
        node: Option<String>,
        mut req: Request,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<u64, PluginError>> {
        if !self.allowed.contains(&plugin) {
            return Ok(Err(PluginError::NotAllowed(plugin)));
        }
        let timeout = clamp_timeout(timeout_ms);
        let late = CallOutcome::Plugin(Err(PluginError::Timeout));
        let local = self.view.local().to_string();
        let node = node.unwrap_or_else(|| local.clone());
        let started = if node == local {
            req.source = RequestSource::Plugin(Caller {
                plugin: self.caller.clone(),
                node,
            });
            let work = self.directory.call(&plugin, req, 0, timeout);
            self.calls
                .start(timeout, async move { outcome(work.await) }, late)
        } else {
            let size = req.body.len() + req.path.len() + req.query.len();
            if over(size, self.limits.max_message_bytes) {
                return Ok(Err(PluginError::TooLarge(self.limits.max_message_bytes)));
            }
            let (Some(transport), true) = (self.transport.clone(), self.view.is_reachable(&node))
            else {
                return Ok(Err(PluginError::UnknownNode(node)));
            };
            let body = postcard::to_allocvec(&PluginCall {
                caller: self.caller.clone(),
                plugin,
                timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
                request: WireRequest::from_request(req),
            })
            .expect("a call encodes");
            let work = async move {
                let sent = transport.request(&node, KIND_CALL, body, timeout).await;
                outcome(Answered::from_transport(sent))
            };
            self.calls.start(timeout, work, late)
        };
        Ok(started.map_err(|busy| PluginError::Busy(busy.0)))
    }
}

struct Plugins;

impl HasData for Plugins {
    type Data<'a> = &'a mut PluginsCtx;
}

/// Grants `plugins`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<PluginState, Plugins>(linker, |s| &mut s.plugins)
}
