//! `plexus:cluster/timers`: clocks, and timers that fire through the
//! plugin's mailbox.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use wasmtime::component::{HasData, Linker};

use crate::runtime::bindings::plexus::cluster::timers as wit;
use crate::runtime::mail::Mail;
use crate::runtime::state::PluginState;

const MAX_PENDING: usize = 1024;
const MAX_DELAY_MS: u64 = 24 * 60 * 60 * 1000;

/// The wall clock plugins read through `now-ms`.
///
/// To be correct, an implementation must answer from any thread without
/// blocking. It need not be monotonic (a wall clock may step); plugins use
/// `monotonic-ms` for durations. Timer delays do not come from this clock:
/// they run on the runtime's timer, so a test that steps a
/// [`ManualClock`] changes what plugins read, not when timers fire.
pub trait Clock: Send + Sync + Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A wall clock that moves only when told to: tests of time-dependent
/// plugin logic (lease expiry, say) that must not depend on how fast a
/// loaded machine runs them.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicU64::new(start_ms)))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// One plugin instance's timers. Dropping it cancels them all.
pub struct TimersCtx {
    clock: Arc<dyn Clock>,
    mailbox: mpsc::WeakSender<Mail>,
    generation: u64,
    started: Instant,
    next_seq: u64,
    pending: HashMap<u64, (u64, AbortHandle)>,
}

impl TimersCtx {
    /// Timers of instance `generation`, delivered into `mailbox`, with
    /// `now-ms` read from `clock`.
    pub fn new(clock: Arc<dyn Clock>, mailbox: mpsc::WeakSender<Mail>, generation: u64) -> Self {
        TimersCtx {
            clock,
            mailbox,
            generation,
            started: Instant::now(),
            next_seq: 0,
            pending: HashMap::new(),
        }
    }

    /// Called when a timer's mail arrives: whether it is still the pending
    /// one for `id` (not cancelled or replaced since), removing it if so.
    pub fn take_fired(&mut self, generation: u64, id: u64, seq: u64) -> bool {
        if generation != self.generation {
            return false;
        }
        match self.pending.get(&id) {
            Some((s, _)) if *s == seq => {
                self.pending.remove(&id);
                true
            }
            _ => false,
        }
    }
}

impl Drop for TimersCtx {
    fn drop(&mut self) {
        for (_, (_, handle)) in self.pending.drain() {
            handle.abort();
        }
    }
}

impl wit::Host for TimersCtx {
    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(self.clock.now_ms())
    }

    fn monotonic_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn set_timer(&mut self, id: u64, delay_ms: u64) -> wasmtime::Result<bool> {
        if !self.pending.contains_key(&id) && self.pending.len() >= MAX_PENDING {
            return Ok(false);
        }
        if let Some((_, old)) = self.pending.remove(&id) {
            old.abort();
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        let generation = self.generation;
        let mailbox = self.mailbox.clone();
        let delay = Duration::from_millis(delay_ms.min(MAX_DELAY_MS));
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(tx) = mailbox.upgrade() {
                let _ = tx
                    .send(Mail::Timer {
                        generation,
                        id,
                        seq,
                    })
                    .await;
            }
        });
        self.pending.insert(id, (seq, task.abort_handle()));
        Ok(true)
    }

    fn cancel_timer(&mut self, id: u64) -> wasmtime::Result<bool> {
        Ok(match self.pending.remove(&id) {
            Some((_, handle)) => {
                handle.abort();
                true
            }
            None => false,
        })
    }
}

struct Timers;

impl HasData for Timers {
    type Data<'a> = &'a mut TimersCtx;
}

/// Grants `timers`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<PluginState, Timers>(linker, |s| &mut s.timers)
}
