//! The config table and its checks. Options carry resilience4j's names in
//! snake_case (`failureRateThreshold` is `failure_rate_threshold`), set
//! for every upstream in `[defaults]` (resilience4j's `configs.default`)
//! and per upstream beside its `name` and `url`. Durations are
//! milliseconds, or a string with a unit: `"500ms"`, `"10s"`, `"2m"`,
//! `"1h"`. Every error names its key as `config.KEY: what is wrong`.

use serde::Deserialize;

use crate::breaker::{Rules, Scope, Wait, WindowType};

/// A duration: milliseconds, or a string with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub u64);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(ms) => Ok(Millis(ms)),
            Raw::Text(s) => parse_duration(&s).map(Millis).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{s}` is not a duration: milliseconds, or a number with ms, s, m or h"
                ))
            }),
        }
    }
}

fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let scale = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// `sliding_window_type`, spelt as resilience4j spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum WindowTypeName {
    /// The last N calls.
    #[serde(rename = "COUNT_BASED")]
    CountBased,
    /// The calls of the last N seconds.
    #[serde(rename = "TIME_BASED")]
    TimeBased,
}

/// `scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeName {
    /// Each node has its own breaker.
    Node,
    /// The nodes sum their windows and agree on transitions through the log.
    Cluster,
}

/// One item of `record_statuses` or `ignore_statuses`: a status (`503`),
/// a class (`"5xx"`) or a range (`"500-504"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRange(pub u16, pub u16);

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StatusRange, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u16),
            Text(String),
        }
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "`{s}` is not a status, a class such as \"5xx\" or a range such as \"500-504\""
            ))
        };
        let range = match Raw::deserialize(d)? {
            Raw::Number(n) => StatusRange(n, n),
            Raw::Text(s) => {
                let t = s.trim();
                if let Some(class) = t.strip_suffix("xx").and_then(|c| c.parse::<u16>().ok()) {
                    StatusRange(class * 100, class * 100 + 99)
                } else if let Some((a, b)) = t.split_once('-') {
                    let a = a.trim().parse().map_err(|_| bad(&s))?;
                    let b = b.trim().parse().map_err(|_| bad(&s))?;
                    StatusRange(a, b)
                } else {
                    let n = t.parse().map_err(|_| bad(&s))?;
                    StatusRange(n, n)
                }
            }
        };
        if !(100..=599).contains(&range.0) || !(100..=599).contains(&range.1) || range.0 > range.1 {
            return Err(serde::de::Error::custom(format!(
                "{}-{} is not a range of HTTP statuses (100 to 599)",
                range.0, range.1
            )));
        }
        Ok(range)
    }
}

/// A failure to reach an outcome with the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The connection could not be made (nothing was sent).
    Connect,
    /// No response within `timeout_duration`.
    Timeout,
    /// The connection broke after sending.
    Broken,
    /// The response was larger than the plugin's `max_response_bytes`.
    TooLarge,
}

impl ErrorKind {
    /// Every kind: by default, each counts as a failure.
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Broken,
        ErrorKind::TooLarge,
    ];
}

