//! load-balancer: spreads the requests under its route over a set of
//! backends (HTTP services outside the cluster, or a plugin on member
//! nodes) by a policy from its config, and takes failing backends out
//! and back in by verdicts agreed through the consensus log, so every
//! node ejects the same backends at the same log index.
//!
//! Layout:
//! - [`config`]: the config table (Envoy's option names) and its checks;
//! - [`policy`]: round robin, random, least request and peak EWMA with
//!   power-of-choices, and Maglev consistent hashing, apart from the host;
//! - [`verdicts`]: the log's commands and the agreed ejections;
//! - `metrics`: `GET /_lb/metrics` (Prometheus text) and `GET /_lb/status`.
//!
//! Every request is one outbound call in flight, answered when it
//! returns: the plugin never waits. A request whose backend refused the
//! connection (nothing was sent) goes once to another backend. Health
//! checks run from a timer on every node; each node also watches the
//! answers it gets (outlier detection). Only a change of a backend's
//! state is proposed to the log, never per-request data.

pub mod config;
mod metrics;
pub mod policy;
pub mod verdicts;

use std::collections::BTreeMap;

use plexus_sdk::codec;
use plexus_sdk::consensus::{self, Rejected};
use plexus_sdk::http::{FetchError, OutgoingRequest, Params, Router};
use plexus_sdk::{
    InitContext, Method, Pattern, Reply, Request, RequestSource, Response, export_pattern, http,
    plugins, timers,
};
use serde::{Deserialize, Serialize};

use config::{Settings, Target};
use policy::{Candidate, Choice, PeakEwma, Picker};
use verdicts::{Command, Reason, Verdict};

/// The timer of the health-check rounds.
const HEALTH_TIMER: u64 = 1;
/// The timer that looks at returns, failure percentages and proposals.
const TICK_TIMER: u64 = 2;
/// How often the tick comes.
const TICK_MS: u64 = 200;
/// A proposal not applied within this long may be made again.
const PROPOSAL_PATIENCE_MS: u64 = 5000;
/// Slow start begins a returning backend at this share of its weight
/// (Envoy's `min_weight_percent` default).
const SLOW_START_FLOOR: f64 = 0.1;

/// How an exchange with a backend went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It answered 5xx.
    Status5xx,
    /// No connection, or a call that surely did nothing: nothing was
    /// done, so the request may go to another backend.
    Connect,
    /// No answer in time.
    Timeout,
    /// The connection broke after sending, or the callee failed.
    Broken,
    /// Anything else (too large, refused by the host).
    Other,
}

impl Failure {
    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Status5xx => "5xx",
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Broken => "broken",
            Failure::Other => "other",
        }
    }

    const ALL: [Failure; 5] = [
        Failure::Status5xx,
        Failure::Connect,
        Failure::Timeout,
        Failure::Broken,
        Failure::Other,
    ];
}

/// Latency buckets of the histogram, in milliseconds.
pub const BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10_000];

/// What this node counted for one backend under one policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Series {
    /// Requests sent.
    pub requests: u64,
    /// Failures, by [`Failure`] in the order of `Failure::ALL`.
    pub errors: [u64; 5],
    /// Requests sent again to another backend after a refused connection.
    pub resent: u64,
    /// Latency histogram: counts at or below each of [`BUCKETS_MS`], then above.
    pub buckets: [u64; 13],
    /// Sum of latencies in milliseconds.
    pub latency_sum_ms: u64,
}

/// A backend's health as this node's checks see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// Not checked yet, or checks are off.
    #[default]
    Unknown,
    /// Passed `healthy_threshold` checks in a row.
    Healthy,
    /// Failed `unhealthy_threshold` checks in a row.
    Unhealthy,
}

/// What this node alone knows of a backend.
#[derive(Debug, Clone, Default)]
struct Local {
    outstanding: u32,
    ewma: PeakEwma,
    consecutive_failures: u32,
    window_requests: u64,
    window_failures: u64,
    health: Health,
    passes: u32,
    fails: u32,
    check_in_flight: bool,
    checks_passed: u64,
    checks_failed: u64,
    /// When (monotonic) a proposal about it went out, until it is applied.
    proposed: Option<u64>,
    /// No outlier proposal before this (monotonic), after one was refused.
    hold_until: u64,
}

