//! The peer side of plugin traffic: requests, forwards, calls and
//! one-way messages that other nodes send to this node's plugins.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::members::KIND_SUMMARY;
use super::{Node, RequestError};
use crate::cluster::log::BoxFuture;
use crate::cluster::raft::RaftLog;
use crate::cluster::transport::Handler;
use crate::primitives::messaging::{Delivery, Envelope, KIND_MESSAGE, KIND_REQUEST};
use crate::primitives::plugins::Directory;
use crate::primitives::wire::{Forwarded, KIND_CALL, KIND_FORWARD, PluginCall};
use crate::runtime::actor::CallError;
use crate::runtime::bindings::pattern::RequestSource;

/// Routes peer requests to consensus or to plugins.
pub(super) struct PeerHandler {
    pub(super) raft: Arc<RaftLog>,
    pub(super) node: Weak<Node>,
    /// Messages from peers for each plugin, handed to it in the order they
    /// arrived by one task per plugin.
    pub(super) inboxes: Mutex<HashMap<String, tokio::sync::mpsc::Sender<(String, Envelope)>>>,
}

/// Peer messages waiting for one plugin's mailbox. Past it, a message is
/// dropped (messages are at most once).
const INBOX: usize = 8192;

impl Handler for PeerHandler {
    fn request(
        &self,
        from: String,
        kind: u8,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        if kind == KIND_FORWARD || kind == KIND_CALL {
            return self.plugin_request(from, kind, body);
        }
        if kind == KIND_SUMMARY {
            let node = self.node.clone();
            return Box::pin(async move {
                let node = node.upgrade().ok_or("node stopping")?;
                serde_json::to_vec(&node.summary()).map_err(|e| e.to_string())
            });
        }
        if kind != KIND_REQUEST {
            return self.raft.handle(kind, body).unwrap_or_else(|| {
                Box::pin(async move { Err(format!("unknown request kind {kind}")) })
            });
        }
        let node = self.node.clone();
        Box::pin(async move {
            let env: Envelope = postcard::from_bytes(&body)
                .map_err(|e| format!("malformed plugin request: {e}"))?;
            let node = node.upgrade().ok_or("node stopping")?;
            let delivery = match node
                .message(
                    &env.plugin,
                    &from,
                    &env.topic,
                    env.payload,
                    Duration::from_secs(60),
                )
                .await
            {
                Ok(reply) => Delivery::Reply(reply.unwrap_or_default()),
                // In the mailbox or running, but no answer in time: it may
                // still run, or have run.
                Err(e @ RequestError::Call(CallError::Timeout)) => Delivery::Unknown(e.to_string()),
                Err(e) => Delivery::Failed(e.to_string()),
            };
            postcard::to_allocvec(&delivery).map_err(|e| e.to_string())
        })
    }

    fn oneway(&self, from: String, kind: u8, body: Vec<u8>) {
        if kind != KIND_MESSAGE {
            tracing::debug!(%from, kind, "ignoring unknown one-way frame");
            return;
        }
        let Ok(env) = postcard::from_bytes::<Envelope>(&body) else {
            tracing::warn!(%from, "dropping a malformed plugin message");
            return;
        };
        // At most once: a plugin that is not loaded here drops it.
        let Some(node) = self.node.upgrade() else {
            return;
        };
        if node.get(&env.plugin).is_err() {
            return;
        }
        let mut inboxes = self.inboxes.lock().expect("inboxes poisoned");
        let inbox = inboxes.entry(env.plugin.clone()).or_insert_with(|| {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Envelope)>(INBOX);
            let node = self.node.clone();
            tokio::spawn(async move {
                while let Some((from, env)) = rx.recv().await {
                    let Some(node) = node.upgrade() else { return };
                    let _ = node
                        .deliver(&env.plugin, &from, &env.topic, env.payload)
                        .await;
                }
            });
            tx
        });
        if inbox.try_send((from, env)).is_err() {
            tracing::warn!("inbox full; dropped a peer message");
        }
    }
}

impl PeerHandler {
    /// A client request forwarded here, or a plugin's call: the plugin's
    /// answer, or how it failed, is the reply.
    fn plugin_request(
        &self,
        from: String,
        kind: u8,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let node = self.node.clone();
        Box::pin(async move {
            let (plugin, req, hops, timeout_ms) = if kind == KIND_FORWARD {
                let f: Forwarded = postcard::from_bytes(&body)
                    .map_err(|e| format!("malformed forwarded request: {e}"))?;
                let req = f
                    .request
                    .into_request(RequestSource::Forwarded(from.clone()))
                    .ok_or("malformed forwarded request: unknown method")?;
                (f.plugin, req, f.hops, f.timeout_ms)
            } else {
                let c: PluginCall = postcard::from_bytes(&body)
                    .map_err(|e| format!("malformed plugin call: {e}"))?;
                let timeout_ms = c.timeout_ms;
                let (plugin, req) = c
                    .into_request(&from)
                    .ok_or("malformed plugin call: unknown method")?;
                (plugin, req, 0, timeout_ms)
            };
            let node = node.upgrade().ok_or("node stopping")?;
            let timeout = Duration::from_millis(u64::from(timeout_ms.clamp(1, 60_000)));
            let answered = node.plugins.call(&plugin, req, hops, timeout).await;
            Ok(answered.encode())
        })
    }
}
