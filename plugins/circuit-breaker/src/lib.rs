//! circuit-breaker: calls upstream HTTP services for local clients (a
//! sidecar), one breaker per upstream with resilience4j's semantics, and
//! answers 503 at once, without calling, while a breaker is open.
//!
//! Layout:
//! - [`breaker`]: the state machine (windows, thresholds, transitions)
//!   apart from the host;
//! - [`config`]: the config table (resilience4j's option names) and its
//!   checks;
//! - [`cluster`]: breakers of `scope = "cluster"`: counts summed over the
//!   nodes by messaging, transitions agreed through the log;
//! - `metrics`: `GET /_cb/status` (JSON) and `GET /_cb/metrics`
//!   (Prometheus text).
//!
//! A request for `/{upstream}/{rest}` (or under one of an upstream's
//! `prefixes`) goes to the upstream's URL with `rest`, its method,
//! query, headers and body, as one outbound call in flight: the plugin
//! never waits. The outcome is recorded in the breaker (a status in
//! `record_statuses` or an error in `record_errors` is a failure, one
//! longer than `slow_call_duration_threshold` is slow) and the upstream's
//! answer is passed back with `x-circuit-breaker-state`. A refused call
//! is answered 503 with the state, `retry-after` and, when open, the
//! time it half-opens.
//!
//! A node-scope breaker's state is kept in node-local storage at each
//! transition, so a restart keeps it (its window starts empty); a hot
//! swap hands the whole machine, window included, to the next version.

pub mod breaker;
pub mod cluster;
pub mod config;
mod metrics;

use std::collections::{BTreeMap, BTreeSet};

use plexus_sdk::consensus::{self, Rejected};
use plexus_sdk::http::{FetchError, OutgoingRequest, Params, Router};
use plexus_sdk::{
    InitContext, MemberEvent, MemberState, Method, Pattern, Reply, Request, Response, codec,
    export_pattern, http, messaging, storage, timers,
};
use serde::{Deserialize, Serialize};

use breaker::{Admission, Breaker, Decision, Machine, Permit, Sample, Scope, State, Why};
use cluster::{Action, Agreed, Command, Peers, Report};
use config::{ErrorKind, Settings, Upstream};

/// The timer of the cluster round: reports, sums, proposals.
const TICK_TIMER: u64 = 1;
/// Breaker `i`'s timer (automatic transitions) is `BREAKER_TIMER + i`.
const BREAKER_TIMER: u64 = 100;
/// The topic of the count reports.
const REPORT: &str = "cb.report";
/// A proposal not applied within this long may be made again.
const PROPOSAL_PATIENCE_MS: u64 = 2000;
/// A node reports at least this often, even with nothing new.
const KEEPALIVE_MS: u64 = 1000;

/// A request on its way to an upstream.
struct Forward {
    method: Method,
    /// The path on the upstream, from its `/`.
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Counts of this node's proposals and of entries applied here.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LogCounts {
    proposed: u64,
    applied: u64,
    reports_sent: u64,
    reports_heard: u64,
}

/// What `apply` gives back: whether the command changed the state, and
/// the state now.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The agreed state changed.
    pub changed: bool,
    /// The agreed state after the command.
    pub agreed: Agreed,
}

/// What a node-scope breaker keeps in node-local storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kept {
    state: State,
    epoch: u64,
    attempts: u32,
    since_ms: u64,
    open_until_ms: u64,
}

/// The plugin.
pub struct CircuitBreaker {
    settings: Settings,
    upstreams: Vec<Upstream>,
    breakers: Vec<Breaker>,
    node: String,
    /// Cluster scope: the agreed state of every breaker the log named.
    agreed: BTreeMap<String, Agreed>,
    /// Cluster scope: the other nodes' counts.
    peers: Peers,
    /// Members known dead.
    dead: BTreeSet<String>,
    /// Per breaker: the index a proposal of this node was made on, and
    /// when (monotonic), until it is applied.
    proposing: Vec<Option<(u64, u64)>>,
    /// Per breaker: what the last report said.
    reported: Vec<Option<(u64, breaker::Counts)>>,
    last_report_mono: u64,
    log: LogCounts,
}

