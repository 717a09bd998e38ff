//! Per-plugin latency histograms, rendered in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.1, 1.0, 10.0,
];

/// A cumulative-bucket histogram.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Records one observation, in seconds.
    pub fn observe(&mut self, secs: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds `other`'s observations to these.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
    }

    /// The `q` quantile (0..=1) in seconds, estimated as Prometheus's
    /// `histogram_quantile` does: linearly inside the bucket it falls in,
    /// and the largest finite bound when it falls past them. `None`
    /// without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for (i, n) in self.counts.iter().enumerate() {
            if *n > 0 && (below + n) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                let within = (rank - below as f64).max(0.0) / *n as f64;
                return Some(lower + (BUCKETS[i] - lower) * within);
            }
            below += n;
        }
        Some(BUCKETS[BUCKETS.len() - 1])
    }

    /// Appends the series of this histogram, with `labels` (`a="b",...`,
    /// or none when empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let (sep, set) = if labels.is_empty() {
            ("", String::new())
        } else {
            (",", format!("{{{labels}}}"))
        };
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(self.counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{set} {}", self.sum);
        let _ = writeln!(out, "{name}_count{set} {}", self.count);
    }
}

/// What a plugin's actor measures, by the version that ran.
#[derive(Debug, Clone, Default)]
pub struct PluginMetrics {
    /// The versions that ran, oldest first; at most [`VERSIONS_KEPT`].
    pub versions: Vec<(String, VersionMetrics)>,
    /// Pause of each hot swap.
    pub swap_pause: Histogram,
}

/// Versions whose series a plugin's metrics keep: after more swaps, the
/// oldest version's series go.
pub const VERSIONS_KEPT: usize = 4;

/// What one version of a plugin did.
#[derive(Debug, Clone, Default)]
pub struct VersionMetrics {
    /// Duration of hook calls, by hook name, including the commit of their
    /// storage transaction.
    pub calls: BTreeMap<&'static str, Histogram>,
    /// Client requests it handled.
    pub requests: u64,
    /// Hook calls that failed (traps and failed commits).
    pub errors: u64,
    /// Hook calls that trapped (including deadline and memory overruns).
    pub traps: u64,
    /// Instances of it started after a failure.
    pub restarts: u64,
}

impl PluginMetrics {
    /// The metrics of `version`, begun if it is new.
    pub fn version(&mut self, version: &str) -> &mut VersionMetrics {
        let at = match self.versions.iter().position(|(v, _)| v == version) {
            Some(at) => at,
            None => {
                if self.versions.len() >= VERSIONS_KEPT {
                    self.versions.remove(0);
                }
                self.versions
                    .push((version.to_string(), VersionMetrics::default()));
                self.versions.len() - 1
            }
        };
        &mut self.versions[at].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inf_counts_everything() {
        let mut h = Histogram::default();
        h.observe(0.000_003);
        h.observe(0.003);
        h.observe(30.0);
        let mut out = String::new();
        h.render(&mut out, "x", "p=\"a\"");
        assert!(
            out.contains("x_bucket{p=\"a\",le=\"0.000005\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{p=\"a\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{p=\"a\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{p=\"a\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{p=\"a\"} 3\n"), "{out}");
    }

    #[test]
    fn counts_stay_with_the_version_that_ran_and_old_versions_go() {
        let mut m = PluginMetrics::default();
        m.version("a").traps += 1;
        m.version("b").requests += 2;
        m.version("a").traps += 1;
        assert_eq!(m.version("a").traps, 2);
        assert_eq!(m.version("b").traps, 0);
        for v in ["c", "d", "e"] {
            m.version(v);
        }
        let kept: Vec<&str> = m.versions.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(kept, ["b", "c", "d", "e"]);
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        // 0.5 ms up to 1 ms: the (0.0005, 0.001] bucket.
        for _ in 0..4 {
            h.observe(0.000_7);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 0.000_75).abs() < 1e-9, "{p50}");
        assert!((h.quantile(1.0).unwrap() - 0.001).abs() < 1e-9);
        // One slow call past every bound: p99 says the largest bound.
        let mut slow = Histogram::default();
        slow.observe(30.0);
        h.merge(&slow);
        assert_eq!(h.count(), 5);
        assert_eq!(h.quantile(0.99), Some(10.0));
        assert!(h.quantile(0.5).unwrap() < 0.001);
    }

    #[test]
    fn a_histogram_without_labels_renders_bare_series() {
        let mut h = Histogram::default();
        h.observe(0.000_7);
        let mut out = String::new();
        h.render(&mut out, "y", "");
        assert!(out.contains("y_bucket{le=\"0.0005\"} 0\n"), "{out}");
        assert!(out.contains("y_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("y_sum 0.0007\n"), "{out}");
        assert!(out.contains("y_count 1\n"), "{out}");
    }
}
