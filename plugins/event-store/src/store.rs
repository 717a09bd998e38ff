//! Streams and events as stored, and what an append, a metadata change
//! and a delete do to them. The writes run inside `apply`, deciding from
//! the command and storage only, so every node comes to the same state;
//! the reads run in handlers on this node's copy.
//!
//! Keys: `h` the last position written; `s/{stream}` a stream;
//! `a/{position}` an event; `e/{stream}/{version}` the position of a
//! stream's event; `i/{stream}/{id}` the version of an event id. Numbers
//! are zero-padded, so keys sort by them.

use plexus_sdk::consensus::Rejected;
use plexus_sdk::storage::{self, BatchOp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Most events one append (or one multi-stream append) may carry.
pub const MAX_EVENTS: usize = 1000;
/// Most keys one read looks at before answering what it found.
const SCAN_BUDGET: usize = 20_000;

/// What the writer expects a stream's last version to be.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum Expected {
    Any,
    NoStream,
    StreamExists,
    Exact(u64),
}

impl Expected {
    /// `any`, `no_stream`, `stream_exists` or a version; also the numbers
    /// EventStoreDB clients send (-2 any, -1 no stream, -4 stream exists).
    pub fn parse(s: &str) -> Result<Expected, String> {
        match s {
            "any" | "-2" => Ok(Expected::Any),
            "no_stream" | "-1" => Ok(Expected::NoStream),
            "stream_exists" | "-4" => Ok(Expected::StreamExists),
            n => n.parse().map(Expected::Exact).map_err(|_| {
                format!(
                    "expected_version `{n}` is none of any, no_stream, stream_exists or a version"
                )
            }),
        }
    }

    fn show(self) -> Value {
        match self {
            Expected::Any => "any".into(),
            Expected::NoStream => "no_stream".into(),
            Expected::StreamExists => "stream_exists".into(),
            Expected::Exact(n) => n.into(),
        }
    }
}

/// An event as a writer sends it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub kind: String,
    /// JSON text when `json`, else raw bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub json: bool,
    /// JSON text.
    pub metadata: Option<String>,
    pub id: Option<String>,
}

impl NewEvent {
    /// Reads `{"type", "data" | "data_b64", "metadata"?, "id"?}`.
    pub fn from_json(v: &Value) -> Result<NewEvent, String> {
        use base64::Engine;
        let kind = v["type"]
            .as_str()
            .filter(|t| (1..=256).contains(&t.len()))
            .ok_or("an event needs a `type` of 1 to 256 bytes")?
            .to_string();
        let (data, json) = match (&v["data"], &v["data_b64"]) {
            (Value::Null, Value::String(b)) => (
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("`data_b64` is not base64: {e}"))?,
                false,
            ),
            (Value::Null, Value::Null) => (b"null".to_vec(), true),
            (d, Value::Null) => (serde_json::to_vec(d).map_err(|e| e.to_string())?, true),
            _ => return Err("an event has `data` or `data_b64`, not both".into()),
        };
        let metadata = match &v["metadata"] {
            Value::Null => None,
            m => Some(m.to_string()),
        };
        let id = match &v["id"] {
            Value::Null => None,
            Value::String(s) if (1..=128).contains(&s.len()) => Some(s.clone()),
            _ => return Err("an event `id` is a string of 1 to 128 bytes".into()),
        };
        Ok(NewEvent {
            kind,
            data,
            json,
            metadata,
            id,
        })
    }
}

/// The events to add to one stream, and the version expected.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StreamAppend {
    pub stream: String,
    pub expected: Expected,
    pub events: Vec<NewEvent>,
}

/// A stream's limits: events beyond them are erased.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Meta {
    pub max_count: Option<u64>,
    pub max_age_ms: Option<u64>,
    pub truncate_before: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Stream {
    /// The version the next event gets.
    pub next: u64,
    /// The oldest version kept (when `next > first`).
    pub first: u64,
    /// Soft-deleted: reads as absent until the next append.
    pub deleted: bool,
    /// Erased for good.
    pub tombstoned: bool,
    pub meta: Meta,
}

impl Stream {
    /// The last version, if the stream has had an event.
    pub fn last(&self) -> Option<u64> {
        self.next.checked_sub(1)
    }

