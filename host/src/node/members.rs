//! The node's place in the cluster: voter changes, consensus progress,
//! and the summary each node gives of itself to the operator's page.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Node, NodeError};
use crate::cluster::raft::RaftFigures;
use crate::runtime::actor::RunState;

/// Transport kind of a request for a member's [`NodeSummary`], answered
/// with its JSON: self-describing, so that a field added later does not
/// make an older member's answer unreadable.
pub const KIND_SUMMARY: u8 = 24;

/// What a node says about itself, for the operator's page on any member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// Its id.
    pub id: String,
    /// Where its Raft stands (a single node is its own leader).
    pub raft: RaftFigures,
    /// Its commit index, as its `/metrics` gives it: the log index of
    /// the last proposal applied here, which plugins and clients see (one
    /// per proposal; Raft's own indexes count entries, each a batch).
    pub commit_index: u64,
    /// Its plugins, by name.
    pub plugins: Vec<PluginBrief>,
}

/// A plugin as another node's page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginBrief {
    /// Name.
    pub name: String,
    /// Content version of the running component.
    pub version: String,
    /// Life state.
    pub state: RunState,
}

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

impl Node {
    /// What this node says about itself.
    pub fn summary(&self) -> NodeSummary {
        let log = &self.services.log;
        let commit_index = log.commit_index();
        let raft = match &self.raft {
            Some(raft) => raft.figures(),
            None => RaftFigures {
                role: "leader".into(),
                term: log.term(),
                leader: log.leader(),
                last_log_index: Some(commit_index),
                applied_index: Some(commit_index),
                snapshot_index: None,
                quorum_ack_ms: None,
                matched: Vec::new(),
            },
        };
        let plugins = self
            .plugins()
            .into_iter()
            .map(|s| PluginBrief {
                name: s.name,
                version: s.version,
                state: s.state,
            })
            .collect();
        NodeSummary {
            id: self.id.clone(),
            raft,
            commit_index,
            plugins,
        }
    }

    /// Every other member's summary, asked over the cluster all at once,
    /// each within `timeout`: by member id, the summary or why none came.
    /// Empty on a single node.
    pub async fn peer_summaries(
        &self,
        timeout: Duration,
    ) -> Vec<(String, Result<NodeSummary, String>)> {
        let Some(transport) = self.services.transport.clone() else {
            return Vec::new();
        };
        let (_, members) = self.services.view.snapshot();
        let asks = members.into_iter().filter(|m| m.id != self.id).map(|m| {
            let transport = transport.clone();
            async move {
                let answer = transport
                    .request(&m.id, KIND_SUMMARY, Vec::new(), timeout)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|body| {
                        serde_json::from_slice(&body)
                            .map_err(|e| format!("unreadable summary: {e}"))
                    });
                (m.id, answer)
            }
        });
        futures_util::future::join_all(asks).await
    }
}
