//! Verdicts agreed through the log: which backends are ejected, since
//! when, until when, and how many times. Every node applies the same
//! entries in the same order, so every node ejects the same backends at
//! the same log index.
//!
//! Only changes of state are entries: a node proposes an ejection when
//! its own evidence (health checks, 5xx in a row, a failure percentage)
//! says a backend that the log has in should be out, and a return when
//! an ejected backend's time is over and, with health checks, it passes
//! them. A proposal carries the generation (the count of ejections) its
//! proposer saw; a second node's proposal of the same change, or one
//! made on a state the log has since left, changes nothing.

use std::collections::BTreeMap;

use plexus_sdk::consensus::Rejected;
use plexus_sdk::storage;
use serde::{Deserialize, Serialize};

/// Why a backend was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// It failed `unhealthy_threshold` health checks in a row.
    HealthCheck,
    /// `consecutive_5xx` answers in a row were 5xx or failed exchanges.
    Consecutive5xx,
    /// Its failure percentage over a window passed the threshold.
    FailurePercentage,
    /// An operator asked.
    Manual,
}

impl Reason {
    /// Its name in status and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Reason::HealthCheck => "health_check",
            Reason::Consecutive5xx => "consecutive_5xx",
            Reason::FailurePercentage => "failure_percentage",
            Reason::Manual => "manual",
        }
    }

    /// Whether `max_ejection_percent` bounds it (outlier detection does;
    /// a failed health check or an operator does not, and the panic
    /// threshold keeps requests flowing when too many are out).
    fn bounded(self) -> bool {
        matches!(self, Reason::Consecutive5xx | Reason::FailurePercentage)
    }
}

/// A command of the log: add variants at the end, never change these.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Take `backend` out.
    Eject {
        /// The backend's name.
        backend: String,
        /// The proposer's evidence.
        reason: Reason,
        /// The count of ejections the proposer saw; a different count now
        /// means the proposal is stale.
        generation: u32,
        /// The proposer's wall clock.
        at_ms: u64,
        /// The proposer's `base_ejection_time_ms`.
        base_ms: u64,
        /// The proposer's `max_ejection_time_ms`.
        max_ms: u64,
        /// The proposer's `max_ejection_percent`.
        max_percent: u32,
        /// How many backends the proposer has.
        backends: u32,
    },
    /// Put `backend` back.
    Return {
        /// The backend's name.
        backend: String,
        /// The count of ejections the proposer saw.
        generation: u32,
        /// The proposer's wall clock.
        at_ms: u64,
    },
}

impl Command {
    /// The backend the command is about.
    pub fn backend(&self) -> &str {
        match self {
            Command::Eject { backend, .. } | Command::Return { backend, .. } => backend,
        }
    }
}

/// One backend's agreed state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Whether it is out.
    pub ejected: bool,
    /// Ejections counted towards the next ejection's length; starts again
    /// from 0 once the backend stayed in for `max_ejection_time_ms`.
    pub generation: u32,
    /// Ejections in all.
    pub ejections: u64,
    /// Why it was last ejected.
    pub reason: Option<Reason>,
    /// When it was last ejected (the proposer's clock).
    pub ejected_ms: u64,
    /// When its ejection is over, at the earliest.
    pub until_ms: u64,
    /// When it last came back (slow start counts from here).
    pub returned_ms: u64,
    /// The log index of the entry that set this state.
    pub index: u64,
}

const PREFIX: &str = "verdict/";

/// Every verdict in storage, by backend name.
pub fn load() -> Result<BTreeMap<String, Verdict>, storage::Error> {
    let mut out = BTreeMap::new();
    for kv in storage::scan_all(PREFIX)? {
        let name = String::from_utf8_lossy(&kv.key[PREFIX.len()..]).into_owned();
        if let Ok(v) = plexus_sdk::codec::decode::<Verdict>(&kv.value.value) {
            out.insert(name, v);
        }
    }
    Ok(out)
}

/// Applies `command` at `index` to `verdicts`, writing what changes.
/// Returns whether the state changed. Decides from the command and the
/// stored state only.
pub fn apply(
    verdicts: &mut BTreeMap<String, Verdict>,
    index: u64,
    command: &Command,
) -> Result<bool, Rejected> {
    let name = command.backend();
    if name.is_empty() || name.len() > 64 {
        return Err(Rejected::new(400, "a backend name is 1 to 64 bytes"));
    }
    let mut v = verdicts.get(name).cloned().unwrap_or_default();
    match *command {
        Command::Eject {
            reason,
            generation,
            at_ms,
            base_ms,
            max_ms,
            max_percent,
            backends,
            ..
        } => {
            if v.ejected || generation != v.generation {
                return Ok(false);
            }
            if reason.bounded() {
                let out = verdicts.values().filter(|v| v.ejected).count() as u64;
                let allowed = (u64::from(backends) * u64::from(max_percent) / 100).max(1);
                if out + 1 > allowed {
                    return Ok(false);
                }
            }
            // In for long enough: the count starts again.
            if v.returned_ms > 0 && at_ms.saturating_sub(v.returned_ms) >= max_ms {
                v.generation = 0;
            }
            v.generation = v.generation.saturating_add(1);
            v.ejections += 1;
            v.ejected = true;
            v.reason = Some(reason);
            v.ejected_ms = at_ms;
            // Outlier ejections last base × their count. A failed health
            // check keeps the backend out until checks pass again, with no
            // minimum the first time, and base × the count before it when
            // it flaps. An operator's ejection lasts until the operator's
            // return.
            let turns = match reason {
                Reason::HealthCheck => v.generation - 1,
                _ => v.generation,
            };
            v.until_ms = match reason {
                Reason::Manual => u64::MAX,
                _ => at_ms.saturating_add(base_ms.saturating_mul(u64::from(turns)).min(max_ms)),
            };
        }
        Command::Return {
            generation, at_ms, ..
        } => {
            if !v.ejected || generation != v.generation {
                return Ok(false);
            }
            v.ejected = false;
            v.returned_ms = at_ms.max(1);
        }
    }
    v.index = index;
    storage::put_typed(format!("{PREFIX}{name}"), &v)?;
    verdicts.insert(name.to_string(), v);
    Ok(true)
}
