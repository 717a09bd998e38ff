//! ambassador: client-side resilience in front of upstream services, as
//! Envoy and Linkerd give it to the application beside them.
//!
//! A request to `/{upstream}/rest?query` goes to the upstream's `url` +
//! `/rest?query`, with its method, headers and body. Per upstream (see
//! [`policy::Upstream`]): a route timeout for the whole call and a per-try
//! timeout; retries on chosen conditions (`5xx`, `gateway-error`,
//! `connect-failure`, `reset`, `timeout`, `retriable-status-codes`), only
//! of idempotent methods unless `retry_non_idempotent`, after a backoff
//! with full jitter; a **retry budget** (retries at most `retry_ratio` of
//! requests plus `min_retries_per_second`, over `ttl_ms`), counted on
//! this node or, with `scope = "cluster"`, summed over every node (each
//! node broadcasts its counts twice a second), so a retry storm is held
//! back across the cluster and not only per proxy; and optional **hedged
//! requests**: a second attempt once the first has taken longer than a
//! percentile of recent latencies, the first answer winning. Request
//! bodies up to `max_buffered_body_bytes` are kept for retries; a larger
//! one is sent once.
//!
//! Every answer carries `x-ambassador-attempts`. `GET /_amb/status` and
//! `GET /_amb/metrics` (Prometheus text) show, per upstream: requests,
//! attempts, retries, retries the budget refused, hedges and hedges that
//! won, answers by status class, and the budget's window; each call is
//! logged (upstream, method, path, status, attempts, milliseconds) unless
//! `access_log = false`.

use std::collections::HashMap;

use plexus_sdk::http::{FetchError, OutgoingRequest};
use plexus_sdk::replies::{self, Pending};
use plexus_sdk::{
    InitContext, Method, NodeId, Pattern, Reply, Request, Response, export_pattern, http,
    messaging, timers,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub mod policy;

use policy::{Latencies, Scope, Upstream, Window};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    upstreams: Vec<Upstream>,
    #[serde(default = "yes")]
    access_log: bool,
}

fn yes() -> bool {
    true
}

/// The timer that shares budget counts with the other nodes.
const SHARE: u64 = 1;
const SHARE_EVERY_MS: u64 = 500;
/// Timers of a call's retry and hedge: these plus the call's number.
const RETRY: u64 = 1 << 40;
const HEDGE: u64 = 2 << 40;
const TOPIC: &str = "ambassador.budget";

/// What one upstream has seen on this node.
#[derive(Default, Serialize, Deserialize, Clone)]
struct Stats {
    requests: u64,
    attempts: u64,
    retries: u64,
    budget_refused: u64,
    hedges: u64,
    hedges_won: u64,
    answered_2xx: u64,
    answered_4xx: u64,
    answered_5xx: u64,
    failed: u64,
}

