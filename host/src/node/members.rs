//! The node's place in the cluster: voter changes and consensus progress.

use std::collections::BTreeSet;

use super::{Node, NodeError};

impl Node {
    /// The membership index by which this node learned it was removed
    /// from the cluster (it no longer campaigns); `None` while a member
    /// or on a single node.
    pub fn removed_at(&self) -> Option<u64> {
        self.raft.as_ref().and_then(|r| r.removed_at())
    }

    /// Adds or removes a voter of the cluster (`plexus cluster join` /
    /// `leave`), through the leader. Returns the voters after the change.
    pub async fn change_members(
        &self,
        change: crate::cluster::raft::MemberChange,
    ) -> Result<BTreeSet<String>, NodeError> {
        let Some(raft) = &self.raft else {
            return Err(NodeError::NotACluster);
        };
        raft.change_members(change)
            .await
            .map_err(NodeError::Members)
    }

    /// The consensus commit index.
    pub fn commit_index(&self) -> u64 {
        self.services.log.commit_index()
    }
}
