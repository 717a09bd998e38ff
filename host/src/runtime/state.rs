//! The data of one plugin instance's `Store`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::primitives::calls::Calls;
use crate::primitives::consensus::ConsensusCtx;
use crate::primitives::log::LogCtx;
use crate::primitives::membership::MembershipCtx;
use crate::primitives::messaging::MessagingCtx;
use crate::primitives::outbound::OutboundCtx;
use crate::primitives::plugins::PluginsCtx;
use crate::primitives::storage::StorageCtx;
use crate::primitives::timers::TimersCtx;

/// Everything a plugin instance's host calls work on.
pub struct PluginState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: StoreLimits,
    /// The guest's stderr, for the report of a panic.
    pub(crate) stderr: crate::runtime::stderr::GuestStderr,
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
    /// `plugins` context.
    pub plugins: PluginsCtx,
    /// `outbound-http` context.
    pub outbound: OutboundCtx,
    /// Calls in flight and the answers of the current hook (`replies`).
    pub calls: Calls,
    /// Time the current hook call spent suspended in async host calls.
    pub(crate) waited: WaitClock,
    /// When the current hook call started; the epoch callback compares the
    /// time since, less `waited`, with `cpu_budget`.
    pub(crate) call_started: Instant,
    pub(crate) cpu_budget: Duration,
}

/// Time a hook call spends suspended in async host calls (waiting for a
/// commit, a read index or a peer's reply). The CPU deadline does not
/// count it: a guest waiting on the cluster is not running.
#[derive(Debug, Clone, Default)]
pub struct WaitClock(Arc<AtomicU64>);

impl WaitClock {
    /// Starts a new hook call.
    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// Time waited so far in this call.
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    /// Runs `f`, counting its duration as waiting.
    pub async fn wait<F: std::future::Future>(&self, f: F) -> F::Output {
        let started = Instant::now();
        let out = f.await;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(nanos, Ordering::Relaxed);
        out
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
