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
use crate::runtime::state::{PluginState, WaitClock};

/// One plugin instance's consensus context.
pub struct ConsensusCtx {
    stream: String,
    backend: Arc<dyn ConsensusBackend>,
    limits: CallLimits,
    /// Index of the last entry delivered to the guest.
    pub delivered: u64,
    /// Where time spent waiting for the log is counted.
    pub(crate) waited: WaitClock,
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
            waited: WaitClock::default(),
        }
    }

    /// Undelivered entries through `through`, advancing the cursor.
    ///
    /// If a host control entry (a cluster-wide swap) lies among them, this
    /// instance must not apply what follows it: nothing is delivered and
    /// the outcome is reported unknown (`timeout`); the plugin actor applies
    /// the entries on both sides of the swap in order.
    fn take_through(&mut self, through: u64) -> Result<Vec<CommittedEntry>, ConsensusError> {
        let entries = self
            .backend
            .entries(&self.stream, self.delivered, through, usize::MAX)
            .map_err(to_wit)?;
        if entries.iter().any(is_control) {
            return Err(ConsensusError::Timeout);
        }
        if let Some(last) = entries.last() {
            self.delivered = last.index;
        }
        self.delivered = self.delivered.max(through);
        Ok(entries.into_iter().map(to_committed).collect())
    }
}

/// First byte of every stored entry: a guest's proposal. Guests cannot
/// write any other tag, so they cannot forge host control entries.
pub const TAG_GUEST: u8 = 0;
/// First byte of a host control entry (see [`Control`]).
pub const TAG_CONTROL: u8 = 1;

/// A host control entry in a plugin's stream, applied by the host at its
/// log index on every node.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Control {
    /// Replace the plugin by this component (and config, when given).
    Swap {
        /// The component's bytes.
        component: Vec<u8>,
        /// New `config` JSON for `init`.
        config: Option<String>,
    },
}

impl Control {
    /// The stored form: the control tag, then the encoded entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![TAG_CONTROL];
        out.extend(postcard::to_allocvec(self).expect("control entries encode"));
        out
    }

    /// Decodes a stored control entry.
    pub fn decode(data: &[u8]) -> Option<Control> {
        match data.split_first() {
            Some((&TAG_CONTROL, rest)) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

/// Whether a stored entry is a host control entry.
pub fn is_control(e: &Entry) -> bool {
    e.data.first() == Some(&TAG_CONTROL)
}

/// Converts a stored guest entry to its WIT form (dropping the tag).
pub fn to_committed(mut e: Entry) -> CommittedEntry {
    if !e.data.is_empty() {
        e.data.remove(0);
    }
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
        let mut tagged = Vec::with_capacity(data.len() + 1);
        tagged.push(TAG_GUEST);
        tagged.extend_from_slice(&data);
        drop(data);
        let index = match self
            .waited
            .wait(self.backend.propose(&self.stream, tagged))
            .await
        {
            Ok(index) => index,
            Err(e) => return Ok(Err(to_wit(e))),
        };
        Ok(self.take_through(index))
    }

    async fn read_barrier(
        &mut self,
    ) -> wasmtime::Result<Result<Vec<CommittedEntry>, ConsensusError>> {
        let index = match self.waited.wait(self.backend.read_index()).await {
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