/// What a hot swap hands to the next version.
#[derive(Serialize, Deserialize)]
struct Handover {
    breakers: Vec<(String, Scope, Machine)>,
    peers: Peers,
    dead: Vec<String>,
    log: LogCounts,
}

impl CircuitBreaker {
    fn place(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.name == name)
    }

    fn any_cluster(&self) -> bool {
        self.upstreams.iter().any(|u| u.scope == Scope::Cluster)
    }

    /// How long a report counts.
    fn report_ttl(&self) -> u64 {
        3 * self.settings.report_interval_ms.max(KEEPALIVE_MS)
    }

    /// The upstream a path goes to, and the path on it: the longest
    /// matching prefix, passed whole, or `/{name}/{rest}`, passed as `/{rest}`.
    fn route(&self, path: &str) -> Option<(usize, String)> {
        let by_prefix = self
            .upstreams
            .iter()
            .enumerate()
            .flat_map(|(i, u)| u.prefixes.iter().map(move |p| (i, p)))
            .filter(|(_, p)| {
                path == p.as_str()
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| p.ends_with('/') || rest.starts_with('/'))
            })
            .max_by_key(|(_, p)| p.len());
        if let Some((i, _)) = by_prefix {
            return Some((i, path.to_string()));
        }
        let trimmed = path.strip_prefix('/')?;
        let (name, rest) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        let i = self.place(name)?;
        Some((i, format!("/{rest}")))
    }

    /// Asks breaker `i` and sends `fwd` if it permits. A cluster breaker
    /// whose wait is over (or whose half-open has no prober) first
    /// proposes the change, and the request waits for it, once.
    fn call(&mut self, i: usize, fwd: Forward, may_propose: bool) -> Reply {
        let now = timers::now_ms();
        let before = self.breakers[i].m.epoch;
        let dead = &self.dead;
        let admission = self.breakers[i].acquire(now, |n| dead.contains(n));
        self.changed(i, before);
        match admission {
            Admission::Permitted(permit) => self.send(i, permit, fwd),
            wants @ (Admission::ProposeHalfOpen | Admission::Claim) => {
                let (seen, breaker) = (self.breakers[i].m.epoch, self.upstreams[i].name.clone());
                let command = match wants {
                    Admission::ProposeHalfOpen => Command::HalfOpen {
                        breaker,
                        seen,
                        at_ms: now,
                        prober: Some(self.node.clone()),
                    },
                    _ => Command::Claim {
                        breaker,
                        seen,
                        prober: self.node.clone(),
                    },
                };
                if may_propose && self.may_propose(i) {
                    let sent = consensus::submit(self, &command, move |this: &mut Self, _| {
                        this.call(i, fwd, false)
                    });
                    if let Ok(pending) = sent {
                        self.proposed(i);
                        return pending.into();
                    }
                }
                // A proposal is under way already (or the log refused one):
                // refused until the log agrees.
                let open_until = self.breakers[i].m.open_until_ms;
                let refused = self.breakers[i].refuse((open_until > 0).then_some(open_until));
                self.refused(i, refused)
            }
            refused @ Admission::NotPermitted { .. } => self.refused(i, refused),
        }
    }

    /// The 503 of a refused call.
    fn refused(&self, i: usize, admission: Admission) -> Reply {
        let Admission::NotPermitted {
            state,
            half_open_at_ms,
            prober,
        } = admission
        else {
            return Response::error(503, "the call was not permitted").into();
        };
        let name = &self.upstreams[i].name;
        let now = timers::now_ms();
        let retry_after_ms = half_open_at_ms.map(|at| at.saturating_sub(now));
        let mut body = serde_json::json!({
            "error": format!("circuit breaker `{name}` is {}: the call was not permitted", state.name()),
            "breaker": name,
            "state": state.name(),
        });
        if let Some(at) = half_open_at_ms {
            body["half_open_at_ms"] = at.into();
            body["retry_after_ms"] = retry_after_ms.unwrap_or(0).into();
        }
        if let Some(p) = &prober {
            body["prober"] = p.clone().into();
        }
        let mut r = Response::json(503, &body).with_header("x-circuit-breaker-state", state.name());
        if let Some(at) = half_open_at_ms {
            r = r
                .with_header("x-circuit-breaker-half-open-at", &at.to_string())
                .with_header(
                    "retry-after",
                    &retry_after_ms
                        .unwrap_or(0)
                        .div_ceil(1000)
                        .max(1)
                        .to_string(),
                );
        }
        r.into()
    }

    /// Sends `fwd` to upstream `i`; the outcome comes to [`Self::finish`].
    fn send(&mut self, i: usize, permit: Permit, fwd: Forward) -> Reply {
        let up = &self.upstreams[i];
        let mut url = format!("{}{}", up.url, fwd.path);
        if !fwd.query.is_empty() {
            url.push('?');
            url.push_str(&fwd.query);
        }
        let out = OutgoingRequest {
            method: fwd.method,
            url,
            headers: fwd.headers,
            body: fwd.body,
        };
        let started = timers::monotonic_ms();
        let timeout = up.timeout_ms;
        let sent = http::fetch(self, out, timeout, move |this: &mut Self, r| {
            this.finish(i, permit, started, r)
        });
        match sent {
            Ok(pending) => pending.into(),
            Err(e) => {
                // Nothing was sent (too many calls in flight, an origin not
                // allowed): it says nothing of the upstream.
                let now = timers::now_ms();
                let before = self.breakers[i].m.epoch;
                self.breakers[i].record(now, permit, None, 0);
                self.changed(i, before);
                Response::from(e).into()
            }
        }
    }

    /// Records the outcome of a call to upstream `i` and answers it.
    fn finish(
        &mut self,
        i: usize,
        permit: Permit,
        started: u64,
        result: Result<Response, FetchError>,
    ) -> Response {
        let duration = timers::monotonic_ms().saturating_sub(started);
        let now = timers::now_ms();
        let up = &self.upstreams[i];
        let failed = match &result {
            Ok(r)
                if up
                    .ignore_statuses
                    .iter()
                    .any(|s| (s.0..=s.1).contains(&r.status)) =>
            {
                None
            }
            Ok(r) => Some(
                up.record_statuses
                    .iter()
                    .any(|s| (s.0..=s.1).contains(&r.status)),
            ),
            Err(e) => {
                let kind = match e {
                    FetchError::Connect(_) => Some(ErrorKind::Connect),
                    FetchError::Timeout => Some(ErrorKind::Timeout),
                    FetchError::Broken(_) => Some(ErrorKind::Broken),
                    FetchError::TooLarge(_) => Some(ErrorKind::TooLarge),
                    // Refused by this host: nothing about the upstream.
                    _ => None,
                };
                kind.and_then(|k| up.record_errors.contains(&k).then_some(true))
            }
        };
        let sample = failed.map(|failed| Sample {
            failed,
            slow: self.breakers[i].rules.is_slow(duration),
        });
        let before = self.breakers[i].m.epoch;
        let decision = self.breakers[i].record(now, permit, sample, duration);
        self.changed(i, before);
        if let Some(d) = decision {
            self.propose(i, d);
        } else {
            self.evaluate(i);
        }
        let state = self.breakers[i].m.state.name();
        match result {
            Ok(mut response) => {
                response.headers = plexus_sdk::http::end_to_end(&response.headers);
                response
                    .headers
                    .push(("x-circuit-breaker-state".into(), state.into()));
                response
            }
            Err(e) => Response::from(e).with_header("x-circuit-breaker-state", state),
        }
    }

    /// After breaker `i` may have moved itself (node scope) from epoch
    /// `before`: logs the transition, keeps the state and sets its timer.
    fn changed(&mut self, i: usize, before: u64) {
        let b = &self.breakers[i];
        if b.m.epoch == before {
            return;
        }
        self.told(i);
        if b.scope == Scope::Node {
            let kept = Kept {
                state: b.m.state,
                epoch: b.m.epoch,
                attempts: b.m.attempts,
                since_ms: b.m.since_ms,
                open_until_ms: b.m.open_until_ms,
            };
            let key = format!("breaker/{}", self.upstreams[i].name);
            if let Err(e) = storage::local::put(key, codec::encode(&kept)) {
                plexus_sdk::warn!(
                    "keeping breaker {}'s state failed: {:?}",
                    self.upstreams[i].name,
                    e
                );
            }
        }
        self.arm(i);
    }

    /// Logs breaker `i`'s last transition.
    fn told(&self, i: usize) {
        if let Some(t) = self.breakers[i].m.history.back() {
            let name = &self.upstreams[i].name;
            plexus_sdk::info!(
                "circuit breaker {} {} -> {} ({})", name, t.from.name(), t.to.name(), t.why.name();
                "breaker" => name,
                "from" => t.from.name(),
                "to" => t.to.name(),
                "why" => t.why.name(),
                "index" => t.index.unwrap_or(0)
            );
        }
    }

    /// Sets (or cancels) breaker `i`'s timer for its next automatic move.
    fn arm(&self, i: usize) {
        let id = BREAKER_TIMER + i as u64;
        match self.breakers[i].next_due_ms() {
            Some(at) => {
                timers::set(id, at.saturating_sub(timers::now_ms()));
            }
            None => {
                timers::cancel(id);
            }
        }
    }

    fn may_propose(&self, i: usize) -> bool {
        let now = timers::monotonic_ms();
        match self.proposing[i] {
            Some((seen, at)) => {
                seen != self.breakers[i].m.epoch || now.saturating_sub(at) >= PROPOSAL_PATIENCE_MS
            }
            None => true,
        }
    }

    fn proposed(&mut self, i: usize) {
        self.proposing[i] = Some((self.breakers[i].m.epoch, timers::monotonic_ms()));
        self.log.proposed += 1;
    }

    /// Proposes what cluster breaker `i` decided, unless a proposal of
    /// this node on the same state is still under way.
    fn propose(&mut self, i: usize, decision: Decision) {
        if self.breakers[i].scope != Scope::Cluster || !self.may_propose(i) {
            return;
        }
        let b = &self.breakers[i];
        let (breaker, seen, at_ms) = (self.upstreams[i].name.clone(), b.m.epoch, timers::now_ms());
        let command = match decision {
            Decision::Open(why) => Command::Open {
                breaker,
                seen,
                at_ms,
                wait: b.rules.wait,
                why,
            },
            Decision::Close(rates) => Command::Close {
                breaker,
                seen,
                at_ms,
                rates,
            },
            Decision::HalfOpen => Command::HalfOpen {
                breaker,
                seen,
                at_ms,
                prober: None,
            },
        };
        // No client waits on it: the answer goes nowhere.
        if consensus::submit(self, &command, |_: &mut Self, _| Response::text(204, "")).is_ok() {
            self.proposed(i);
        }
    }

    /// Cluster breaker `i`, closed: proposes the opening when the counts
    /// of every node together reach a threshold.
    fn evaluate(&mut self, i: usize) {
        let b = &mut self.breakers[i];
        if b.scope != Scope::Cluster || b.m.state != State::Closed {
            return;
        }
        let now = timers::now_ms();
        let mono = timers::monotonic_ms();
        let ttl = 3 * self.settings.report_interval_ms.max(KEEPALIVE_MS);
        let name = &self.upstreams[i].name;
        let sum = b
            .counts(now)
            .plus(self.peers.sum(name, b.m.epoch, mono, ttl));
        if let Some(rates) = b.rules.exceeded(&sum, b.rules.minimum_calls()) {
            self.propose(i, Decision::Open(Why::Rates(rates)));
        }
    }

    /// Cluster breaker `i` takes the state the log agreed.
    fn adopt(&mut self, i: usize) {
        let name = &self.upstreams[i].name;
        let Some(a) = self.agreed.get(name).cloned() else {
            return;
        };
        let b = &mut self.breakers[i];
        if b.scope != Scope::Cluster || b.m.epoch == a.index {
            return;
        }
        let before = b.m.epoch;
        b.enter(
            a.state,
            a.since_ms,
            a.index,
            a.attempts,
            a.open_until_ms,
            a.prober.clone(),
            a.why.unwrap_or(Why::Operator),
            Some(a.index),
        );
        self.proposing[i] = None;
        self.changed(i, before);
    }

    /// The cluster round: forgets old reports, sums, proposes what is
    /// due, and reports this node's counts when they changed.
    fn tick(&mut self) {
        let now = timers::now_ms();
        let mono = timers::monotonic_ms();
        let ttl = self.report_ttl();
        self.peers.expire(mono, ttl);
        let mut report = Report::default();
        let mut news = false;
        for i in 0..self.breakers.len() {
            if self.breakers[i].scope != Scope::Cluster {
                continue;
            }
            self.evaluate(i);
            let m = &self.breakers[i].m;
            if let (State::HalfOpen, Some(d)) = (m.state, m.half.decision) {
                self.propose(i, d);
            }
            if let Some(d) = self.breakers[i].due(now) {
                self.propose(i, d);
            }
            let b = &mut self.breakers[i];
            let counts = b.counts(now);
            let said = Some((b.m.epoch, counts));
            news |= self.reported[i] != said;
            self.reported[i] = said;
            report
                .breakers
                .push((self.upstreams[i].name.clone(), b.m.epoch, counts));
        }
        let quiet = mono.saturating_sub(self.last_report_mono) >= KEEPALIVE_MS;
        if news || quiet {
            match messaging::broadcast(REPORT, &codec::encode(&report)) {
                Ok(_) => {
                    self.last_report_mono = mono;
                    self.log.reports_sent += 1;
                }
                Err(e) => plexus_sdk::debug!("reporting counts failed: {:?}", e),
            }
        }
        timers::set(TICK_TIMER, self.settings.report_interval_ms);
    }

    /// An operator's action on breaker `i`: here at once (node scope), or
    /// through the log (cluster scope), answered with the breaker's status.
    fn act(&mut self, i: usize, action: Action) -> http::Result<Reply> {
        let now = timers::now_ms();
        if self.breakers[i].scope == Scope::Node {
            let before = self.breakers[i].m.epoch;
            let why = match action {
                Action::Reset => Why::Reset,
                _ => Why::Operator,
            };
            self.breakers[i].go(action.state(), now, why);
            self.changed(i, before);
            return Ok(Response::json(200, &metrics::breaker(self, i)).into());
        }
        let command = Command::Operator {
            breaker: self.upstreams[i].name.clone(),
            action,
            at_ms: now,
        };
        self.log.proposed += 1;
        Ok(
            consensus::submit(self, &command, move |this: &mut Self, done| {
                let mut status = metrics::breaker(this, i);
                status["index"] = done.index.into();
                Response::json(200, &status)
            })?
            .into(),
        )
    }

    /// Takes in a report from `from`.
    fn heard(&mut self, from: &str, report: Report) {
        self.log.reports_heard += 1;
        let names: Vec<String> = report.breakers.iter().map(|b| b.0.clone()).collect();
        self.peers.take(from, report, timers::monotonic_ms());
        for name in names {
            if let Some(i) = self.place(&name) {
                self.evaluate(i);
            }
        }
    }

    /// A node-scope breaker resumes the state kept in node-local storage.
    fn resume_kept(&mut self, i: usize) -> Result<(), String> {
        let key = format!("breaker/{}", self.upstreams[i].name);
        let kept = storage::local::get(key)
            .map_err(|e| format!("reading {}: {e:?}", self.upstreams[i].name))?;
        let Some(kept) = kept.and_then(|v| codec::decode::<Kept>(&v.value).ok()) else {
            return Ok(());
        };
        let b = &mut self.breakers[i];
        let permits = b.rules.permitted_calls_in_half_open;
        let m = &mut b.m;
        m.state = kept.state;
        m.epoch = kept.epoch;
        m.attempts = kept.attempts;
        m.since_ms = kept.since_ms;
        m.open_until_ms = kept.open_until_ms;
        if m.state == State::HalfOpen {
            m.half.permits_left = permits;
        }
        Ok(())
    }
}

