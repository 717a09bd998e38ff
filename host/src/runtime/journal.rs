//! What happened to a node's plugins lately: swaps (done or refused) and
//! hook failures, newest last, kept in memory for the operator's page.
//!
//! Bounded: past [`KEPT`] records of a kind the oldest goes. A restart
//! starts empty; the log (`tracing`) keeps the full story.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Records of each kind kept.
pub const KEPT: usize = 64;

/// Whether a swap was made on one node or through the log on all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwapScope {
    /// On this node only.
    Local,
    /// Through the plugin's log stream, on every node at one index.
    Cluster,
}

/// One swap of a plugin on this node, or one this node refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SwapRecord {
    /// Unix ms when it finished.
    pub at_ms: u64,
    /// Plugin name.
    pub plugin: String,
    /// Version before.
    pub from: String,
    /// Version after; `None` when the swap was refused.
    pub to: Option<String>,
    /// How long the mailbox was not served, in microseconds.
    pub pause_us: u64,
    /// Bytes handed over by snapshot/restore.
    pub state_bytes: usize,
    /// Local or cluster-wide.
    pub scope: SwapScope,
    /// The log index of a cluster-wide swap.
    pub index: Option<u64>,
    /// Who asked: `admin API`, `config file`, `log` (a cluster-wide swap
    /// proposed on another node) or, from the library, `api`.
    pub by: String,
    /// Why it was refused (the old version kept serving).
    pub error: Option<String>,
}

/// One failure of a plugin on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorRecord {
    /// Unix ms when it happened.
    pub at_ms: u64,
    /// Plugin name.
    pub plugin: String,
    /// What failed, as the plugin's `last_error` says it.
    pub message: String,
}

/// The node's recent swaps and failures.
#[derive(Debug, Default)]
pub struct Journal {
    swaps: Mutex<VecDeque<SwapRecord>>,
    errors: Mutex<VecDeque<ErrorRecord>>,
}

fn push<T>(list: &Mutex<VecDeque<T>>, record: T) {
    let mut list = list.lock().expect("journal poisoned");
    if list.len() >= KEPT {
        list.pop_front();
    }
    list.push_back(record);
}

/// Unix ms now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Journal {
    /// Records a swap.
    pub fn swap(&self, record: SwapRecord) {
        push(&self.swaps, record);
    }

    /// Records a failure of `plugin`.
    pub fn error(&self, plugin: &str, message: &str) {
        push(
            &self.errors,
            ErrorRecord {
                at_ms: now_ms(),
                plugin: plugin.to_string(),
                message: message.to_string(),
            },
        );
    }

    /// Names who asked for the cluster-wide swap of `plugin` at `index`,
    /// once the node that proposed it knows the index.
    pub fn asked(&self, plugin: &str, index: u64, by: &str) {
        let mut swaps = self.swaps.lock().expect("journal poisoned");
        if let Some(r) = swaps
            .iter_mut()
            .rev()
            .find(|r| r.plugin == plugin && r.index == Some(index))
        {
            r.by = by.to_string();
        }
    }

    /// The swaps kept, oldest first.
    pub fn swaps(&self) -> Vec<SwapRecord> {
        self.swaps
            .lock()
            .expect("journal poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// The failures kept, oldest first.
    pub fn errors(&self) -> Vec<ErrorRecord> {
        self.errors
            .lock()
            .expect("journal poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(plugin: &str, index: Option<u64>) -> SwapRecord {
        SwapRecord {
            at_ms: 1,
            plugin: plugin.into(),
            from: "a".into(),
            to: Some("b".into()),
            pause_us: 10,
            state_bytes: 2,
            scope: if index.is_some() {
                SwapScope::Cluster
            } else {
                SwapScope::Local
            },
            index,
            by: "log".into(),
            error: None,
        }
    }

    #[test]
    fn the_oldest_records_go_past_the_bound() {
        let j = Journal::default();
        for i in 0..KEPT + 3 {
            j.error("p", &format!("failure {i}"));
            j.swap(record(&format!("p{i}"), None));
        }
        let errors = j.errors();
        assert_eq!(errors.len(), KEPT);
        assert_eq!(errors[0].message, "failure 3");
        assert_eq!(errors[KEPT - 1].message, format!("failure {}", KEPT + 2));
        assert_eq!(j.swaps()[0].plugin, "p3");
    }

    #[test]
    fn the_proposer_names_who_asked_for_a_cluster_wide_swap() {
        let j = Journal::default();
        j.swap(record("kv", Some(7)));
        j.swap(record("kv", Some(9)));
        j.asked("kv", 7, "admin API");
        let swaps = j.swaps();
        assert_eq!(swaps[0].by, "admin API");
        assert_eq!(swaps[1].by, "log");
    }
}
