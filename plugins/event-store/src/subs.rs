//! Persistent subscriptions (consumer groups) as stored, and what a
//! fetch, an ack and a nack do to them; run inside `apply`.
//!
//! Keys: `u/{group}` a subscription, `o/{group}/{position}` an event it
//! has out (or will hand out again), `k/{group}/{position}` a parked one.
//! Events are named by their `$all` position, in a subscription to one
//! stream too.

use plexus_sdk::consensus::Rejected;
use plexus_sdk::storage;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::store::{self, Direction, Event, Filter};

/// Where a new subscription starts: a position of `$all` (or a version
/// of the one stream), or `"end"` for only events written from now on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Start {
    At(u64),
    End,
}

impl Serialize for SubConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return ConfigFields::from(self.clone()).serialize(s);
        }
        let mut v = serde_json::to_value(ConfigFields::from(self.clone()))
            .map_err(serde::ser::Error::custom)?;
        v["from"] = match self.from {
            Start::At(n) => n.into(),
            Start::End => "end".into(),
        };
        v.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SubConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            return ConfigFields::deserialize(d).map(SubConfig::from);
        }
        let mut v = serde_json::Value::deserialize(d)?;
        let from = match v.get("from") {
            None | Some(Value::Null) => Start::At(0),
            Some(Value::String(e)) if e == "end" => Start::End,
            Some(n) => Start::At(
                n.as_u64()
                    .ok_or_else(|| serde::de::Error::custom("from is a number or \"end\""))?,
            ),
        };
        if let Some(o) = v.as_object_mut() {
            o.remove("from");
        }
        let mut c: SubConfig = serde_json::from_value::<ConfigFields>(v)
            .map_err(serde::de::Error::custom)?
            .into();
        c.from = from;
        Ok(c)
    }
}

/// A subscription's settings, after EventStoreDB's persistent
/// subscriptions. In JSON, `from` is a number or `"end"`.
#[derive(Clone, Debug, PartialEq)]
pub struct SubConfig {
    /// `$all` or one stream.
    pub stream: String,
    pub from: Start,
    /// How long a consumer has to ack before the event goes out again.
    pub ack_wait_ms: u64,
    /// Retries before an event is parked.
    pub max_retry: u32,
    /// Most events out at once.
    pub max_in_flight: u64,
    /// Only these event types (empty: all).
    pub types: Vec<String>,
    /// Only streams starting with this.
    pub prefix: Option<String>,
}

/// [`SubConfig`] as serde sees it (stored as is; in JSON `from` is
/// rewritten).
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
struct ConfigFields {
    stream: String,
    from: Start,
    ack_wait_ms: u64,
    max_retry: u32,
    max_in_flight: u64,
    #[serde(rename = "type")]
    types: Vec<String>,
    prefix: Option<String>,
}

impl Default for ConfigFields {
    fn default() -> Self {
        SubConfig::default().into()
    }
}

impl From<SubConfig> for ConfigFields {
    fn from(c: SubConfig) -> Self {
        ConfigFields {
            stream: c.stream,
            from: c.from,
            ack_wait_ms: c.ack_wait_ms,
            max_retry: c.max_retry,
            max_in_flight: c.max_in_flight,
            types: c.types,
            prefix: c.prefix,
        }
    }
}

impl From<ConfigFields> for SubConfig {
    fn from(c: ConfigFields) -> Self {
        SubConfig {
            stream: c.stream,
            from: c.from,
            ack_wait_ms: c.ack_wait_ms,
            max_retry: c.max_retry,
            max_in_flight: c.max_in_flight,
            types: c.types,
            prefix: c.prefix,
        }
    }
}

impl Default for SubConfig {
    fn default() -> Self {
        SubConfig {
            stream: "$all".into(),
            from: Start::At(0),
            ack_wait_ms: 30_000,
            max_retry: 10,
            max_in_flight: 1000,
            types: Vec::new(),
            prefix: None,
        }
    }
}

impl SubConfig {
    /// Refuses settings out of range, naming the setting.
    pub fn check(&self) -> Result<(), String> {
        if self.stream != "$all" && !plexus_sdk::http::is_ident(&self.stream) {
            return Err("stream is `$all` or a stream name".into());
        }
        if !(10..=86_400_000).contains(&self.ack_wait_ms) {
            return Err("ack_wait_ms must be in 10..=86400000".into());
        }
        if !(1..=100_000).contains(&self.max_in_flight) {
            return Err("max_in_flight must be in 1..=100000".into());
        }
        Ok(())
    }

    fn one_stream(&self) -> Option<&str> {
        (self.stream != "$all").then_some(self.stream.as_str())
    }

