//! Compaction of the per-plugin streams, shared by both log engines.
//!
//! A stream is compacted behind its plugin's [`RestorePoint`]: the plugin's
//! state (storage, cursor, `snapshot` bytes) through an index replaces the
//! entries it has applied. The last entry at or below the point is kept,
//! because it marks where the stream ends. A reader whose cursor is below
//! the stream's floor (the highest index deleted) gets
//! [`LogError::Compacted`] and continues from the restore point.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::log::{Capture, Entry, LogError, RestorePoint};
use super::streams::{self, RUNS, err};

/// Stream → its latest [`RestorePoint`] (postcard).
pub const RESTORE: TableDefinition<&str, &[u8]> = TableDefinition::new("restore-points");
/// Stream → the highest index of its entries deleted by compaction.
pub const FLOORS: TableDefinition<&str, u64> = TableDefinition::new("compacted-floors");
/// How long compaction waits for the plugins' state.
pub const CAPTURE_TIMEOUT: Duration = Duration::from_secs(5);

/// One stream after compaction, as a snapshot carries it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StreamState {
    /// The stream's name (the plugin's).
    pub name: String,
    /// The highest index of its deleted entries.
    pub floor: u64,
    /// Its restore point, if it has one.
    pub point: Option<RestorePoint>,
    /// The entries kept, as `(index, term ++ data)` (see
    /// [`streams::encode`]).
    pub entries: Vec<(u64, Vec<u8>)>,
}

/// What a log keeps to compact its streams: the floors, and where plugin
/// state comes from.
pub struct Compaction {
    /// Per stream, the highest index compacted away (see
    /// [`commit`](Self::commit)).
    floors: Mutex<HashMap<String, u64>>,
    capture: OnceLock<Arc<dyn Capture>>,
}

impl Compaction {
    /// Loads the floors recorded in `txn`'s database (creating the tables).
    pub fn open(txn: &WriteTransaction) -> Result<Compaction, LogError> {
        txn.open_table(RESTORE).map_err(err)?;
        let mut floors = HashMap::new();
        for item in txn.open_table(FLOORS).map_err(err)?.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            floors.insert(k.value().to_string(), v.value());
        }
        Ok(Compaction {
            floors: Mutex::new(floors),
            capture: OnceLock::new(),
        })
    }

    /// Sets where plugin state comes from.
    pub fn set_capture(&self, capture: Arc<dyn Capture>) {
        let _ = self.capture.set(capture);
    }

    /// The state of every plugin running here (none before
    /// [`set_capture`](Self::set_capture)).
    pub async fn capture(&self) -> HashMap<String, RestorePoint> {
        match self.capture.get().cloned() {
            Some(capture) => capture.capture(CAPTURE_TIMEOUT).await,
            None => HashMap::new(),
        }
    }

    fn floors(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.floors.lock().expect("floors poisoned")
    }

    /// Commits `txn`, which moved the floors, and applies `moved` to the
    /// floors readers check. The floors stay locked across the commit, so a
    /// reader that checks them after reading never misses a gap.
    pub fn commit(
        &self,
        txn: WriteTransaction,
        moved: impl FnOnce(&mut HashMap<String, u64>),
    ) -> Result<(), LogError> {
        let mut floors = self.floors();
        txn.commit().map_err(err)?;
        moved(&mut floors);
        Ok(())
    }

    /// Committed entries of `stream` with `after < index <= through`, or
    /// [`LogError::Compacted`] when some of them were compacted away.
    pub fn entries(
        &self,
        db: &Database,
        stream: &str,
        after: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<Entry>, LogError> {
        let out = streams::read(db, stream, after, through, max)?;
        let floor = self.floors().get(stream).copied().unwrap_or(0);
        if after < floor {
            return Err(LogError::Compacted(floor));
        }
        Ok(out)
    }
}

/// The restore point of `stream`, if any.
pub fn restore_point(db: &Database, stream: &str) -> Result<Option<RestorePoint>, LogError> {
    let txn = db.begin_read().map_err(err)?;
    let t = txn.open_table(RESTORE).map_err(err)?;
    t.get(stream)
        .map_err(err)?
        .map(|v| postcard::from_bytes(v.value()).map_err(err))
        .transpose()
}

/// The last host control entry of `stream` at or below `through`, in the
/// stream itself or, below its floor, in its restore point.
pub fn last_control(
    db: &Database,
    stream: &str,
    through: u64,
) -> Result<Option<(u64, Vec<u8>)>, LogError> {
    if let Some(found) = streams::last_control(db, stream, through)? {
        return Ok(Some(found));
    }
    Ok(restore_point(db, stream)?
        .and_then(|p| p.control)
        .filter(|(index, _)| *index <= through))
}

