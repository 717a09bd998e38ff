//! One circuit breaker's state machine, apart from the host: the sliding
//! windows, the thresholds and the transitions, as resilience4j's
//! `CircuitBreakerStateMachine` has them. Time is handed in (wall-clock
//! milliseconds), so the tests drive it directly.
//!
//! - CLOSED permits every call and records its outcome in a sliding
//!   window (the last N calls, or the calls of the last N seconds). Once
//!   the window holds `minimum_number_of_calls`, a failure rate or a
//!   slow-call rate at or above its threshold opens the breaker.
//! - OPEN permits nothing until `wait_duration_in_open_state` is over
//!   (growing with each opening in a row when exponential backoff is on);
//!   then the next call (or a timer, with automatic transition) moves it
//!   to HALF_OPEN.
//! - HALF_OPEN permits `permitted_number_of_calls_in_half_open_state`
//!   calls, refuses the rest, and once they all have an outcome closes if
//!   both rates are below their thresholds, or opens again. With
//!   `max_wait_duration_in_half_open_state` it opens again when the calls
//!   do not finish in time.
//! - FORCED_OPEN refuses, DISABLED permits without recording and
//!   METRICS_ONLY permits and records without ever changing state, until
//!   an operator moves the breaker on.
//!
//! A breaker of `scope = "cluster"` runs the same machine, but does not
//! take its own transitions: it returns a [`Decision`] for the log, and
//! [`Breaker::enter`] adopts what the log agreed (see `cluster`).
//!
//! Each state has its own window: a call permitted in one state whose
//! outcome arrives after the breaker moved on is counted in the totals
//! but in no window, so a late answer from before an opening cannot
//! count as a half-open probe.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// The breaker's states, named as resilience4j names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum State {
    /// Calls pass and are recorded.
    #[default]
    Closed,
    /// Calls are refused until the wait is over.
    Open,
    /// A few calls pass to probe the upstream.
    HalfOpen,
    /// Calls are refused until an operator changes the state.
    ForcedOpen,
    /// Calls pass and are not recorded.
    Disabled,
    /// Calls pass and are recorded, and the state never changes by itself.
    MetricsOnly,
}

impl State {
    /// Every state, in the order of the metrics.
    pub const ALL: [State; 6] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::ForcedOpen,
        State::Disabled,
        State::MetricsOnly,
    ];

    /// Its name in status, headers and metrics.
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "CLOSED",
            State::Open => "OPEN",
            State::HalfOpen => "HALF_OPEN",
            State::ForcedOpen => "FORCED_OPEN",
            State::Disabled => "DISABLED",
            State::MetricsOnly => "METRICS_ONLY",
        }
    }
}

/// How the window of recorded calls is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowType {
    /// The last `sliding_window_size` calls.
    CountBased,
    /// The calls of the last `sliding_window_size` seconds, in buckets of
    /// one second.
    TimeBased,
}

impl WindowType {
    /// Its name, as the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            WindowType::CountBased => "COUNT_BASED",
            WindowType::TimeBased => "TIME_BASED",
        }
    }
}

/// How long the breaker stays open: `base_ms` the first time, times
/// `multiplier_milli / 1000` for each further opening in a row, up to
/// `max_ms`. In whole numbers, so every node of a cluster computes the
/// same wait from the same log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    /// `wait_duration_in_open_state`.
    pub base_ms: u64,
    /// `exponential_backoff_multiplier` × 1000; 1000 when backoff is off.
    pub multiplier_milli: u64,
    /// `exponential_max_wait_duration_in_open_state`.
    pub max_ms: u64,
}

impl Wait {
    /// The wait of the `attempts`-th opening in a row (1 for the first).
    pub fn after(&self, attempts: u32) -> u64 {
        let mut wait = self.base_ms;
        for _ in 1..attempts {
            let next = wait.saturating_mul(self.multiplier_milli) / 1000;
            // At the maximum, or too small to grow by the multiplier: the
            // rest of the openings wait the same.
            if wait >= self.max_ms || next <= wait {
                break;
            }
            wait = next;
        }
        wait.min(self.max_ms.max(self.base_ms))
    }
}

