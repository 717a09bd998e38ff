//! Per-plugin streams of committed entries, as both log engines keep them:
//! a redb table of runs, and a watch per stream that reports its last
//! committed index.
//!
//! A run is what one commit added to one stream: under load a Raft entry
//! carries about a hundred proposals, and storing each as its own row cost
//! a B-tree insert per proposal on every node. A run is one row.

use std::collections::HashMap;
use std::sync::Mutex;

use redb::{
    Database, ReadableDatabase, ReadableTable, Table, TableDefinition, TableHandle,
    WriteTransaction,
};
use tokio::sync::watch;

use super::log::{Entry, LogError};

/// `(stream, index of the run's last entry)` → the run: the stream's
/// entries of one commit in index order, each `index (8 bytes LE) ++ term
/// (8 bytes LE) ++ length (4 bytes LE) ++ data`.
pub const RUNS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("stream-runs");

/// One row per entry, `(stream, index)` → `term ++ data`: the layout of
/// files written before runs, converted by [`open_tables`].
const ENTRIES_V0: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("entries");

/// Bytes in front of each entry's data in a run.
const HEAD: usize = 20;

/// Most entries in a run, so no row grows without bound.
const RUN_MAX: usize = 1024;

pub(crate) fn err(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(e.to_string())
}

/// Encodes an entry as a snapshot carries it: `term (8 bytes LE) ++ data`.
pub fn encode(term: u64, data: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&term.to_le_bytes());
    buf.extend_from_slice(data);
}

/// Decodes what [`encode`] wrote: `(term, data)`.
pub fn decode(raw: &[u8]) -> Result<(u64, &[u8]), LogError> {
    raw.split_first_chunk::<8>()
        .map(|(t, d)| (u64::from_le_bytes(*t), d))
        .ok_or_else(|| LogError::Storage("corrupt stream entry: shorter than its term".into()))
}

/// Creates the stream table in `txn`'s file, and converts the one-row-per-
/// entry table of an older file into runs.
pub fn open_tables(txn: &WriteTransaction) -> Result<(), LogError> {
    let mut runs = txn.open_table(RUNS).map_err(err)?;
    let old = txn
        .list_tables()
        .map_err(err)?
        .any(|t| t.name() == ENTRIES_V0.name());
    if !old {
        return Ok(());
    }
    let mut builder = Runs::default();
    for item in txn
        .open_table(ENTRIES_V0)
        .map_err(err)?
        .iter()
        .map_err(err)?
    {
        let (k, v) = item.map_err(err)?;
        let (stream, index) = k.value();
        let (term, data) = decode(v.value())?;
        builder.push(stream, index, term, data)?;
    }
    builder.write(&mut runs)?;
    txn.delete_table(ENTRIES_V0).map_err(err)?;
    Ok(())
}

/// One entry of a run, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Cluster-wide log index.
    pub index: u64,
    /// Term it was committed in.
    pub term: u64,
    /// The proposed bytes.
    pub data: &'a [u8],
}

/// The entries of a stored run, in index order; a run that does not
/// decode ends with an error.
pub struct Records<'a>(&'a [u8]);

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let corrupt = || Some(Err(LogError::Storage("corrupt stream run".into())));
        let Some((head, rest)) = self.0.split_first_chunk::<HEAD>() else {
            self.0 = &[];
            return corrupt();
        };
        let index = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let term = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[16..].try_into().expect("4 bytes"));
        let Some((data, rest)) = usize::try_from(len)
            .ok()
            .and_then(|n| rest.split_at_checked(n))
        else {
            self.0 = &[];
            return corrupt();
        };
        self.0 = rest;
        Some(Ok(Record { index, term, data }))
    }
}

/// The entries of `run`.
pub fn records(run: &[u8]) -> Records<'_> {
    Records(run)
}

/// Runs being built for one commit. Entries are pushed in index order;
/// each stream's go into one row, or one per `RUN_MAX` entries (a node
/// catching up applies thousands of entries at once, and a reader walks a
/// whole run to find where it starts).
#[derive(Default)]
pub struct Runs {
    runs: Vec<Run>,
}

