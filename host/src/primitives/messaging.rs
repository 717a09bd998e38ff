//! `plexus:cluster/messaging`: messages between instances of one plugin.
//!
//! On a single node every message is local: `send` and `broadcast` queue
//! into the plugin's own mailbox, and `request` to the node itself is
//! refused with `loopback` (the instance that would answer is the caller).

use std::sync::Arc;

use tokio::sync::mpsc;
use wasmtime::component::{HasData, Linker};

use super::membership::MembershipView;
use super::{CallLimits, over};
use crate::runtime::actor::Mail;
use crate::runtime::bindings::plexus::cluster::messaging::{self as wit, MessagingError};
use crate::runtime::state::PluginState;

/// One plugin instance's messaging context.
pub struct MessagingCtx {
    mailbox: mpsc::WeakSender<Mail>,
    view: Arc<MembershipView>,
    limits: CallLimits,
}

impl MessagingCtx {
    /// A context delivering local messages into `mailbox`.
    pub fn new(
        mailbox: mpsc::WeakSender<Mail>,
        view: Arc<MembershipView>,
        limits: CallLimits,
    ) -> Self {
        MessagingCtx {
            mailbox,
            view,
            limits,
        }
    }

    fn check(&self, node: &str, payload: &[u8]) -> Result<(), MessagingError> {
        if over(payload.len(), self.limits.max_message_bytes) {
            return Err(MessagingError::TooLarge(self.limits.max_message_bytes));
        }
        if !self.view.is_reachable(node) {
            return Err(MessagingError::UnknownNode(node.to_string()));
        }
        Ok(())
    }

    /// Queues a message for the local instance. At most once: a full
    /// mailbox drops it, with a warning.
    fn deliver_local(&self, topic: String, payload: Vec<u8>) {
        let Some(tx) = self.mailbox.upgrade() else {
            return;
        };
        let mail = Mail::Message {
            from: self.view.local().to_string(),
            topic,
            payload,
            reply: None,
        };
        if tx.try_send(mail).is_err() {
            tracing::warn!("mailbox full; dropped a local message");
        }
    }
}

impl wit::Host for MessagingCtx {
    fn send(
        &mut self,
        node: String,
        topic: String,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<(), MessagingError>> {
        if let Err(e) = self.check(&node, &payload) {
            return Ok(Err(e));
        }
        // Every reachable member is this node until the cluster transport
        // arrives.
        self.deliver_local(topic, payload);
        Ok(Ok(()))
    }

    fn broadcast(
        &mut self,
        topic: String,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<u32, MessagingError>> {
        if over(payload.len(), self.limits.max_message_bytes) {
            return Ok(Err(MessagingError::TooLarge(self.limits.max_message_bytes)));
        }
        self.deliver_local(topic, payload);
        Ok(Ok(1))
    }

    async fn request(
        &mut self,
        node: String,
        _topic: String,
        payload: Vec<u8>,
        _timeout_ms: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, MessagingError>> {
        if let Err(e) = self.check(&node, &payload) {
            return Ok(Err(e));
        }
        Ok(Err(MessagingError::Loopback))
    }
}

struct Messaging;

impl HasData for Messaging {
    type Data<'a> = &'a mut MessagingCtx;
}

/// Grants `messaging`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<PluginState, Messaging>(linker, |s| &mut s.messaging)
}
