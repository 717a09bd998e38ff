//! openraft's network: its RPCs as requests over the peer transport, one
//! [`Connection`] per peer it talks to.

use std::sync::Arc;

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::{Names, NodeId, TypeConfig, dec, enc, kind};
use crate::cluster::transport::{Transport, TransportError};

/// Raft RPCs over the peer transport.
#[derive(Clone)]
pub struct Network {
    pub(super) transport: Arc<Transport>,
    pub(super) names: Names,
}

/// A connection to one peer.
pub struct Connection {
    transport: Arc<Transport>,
    target: NodeId,
    name: Option<String>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection {
            transport: self.transport.clone(),
            target,
            name: self
                .names
                .read()
                .expect("names poisoned")
                .get(&target)
                .cloned(),
        }
    }
}

impl Connection {
    async fn call<
        Req: Serialize,
        Resp: for<'de> Deserialize<'de>,
        E: std::error::Error + for<'de> Deserialize<'de>,
    >(
        &self,
        kind: u8,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        let Some(name) = &self.name else {
            return Err(RPCError::Network(NetworkError::new(
                &TransportError::UnknownPeer(self.target.to_string()),
            )));
        };
        let bytes = self
            .transport
            .request(name, kind, enc(req), option.hard_ttl())
            .await
            .map_err(|e| match e {
                TransportError::Timeout(_)
                | TransportError::Lost(_)
                | TransportError::Unreachable(..) => {
                    RPCError::Unreachable(openraft::error::Unreachable::new(&e))
                }
                other => RPCError::Network(NetworkError::new(&other)),
            })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            dec(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(kind::APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(kind::SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(kind::VOTE, &rpc, &option).await
    }
}