/// The options of one breaker, checked (see `config`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// `sliding_window_type`.
    pub window_type: WindowType,
    /// `sliding_window_size`: calls, or seconds.
    pub window_size: u32,
    /// `minimum_number_of_calls`.
    pub minimum_number_of_calls: u32,
    /// `failure_rate_threshold`, in percent.
    pub failure_rate_threshold: f64,
    /// `slow_call_rate_threshold`, in percent.
    pub slow_call_rate_threshold: f64,
    /// `slow_call_duration_threshold`: a call that takes longer is slow.
    pub slow_call_duration_threshold_ms: u64,
    /// `wait_duration_in_open_state` and its growth.
    pub wait: Wait,
    /// `permitted_number_of_calls_in_half_open_state`.
    pub permitted_calls_in_half_open: u32,
    /// `max_wait_duration_in_half_open_state`; 0 waits for the calls.
    pub max_wait_in_half_open_ms: u64,
    /// `automatic_transition_from_open_to_half_open_enabled`.
    pub automatic_transition: bool,
}

impl Default for Rules {
    /// resilience4j's defaults.
    fn default() -> Rules {
        Rules {
            window_type: WindowType::CountBased,
            window_size: 100,
            minimum_number_of_calls: 100,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            slow_call_duration_threshold_ms: 60_000,
            wait: Wait {
                base_ms: 60_000,
                multiplier_milli: 1000,
                max_ms: 60_000,
            },
            permitted_calls_in_half_open: 10,
            max_wait_in_half_open_ms: 0,
            automatic_transition: false,
        }
    }
}

impl Rules {
    /// The calls a closed window needs before its rates count: a count
    /// window never holds more than its size, so it needs at most that
    /// (as in resilience4j).
    pub fn minimum_calls(&self) -> u64 {
        let min = u64::from(self.minimum_number_of_calls);
        match self.window_type {
            WindowType::CountBased => min.min(u64::from(self.window_size)),
            WindowType::TimeBased => min,
        }
    }

    /// The rates of `counts` when they reach a threshold, with at least
    /// `minimum` calls; `None` below the minimum or both thresholds.
    pub fn exceeded(&self, counts: &Counts, minimum: u64) -> Option<Rates> {
        let rates = counts.rates(minimum)?;
        (rates.failure_rate >= self.failure_rate_threshold
            || rates.slow_call_rate >= self.slow_call_rate_threshold)
            .then_some(rates)
    }

    /// Whether a call of `duration_ms` is slow.
    pub fn is_slow(&self, duration_ms: u64) -> bool {
        duration_ms > self.slow_call_duration_threshold_ms
    }
}

/// A recorded call: whether it failed and whether it was slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// It counts as a failure.
    pub failed: bool,
    /// It took longer than `slow_call_duration_threshold`.
    pub slow: bool,
}

/// What a window holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Recorded calls.
    pub calls: u64,
    /// Of those, failures.
    pub failed: u64,
    /// Of those, slow ones (failed or not).
    pub slow: u64,
    /// Of those, slow failures.
    pub slow_failed: u64,
}

/// A window's failure and slow-call rates, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Failures per hundred calls.
    pub failure_rate: f64,
    /// Slow calls per hundred calls.
    pub slow_call_rate: f64,
    /// The calls they are of.
    pub calls: u64,
}

impl Counts {
    fn add(&mut self, s: Sample) {
        self.calls += 1;
        self.failed += u64::from(s.failed);
        self.slow += u64::from(s.slow);
        self.slow_failed += u64::from(s.slow && s.failed);
    }

