//! `plexus:cluster/messaging`: messages between instances of one plugin.
//!
//! Messages to this node queue into the plugin's own mailbox; messages to
//! other members go over the peer transport to the same plugin there, in
//! the order sent (one outbox per destination). A `request` to the node
//! itself is refused with `loopback` (the instance that would answer is
//! the caller).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use wasmtime::component::{HasData, Linker};

use super::calls::{Calls, clamp_timeout};
use super::membership::MembershipView;
use super::{CallLimits, over};
use crate::cluster::transport::{PeerLinks, TransportError};
use crate::runtime::bindings::plexus::cluster::messaging as wit;
use crate::runtime::bindings::plexus::cluster::types::{CallOutcome, MessagingError};
use crate::runtime::mail::{CallError, Mail};
use crate::runtime::state::{PluginState, WaitClock};

/// One plugin instance's messaging context.
pub struct MessagingCtx {
    mailbox: mpsc::WeakSender<Mail>,
    view: Arc<MembershipView>,
    limits: CallLimits,
    remote: Option<Remote>,
    waited: WaitClock,
    calls: Calls,
    /// Messages to each node, sent in order by one task per node.
    outboxes: HashMap<String, mpsc::Sender<Vec<u8>>>,
}

/// Messages to one node waiting for the transport. Past it, a message is
/// dropped (messages are at most once).
const OUTBOX: usize = 4096;

/// How a plugin reaches its peers on other nodes.
#[derive(Clone)]
pub struct Remote {
    /// The node's transport.
    pub transport: Arc<dyn PeerLinks>,
    /// The plugin's name, which addresses it on every node.
    pub plugin: String,
}

/// Transport kind of a one-way plugin message.
pub const KIND_MESSAGE: u8 = 20;
/// Transport kind of a plugin request.
pub const KIND_REQUEST: u8 = 21;

/// The body of a plugin message or request between nodes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    /// The plugin it is for (and from).
    pub plugin: String,
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// How a plugin request ended on the receiving node: the body of the
/// transport's reply to a plugin request.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Delivery {
    /// The receiver's `on-message` returned this reply.
    Reply(Vec<u8>),
    /// The handler did not complete (no such plugin there, it trapped, or it
    /// was stopped). Definite.
    Failed(String),
    /// The handler may have run: it did not answer in time. Unknown
    /// outcome.
    Unknown(String),
}

impl MessagingCtx {
    /// A context delivering local messages into `mailbox` and, in a
    /// cluster, others through `remote`.
    pub fn new(
        mailbox: mpsc::WeakSender<Mail>,
        view: Arc<MembershipView>,
        limits: CallLimits,
        remote: Option<Remote>,
        waited: WaitClock,
        calls: Calls,
    ) -> Self {
        MessagingCtx {
            mailbox,
            view,
            limits,
            remote,
            waited,
            calls,
            outboxes: HashMap::new(),
        }
    }

    /// Sends to another node without waiting: at most once.
    fn deliver_remote(&mut self, node: String, topic: String, payload: Vec<u8>) {
        let Some(remote) = &self.remote else {
            return;
        };
        let body = postcard::to_allocvec(&Envelope {
            plugin: remote.plugin.clone(),
            topic,
            payload,
        })
        .unwrap_or_default();
        let outbox = self.outboxes.entry(node.clone()).or_insert_with(|| {
            // One sender per destination keeps this instance's messages
            // to it in order; it ends when the instance goes.
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUTBOX);
            let transport = remote.transport.clone();
            tokio::spawn(async move {
                while let Some(body) = rx.recv().await {
                    if let Err(e) = transport.send(&node, KIND_MESSAGE, body).await {
                        tracing::debug!("message to {node} dropped: {e}");
                    }
                }
            });
            tx
        });
        if outbox.try_send(body).is_err() {
            tracing::warn!("outbox full; dropped a message");
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
        if node == self.view.local() {
            self.deliver_local(topic, payload);
        } else {
            self.deliver_remote(node, topic, payload);
        }
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
        let (_, members) = self.view.snapshot();
        let mut sent = 0;
        for m in members {
            if m.state == crate::runtime::bindings::plexus::cluster::types::MemberState::Dead {
                continue;
            }
            sent += 1;
            if m.id == self.view.local() {
                self.deliver_local(topic.clone(), payload.clone());
            } else {
                self.deliver_remote(m.id, topic.clone(), payload.clone());
            }
        }
        Ok(Ok(sent))
    }

