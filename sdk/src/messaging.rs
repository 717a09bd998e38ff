//! Messages to the same plugin on other nodes.

use crate::NodeId;
use crate::bindings::plexus::cluster::messaging as wit;

pub use wit::MessagingError as Error;

/// Queues `payload` for `node`'s instance of this plugin.
pub fn send(node: &str, topic: &str, payload: &[u8]) -> Result<(), Error> {
    wit::send(node, topic, payload)
}

/// Queues `payload` for every alive member, this node included.
pub fn broadcast(topic: &str, payload: &[u8]) -> Result<u32, Error> {
    wit::broadcast(topic, payload)
}

/// Sends a request and waits for the reply of the receiver's `on_message`.
pub fn request(node: &str, topic: &str, payload: &[u8], timeout_ms: u32) -> Result<Vec<u8>, Error> {
    wit::request(node, topic, payload, timeout_ms)
}

/// This node's id, for addressing replies.
pub fn local_node() -> NodeId {
    crate::membership::local_node()
}