/// Names of the streams that have entries or a restore point.
fn stream_names(txn: &WriteTransaction) -> Result<BTreeSet<String>, LogError> {
    let mut names = BTreeSet::new();
    let t = txn.open_table(RUNS).map_err(err)?;
    let first = |r: Option<Result<_, redb::StorageError>>| -> Result<Option<String>, LogError> {
        Ok(r.transpose()
            .map_err(err)?
            .map(|(k, _): (redb::AccessGuard<(&str, u64)>, _)| k.value().0.to_string()))
    };
    let mut next = first(t.iter().map_err(err)?.next())?;
    while let Some(name) = next {
        let after = (Bound::Excluded((name.as_str(), u64::MAX)), Bound::Unbounded);
        next = first(t.range::<(&str, u64)>(after).map_err(err)?.next())?;
        names.insert(name);
    }
    for item in txn.open_table(RESTORE).map_err(err)?.iter().map_err(err)? {
        names.insert(item.map_err(err)?.0.value().to_string());
    }
    Ok(names)
}

/// What [`compact`] did: each stream's state (when collected), and the
/// floors that moved.
pub type Compacted = (Vec<StreamState>, Vec<(String, u64)>);

/// Compacts, in `txn`, each stream of `captured` behind its new restore
/// point (a point no newer than the stream's current one, or past
/// `last_index`, is ignored). Returns the floors that moved, for the
/// caller to publish once `txn` commits, and, when `collect` is set, every
/// stream's state after it (what a snapshot carries).
pub fn compact(
    txn: &WriteTransaction,
    mut captured: HashMap<String, RestorePoint>,
    last_index: u64,
    collect: bool,
) -> Result<Compacted, LogError> {
    let names = stream_names(txn)?;
    let mut streams = Vec::with_capacity(names.len());
    let mut moved = Vec::new();
    let mut entries = txn.open_table(RUNS).map_err(err)?;
    let mut points = txn.open_table(RESTORE).map_err(err)?;
    let mut floors = txn.open_table(FLOORS).map_err(err)?;
    for name in names {
        let old: Option<RestorePoint> = points
            .get(name.as_str())
            .map_err(err)?
            .map(|v| postcard::from_bytes(v.value()))
            .transpose()
            .map_err(err)?;
        let mut floor = floors
            .get(name.as_str())
            .map_err(err)?
            .map_or(0, |v| v.value());
        let mut fresh = captured
            .remove(&name)
            .filter(|p| p.index > old.as_ref().map_or(0, |o| o.index) && p.index <= last_index);
        if let Some(point) = &mut fresh {
            point.control = streams::control_in(&entries, &name, point.index)?
                .or_else(|| old.as_ref().and_then(|o| o.control.clone()));
            let encoded = postcard::to_allocvec(point).map_err(err)?;
            points
                .insert(name.as_str(), encoded.as_slice())
                .map_err(err)?;
            if let Some(keep) = streams::last_at_or_below(&entries, &name, point.index)?
                && let Some(below) = keep.checked_sub(1)
                && let Some(deleted) = streams::last_at_or_below(&entries, &name, below)?
            {
                streams::delete_below(&mut entries, &name, keep)?;
                floor = floor.max(deleted);
                floors.insert(name.as_str(), floor).map_err(err)?;
                moved.push((name.clone(), floor));
            }
        }
        if !collect {
            continue;
        }
        let kept = streams::all(&entries, &name)?;
        streams.push(StreamState {
            name,
            floor,
            point: fresh.or(old),
            entries: kept,
        });
    }
    Ok((streams, moved))
}

/// Replaces, in `txn`, every stream, restore point and floor by
/// `streams` (a snapshot's). Returns the new floors.
pub fn install(
    txn: &WriteTransaction,
    streams: &[StreamState],
) -> Result<HashMap<String, u64>, LogError> {
    let mut t = txn.open_table(RUNS).map_err(err)?;
    t.retain(|_, _| false).map_err(err)?;
    let mut points = txn.open_table(RESTORE).map_err(err)?;
    points.retain(|_, _| false).map_err(err)?;
    let mut floors = txn.open_table(FLOORS).map_err(err)?;
    floors.retain(|_, _| false).map_err(err)?;
    let mut new_floors = HashMap::new();
    for stream in streams {
        streams::write_all(&mut t, &stream.name, &stream.entries)?;
        if let Some(point) = &stream.point {
            let encoded = postcard::to_allocvec(point).map_err(err)?;
            points
                .insert(stream.name.as_str(), encoded.as_slice())
                .map_err(err)?;
        }
        if stream.floor > 0 {
            floors
                .insert(stream.name.as_str(), stream.floor)
                .map_err(err)?;
            new_floors.insert(stream.name.clone(), stream.floor);
        }
    }
    Ok(new_floors)
}

/// A [`Capture`] for tests: the plugin `kv` has applied through the index,
/// with one key in storage and `memory` as its `snapshot` bytes.
#[cfg(test)]
pub struct AppliedThrough(pub u64);

#[cfg(test)]
impl Capture for AppliedThrough {
    fn capture(
        &self,
        _: Duration,
    ) -> super::log::BoxFuture<'static, HashMap<String, RestorePoint>> {
        let point = RestorePoint {
            index: self.0,
            items: vec![(b"k".to_vec(), b"v".to_vec(), 1)],
            state: b"memory".to_vec(),
            control: None,
        };
        Box::pin(async move { HashMap::from([("kv".to_string(), point)]) })
    }
}
