//! Hot swap: letting the old version finish what it has in flight, then
//! handing its state and its clients to the new one.

use super::*;

/// A swap as the handle sends it to the actor, inside a [`SwapOrder`].
pub(super) struct Swap {
    /// The new, initialised instance.
    pub(super) next: Instance,
    /// Where the outcome goes.
    pub(super) reply: oneshot::Sender<Result<SwapReport, SwapError>>,
}

impl Swap {
    /// The swap inside `order`: every order is built by
    /// [`PluginHandle::swap`], around a [`Swap`].
    pub(super) fn open(order: SwapOrder) -> Swap {
        order.open().expect("a swap order holds a Swap")
    }
}

impl Actor {
    /// Before a local swap: lets the old version finish the writes and
    /// calls it has in flight, so their clients are answered by the code
    /// that accepted them. Bounded by [`DRAIN_LIMIT`].
    pub(super) async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        while tokio::time::Instant::now() < deadline {
            self.collect().await;
            self.adopt();
            let Some(inst) = self.instance.as_ref() else {
                return;
            };
            if !inst.outstanding() {
                return;
            }
            let target = *self.commits.borrow_and_update();
            if target > inst.delivered() {
                self.deliver(target).await;
                continue;
            }
            tokio::select! {
                changed = self.commits.changed(), if self.commits_open => {
                    if changed.is_err() {
                        self.commits_open = false;
                    }
                }
                Some(d) = self.drops.recv() => self.dropped(d),
                Some(done) = self.calls.next(), if !self.calls.is_empty() => {
                    if let Some(done) = done {
                        self.reply(done).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Before a cluster-wide swap, which happens at a fixed place in the
    /// log: lets the old version have the outcomes of its calls (its
    /// writes in flight are handed over). Later entries wait meanwhile.
    /// Bounded by [`DRAIN_LIMIT`].
    pub(super) async fn drain_calls(&mut self) {
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        while tokio::time::Instant::now() < deadline {
            self.collect().await;
            self.adopt();
            let Some(inst) = self.instance.as_ref() else {
                return;
            };
            if inst.store.data().calls.in_flight() == 0 {
                return;
            }
            tokio::select! {
                Some(d) = self.drops.recv() => self.dropped(d),
                Some(done) = self.calls.next(), if !self.calls.is_empty() => {
                    if let Some(done) = done {
                        self.reply(done).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    pub(super) async fn swap(&mut self, mut next: Instance) -> Result<SwapReport, SwapError> {
        let env = self.env.clone();
        let started = Instant::now();
        let Some(old) = self.instance.as_mut() else {
            return Err(SwapError::Call(CallError::Stopped));
        };
        let state = match old.snapshot(&env).await {
            Ok(state) => state,
            Err(e) => {
                self.kill();
                return Err(SwapError::Snapshot(e.to_string()));
            }
        };
        // The new instance was built off the hot path and may have read an
        // older cursor; the old instance's is the truth.
        next.store.data_mut().consensus.delivered = old.delivered();
        next.persisted = old.persisted;
        match next.restore(&env, &state).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(SwapError::Restore(msg)),
            Err(e) => return Err(SwapError::Restore(e.to_string())),
        }
        next.inherit(old);
        let report = SwapReport {
            from: old.prepared.version.clone(),
            to: next.prepared.version.clone(),
            pause_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            state_bytes: state.len(),
        };
        self.install(next, &report);
        tracing::info!(plugin = %env.name, from = %report.from, to = %report.to, pause_us = report.pause_us, "plugin swapped");
        Ok(report)
    }
}
