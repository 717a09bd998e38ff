//! An upstream's settings and the decisions made from them: which
//! outcomes are retried, how long to back off, when to hedge, and the
//! retry budget.

use std::collections::VecDeque;

use plexus_sdk::Method;
use plexus_sdk::http::FetchError;
use serde::{Deserialize, Serialize};

/// One upstream, with Envoy's retry policy names where they fit.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Requests to `/{name}/...` go to `url` + `/...`.
    pub name: String,
    pub url: String,
    /// The whole call, retries included.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// One attempt.
    #[serde(default = "default_per_try")]
    pub per_try_timeout_ms: u64,
    /// Retries after the first attempt.
    #[serde(default = "default_retries")]
    pub num_retries: u32,
    /// What is retried: `5xx`, `gateway-error` (502, 503, 504),
    /// `connect-failure`, `reset`, `timeout` (a per-try timeout),
    /// `retriable-status-codes`.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<String>,
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    /// Retries of POST and PATCH too (not idempotent: off by default).
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Backoff: a random wait up to `base_interval_ms` × 2^retry, capped
    /// at `max_interval_ms` (full jitter).
    #[serde(default = "default_base")]
    pub base_interval_ms: u64,
    #[serde(default = "default_max_interval")]
    pub max_interval_ms: u64,
    #[serde(default)]
    pub budget: Budget,
    pub hedge: Option<Hedge>,
    /// Request bodies up to this are kept for retries; a larger one is
    /// sent once.
    #[serde(default = "default_body")]
    pub max_buffered_body_bytes: usize,
}

fn default_timeout() -> u64 {
    15_000
}
fn default_per_try() -> u64 {
    5_000
}
fn default_retries() -> u32 {
    2
}
fn default_retry_on() -> Vec<String> {
    vec!["5xx".into(), "connect-failure".into(), "reset".into()]
}
fn default_base() -> u64 {
    25
}
fn default_max_interval() -> u64 {
    250
}
fn default_body() -> usize {
    64 * 1024
}

/// Where a budget is counted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    Node,
    /// Requests and retries summed over every node.
    Cluster,
}

/// A retry budget after Finagle's and Linkerd's: over the last `ttl_ms`,
/// retries may be at most `retry_ratio` of requests plus
/// `min_retries_per_second` × the window.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    pub retry_ratio: f64,
    pub min_retries_per_second: u64,
    pub ttl_ms: u64,
    pub scope: Scope,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            retry_ratio: 0.2,
            min_retries_per_second: 10,
            ttl_ms: 10_000,
            scope: Scope::Node,
        }
    }
}

/// A second attempt sent when the first has not answered by the
/// `percentile` of recent latencies (at least `min_delay_ms`).
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Hedge {
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    #[serde(default = "default_min_delay")]
    pub min_delay_ms: u64,
}

fn default_percentile() -> f64 {
    95.0
}
fn default_min_delay() -> u64 {
    5
}

impl Upstream {
    pub fn check(&self) -> Result<(), String> {
        let at = format!("upstreams.{}", self.name);
        if !plexus_sdk::http::is_ident(&self.name) {
            return Err(format!("{at}: a name of A-Z a-z 0-9 . _ -"));
        }
        if !self.url.starts_with("http://") {
            return Err(format!("{at}.url: an http:// URL"));
        }
        for r in &self.retry_on {
            if ![
                "5xx",
                "gateway-error",
                "connect-failure",
                "reset",
                "timeout",
                "retriable-status-codes",
            ]
            .contains(&r.as_str())
            {
                return Err(format!("{at}.retry_on: `{r}` is not a retry condition"));
            }
        }
        if !(0.0..=10.0).contains(&self.budget.retry_ratio) || self.budget.ttl_ms < 1000 {
            return Err(format!(
                "{at}.budget: retry_ratio in 0..=10, ttl_ms at least 1000"
            ));
        }
        if self
            .hedge
            .as_ref()
            .is_some_and(|h| !(1.0..=99.9).contains(&h.percentile))
        {
            return Err(format!("{at}.hedge.percentile: 1 to 99.9"));
        }
        Ok(())
    }

