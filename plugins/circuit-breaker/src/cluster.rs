//! Cluster scope: breakers whose evidence is summed over the nodes and
//! whose transitions are agreed through the consensus log.
//!
//! **Evidence by messaging.** Each node keeps its own sliding window of
//! the calls it made and, every `report_interval_ms` when its counts
//! changed (and once a second in any case), broadcasts them to the
//! members: per breaker, the calls, failures and slow calls in its
//! window, and the log index of the state they were counted under. Each
//! node sums its own window and the reports under the current state that
//! are younger than three report periods (and not from a member known
//! dead); when the sum holds `minimum_number_of_calls` and a rate reaches
//! its threshold, the node proposes the opening. Counts are soft state: a
//! lost report is replaced by the next one, and putting every node's
//! counts through the log several times a second would cost a durable
//! write on a majority each time for data that is stale a moment later.
//!
//! **Transitions by the log.** Opening, half-opening, closing and an
//! operator's actions are log entries ([`Command`]); every node applies
//! them at the same index, so all nodes stop calling a failing upstream
//! together and let it be probed together. Each entry carries the index
//! of the state its proposer saw (`seen`): the same transition proposed
//! by several nodes at once, or one proposed on a state the log has left,
//! changes nothing. An entry carries the proposer's clock and wait rule,
//! so applying it depends on the entry and the stored state only.
//!
//! **Half-open.** One node probes: the one that claimed it. When the wait
//! is over, the first node with a call proposes `HalfOpen` naming itself
//! (its call waits for the entry and is the first probe); with automatic
//! transition the nodes' timers propose `HalfOpen` with no prober, and
//! the first node with a call then proposes a `Claim`. The prober sends
//! `permitted_number_of_calls_in_half_open_state` calls and proposes
//! `Close` or `Open` from their outcomes; the other nodes refuse calls
//! meanwhile. A prober that membership declares dead is replaced by the
//! next node with a call (another `Claim`).

use std::collections::BTreeMap;

use plexus_sdk::consensus::Rejected;
use plexus_sdk::storage;
use serde::{Deserialize, Serialize};

use crate::breaker::{Counts, Rates, State, Wait, Why};

/// An operator's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// FORCED_OPEN: refuse every call.
    ForceOpen,
    /// DISABLED: permit every call, record nothing.
    Disable,
    /// METRICS_ONLY: permit and record, never change state.
    MetricsOnly,
    /// CLOSED.
    Close,
    /// CLOSED with an empty window and the openings in a row forgotten.
    Reset,
}

impl Action {
    /// The state it leads to.
    pub fn state(self) -> State {
        match self {
            Action::ForceOpen => State::ForcedOpen,
            Action::Disable => State::Disabled,
            Action::MetricsOnly => State::MetricsOnly,
            Action::Close | Action::Reset => State::Closed,
        }
    }
}

/// A command of the log: add variants at the end, never change these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// CLOSED or HALF_OPEN to OPEN.
    Open {
        /// The breaker.
        breaker: String,
        /// The index of the state the proposer saw.
        seen: u64,
        /// The proposer's clock.
        at_ms: u64,
        /// The proposer's wait rule.
        wait: Wait,
        /// Its evidence.
        why: Why,
    },
    /// OPEN to HALF_OPEN, the wait being over.
    HalfOpen {
        /// The breaker.
        breaker: String,
        /// The index of the state the proposer saw.
        seen: u64,
        /// The proposer's clock.
        at_ms: u64,
        /// The node that probes; `None` leaves it to a claim.
        prober: Option<String>,
    },
    /// In HALF_OPEN, `prober` takes over the probes (none was named, or
    /// the one named is dead).
    Claim {
        /// The breaker.
        breaker: String,
        /// The index of the state the proposer saw.
        seen: u64,
        /// The node that probes from now on.
        prober: String,
    },
    /// HALF_OPEN to CLOSED: the probes passed.
    Close {
        /// The breaker.
        breaker: String,
        /// The index of the state the proposer saw.
        seen: u64,
        /// The proposer's clock.
        at_ms: u64,
        /// The probes' rates.
        rates: Rates,
    },
    /// An operator's action, from any state.
    Operator {
        /// The breaker.
        breaker: String,
        /// What to do.
        action: Action,
        /// The proposer's clock.
        at_ms: u64,
    },
}

impl Command {
    /// The breaker the command is about.
    pub fn breaker(&self) -> &str {
        match self {
            Command::Open { breaker, .. }
            | Command::HalfOpen { breaker, .. }
            | Command::Claim { breaker, .. }
            | Command::Close { breaker, .. }
            | Command::Operator { breaker, .. } => breaker,
        }
    }
}

/// One breaker's agreed state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Agreed {
    /// The state.
    pub state: State,
    /// The log index of the entry that set it (0: never changed).
    pub index: u64,
    /// Openings in a row.
    pub attempts: u32,
    /// When the state was entered (the proposer's clock).
    pub since_ms: u64,
    /// OPEN: when the wait is over.
    pub open_until_ms: u64,
    /// HALF_OPEN: the node that probes.
    pub prober: Option<String>,
    /// Why it changed last.
    pub why: Option<Why>,
}

const PREFIX: &str = "agreed/";

