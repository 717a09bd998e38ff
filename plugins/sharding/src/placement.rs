//! Where slots live: rendezvous hashing with bounded loads.
//!
//! A key belongs to one of a fixed number of slots (its hash modulo the
//! slot count); a slot is held by `replicas` nodes, the first its primary.
//! Each slot ranks every member by a hash of (slot, member) — rendezvous,
//! or highest-random-weight, hashing — and takes the highest-ranked
//! members that are not yet full. A member is full at
//! `ceil(balance_factor% × fair share)` slots, as primary and as holder,
//! which bounds the imbalance the hash alone would leave (the bound of
//! consistent hashing with bounded loads, applied to slots).
//!
//! Why rendezvous rather than a ring with virtual nodes or Maglev: the
//! replicas of a slot are simply its next members in rank, no virtual
//! nodes are needed for an even spread, and a member joining or leaving
//! moves only the slots where it ranks (or ranked) among the first.

/// A 64-bit FNV-1a hash.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A finaliser that spreads nearby inputs (splitmix64's).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The slot of `key`, of `slots`.
pub fn slot_of(key: &[u8], slots: u32) -> u32 {
    (mix(fnv1a(key)) % u64::from(slots.max(1))) as u32
}

/// The holders of every slot for `members` (sorted, distinct): for slot
/// `s`, up to `replicas` members, the primary first.
pub fn place(
    members: &[String],
    slots: u32,
    replicas: usize,
    balance_factor: u32,
) -> Vec<Vec<String>> {
    let n = members.len();
    if n == 0 {
        return vec![Vec::new(); slots as usize];
    }
    let r = replicas.clamp(1, n);
    let factor = u64::from(balance_factor.max(100));
    let cap = |share: u64| (factor * share).div_ceil(100 * n as u64).max(1);
    let (primary_cap, holder_cap) = (cap(u64::from(slots)), cap(u64::from(slots) * r as u64));
    let seeds: Vec<u64> = members.iter().map(|m| fnv1a(m.as_bytes())).collect();
    let mut primaries = vec![0u64; n];
    let mut held = vec![0u64; n];
    let mut out = Vec::with_capacity(slots as usize);
    let mut rank: Vec<usize> = (0..n).collect();
    for slot in 0..slots {
        let weight = |i: usize| mix(seeds[i] ^ mix(u64::from(slot) + 1));
        rank.sort_by_key(|&i| std::cmp::Reverse(weight(i)));
        let primary = rank
            .iter()
            .copied()
            .find(|&i| primaries[i] < primary_cap && held[i] < holder_cap)
            .unwrap_or(rank[0]);
        let mut chosen = vec![primary];
        let backups = rank.iter().copied().filter(|&i| i != primary);
        for i in backups.clone().filter(|&i| held[i] < holder_cap) {
            if chosen.len() == r {
                break;
            }
            chosen.push(i);
        }
        // Every member full: take the next in rank anyway.
        for i in backups {
            if chosen.len() == r {
                break;
            }
            if !chosen.contains(&i) {
                chosen.push(i);
            }
        }
        primaries[primary] += 1;
        for &i in &chosen {
            held[i] += 1;
        }
        out.push(chosen.into_iter().map(|i| members[i].clone()).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node-{i}")).collect()
    }

    /// Max over mean of keys per node, as primary, for `keys` keys.
    fn imbalance(n: usize, keys: u32, slots: u32, factor: u32) -> f64 {
        let map = place(&members(n), slots, 2, factor);
        let mut per = std::collections::HashMap::<&str, u64>::new();
        for k in 0..keys {
            let slot = slot_of(format!("key-{k}").as_bytes(), slots);
            *per.entry(&map[slot as usize][0]).or_default() += 1;
        }
        let max = *per.values().max().unwrap() as f64;
        max / (f64::from(keys) / n as f64)
    }

    /// The share of slots whose primary changes when a member joins.
    fn moved(n: usize, slots: u32, factor: u32) -> f64 {
        let before = place(&members(n), slots, 1, factor);
        let after = place(&members(n + 1), slots, 1, factor);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a[0] != b[0])
            .count();
        moved as f64 / f64::from(slots)
    }

    /// The figures in BENCHMARKS.md ("Sharding"): `cargo test -p
    /// plexus-plugin-sharding placement -- --nocapture`.
    #[test]
    fn keys_spread_within_the_bound_and_a_join_moves_near_its_share() {
        for (slots, factor) in [(256, 125), (1024, 125), (1024, 105)] {
            for n in [3, 5, 10] {
                let (ratio, moved) = (
                    imbalance(n, 100_000, slots, factor),
                    moved(n, slots, factor),
                );
                let ideal = 1.0 / (n + 1) as f64;
                println!(
                    "{slots} slots, balance {factor}%, {n} members: max/mean keys per primary {ratio:.3}; \
                     a join moves {:.1}% of slots (ideal {:.1}%)",
                    moved * 100.0,
                    ideal * 100.0
                );
                if (slots, factor) == (super::super::DEFAULT_SLOTS, super::super::DEFAULT_BALANCE) {
                    assert!(ratio < 1.1, "{n} members: {ratio}");
                    assert!(moved < ideal * 1.25, "{n} members: {moved}");
                }
            }
        }
    }

    #[test]
    fn every_slot_gets_distinct_holders_and_the_primary_first() {
        let map = place(&members(5), 256, 3, 125);
        for holders in &map {
            let mut h = holders.clone();
            h.sort();
            h.dedup();
            assert_eq!(h.len(), 3);
        }
        assert_eq!(
            place(&members(2), 16, 3, 125)[0].len(),
            2,
            "no more replicas than members"
        );
        assert!(place(&[], 4, 2, 125).iter().all(Vec::is_empty));
    }

    #[test]
    fn the_slot_of_a_key_is_stable_and_spread() {
        assert_eq!(slot_of(b"user-17", 256), slot_of(b"user-17", 256));
        let mut seen = std::collections::HashSet::new();
        for k in 0..10_000 {
            seen.insert(slot_of(format!("k{k}").as_bytes(), 256));
        }
        assert_eq!(seen.len(), 256);
    }
}