    fn show(&self, name: &str) -> Value {
        json!({
            "stream": name,
            "last_version": self.last(),
            "first_version": self.first,
            "deleted": self.deleted,
            "tombstoned": self.tombstoned,
            "metadata": self.meta,
        })
    }
}

/// An event as stored under its position.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Stored {
    pub stream: String,
    pub version: u64,
    pub kind: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub json: bool,
    pub metadata: Option<String>,
    pub id: Option<String>,
    pub created_ms: u64,
}

/// An event read back, with its position.
#[derive(Clone, Debug)]
pub struct Event {
    pub position: u64,
    pub stored: Stored,
}

impl Event {
    /// The event as clients see it.
    pub fn show(&self) -> Value {
        use base64::Engine;
        let s = &self.stored;
        let mut v = json!({
            "stream": s.stream,
            "version": s.version,
            "position": self.position,
            "type": s.kind,
            "id": s.id,
            "created_ms": s.created_ms,
        });
        if s.json {
            v["data"] = serde_json::from_slice(&s.data).unwrap_or(Value::Null);
        } else {
            v["data_b64"] = base64::engine::general_purpose::STANDARD
                .encode(&s.data)
                .into();
        }
        if let Some(m) = &s.metadata {
            v["metadata"] = serde_json::from_str(m).unwrap_or(Value::Null);
        }
        v
    }
}

/// What one stream of an append got.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    pub stream: String,
    pub first_version: u64,
    pub version: u64,
    pub position: u64,
}

pub fn stream_key(stream: &str) -> String {
    format!("s/{stream}")
}

pub fn event_key(position: u64) -> String {
    format!("a/{position:020}")
}

fn version_prefix(stream: &str) -> String {
    format!("e/{stream}/")
}

fn version_key(stream: &str, version: u64) -> String {
    format!("e/{stream}/{version:020}")
}

fn id_key(stream: &str, id: &str) -> String {
    format!("i/{stream}/{id}")
}

fn get<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, storage::Error> {
    Ok(storage::get_typed::<T>(key)?.map(|(v, _)| v))
}

