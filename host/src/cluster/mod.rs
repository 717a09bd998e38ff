//! The cluster layer: the consensus log and node-local storage engines.

pub mod compaction;
pub mod junk;
pub mod local_log;
pub mod log;
pub mod raft;
pub mod secure;
pub mod state_store;
pub mod streams;
pub mod swim;
pub mod transport;
