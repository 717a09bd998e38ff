//! The choice of a backend, apart from the plugin: the policies, the peak
//! EWMA, the Maglev table and a small random source. Nothing here reads a
//! clock or the host; time comes in as an argument, so the unit tests can
//! run a simulated cluster of clients and backends through it.

use crate::config::LbPolicy;

/// A backend that may take the next request, as the policies see it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Its place in the config's list.
    pub index: usize,
    /// Its weight now, in thousandths (slow start lowers it).
    pub weight: u64,
    /// Requests sent to it and not yet answered, from this node.
    pub outstanding: u32,
    /// Its peak EWMA latency in milliseconds, decayed to now.
    pub cost_ms: f64,
}

/// xorshift64*: enough to spread requests, seeded per node so that nodes
/// do not draw alike.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A source seeded with `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed) | 1)
    }

    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (which is not 0).
    pub fn below(&mut self, n: u64) -> u64 {
        // The bias of a plain modulo is below 2^-40 for the sizes used here.
        self.bits() % n
    }
}

/// splitmix64's finaliser: spreads the bits of `x`.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a over `bytes`, from `seed`, then mixed.
pub fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// A latency average that jumps to a new peak at once and decays towards
/// lower readings (and towards zero between readings) with time constant
/// `tau_ms`, as Finagle's and Linkerd's peak EWMA do: a backend that
/// turns slow is avoided at its first slow answer, and one that was slow
/// is tried again after a while.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct PeakEwma {
    /// The average, in milliseconds.
    pub cost_ms: f64,
    /// When it was last updated.
    pub stamp_ms: u64,
}

impl PeakEwma {
    /// Takes in a latency of `rtt_ms` read at `now_ms`.
    pub fn observe(&mut self, rtt_ms: f64, now_ms: u64, tau_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.stamp_ms) as f64;
        let w = (-elapsed / tau_ms.max(1) as f64).exp();
        self.cost_ms = if rtt_ms > self.cost_ms {
            rtt_ms
        } else {
            self.cost_ms * w + rtt_ms * (1.0 - w)
        };
        self.stamp_ms = self.stamp_ms.max(now_ms);
    }

    /// The average at `now_ms`, decayed towards zero since the last reading.
    pub fn at(&self, now_ms: u64, tau_ms: u64) -> f64 {
        let elapsed = now_ms.saturating_sub(self.stamp_ms) as f64;
        self.cost_ms * (-elapsed / tau_ms.max(1) as f64).exp()
    }
}

/// The Maglev table's size: a prime, as the algorithm needs, and Envoy's
/// default. Each backend's share of it is within a fraction of a percent
/// of its weight's.
pub const MAGLEV_SIZE: usize = 65_537;

/// A Maglev lookup table over some backends: entry `i` is a place in
/// their list. Built from their names and weights only, so every node
/// with the same backends in the same state builds the same table.
#[derive(Debug, Clone)]
pub struct Maglev {
    /// The backends (config places) the table was built for.
    pub built_for: Vec<usize>,
    table: Vec<u16>,
}

