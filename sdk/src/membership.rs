//! The cluster's members as this node sees them.

use crate::host::membership as wit;
use crate::{Member, NodeId};

/// This node's id.
pub fn local_node() -> NodeId {
    wit::local_node()
}

/// Every known member, ordered by id.
pub fn members() -> Vec<Member> {
    wit::members()
}

/// Grows whenever the view changes.
pub fn epoch() -> u64 {
    wit::epoch()
}