/// A counter of [`Stats`] by its metric name.
type Field = (&'static str, fn(&Stats) -> u64);

/// A call under way.
struct Call {
    upstream: usize,
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    /// `None` when too large to keep: sent once.
    body: Option<Vec<u8>>,
    first_body: Vec<u8>,
    held: Pending,
    started_ms: u64,
    deadline_ms: u64,
    attempts: u32,
    retries: u32,
    in_flight: u32,
    /// The number of the hedge attempt, once one is sent.
    hedge: Option<u32>,
    /// The attempt whose answer stands if nothing better comes.
    last: Option<Result<Response, FetchError>>,
}

pub struct Ambassador {
    upstreams: Vec<Upstream>,
    stats: Vec<Stats>,
    windows: Vec<Window>,
    latencies: Vec<Latencies>,
    /// Other nodes' window totals per upstream: (when heard, requests,
    /// retries).
    peers: HashMap<(NodeId, String), (u64, u64, u64)>,
    calls: HashMap<u64, Call>,
    next_call: u64,
    rng: u64,
    access_log: bool,
}

impl Ambassador {
    /// A draw in [0, 1) (xorshift; jitter needs no more).
    fn draw(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Requests and retries in the budget's window: this node's, plus the
    /// other nodes' for a cluster-wide budget.
    fn window(&mut self, u: usize) -> (u64, u64) {
        let now = timers::now_ms();
        let b = self.upstreams[u].budget.clone();
        let (mut r, mut q) = self.windows[u].totals(now, b.ttl_ms);
        if b.scope == Scope::Cluster {
            let name = &self.upstreams[u].name;
            for ((_, n), (at, pr, pq)) in &self.peers {
                if n == name && now.saturating_sub(*at) <= b.ttl_ms {
                    r += pr;
                    q += pq;
                }
            }
        }
        (r, q)
    }

    /// Takes one retry (or hedge) from the budget, if it has one.
    fn spend(&mut self, u: usize) -> bool {
        let (r, q) = self.window(u);
        if self.upstreams[u].budget.allows(r, q) {
            self.windows[u].retry(timers::now_ms());
            true
        } else {
            self.stats[u].budget_refused += 1;
            false
        }
    }

    fn start(&mut self, req: Request) -> Reply {
        let rest = req.path.strip_prefix('/').unwrap_or(&req.path);
        let (name, tail) = rest.split_once('/').map_or((rest, ""), |(n, t)| (n, t));
        let Some(u) = self.upstreams.iter().position(|x| x.name == name) else {
            return Response::error(404, &format!("no upstream `{name}`")).into();
        };
        let up = &self.upstreams[u];
        let mut path = format!("/{tail}");
        if !req.query.is_empty() {
            path.push('?');
            path.push_str(&req.query);
        }
        let now = timers::monotonic_ms();
        let keep = req.body.len() <= up.max_buffered_body_bytes;
        let hedge = up
            .hedge
            .clone()
            .filter(|_| up.may_repeat(req.method) && keep);
        let call = Call {
            upstream: u,
            method: req.method,
            path,
            headers: plexus_sdk::http::end_to_end(&req.headers),
            body: keep.then(|| req.body.clone()),
            first_body: req.body,
            held: replies::hold(),
            started_ms: now,
            deadline_ms: now + up.timeout_ms,
            attempts: 0,
            retries: 0,
            in_flight: 0,
            hedge: None,
            last: None,
        };
        let held = call.held;
        self.windows[u].request(timers::now_ms());
        self.stats[u].requests += 1;
        self.next_call += 1;
        let id = self.next_call;
        self.calls.insert(id, call);
        if let Some(h) = hedge
            && let Some(p) = self.latencies[u].percentile(h.percentile)
        {
            timers::set(HEDGE + id, p.max(h.min_delay_ms));
        }
        self.send(id);
        held.into()
    }

    /// Sends one attempt of call `id`.
    fn send(&mut self, id: u64) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let now = timers::monotonic_ms();
        if now >= call.deadline_ms {
            let last = call.last.take().unwrap_or(Err(FetchError::Timeout));
            self.finish(id, last);
            return;
        }
        let up = &self.upstreams[call.upstream];
        let timeout = up.per_try_timeout_ms.min(call.deadline_ms - now) as u32;
        let body = match &call.body {
            Some(b) => b.clone(),
            None => std::mem::take(&mut call.first_body),
        };
        let out = OutgoingRequest {
            method: call.method,
            url: format!("{}{}", up.url.trim_end_matches('/'), call.path),
            headers: call.headers.clone(),
            body,
        };
        call.attempts += 1;
        call.in_flight += 1;
        let attempt = call.attempts;
        let u = call.upstream;
        self.stats[u].attempts += 1;
        let sent = http::fetch(self, out, timeout.max(1), move |p: &mut Ambassador, r| {
            p.answered(id, attempt, now, r);
            // The client is answered through the call's own held reply.
            Response::new(204, "text/plain", Vec::new())
        });
        if let Err(e) = sent {
            self.answered(id, attempt, now, Err(e));
        }
    }

    /// Attempt `attempt` of call `id`, sent at `sent_ms`, came back.
    fn answered(
        &mut self,
        id: u64,
        attempt: u32,
        sent_ms: u64,
        result: Result<Response, FetchError>,
    ) {
        let Some(call) = self.calls.get_mut(&id) else {
            // A hedge that lost, or an attempt after the call ended.
            return;
        };
        call.in_flight -= 1;
        let u = call.upstream;
        let up = &self.upstreams[u];
        let outcome = result.as_ref().map(|r| r.status).map_err(Clone::clone);
        if let Ok(s) = outcome
            && s < 500
        {
            self.latencies[u].add(timers::monotonic_ms().saturating_sub(sent_ms));
        }
        if !up.retriable(&outcome) {
            if call.hedge == Some(attempt) {
                self.stats[u].hedges_won += 1;
            }
            self.finish(id, result);
            return;
        }
        call.last = Some(result);
        if call.in_flight > 0 {
            // The other attempt may still succeed.
            return;
        }
        let may = call.retries < up.num_retries
            && up.may_repeat(call.method)
            && call.body.is_some()
            && timers::monotonic_ms() < call.deadline_ms;
        if may && self.spend(u) {
            let call = self.calls.get_mut(&id).expect("present");
            call.retries += 1;
            let retry = call.retries;
            self.stats[u].retries += 1;
            let draw = self.draw();
            let wait = self.upstreams[u].backoff_ms(retry, draw);
            timers::set(RETRY + id, wait);
            return;
        }
        let last = self
            .calls
            .get_mut(&id)
            .and_then(|c| c.last.take())
            .unwrap_or(Err(FetchError::Timeout));
        self.finish(id, last);
    }

    /// Answers call `id` with `result` and forgets it.
    fn finish(&mut self, id: u64, result: Result<Response, FetchError>) {
        let Some(call) = self.calls.remove(&id) else {
            return;
        };
        timers::cancel(HEDGE + id);
        timers::cancel(RETRY + id);
        let s = &mut self.stats[call.upstream];
        let mut response = match result {
            Ok(mut r) => {
                match r.status {
                    200..=399 => s.answered_2xx += 1,
                    400..=499 => s.answered_4xx += 1,
                    _ => s.answered_5xx += 1,
                }
                r.headers = plexus_sdk::http::end_to_end(&r.headers);
                r
            }
            Err(e) => {
                s.failed += 1;
                Response::from(e)
            }
        };
        response = response.with_header("x-ambassador-attempts", &call.attempts.to_string());
        if self.access_log {
            let ms = timers::monotonic_ms().saturating_sub(call.started_ms);
            plexus_sdk::info!(
                "{} {} {} -> {} in {} ms, {} attempts",
                self.upstreams[call.upstream].name,
                call.method.as_str(),
                call.path,
                response.status,
                ms,
                call.attempts
            );
        }
        replies::answer(call.held, response);
    }

    fn hedge(&mut self, id: u64) {
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        if call.in_flight != 1 {
            return;
        }
        let u = call.upstream;
        if self.spend(u) {
            self.stats[u].hedges += 1;
            if let Some(c) = self.calls.get_mut(&id) {
                c.hedge = Some(c.attempts + 1);
            }
            self.send(id);
        }
    }

    /// Sends this node's window totals to the others.
    fn share(&mut self) {
        let now = timers::now_ms();
        let mut counts = Vec::new();
        for u in 0..self.upstreams.len() {
            if self.upstreams[u].budget.scope == Scope::Cluster {
                let ttl = self.upstreams[u].budget.ttl_ms;
                let (r, q) = self.windows[u].totals(now, ttl);
                counts.push((self.upstreams[u].name.clone(), r, q));
            }
        }
        if !counts.is_empty() {
            let _ = messaging::broadcast(TOPIC, &serde_json::to_vec(&counts).unwrap_or_default());
            timers::set(SHARE, SHARE_EVERY_MS);
        }
    }

    fn status(&mut self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for u in 0..self.upstreams.len() {
            let (r, q) = self.window(u);
            let up = &self.upstreams[u];
            out.insert(
                up.name.clone(),
                json!({
                    "stats": self.stats[u],
                    "budget": {
                        "scope": up.budget.scope,
                        "window_requests": r,
                        "window_retries": q,
                        "allows_retry": up.budget.allows(r, q),
                    },
                    "hedge_after_ms": up.hedge.as_ref().and_then(|h| self.latencies[u].percentile(h.percentile)),
                }),
            );
        }
        json!({ "upstreams": out, "calls_in_flight": self.calls.len() })
    }

    fn metrics(&mut self) -> String {
        let mut out = String::new();
        let fields: [Field; 10] = [
            ("requests", |s| s.requests),
            ("attempts", |s| s.attempts),
            ("retries", |s| s.retries),
            ("retries_refused_by_budget", |s| s.budget_refused),
            ("hedges", |s| s.hedges),
            ("hedges_won", |s| s.hedges_won),
            ("answered_2xx", |s| s.answered_2xx),
            ("answered_4xx", |s| s.answered_4xx),
            ("answered_5xx", |s| s.answered_5xx),
            ("failed", |s| s.failed),
        ];
        for (name, get) in fields {
            out.push_str(&format!("# TYPE ambassador_{name}_total counter\n"));
            for (u, up) in self.upstreams.iter().enumerate() {
                out.push_str(&format!(
                    "ambassador_{name}_total{{upstream=\"{}\"}} {}\n",
                    up.name,
                    get(&self.stats[u])
                ));
            }
        }
        out
    }
}

impl Pattern for Ambassador {
    type Command = ();
    type Output = ();

    fn init(ctx: InitContext) -> Result<Self, String> {
        let s: Settings = ctx.config()?;
        if s.upstreams.is_empty() {
            return Err("config.upstreams: list at least one".into());
        }
        for u in &s.upstreams {
            u.check().map_err(|e| format!("config.{e}"))?;
        }
        let n = s.upstreams.len();
        if s.upstreams.iter().any(|u| u.budget.scope == Scope::Cluster) {
            timers::set(SHARE, SHARE_EVERY_MS);
        }
        Ok(Ambassador {
            upstreams: s.upstreams,
            stats: vec![Stats::default(); n],
            windows: vec![Window::default(); n],
            latencies: (0..n).map(|_| Latencies::default()).collect(),
            peers: HashMap::new(),
            calls: HashMap::new(),
            next_call: 0,
            rng: timers::monotonic_ms() ^ 0x9e37_79b9_7f4a_7c15 | 1,
            access_log: s.access_log,
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        match req.path.as_str() {
            "/_amb/status" => Response::json(200, &self.status()).into(),
            "/_amb/metrics" => Response::new(
                200,
                "text/plain; version=0.0.4",
                self.metrics().into_bytes(),
            )
            .into(),
            _ => self.start(req),
        }
    }

    fn on_message(&mut self, from: NodeId, topic: String, payload: Vec<u8>) -> Option<Vec<u8>> {
        if topic == TOPIC
            && let Ok(counts) = serde_json::from_slice::<Vec<(String, u64, u64)>>(&payload)
        {
            let now = timers::now_ms();
            for (name, r, q) in counts {
                self.peers.insert((from.clone(), name), (now, r, q));
            }
        }
        None
    }

    fn on_timer(&mut self, id: u64) {
        match id {
            SHARE => self.share(),
            i if i >= HEDGE => self.hedge(i - HEDGE),
            i if i >= RETRY => self.send(i - RETRY),
            _ => {}
        }
    }

    fn snapshot(&mut self) -> Vec<u8> {
        serde_json::to_vec(&(&self.stats, &self.windows)).unwrap_or_default()
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        if state.is_empty() {
            return Ok(());
        }
        let (stats, windows): (Vec<Stats>, Vec<Window>) =
            serde_json::from_slice(&state).map_err(|e| e.to_string())?;
        if stats.len() == self.stats.len() {
            self.stats = stats;
            self.windows = windows;
        }
        Ok(())
    }
}

export_pattern!(Ambassador);

#[cfg(test)]
mod tests;
