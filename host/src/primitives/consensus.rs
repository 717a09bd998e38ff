//! `plexus:cluster/consensus`: the plugin's stream of the replicated log.
//!
//! The context keeps the plugin's delivery cursor: the index of the last
//! entry of its stream handed to the guest, by `apply` or as the result of
//! `propose` / `read-barrier`. The actor persists the cursor with the hook's
//! storage writes, which is what makes delivery exactly once.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use wasmtime::component::{HasData, Linker};

use super::{CallLimits, over};
pub use crate::cluster::framing::{Control, TAG_CONTROL, TAG_GUEST, TAG_TICKETED, is_control};
use crate::cluster::framing::{TICKET_HEADER, boot, unwrap_entry};
use crate::cluster::log::{ConsensusBackend, Entry, LogError};
use crate::runtime::bindings::plexus::cluster::consensus::{self as wit, ConsensusError};
use crate::runtime::bindings::plexus::cluster::types::CommittedEntry;
use crate::runtime::state::{PluginState, WaitClock};

/// A submission that failed after `submit` returned: its request is
/// answered by the host, and the guest is told to forget the ticket.
#[derive(Debug)]
pub struct Dropped {
    /// The instance that submitted it.
    pub generation: u64,
    /// Its ticket.
    pub ticket: u64,
    /// Why it failed.
    pub error: ConsensusError,
}

/// One plugin instance's consensus context.
pub struct ConsensusCtx {
    stream: String,
    backend: Arc<dyn ConsensusBackend>,
    limits: CallLimits,
    /// Index of the last entry delivered to the guest.
    pub delivered: u64,
    /// Where time spent waiting for the log is counted.
    pub(crate) waited: WaitClock,
    /// The instance this context belongs to.
    generation: u64,
    /// Tickets this instance submitted whose entries are not delivered yet.
    submitted: HashSet<u64>,
    /// Tickets delivered since the actor last collected answers.
    pub(crate) surfaced: Vec<u64>,
    /// Whether `propose` or `read-barrier` handed over a ticketed entry
    /// during the current hook: its answer is collected after the hook.
    pub(crate) owes_answers: bool,
    /// Where failed submissions are reported.
    drops: Option<mpsc::UnboundedSender<Dropped>>,
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
            generation: 0,
            submitted: HashSet::new(),
            surfaced: Vec::new(),
            owes_answers: false,
            drops: None,
        }
    }

    /// Enables `submit`: failures are reported to `drops`, tagged with the
    /// instance's `generation`.
    pub fn with_submissions(
        mut self,
        generation: u64,
        drops: mpsc::UnboundedSender<Dropped>,
    ) -> Self {
        self.generation = generation;
        self.drops = Some(drops);
        self
    }

    /// Whether submissions of this instance are still waiting for their
    /// entries.
    pub fn in_flight(&self) -> usize {
        self.submitted.len()
    }

    /// Whether `ticket` was submitted by this instance and is still
    /// waiting for an answer.
    pub fn knows(&self, ticket: u64) -> bool {
        self.submitted.contains(&ticket) || self.surfaced.contains(&ticket)
    }

    /// Hands this instance's submissions in flight over (to the next
    /// version, at a swap): they are no longer this instance's.
    pub fn take_submitted(&mut self) -> HashSet<u64> {
        std::mem::take(&mut self.submitted)
    }

    /// Takes over submissions of an earlier instance: their entries are
    /// delivered to this one with their tickets set.
    pub fn inherit(&mut self, tickets: impl IntoIterator<Item = u64>) {
        self.submitted.extend(tickets);
    }

    /// Forgets a failed submission. Returns whether it was outstanding.
    pub fn forget(&mut self, ticket: u64) -> bool {
        self.submitted.remove(&ticket)
    }

    /// Converts a stored guest entry to its WIT form, setting `ticket` when
    /// this instance submitted it.
    pub fn surface(&mut self, e: Entry) -> CommittedEntry {
        let (ticket, data) = unwrap_entry(e.data);
        let ticket = ticket.filter(|t| self.submitted.remove(t));
        if let Some(t) = ticket {
            self.surfaced.push(t);
        }
        CommittedEntry {
            index: e.index,
            term: e.term,
            data,
            ticket,
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
        let before = self.surfaced.len();
        let entries: Vec<_> = entries.into_iter().map(|e| self.surface(e)).collect();
        self.owes_answers |= self.surfaced.len() > before;
        Ok(entries)
    }
}

pub(crate) fn next_ticket() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Converts a stored guest entry to its WIT form, with no ticket.
pub fn to_committed(e: Entry) -> CommittedEntry {
    let (_, data) = unwrap_entry(e.data);
    CommittedEntry {
        index: e.index,
        term: e.term,
        data,
        ticket: None,
    }
}

fn to_wit(e: LogError) -> ConsensusError {
    match e {
        LogError::NotLeader(l) => ConsensusError::NotLeader(l),
        LogError::Timeout => ConsensusError::Timeout,
        LogError::ShuttingDown => ConsensusError::ShuttingDown,
        LogError::Storage(s) | LogError::Rejected(s) => ConsensusError::Storage(s),
        // Committed, but this instance is behind a snapshot of its stream:
        // the actor restores it from the snapshot next.
        LogError::Compacted(_) => ConsensusError::Timeout,
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

    fn submit(&mut self, data: Vec<u8>) -> wasmtime::Result<Result<u64, ConsensusError>> {
        if over(data.len(), self.limits.max_entry_bytes) {
            return Ok(Err(ConsensusError::TooLarge(self.limits.max_entry_bytes)));
        }
        let Some(drops) = self.drops.clone() else {
            return Ok(Err(ConsensusError::AccessDenied));
        };
        let ticket = next_ticket();
        let mut tagged = Vec::with_capacity(data.len() + TICKET_HEADER);
        tagged.push(TAG_TICKETED);
        tagged.extend_from_slice(&boot().to_le_bytes());
        tagged.extend_from_slice(&ticket.to_le_bytes());
        tagged.extend_from_slice(&data);
        drop(data);
        let generation = self.generation;
        self.submitted.insert(ticket);
        // Success needs no report: the entry reaches the actor through the
        // stream like any other, carrying its ticket.
        self.backend.submit(
            &self.stream,
            tagged,
            Box::new(move |outcome| {
                if let Err(e) = outcome {
                    let _ = drops.send(Dropped {
                        generation,
                        ticket,
                        error: to_wit(e),
                    });
                }
            }),
        );
        Ok(Ok(ticket))
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