    fn remove(&mut self, s: Sample) {
        self.calls = self.calls.saturating_sub(1);
        self.failed = self.failed.saturating_sub(u64::from(s.failed));
        self.slow = self.slow.saturating_sub(u64::from(s.slow));
        self.slow_failed = self
            .slow_failed
            .saturating_sub(u64::from(s.slow && s.failed));
    }

    /// Both counts together.
    pub fn plus(self, o: Counts) -> Counts {
        Counts {
            calls: self.calls.saturating_add(o.calls),
            failed: self.failed.saturating_add(o.failed),
            slow: self.slow.saturating_add(o.slow),
            slow_failed: self.slow_failed.saturating_add(o.slow_failed),
        }
    }

    /// The rates, once there are at least `minimum` calls (and one).
    pub fn rates(&self, minimum: u64) -> Option<Rates> {
        if self.calls == 0 || self.calls < minimum {
            return None;
        }
        let per_cent = |n: u64| n as f64 * 100.0 / self.calls as f64;
        Some(Rates {
            failure_rate: per_cent(self.failed),
            slow_call_rate: per_cent(self.slow),
            calls: self.calls,
        })
    }
}

/// The sliding window of a closed breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Window {
    /// The last `size` calls, oldest first.
    Count {
        /// How many calls it holds at most.
        size: u32,
        /// The calls.
        ring: VecDeque<Sample>,
        /// Their counts.
        totals: Counts,
    },
    /// One bucket per second of the last `size` seconds that had calls.
    Time {
        /// How many seconds it spans.
        size: u32,
        /// `(second since the epoch, its calls)`, oldest first.
        buckets: VecDeque<(u64, Counts)>,
        /// Their sum.
        totals: Counts,
    },
}

impl Window {
    /// An empty window of `kind` and `size`.
    pub fn new(kind: WindowType, size: u32) -> Window {
        match kind {
            WindowType::CountBased => Window::Count {
                size,
                ring: VecDeque::new(),
                totals: Counts::default(),
            },
            WindowType::TimeBased => Window::Time {
                size,
                buckets: VecDeque::new(),
                totals: Counts::default(),
            },
        }
    }

    /// Its kind and size.
    pub fn shape(&self) -> (WindowType, u32) {
        match self {
            Window::Count { size, .. } => (WindowType::CountBased, *size),
            Window::Time { size, .. } => (WindowType::TimeBased, *size),
        }
    }

    /// Records one call at `now_ms`.
    pub fn record(&mut self, now_ms: u64, s: Sample) {
        match self {
            Window::Count { size, ring, totals } => {
                if ring.len() >= *size as usize
                    && let Some(old) = ring.pop_front()
                {
                    totals.remove(old);
                }
                ring.push_back(s);
                totals.add(s);
            }
            Window::Time { .. } => {
                self.expire(now_ms);
                if let Window::Time {
                    buckets, totals, ..
                } = self
                {
                    let second = now_ms / 1000;
                    match buckets.back_mut() {
                        Some((at, c)) if *at >= second => c.add(s),
                        _ => {
                            let mut c = Counts::default();
                            c.add(s);
                            buckets.push_back((second, c));
                        }
                    }
                    totals.add(s);
                }
            }
        }
    }

    /// What the window holds at `now_ms`.
    pub fn counts(&mut self, now_ms: u64) -> Counts {
        self.expire(now_ms);
        match self {
            Window::Count { totals, .. } | Window::Time { totals, .. } => *totals,
        }
    }

    /// Drops the buckets of seconds that left a time window.
    fn expire(&mut self, now_ms: u64) {
        if let Window::Time {
            size,
            buckets,
            totals,
        } = self
        {
            let oldest = (now_ms / 1000).saturating_sub(u64::from(*size) - 1);
            while buckets.front().is_some_and(|(at, _)| *at < oldest) {
                if let Some((_, c)) = buckets.pop_front() {
                    totals.calls = totals.calls.saturating_sub(c.calls);
                    totals.failed = totals.failed.saturating_sub(c.failed);
                    totals.slow = totals.slow.saturating_sub(c.slow);
                    totals.slow_failed = totals.slow_failed.saturating_sub(c.slow_failed);
                }
            }
        }
    }
}