/// Answers 401 or 403 unless the request carries the admin token.
fn authorize(cb: &CircuitBreaker, req: &Request) -> http::Result<()> {
    let Some(token) = &cb.settings.admin_token else {
        return Err(Response::error(
            403,
            "breaker actions are off: set admin_token in the plugin's config",
        ));
    };
    let given = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in full whatever differs first.
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Response::error(
            401,
            "a breaker action needs `authorization: Bearer <admin_token>`",
        )
        .with_header("www-authenticate", "Bearer"))
    }
}

fn breaker_of(cb: &CircuitBreaker, params: &Params) -> http::Result<usize> {
    let name = params.text("name", 64)?;
    cb.place(&name)
        .ok_or_else(|| Response::error(404, &format!("no breaker named `{name}`")))
}

fn action(cb: &mut CircuitBreaker, req: &Request, params: &Params) -> http::Result<Reply> {
    authorize(cb, req)?;
    let i = breaker_of(cb, params)?;
    let action = match params.get("action").unwrap_or_default() {
        "force_open" => Action::ForceOpen,
        "disable" => Action::Disable,
        "metrics_only" => Action::MetricsOnly,
        "close" => Action::Close,
        "reset" => Action::Reset,
        other => {
            return Err(Response::error(
                404,
                &format!("no action `{other}`: force_open, disable, metrics_only, close or reset"),
            ));
        }
    };
    cb.act(i, action)
}