/// Counts of this node's proposals and of verdicts applied here.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counts {
    proposed_eject: u64,
    proposed_return: u64,
    applied_eject: u64,
    applied_return: u64,
    panic_requests: u64,
}

/// A request on its way, kept to send again once after a refused
/// connection.
struct Forward {
    method: Method,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    may_resend: bool,
}

/// The plugin.
pub struct Balancer {
    settings: Settings,
    targets: Vec<Target>,
    /// Names and configured weights (thousandths), by config place.
    names: Vec<(String, u64)>,
    node: String,
    local: Vec<Local>,
    /// The agreed state of every backend ever named in the log.
    agreed: BTreeMap<String, Verdict>,
    /// `agreed` by config place.
    view: Vec<Verdict>,
    picker: Picker,
    /// This version's counts, by config place (the policy is fixed for
    /// an instance).
    current: Vec<Series>,
    /// Counts handed over under another policy or for another backend.
    earlier: BTreeMap<(String, String), Series>,
    counts: Counts,
    window_started: u64,
}

/// What a hot swap hands to the next version.
#[derive(Serialize, Deserialize)]
struct Handover {
    series: Vec<((String, String), Series)>,
    ewma: Vec<(String, PeakEwma)>,
    health: Vec<(String, Health, u32, u32)>,
    counts: Counts,
}

impl Balancer {
    fn refresh_view(&mut self) {
        self.view = self
            .names
            .iter()
            .map(|(n, _)| self.agreed.get(n).cloned().unwrap_or_default())
            .collect();
    }