fn number(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// The last position written (0 before the first event).
pub fn head() -> Result<u64, storage::Error> {
    Ok(storage::get("h")?.map_or(0, |v| number(&v.value)))
}

pub fn stream(name: &str) -> Result<Option<Stream>, storage::Error> {
    get(&stream_key(name))
}

/// The start key for a scan from number `from` under `prefix`.
fn after(prefix: &str, from: u64) -> Option<Vec<u8>> {
    from.checked_sub(1)
        .map(|n| format!("{prefix}{n:020}").into_bytes())
}

pub fn event(position: u64) -> Result<Option<Event>, storage::Error> {
    Ok(get::<Stored>(&event_key(position))?.map(|stored| Event { position, stored }))
}

/// A 409 naming the stream, what was expected and what it is at.
fn conflict(stream: &str, expected: Expected, current: Option<u64>) -> Rejected {
    Rejected::json(
        409,
        &json!({
            "error": format!(
                "stream `{stream}` is at version {}, not {}",
                current.map_or("none (no stream)".to_string(), |v| v.to_string()),
                expected.show()
            ),
            "stream": stream,
            "expected": expected.show(),
            "current": current,
        }),
    )
}

fn gone(stream: &str) -> Rejected {
    Rejected::new(410, &format!("stream `{stream}` is tombstoned"))
}

/// The versions a retried append wrote before, if its events' ids are
/// the stream's events at consecutive versions.
fn written_before(
    name: &str,
    s: &Stream,
    events: &[NewEvent],
) -> Result<Option<Written>, Rejected> {
    let mut versions = Vec::with_capacity(events.len());
    for e in events {
        let Some(id) = &e.id else { return Ok(None) };
        match storage::get(id_key(name, id))? {
            Some(v) => versions.push(number(&v.value)),
            None => return Ok(None),
        }
    }
    let first = versions[0];
    if versions
        .iter()
        .enumerate()
        .any(|(i, v)| *v != first + i as u64)
        || first < s.first
    {
        return Ok(None);
    }
    let last = first + versions.len() as u64 - 1;
    let position = storage::get(version_key(name, last))?.map_or(0, |v| number(&v.value));
    Ok(Some(Written {
        stream: name.to_string(),
        first_version: first,
        version: last,
        position,
    }))
}

/// Checks `expected` against the stream as it is.
fn check(name: &str, s: &Option<Stream>, expected: Expected) -> Result<(), Rejected> {
    let current = s
        .as_ref()
        .and_then(|s| if s.deleted { None } else { s.last() });
    let ok = match expected {
        Expected::Any => true,
        Expected::NoStream => current.is_none(),
        Expected::StreamExists => current.is_some(),
        Expected::Exact(v) => current == Some(v),
    };
    if ok {
        Ok(())
    } else {
        Err(conflict(name, expected, current))
    }
}

/// Appends to every stream of `appends`, or to none: each stream's
/// expected version is checked first. A retry (every event id already
/// written in order) writes nothing and answers as before.
pub fn append(appends: Vec<StreamAppend>, now_ms: u64) -> Result<(Vec<Written>, bool), Rejected> {
    let mut streams = Vec::with_capacity(appends.len());
    let mut retried = Vec::new();
    for a in &appends {
        if appends.iter().filter(|b| b.stream == a.stream).count() > 1 {
            return Err(Rejected::new(
                400,
                &format!("stream `{}` is named twice in one append", a.stream),
            ));
        }
        let s = stream(&a.stream)?;
        if s.as_ref().is_some_and(|s| s.tombstoned) {
            return Err(gone(&a.stream));
        }
        if let Some(s) = &s
            && let Some(w) = written_before(&a.stream, s, &a.events)?
        {
            retried.push(w);
            continue;
        }
        check(&a.stream, &s, a.expected)?;
        streams.push((a, s.unwrap_or_default()));
    }
    if streams.is_empty() && !retried.is_empty() {
        return Ok((retried, true));
    }
    let mut position = head()?;
    let mut ops = Vec::new();
    let mut written = Vec::with_capacity(streams.len());
    for (a, mut s) in streams {
        let first_version = s.next;
        for e in &a.events {
            position += 1;
            let stored = Stored {
                stream: a.stream.clone(),
                version: s.next,
                kind: e.kind.clone(),
                data: e.data.clone(),
                json: e.json,
                metadata: e.metadata.clone(),
                id: e.id.clone(),
                created_ms: now_ms,
            };
            let at = position.to_be_bytes().to_vec();
            ops.push(put(event_key(position), plexus_sdk::codec::encode(&stored)));
            ops.push(put(version_key(&a.stream, s.next), at));
            if let Some(id) = &e.id {
                ops.push(put(id_key(&a.stream, id), s.next.to_be_bytes().to_vec()));
            }
            s.next += 1;
        }
        if s.deleted {
            s.deleted = false;
        }
        written.push(Written {
            stream: a.stream.clone(),
            first_version,
            version: s.next - 1,
            position,
        });
        storage::batch(&ops)?;
        ops.clear();
        enforce(&a.stream, &mut s, now_ms)?;
        storage::put_typed(stream_key(&a.stream), &s)?;
    }
    storage::put("h", position.to_be_bytes())?;
    written.extend(retried);
    Ok((written, false))
}

fn put(key: String, value: Vec<u8>) -> BatchOp {
    BatchOp::Put((key.into_bytes(), value))
}

/// Erases the stream's events below `until` (exclusive).
fn erase_below(name: &str, s: &mut Stream, until: u64) -> Result<(), storage::Error> {
    if until <= s.first {
        return Ok(());
    }
    let prefix = version_prefix(name);
    let mut from = after(&prefix, s.first);
    loop {
        let page = storage::scan(&prefix, from.as_deref(), 1000)?;
        let mut ops = Vec::new();
        let mut done = page.len() < 1000;
        for kv in &page {
            let version = parse_tail(&kv.key);
            if version >= until {
                done = true;
                break;
            }
            let position = number(&kv.value.value);
            if let Some(e) = get::<Stored>(&event_key(position))?
                && let Some(id) = e.id
            {
                ops.push(BatchOp::Delete(id_key(name, &id).into_bytes()));
            }
            ops.push(BatchOp::Delete(event_key(position).into_bytes()));
            ops.push(BatchOp::Delete(kv.key.clone()));
        }
        storage::batch(&ops)?;
        if done {
            break;
        }
        from = page.last().map(|kv| kv.key.clone());
    }
    s.first = until.min(s.next);
    Ok(())
}

/// The number at the end of a key.
fn parse_tail(key: &[u8]) -> u64 {
    let tail = key.rsplit(|b| *b == b'/').next().unwrap_or_default();
    std::str::from_utf8(tail)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// The first version the stream's limits keep at `now_ms`.
fn kept_from(name: &str, s: &Stream, now_ms: u64) -> Result<u64, storage::Error> {
    let mut first = s.first;
    if let Some(t) = s.meta.truncate_before {
        first = first.max(t);
    }
    if let Some(max) = s.meta.max_count {
        first = first.max(s.next.saturating_sub(max));
    }
    if let Some(age) = s.meta.max_age_ms {
        let oldest = now_ms.saturating_sub(age);
        let prefix = version_prefix(name);
        'scan: loop {
            let page = storage::scan(&prefix, after(&prefix, first).as_deref(), 100)?;
            for kv in &page {
                let e = get::<Stored>(&event_key(number(&kv.value.value)))?;
                if e.is_some_and(|e| e.created_ms >= oldest) {
                    break 'scan;
                }
                first = parse_tail(&kv.key) + 1;
            }
            if page.len() < 100 {
                break;
            }
        }
    }
    Ok(first.min(s.next))
}

/// Erases what the stream's limits no longer keep.
fn enforce(name: &str, s: &mut Stream, now_ms: u64) -> Result<(), storage::Error> {
    let until = kept_from(name, s, now_ms)?;
    erase_below(name, s, until)
}

pub fn set_meta(name: &str, meta: Meta, now_ms: u64) -> Result<Value, Rejected> {
    let mut s = stream(name)?.unwrap_or_default();
    if s.tombstoned {
        return Err(gone(name));
    }
    s.meta = meta;
    enforce(name, &mut s, now_ms)?;
    storage::put_typed(stream_key(name), &s)?;
    Ok(s.show(name))
}

/// Soft delete (reads as absent, versions go on at the next append) or
/// tombstone (erased for good).
pub fn delete(name: &str, hard: bool) -> Result<Value, Rejected> {
    let Some(mut s) = stream(name)? else {
        return Err(Rejected::new(404, &format!("no stream `{name}`")));
    };
    if s.tombstoned {
        return Err(gone(name));
    }
    let next = s.next;
    erase_below(name, &mut s, next)?;
    if hard {
        // What is left of the ids of events erased before.
        for kv in storage::scan_all(format!("i/{name}/"))? {
            storage::delete(&kv.key)?;
        }
        s.tombstoned = true;
        s.meta = Meta::default();
    }
    s.deleted = true;
    storage::put_typed(stream_key(name), &s)?;
    Ok(s.show(name))
}

/// The stream as the metadata route shows it: `None` when it never had
/// an event nor metadata.
pub fn show_stream(name: &str) -> Result<Option<Value>, storage::Error> {
    Ok(stream(name)?.map(|s| s.show(name)))
}

/// Which way a read goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Direction {
    Forward,
    Backward,
}

