//! `plexus:cluster/consensus`: the plugin's stream of the replicated log.
//!
//! The context keeps the plugin's delivery cursor: the index of the last
//! entry of its stream handed to the guest, by `apply` or as the result of
//! `propose` / `read-barrier`. The actor persists the cursor with the hook's
//! storage writes, which is what makes delivery exactly once.

use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

use super::{CallLimits, over};
use crate::cluster::log::{ConsensusBackend, Entry, LogError};
use crate::runtime::bindings::plexus::cluster::consensus::{self as wit, ConsensusError};
use crate::runtime::bindings::plexus::cluster::types::CommittedEntry;
use crate::runtime::state::PluginState;

/// One plugin instance's consensus context.
pub struct ConsensusCtx {
    stream: String,
    backend: Arc<dyn ConsensusBackend>,
    limits: CallLimits,
    /// Index of the last entry delivered to the guest.
    pub delivered: u64,
}

impl ConsensusCtx {
    /// A context for `stream`, with entries through `delivered` already
    /// applied.
    pub fn new(
        stream: &str,
        backend: Arc<dyn ConsensusBackend>,
        limits: CallLimits,
        delivered: u64,
    ) -> Self {
        ConsensusCtx {
            stream: stream.to_string(),
            backend,
            limits,
            delivered,
        }
    }

    /// Undelivered entries through `through`, advancing the cursor.
    fn take_through(&mut self, through: u64) -> Result<Vec<CommittedEntry>, ConsensusError> {
        let entries = self
            .backend
            .entries(&self.stream, self.delivered, through, usize::MAX)
            .map_err(to_wit)?;
        if let Some(last) = entries.last() {
            self.delivered = last.index;
        }
        self.delivered = self.delivered.max(through);
        Ok(entries.into_iter().map(to_committed).collect())
    }
}

/// Converts a backend entry to its WIT form.
pub fn to_committed(e: Entry) -> CommittedEntry {
    CommittedEntry {
        index: e.index,
        term: e.term,
        data: e.data,
    }
}

fn to_wit(e: LogError) -> ConsensusError {
    match e {
        LogError::NotLeader(l) => ConsensusError::NotLeader(l),
        LogError::Timeout => ConsensusError::Timeout,
        LogError::ShuttingDown => ConsensusError::ShuttingDown,
        LogError::Storage(s) => ConsensusError::Storage(s),
    }
}

impl wit::Host for ConsensusCtx {
    async fn propose(
        &mut self,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<Vec<CommittedEntry>, ConsensusError>> {
        if over(data.len(), self.limits.max_entry_bytes) {
            return Ok(Err(ConsensusError::TooLarge(self.limits.max_entry_bytes)));
        }
        let index = match self.backend.propose(&self.stream, data).await {
            Ok(index) => index,
            Err(e) => return Ok(Err(to_wit(e))),
        };
        Ok(self.take_through(index))
    }

    async fn read_barrier(
        &mut self,
    ) -> wasmtime::Result<Result<Vec<CommittedEntry>, ConsensusError>> {
        let index = match self.backend.read_index().await {
            Ok(index) => index,
            Err(e) => return Ok(Err(to_wit(e))),
        };
        Ok(self.take_through(index))
    }

    fn leader(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(self.backend.leader())
    }

    fn current_term(&mut self) -> wasmtime::Result<u64> {
        Ok(self.backend.term())
    }

    fn commit_index(&mut self) -> wasmtime::Result<u64> {
        Ok(self.backend.commit_index())
    }
}

struct Consensus;

impl HasData for Consensus {
    type Data<'a> = &'a mut ConsensusCtx;
}

/// Grants `consensus`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<PluginState, Consensus>(linker, |s| &mut s.consensus)
}