    fn place(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|(n, _)| n == name)
    }

    /// A backend's weight now, in thousandths: its configured weight, or
    /// a share of it during slow start.
    fn weight_now(&self, i: usize, now_ms: u64) -> u64 {
        let full = self.names[i].1;
        let window = self.settings.slow_start_window_ms;
        let back = self.view[i].returned_ms;
        if window == 0 || back == 0 || now_ms >= back.saturating_add(window) {
            return full;
        }
        let share = (now_ms.saturating_sub(back) as f64 / window as f64).max(SLOW_START_FLOOR);
        ((full as f64 * share) as u64).max(1)
    }

    /// The backends a request may go to, and whether the balancer is in
    /// panic (too few in: all of them).
    fn candidates(&self, exclude: Option<usize>) -> (Vec<Candidate>, bool) {
        let (wall, mono) = (timers::now_ms(), timers::monotonic_ms());
        let tau = self.settings.ewma_decay_ms;
        let total = self.names.len();
        let up = self.view.iter().filter(|v| !v.ejected).count();
        let panic = up == 0 || up * 100 < self.settings.panic_threshold as usize * total;
        let list = (0..total)
            .filter(|&i| Some(i) != exclude && (panic || !self.view[i].ejected))
            .map(|i| Candidate {
                index: i,
                weight: self.weight_now(i, wall),
                outstanding: self.local[i].outstanding,
                cost_ms: self.local[i].ewma.at(mono, tau),
            })
            .collect();
        (list, panic)
    }

    fn choose(&mut self, key: Option<u64>, exclude: Option<usize>) -> Option<usize> {
        let (list, panic) = self.candidates(exclude);
        if list.is_empty() {
            return None;
        }
        if panic {
            self.counts.panic_requests += 1;
        }
        let how = Choice {
            policy: self.settings.lb_policy,
            choice_count: self.settings.choice_count,
            key,
            hash_balance_factor: self.settings.hash_balance_factor,
            names: &self.names,
        };
        Some(self.picker.pick(how, &list))
    }

    fn series(&mut self, i: usize) -> &mut Series {
        &mut self.current[i]
    }

    /// Every count, by policy and backend: this version's and those handed
    /// over.
    fn all_series(&self) -> BTreeMap<(String, String), Series> {
        let mut all = self.earlier.clone();
        let policy = self.settings.lb_policy.name();
        for (i, s) in self.current.iter().enumerate() {
            all.insert((policy.to_string(), self.names[i].0.clone()), s.clone());
        }
        all
    }

    fn forward(&mut self, req: Request) -> Reply {
        let key = self
            .settings
            .hash_header
            .as_deref()
            .and_then(|h| req.header(h).map(|v| policy::hash(0, v.as_bytes())));
        let Some(i) = self.choose(key, None) else {
            return Response::error(503, "no backend").into();
        };
        let fwd = Forward {
            method: req.method,
            path: req.path,
            query: req.query,
            headers: plexus_sdk::http::end_to_end(&req.headers),
            body: req.body,
            may_resend: self.names.len() > 1,
        };
        self.send(i, fwd)
    }

    /// Sends `fwd` to backend `i`; the answer comes in [`Balancer::finish`].
    fn send(&mut self, i: usize, mut fwd: Forward) -> Reply {
        let started = timers::monotonic_ms();
        let timeout = self.settings.timeout_ms;
        self.local[i].outstanding += 1;
        self.series(i).requests += 1;
        let keep = fwd.may_resend;
        let (method, path, query) = (fwd.method, fwd.path.clone(), fwd.query.clone());
        let (headers, body) = if keep {
            (fwd.headers.clone(), fwd.body.clone())
        } else {
            (
                std::mem::take(&mut fwd.headers),
                std::mem::take(&mut fwd.body),
            )
        };
        let kept = keep.then_some(fwd);
        let sent = match &self.targets[i] {
            Target::Url(base) => {
                let mut url = format!("{base}{path}");
                if !query.is_empty() {
                    url.push('?');
                    url.push_str(&query);
                }
                let out = OutgoingRequest {
                    method,
                    url,
                    headers,
                    body,
                };
                http::fetch(self, out, timeout, move |this: &mut Balancer, r| {
                    let r = r.map_err(|e| {
                        let kind = match e {
                            FetchError::Connect(_) => Failure::Connect,
                            FetchError::Timeout => Failure::Timeout,
                            FetchError::Broken(_) => Failure::Broken,
                            _ => Failure::Other,
                        };
                        (kind, Response::from(e))
                    });
                    this.finish(i, started, r, kept)
                })
                .map_err(Response::from)
            }
            Target::Plugin { plugin, node } => {
                let req = Request {
                    method,
                    path,
                    query,
                    headers,
                    body,
                    source: RequestSource::Client,
                };
                let (plugin, node) = (plugin.clone(), node.clone());
                plugins::call(
                    self,
                    &plugin,
                    Some(&node),
                    req,
                    timeout,
                    move |this: &mut Balancer, r| {
                        let r = r.map_err(|e| {
                            let kind = match e {
                                // Definite: the call did nothing (a callee
                                // that failed had its writes discarded), so
                                // it may go to another backend as a refused
                                // connection does.
                                plugins::Error::NoSuchPlugin(_)
                                | plugins::Error::UnknownNode(_)
                                | plugins::Error::Failed(_) => Failure::Connect,
                                plugins::Error::Timeout => Failure::Timeout,
                                _ => Failure::Other,
                            };
                            (kind, Response::from(e))
                        });
                        this.finish(i, started, r, kept)
                    },
                )
                .map_err(Response::from)
            }
        };
        match sent {
            Ok(pending) => pending.into(),
            Err(refused) => {
                // Nothing was sent (the host refused the call: too many in
                // flight, or an origin not allowed).
                self.local[i].outstanding -= 1;
                self.series(i).errors[4] += 1;
                refused.into()
            }
        }
    }

    /// Takes in the outcome of a request to backend `i`, and answers it
    /// (or sends it once more, after a refused connection).
    fn finish(
        &mut self,
        i: usize,
        started: u64,
        result: Result<Response, (Failure, Response)>,
        kept: Option<Forward>,
    ) -> Reply {
        let now = timers::monotonic_ms();
        let elapsed = now.saturating_sub(started);
        let tau = self.settings.ewma_decay_ms;
        let timeout = u64::from(self.settings.timeout_ms);
        let local = &mut self.local[i];
        local.outstanding = local.outstanding.saturating_sub(1);
        let failure = match &result {
            Ok(r) if r.status >= 500 => Some(Failure::Status5xx),
            Ok(_) => None,
            Err((kind, _)) => Some(*kind),
        };
        // A failure that did not reach the backend's code reads as slow as
        // the timeout: a backend that fails fast must not look fast.
        let rtt = match failure {
            Some(Failure::Connect | Failure::Timeout | Failure::Broken) => elapsed.max(timeout),
            _ => elapsed,
        };
        local.ewma.observe(rtt as f64, now, tau);
        local.window_requests += 1;
        if failure.is_some() {
            local.window_failures += 1;
            local.consecutive_failures += 1;
        } else {
            local.consecutive_failures = 0;
        }
        let consecutive = local.consecutive_failures;
        let series = self.series(i);
        series.latency_sum_ms += elapsed;
        let bucket = BUCKETS_MS
            .iter()
            .position(|b| elapsed <= *b)
            .unwrap_or(BUCKETS_MS.len());
        series.buckets[bucket] += 1;
        if let Some(f) = failure {
            series.errors[Failure::ALL.iter().position(|k| *k == f).unwrap_or(4)] += 1;
        }
        let threshold = self.settings.outlier_detection.consecutive_5xx;
        if threshold > 0 && consecutive >= threshold {
            self.propose_eject(i, Reason::Consecutive5xx);
        }
        match result {
            Ok(mut response) => {
                response.headers = plexus_sdk::http::end_to_end(&response.headers);
                response
                    .headers
                    .push(("x-lb-backend".into(), self.names[i].0.clone()));
                response.into()
            }
            Err((Failure::Connect, response)) => {
                // Nothing was sent: one more try elsewhere, if allowed.
                if let Some(mut fwd) = kept.filter(|f| f.may_resend)
                    && let Some(j) = self.choose(None, Some(i))
                {
                    fwd.may_resend = false;
                    self.series(i).resent += 1;
                    return self.send(j, fwd);
                }
                response.into()
            }
            Err((_, response)) => response.into(),
        }
    }

    fn propose(&mut self, i: usize, command: Command) {
        let now = timers::monotonic_ms();
        if self.local[i]
            .proposed
            .is_some_and(|at| now < at + PROPOSAL_PATIENCE_MS)
        {
            return;
        }
        let eject = matches!(command, Command::Eject { .. });
        // No client waits on it: the answer goes nowhere.
        match consensus::submit(self, &command, |_: &mut Balancer, _| {
            Response::text(204, "")
        }) {
            Ok(_) => {
                self.local[i].proposed = Some(now);
                if eject {
                    self.counts.proposed_eject += 1;
                } else {
                    self.counts.proposed_return += 1;
                }
            }
            Err(_) => self.local[i].proposed = None,
        }
    }

    fn propose_eject(&mut self, i: usize, reason: Reason) {
        if self.view[i].ejected {
            return;
        }
        if reason != Reason::HealthCheck && timers::monotonic_ms() < self.local[i].hold_until {
            return;
        }
        let od = &self.settings.outlier_detection;
        let command = Command::Eject {
            backend: self.names[i].0.clone(),
            reason,
            generation: self.view[i].generation,
            at_ms: timers::now_ms(),
            base_ms: od.base_ejection_time_ms,
            max_ms: od.max_ejection_time_ms,
            max_percent: od.max_ejection_percent,
            backends: self.names.len() as u32,
        };
        self.propose(i, command);
    }

    fn tick(&mut self) {
        let (wall, mono) = (timers::now_ms(), timers::monotonic_ms());
        let checks = self.settings.health_check.is_some();
        for i in 0..self.names.len() {
            let v = &self.view[i];
            if v.ejected
                && wall >= v.until_ms
                && (!checks || self.local[i].health == Health::Healthy)
            {
                let command = Command::Return {
                    backend: self.names[i].0.clone(),
                    generation: v.generation,
                    at_ms: wall,
                };
                self.propose(i, command);
            }
        }
        let od = self.settings.outlier_detection.clone();
        if mono.saturating_sub(self.window_started) >= od.interval_ms {
            self.window_started = mono;
            for i in 0..self.names.len() {
                let (n, failed) = (self.local[i].window_requests, self.local[i].window_failures);
                self.local[i].window_requests = 0;
                self.local[i].window_failures = 0;
                if od.failure_percentage_threshold > 0
                    && n >= od.failure_percentage_request_volume.max(1)
                    && failed * 100 >= u64::from(od.failure_percentage_threshold) * n
                {
                    self.propose_eject(i, Reason::FailurePercentage);
                }
            }
        }
        timers::set(TICK_TIMER, TICK_MS);
    }

    fn health_round(&mut self) {
        let Some(hc) = self.settings.health_check.clone() else {
            return;
        };
        for i in 0..self.names.len() {
            if self.local[i].check_in_flight {
                continue;
            }
            let sent = match &self.targets[i] {
                Target::Url(base) => {
                    let check = OutgoingRequest::get(&format!("{base}{}", hc.path));
                    http::fetch(self, check, hc.timeout_ms, move |this: &mut Balancer, r| {
                        this.checked(i, matches!(r, Ok(ref r) if (200..300).contains(&r.status)));
                        Response::text(204, "")
                    })
                    .is_ok()
                }
                Target::Plugin { plugin, node } => {
                    let (plugin, node) = (plugin.clone(), node.clone());
                    let check = plugins::request(Method::Get, &hc.path, Vec::new());
                    plugins::call(
                        self,
                        &plugin,
                        Some(&node),
                        check,
                        hc.timeout_ms,
                        move |this: &mut Balancer, r| {
                            this.checked(
                                i,
                                matches!(r, Ok(ref r) if (200..300).contains(&r.status)),
                            );
                            Response::text(204, "")
                        },
                    )
                    .is_ok()
                }
            };
            self.local[i].check_in_flight = sent;
        }
        timers::set(HEALTH_TIMER, hc.interval_ms);
    }

    fn checked(&mut self, i: usize, passed: bool) {
        let Some(hc) = &self.settings.health_check else {
            return;
        };
        let (healthy, unhealthy) = (hc.healthy_threshold, hc.unhealthy_threshold);
        let l = &mut self.local[i];
        l.check_in_flight = false;
        if passed {
            l.checks_passed += 1;
            l.fails = 0;
            l.passes = l.passes.saturating_add(1);
            if l.passes >= healthy {
                l.health = Health::Healthy;
            }
        } else {
            l.checks_failed += 1;
            l.passes = 0;
            l.fails = l.fails.saturating_add(1);
            if l.fails >= unhealthy {
                l.health = Health::Unhealthy;
            }
        }
        // Only a failure proposes: a node whose checks pass again, but not
        // yet `healthy_threshold` times, must not eject a backend that
        // another node's checks have just brought back.
        if !passed && self.local[i].health == Health::Unhealthy {
            self.propose_eject(i, Reason::HealthCheck);
        }
    }
}

