//! The actor's loop: mail, calls and commits in turn, one hook at a
//! time; supervision of a failed instance; forwarding.

use super::*;

impl Actor {
    pub(super) async fn run(mut self) {
        loop {
            if self.instance.is_none() {
                let go_on = if self.failed.is_some() {
                    self.wait_failed().await
                } else {
                    self.restart().await
                };
                if !go_on {
                    break;
                }
            }
            self.collect().await;
            self.adopt();
            let Some(inst) = &self.instance else { continue };
            let target = *self.commits.borrow_and_update();
            if target > inst.delivered() {
                self.deliver(target).await;
                continue;
            }
            let saturated = inst.store.data().consensus.in_flight() >= MAX_IN_FLIGHT;
            let next = if !saturated && let Some(mail) = self.deferred.pop_front() {
                Next::Mail(mail)
            } else {
                tokio::select! {
                    biased;
                    changed = self.commits.changed(), if self.commits_open => {
                        if changed.is_err() {
                            self.commits_open = false;
                        }
                        Next::Commits
                    }
                    Some(dropped) = self.drops.recv() => Next::Dropped(dropped),
                    Some(done) = self.calls.next(), if !self.calls.is_empty() => match done {
                        Some(done) => Next::Reply(done),
                        None => Next::Commits,
                    },
                    Some(reply) = self.captures.recv() => Next::Capture(reply),
                    mail = self.rx.recv(), if !saturated => mail.map_or(Next::Closed, Next::Mail),
                }
            };
            match next {
                Next::Commits => {}
                Next::Dropped(d) => self.dropped(d),
                Next::Reply(done) => self.reply(done).await,
                Next::Capture(reply) => self.capture(reply).await,
                Next::Closed => break,
                Next::Mail(mail) => {
                    if !self.handle(mail).await {
                        break;
                    }
                }
            }
        }
        self.env.update(|s| s.state = RunState::Stopped);
    }

    /// Takes the calls the last hook started, to poll them beside the
    /// mailbox.
    pub(super) fn adopt(&mut self) {
        if let Some(inst) = &self.instance {
            self.calls.extend(inst.store.data().calls.take_started());
        }
    }

    /// Marks the instance dead after a failed hook.
    pub(super) fn kill(&mut self) {
        if let Some(mut inst) = self.instance.take() {
            inst.abandon("the plugin failed");
            self.last_prepared = Some(inst.prepared.clone());
        }
        self.failures += 1;
        self.env.update(|s| s.state = RunState::Restarting);
    }

    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Starts a fresh instance after a backoff. Returns false if the actor
    /// was told to stop meanwhile.
    pub(super) async fn restart(&mut self) -> bool {
        let backoff = Duration::from_millis(100u64 << self.failures.saturating_sub(1).min(7))
            .min(Duration::from_secs(10));
        let wake = tokio::time::Instant::now() + backoff;
        // Wait out the backoff, but stay responsive to stop and swap: a swap
        // to a fixed version is how an operator ends a crash loop. Other
        // mail waits for the new instance.
        match self
            .idle(Some(wake), |actor, mail| actor.deferred.push_back(mail))
            .await
        {
            Idle::Woke => {}
            Idle::SwappedIn => return true,
            Idle::Stopped => return false,
        }
        let Some(prepared) = self.last_prepared.clone() else {
            return false;
        };
        let version = prepared.version.clone();
        let config = self.env.config();
        match Instance::start(&self.env, prepared, self.mailbox.clone(), config).await {
            Ok(inst) => {
                tracing::info!(plugin = %self.env.name, %version, "plugin restarted");
                self.env
                    .metrics
                    .lock()
                    .expect("metrics poisoned")
                    .version(&version)
                    .restarts += 1;
                self.instance = Some(inst);
                self.env.update(|s| {
                    s.restarts += 1;
                    s.state = RunState::Running;
                });
            }
            Err(e) => {
                tracing::warn!(plugin = %self.env.name, %version, "restart failed: {e}");
                self.failures += 1;
                self.env.failure(e.to_string(), |s| s.restarts += 1);
            }
        }
        true
    }