    /// Whether a request of `method` may be sent more than once.
    pub fn may_repeat(&self, method: Method) -> bool {
        self.retry_non_idempotent || !matches!(method, Method::Post | Method::Patch)
    }

    fn on(&self, what: &str) -> bool {
        self.retry_on.iter().any(|r| r == what)
    }

    /// Whether an attempt's outcome is one to retry.
    pub fn retriable(&self, outcome: &Result<u16, FetchError>) -> bool {
        match outcome {
            Ok(s) => {
                (self.on("5xx") && *s >= 500)
                    || (self.on("gateway-error") && [502, 503, 504].contains(s))
                    || (self.on("retriable-status-codes")
                        && self.retriable_status_codes.contains(s))
            }
            Err(FetchError::Connect(_)) => self.on("connect-failure"),
            Err(FetchError::Broken(_)) => self.on("reset"),
            Err(FetchError::Timeout) => self.on("timeout") || self.on("5xx"),
            Err(_) => false,
        }
    }

    /// The wait before retry number `retry` (1, 2, ...), for a random
    /// `draw` in [0, 1).
    pub fn backoff_ms(&self, retry: u32, draw: f64) -> u64 {
        let cap = self
            .base_interval_ms
            .saturating_mul(1u64 << retry.min(20))
            .min(self.max_interval_ms);
        (cap as f64 * draw) as u64
    }
}

/// Requests and retries counted in one-second slots over a window.
#[derive(Default, Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Window {
    /// (second, requests, retries), oldest first.
    slots: VecDeque<(u64, u64, u64)>,
}

impl Window {
    fn slot(&mut self, now_ms: u64) -> &mut (u64, u64, u64) {
        let second = now_ms / 1000;
        if self.slots.back().is_none_or(|s| s.0 != second) {
            self.slots.push_back((second, 0, 0));
        }
        self.slots.back_mut().expect("pushed")
    }

    fn trim(&mut self, now_ms: u64, ttl_ms: u64) {
        let oldest = now_ms.saturating_sub(ttl_ms) / 1000;
        while self.slots.front().is_some_and(|s| s.0 < oldest) {
            self.slots.pop_front();
        }
    }

    pub fn request(&mut self, now_ms: u64) {
        self.slot(now_ms).1 += 1;
    }

    pub fn retry(&mut self, now_ms: u64) {
        self.slot(now_ms).2 += 1;
    }

    /// Requests and retries in the window ending at `now_ms`.
    pub fn totals(&mut self, now_ms: u64, ttl_ms: u64) -> (u64, u64) {
        self.trim(now_ms, ttl_ms);
        self.slots
            .iter()
            .fold((0, 0), |(r, q), s| (r + s.1, q + s.2))
    }
}

impl Budget {
    /// Whether one more retry fits, given the requests and retries in the
    /// window (this node's, or every node's).
    pub fn allows(&self, requests: u64, retries: u64) -> bool {
        let floor = self.min_retries_per_second * self.ttl_ms / 1000;
        (retries as f64) < self.retry_ratio * requests as f64 + floor as f64
    }
}

/// Recent latencies, for the hedge delay.
#[derive(Default)]
pub struct Latencies {
    ring: VecDeque<u64>,
}

impl Latencies {
    pub fn add(&mut self, ms: u64) {
        if self.ring.len() == 1000 {
            self.ring.pop_front();
        }
        self.ring.push_back(ms);
    }

    /// The `p`th percentile, once there are 20 or more.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.ring.len() < 20 {
            return None;
        }
        let mut v: Vec<u64> = self.ring.iter().copied().collect();
        v.sort_unstable();
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        Some(v[i.min(v.len() - 1)])
    }
}
