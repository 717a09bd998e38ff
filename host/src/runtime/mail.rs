//! What goes into a plugin's mailbox.
//!
//! Defined apart from the actor that drains the mailbox, so that the
//! primitives that post into it — a timer firing, a message to the plugin
//! on its own node — depend on this module and not on the actor, which
//! depends on them. A swap carries the new instance, which only the actor
//! knows; here it is a [`SwapOrder`], opaque.

use std::any::Any;
use std::time::Instant;

use tokio::sync::oneshot;

use super::bindings::pattern::{Request, Response};
use super::bindings::types::MemberEvent;

/// Why a call into a plugin did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The mailbox stayed full, or no reply came, within the deadline.
    #[error("plugin did not answer in time")]
    Timeout,
    /// The hook trapped; the instance is being restarted.
    #[error("plugin failed: {0}")]
    Trap(String),
    /// The hook's storage transaction could not be committed.
    #[error("storage commit failed: {0}")]
    Storage(String),
    /// The plugin was unloaded.
    #[error("plugin stopped")]
    Stopped,
}

/// A mailbox item.
pub enum Mail {
    /// A client request.
    Request {
        /// The request.
        req: Request,
        /// How many times it was forwarded to get here.
        hops: u8,
        /// When its client stops waiting.
        deadline: Instant,
        /// Where the response goes.
        reply: oneshot::Sender<Result<Response, CallError>>,
    },
    /// A message from the same plugin on some node.
    Message {
        /// Sender node.
        from: String,
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
        /// Where the reply goes, for requests.
        reply: Option<oneshot::Sender<Result<Option<Vec<u8>>, CallError>>>,
    },
    /// A timer fired.
    Timer {
        /// Instance generation that set it.
        generation: u64,
        /// Timer id.
        id: u64,
        /// Which setting of the id.
        seq: u64,
    },
    /// The membership view changed.
    Membership(Vec<MemberEvent>),
    /// Replace the instance.
    Swap(SwapOrder),
    /// Stop the actor.
    Stop {
        /// Signalled once stopped.
        reply: oneshot::Sender<()>,
    },
}

/// A swap in the mailbox: the new, initialised instance and where the
/// outcome goes, which the actor alone builds and opens. Boxed, so that a
/// mail item stays small; the instance is moved through one allocation,
/// as it must be anyway.
pub struct SwapOrder(Box<dyn Any + Send>);

impl SwapOrder {
    /// Wraps `order` for the mailbox.
    pub(crate) fn new<T: Any + Send>(order: T) -> SwapOrder {
        SwapOrder(Box::new(order))
    }

    /// What [`SwapOrder::new`] wrapped, if it was a `T`.
    pub(crate) fn open<T: Any>(self) -> Option<T> {
        self.0.downcast::<T>().ok().map(|order| *order)
    }
}
