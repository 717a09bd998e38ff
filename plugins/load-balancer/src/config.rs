//! The plugin's config table, with Envoy's names where they fit, and its
//! checks. Every error names its key as `config.KEY: what is wrong`.

use serde::Deserialize;

/// How the next backend is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Smooth weighted round robin (nginx's): in every run of turns, each
    /// backend gets its weight's share, spread out rather than in bursts.
    RoundRobin,
    /// A backend drawn at random, in proportion to its weight.
    Random,
    /// `choice_count` backends drawn at random; the one with the fewest
    /// requests in flight (per unit of weight) wins.
    LeastRequest,
    /// `choice_count` backends drawn at random; the one whose peak EWMA
    /// latency times requests in flight (plus one) is lowest wins.
    PeakEwma,
    /// Consistent hashing of `hash_header` over a Maglev table.
    Maglev,
}

impl LbPolicy {
    /// The name the config and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            LbPolicy::RoundRobin => "round_robin",
            LbPolicy::Random => "random",
            LbPolicy::LeastRequest => "least_request",
            LbPolicy::PeakEwma => "peak_ewma",
            LbPolicy::Maglev => "maglev",
        }
    }
}

/// The config table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The policy.
    #[serde(default = "default_policy")]
    pub lb_policy: LbPolicy,
    /// The backends, in order; at least one.
    pub backends: Vec<BackendSpec>,
    /// How long a forwarded request may take.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u32,
    /// Backends drawn for `least_request` and `peak_ewma` (Envoy's
    /// `choice_count`), at least 2.
    #[serde(default = "default_choice_count")]
    pub choice_count: u32,
    /// The header whose value `maglev` hashes; requests without it are
    /// spread at random.
    #[serde(default)]
    pub hash_header: Option<String>,
    /// Bounded load for `maglev`, in percent of the mean requests in
    /// flight (Envoy's `hash_balance_factor`): a backend over the bound
    /// passes its request to the next one on the table. 0 is off;
    /// otherwise at least 100.
    #[serde(default)]
    pub hash_balance_factor: u32,
    /// The time constant of the peak EWMA's decay.
    #[serde(default = "default_ewma_decay")]
    pub ewma_decay_ms: u64,
    /// When fewer than this percentage of the backends are in, requests
    /// are spread over all of them, ejected or not (Envoy's
    /// `healthy_panic_threshold`). 0 is never.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u32,
    /// A backend that comes back ramps its weight from 10% to all of it
    /// over this window. 0 is off.
    #[serde(default)]
    pub slow_start_window_ms: u64,
    /// Active health checks; none without the table.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Passive outlier detection, on by default.
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
}

/// One backend: an HTTP service outside the cluster (`url`), or a plugin
/// on a member node (`plugin` and `node`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Its name in metrics, status and verdicts: 1 to 64 of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// `http://HOST:PORT`, with an optional base path.
    #[serde(default)]
    pub url: Option<String>,
    /// A plugin to call through `plugins.call`.
    #[serde(default)]
    pub plugin: Option<String>,
    /// The node the plugin runs on.
    #[serde(default)]
    pub node: Option<String>,
    /// Its weight, 1 to 10000.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Active health checks (Envoy's names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// The path to `GET`; a 2xx is a pass.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// How often each backend is checked.
    #[serde(default = "default_health_interval")]
    pub interval_ms: u64,
    /// How long a check may take before it fails.
    #[serde(default = "default_health_timeout")]
    pub timeout_ms: u32,
    /// Passes in a row that make a backend healthy.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Failures in a row that make it unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

/// Passive outlier detection (Envoy's names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// 5xx answers or failed exchanges in a row that eject; 0 is off.
    #[serde(default = "default_consecutive_5xx")]
    pub consecutive_5xx: u32,
    /// The window of the failure percentage, and how often it is looked at.
    #[serde(default = "default_outlier_interval")]
    pub interval_ms: u64,
    /// A failure percentage over a window that ejects; 0 is off.
    #[serde(default)]
    pub failure_percentage_threshold: u32,
    /// Requests a backend must have had in the window for its failure
    /// percentage to count.
    #[serde(default = "default_request_volume")]
    pub failure_percentage_request_volume: u64,
    /// An ejection lasts this long times the backend's ejections so far.
    #[serde(default = "default_base_ejection")]
    pub base_ejection_time_ms: u64,
    /// The longest an ejection lasts; a backend in for this long has its
    /// count of ejections start again from zero.
    #[serde(default = "default_max_ejection")]
    pub max_ejection_time_ms: u64,
    /// At most this percentage of the backends are ejected by outlier
    /// detection at once, but always at least one.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: default_consecutive_5xx(),
            interval_ms: default_outlier_interval(),
            failure_percentage_threshold: 0,
            failure_percentage_request_volume: default_request_volume(),
            base_ejection_time_ms: default_base_ejection(),
            max_ejection_time_ms: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_policy() -> LbPolicy {
    LbPolicy::RoundRobin
}
fn default_timeout() -> u32 {
    5000
}
fn default_choice_count() -> u32 {
    2
}
fn default_ewma_decay() -> u64 {
    10_000
}
fn default_panic_threshold() -> u32 {
    50
}
fn default_weight() -> u32 {
    1
}
fn default_health_path() -> String {
    "/healthz".into()
}
fn default_health_interval() -> u64 {
    5000
}
fn default_health_timeout() -> u32 {
    1000
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_consecutive_5xx() -> u32 {
    5
}
fn default_outlier_interval() -> u64 {
    10_000
}
fn default_request_volume() -> u64 {
    50
}
fn default_base_ejection() -> u64 {
    30_000
}
fn default_max_ejection() -> u64 {
    300_000
}
fn default_max_ejection_percent() -> u32 {
    10
}

/// Where a backend's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An HTTP origin with an optional base path, without a trailing `/`.
    Url(String),
    /// A plugin on a node.
    Plugin { plugin: String, node: String },
}

