//! The data of one plugin instance's `Store`.

use std::time::{Duration, Instant};

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::primitives::consensus::ConsensusCtx;
use crate::primitives::log::LogCtx;
use crate::primitives::membership::MembershipCtx;
use crate::primitives::messaging::MessagingCtx;
use crate::primitives::storage::StorageCtx;
use crate::primitives::timers::TimersCtx;

/// Everything a plugin instance's host calls work on.
pub struct PluginState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: StoreLimits,
    /// `storage` context.
    pub storage: StorageCtx,
    /// `consensus` context.
    pub consensus: ConsensusCtx,
    /// `membership` context.
    pub membership: MembershipCtx,
    /// `messaging` context.
    pub messaging: MessagingCtx,
    /// `timers` context.
    pub timers: TimersCtx,
    /// `log` context.
    pub log: LogCtx,
    /// When the current hook call started; the epoch callback compares it
    /// with `cpu_budget`.
    pub(crate) call_started: Instant,
    pub(crate) cpu_budget: Duration,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
