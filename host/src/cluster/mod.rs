//! The cluster layer: the consensus log and node-local storage engines.
//!
//! It builds on nothing in `primitives`: the interfaces plugins see sit on
//! top of this layer, never the other way round.

pub mod compaction;
pub mod framing;
pub mod junk;
pub mod local_log;
pub mod log;
pub mod membership;
pub mod raft;
pub mod secure;
pub mod state_store;
pub mod streams;
pub mod swim;
pub mod transport;