fn field(key: &str, message: &str) -> String {
    format!("config.{key}: {message}")
}

fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn at_least(key: &str, value: u64, min: u64) -> Result<(), String> {
    if value < min {
        return Err(field(key, &format!("must be at least {min}")));
    }
    Ok(())
}

fn percent(key: &str, value: u32) -> Result<(), String> {
    if value > 100 {
        return Err(field(key, "is a percentage, 0 to 100"));
    }
    Ok(())
}

impl Settings {
    /// Checks what serde cannot; returns each backend's target.
    pub fn check(&self) -> Result<Vec<Target>, String> {
        if self.backends.is_empty() {
            return Err(field("backends", "list at least one backend"));
        }
        if self.backends.len() > 1000 {
            return Err(field("backends", "at most 1000 backends"));
        }
        let mut targets = Vec::with_capacity(self.backends.len());
        for (i, b) in self.backends.iter().enumerate() {
            let key = |k: &str| format!("backends[{i}].{k}");
            if !is_name(&b.name) {
                return Err(field(
                    &key("name"),
                    "1 to 64 of A-Z, a-z, 0-9, `.`, `_` and `-`",
                ));
            }
            if self.backends[..i].iter().any(|o| o.name == b.name) {
                return Err(field(
                    &key("name"),
                    &format!("`{}` is listed twice", b.name),
                ));
            }
            if !(1..=10_000).contains(&b.weight) {
                return Err(field(&key("weight"), "must be 1 to 10000"));
            }
            targets.push(match (&b.url, &b.plugin, &b.node) {
                (Some(url), None, None) => {
                    Target::Url(check_url(url).map_err(|m| field(&key("url"), &m))?)
                }
                (None, Some(plugin), Some(node)) if !plugin.is_empty() && !node.is_empty() => {
                    Target::Plugin {
                        plugin: plugin.clone(),
                        node: node.clone(),
                    }
                }
                (None, Some(_), None) => {
                    return Err(field(&key("node"), "a plugin backend names its node"));
                }
                _ => {
                    return Err(field(
                        &format!("backends[{i}]"),
                        "give either `url`, or `plugin` and `node`",
                    ));
                }
            });
        }
        at_least("timeout_ms", self.timeout_ms.into(), 1)?;
        at_least("choice_count", self.choice_count.into(), 2)?;
        at_least("ewma_decay_ms", self.ewma_decay_ms, 1)?;
        percent("panic_threshold", self.panic_threshold)?;
        if self.hash_balance_factor != 0 {
            at_least("hash_balance_factor", self.hash_balance_factor.into(), 100)?;
        }
        match &self.hash_header {
            Some(h)
                if h.is_empty() || h.bytes().any(|b| !(b.is_ascii_alphanumeric() || b == b'-')) =>
            {
                return Err(field("hash_header", "a header name: A-Z, a-z, 0-9 and `-`"));
            }
            None if self.lb_policy == LbPolicy::Maglev => {
                return Err(field("hash_header", "`maglev` needs the header to hash"));
            }
            _ => {}
        }
        if let Some(hc) = &self.health_check {
            if !hc.path.starts_with('/') {
                return Err(field("health_check.path", "must start with `/`"));
            }
            at_least("health_check.interval_ms", hc.interval_ms, 10)?;
            at_least("health_check.timeout_ms", hc.timeout_ms.into(), 1)?;
            at_least(
                "health_check.healthy_threshold",
                hc.healthy_threshold.into(),
                1,
            )?;
            at_least(
                "health_check.unhealthy_threshold",
                hc.unhealthy_threshold.into(),
                1,
            )?;
        }
        let od = &self.outlier_detection;
        at_least("outlier_detection.interval_ms", od.interval_ms, 10)?;
        at_least(
            "outlier_detection.base_ejection_time_ms",
            od.base_ejection_time_ms,
            1,
        )?;
        at_least(
            "outlier_detection.max_ejection_time_ms",
            od.max_ejection_time_ms,
            od.base_ejection_time_ms,
        )?;
        percent(
            "outlier_detection.max_ejection_percent",
            od.max_ejection_percent,
        )?;
        percent(
            "outlier_detection.failure_percentage_threshold",
            od.failure_percentage_threshold,
        )?;
        Ok(targets)
    }
}

/// `http://HOST:PORT[/base]` without a trailing `/`, or why not.
fn check_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("must start with http:// (outbound HTTP has no TLS yet)")?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains(['?', '#', ' ']) {
        return Err("must be http://HOST[:PORT][/PATH], without a query".into());
    }
    Ok(url.trim_end_matches('/').to_string())
}