/// Declares the breaker options once, for `[defaults]` and for each
/// upstream (where they sit beside `name`, `url` and `prefixes`).
macro_rules! options {
    ($( $(#[$doc:meta])* $field:ident : $ty:ty ),* $(,)?) => {
        /// The breaker options, each optional: `[defaults]`, or what an
        /// upstream sets itself.
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Options {
            $( $(#[$doc])* #[serde(default)] pub $field: Option<$ty>, )*
        }

        /// One upstream and the options it sets itself.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct UpstreamSpec {
            /// Its name: the first segment of the paths that go to it, and
            /// the breaker's name. 1 to 64 of `A-Z a-z 0-9 . _ -`, not
            /// starting with `_`.
            pub name: String,
            /// `http://HOST:PORT`, with an optional base path.
            pub url: String,
            /// Further path prefixes that go to it, passed on whole.
            #[serde(default)]
            pub prefixes: Vec<String>,
            $( $(#[$doc])* #[serde(default)] pub $field: Option<$ty>, )*
        }

        impl UpstreamSpec {
            /// The options it sets itself.
            pub fn options(&self) -> Options {
                Options { $( $field: self.$field.clone(), )* }
            }
        }

        impl Options {
            /// `own`, with what it leaves out taken from `self`.
            pub fn under(&self, own: Options) -> Options {
                Options { $( $field: own.$field.or_else(|| self.$field.clone()), )* }
            }
        }
    };
}

options! {
    /// `node` (default) or `cluster`.
    scope: ScopeName,
    /// `COUNT_BASED` (default) or `TIME_BASED`.
    sliding_window_type: WindowTypeName,
    /// Calls (count-based, 1..=10000) or seconds (time-based, 1..=3600); 100.
    sliding_window_size: u32,
    /// Calls the window must hold before its rates count; 100.
    minimum_number_of_calls: u32,
    /// Failures in percent that open the breaker, (0, 100]; 50.
    failure_rate_threshold: f64,
    /// Slow calls in percent that open the breaker, (0, 100]; 100.
    slow_call_rate_threshold: f64,
    /// A call that takes longer is slow; 60 s.
    slow_call_duration_threshold: Millis,
    /// How long the breaker stays open before it half-opens; 60 s.
    wait_duration_in_open_state: Millis,
    /// Whether the wait grows with each opening in a row; false.
    enable_exponential_backoff: bool,
    /// The growth of the wait per opening in a row, at least 1; 1.5.
    exponential_backoff_multiplier: f64,
    /// The longest wait; unbounded (a day) by default.
    exponential_max_wait_duration_in_open_state: Millis,
    /// Calls that probe the upstream in half-open, 1..=10000; 10.
    permitted_number_of_calls_in_half_open_state: u32,
    /// Half-open for longer without an outcome opens again; 0 waits.
    max_wait_duration_in_half_open_state: Millis,
    /// Half-open when the wait is over, without waiting for a call; false.
    automatic_transition_from_open_to_half_open_enabled: bool,
    /// Statuses that count as failures; `["5xx"]`.
    record_statuses: Vec<StatusRange>,
    /// Statuses that count neither way; none.
    ignore_statuses: Vec<StatusRange>,
    /// Errors that count as failures; the others count neither way. All.
    record_errors: Vec<ErrorKind>,
    /// How long a call may take before it fails with `timeout`; 5 s.
    timeout_duration: Millis,
}

/// The config table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The upstreams, one breaker each; at least one.
    pub upstreams: Vec<UpstreamSpec>,
    /// Options for every upstream that does not set them.
    #[serde(default)]
    pub defaults: Options,
    /// A bearer token for the `POST /_cb/...` actions; without one they
    /// are off.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Cluster scope: how often each node sends its window counts to the
    /// others (when they changed; once a second in any case).
    #[serde(default = "default_report_interval")]
    pub report_interval_ms: u64,
}

fn default_report_interval() -> u64 {
    250
}

/// One upstream, checked.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its name.
    pub name: String,
    /// Its URL, without a trailing `/`.
    pub url: String,
    /// Its extra prefixes.
    pub prefixes: Vec<String>,
    /// Node or cluster.
    pub scope: Scope,
    /// The breaker's options.
    pub rules: Rules,
    /// Statuses that fail.
    pub record_statuses: Vec<StatusRange>,
    /// Statuses that count neither way.
    pub ignore_statuses: Vec<StatusRange>,
    /// Errors that fail.
    pub record_errors: Vec<ErrorKind>,
    /// The call timeout.
    pub timeout_ms: u32,
}

/// The longest wait when exponential backoff has no maximum: a day.
pub const LONGEST_WAIT_MS: u64 = 86_400_000;

/// Checks the settings; the upstreams in config order.
pub fn check(s: &Settings) -> Result<Vec<Upstream>, String> {
    if s.upstreams.is_empty() {
        return Err("config.upstreams: at least one upstream".into());
    }
    if !(10..=60_000).contains(&s.report_interval_ms) {
        return Err("config.report_interval_ms: must be in 10..=60000".into());
    }
    if let Some(t) = &s.admin_token
        && t.len() < 8
    {
        return Err("config.admin_token: at least 8 bytes".into());
    }
    check_options(&s.defaults, "config.defaults")?;
    let mut out: Vec<Upstream> = Vec::new();
    for (i, spec) in s.upstreams.iter().enumerate() {
        let at = format!("config.upstreams[{i}]");
        let own = spec.options();
        check_options(&own, &at)?;
        let name = &spec.name;
        if !plexus_sdk::http::is_ident(name) || name.len() > 64 || name.starts_with('_') {
            return Err(format!(
                "{at}.name: `{name}` must be 1 to 64 of A-Z a-z 0-9 . _ -, not starting with `_`"
            ));
        }
        if out.iter().any(|u| u.name == *name) {
            return Err(format!("{at}.name: `{name}` is named twice"));
        }
        let url = spec.url.trim_end_matches('/');
        if !url.starts_with("http://") || url.len() <= "http://".len() {
            return Err(format!("{at}.url: `{}` must be http://HOST:PORT", spec.url));
        }
        for (k, p) in spec.prefixes.iter().enumerate() {
            if !p.starts_with('/') || p.len() < 2 || p.starts_with("/_cb") {
                return Err(format!(
                    "{at}.prefixes[{k}]: `{p}` must start with `/`, hold more than `/` and not be under /_cb"
                ));
            }
            if out.iter().any(|u| u.prefixes.contains(p)) || spec.prefixes[..k].contains(p) {
                return Err(format!("{at}.prefixes[{k}]: `{p}` is given twice"));
            }
        }
        let o = s.defaults.under(own);
        // The key of an option as the error names it: where it was set.
        let key = |field: &str, own: bool| {
            if own {
                format!("{at}.{field}")
            } else {
                format!("config.defaults.{field}")
            }
        };
        let window_type = match o.sliding_window_type {
            Some(WindowTypeName::TimeBased) => WindowType::TimeBased,
            _ => WindowType::CountBased,
        };
        let window_size = o.sliding_window_size.unwrap_or(100);
        let max_size = match window_type {
            WindowType::CountBased => 10_000,
            WindowType::TimeBased => 3600,
        };
        if !(1..=max_size).contains(&window_size) {
            return Err(format!(
                "{}: must be in 1..={max_size} for {}",
                key("sliding_window_size", spec.sliding_window_size.is_some()),
                window_type.name()
            ));
        }
        let backoff = o.enable_exponential_backoff.unwrap_or(false);
        for (field, set) in [
            (
                "exponential_backoff_multiplier",
                o.exponential_backoff_multiplier.is_some(),
            ),
            (
                "exponential_max_wait_duration_in_open_state",
                o.exponential_max_wait_duration_in_open_state.is_some(),
            ),
        ] {
            if set && !backoff {
                let own = match field {
                    "exponential_backoff_multiplier" => {
                        spec.exponential_backoff_multiplier.is_some()
                    }
                    _ => spec.exponential_max_wait_duration_in_open_state.is_some(),
                };
                return Err(format!(
                    "{}: has no effect without enable_exponential_backoff = true",
                    key(field, own)
                ));
            }
        }
        let base = o.wait_duration_in_open_state.map_or(60_000, |m| m.0);
        let multiplier = if backoff {
            o.exponential_backoff_multiplier.unwrap_or(1.5)
        } else {
            1.0
        };
        let max = if backoff {
            o.exponential_max_wait_duration_in_open_state
                .map_or(LONGEST_WAIT_MS, |m| m.0)
        } else {
            base
        };
        if max < base {
            return Err(format!(
                "{}: must be at least wait_duration_in_open_state ({base} ms)",
                key(
                    "exponential_max_wait_duration_in_open_state",
                    spec.exponential_max_wait_duration_in_open_state.is_some()
                )
            ));
        }
        let rules = Rules {
            window_type,
            window_size,
            minimum_number_of_calls: o.minimum_number_of_calls.unwrap_or(100),
            failure_rate_threshold: o.failure_rate_threshold.unwrap_or(50.0),
            slow_call_rate_threshold: o.slow_call_rate_threshold.unwrap_or(100.0),
            slow_call_duration_threshold_ms: o.slow_call_duration_threshold.map_or(60_000, |m| m.0),
            wait: Wait {
                base_ms: base,
                multiplier_milli: (multiplier * 1000.0).round() as u64,
                max_ms: max,
            },
            permitted_calls_in_half_open: o
                .permitted_number_of_calls_in_half_open_state
                .unwrap_or(10),
            max_wait_in_half_open_ms: o.max_wait_duration_in_half_open_state.map_or(0, |m| m.0),
            automatic_transition: o
                .automatic_transition_from_open_to_half_open_enabled
                .unwrap_or(false),
        };
        out.push(Upstream {
            name: name.clone(),
            url: url.to_string(),
            prefixes: spec.prefixes.clone(),
            scope: match o.scope {
                Some(ScopeName::Cluster) => Scope::Cluster,
                _ => Scope::Node,
            },
            rules,
            record_statuses: o
                .record_statuses
                .unwrap_or_else(|| vec![StatusRange(500, 599)]),
            ignore_statuses: o.ignore_statuses.unwrap_or_default(),
            record_errors: o.record_errors.unwrap_or_else(|| ErrorKind::ALL.to_vec()),
            timeout_ms: o.timeout_duration.map_or(5000, |m| m.0) as u32,
        });
    }
    Ok(out)
}

/// The checks of single options, wherever they are set.
fn check_options(o: &Options, at: &str) -> Result<(), String> {
    let percent = |v: Option<f64>, field: &str| match v {
        Some(p) if !(p > 0.0 && p <= 100.0) => {
            Err(format!("{at}.{field}: must be a percentage in (0, 100]"))
        }
        _ => Ok(()),
    };
    percent(o.failure_rate_threshold, "failure_rate_threshold")?;
    percent(o.slow_call_rate_threshold, "slow_call_rate_threshold")?;
    let range = |v: Option<u64>, field: &str, lo: u64, hi: u64| match v {
        Some(n) if !(lo..=hi).contains(&n) => Err(format!("{at}.{field}: must be in {lo}..={hi}")),
        _ => Ok(()),
    };
    range(
        o.minimum_number_of_calls.map(u64::from),
        "minimum_number_of_calls",
        1,
        1_000_000,
    )?;
    range(
        o.permitted_number_of_calls_in_half_open_state
            .map(u64::from),
        "permitted_number_of_calls_in_half_open_state",
        1,
        10_000,
    )?;
    range(
        o.slow_call_duration_threshold.map(|m| m.0),
        "slow_call_duration_threshold",
        1,
        LONGEST_WAIT_MS,
    )?;
    range(
        o.wait_duration_in_open_state.map(|m| m.0),
        "wait_duration_in_open_state",
        1,
        LONGEST_WAIT_MS,
    )?;
    range(
        o.exponential_max_wait_duration_in_open_state.map(|m| m.0),
        "exponential_max_wait_duration_in_open_state",
        1,
        LONGEST_WAIT_MS,
    )?;
    range(
        o.max_wait_duration_in_half_open_state.map(|m| m.0),
        "max_wait_duration_in_half_open_state",
        0,
        LONGEST_WAIT_MS,
    )?;
    range(
        o.timeout_duration.map(|m| m.0),
        "timeout_duration",
        1,
        60_000,
    )?;
    if let Some(m) = o.exponential_backoff_multiplier
        && !(1.0..=100.0).contains(&m)
    {
        return Err(format!(
            "{at}.exponential_backoff_multiplier: must be in 1..=100"
        ));
    }
    Ok(())
}