/// The probes of a half-open breaker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Half {
    /// Calls that may still start.
    pub permits_left: u32,
    /// Calls started and not yet back.
    pub in_flight: u32,
    /// Outcomes of the calls back.
    pub counts: Counts,
    /// What the probes decided (cluster scope: until the log agrees).
    pub decision: Option<Decision>,
}

/// Why the breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Why {
    /// The window's rates reached a threshold (or, from half-open, the
    /// probes' rates did).
    Rates(Rates),
    /// The probes' rates stayed below both thresholds.
    ProbesPassed(Rates),
    /// The wait in the open state was over.
    WaitOver,
    /// The probes did not finish within `max_wait_duration_in_half_open_state`.
    HalfOpenTimeout,
    /// The node probing in half-open is gone; another takes over.
    ProberGone,
    /// An operator's action.
    Operator,
    /// An operator's reset: closed, with an empty window.
    Reset,
}

impl Why {
    /// Its name in status and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Why::Rates(_) => "rates_exceeded",
            Why::ProbesPassed(_) => "probes_passed",
            Why::WaitOver => "wait_over",
            Why::HalfOpenTimeout => "half_open_timeout",
            Why::ProberGone => "prober_gone",
            Why::Operator => "operator",
            Why::Reset => "reset",
        }
    }
}

/// A transition a cluster-scope breaker wants the log to agree on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Decision {
    /// Open (from closed or half-open).
    Open(Why),
    /// Close (from half-open: the probes passed).
    Close(Rates),
    /// Half-open (the wait is over).
    HalfOpen,
}

/// One change of state, for the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// When (wall clock; in cluster scope, the proposer's clock).
    pub at_ms: u64,
    /// Why.
    pub why: Why,
    /// The log index that agreed it (cluster scope).
    pub index: Option<u64>,
}

/// Counts of every call since the plugin started (handed over at a swap).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Calls that succeeded in time.
    pub successful: u64,
    /// Calls that failed in time.
    pub failed: u64,
    /// Slow calls that succeeded.
    pub slow_successful: u64,
    /// Slow calls that failed.
    pub slow_failed: u64,
    /// Calls neither success nor failure (an ignored status or error).
    pub ignored: u64,
    /// Calls refused without reaching the upstream.
    pub not_permitted: u64,
    /// Sum of the durations of the calls that reached an outcome, by
    /// successful, failed, ignored.
    pub duration_ms: [u64; 3],
}

/// How many transitions the status keeps.
pub const HISTORY: usize = 32;

/// Everything that changes as the breaker runs: handed to the next
/// version at a hot swap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// The state.
    pub state: State,
    /// Changes at every transition (node scope: a count; cluster scope:
    /// the log index of the agreed state). Calls carry the epoch that
    /// permitted them.
    pub epoch: u64,
    /// Openings in a row (resilience4j's `attempts`): the wait grows with it.
    pub attempts: u32,
    /// When the state was entered.
    pub since_ms: u64,
    /// OPEN: when the wait is over.
    pub open_until_ms: u64,
    /// The closed window (kept while open, for the status).
    pub window: Window,
    /// HALF_OPEN: the probes.
    pub half: Half,
    /// Cluster scope, HALF_OPEN: the node that probes.
    pub prober: Option<String>,
    /// Every call's outcome so far.
    pub totals: Totals,
    /// The last [`HISTORY`] transitions, oldest first.
    pub history: VecDeque<Transition>,
    /// Transitions by `(from, to)`.
    pub transitions: BTreeMap<(State, State), u64>,
}

impl Machine {
    /// A closed breaker with an empty window.
    pub fn new(rules: &Rules, now_ms: u64) -> Machine {
        Machine {
            state: State::Closed,
            epoch: 0,
            attempts: 0,
            since_ms: now_ms,
            open_until_ms: 0,
            window: Window::new(rules.window_type, rules.window_size),
            half: Half::default(),
            prober: None,
            totals: Totals::default(),
            history: VecDeque::new(),
            transitions: BTreeMap::new(),
        }
    }
}