fn status(b: &mut Balancer, _: &Request, _: &Params) -> http::Result {
    Ok(Response::json(200, &metrics::status(b)))
}

fn metrics_text(b: &mut Balancer, _: &Request, _: &Params) -> http::Result {
    Ok(Response::new(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        metrics::prometheus(b).into_bytes(),
    ))
}

/// `POST /_lb/backends/{name}/eject` and `/return`: an operator's verdict,
/// answered once it is applied here.
fn manual(b: &mut Balancer, params: &Params, eject: bool) -> http::Result<Reply> {
    let name = params.text("name", 64)?;
    let Some(i) = b.place(&name) else {
        return Err(Response::error(404, &format!("no backend named `{name}`")));
    };
    let v = &b.view[i];
    let command = if eject {
        let od = &b.settings.outlier_detection;
        Command::Eject {
            backend: name,
            reason: Reason::Manual,
            generation: v.generation,
            at_ms: timers::now_ms(),
            base_ms: od.base_ejection_time_ms,
            max_ms: od.max_ejection_time_ms,
            max_percent: 100,
            backends: b.names.len() as u32,
        }
    } else {
        Command::Return {
            backend: name,
            generation: v.generation,
            at_ms: timers::now_ms(),
        }
    };
    let name = command.backend().to_string();
    Ok(consensus::submit(b, &command, move |b: &mut Balancer, done| {
        let state = b.place(&name).map(|i| b.view[i].clone());
        Response::json(200, &serde_json::json!({ "changed": done.output, "index": done.index, "verdict": state }))
    })?
    .into())
}