    /// Waits with no instance until `wake` (for ever without one), serving
    /// a stop and a swap (which installs the new version) and handing any
    /// other mail to `other`. Forwards still answer their clients; the dead
    /// instance's call outcomes are dropped.
    pub(super) async fn idle(
        &mut self,
        wake: Option<tokio::time::Instant>,
        other: fn(&mut Actor, Mail),
    ) -> Idle {
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {
                    return Idle::Woke;
                }
                Some(_) = self.calls.next(), if !self.calls.is_empty() => {}
                mail = self.rx.recv() => match mail {
                    None => return Idle::Stopped,
                    Some(Mail::Stop { reply }) => {
                        let _ = reply.send(());
                        return Idle::Stopped;
                    }
                    Some(Mail::Swap(order)) => {
                        let Swap { next, reply } = Swap::open(order);
                        let _ = reply.send(Ok(self.take_over(next)));
                        return Idle::SwappedIn;
                    }
                    Some(mail) => other(self, mail),
                },
            }
        }
    }

    /// Installs `next` in place of a dead instance: no state to hand over.
    pub(super) fn take_over(&mut self, next: Instance) -> SwapReport {
        let from = self
            .last_prepared
            .as_ref()
            .map(|p| p.version.clone())
            .unwrap_or_default();
        let report = SwapReport {
            from,
            to: next.prepared.version.clone(),
            pause_us: 0,
            state_bytes: 0,
        };
        self.install(next, &report);
        // The new version gets its own attempts at a suspect entry.
        if let Some((index, _)) = self.suspect {
            self.suspect = Some((index, 0));
        }
        report
    }

    pub(super) fn install(&mut self, next: Instance, report: &SwapReport) {
        *self.env.config_json.lock().expect("config poisoned") = next.config_json.clone();
        if let Some(mut old) = self.instance.replace(next) {
            old.abandon("the plugin was swapped");
        }
        self.failures = 0;
        self.env
            .metrics
            .lock()
            .expect("metrics poisoned")
            .swap_pause
            .observe(report.pause_us as f64 / 1e6);
        self.env.update(|s| {
            s.version = report.to.clone();
            s.state = RunState::Running;
            s.swaps += 1;
            s.last_swap_pause_us = Some(report.pause_us);
            if s.swap_pauses_us.len() >= PAUSES_KEPT {
                s.swap_pauses_us.remove(0);
            }
            s.swap_pauses_us.push(report.pause_us);
        });
    }

    pub(super) async fn handle(&mut self, mail: Mail) -> bool {
        let env = self.env.clone();
        let Some(inst) = self.instance.as_mut() else {
            self.deferred.push_front(mail);
            return true;
        };
        match mail {
            Mail::Request {
                req,
                hops,
                deadline,
                reply,
            } => {
                env.update(|s| s.requests += 1);
                let r = hook!(inst, env, "on-request", call_on_request(&req); path = %req.path);
                match r {
                    Ok(Reply::Done(response)) => {
                        inst.route();
                        self.succeeded();
                        let _ = reply.send(Ok(response));
                    }
                    Ok(Reply::Pending(ticket)) => {
                        if inst.may_wait_on(ticket) {
                            inst.waiting.insert(ticket, reply);
                        } else {
                            let msg = format!(
                                "the plugin answered pending on ticket {ticket}, which no call of this request returned"
                            );
                            let _ = reply.send(Ok(error_response(500, &msg)));
                        }
                        inst.route();
                        self.succeeded();
                    }
                    Ok(Reply::Forward(to)) => {
                        inst.route();
                        self.succeeded();
                        self.forward(req, hops, deadline, to, reply);
                    }
                    Err(e) => {
                        self.kill();
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Mail::Message {
                from,
                topic,
                payload,
                reply,
            } => {
                let r = hook!(inst, env, "on-message", call_on_message(&from, &topic, &payload); %topic);
                if r.is_ok() {
                    inst.route();
                }
                self.after(&r);
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            Mail::Timer {
                generation,
                id,
                seq,
            } => {
                if !inst.store.data_mut().timers.take_fired(generation, id, seq) {
                    return true;
                }
                let r = hook!(inst, env, "on-timer", call_on_timer(id); id);
                if r.is_ok() {
                    inst.route();
                }
                self.after(&r);
            }
            Mail::Membership(events) => {
                let r = hook!(inst, env, "on-membership", call_on_membership(&events));
                if r.is_ok() {
                    inst.route();
                }
                self.after(&r);
            }
            Mail::Swap(order) => {
                self.drain().await;
                let Swap { next, reply } = Swap::open(order);
                if self.instance.is_none() {
                    // The old version failed while draining: nothing is
                    // left to hand over, so the new one simply takes over.
                    let _ = reply.send(Ok(self.take_over(next)));
                    return true;
                }
                let r = self.swap(next).await;
                let _ = reply.send(r);
            }
            Mail::Stop { reply } => {
                self.instance = None;
                let _ = reply.send(());
                return false;
            }
        }
        true
    }

    pub(super) fn after<R>(&mut self, r: &Result<R, CallError>) {
        if r.is_ok() {
            self.succeeded();
        } else {
            self.kill();
        }
    }

    /// A call's outcome: to the guest's `on-reply` if the instance that
    /// made the call is still running and has not had it yet.
    pub(super) async fn reply(&mut self, done: Done) {
        let env = self.env.clone();
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        if !inst.store.data().calls.settle(&done) {
            return;
        }
        let r = hook!(inst, env, "on-reply", call_on_reply(done.ticket, &done.outcome); ticket = done.ticket);
        if r.is_ok() {
            inst.route();
        }
        self.after(&r);
    }

    /// Sends a request the plugin forwarded to its instance on `to.node`,
    /// whose answer goes to the client directly. The actor does not wait.
    pub(super) fn forward(
        &mut self,
        mut req: Request,
        hops: u8,
        deadline: Instant,
        to: ForwardTo,
        reply: oneshot::Sender<Result<Response, CallError>>,
    ) {
        let env = &self.env;
        let refuse = |reply: oneshot::Sender<_>, status, msg: &str| {
            let _ = reply.send(Ok(error_response(status, msg)));
        };
        if !env.capabilities.contains(&Capability::Messaging) {
            return refuse(
                reply,
                500,
                "the plugin forwarded a request, which needs the `messaging` capability",
            );
        }
        if hops >= MAX_HOPS {
            return refuse(
                reply,
                508,
                &format!("the request was forwarded {hops} times without an answer; giving up"),
            );
        }
        req.headers.extend(to.headers);
        let local = env.services.view.local();
        req.source = crate::runtime::bindings::types::RequestSource::Forwarded(local.to_string());
        if to.node == local {
            let Some(tx) = self.mailbox.upgrade() else {
                return refuse(reply, 503, "the plugin is stopping");
            };
            let mail = Mail::Request {
                req,
                hops: hops + 1,
                deadline,
                reply,
            };
            if let Err(mpsc::error::TrySendError::Full(Mail::Request { reply, .. })) =
                tx.try_send(mail)
            {
                let _ = reply.send(Ok(error_response(503, "the plugin's mailbox is full")));
            }
            return;
        }
        let Some(transport) = env.services.transport.clone() else {
            return refuse(
                reply,
                502,
                &format!(
                    "cannot forward to `{}`: this node is not in a cluster",
                    to.node
                ),
            );
        };
        if !env.services.view.is_reachable(&to.node) {
            return refuse(
                reply,
                502,
                &format!("cannot forward to `{}`: not a reachable member", to.node),
            );
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        let body = postcard::to_allocvec(&Forwarded {
            plugin: env.name.clone(),
            hops: hops + 1,
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            request: WireRequest::from_request(req),
        })
        .expect("a forwarded request encodes");
        let node = to.node;
        self.calls.push(Box::pin(async move {
            let sent = transport.request(&node, KIND_FORWARD, body, timeout).await;
            let response = match Answered::from_transport(sent) {
                Answered::Response(r) => r.into(),
                Answered::NoSuchPlugin(p) => error_response(
                    502,
                    &format!("forwarded to `{node}`, which does not run `{p}`"),
                ),
                Answered::Failed(why) => error_response(
                    502,
                    &format!("forwarded to `{node}`, which failed it: {why}"),
                ),
                Answered::Unknown(why) => error_response(
                    504,
                    &format!(
                        "outcome unknown: forwarded to `{node}`, which did not answer in time ({why})"
                    ),
                ),
            };
            let _ = reply.send(Ok(response));
            None
        }));
    }
}