/// Whether the breaker takes its own transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Per node, as resilience4j: the machine moves itself.
    Node,
    /// Agreed through the log: the machine proposes, the log decides.
    Cluster,
}

impl Scope {
    /// Its name, as the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Node => "node",
            Scope::Cluster => "cluster",
        }
    }
}

/// A call the breaker let through, to hand back with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    epoch: u64,
    record: bool,
    probe: bool,
}

/// Whether a call may go to the upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Yes; hand the permit back with the outcome.
    Permitted(Permit),
    /// No: the state, and when the breaker half-opens (OPEN).
    NotPermitted {
        /// The state that refused.
        state: State,
        /// OPEN: when its wait is over.
        half_open_at_ms: Option<u64>,
        /// HALF_OPEN in cluster scope: the node that probes.
        prober: Option<String>,
    },
    /// Cluster scope: the wait is over; the log must agree on HALF_OPEN
    /// before a probe goes out.
    ProposeHalfOpen,
    /// Cluster scope: HALF_OPEN with no node probing (none yet, or the
    /// one named is gone): this node may claim the probes.
    Claim,
}

/// One breaker: its rules and its machine.
#[derive(Debug, Clone)]
pub struct Breaker {
    /// The options.
    pub rules: Rules,
    /// Node or cluster.
    pub scope: Scope,
    /// This node's id.
    pub me: String,
    /// The state.
    pub m: Machine,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(rules: Rules, scope: Scope, me: &str, now_ms: u64) -> Breaker {
        let m = Machine::new(&rules, now_ms);
        Breaker {
            rules,
            scope,
            me: me.to_string(),
            m,
        }
    }

    /// Takes over `m` (handed over at a swap). A window of another shape
    /// than the rules' starts empty; half-open probes the previous version
    /// sent are given back as permits, since their outcomes go to it.
    pub fn resume(&mut self, mut m: Machine) {
        if m.window.shape() != (self.rules.window_type, self.rules.window_size) {
            m.window = Window::new(self.rules.window_type, self.rules.window_size);
        }
        if m.state == State::HalfOpen && m.half.decision.is_none() {
            let n = self.probes_here(m.prober.as_deref());
            let done = u32::try_from(m.half.counts.calls).unwrap_or(u32::MAX);
            m.half.permits_left = n.saturating_sub(done);
        }
        m.half.in_flight = 0;
        self.m = m;
    }

    /// How many probes this node may send in half-open with `prober`.
    fn probes_here(&self, prober: Option<&str>) -> u32 {
        match self.scope {
            Scope::Node => self.rules.permitted_calls_in_half_open,
            Scope::Cluster if prober == Some(self.me.as_str()) => {
                self.rules.permitted_calls_in_half_open
            }
            Scope::Cluster => 0,
        }
    }

    /// The closed window's counts now.
    pub fn counts(&mut self, now_ms: u64) -> Counts {
        self.m.window.counts(now_ms)
    }