    fn filter(&self) -> Filter {
        Filter {
            types: self.types.clone(),
            prefix: self.prefix.clone(),
            stream: self.one_stream().map(str::to_string),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Sub {
    config: SubConfig,
    /// The next position (or version, for one stream) not looked at.
    next: u64,
    /// Events out and not acked.
    out: u64,
    parked: u64,
}

/// An event a subscription has out, or will hand out again.
#[derive(Serialize, Deserialize)]
struct Held {
    consumer: String,
    /// When it goes out again if not acked.
    due_ms: u64,
    /// Times handed out.
    deliveries: u32,
}

#[derive(Serialize, Deserialize)]
struct Parked {
    reason: String,
    deliveries: u32,
    parked_ms: u64,
}

/// An event handed to a consumer.
pub struct Delivery {
    pub event: Event,
    /// Earlier deliveries of it.
    pub retry: u32,
}

fn sub_key(group: &str) -> String {
    format!("u/{group}")
}

fn held_key(group: &str, position: u64) -> String {
    format!("o/{group}/{position:020}")
}

fn parked_key(group: &str, position: u64) -> String {
    format!("k/{group}/{position:020}")
}

fn load(group: &str) -> Result<Sub, Rejected> {
    storage::get_typed::<Sub>(sub_key(group))?
        .map(|(s, _)| s)
        .ok_or_else(|| {
            Rejected::new(
                404,
                &format!("no subscription `{group}`: create it with PUT /subscriptions/{group}"),
            )
        })
}

fn save(group: &str, sub: &Sub) -> Result<(), storage::Error> {
    storage::put_typed(sub_key(group), sub).map(drop)
}

/// Creates a subscription, or changes its settings (its place stays).
pub fn put(group: &str, config: SubConfig) -> Result<Value, Rejected> {
    let sub = match storage::get_typed::<Sub>(sub_key(group))? {
        Some((mut sub, _)) => {
            sub.config = config;
            sub
        }
        None => {
            let next = match (&config.from, config.one_stream()) {
                (Start::At(n), _) => *n,
                (Start::End, None) => store::head()? + 1,
                (Start::End, Some(s)) => store::stream(s)?.map_or(0, |s| s.next),
            };
            Sub {
                config,
                next,
                out: 0,
                parked: 0,
            }
        }
    };
    save(group, &sub)?;
    Ok(json!({ "subscription": group, "config": sub.config, "next": sub.next }))
}

pub fn remove(group: &str) -> Result<Value, Rejected> {
    load(group)?;
    for prefix in [format!("o/{group}/"), format!("k/{group}/")] {
        for kv in storage::scan_all(prefix)? {
            storage::delete(&kv.key)?;
        }
    }
    storage::delete(sub_key(group))?;
    Ok(json!({ "deleted": group }))
}

/// The subscription's place, what it has out and parked.
pub fn view(group: &str) -> Result<Option<Value>, storage::Error> {
    let Some((sub, _)) = storage::get_typed::<Sub>(sub_key(group))? else {
        return Ok(None);
    };
    let lowest_out = storage::scan(format!("o/{group}/"), None, 1)?
        .first()
        .map(|kv| position_of(&kv.key));
    Ok(Some(json!({
        "subscription": group,
        "config": sub.config,
        "next": sub.next,
        "in_flight": sub.out,
        "parked": sub.parked,
        "lowest_unacked_position": lowest_out,
    })))
}

fn position_of(key: &[u8]) -> u64 {
    let tail = key.rsplit(|b| *b == b'/').next().unwrap_or_default();
    std::str::from_utf8(tail)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// Hands up to `max` events to `consumer`: first those due again (parking
/// those past `max_retry`), then new ones, while fewer than
/// `max_in_flight` are out.
pub fn fetch(
    group: &str,
    consumer: &str,
    max: u32,
    now_ms: u64,
) -> Result<Vec<Delivery>, Rejected> {
    let mut sub = load(group)?;
    let mut out = Vec::new();
    let wait = sub.config.ack_wait_ms;
    // Due again: what was not acked in time, nacked or replayed.
    let prefix = format!("o/{group}/");
    let mut after: Option<Vec<u8>> = None;
    'due: loop {
        let page = storage::scan(&prefix, after.as_deref(), 500)?;
        for kv in &page {
            if out.len() >= max as usize {
                break 'due;
            }
            let (mut held, _) = match storage::get_typed::<Held>(&kv.key)? {
                Some(h) => h,
                None => continue,
            };
            if held.due_ms > now_ms {
                continue;
            }
            let position = position_of(&kv.key);
            let Some(event) = store::event(position)? else {
                // Erased meanwhile (a limit, a tombstone): nothing to hand out.
                storage::delete(&kv.key)?;
                sub.out = sub.out.saturating_sub(u64::from(held.deliveries > 0));
                continue;
            };
            if held.deliveries > sub.config.max_retry {
                park(
                    group,
                    &mut sub,
                    position,
                    "max_retry reached",
                    held.deliveries,
                    now_ms,
                )?;
                continue;
            }
            if held.deliveries == 0 {
                sub.out += 1;
            }
            let retry = held.deliveries;
            held.deliveries += 1;
            held.consumer = consumer.to_string();
            held.due_ms = now_ms.saturating_add(wait);
            storage::put_typed(&kv.key, &held)?;
            out.push(Delivery { event, retry });
        }
        if page.len() < 500 {
            break;
        }
        after = page.last().map(|kv| kv.key.clone());
    }
    // New events.
    let filter = sub.config.filter();
    while out.len() < max as usize && sub.out < sub.config.max_in_flight {
        let room = (max as usize - out.len()).min((sub.config.max_in_flight - sub.out) as usize);
        let page = match sub.config.one_stream() {
            None => store::read_all(sub.next, Direction::Forward, room, &filter, now_ms)?,
            Some(s) => {
                match store::read_stream(s, Some(sub.next), Direction::Forward, room, now_ms) {
                    Ok(p) => p,
                    Err(store::Unreadable::Storage(e)) => return Err(e.into()),
                    Err(_) => break,
                }
            }
        };
        let moved = page.next.is_some_and(|n| n > sub.next);
        for event in page.events {
            let held = Held {
                consumer: consumer.to_string(),
                due_ms: now_ms.saturating_add(wait),
                deliveries: 1,
            };
            storage::put_typed(held_key(group, event.position), &held)?;
            sub.out += 1;
            out.push(Delivery { event, retry: 0 });
        }
        if let Some(n) = page.next {
            sub.next = sub.next.max(n);
        }
        if !moved {
            break;
        }
    }
    save(group, &sub)?;
    Ok(out)
}

fn park(
    group: &str,
    sub: &mut Sub,
    position: u64,
    reason: &str,
    deliveries: u32,
    now_ms: u64,
) -> Result<(), storage::Error> {
    if storage::delete(held_key(group, position))? && deliveries > 0 {
        sub.out = sub.out.saturating_sub(1);
    }
    let parked = Parked {
        reason: reason.to_string(),
        deliveries,
        parked_ms: now_ms,
    };
    storage::put_typed(parked_key(group, position), &parked)?;
    sub.parked += 1;
    Ok(())
}

/// Acks the events at `positions`: the number that were out.
pub fn ack(group: &str, positions: &[u64]) -> Result<Value, Rejected> {
    let mut sub = load(group)?;
    let mut acked = 0;
    for p in positions {
        if let Some((held, _)) = storage::get_typed::<Held>(held_key(group, *p))?
            && held.deliveries > 0
        {
            storage::delete(held_key(group, *p))?;
            sub.out = sub.out.saturating_sub(1);
            acked += 1;
        }
    }
    save(group, &sub)?;
    Ok(json!({ "acked": acked }))
}

/// What a consumer asks done with events it could not handle.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum NackAction {
    /// Out again at once.
    Retry,
    /// Set aside until replayed.
    Park,
    /// Dropped as if acked.
    Skip,
}

impl NackAction {
    pub fn parse(s: &str) -> Result<NackAction, String> {
        match s {
            "retry" => Ok(NackAction::Retry),
            "park" => Ok(NackAction::Park),
            "skip" => Ok(NackAction::Skip),
            _ => Err(format!("action `{s}` is none of retry, park, skip")),
        }
    }
}

pub fn nack(
    group: &str,
    positions: &[u64],
    action: NackAction,
    reason: &str,
    now_ms: u64,
) -> Result<Value, Rejected> {
    let mut sub = load(group)?;
    let mut done = 0;
    for p in positions {
        let key = held_key(group, *p);
        let Some((mut held, _)) = storage::get_typed::<Held>(&key)? else {
            continue;
        };
        done += 1;
        match action {
            NackAction::Retry => {
                held.due_ms = now_ms;
                storage::put_typed(&key, &held)?;
            }
            NackAction::Park => park(group, &mut sub, *p, reason, held.deliveries, now_ms)?,
            NackAction::Skip => {
                storage::delete(&key)?;
                sub.out = sub.out.saturating_sub(u64::from(held.deliveries > 0));
            }
        }
    }
    save(group, &sub)?;
    Ok(json!({ "nacked": done }))
}

/// Up to `max` parked events, oldest first.
pub fn parked(group: &str, max: u32) -> Result<Option<Value>, storage::Error> {
    if storage::get(sub_key(group))?.is_none() {
        return Ok(None);
    }
    let mut list = Vec::new();
    for kv in storage::scan(format!("k/{group}/"), None, max)? {
        let position = position_of(&kv.key);
        let Ok(p) = plexus_sdk::codec::decode::<Parked>(&kv.value.value) else {
            continue;
        };
        let mut v = store::event(position)?.map_or(json!({ "position": position }), |e| e.show());
        v["reason"] = p.reason.into();
        v["deliveries"] = p.deliveries.into();
        v["parked_ms"] = p.parked_ms.into();
        list.push(v);
    }
    Ok(Some(json!(list)))
}

/// Hands every parked event out again (from the next fetch on).
pub fn replay_parked(group: &str, now_ms: u64) -> Result<Value, Rejected> {
    let mut sub = load(group)?;
    let mut n = 0;
    for kv in storage::scan_all(format!("k/{group}/"))? {
        let position = position_of(&kv.key);
        storage::delete(&kv.key)?;
        let held = Held {
            consumer: String::new(),
            due_ms: now_ms,
            deliveries: 0,
        };
        storage::put_typed(held_key(group, position), &held)?;
        n += 1;
    }
    sub.parked = 0;
    save(group, &sub)?;
    Ok(json!({ "replayed": n }))
}