/// Events of `$all` a read wants: types and a stream prefix.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub types: Vec<String>,
    pub prefix: Option<String>,
    /// Only this stream (a persistent subscription to one stream).
    pub stream: Option<String>,
}

impl Filter {
    pub fn matches(&self, s: &Stored) -> bool {
        (self.types.is_empty() || self.types.contains(&s.kind))
            && self.prefix.as_ref().is_none_or(|p| s.stream.starts_with(p))
            && self.stream.as_ref().is_none_or(|n| *n == s.stream)
    }
}

/// Whether an event is hidden by its stream's age limit at `now_ms`
/// (erased at the next write; hidden until then).
fn expired(s: &Stream, e: &Stored, now_ms: u64) -> bool {
    s.meta
        .max_age_ms
        .is_some_and(|age| e.created_ms < now_ms.saturating_sub(age))
}

/// A page of events and where to read on (`None`: nothing more that way).
pub struct Page {
    pub events: Vec<Event>,
    pub next: Option<u64>,
}

/// Why a stream cannot be read.
pub enum Unreadable {
    Missing,
    Gone,
    Storage(storage::Error),
}

impl From<storage::Error> for Unreadable {
    fn from(e: storage::Error) -> Self {
        Unreadable::Storage(e)
    }
}

/// Up to `max` events of a stream from version `from` (the last when
/// `None` going backward).
pub fn read_stream(
    name: &str,
    from: Option<u64>,
    direction: Direction,
    max: usize,
    now_ms: u64,
) -> Result<Page, Unreadable> {
    let s = match stream(name)? {
        None => return Err(Unreadable::Missing),
        Some(s) if s.tombstoned => return Err(Unreadable::Gone),
        Some(s) if s.deleted || s.next == 0 => return Err(Unreadable::Missing),
        Some(s) => s,
    };
    let mut events = Vec::new();
    match direction {
        Direction::Forward => {
            let mut v = from.unwrap_or(0).max(s.first);
            while v < s.next && events.len() < max {
                if let Some(e) = stream_event(name, v)?
                    && !expired(&s, &e.stored, now_ms)
                {
                    events.push(e);
                }
                v += 1;
            }
            Ok(Page {
                events,
                next: Some(v),
            })
        }
        Direction::Backward => {
            let Some(last) = s.last() else {
                return Ok(Page { events, next: None });
            };
            let mut v = from.unwrap_or(last).min(last) as i128;
            while v >= s.first as i128 && events.len() < max {
                if let Some(e) = stream_event(name, v as u64)?
                    && !expired(&s, &e.stored, now_ms)
                {
                    events.push(e);
                }
                v -= 1;
            }
            let next = (v >= s.first as i128).then_some(v as u64);
            Ok(Page { events, next })
        }
    }
}