fn eject(b: &mut Balancer, _: &Request, params: &Params) -> http::Result<Reply> {
    manual(b, params, true)
}

fn put_back(b: &mut Balancer, _: &Request, params: &Params) -> http::Result<Reply> {
    manual(b, params, false)
}

impl Pattern for Balancer {
    type Command = Command;
    type Output = bool;

    fn init(ctx: InitContext) -> Result<Self, String> {
        let mut settings: Settings = ctx.config()?;
        let targets = settings.check()?;
        // Header names arrive in lower case.
        settings.hash_header = settings.hash_header.map(|h| h.to_ascii_lowercase());
        let names: Vec<(String, u64)> = settings
            .backends
            .iter()
            .map(|b| (b.name.clone(), u64::from(b.weight) * 1000))
            .collect();
        let agreed = verdicts::load().map_err(|e| format!("reading the verdicts: {e:?}"))?;
        let seed = policy::hash(timers::monotonic_ms(), ctx.node.as_bytes());
        let names_len = names.len();
        let mut b = Balancer {
            local: vec![Local::default(); names.len()],
            picker: Picker::new(names.len(), seed),
            view: Vec::new(),
            settings,
            targets,
            names,
            node: ctx.node,
            agreed,
            current: vec![Series::default(); names_len],
            earlier: BTreeMap::new(),
            counts: Counts::default(),
            window_started: timers::monotonic_ms(),
        };
        b.refresh_view();
        timers::set(TICK_TIMER, TICK_MS);
        if b.settings.health_check.is_some() {
            timers::set(HEALTH_TIMER, 0);
        }
        Ok(b)
    }

