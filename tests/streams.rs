//! Histories of `event-store` streams appended to with expected versions,
//! checked for what their users rely on: every stream's versions run
//! 0, 1, 2, ... with no gap; no event (by id) is stored twice; every
//! acknowledged append is stored at the version its answer named, which is
//! the one after the version it expected; and nothing is stored that no
//! one appended.

use std::collections::{BTreeMap, BTreeSet};

/// An append answered 200.
#[derive(Debug, Clone)]
pub struct Appended {
    pub stream: String,
    pub id: String,
    /// The version expected (`None`: no stream).
    pub expected: Option<u64>,
    /// The version the answer gave the event.
    pub version: u64,
}

#[derive(Debug, Default)]
pub struct Streams {
    pub acknowledged: Vec<Appended>,
    /// Appends whose outcome is unknown, by id (stored at most once).
    pub unknown: BTreeSet<String>,
    /// What each stream holds at the end: (version, id) in read order.
    pub stored: BTreeMap<String, Vec<(u64, String)>>,
}

/// What breaks the rules, one line each.
pub fn violations(s: &Streams) -> Vec<String> {
    let mut out = Vec::new();
    let mut at: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for (stream, events) in &s.stored {
        for (i, (version, id)) in events.iter().enumerate() {
            if *version != i as u64 {
                out.push(format!("{stream}: version {version} at place {i}"));
            }
            if !ids.insert(id.as_str()) {
                out.push(format!("{stream}: event {id} stored twice"));
            }
            at.insert((stream.as_str(), id.as_str()), *version);
        }
    }
    let acked: BTreeSet<&str> = s.acknowledged.iter().map(|a| a.id.as_str()).collect();
    for id in &ids {
        if !acked.contains(id) && !s.unknown.contains(*id) {
            out.push(format!("event {id} stored, never appended"));
        }
    }
    for a in &s.acknowledged {
        match at.get(&(a.stream.as_str(), a.id.as_str())) {
            None => out.push(format!("{}: acknowledged event {} lost", a.stream, a.id)),
            Some(v) if *v != a.version => out.push(format!(
                "{}: event {} acknowledged at version {} is at {v}",
                a.stream, a.id, a.version
            )),
            Some(_) => {}
        }
        let next = a.expected.map_or(0, |e| e + 1);
        if a.version != next {
            out.push(format!(
                "{}: event {} expected {:?} and got version {}",
                a.stream, a.id, a.expected, a.version
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(stream: &str, id: &str, expected: Option<u64>, version: u64) -> Appended {
        Appended {
            stream: stream.into(),
            id: id.into(),
            expected,
            version,
        }
    }

    fn good() -> Streams {
        let mut s = Streams::default();
        s.acknowledged.push(acked("a", "x", None, 0));
        s.acknowledged.push(acked("a", "y", Some(0), 1));
        s.unknown.insert("z".into());
        s.stored.insert(
            "a".into(),
            vec![(0, "x".into()), (1, "y".into()), (2, "z".into())],
        );
        s
    }

    #[test]
    fn a_history_that_keeps_the_rules_passes() {
        assert!(violations(&good()).is_empty());
        let mut s = good();
        s.stored.get_mut("a").unwrap().pop();
        assert!(violations(&s).is_empty(), "an unknown append may be absent");
    }

    #[test]
    fn loss_gaps_doubles_and_strangers_are_caught() {
        let mut lost = good();
        lost.stored.get_mut("a").unwrap().remove(1);
        let v = violations(&lost);
        assert!(v.iter().any(|l| l.contains("y lost")), "{v:?}");
        assert!(
            v.iter().any(|l| l.contains("version 2 at place 1")),
            "{v:?}"
        );
        let mut twice = good();
        twice.stored.get_mut("a").unwrap().push((3, "x".into()));
        assert!(
            violations(&twice)
                .iter()
                .any(|l| l.contains("x stored twice"))
        );
        let mut stranger = good();
        stranger.stored.get_mut("a").unwrap().push((3, "w".into()));
        assert!(
            violations(&stranger)
                .iter()
                .any(|l| l.contains("never appended"))
        );
        let mut wrong = good();
        wrong.acknowledged.push(acked("a", "z", Some(0), 2));
        assert!(
            violations(&wrong)
                .iter()
                .any(|l| l.contains("expected Some(0) and got version 2"))
        );
    }
}