fn status(cb: &mut CircuitBreaker, _: &Request, _: &Params) -> http::Result {
    Ok(Response::json(200, &metrics::status(cb)))
}

fn one(cb: &mut CircuitBreaker, _: &Request, params: &Params) -> http::Result {
    let i = breaker_of(cb, params)?;
    Ok(Response::json(200, &metrics::breaker(cb, i)))
}

fn metrics_text(cb: &mut CircuitBreaker, _: &Request, _: &Params) -> http::Result {
    Ok(Response::new(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        metrics::prometheus(cb).into_bytes(),
    ))
}

impl Pattern for CircuitBreaker {
    type Command = Command;
    type Output = Applied;

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        let upstreams = config::check(&settings)?;
        let now = timers::now_ms();
        let breakers = upstreams
            .iter()
            .map(|u| Breaker::new(u.rules.clone(), u.scope, &ctx.node, now))
            .collect();
        let n = upstreams.len();
        let mut cb = CircuitBreaker {
            settings,
            upstreams,
            breakers,
            node: ctx.node,
            agreed: BTreeMap::new(),
            peers: Peers::default(),
            dead: BTreeSet::new(),
            proposing: vec![None; n],
            reported: vec![None; n],
            last_report_mono: 0,
            log: LogCounts::default(),
        };
        for i in 0..n {
            if cb.breakers[i].scope == Scope::Node {
                cb.resume_kept(i)?;
            }
        }
        if cb.any_cluster() {
            cb.agreed = cluster::load().map_err(|e| format!("reading the agreed states: {e:?}"))?;
            for i in 0..n {
                cb.adopt(i);
            }
            timers::set(TICK_TIMER, cb.settings.report_interval_ms);
        }
        for i in 0..n {
            cb.arm(i);
        }
        Ok(cb)
    }

    fn on_request(&mut self, req: Request) -> Reply {
        if req.path == "/_cb" || req.path.starts_with("/_cb/") {
            return Router::new()
                .get("/_cb/status", status)
                .get("/_cb/metrics", metrics_text)
                .get("/_cb/breakers/{name}", one)
                .post("/_cb/breakers/{name}/{action}", action)
                .handle(self, req);
        }
        let Some((i, path)) = self.route(&req.path) else {
            return Response::error(
                404,
                &format!(
                    "no upstream for {}: the path starts with an upstream's name",
                    req.path
                ),
            )
            .into();
        };
        let fwd = Forward {
            method: req.method,
            path,
            query: req.query,
            headers: plexus_sdk::http::end_to_end(&req.headers),
            body: req.body,
        };
        self.call(i, fwd, true)
    }

    fn on_message(&mut self, from: String, topic: String, payload: Vec<u8>) -> Option<Vec<u8>> {
        if topic == REPORT && from != self.node && !self.dead.contains(&from) {
            match codec::decode::<Report>(&payload) {
                Ok(report) => self.heard(&from, report),
                Err(e) => plexus_sdk::debug!("a report from {} did not decode: {}", from, e),
            }
        }
        None
    }

    fn on_membership(&mut self, events: Vec<MemberEvent>) {
        for e in events {
            let id = e.member.id;
            match e.member.state {
                MemberState::Dead => {
                    self.peers.forget_node(&id);
                    self.dead.insert(id);
                }
                _ => {
                    self.dead.remove(&id);
                }
            }
        }
    }

    fn apply(&mut self, index: u64, command: Command) -> Result<Applied, Rejected> {
        let changed = cluster::apply(&mut self.agreed, index, &command)?;
        self.log.applied += 1;
        if changed && let Some(i) = self.place(command.breaker()) {
            self.adopt(i);
        }
        let agreed = self
            .agreed
            .get(command.breaker())
            .cloned()
            .unwrap_or_default();
        Ok(Applied { changed, agreed })
    }

    fn on_timer(&mut self, id: u64) {
        if id == TICK_TIMER {
            self.tick();
            return;
        }
        let Some(i) = id
            .checked_sub(BREAKER_TIMER)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < self.breakers.len())
        else {
            return;
        };
        let now = timers::now_ms();
        let before = self.breakers[i].m.epoch;
        let decision = self.breakers[i].due(now);
        self.changed(i, before);
        match decision {
            Some(d) => self.propose(i, d),
            // Not yet (a timer a little early), or nothing due: look again.
            None => self.arm(i),
        }
    }

    fn snapshot(&mut self) -> Vec<u8> {
        let handover = Handover {
            breakers: self
                .upstreams
                .iter()
                .zip(&self.breakers)
                .map(|(u, b)| (u.name.clone(), b.scope, b.m.clone()))
                .collect(),
            peers: self.peers.clone(),
            dead: self.dead.iter().cloned().collect(),
            log: self.log.clone(),
        };
        codec::encode_versioned(1, &handover)
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        let state = codec::versioned(&state).map_err(|e| e.to_string())?;
        let handover: Handover = match state.version {
            0 => return Ok(()),
            1 => state.decode().map_err(|e| e.to_string())?,
            v => return Err(format!("snapshot format {v} is newer than this version")),
        };
        for (name, scope, m) in handover.breakers {
            let Some(i) = self.place(&name) else {
                continue;
            };
            let b = &mut self.breakers[i];
            if b.scope == scope {
                b.resume(m);
            } else {
                // A breaker that changed scope starts from its new scope's
                // state, keeping its counts and history.
                b.m.totals = m.totals;
                b.m.history = m.history;
                b.m.transitions = m.transitions;
            }
        }
        self.peers = handover.peers;
        self.dead = handover.dead.into_iter().collect();
        self.log = handover.log;
        // The log may have moved on since `init` read it.
        if self.any_cluster() {
            self.agreed =
                cluster::load().map_err(|e| format!("reading the agreed states: {e:?}"))?;
            for i in 0..self.breakers.len() {
                self.adopt(i);
            }
        }
        for i in 0..self.breakers.len() {
            self.arm(i);
        }
        Ok(())
    }
}

export_pattern!(CircuitBreaker);

#[cfg(test)]
mod tests;
