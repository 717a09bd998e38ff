//! One live instance of a plugin: its store, wired to the node's
//! services, and its hook calls, each committing or discarding its
//! storage writes and what it said to clients.

use super::*;
use crate::runtime::stderr::GuestStderr;

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a hook failed, in words: the guest's own panic report when it
/// left one on stderr.
pub(super) fn describe(
    hook: &str,
    e: &wasmtime::Error,
    limits: &PluginLimits,
    panic: Option<String>,
) -> String {
    let cause = match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => {
            format!("exceeded its CPU deadline of {} ms", limits.cpu.as_millis())
        }
        Some(Trap::UnreachableCodeReached) => match panic {
            Some(report) => report,
            None => "trapped: unreachable executed (the guest panicked or aborted)".into(),
        },
        Some(trap) => format!("trapped: {trap}"),
        None => {
            let root = e.root_cause().to_string();
            if root.contains("memory") {
                format!(
                    "exceeded its memory cap of {} MiB ({root})",
                    limits.memory_bytes >> 20
                )
            } else {
                root
            }
        }
    };
    format!("{hook}: {cause}")
}

/// A store for one instance of plugin `name`: its WASI context (no files,
/// sockets or environment; stderr logged line by line), its limits, and the
/// contexts of every interface, wired to `services`. Timers, local messages
/// and failed submissions go to `channels`, tagged with `generation`;
/// `applied` is the plugin's delivery cursor in the log.
#[allow(clippy::too_many_arguments)]
pub fn new_store(
    prepared: &Prepared,
    name: &str,
    services: &Services,
    limits: &PluginLimits,
    access: &Access,
    channels: Channels,
    generation: u64,
    applied: u64,
) -> Store<PluginState> {
    let Channels { mailbox, drops } = channels;
    let calls = Calls::new(generation, limits.quota.max_in_flight);
    let waited = WaitClock::default();
    let mut consensus =
        ConsensusCtx::new(name, services.log.clone(), services.call_limits, applied)
            .with_submissions(generation, drops);
    consensus.waited = waited.clone();
    let stderr = GuestStderr::new(name, &prepared.version);
    let state = PluginState {
        wasi: WasiCtxBuilder::new().stderr(stderr.clone()).build(),
        stderr,
        table: ResourceTable::new(),
        limits: StoreLimitsBuilder::new()
            .memory_size(usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX))
            .trap_on_grow_failure(true)
            .build(),
        storage: StorageCtx::new(name, services.kv.clone(), services.call_limits),
        consensus,
        membership: MembershipCtx::new(services.view.clone()),
        messaging: MessagingCtx::new(
            mailbox.clone(),
            services.view.clone(),
            services.call_limits,
            services.transport.clone().map(|transport| Remote {
                transport,
                plugin: name.to_string(),
            }),
            waited.clone(),
            calls.clone(),
        ),
        timers: TimersCtx::new(services.clock.clone(), mailbox, generation),
        log: LogCtx::new(name, &prepared.version),
        plugins: PluginsCtx::new(
            calls.clone(),
            name,
            access.plugins.clone(),
            services.directory.clone(),
            services.view.clone(),
            services.transport.clone(),
            services.call_limits,
        ),
        outbound: OutboundCtx::new(
            calls.clone(),
            services.http.clone(),
            access.outbound.clone(),
            limits.quota.max_response_bytes,
        ),
        calls,
        waited,
        call_started: Instant::now(),
        cpu_budget: limits.cpu,
    };
    let mut store = Store::new(prepared.pre.engine(), state);
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_callback(|ctx| {
        let data = ctx.data();
        if data
            .call_started
            .elapsed()
            .saturating_sub(data.waited.waited())
            > data.cpu_budget
        {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store.set_epoch_deadline(1);
    store
}

/// Why an instance could not be made; when the engine's pool is full, in
/// words that say which setting to change.
fn instantiation_failed(e: &wasmtime::Error, slots: usize) -> LoadError {
    let detail = format!("{e:#}");
    LoadError::Init(if detail.contains("maximum concurrent") {
        format!(
            "no room for another plugin instance: this node holds at most {slots} at once \
             (node.max_plugin_instances; a plugin holds one, two while it is swapped); \
             raise it or unload plugins ({detail})"
        )
    } else {
        format!("instantiation failed: {detail}")
    })
}

impl Instance {
    /// Instantiates `prepared` and runs `init` with `config_json` and the
    /// first membership event. Nothing is shared with a running instance
    /// until it is installed by the actor.
    pub(super) async fn start(
        env: &Arc<PluginEnv>,
        prepared: Prepared,
        mailbox: mpsc::WeakSender<Mail>,
        config_json: String,
    ) -> Result<Instance, LoadError> {
        let generation = env.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let services = &env.services;
        let applied = services
            .kv
            .applied_index(&env.name)
            .map_err(|e| LoadError::Init(e.to_string()))?;
        let mut store = new_store(
            &prepared,
            &env.name,
            services,
            &env.limits,
            &env.access,
            Channels {
                mailbox,
                drops: env.drops.clone(),
            },
            generation,
            applied,
        );
        let bindings = prepared
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| instantiation_failed(&e, services.runtime.slots()))?;
        let mut inst = Instance {
            store,
            bindings,
            prepared,
            config_json,
            persisted: applied,
            generation,
            waiting: HashMap::new(),
            dropped: Vec::new(),
            inherited: HashSet::new(),
        };
        let ctx = InitContext {
            config: inst.config_json.clone(),
            node: services.view.local().to_string(),
            name: env.name.clone(),
            version: inst.prepared.version.clone(),
            limits: services.call_limits.to_wit(env.limits.quota),
        };
        match hook!(&mut inst, env, "init", call_init(&ctx)) {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(LoadError::Init(msg)),
            Err(e) => return Err(LoadError::Init(e.to_string())),
        }
        let (epoch, members) = services.view.snapshot();
        let events: Vec<MemberEvent> = members
            .into_iter()
            .map(|member| MemberEvent { member, epoch })
            .collect();
        hook!(&mut inst, env, "on-membership", call_on_membership(&events))
            .map_err(|e| LoadError::Init(format!("on-membership: {e}")))?;
        Ok(inst)
    }

    /// Calls the guest's `snapshot`.
    pub(super) async fn snapshot(&mut self, env: &PluginEnv) -> Result<Vec<u8>, CallError> {
        hook!(self, env, "snapshot", call_snapshot())
    }

    /// Calls the guest's `restore` with `state`.
    pub(super) async fn restore(
        &mut self,
        env: &PluginEnv,
        state: &[u8],
    ) -> Result<Result<(), String>, CallError> {
        hook!(self, env, "restore", call_restore(state))
    }

    pub(super) fn begin(&mut self) {
        self.store.data().calls.begin();
        self.store.data_mut().call_started = Instant::now();
        self.store.data().waited.reset();
        self.store.set_epoch_deadline(1);
    }

    /// Ends a hook call: commits its storage writes and delivery cursor, or
    /// discards them if it failed. An error means the instance is unusable.
    pub(super) async fn finish<R>(
        &mut self,
        env: &PluginEnv,
        hook: &str,
        r: wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let started = self.store.data().call_started;
        let result = self.settle(env, hook, r).await;
        let hook: &'static str = HOOKS
            .iter()
            .find(|h| **h == hook)
            .copied()
            .unwrap_or("other");
        let elapsed = started.elapsed().as_secs_f64();
        let mut metrics = env.metrics.lock().expect("metrics poisoned");
        // Counted under the version that ran, also while a swap has
        // another one in the status.
        let counts = metrics.version(&self.prepared.version);
        counts.calls.entry(hook).or_default().observe(elapsed);
        if hook == "on-request" {
            counts.requests += 1;
        }
        match &result {
            Err(CallError::Trap(_)) => {
                counts.errors += 1;
                counts.traps += 1;
            }
            Err(_) => counts.errors += 1,
            Ok(_) => {}
        }
        drop(metrics);
        result
    }

    pub(super) async fn settle<R>(
        &mut self,
        env: &PluginEnv,
        hook: &str,
        r: wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        match r {
            Ok(value) => {
                let data = self.store.data_mut();
                let writes = data.storage.take_writes();
                let delivered = data.consensus.delivered;
                let applied = (delivered != self.persisted).then_some(delivered);
                if !writes.is_empty() || applied.is_some() {
                    // What `apply` wrote follows from the entries it applied,
                    // which a restart applies again from the cursor on disk.
                    let persist = if hook == "apply" && applied.is_some() {
                        Persist::Replayable
                    } else {
                        Persist::Now
                    };
                    // Without an fsync (but at a checkpoint) the commit is
                    // short enough to run here, on the async worker.
                    let result = if persist == Persist::Replayable {
                        env.services
                            .kv
                            .commit(&env.name, writes, applied, persist)
                            .map_err(|e| CallError::Storage(e.to_string()))
                    } else {
                        env.kv(move |kv, ns| kv.commit(ns, writes, applied, persist))
                            .await
                            .map_err(CallError::Storage)
                    };
                    if let Err(e) = result {
                        env.failure(e.to_string(), |s| s.errors += 1);
                        return Err(e);
                    }
                    self.persisted = delivered;
                }
                Ok(value)
            }
            Err(e) => {
                self.store.data_mut().storage.discard();
                // What it said to clients goes with its writes.
                self.store.data().calls.discard();
                let panic = self.store.data().stderr.panic();
                let msg = describe(hook, &e, &env.limits, panic);
                tracing::warn!(plugin = %env.name, version = %self.prepared.version, "hook failed: {msg}");
                env.failure(msg.clone(), |s| {
                    s.traps += 1;
                    s.errors += 1;
                });
                Err(CallError::Trap(msg))
            }
        }
    }

    pub(super) fn delivered(&self) -> u64 {
        self.store.data().consensus.delivered
    }

    /// Sends the answers the last hook gave (`replies.answer`) and moves
    /// the clients it chained to other tickets. A request whose entry was
    /// applied without an answer gets a 500.
    pub(super) fn route(&mut self) {
        let said = self.store.data().calls.take_said();
        for (from, to) in said.chains {
            if let Some(w) = self.waiting.remove(&from) {
                if self.inherited.remove(&from) {
                    self.inherited.insert(to);
                }
                self.waiting.insert(to, w);
            }
        }
        for (ticket, response) in said.answers {
            self.inherited.remove(&ticket);
            if let Some(w) = self.waiting.remove(&ticket) {
                let _ = w.send(Ok(response));
            }
        }
        for t in std::mem::take(&mut self.store.data_mut().consensus.surfaced) {
            let Some(w) = self.waiting.remove(&t) else {
                continue;
            };
            let response = if self.inherited.remove(&t) {
                // Submitted by the version before a swap and applied once
                // by this one, which has no answer of its own for it: what
                // the write did is in the log and storage, not known here.
                error_response(
                    504,
                    "outcome unknown to this version: the write was applied once, by the version swapped in after it was submitted, which gave no answer for it",
                )
            } else {
                let msg = "the entry was applied, but the plugin gave no answer for it";
                error_response(500, msg)
            };
            let _ = w.send(Ok(response));
        }
    }

    /// Takes over the writes `old` has in flight and the requests waiting
    /// on them, at a swap: their entries are applied by this instance, and
    /// every client is answered once, with the write's real outcome.
    ///
    /// A client waiting on anything else (a call whose outcome had not come
    /// by the end of the drain, or a ticket from `replies.hold`) is
    /// answered 504 here: the new version never learns of it.
    pub(super) fn inherit(&mut self, old: &mut Instance) {
        let tickets = old.store.data_mut().consensus.take_submitted();
        for (ticket, w) in old.waiting.drain() {
            if tickets.contains(&ticket) || old.inherited.contains(&ticket) {
                self.inherited.insert(ticket);
                self.waiting.insert(ticket, w);
            } else {
                let _ = w.send(Ok(error_response(
                    504,
                    "outcome unknown: the plugin was swapped while a call made for this request was in flight",
                )));
            }
        }
        self.inherited.extend(tickets.iter().copied());
        self.inherited.extend(old.inherited.drain());
        self.store.data_mut().consensus.inherit(tickets);
    }

    /// Answers every request still waiting on this instance, which is
    /// going away: their entries may yet be applied, by another instance.
    pub(super) fn abandon(&mut self, why: &str) {
        for (_, w) in self.waiting.drain() {
            let _ = w.send(Ok(error_response(
                504,
                &format!("outcome unknown: {why} before the write was applied"),
            )));
        }
    }

    /// Whether writes it submitted or calls it made are still out: what a
    /// local swap waits for. (A request parked with `replies.hold` waits on
    /// nothing the host could wait for.)
    pub(super) fn outstanding(&self) -> bool {
        let data = self.store.data();
        data.consensus.in_flight() > 0 || data.calls.in_flight() > 0
    }

    /// Whether a request handler may return `pending(ticket)`.
    pub(super) fn may_wait_on(&self, ticket: u64) -> bool {
        let data = self.store.data();
        data.consensus.knows(ticket) || data.calls.may_wait_on(ticket)
    }
}
