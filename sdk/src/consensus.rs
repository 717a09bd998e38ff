//! The replicated log: propose entries, read linearizably.
//!
//! [`propose`] returns the [`Pattern::Output`] of applying the proposed
//! entry, after applying every earlier undelivered entry of the stream, so a
//! request handler can answer with the result of its own command.

use serde::Serialize;

use crate::bindings::plexus::cluster::consensus as wit;
use crate::{CommittedEntry, NodeId, Pattern};

pub use wit::ConsensusError as Error;

/// The outcome of a committed proposal.
#[derive(Debug)]
pub struct Committed<O> {
    /// Index of the proposed entry in the log.
    pub index: u64,
    /// What [`Pattern::apply`] returned for it.
    pub output: O,
}

/// Proposes raw bytes and applies, through `pattern`, every entry the host
/// hands back. Returns once the entry is committed and applied.
pub fn propose_raw<P: Pattern>(
    pattern: &mut P,
    data: &[u8],
) -> Result<Committed<P::Output>, Error> {
    let entries = wit::propose(data)?;
    let mut last = None;
    for entry in entries {
        let index = entry.index;
        let output = pattern.apply(entry);
        last = Some(Committed { index, output });
    }
    // The host always ends the list with the proposed entry; an empty list
    // would be a host bug, reported as a storage failure rather than a panic.
    last.ok_or_else(|| Error::Storage("host returned no committed entry".into()))
}

/// Encodes `command` with [`crate::codec`] and proposes it.
pub fn propose<P: Pattern, C: Serialize + ?Sized>(
    pattern: &mut P,
    command: &C,
) -> Result<Committed<P::Output>, Error> {
    propose_raw(pattern, &crate::codec::encode(command))
}

/// Waits for a linearizable read point and applies what the host hands back.
/// After it returns, local state reflects every write committed before the
/// call.
pub fn read_barrier<P: Pattern>(pattern: &mut P) -> Result<(), Error> {
    for entry in wit::read_barrier()? {
        pattern.apply(entry);
    }
    Ok(())
}

/// The leader this node knows of.
pub fn leader() -> Option<NodeId> {
    wit::leader()
}

/// The current term.
pub fn term() -> u64 {
    wit::current_term()
}

/// Index of the last committed entry known on this node.
pub fn commit_index() -> u64 {
    wit::commit_index()
}

/// Decodes an entry's data with [`crate::codec`].
pub fn decode<T: serde::de::DeserializeOwned>(
    entry: &CommittedEntry,
) -> Result<T, crate::codec::CodecError> {
    crate::codec::decode(&entry.data)
}
