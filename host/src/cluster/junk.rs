//! Counted, sampled logging of junk from the network.
//!
//! Anyone who can reach a node's ports can send it garbage: malformed or
//! unauthenticated peer frames, gossip datagrams without a valid tag,
//! handshake floods. Each one is counted (`plexus_network_junk_total` in
//! `/metrics`), and at most one line a second per source reaches the log,
//! saying how many more were dropped since the last line. A flood then
//! costs the log a line a second, not a line a datagram.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Least time between two logged lines of one source.
const LOG_EVERY_MS: u64 = 1000;

/// One source of junk.
#[derive(Debug)]
pub struct Junk {
    source: &'static str,
    count: AtomicU64,
    /// When a line was last logged, in ms since [`epoch`] plus one (0: never).
    logged_at: AtomicU64,
    suppressed: AtomicU64,
    lines: AtomicU64,
}

/// Peer connections: failed handshakes, malformed or tampered frames.
pub static PEER: Junk = Junk::new("peer");
/// Gossip datagrams without a valid cluster tag, or that SWIM refused.
pub static GOSSIP: Junk = Junk::new("gossip");

/// Every source, for `/metrics`.
pub fn sources() -> [&'static Junk; 2] {
    [&PEER, &GOSSIP]
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Junk {
    const fn new(source: &'static str) -> Junk {
        Junk {
            source,
            count: AtomicU64::new(0),
            logged_at: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            lines: AtomicU64::new(0),
        }
    }

    /// The source's name, the metric's label.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// How many were seen since the process started.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts one, and logs `what` unless a line of this source was logged
    /// less than a second ago.
    pub fn note(&self, what: std::fmt::Arguments<'_>) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.logged_at.load(Ordering::Relaxed);
        let due = last == 0 || now >= last + LOG_EVERY_MS;
        if due
            && self
                .logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            self.lines.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                source = self.source,
                suppressed,
                "{what} (dropped input is counted in plexus_network_junk_total)"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_counted_in_full_and_logged_once_a_second() {
        let j = Junk::new("test");
        let started = Instant::now();
        for i in 0..10_000 {
            j.note(format_args!("junk {i}"));
        }
        let seconds = started.elapsed().as_secs();
        assert_eq!(j.count(), 10_000);
        let lines = j.lines.load(Ordering::Relaxed);
        assert!(lines >= 1, "the first is logged");
        assert!(lines <= seconds + 2, "{lines} lines in {seconds} s");
    }
}
