//! One module per WIT interface. Each holds a context (the long-lived state
//! of one plugin instance), implements the generated `Host` trait on it, and
//! has an `add_to_linker` that the capability linker calls only when the
//! plugin was granted that interface.

pub mod calls;
pub mod consensus;
pub mod log;
pub mod membership;
pub mod messaging;
pub mod outbound;
pub mod plugins;
pub mod storage;
pub mod timers;
pub mod wire;

use crate::runtime::bindings::plexus::cluster::types;
use crate::runtime::state::PluginState;

impl types::Host for PluginState {}

/// Adds the type-only `types` interface and `replies`, which every plugin
/// may import.
pub fn add_types_to_linker(
    linker: &mut wasmtime::component::Linker<PluginState>,
) -> wasmtime::Result<()> {
    types::add_to_linker::<PluginState, wasmtime::component::HasSelf<PluginState>>(linker, |s| s)?;
    calls::add_to_linker(linker)
}

/// Limits the host enforces on every plugin's calls.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// Largest log entry.
    pub max_entry_bytes: u32,
    /// Largest storage value.
    pub max_value_bytes: u32,
    /// Largest storage key.
    pub max_key_bytes: u32,
    /// Largest message payload.
    pub max_message_bytes: u32,
    /// Most bytes one hook call may write to storage.
    pub max_txn_bytes: u64,
}

/// Limits of one plugin's calls to other parties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallQuota {
    /// Most calls in flight at once.
    pub max_in_flight: u32,
    /// Largest outbound HTTP response body.
    pub max_response_bytes: u64,
}

impl Default for CallQuota {
    fn default() -> Self {
        CallQuota {
            max_in_flight: 1024,
            max_response_bytes: 4 << 20,
        }
    }
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            max_entry_bytes: 1 << 20,
            max_value_bytes: 1 << 20,
            max_key_bytes: 4 << 10,
            max_message_bytes: 1 << 20,
            max_txn_bytes: 64 << 20,
        }
    }
}

impl CallLimits {
    /// The WIT view of these limits, with a plugin's `quota`.
    pub fn to_wit(self, quota: CallQuota) -> types::Limits {
        types::Limits {
            max_entry_bytes: self.max_entry_bytes,
            max_value_bytes: self.max_value_bytes,
            max_key_bytes: self.max_key_bytes,
            max_message_bytes: self.max_message_bytes,
            max_calls_in_flight: quota.max_in_flight,
            max_response_bytes: quota.max_response_bytes,
        }
    }
}

/// Whether `len` bytes exceed `limit`.
pub(crate) fn over(len: usize, limit: u32) -> bool {
    u32::try_from(len).map_or(true, |l| l > limit)
}
