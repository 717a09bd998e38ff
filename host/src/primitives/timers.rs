//! `plexus:cluster/timers`: clocks, and timers that fire through the
//! plugin's mailbox.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use wasmtime::component::{HasData, Linker};

use crate::runtime::actor::Mail;
use crate::runtime::bindings::plexus::cluster::timers as wit;
use crate::runtime::state::PluginState;

const MAX_PENDING: usize = 1024;
const MAX_DELAY_MS: u64 = 24 * 60 * 60 * 1000;

/// One plugin instance's timers. Dropping it cancels them all.
pub struct TimersCtx {
    mailbox: mpsc::WeakSender<Mail>,
    generation: u64,
    started: Instant,
    next_seq: u64,
    pending: HashMap<u64, (u64, AbortHandle)>,
}

impl TimersCtx {
    /// Timers of instance `generation`, delivered into `mailbox`.
    pub fn new(mailbox: mpsc::WeakSender<Mail>, generation: u64) -> Self {
        TimersCtx {
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
        Ok(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
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