/// Every agreed state in storage, by breaker.
pub fn load() -> Result<BTreeMap<String, Agreed>, storage::Error> {
    let mut out = BTreeMap::new();
    for kv in storage::scan_all(PREFIX)? {
        let name = String::from_utf8_lossy(&kv.key[PREFIX.len()..]).into_owned();
        if let Ok(a) = plexus_sdk::codec::decode::<Agreed>(&kv.value.value) {
            out.insert(name, a);
        }
    }
    Ok(out)
}

/// Applies `command` at `index`, writing what changes. Returns whether
/// the agreed state changed. Decides from the command and the stored
/// state only.
pub fn apply(
    agreed: &mut BTreeMap<String, Agreed>,
    index: u64,
    command: &Command,
) -> Result<bool, Rejected> {
    let name = command.breaker();
    if !plexus_sdk::http::is_ident(name) || name.len() > 64 {
        return Err(Rejected::new(
            400,
            "a breaker name is 1 to 64 of A-Z a-z 0-9 . _ -",
        ));
    }
    let now = agreed.get(name).cloned().unwrap_or_default();
    let mut next = now.clone();
    let current = |seen: u64| seen == now.index;
    match command {
        Command::Open {
            seen,
            at_ms,
            wait,
            why,
            ..
        } => {
            if !current(*seen) || !matches!(now.state, State::Closed | State::HalfOpen) {
                return Ok(false);
            }
            next.state = State::Open;
            next.attempts = now.attempts.saturating_add(1);
            next.since_ms = *at_ms;
            next.open_until_ms = at_ms.saturating_add(wait.after(next.attempts));
            next.prober = None;
            next.why = Some(*why);
        }
        Command::HalfOpen {
            seen,
            at_ms,
            prober,
            ..
        } => {
            if !current(*seen) || now.state != State::Open || *at_ms < now.open_until_ms {
                return Ok(false);
            }
            next.state = State::HalfOpen;
            next.since_ms = *at_ms;
            next.open_until_ms = 0;
            next.prober = prober.clone();
            next.why = Some(Why::WaitOver);
        }
        Command::Claim { seen, prober, .. } => {
            if !current(*seen)
                || now.state != State::HalfOpen
                || now.prober.as_ref() == Some(prober)
            {
                return Ok(false);
            }
            next.prober = Some(prober.clone());
            next.why = Some(Why::ProberGone);
        }
        Command::Close {
            seen, at_ms, rates, ..
        } => {
            if !current(*seen) || now.state != State::HalfOpen {
                return Ok(false);
            }
            next.state = State::Closed;
            next.attempts = 0;
            next.since_ms = *at_ms;
            next.prober = None;
            next.why = Some(Why::ProbesPassed(*rates));
        }
        Command::Operator { action, at_ms, .. } => {
            next.state = action.state();
            next.attempts = match action {
                Action::ForceOpen => now.attempts.saturating_add(1),
                _ => 0,
            };
            next.since_ms = *at_ms;
            next.open_until_ms = 0;
            next.prober = None;
            next.why = Some(if *action == Action::Reset {
                Why::Reset
            } else {
                Why::Operator
            });
        }
    }
    next.index = index;
    storage::put_typed(format!("{PREFIX}{name}"), &next)?;
    agreed.insert(name.to_string(), next);
    Ok(true)
}

/// What a node tells the others: per breaker, the index of the state its
/// window is counted under, and the window's counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `(breaker, index, counts)`.
    pub breakers: Vec<(String, u64, Counts)>,
}

/// One node's last report about one breaker.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Heard {
    /// The index it was counted under.
    pub index: u64,
    /// Its counts.
    pub counts: Counts,
    /// When it arrived (monotonic).
    pub at_mono: u64,
}

/// The other nodes' reports, by breaker and node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Peers {
    /// `breaker -> node -> last report`.
    pub heard: BTreeMap<String, BTreeMap<String, Heard>>,
}

impl Peers {
    /// Takes in `node`'s report, arrived at `now_mono`.
    pub fn take(&mut self, node: &str, report: Report, now_mono: u64) {
        for (breaker, index, counts) in report.breakers {
            self.heard.entry(breaker).or_default().insert(
                node.to_string(),
                Heard {
                    index,
                    counts,
                    at_mono: now_mono,
                },
            );
        }
    }

    /// Forgets what `node` said (it is dead).
    pub fn forget_node(&mut self, node: &str) {
        for by_node in self.heard.values_mut() {
            by_node.remove(node);
        }
    }

    /// Forgets reports older than `ttl_ms`.
    pub fn expire(&mut self, now_mono: u64, ttl_ms: u64) {
        for by_node in self.heard.values_mut() {
            by_node.retain(|_, h| now_mono.saturating_sub(h.at_mono) < ttl_ms);
        }
    }

    /// The sum of the fresh reports about `breaker` counted under `index`.
    pub fn sum(&self, breaker: &str, index: u64, now_mono: u64, ttl_ms: u64) -> Counts {
        self.fresh(breaker, index, now_mono, ttl_ms)
            .fold(Counts::default(), |sum, (_, h)| sum.plus(h.counts))
    }

    /// The fresh reports about `breaker` counted under `index`, by node.
    pub fn fresh<'a>(
        &'a self,
        breaker: &str,
        index: u64,
        now_mono: u64,
        ttl_ms: u64,
    ) -> impl Iterator<Item = (&'a String, &'a Heard)> + 'a {
        self.heard
            .get(breaker)
            .into_iter()
            .flatten()
            .filter(move |(_, h)| h.index == index && now_mono.saturating_sub(h.at_mono) < ttl_ms)
    }
}