    /// Asks to send a call. `gone` tells whether a node is known dead
    /// (cluster scope: a dead prober's probes may be claimed).
    pub fn acquire(&mut self, now_ms: u64, gone: impl Fn(&str) -> bool) -> Admission {
        let epoch = self.m.epoch;
        let permit = |probe| {
            Admission::Permitted(Permit {
                epoch,
                record: true,
                probe,
            })
        };
        match self.m.state {
            State::Closed | State::MetricsOnly => permit(false),
            State::Disabled => Admission::Permitted(Permit {
                epoch,
                record: false,
                probe: false,
            }),
            State::ForcedOpen => self.refuse(None),
            State::Open if now_ms < self.m.open_until_ms => {
                let until = self.m.open_until_ms;
                self.refuse(Some(until))
            }
            State::Open => match self.scope {
                Scope::Node => {
                    self.go(State::HalfOpen, now_ms, Why::WaitOver);
                    self.acquire(now_ms, gone)
                }
                Scope::Cluster => Admission::ProposeHalfOpen,
            },
            State::HalfOpen => {
                if self.scope == Scope::Cluster {
                    match self.m.prober.as_deref() {
                        None => return Admission::Claim,
                        Some(p) if p != self.me && gone(p) => return Admission::Claim,
                        Some(p) if p != self.me => return self.refuse(None),
                        Some(_) => {}
                    }
                }
                let half = &mut self.m.half;
                if half.permits_left > 0 && half.decision.is_none() {
                    half.permits_left -= 1;
                    half.in_flight += 1;
                    permit(true)
                } else {
                    self.refuse(None)
                }
            }
        }
    }

    /// Counts a refused call and says why.
    pub fn refuse(&mut self, half_open_at_ms: Option<u64>) -> Admission {
        self.m.totals.not_permitted += 1;
        Admission::NotPermitted {
            state: self.m.state,
            half_open_at_ms,
            prober: self.m.prober.clone(),
        }
    }

    /// Records the outcome of a permitted call: `None` for one that counts
    /// neither way (an ignored status or error). In node scope the breaker
    /// moves itself; in cluster scope a half-open breaker returns what its
    /// probes decided, for the log (a closed one's rates are summed over
    /// the nodes by the caller).
    pub fn record(
        &mut self,
        now_ms: u64,
        permit: Permit,
        sample: Option<Sample>,
        duration_ms: u64,
    ) -> Option<Decision> {
        let t = &mut self.m.totals;
        match sample {
            None => {
                t.ignored += 1;
                t.duration_ms[2] = t.duration_ms[2].saturating_add(duration_ms);
            }
            Some(s) => {
                match (s.failed, s.slow) {
                    (false, false) => t.successful += 1,
                    (true, false) => t.failed += 1,
                    (false, true) => t.slow_successful += 1,
                    (true, true) => t.slow_failed += 1,
                }
                let k = usize::from(s.failed);
                t.duration_ms[k] = t.duration_ms[k].saturating_add(duration_ms);
            }
        }
        if !permit.record || permit.epoch != self.m.epoch {
            return None;
        }
        match self.m.state {
            State::Closed => {
                let s = sample?;
                self.m.window.record(now_ms, s);
                if self.scope == Scope::Node {
                    let counts = self.m.window.counts(now_ms);
                    if let Some(rates) = self.rules.exceeded(&counts, self.rules.minimum_calls()) {
                        self.go(State::Open, now_ms, Why::Rates(rates));
                    }
                }
                None
            }
            State::MetricsOnly => {
                self.m.window.record(now_ms, sample?);
                None
            }
            State::HalfOpen if permit.probe => {
                let half = &mut self.m.half;
                half.in_flight = half.in_flight.saturating_sub(1);
                match sample {
                    // resilience4j's `releasePermission`: the call did not
                    // count, another may take its place.
                    None => half.permits_left += 1,
                    Some(s) => half.counts.add(s),
                }
                let n = u64::from(self.rules.permitted_calls_in_half_open);
                if half.counts.calls < n || half.decision.is_some() {
                    return None;
                }
                let counts = half.counts;
                let decision = match self.rules.exceeded(&counts, n) {
                    Some(rates) => Decision::Open(Why::Rates(rates)),
                    None => Decision::Close(counts.rates(n)?),
                };
                self.m.half.decision = Some(decision);
                match self.scope {
                    Scope::Node => {
                        self.take(decision, now_ms);
                        None
                    }
                    Scope::Cluster => Some(decision),
                }
            }
            _ => None,
        }
    }