fn stream_event(name: &str, version: u64) -> Result<Option<Event>, storage::Error> {
    match storage::get(version_key(name, version))? {
        Some(v) => event(number(&v.value)),
        None => Ok(None),
    }
}

/// Up to `max` events of `$all` matching `filter` from position `from`.
/// Looks at a bounded number of events, so a sparse filter answers with
/// fewer (and a `next` further on) rather than scanning everything.
pub fn read_all(
    from: u64,
    direction: Direction,
    max: usize,
    filter: &Filter,
    now_ms: u64,
) -> Result<Page, storage::Error> {
    let head = head()?;
    let mut events = Vec::new();
    let mut streams: std::collections::HashMap<String, Option<Stream>> = Default::default();
    let mut keep = |e: Event, events: &mut Vec<Event>| -> Result<(), storage::Error> {
        if !filter.matches(&e.stored) {
            return Ok(());
        }
        let s = match streams.get(&e.stored.stream) {
            Some(s) => s.clone(),
            None => {
                let s = stream(&e.stored.stream)?;
                streams.insert(e.stored.stream.clone(), s.clone());
                s
            }
        };
        if s.is_some_and(|s| !expired(&s, &e.stored, now_ms)) {
            events.push(e);
        }
        Ok(())
    };
    match direction {
        Direction::Forward => {
            let from = from.max(1);
            let mut last = from - 1;
            let mut looked = 0;
            while events.len() < max && looked < SCAN_BUDGET && last < head {
                let limit = (max - events.len()).clamp(100, 1000) as u32;
                let page = storage::scan("a/", after("a/", last + 1).as_deref(), limit)?;
                if page.is_empty() {
                    last = head;
                    break;
                }
                for kv in page {
                    looked += 1;
                    last = parse_tail(&kv.key);
                    let stored: Stored = plexus_sdk::codec::decode(&kv.value.value)
                        .map_err(|e| storage::Error::Io(e.to_string()))?;
                    keep(
                        Event {
                            position: last,
                            stored,
                        },
                        &mut events,
                    )?;
                    if events.len() == max {
                        break;
                    }
                }
            }
            Ok(Page {
                events,
                next: Some(last + 1),
            })
        }
        Direction::Backward => {
            let mut p = from.min(head);
            let mut looked = 0;
            while p >= 1 && events.len() < max && looked < SCAN_BUDGET {
                looked += 1;
                if let Some(e) = event(p)? {
                    keep(e, &mut events)?;
                }
                p -= 1;
            }
            Ok(Page {
                events,
                next: (p >= 1).then_some(p),
            })
        }
    }
}
