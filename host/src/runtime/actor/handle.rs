//! The handle the node holds for a running plugin: starting it, and
//! everything that reaches it from outside, as mail.

use super::*;

impl PluginHandle {
    /// Starts a plugin: instantiates and initialises it, then spawns its
    /// actor. Fails without side effects when the instance cannot start.
    pub async fn start(
        spec: PluginSpec,
        prepared: Prepared,
        services: Services,
    ) -> Result<PluginHandle, LoadError> {
        let (tx, rx) = mpsc::channel(spec.limits.mailbox.max(1));
        let (drops_tx, drops) = mpsc::unbounded_channel();
        let commits = services
            .log
            .subscribe(&spec.name)
            .map_err(|e| LoadError::Init(e.to_string()))?;
        let env = Arc::new(PluginEnv {
            metrics: Mutex::new(PluginMetrics::default()),
            status: Mutex::new(PluginStatus {
                name: spec.name.clone(),
                version: prepared.version.clone(),
                state: RunState::Running,
                capabilities: spec.capabilities.iter().copied().collect(),
                loaded_at_ms: now_ms(),
                restarts: 0,
                traps: 0,
                requests: 0,
                errors: 0,
                swaps: 0,
                last_swap_pause_us: None,
                reload_error: None,
                last_error: None,
                swapped_at_index: None,
                restored_at_index: None,
                control_index: 0,
                mailbox_depth: 0,
                swap_pauses_us: Vec::new(),
            }),
            name: spec.name,
            services,
            limits: spec.limits,
            capabilities: spec.capabilities,
            access: spec.access,
            config_json: Mutex::new(spec.config_json),
            generation: AtomicU64::new(0),
            drops: drops_tx,
        });
        let config = env.config();
        let instance = Instance::start(&env, prepared, tx.downgrade(), config).await?;
        let (captures_tx, captures) = mpsc::channel(4);
        let actor = Actor {
            env: env.clone(),
            rx,
            captures,
            mailbox: tx.downgrade(),
            deferred: VecDeque::new(),
            commits,
            commits_open: true,
            drops,
            calls: FuturesUnordered::new(),
            instance: Some(instance),
            last_prepared: None,
            failures: 0,
            suspect: None,
            failed: None,
        };
        let span =
            tracing::info_span!("plugin", node = %env.services.view.local(), name = %env.name);
        let task = tokio::spawn(actor.run().instrument(span));
        Ok(PluginHandle {
            env,
            tx,
            captures: captures_tx,
            task,
        })
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.env.name
    }

    /// Granted capabilities.
    pub fn capabilities(&self) -> &BTreeSet<Capability> {
        &self.env.capabilities
    }

    /// Latency histograms.
    pub fn metrics(&self) -> PluginMetrics {
        self.env.metrics.lock().expect("metrics poisoned").clone()
    }

    /// Current status.
    pub fn status(&self) -> PluginStatus {
        let mut s = self.env.status.lock().expect("status poisoned").clone();
        s.mailbox_depth = self.tx.max_capacity() - self.tx.capacity();
        s
    }

    async fn send(&self, mail: Mail, deadline: Instant) -> Result<(), CallError> {
        match tokio::time::timeout_at(deadline.into(), self.tx.send(mail)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CallError::Stopped),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// Delivers a client request and waits up to `timeout` for the answer.
    pub async fn request(&self, req: Request, timeout: Duration) -> Result<Response, CallError> {
        self.forwarded(req, 0, timeout).await
    }

    /// Delivers a request that was forwarded `hops` times and waits up to
    /// `timeout` for the answer.
    pub async fn forwarded(
        &self,
        req: Request,
        hops: u8,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let deadline = Instant::now() + timeout;
        let (reply, rx) = oneshot::channel();
        let mail = Mail::Request {
            req,
            hops,
            deadline,
            reply,
        };
        self.send(mail, deadline).await?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Stopped),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// Delivers a message (as if from `from`) and waits for `on-message`.
    pub async fn message(
        &self,
        from: &str,
        topic: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, CallError> {
        let deadline = Instant::now() + timeout;
        let (reply, rx) = oneshot::channel();
        let mail = Mail::Message {
            from: from.to_string(),
            topic: topic.to_string(),
            payload,
            reply: Some(reply),
        };
        self.send(mail, deadline).await?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Stopped),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// Queues membership events for `on-membership`.
    pub async fn membership(&self, events: Vec<MemberEvent>) {
        let _ = self.tx.send(Mail::Membership(events)).await;
    }

    /// Queues a one-way message, waiting only for mailbox space.
    pub async fn deliver(
        &self,
        from: &str,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), CallError> {
        let mail = Mail::Message {
            from: from.to_string(),
            topic: topic.to_string(),
            payload,
            reply: None,
        };
        self.tx.send(mail).await.map_err(|_| CallError::Stopped)
    }

    /// Replaces the running version by `prepared`, handing state over with
    /// snapshot/restore. `config_json`, when given, replaces the config
    /// passed to `init`. On any failure the old version keeps serving.
    pub async fn swap(
        &self,
        prepared: Prepared,
        config_json: Option<String>,
    ) -> Result<SwapReport, SwapError> {
        // Instantiate and init the new version here, off the actor, while the
        // old one keeps serving. Its config takes effect only if it is
        // installed.
        let config = config_json.unwrap_or_else(|| self.env.config());
        let next = Instance::start(&self.env, prepared, self.tx.downgrade(), config)
            .await
            .map_err(SwapError::Load)?;
        let (reply, rx) = oneshot::channel();
        let mail = Mail::Swap(SwapOrder::new(Swap { next, reply }));
        self.tx.send(mail).await.map_err(|_| CallError::Stopped)?;
        rx.await.map_err(|_| SwapError::Call(CallError::Stopped))?
    }

    /// Records why the last change of the plugin's config entry was
    /// refused, or (`None`) that one was applied.
    pub fn set_reload_error(&self, error: Option<String>) {
        self.env.update(|s| s.reload_error = error);
    }

    /// Records that the running version came from the cluster-wide swap at
    /// `index`.
    pub fn mark_swapped(&self, index: u64) {
        self.env.update(|s| {
            s.swapped_at_index = Some(index);
            s.control_index = index;
        });
    }

    /// The plugin's state between two hooks, for a consensus snapshot.
    ///
    /// Served ahead of the mailbox, between two hooks.
    pub async fn capture(&self) -> Option<RestorePoint> {
        let (reply, rx) = oneshot::channel();
        self.captures.send(reply).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Stops the actor after the mail already queued, dropping the instance.
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Mail::Stop { reply }).await.is_ok()
            && tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .is_err()
        {
            self.task.abort();
        }
        self.env.update(|s| s.state = RunState::Stopped);
    }
}