/// One run being built.
struct Run {
    stream: String,
    /// Index of its last entry: the run's key.
    last: u64,
    /// The encoded entries.
    bytes: Vec<u8>,
    entries: usize,
}

impl Runs {
    /// Adds an entry of `stream`, whose index is above all pushed before.
    pub fn push(
        &mut self,
        stream: &str,
        index: u64,
        term: u64,
        data: &[u8],
    ) -> Result<(), LogError> {
        let len = u32::try_from(data.len())
            .map_err(|_| LogError::Storage(format!("an entry of {} bytes", data.len())))?;
        // A node runs a handful of plugins: a scan beats hashing here.
        let at = match self.runs.iter().rposition(|r| r.stream == stream) {
            Some(at) if self.runs[at].entries < RUN_MAX => at,
            _ => {
                self.runs.push(Run {
                    stream: stream.to_string(),
                    last: 0,
                    bytes: Vec::new(),
                    entries: 0,
                });
                self.runs.len() - 1
            }
        };
        let run = &mut self.runs[at];
        run.last = index;
        run.bytes.reserve(HEAD + data.len());
        run.bytes.extend_from_slice(&index.to_le_bytes());
        run.bytes.extend_from_slice(&term.to_le_bytes());
        run.bytes.extend_from_slice(&len.to_le_bytes());
        run.bytes.extend_from_slice(data);
        run.entries += 1;
        Ok(())
    }

