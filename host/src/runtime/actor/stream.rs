//! The plugin's stream of the log: committed entries into `apply`,
//! failed submissions, snapshots taken and installed, and the control
//! entries of cluster-wide swaps.

use super::*;

impl Actor {
    pub(super) async fn deliver(&mut self, target: u64) {
        let batch = self.batch();
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        let from = inst.delivered();
        let entries = match self
            .env
            .services
            .log
            .entries(&self.env.name, from, target, batch)
        {
            Ok(e) => e,
            Err(LogError::Compacted(_)) => {
                self.catch_up().await;
                return;
            }
            Err(e) => {
                tracing::error!(plugin = %self.env.name, "reading committed entries: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        };
        // A host control entry splits the batch: what comes before it is
        // applied by the current version, what comes after by the next.
        let mut entries = entries;
        let mut cut = false;
        if let Some(pos) = entries.iter().position(is_control) {
            if pos == 0 {
                let control = entries.swap_remove(0);
                self.control(control.index, &control.data).await;
                return;
            }
            entries.truncate(pos);
            cut = true;
        }
        let through = if cut || entries.len() >= batch {
            entries.last().map_or(target, |e| e.index)
        } else {
            target
        };
        let consensus = &mut inst.store.data_mut().consensus;
        let entries: Vec<_> = entries.into_iter().map(|e| consensus.surface(e)).collect();
        consensus.delivered = through;
        self.apply(&entries).await;
    }

    /// Takes the plugin's state between two hooks: what `snapshot`
    /// returns, and the storage namespace with its cursor.
    pub(super) async fn capture(&mut self, reply: CaptureReply) {
        let env = self.env.clone();
        let Some(inst) = self.instance.as_mut() else {
            let _ = reply.send(None);
            return;
        };
        if reply.is_closed() {
            return;
        }
        let state = match inst.snapshot(&env).await {
            Ok(state) => state,
            Err(_) => {
                self.kill();
                let _ = reply.send(None);
                return;
            }
        };
        self.succeeded();
        let point = match env.kv(|kv, ns| kv.export(ns)).await {
            Ok((index, items)) => Some(RestorePoint {
                index,
                items,
                state,
                control: None,
            }),
            Err(e) => {
                tracing::warn!(plugin = %env.name, "reading storage for a snapshot: {e}");
                None
            }
        };
        let _ = reply.send(point);
    }

    /// The entries after this instance's cursor were compacted into a
    /// snapshot: replaces the plugin's storage and cursor by the snapshot's
    /// restore point and hands its state to `restore`.
    pub(super) async fn catch_up(&mut self) {
        let env = self.env.clone();
        let point = match env.services.log.restore_point(&env.name) {
            Ok(Some(point)) => point,
            Ok(None) => {
                tracing::error!(plugin = %env.name, "stream compacted, but no restore point is stored");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            Err(e) => {
                tracing::error!(plugin = %env.name, "reading the restore point: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        };
        let Some(from) = self.instance.as_ref().map(|inst| inst.delivered()) else {
            return;
        };
        // A cluster-wide swap inside the compacted part: switch version
        // first, so the state goes to the version that produced it.
        let applied_control = env.status.lock().expect("status poisoned").control_index;
        if let Some((at, data)) = &point.control
            && *at > from
            && *at > applied_control
        {
            self.control(*at, data).await;
        }
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        let index = point.index;
        let items = point.items;
        if let Err(e) = env.kv(move |kv, ns| kv.replace(ns, items, index)).await {
            tracing::error!(plugin = %env.name, "replacing storage from a snapshot: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        // A fresh instance: its `init` sees the restored storage, then
        // `restore` gets the in-memory state.
        let prepared = inst.prepared.clone();
        inst.abandon("the plugin's state was replaced by a consensus snapshot");
        env.update(|s| s.restored_at_index = Some(index));
        tracing::info!(plugin = %env.name, from, to = index, "plugin state restored from a consensus snapshot");
        let next = Instance::start(&env, prepared, self.mailbox.clone(), env.config()).await;
        let mut next = match next {
            Ok(next) => next,
            Err(e) => {
                // The restart after the backoff starts from the restored
                // storage too.
                tracing::warn!(plugin = %env.name, "starting on the snapshot's state: {e}");
                self.kill();
                return;
            }
        };
        let restored = next.restore(&env, &point.state).await;
        self.instance = Some(next);
        match restored {
            Ok(Ok(())) => self.succeeded(),
            Ok(Err(msg)) => {
                // Storage is already the snapshot's; a fresh instance starts
                // from it without the in-memory part.
                tracing::warn!(plugin = %env.name, "restore refused the snapshot's state: {msg}");
                self.kill();
            }
            Err(_) => self.kill(),
        }
    }

    /// Collects the answers owed for ticketed entries that `propose` or
    /// `read-barrier` handed over during the last hook, with an `apply`
    /// of no entries.
    pub(super) async fn collect(&mut self) {
        if self
            .instance
            .as_ref()
            .is_some_and(|inst| inst.store.data().consensus.owes_answers)
        {
            self.apply(&[]).await;
        }
    }

    /// Calls `apply` with `entries` (already surfaced and delivered) and
    /// the dropped tickets, and routes the answers it returns.
    pub(super) async fn apply(&mut self, entries: &[CommittedEntry]) {
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        inst.store.data_mut().consensus.owes_answers = false;
        let dropped = std::mem::take(&mut inst.dropped);
        let index = inst.delivered();
        match hook!(inst, self.env, "apply", call_apply(entries, &dropped); index) {
            Ok(()) => {
                inst.route();
                self.succeeded();
                self.suspect = None;
            }
            Err(e) => {
                self.kill();
                let first = entries.first().map_or(index, |e| e.index);
                let why = match e {
                    CallError::Trap(why) => why,
                    other => other.to_string(),
                };
                self.suspected(first, entries.len() == 1, &why);
            }
        }
    }

    /// How many entries to hand to one `apply`: one at a time while an
    /// entry is suspected of making it fail.
    pub(super) fn batch(&self) -> usize {
        if self.suspect.is_some() {
            1
        } else {
            APPLY_BATCH
        }
    }

    /// `apply` failed on a run starting at `first` (that entry alone when
    /// `alone`). The same entry failing alone [`APPLY_ATTEMPTS`] times in a
    /// row marks the plugin failed at its index instead of restarting it
    /// for ever: every node applies that entry, so it will fail the same
    /// way until a version that handles it is swapped in.
    fn suspected(&mut self, first: u64, alone: bool, why: &str) {
        let count = match self.suspect {
            Some((index, n)) if index == first && alone => n + 1,
            _ if alone => 1,
            _ => 0,
        };
        self.suspect = Some((first, count));
        if count < APPLY_ATTEMPTS {
            return;
        }
        let name = &self.env.name;
        let msg = format!(
            "failed at index {first}: {why}. The entry is committed and every node applies it, \
             so it failed {count} times in a row; no instance runs until a version whose apply \
             handles it is swapped in (`plexus plugin swap {name} FILE`; the same file retries)"
        );
        tracing::error!(plugin = %name, index = first, "{msg}");
        self.failed = Some(msg.clone());
        self.env.failure(msg, |s| s.state = RunState::Failed);
    }

    /// Waits, with no instance, for a swap or a stop; answers requests with
    /// why the plugin failed. Returns false when told to stop.
    pub(super) async fn wait_failed(&mut self) -> bool {
        for mail in std::mem::take(&mut self.deferred) {
            refuse_failed(self, mail);
        }
        match self.idle(None, refuse_failed).await {
            Idle::Woke | Idle::SwappedIn => {
                self.failed = None;
                true
            }
            Idle::Stopped => false,
        }
    }

    /// A submission failed: answer its request and tell the guest with
    /// the next `apply`.
    pub(super) fn dropped(&mut self, d: Dropped) {
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        let mine = inst.generation == d.generation || inst.inherited.remove(&d.ticket);
        if !mine || !inst.store.data_mut().consensus.forget(d.ticket) {
            return;
        }
        inst.dropped.push(d.ticket);
        if let Some(w) = inst.waiting.remove(&d.ticket) {
            use crate::runtime::bindings::plexus::cluster::consensus::ConsensusError as E;
            let (status, msg) = match &d.error {
                E::Timeout => (504, "outcome unknown: no quorum before the deadline".into()),
                E::ShuttingDown => (504, "outcome unknown: the node is stopping".into()),
                E::NotLeader(l) => (
                    503,
                    format!("no leader could take the write (last known: {l:?})"),
                ),
                E::TooLarge(max) => (503, format!("entry larger than {max} bytes")),
                E::AccessDenied => (503, "consensus not granted".into()),
                E::Storage(e) => (503, format!("log store failed: {e}")),
            };
            let _ = w.send(Ok(error_response(status, &msg)));
        }
    }

    /// Applies a host control entry at `index`: a cluster-wide swap. Every
    /// node reaches it at the same point of the plugin's stream; a node that
    /// cannot load the new version keeps the old one and reports it.
    pub(super) async fn control(&mut self, index: u64, data: &[u8]) {
        let env = self.env.clone();
        let before = env.status.lock().expect("status poisoned").version.clone();
        let outcome = match Control::decode(data) {
            None => Err("undecodable control entry".to_string()),
            Some(Control::Swap { component, config }) => {
                self.drain_calls().await;
                self.cluster_swap(component, config).await
            }
        };
        match &outcome {
            Ok(report) => {
                tracing::info!(plugin = %env.name, index, from = %report.from, to = %report.to, pause_us = report.pause_us, "cluster-wide swap applied")
            }
            Err(e) => {
                tracing::error!(plugin = %env.name, index, "cluster-wide swap failed here; the old version keeps serving: {e}")
            }
        }
        // Who asked is known on the node that proposed it, which names
        // itself once it sees the index (`Journal::asked`).
        env.services.journal.swap(SwapRecord {
            at_ms: now_ms(),
            plugin: env.name.clone(),
            from: before,
            to: outcome.as_ref().ok().map(|r| r.to.clone()),
            pause_us: outcome.as_ref().map_or(0, |r| r.pause_us),
            state_bytes: outcome.as_ref().map_or(0, |r| r.state_bytes),
            scope: SwapScope::Cluster,
            index: Some(index),
            by: "log".into(),
            error: outcome.as_ref().err().cloned(),
        });
        env.update(|s| {
            s.control_index = index;
            if let Err(e) = &outcome {
                s.last_error = Some(format!("cluster-wide swap at index {index} failed: {e}"));
            } else {
                s.swapped_at_index = Some(index);
            }
        });
        if let Some(inst) = self.instance.as_mut() {
            inst.store.data_mut().consensus.delivered = index;
        }
    }

    pub(super) async fn cluster_swap(
        &mut self,
        component: Vec<u8>,
        config: Option<String>,
    ) -> Result<SwapReport, String> {
        let env = self.env.clone();
        let runtime = env.services.runtime.clone();
        let caps = env.capabilities.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            crate::runtime::prepare(&runtime, &component, &caps)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let config = config.unwrap_or_else(|| env.config());
        let next = Instance::start(&env, prepared, self.mailbox.clone(), config)
            .await
            .map_err(|e| e.to_string())?;
        self.swap(next).await.map_err(|e| e.to_string())
    }
}

/// Answers mail for a failed plugin: requests get why it failed. Timers,
/// messages and membership were for instances that are gone; the next one
/// starts afresh.
fn refuse_failed(actor: &mut Actor, mail: Mail) {
    let why = actor.failed.clone().unwrap_or_default();
    match mail {
        Mail::Request { reply, .. } => {
            let _ = reply.send(Err(CallError::Trap(why)));
        }
        Mail::Message {
            reply: Some(reply), ..
        } => {
            let _ = reply.send(Err(CallError::Trap(why)));
        }
        _ => {}
    }
}