    fn on_request(&mut self, req: Request) -> Reply {
        if req.path == "/_lb" || req.path.starts_with("/_lb/") {
            return Router::new()
                .get("/_lb/status", status)
                .get("/_lb/metrics", metrics_text)
                .post("/_lb/backends/{name}/eject", eject)
                .post("/_lb/backends/{name}/return", put_back)
                .handle(self, req);
        }
        self.forward(req)
    }

    fn apply(&mut self, index: u64, command: Command) -> Result<bool, Rejected> {
        let changed = verdicts::apply(&mut self.agreed, index, &command)?;
        if let Some(i) = self.place(command.backend()) {
            let l = &mut self.local[i];
            l.proposed = None;
            if changed {
                // Evidence from before the change does not count after it.
                l.consecutive_failures = 0;
                l.window_requests = 0;
                l.window_failures = 0;
            } else if matches!(command, Command::Eject { .. }) {
                // Refused (stale, or too many out): no second try of the
                // same evidence before the next window.
                l.hold_until = timers::monotonic_ms() + self.settings.outlier_detection.interval_ms;
            }
        }
        if changed {
            match command {
                Command::Eject { .. } => self.counts.applied_eject += 1,
                Command::Return { .. } => self.counts.applied_return += 1,
            }
            self.refresh_view();
        }
        Ok(changed)
    }

    fn on_timer(&mut self, id: u64) {
        match id {
            HEALTH_TIMER => self.health_round(),
            TICK_TIMER => self.tick(),
            _ => {}
        }
    }

    fn snapshot(&mut self) -> Vec<u8> {
        let handover = Handover {
            series: self.all_series().into_iter().collect(),
            ewma: self
                .names
                .iter()
                .zip(&self.local)
                .map(|((n, _), l)| (n.clone(), l.ewma))
                .collect(),
            health: self
                .names
                .iter()
                .zip(&self.local)
                .map(|((n, _), l)| (n.clone(), l.health, l.passes, l.fails))
                .collect(),
            counts: self.counts.clone(),
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
        let policy = self.settings.lb_policy.name();
        for ((p, name), series) in handover.series {
            match self.place(&name) {
                Some(i) if p == policy => self.current[i] = series,
                _ => {
                    self.earlier.insert((p, name), series);
                }
            }
        }
        self.counts = handover.counts;
        for (name, ewma) in handover.ewma {
            if let Some(i) = self.place(&name) {
                self.local[i].ewma = ewma;
            }
        }
        // A backend that keeps its address keeps its health; the checks go
        // on from there.
        for (name, health, passes, fails) in handover.health {
            if let Some(i) = self.place(&name) {
                let l = &mut self.local[i];
                (l.health, l.passes, l.fails) = (health, passes, fails);
            }
        }
        Ok(())
    }
}

export_pattern!(Balancer);

#[cfg(test)]
mod tests;