    async fn request(
        &mut self,
        node: String,
        topic: String,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, MessagingError>> {
        if let Err(e) = self.check(&node, &payload) {
            return Ok(Err(e));
        }
        if node == self.view.local() {
            return Ok(Err(MessagingError::Loopback));
        }
        let Some(remote) = self.remote.clone() else {
            return Ok(Err(MessagingError::UnknownNode(node)));
        };
        let timeout = clamp_timeout(timeout_ms);
        let body = postcard::to_allocvec(&Envelope {
            plugin: remote.plugin,
            topic,
            payload,
        })
        .unwrap_or_default();
        let sent = self
            .waited
            .wait(remote.transport.request(&node, KIND_REQUEST, body, timeout))
            .await;
        Ok(outcome(sent, node, self.limits.max_message_bytes))
    }

    fn call(
        &mut self,
        node: String,
        topic: String,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<u64, MessagingError>> {
        if let Err(e) = self.check(&node, &payload) {
            return Ok(Err(e));
        }
        let timeout = clamp_timeout(timeout_ms);
        let late = CallOutcome::Message(Err(MessagingError::Timeout));
        let started = if node == self.view.local() {
            let Some(tx) = self.mailbox.upgrade() else {
                return Ok(Err(MessagingError::NoHandler));
            };
            let (reply, rx) = tokio::sync::oneshot::channel();
            let mail = Mail::Message {
                from: node,
                topic,
                payload,
                reply: Some(reply),
            };
            if tx.try_send(mail).is_err() {
                // The plugin's own mailbox is full: nothing was queued.
                return Ok(Err(MessagingError::NoHandler));
            }
            let work = async move {
                CallOutcome::Message(match rx.await {
                    Ok(Ok(reply)) => Ok(reply.unwrap_or_default()),
                    Ok(Err(CallError::Timeout)) => Err(MessagingError::Timeout),
                    _ => Err(MessagingError::NoHandler),
                })
            };
            self.calls.start(timeout, work, late)
        } else {
            let Some(remote) = self.remote.clone() else {
                return Ok(Err(MessagingError::UnknownNode(node)));
            };
            let body = postcard::to_allocvec(&Envelope {
                plugin: remote.plugin,
                topic,
                payload,
            })
            .unwrap_or_default();
            let max = self.limits.max_message_bytes;
            let work = async move {
                let sent = remote
                    .transport
                    .request(&node, KIND_REQUEST, body, timeout)
                    .await;
                CallOutcome::Message(outcome(sent, node, max))
            };
            self.calls.start(timeout, work, late)
        };
        Ok(started.map_err(|busy| MessagingError::Busy(busy.0)))
    }
}

/// What a plugin request's transport result means to the plugin: a
/// definite failure only where the receiver's handler surely did not
/// complete, an unknown outcome (`timeout`) wherever it may have.
fn outcome(
    sent: Result<Vec<u8>, TransportError>,
    node: String,
    max_message_bytes: u32,
) -> Result<Vec<u8>, MessagingError> {
    match sent {
        Ok(reply) => match postcard::from_bytes::<Delivery>(&reply) {
            Ok(Delivery::Reply(bytes)) => Ok(bytes),
            Ok(Delivery::Failed(_)) => Err(MessagingError::NoHandler),
            // Garbled on the way: whether it ran is not known.
            Ok(Delivery::Unknown(_)) | Err(_) => Err(MessagingError::Timeout),
        },
        // Sent, and maybe handled.
        Err(TransportError::Timeout(_) | TransportError::Lost(_)) => Err(MessagingError::Timeout),
        Err(TransportError::TooLarge(_)) => Err(MessagingError::TooLarge(max_message_bytes)),
        // Never sent: no connection could be made.
        Err(TransportError::Unreachable(..) | TransportError::UnknownPeer(_)) => {
            Err(MessagingError::UnknownNode(node))
        }
        // The receiver refused it before any plugin saw it.
        Err(TransportError::Remote(..)) => Err(MessagingError::NoHandler),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(d: Delivery) -> Result<Vec<u8>, TransportError> {
        Ok(postcard::to_allocvec(&d).unwrap())
    }

    #[test]
    fn a_connection_lost_after_sending_is_an_unknown_outcome_not_no_handler() {
        let lost = outcome(Err(TransportError::Lost("b".into())), "b".into(), 9);
        assert!(matches!(lost, Err(MessagingError::Timeout)), "{lost:?}");
        let late = outcome(Err(TransportError::Timeout("b".into())), "b".into(), 9);
        assert!(matches!(late, Err(MessagingError::Timeout)), "{late:?}");
        // The receiver's plugin took the request but did not answer in time.
        let busy = outcome(delivered(Delivery::Unknown("busy".into())), "b".into(), 9);
        assert!(matches!(busy, Err(MessagingError::Timeout)), "{busy:?}");
        let garbled = outcome(Ok(vec![0xff; 3]), "b".into(), 9);
        assert!(
            matches!(garbled, Err(MessagingError::Timeout)),
            "{garbled:?}"
        );
    }

    #[test]
    fn only_failures_before_the_handler_completed_are_definite() {
        let never_sent = outcome(
            Err(TransportError::Unreachable("b".into(), "refused".into())),
            "b".into(),
            9,
        );
        assert!(matches!(never_sent, Err(MessagingError::UnknownNode(ref n)) if n == "b"));
        let trapped = outcome(delivered(Delivery::Failed("trap".into())), "b".into(), 9);
        assert!(
            matches!(trapped, Err(MessagingError::NoHandler)),
            "{trapped:?}"
        );
        let ok = outcome(delivered(Delivery::Reply(b"hi".to_vec())), "b".into(), 9);
        assert_eq!(ok.unwrap(), b"hi");
        let big = outcome(Err(TransportError::TooLarge(10)), "b".into(), 9);
        assert!(matches!(big, Err(MessagingError::TooLarge(9))), "{big:?}");
    }
}