    /// Writes the runs into `table`. Returns each stream's last index.
    pub fn write(
        self,
        table: &mut Table<(&'static str, u64), &'static [u8]>,
    ) -> Result<HashMap<String, u64>, LogError> {
        let mut last = HashMap::with_capacity(self.runs.len());
        for run in self.runs {
            table
                .insert((run.stream.as_str(), run.last), run.bytes.as_slice())
                .map_err(err)?;
            last.insert(run.stream, run.last);
        }
        Ok(last)
    }
}

/// Committed entries of `stream` with `after < index <= through`, at most
/// `max` of them.
pub fn read(
    db: &Database,
    stream: &str,
    after: u64,
    through: u64,
    max: usize,
) -> Result<Vec<Entry>, LogError> {
    let mut out = Vec::new();
    if after >= through || max == 0 {
        return Ok(out);
    }
    let txn = db.begin_read().map_err(err)?;
    let table = txn.open_table(RUNS).map_err(err)?;
    // The first run ending past `after` may begin at or before it.
    for item in table
        .range((stream, after + 1)..=(stream, u64::MAX))
        .map_err(err)?
    {
        let (_, run) = item.map_err(err)?;
        for record in records(run.value()) {
            let r = record?;
            if r.index <= after {
                continue;
            }
            if r.index > through {
                return Ok(out);
            }
            out.push(Entry {
                index: r.index,
                term: r.term,
                data: r.data.to_vec(),
            });
            if out.len() >= max {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

/// Searches `stream`'s entries at or below `through` from the last one
/// back, for the first that `pick` takes.
fn find_back<T>(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    stream: &str,
    through: u64,
    mut pick: impl FnMut(Record<'_>) -> Option<T>,
) -> Result<Option<T>, LogError> {
    let mut search = |run: &[u8]| -> Result<Option<T>, LogError> {
        let all = records(run).collect::<Result<Vec<_>, _>>()?;
        Ok(all
            .into_iter()
            .rev()
            .filter(|r| r.index <= through)
            .find_map(&mut pick))
    };
    // The run that ends past `through` may hold entries at or below it.
    if let Some(past) = through.checked_add(1)
        && let Some(item) = table
            .range((stream, past)..=(stream, u64::MAX))
            .map_err(err)?
            .next()
    {
        let (_, run) = item.map_err(err)?;
        if let Some(found) = search(run.value())? {
            return Ok(Some(found));
        }
    }
    for item in table
        .range((stream, 0)..=(stream, through))
        .map_err(err)?
        .rev()
    {
        let (_, run) = item.map_err(err)?;
        if let Some(found) = search(run.value())? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The last host control entry (a cluster-wide swap) of `stream` at or
/// below `through`, as `(index, data)`.
pub fn last_control(
    db: &Database,
    stream: &str,
    through: u64,
) -> Result<Option<(u64, Vec<u8>)>, LogError> {
    let txn = db.begin_read().map_err(err)?;
    control_in(&txn.open_table(RUNS).map_err(err)?, stream, through)
}

/// [`last_control`] in an open stream table.
pub fn control_in(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    stream: &str,
    through: u64,
) -> Result<Option<(u64, Vec<u8>)>, LogError> {
    find_back(table, stream, through, |r| {
        (r.data.first() == Some(&crate::cluster::framing::TAG_CONTROL))
            .then(|| (r.index, r.data.to_vec()))
    })
}

/// The index of the last entry of `stream` at or below `through`.
pub fn last_at_or_below(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    stream: &str,
    through: u64,
) -> Result<Option<u64>, LogError> {
    find_back(table, stream, through, |r| Some(r.index))
}

/// Deletes the entries of `stream` below index `keep`.
pub fn delete_below(
    table: &mut Table<(&'static str, u64), &'static [u8]>,
    stream: &str,
    keep: u64,
) -> Result<(), LogError> {
    table
        .retain_in((stream, 0)..(stream, keep), |_, _| false)
        .map_err(err)?;
    // The run that holds `keep` may begin below it: it is written again
    // without those entries.
    let straddling = match table
        .range((stream, keep)..=(stream, u64::MAX))
        .map_err(err)?
        .next()
    {
        Some(item) => {
            let (k, run) = item.map_err(err)?;
            let mut kept = Vec::with_capacity(run.value().len());
            let mut dropped = false;
            let mut rest = run.value();
            for record in records(run.value()) {
                let r = record?;
                let size = HEAD + r.data.len();
                if r.index < keep {
                    dropped = true;
                } else {
                    kept.extend_from_slice(&rest[..size]);
                }
                rest = &rest[size..];
            }
            dropped.then(|| (k.value().1, kept))
        }
        None => None,
    };
    if let Some((last, kept)) = straddling {
        table.insert((stream, last), kept.as_slice()).map_err(err)?;
    }
    Ok(())
}

/// Every entry of `stream`, as `(index, term ++ data)` (see [`encode`]).
pub fn all(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    stream: &str,
) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
    let mut out = Vec::new();
    for item in table.range((stream, 0)..=(stream, u64::MAX)).map_err(err)? {
        let (_, run) = item.map_err(err)?;
        for record in records(run.value()) {
            let r = record?;
            let mut buf = Vec::new();
            encode(r.term, r.data, &mut buf);
            out.push((r.index, buf));
        }
    }
    Ok(out)
}

/// Writes `entries` of `stream`, `(index, term ++ data)` in index order.
pub fn write_all(
    table: &mut Table<(&'static str, u64), &'static [u8]>,
    stream: &str,
    entries: &[(u64, Vec<u8>)],
) -> Result<(), LogError> {
    let mut runs = Runs::default();
    for (index, raw) in entries {
        let (term, data) = decode(raw)?;
        runs.push(stream, *index, term, data)?;
    }
    runs.write(table).map(drop)
}

/// The last index of `stream` (0 when empty).
pub fn last(db: &Database, stream: &str) -> Result<u64, LogError> {
    let txn = db.begin_read().map_err(err)?;
    let table = txn.open_table(RUNS).map_err(err)?;
    let last = table
        .range((stream, 0)..=(stream, u64::MAX))
        .map_err(err)?
        .next_back()
        .transpose()
        .map_err(err)?
        .map_or(0, |(k, _)| k.value().1);
    Ok(last)
}

/// The watches: the whole log's commit index and each stream's.
pub struct Watches {
    commit: watch::Sender<u64>,
    streams: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Watches {
    /// Watches starting at commit index `commit`.
    pub fn new(commit: u64) -> Self {
        Watches {
            commit: watch::Sender::new(commit),
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// The commit index.
    pub fn commit_index(&self) -> u64 {
        *self.commit.borrow()
    }

    /// Waits until the commit index reaches `index`.
    pub async fn wait_for(&self, index: u64) {
        let mut rx = self.commit.subscribe();
        let _ = rx.wait_for(|i| *i >= index).await;
    }

    /// Publishes new commits: the log's index and each stream's last.
    pub fn publish(&self, commit: u64, per_stream: HashMap<String, u64>) {
        let mut streams = self.streams.lock().expect("stream map poisoned");
        for (stream, last) in per_stream {
            streams
                .entry(stream)
                .or_insert_with(|| watch::Sender::new(0))
                .send_replace(last);
        }
        drop(streams);
        self.commit.send_replace(commit);
    }

    /// Resets every stream watch from the table (after a snapshot install).
    pub fn reload(&self, db: &Database, commit: u64) -> Result<(), LogError> {
        let streams = self.streams.lock().expect("stream map poisoned");
        for (stream, tx) in streams.iter() {
            tx.send_replace(last(db, stream)?);
        }
        drop(streams);
        self.commit.send_replace(commit);
        Ok(())
    }

    /// A receiver of `stream`'s last committed index.
    pub fn subscribe(&self, db: &Database, stream: &str) -> Result<watch::Receiver<u64>, LogError> {
        let mut streams = self.streams.lock().expect("stream map poisoned");
        if let Some(tx) = streams.get(stream) {
            return Ok(tx.subscribe());
        }
        let tx = watch::Sender::new(last(db, stream)?);
        let rx = tx.subscribe();
        streams.insert(stream.to_string(), tx);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("streams.redb")).unwrap();
        (dir, db)
    }

    /// Commits one run per call: `kv` gets the odd indices of `from..to`,
    /// `other` the even ones, so every run of `kv` straddles `other`'s.
    fn commit(db: &Database, from: u64, to: u64) {
        let txn = db.begin_write().unwrap();
        let mut runs = Runs::default();
        for i in from..to {
            let stream = if i % 2 == 1 { "kv" } else { "other" };
            runs.push(stream, i, 7, format!("e{i}").as_bytes()).unwrap();
        }
        runs.write(&mut txn.open_table(RUNS).unwrap()).unwrap();
        txn.commit().unwrap();
    }

    fn indices(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.index).collect()
    }

    #[test]
    fn reads_start_and_stop_inside_runs() {
        let (_dir, db) = db();
        commit(&db, 1, 11);
        commit(&db, 11, 21);
        let all = read(&db, "kv", 0, 100, 100).unwrap();
        assert_eq!(indices(&all), [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]);
        assert_eq!(all[2].data, b"e5");
        assert_eq!(all[2].term, 7);
        assert_eq!(
            indices(&read(&db, "kv", 4, 14, 100).unwrap()),
            [5, 7, 9, 11, 13]
        );
        assert_eq!(indices(&read(&db, "kv", 4, 14, 2).unwrap()), [5, 7]);
        assert_eq!(
            indices(&read(&db, "kv", 19, 100, 5).unwrap()),
            Vec::<u64>::new()
        );
        assert_eq!(last(&db, "kv").unwrap(), 19);
        assert_eq!(last(&db, "other").unwrap(), 20);
        assert_eq!(last(&db, "none").unwrap(), 0);
    }

    #[test]
    fn backward_searches_look_into_the_run_that_ends_past_the_bound() {
        let (_dir, db) = db();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(RUNS).unwrap();
            let mut runs = Runs::default();
            let control = [crate::cluster::framing::TAG_CONTROL, 1];
            runs.push("kv", 3, 1, &control).unwrap();
            runs.push("kv", 5, 1, b"x").unwrap();
            runs.push("kv", 9, 1, b"y").unwrap();
            runs.write(&mut t).unwrap();
            assert_eq!(last_at_or_below(&t, "kv", 8).unwrap(), Some(5));
            assert_eq!(last_at_or_below(&t, "kv", 9).unwrap(), Some(9));
            assert_eq!(last_at_or_below(&t, "kv", 2).unwrap(), None);
            assert_eq!(
                control_in(&t, "kv", 4).unwrap(),
                Some((3, control.to_vec()))
            );
            assert_eq!(control_in(&t, "kv", 2).unwrap(), None);
            assert_eq!(
                control_in(&t, "kv", u64::MAX).unwrap().map(|c| c.0),
                Some(3)
            );
        }
        txn.commit().unwrap();
    }

    #[test]
    fn deleting_below_an_index_rewrites_the_run_that_holds_it() {
        let (_dir, db) = db();
        commit(&db, 1, 11);
        commit(&db, 11, 21);
        let txn = db.begin_write().unwrap();
        delete_below(&mut txn.open_table(RUNS).unwrap(), "kv", 15).unwrap();
        txn.commit().unwrap();
        assert_eq!(
            indices(&read(&db, "kv", 0, 100, 100).unwrap()),
            [15, 17, 19]
        );
        assert_eq!(indices(&read(&db, "other", 0, 100, 100).unwrap()).len(), 10);
        assert_eq!(last(&db, "kv").unwrap(), 19);
    }

    #[test]
    fn a_stream_written_from_a_list_reads_back_the_same() {
        let (_dir, db) = db();
        let entries: Vec<(u64, Vec<u8>)> = (1..=2500)
            .map(|i| {
                let mut raw = Vec::new();
                encode(i / 1000, &i.to_le_bytes(), &mut raw);
                (i * 2, raw)
            })
            .collect();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(RUNS).unwrap();
            write_all(&mut t, "kv", &entries).unwrap();
            assert_eq!(t.len().unwrap(), 3, "runs of at most {RUN_MAX}");
            assert_eq!(all(&t, "kv").unwrap(), entries);
        }
        txn.commit().unwrap();
    }

    #[test]
    fn a_file_with_one_row_per_entry_is_converted_to_runs() {
        let (_dir, db) = db();
        let txn = db.begin_write().unwrap();
        {
            let mut old = txn.open_table(ENTRIES_V0).unwrap();
            let mut buf = Vec::new();
            for i in 1..=2100u64 {
                let stream = if i % 3 == 0 { "election" } else { "kv" };
                encode(2, format!("e{i}").as_bytes(), &mut buf);
                old.insert((stream, i), buf.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();

        let txn = db.begin_write().unwrap();
        open_tables(&txn).unwrap();
        txn.commit().unwrap();

        let kv = read(&db, "kv", 0, u64::MAX, usize::MAX).unwrap();
        assert_eq!(kv.len(), 1400);
        assert_eq!(
            (kv[1].index, kv[1].term, kv[1].data.as_slice()),
            (2, 2, &b"e2"[..])
        );
        assert_eq!(
            read(&db, "election", 0, u64::MAX, usize::MAX)
                .unwrap()
                .len(),
            700
        );
        let txn = db.begin_read().unwrap();
        assert!(
            txn.list_tables()
                .unwrap()
                .all(|t| t.name() != ENTRIES_V0.name())
        );
    }

    #[test]
    fn a_corrupt_run_is_an_error_not_a_panic() {
        let mut run = Vec::new();
        run.extend_from_slice(&1u64.to_le_bytes());
        run.extend_from_slice(&1u64.to_le_bytes());
        run.extend_from_slice(&u32::MAX.to_le_bytes());
        run.extend_from_slice(b"short");
        assert!(matches!(
            records(&run).next(),
            Some(Err(LogError::Storage(_)))
        ));
        assert!(matches!(
            records(&run[..5]).next(),
            Some(Err(LogError::Storage(_)))
        ));
    }
}