impl Maglev {
    /// Builds the table for `backends`: `(config place, name, weight)`.
    /// Each backend fills the table in the order of its own permutation;
    /// a heavier one takes turns more often (each round adds its weight
    /// to a credit, and every whole share of the heaviest weight is one
    /// turn).
    pub fn build(backends: &[(usize, &str, u64)]) -> Maglev {
        let m = MAGLEV_SIZE as u64;
        let n = backends.len().min(usize::from(u16::MAX));
        let mut table = vec![u16::MAX; MAGLEV_SIZE];
        if n == 0 {
            return Maglev {
                built_for: Vec::new(),
                table: Vec::new(),
            };
        }
        let offset: Vec<u64> = backends
            .iter()
            .map(|b| hash(1, b.1.as_bytes()) % m)
            .collect();
        let skip: Vec<u64> = backends
            .iter()
            .map(|b| hash(2, b.1.as_bytes()) % (m - 1) + 1)
            .collect();
        let max_weight = backends.iter().map(|b| b.2.max(1)).max().unwrap_or(1);
        let mut next = vec![0u64; n];
        let mut credit = vec![0u64; n];
        let mut filled = 0;
        while filled < MAGLEV_SIZE {
            for i in 0..n {
                credit[i] += backends[i].2.max(1);
                while credit[i] >= max_weight && filled < MAGLEV_SIZE {
                    credit[i] -= max_weight;
                    loop {
                        let c = ((offset[i] + next[i] * skip[i]) % m) as usize;
                        next[i] += 1;
                        if table[c] == u16::MAX {
                            table[c] = i as u16;
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
        Maglev {
            built_for: backends[..n].iter().map(|b| b.0).collect(),
            table,
        }
    }

    /// The position of `key` on the table.
    pub fn slot(&self, key: u64) -> usize {
        (key % MAGLEV_SIZE as u64) as usize
    }

    /// The backend (config place) at `slot`.
    pub fn at(&self, slot: usize) -> Option<usize> {
        let i = *self.table.get(slot % self.table.len().max(1))?;
        self.built_for.get(usize::from(i)).copied()
    }
}

/// Per-policy state that lasts from one choice to the next.
#[derive(Debug, Clone)]
pub struct Picker {
    /// The random source.
    pub rng: Rng,
    /// Smooth round robin's current weights, by config place.
    current: Vec<i64>,
    /// The Maglev table of the backends in, built when they change.
    maglev: Option<Maglev>,
}

/// What a choice needs besides the candidates.
#[derive(Debug, Clone, Copy)]
pub struct Choice<'a> {
    /// The policy.
    pub policy: LbPolicy,
    /// Backends drawn by `least_request` and `peak_ewma`.
    pub choice_count: u32,
    /// The hashed header, for `maglev`.
    pub key: Option<u64>,
    /// `hash_balance_factor`.
    pub hash_balance_factor: u32,
    /// Every backend's name and configured weight, by config place.
    pub names: &'a [(String, u64)],
}

impl Picker {
    /// A picker for `backends` backends.
    pub fn new(backends: usize, seed: u64) -> Picker {
        Picker {
            rng: Rng::new(seed),
            current: vec![0; backends],
            maglev: None,
        }
    }

    /// Chooses among `candidates` (not empty); returns a config place.
    pub fn pick(&mut self, how: Choice<'_>, candidates: &[Candidate]) -> usize {
        if candidates.len() == 1 {
            return candidates[0].index;
        }
        match how.policy {
            LbPolicy::RoundRobin => self.round_robin(candidates),
            LbPolicy::Random => self.random(candidates),
            LbPolicy::LeastRequest => self.best_of(how.choice_count, candidates, |c| {
                f64::from(c.outstanding + 1) / c.weight.max(1) as f64
            }),
            LbPolicy::PeakEwma => self.best_of(how.choice_count, candidates, |c| {
                // The host's clock counts whole milliseconds: a backend
                // answering within one reads as 0, so one is added to keep
                // the requests in flight in the score.
                (c.cost_ms + 1.0) * f64::from(c.outstanding + 1) / c.weight.max(1) as f64
            }),
            LbPolicy::Maglev => match how.key {
                Some(key) => self.maglev(how, key, candidates),
                None => self.random(candidates),
            },
        }
    }

    fn round_robin(&mut self, candidates: &[Candidate]) -> usize {
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for c in candidates {
            let w = i64::try_from(c.weight).unwrap_or(i64::MAX / 4).max(1);
            let Some(cur) = self.current.get_mut(c.index) else {
                continue;
            };
            *cur += w;
            total += w;
            let cur = *cur;
            if best.is_none_or(|b| cur > self.current[b]) {
                best = Some(c.index);
            }
        }
        let best = best.unwrap_or(candidates[0].index);
        if let Some(cur) = self.current.get_mut(best) {
            *cur -= total;
        }
        best
    }

    fn random(&mut self, candidates: &[Candidate]) -> usize {
        let total: u64 = candidates.iter().map(|c| c.weight.max(1)).sum();
        let mut r = self.rng.below(total.max(1));
        for c in candidates {
            let w = c.weight.max(1);
            if r < w {
                return c.index;
            }
            r -= w;
        }
        candidates[candidates.len() - 1].index
    }

    /// Draws `count` distinct candidates and keeps the lowest score; the
    /// first drawn wins a tie.
    fn best_of(
        &mut self,
        count: u32,
        candidates: &[Candidate],
        score: impl Fn(&Candidate) -> f64,
    ) -> usize {
        let n = candidates.len();
        let count = (count as usize).clamp(1, n);
        // A partial Fisher-Yates shuffle of places, without allocating for
        // the usual two.
        let mut drawn: [usize; 8] = [usize::MAX; 8];
        let mut best: Option<(f64, usize)> = None;
        let mut picked = 0;
        while picked < count {
            let i = self.rng.below(n as u64) as usize;
            if picked < drawn.len() {
                if drawn[..picked].contains(&i) {
                    continue;
                }
                drawn[picked] = i;
            }
            picked += 1;
            let s = score(&candidates[i]);
            if best.is_none_or(|(b, _)| s < b) {
                best = Some((s, candidates[i].index));
            }
        }
        best.map_or(candidates[0].index, |(_, i)| i)
    }

    fn maglev(&mut self, how: Choice<'_>, key: u64, candidates: &[Candidate]) -> usize {
        let places: Vec<usize> = candidates.iter().map(|c| c.index).collect();
        if self.maglev.as_ref().is_none_or(|m| m.built_for != places) {
            let backends: Vec<(usize, &str, u64)> = candidates
                .iter()
                .filter_map(|c| {
                    how.names
                        .get(c.index)
                        .map(|(name, w)| (c.index, name.as_str(), *w))
                })
                .collect();
            self.maglev = Some(Maglev::build(&backends));
        }
        let Some(table) = &self.maglev else {
            return candidates[0].index;
        };
        let slot = table.slot(key);
        let first = table.at(slot).unwrap_or(candidates[0].index);
        if how.hash_balance_factor == 0 {
            return first;
        }
        // Bounded load: a backend with more than its share of the requests
        // in flight passes the request along the table.
        let total: u64 = candidates.iter().map(|c| u64::from(c.outstanding)).sum();
        let bound = ((total + 1) * u64::from(how.hash_balance_factor))
            .div_ceil(100 * candidates.len() as u64)
            .max(1);
        let load = |place: usize| {
            candidates
                .iter()
                .find(|c| c.index == place)
                .map_or(0, |c| u64::from(c.outstanding))
        };
        let mut tried = Vec::new();
        for step in 0..MAGLEV_SIZE {
            let Some(place) = table.at(slot + step) else {
                break;
            };
            if tried.contains(&place) {
                continue;
            }
            if load(place) < bound {
                return place;
            }
            tried.push(place);
            if tried.len() == candidates.len() {
                break;
            }
        }
        first
    }
}
