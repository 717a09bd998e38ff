//! A linearizability checker for histories of one register (one key of
//! `replicated-kv`): reads, writes and compare-and-swaps on a version, each
//! with an invocation time and, when the client learned it, a completion
//! time and result.
//!
//! The search is Wing and Gong's, with Lowe's memo of (linearized set,
//! state) pairs, as Porcupine does it: walk the history in time order, try
//! to linearize each pending operation whose invocation has been reached,
//! and backtrack when an operation's completion is reached before it could
//! be placed. An operation whose outcome is unknown (a timeout, a dropped
//! connection, a 504) has no completion: it may take effect at any point
//! after its invocation, or never, which the search covers by placing it
//! last, where nothing observes it.
//!
//! Keys are independent registers, so a key–value history is checked one
//! key at a time.

use std::collections::HashSet;

/// What a client did to the register, and what it was told.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// A read: the value and its version, or `None` for "no such key".
    Read(Option<(Vec<u8>, u64)>),
    /// A write of a value; `Some(version)` when acknowledged, `None` when
    /// the outcome is unknown.
    Write(Vec<u8>, Option<u64>),
    /// A write of `value` only if the current version is `expected`.
    Cas {
        /// The version it was conditional on.
        expected: u64,
        /// The value written.
        value: Vec<u8>,
        /// `Ok(Some(version))` acknowledged, `Ok(None)` unknown outcome,
        /// `Err(())` refused because the version did not match.
        result: Result<Option<u64>, ()>,
    },
}

/// One operation of a history.
#[derive(Debug, Clone)]
pub struct Event {
    /// When the client sent it (any monotonic clock, one for all clients).
    pub call: u64,
    /// When the client got its answer; `None` when the outcome is unknown.
    pub ret: Option<u64>,
    /// The operation and its result.
    pub op: Op,
}

/// The register: its value and version; the version is `None` when the
/// value came from a write whose acknowledgement was lost.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct State {
    value: Option<Vec<u8>>,
    version: Option<u64>,
}

/// The states `op` can lead to from `s`; empty when `op`'s result is
/// impossible in `s`.
fn step(s: &State, op: &Op) -> Vec<State> {
    match op {
        Op::Read(None) => {
            if s.value.is_none() {
                vec![s.clone()]
            } else {
                vec![]
            }
        }
        Op::Read(Some((value, version))) => {
            if s.value.as_deref() != Some(value.as_slice()) {
                return vec![];
            }
            match s.version {
                Some(v) if v != *version => vec![],
                _ => vec![State {
                    value: s.value.clone(),
                    version: Some(*version),
                }],
            }
        }
        Op::Write(value, version) => step_write_from(s, value, *version).into_iter().collect(),
        Op::Cas {
            expected,
            value,
            result,
        } => {
            let matches = s.value.is_some() && s.version.is_none_or(|v| v == *expected);
            let differs = s.version != Some(*expected) || s.value.is_none();
            match result {
                Err(()) if differs => vec![s.clone()],
                Err(()) => vec![],
                Ok(version) => {
                    let mut out = Vec::new();
                    if matches {
                        // The version it matched is now known.
                        let known = State {
                            value: s.value.clone(),
                            version: Some(*expected),
                        };
                        out.extend(step_write_from(&known, value, *version));
                    }
                    // An unknown outcome may also have failed the check.
                    if version.is_none() && differs {
                        out.push(s.clone());
                    }
                    out
                }
            }
        }
    }
}

/// The state after writing `value` at `version` over `s`: versions are
/// log indices, so a later write has a larger one.
fn step_write_from(s: &State, value: &[u8], version: Option<u64>) -> Option<State> {
    if let (Some(new), Some(old)) = (version, s.version)
        && new <= old
    {
        return None;
    }
    Some(State {
        value: Some(value.to_vec()),
        version,
    })
}

/// Whether the history of one register is linearizable, starting from an
/// absent key.
pub fn linearizable(history: &[Event]) -> bool {
    check(history, u64::MAX).unwrap_or(false)
}