    /// When a timer should look at the breaker again: the end of the wait
    /// in OPEN with automatic transition, the end of
    /// `max_wait_duration_in_half_open_state` in HALF_OPEN.
    pub fn next_due_ms(&self) -> Option<u64> {
        match self.m.state {
            State::Open if self.rules.automatic_transition => Some(self.m.open_until_ms),
            State::HalfOpen if self.rules.max_wait_in_half_open_ms > 0 => Some(
                self.m
                    .since_ms
                    .saturating_add(self.rules.max_wait_in_half_open_ms),
            ),
            _ => None,
        }
    }

    /// What is due at `now_ms` (see [`Breaker::next_due_ms`]): taken in
    /// node scope, returned in cluster scope.
    pub fn due(&mut self, now_ms: u64) -> Option<Decision> {
        let at = self.next_due_ms()?;
        if now_ms < at {
            return None;
        }
        let decision = match self.m.state {
            State::Open => Decision::HalfOpen,
            State::HalfOpen => Decision::Open(Why::HalfOpenTimeout),
            _ => return None,
        };
        match self.scope {
            Scope::Node => {
                self.take(decision, now_ms);
                None
            }
            Scope::Cluster => Some(decision),
        }
    }

    /// Takes `decision` here (node scope).
    fn take(&mut self, decision: Decision, now_ms: u64) {
        match decision {
            Decision::Open(why) => self.go(State::Open, now_ms, why),
            Decision::Close(rates) => self.go(State::Closed, now_ms, Why::ProbesPassed(rates)),
            Decision::HalfOpen => self.go(State::HalfOpen, now_ms, Why::WaitOver),
        }
    }

    /// Moves to `to` here, as resilience4j's state machine does: OPEN and
    /// FORCED_OPEN count one more opening in a row, CLOSED, DISABLED and
    /// METRICS_ONLY start the count again, HALF_OPEN keeps it. A reset is
    /// `go(Closed, now, Why::Reset)`.
    pub fn go(&mut self, to: State, now_ms: u64, why: Why) {
        let attempts = match to {
            State::Open | State::ForcedOpen => self.m.attempts.saturating_add(1),
            State::HalfOpen => self.m.attempts,
            State::Closed | State::Disabled | State::MetricsOnly => 0,
        };
        let open_until = match to {
            State::Open => now_ms.saturating_add(self.rules.wait.after(attempts)),
            _ => 0,
        };
        let epoch = self.m.epoch + 1;
        self.enter(to, now_ms, epoch, attempts, open_until, None, why, None);
    }

    /// Enters `to` with what the transition decided (in cluster scope,
    /// what the log agreed at `index`). Returns whether the state changed.
    #[allow(clippy::too_many_arguments)]
    pub fn enter(
        &mut self,
        to: State,
        at_ms: u64,
        epoch: u64,
        attempts: u32,
        open_until_ms: u64,
        prober: Option<String>,
        why: Why,
        index: Option<u64>,
    ) -> bool {
        let from = self.m.state;
        let changed = from != to || why == Why::Reset;
        match to {
            State::Closed | State::MetricsOnly | State::Disabled if changed => {
                self.m.window = Window::new(self.rules.window_type, self.rules.window_size);
            }
            State::HalfOpen => {
                let permits = self.probes_here(prober.as_deref());
                if changed {
                    self.m.half = Half::default();
                }
                // A claim by another node (or this one) starts the probes
                // again under the new prober.
                self.m.half.permits_left = permits;
                self.m.half.in_flight = 0;
                self.m.half.counts = Counts::default();
                self.m.half.decision = None;
            }
            _ => {}
        }
        let m = &mut self.m;
        m.state = to;
        m.epoch = epoch;
        m.attempts = attempts;
        m.open_until_ms = open_until_ms;
        m.prober = prober;
        if changed {
            m.since_ms = at_ms;
            if m.history.len() >= HISTORY {
                m.history.pop_front();
            }
            m.history.push_back(Transition {
                from,
                to,
                at_ms,
                why,
                index,
            });
            *m.transitions.entry((from, to)).or_default() += 1;
        }
        changed
    }
}