/// As [`linearizable`], giving up with `None` after `max_steps` steps of
/// the search: many operations of unknown outcome that stay open to the
/// end make the search grow with the subsets of them.
pub fn check(history: &[Event], max_steps: u64) -> Option<bool> {
    // Events in time order: each operation's call, and its return (at
    // the end of time when unknown). At equal times calls come first, so
    // operations that touch are treated as concurrent.
    #[derive(Clone, Copy)]
    struct Node {
        op: usize,
        is_call: bool,
        prev: usize,
        next: usize,
        /// For a call, the index of its return node.
        other: usize,
    }
    let n = history.len();
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in history.iter().enumerate() {
        order.push((e.call, true, i));
        order.push((e.ret.unwrap_or(u64::MAX), false, i));
    }
    order.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // Node 0 is the head sentinel; event k is node k + 1.
    let mut nodes = vec![
        Node {
            op: usize::MAX,
            is_call: false,
            prev: 0,
            next: 0,
            other: 0,
        };
        2 * n + 1
    ];
    let mut call_node = vec![0; n];
    let mut ret_node = vec![0; n];
    for (k, &(_, is_call, i)) in order.iter().enumerate() {
        let id = k + 1;
        nodes[id] = Node {
            op: i,
            is_call,
            prev: k,
            next: if k + 1 < order.len() { k + 2 } else { 0 },
            other: 0,
        };
        if is_call {
            call_node[i] = id;
        } else {
            ret_node[i] = id;
        }
    }
    nodes[0].next = if order.is_empty() { 0 } else { 1 };
    nodes[0].prev = order.len();
    for i in 0..n {
        nodes[call_node[i]].other = ret_node[i];
    }
    let unlink = |nodes: &mut Vec<Node>, id: usize| {
        let (p, q) = (nodes[id].prev, nodes[id].next);
        nodes[p].next = q;
        nodes[q].prev = p;
    };
    let relink = |nodes: &mut Vec<Node>, id: usize| {
        let (p, q) = (nodes[id].prev, nodes[id].next);
        nodes[p].next = id;
        nodes[q].prev = id;
    };

    // The linearized set as a bitset, kept up to date in place: the memo
    // takes a copy of it, no more.
    let mut linearized = vec![0u64; n.div_ceil(64)];
    let flip = |set: &mut Vec<u64>, op: usize| set[op / 64] ^= 1 << (op % 64);
    let mut memo: HashSet<(Vec<u64>, State)> = HashSet::new();
    // A frame: the operation linearized, the state before it, and the
    // other states it could have led to, still to try.
    let mut stack: Vec<(usize, State, Vec<State>)> = Vec::new();
    let mut state = State::default();
    let mut entry = nodes[0].next;
    let mut steps = 0u64;
    loop {
        if nodes[0].next == 0 {
            return Some(true);
        }
        steps += 1;
        if steps > max_steps {
            return None;
        }
        if entry == 0 {
            // Nothing more to try at this level; should not happen, as a
            // return node always ends the walk first.
            return Some(false);
        }
        let node = nodes[entry];
        if node.is_call {
            let mut options = step(&state, &history[node.op].op);
            let mut placed = false;
            while let Some(next) = options.pop() {
                flip(&mut linearized, node.op);
                let key = (linearized.clone(), next.clone());
                if memo.insert(key) {
                    stack.push((node.op, state.clone(), options));
                    state = next;
                    unlink(&mut nodes, entry);
                    unlink(&mut nodes, node.other);
                    entry = nodes[0].next;
                    placed = true;
                    break;
                }
                flip(&mut linearized, node.op);
            }
            if !placed {
                entry = node.next;
            }
        } else {
            // An operation completed before it could be placed: undo the
            // last placement and try what comes after it.
            loop {
                let Some((op, before, mut options)) = stack.pop() else {
                    return Some(false);
                };
                let (c, r) = (call_node[op], ret_node[op]);
                relink(&mut nodes, r);
                relink(&mut nodes, c);
                state = before;
                flip(&mut linearized, op);
                let mut placed = false;
                while let Some(next) = options.pop() {
                    flip(&mut linearized, op);
                    if memo.insert((linearized.clone(), next.clone())) {
                        stack.push((op, state.clone(), options));
                        state = next;
                        unlink(&mut nodes, c);
                        unlink(&mut nodes, r);
                        entry = nodes[0].next;
                        placed = true;
                        break;
                    }
                    flip(&mut linearized, op);
                }
                if placed {
                    break;
                }
                entry = nodes[c].next;
                if entry != 0 {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(call: u64, ret: Option<u64>, op: Op) -> Event {
        Event { call, ret, op }
    }
    fn w(v: &str, ver: Option<u64>) -> Op {
        Op::Write(v.as_bytes().to_vec(), ver)
    }
    fn r(v: Option<(&str, u64)>) -> Op {
        Op::Read(v.map(|(v, n)| (v.as_bytes().to_vec(), n)))
    }

    #[test]
    fn sequential_reads_see_the_last_write() {
        let h = [
            ev(0, Some(1), r(None)),
            ev(2, Some(3), w("a", Some(10))),
            ev(4, Some(5), r(Some(("a", 10)))),
            ev(6, Some(7), w("b", Some(12))),
            ev(8, Some(9), r(Some(("b", 12)))),
        ];
        assert!(linearizable(&h));
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let h = [
            ev(0, Some(1), w("a", Some(10))),
            ev(2, Some(3), w("b", Some(12))),
            ev(4, Some(5), r(Some(("a", 10)))),
        ];
        assert!(!linearizable(&h));
    }

    #[test]
    fn concurrent_operations_may_order_either_way() {
        // The read overlaps the write: it may see the old or new value.
        let old = [
            ev(0, Some(1), w("a", Some(10))),
            ev(2, Some(6), w("b", Some(12))),
            ev(3, Some(4), r(Some(("a", 10)))),
            ev(7, Some(8), r(Some(("b", 12)))),
        ];
        assert!(linearizable(&old));
        // But two readers cannot see the new value and then the old one.
        let flip = [
            ev(0, Some(1), w("a", Some(10))),
            ev(2, Some(10), w("b", Some(12))),
            ev(3, Some(4), r(Some(("b", 12)))),
            ev(5, Some(6), r(Some(("a", 10)))),
        ];
        assert!(!linearizable(&flip));
    }

    #[test]
    fn an_unknown_write_may_or_may_not_have_happened() {
        let seen = [ev(0, None, w("a", None)), ev(5, Some(6), r(Some(("a", 7))))];
        assert!(linearizable(&seen));
        let unseen = [ev(0, None, w("a", None)), ev(5, Some(6), r(None))];
        assert!(linearizable(&unseen));
        // It cannot take effect before it was sent.
        let early = [ev(0, Some(1), r(Some(("a", 7)))), ev(5, None, w("a", None))];
        assert!(!linearizable(&early));
    }

    #[test]
    fn a_value_never_written_is_caught() {
        let h = [
            ev(0, Some(1), w("a", Some(3))),
            ev(2, Some(3), r(Some(("z", 3)))),
        ];
        assert!(!linearizable(&h));
    }

    #[test]
    fn versions_only_grow() {
        let h = [
            ev(0, Some(1), w("a", Some(10))),
            ev(2, Some(3), w("b", Some(9))),
        ];
        assert!(!linearizable(&h));
    }

    #[test]
    fn compare_and_swap_succeeds_only_on_the_current_version() {
        let cas = |expected, v: &str, result| Op::Cas {
            expected,
            value: v.as_bytes().to_vec(),
            result,
        };
        let ok = [
            ev(0, Some(1), w("a", Some(10))),
            ev(2, Some(3), cas(10, "b", Ok(Some(11)))),
            ev(4, Some(5), cas(10, "c", Err(()))),
            ev(6, Some(7), r(Some(("b", 11)))),
        ];
        assert!(linearizable(&ok));
        // Two swaps on the same version cannot both succeed.
        let both = [
            ev(0, Some(1), w("a", Some(10))),
            ev(2, Some(5), cas(10, "b", Ok(Some(11)))),
            ev(3, Some(6), cas(10, "c", Ok(Some(12)))),
        ];
        assert!(!linearizable(&both));
        // A refused swap while the version did match is wrong.
        let refused = [
            ev(0, Some(1), w("a", Some(10))),
            ev(2, Some(3), cas(10, "b", Err(()))),
        ];
        assert!(!linearizable(&refused));
    }

    #[test]
    fn many_concurrent_writers_are_checked_quickly() {
        // 12 writers all overlapping, then one read of the last version:
        // exponential without the memo.
        let mut h: Vec<Event> = (0..12)
            .map(|i| ev(i, Some(100 + i), w(&format!("v{i}"), Some(10 + i))))
            .collect();
        h.push(ev(200, Some(201), r(Some(("v11", 21)))));
        assert!(linearizable(&h));
        h.push(ev(202, Some(203), r(Some(("v3", 13)))));
        assert!(!linearizable(&h));
    }

    /// Histories made by a real register, each operation taking effect at
    /// a random instant inside its interval (or, for an unknown outcome,
    /// anywhere after its call, or never): the checker must accept all.
    #[test]
    fn histories_of_a_real_register_are_all_accepted() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            // (call, ret, effect instant, kind): kind 0 read, 1 write, 2 cas.
            let ops: Vec<(u64, u64, u64, u64, bool)> = (0..(4 + rnd(10)))
                .map(|_| {
                    let call = rnd(100) * 10;
                    let ret = call + 1 + rnd(60) * 10;
                    let at = call + rnd(ret - call);
                    let unknown = rnd(6) == 0;
                    (call, ret, at, rnd(3), unknown)
                })
                .collect();
            let mut order: Vec<usize> = (0..ops.len()).collect();
            order.sort_by_key(|&i| (ops[i].2, i));
            let mut value: Option<(Vec<u8>, u64)> = None;
            let mut version = 0;
            let mut history = vec![None; ops.len()];
            for i in order {
                let (call, ret, _, kind, unknown) = ops[i];
                let v = format!("v{round}-{i}").into_bytes();
                let op = match kind {
                    0 => Op::Read(value.clone()),
                    1 => {
                        version += 1;
                        value = Some((v.clone(), version));
                        Op::Write(v, (!unknown).then_some(version))
                    }
                    _ => {
                        let expected = value.as_ref().map_or(0, |(_, n)| *n) + rnd(2);
                        let current = value.as_ref().map(|(_, n)| *n);
                        if current == Some(expected) {
                            version += 1;
                            value = Some((v.clone(), version));
                            Op::Cas {
                                expected,
                                value: v,
                                result: Ok((!unknown).then_some(version)),
                            }
                        } else {
                            Op::Cas {
                                expected,
                                value: v,
                                result: Err(()),
                            }
                        }
                    }
                };
                let ret = (!(unknown && kind != 0)).then_some(ret);
                history[i] = Some(ev(call, ret, op));
            }
            let history: Vec<Event> = history.into_iter().flatten().collect();
            assert!(linearizable(&history), "round {round}: {history:#?}");
        }
    }
}
