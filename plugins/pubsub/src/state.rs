//! Topics, messages and groups as stored, and what each command does to
//! them. Everything here runs inside `apply`: it decides from the command
//! and storage only, so every node comes to the same state.
//!
//! Keys: `t/{topic}` the topic, `m/{topic}/{seq}` a message, `i/{topic}/{id}`
//! a publisher's message id, `g/{topic}/{group}` a group, and
//! `p/{topic}/{group}/{seq}` a message the group has out (or has scheduled
//! for later). Sequence numbers are zero-padded, so keys sort by them.

use plexus_sdk::consensus::Rejected;
use plexus_sdk::storage;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A topic's limits. Zero means no limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Most messages kept.
    pub max_msgs: u64,
    /// Most bytes of message data kept.
    pub max_bytes: u64,
    /// Oldest a message may get.
    pub max_age_ms: u64,
    /// How long a publisher's message id is remembered.
    pub duplicate_window_ms: u64,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            max_msgs: 0,
            max_bytes: 0,
            max_age_ms: 0,
            duplicate_window_ms: 120_000,
        }
    }
}

/// A topic's limits and where its messages are.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Topic {
    pub config: TopicConfig,
    /// The oldest message kept (when `count > 0`).
    pub first_seq: u64,
    /// The last message published.
    pub last_seq: u64,
    pub count: u64,
    pub bytes: u64,
}

/// Where a new group starts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Deliver {
    /// The oldest message kept.
    #[default]
    All,
    /// The next message published.
    New,
    /// This sequence number (or the oldest kept, if later).
    Seq(u64),
    /// The first message published at or after this time.
    TimeMs(u64),
}

/// A group's settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GroupConfig {
    pub deliver: Deliver,
    /// How long a consumer has to ack a message before it goes out again.
    pub ack_wait_ms: u64,
    /// Deliveries of one message before it moves to `<topic>.dlq`; 0: no
    /// limit.
    pub max_deliver: u32,
    /// Most messages the group has out (delivered, unacked) at once.
    pub max_ack_pending: u64,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            deliver: Deliver::All,
            ack_wait_ms: 30_000,
            max_deliver: 5,
            max_ack_pending: 1000,
        }
    }
}

impl GroupConfig {
    /// Refuses settings out of range, naming the setting.
    pub fn check(&self) -> Result<(), String> {
        if !(10..=86_400_000).contains(&self.ack_wait_ms) {
            return Err("ack_wait_ms must be in 10..=86400000".into());
        }
        if !(1..=1_000_000).contains(&self.max_ack_pending) {
            return Err("max_ack_pending must be in 1..=1000000".into());
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct Group {
    config: GroupConfig,
    /// The next sequence number not yet looked at.
    cursor: u64,
    /// Messages delivered and not acked.
    out: u64,
}

#[derive(Serialize, Deserialize)]
struct Message {
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    id: Option<String>,
    published_ms: u64,
    not_before_ms: u64,
    headers: Vec<(String, String)>,
}

/// A message a group has out, or has scheduled for later.
#[derive(Serialize, Deserialize)]
struct Held {
    consumer: String,
    /// When it goes out (again) if not acked.
    due_ms: u64,
    /// Times delivered; 0 for a delayed message not yet delivered.
    deliveries: u32,
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub seq: u64,
    pub data: Vec<u8>,
    pub deliveries: u32,
    pub published_ms: u64,
    pub headers: Vec<(String, String)>,
}

/// What a command did.
pub enum Outcome {
    Published { seq: u64, duplicate: bool },
    Delivered(Vec<Delivery>),
    Done(serde_json::Value),
}

fn msg_key(topic: &str, seq: u64) -> String {
    format!("m/{topic}/{seq:020}")
}

fn held_prefix(topic: &str, group: &str) -> String {
    format!("p/{topic}/{group}/")
}

fn held_key(topic: &str, group: &str, seq: u64) -> String {
    format!("p/{topic}/{group}/{seq:020}")
}

fn get<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, storage::Error> {
    Ok(storage::get_typed::<T>(key)?.map(|(v, _)| v))
}

fn no_topic(topic: &str) -> Rejected {
    Rejected::new(
        404,
        &format!("no topic `{topic}`: create it with PUT /topics/{topic}"),
    )
}

fn no_group(topic: &str, group: &str) -> Rejected {
    Rejected::new(
        404,
        &format!(
            "no group `{group}` on `{topic}`: create it with PUT /topics/{topic}/groups/{group}"
        ),
    )
}

/// The topic as stored.
pub fn topic(topic: &str) -> Result<Option<Topic>, storage::Error> {
    get(&format!("t/{topic}"))
}

fn save_topic(name: &str, t: &Topic) -> Result<(), storage::Error> {
    storage::put_typed(format!("t/{name}"), t).map(drop)
}

pub fn put_topic(name: &str, config: TopicConfig) -> Result<Outcome, Rejected> {
    let mut t = topic(name)?.unwrap_or_default();
    t.config = config;
    trim(name, &mut t, None)?;
    save_topic(name, &t)?;
    Ok(Outcome::Done(json!({ "topic": name, "config": t.config })))
}

/// Drops the oldest message.
fn drop_oldest(name: &str, t: &mut Topic) -> Result<(), storage::Error> {
    let seq = t.first_seq;
    if let Some(m) = get::<Message>(&msg_key(name, seq))? {
        storage::delete(msg_key(name, seq))?;
        t.bytes = t.bytes.saturating_sub(m.data.len() as u64);
        if let Some(id) = m.id
            && get::<(u64, u64)>(&format!("i/{name}/{id}"))?.is_some_and(|(s, _)| s == seq)
        {
            storage::delete(format!("i/{name}/{id}"))?;
        }
    }
    t.count = t.count.saturating_sub(1);
    t.first_seq = seq + 1;
    Ok(())
}

/// Keeps the topic within its limits: by count and bytes, and by age
/// when `now` is given.
fn trim(name: &str, t: &mut Topic, now: Option<u64>) -> Result<(), storage::Error> {
    let c = t.config.clone();
    while t.count > 0
        && ((c.max_msgs > 0 && t.count > c.max_msgs) || (c.max_bytes > 0 && t.bytes > c.max_bytes))
    {
        drop_oldest(name, t)?;
    }
    if let Some(now) = now
        && c.max_age_ms > 0
    {
        while t.count > 0 {
            let oldest = get::<Message>(&msg_key(name, t.first_seq))?;
            match oldest {
                Some(m) if m.published_ms.saturating_add(c.max_age_ms) > now => break,
                _ => drop_oldest(name, t)?,
            }
        }
    }
    Ok(())
}

pub fn publish(
    name: &str,
    id: Option<String>,
    data: Vec<u8>,
    headers: Vec<(String, String)>,
    not_before_ms: u64,
    now: u64,
) -> Result<Outcome, Rejected> {
    let mut t = topic(name)?.ok_or_else(|| no_topic(name))?;
    trim(name, &mut t, Some(now))?;
    if let Some(id) = &id
        && let Some((seq, at)) = get::<(u64, u64)>(&format!("i/{name}/{id}"))?
        && now < at.saturating_add(t.config.duplicate_window_ms)
    {
        save_topic(name, &t)?;
        return Ok(Outcome::Published {
            seq,
            duplicate: true,
        });
    }
    let seq = t.last_seq + 1;
    if t.count == 0 {
        t.first_seq = seq;
    }
    t.last_seq = seq;
    t.count += 1;
    t.bytes += data.len() as u64;
    if let Some(id) = &id {
        storage::put_typed(format!("i/{name}/{id}"), &(seq, now))?;
    }
    let message = Message {
        data,
        id,
        published_ms: now,
        not_before_ms,
        headers,
    };
    storage::put_typed(msg_key(name, seq), &message)?;
    trim(name, &mut t, None)?;
    save_topic(name, &t)?;
    Ok(Outcome::Published {
        seq,
        duplicate: false,
    })
}

fn group(topic: &str, group: &str) -> Result<Option<Group>, storage::Error> {
    get(&format!("g/{topic}/{group}"))
}

fn save_group(topic: &str, name: &str, g: &Group) -> Result<(), storage::Error> {
    storage::put_typed(format!("g/{topic}/{name}"), g).map(drop)
}

pub fn put_group(
    topic_name: &str,
    name: &str,
    config: GroupConfig,
    now: u64,
) -> Result<Outcome, Rejected> {
    let mut t = topic(topic_name)?.ok_or_else(|| no_topic(topic_name))?;
    trim(topic_name, &mut t, Some(now))?;
    save_topic(topic_name, &t)?;
    let g = match group(topic_name, name)? {
        // An existing group keeps its place; only its settings change.
        Some(g) => Group { config, ..g },
        None => {
            let oldest = if t.count > 0 {
                t.first_seq
            } else {
                t.last_seq + 1
            };
            let cursor = match config.deliver {
                Deliver::All => oldest,
                Deliver::New => t.last_seq + 1,
                Deliver::Seq(seq) => seq.max(oldest),
                Deliver::TimeMs(at) => first_at(topic_name, &t, at)?,
            };
            Group {
                config,
                cursor,
                out: 0,
            }
        }
    };
    save_group(topic_name, name, &g)?;
    Ok(Outcome::Done(
        json!({ "topic": topic_name, "group": name, "cursor": g.cursor }),
    ))
}

/// The first message kept that was published at or after `at`.
fn first_at(name: &str, t: &Topic, at: u64) -> Result<u64, storage::Error> {
    for kv in storage::scan_all(format!("m/{name}/"))? {
        let m: Message = plexus_sdk::codec::decode(&kv.value.value)
            .map_err(|e| storage::Error::Io(e.to_string()))?;
        if m.published_ms >= at {
            return Ok(seq_of(&kv.key));
        }
    }
    Ok(t.last_seq + 1)
}

fn seq_of(key: &[u8]) -> u64 {
    let digits = &key[key.len().saturating_sub(20)..];
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

fn delivery(seq: u64, m: Message, deliveries: u32) -> Delivery {
    Delivery {
        seq,
        data: m.data,
        deliveries,
        published_ms: m.published_ms,
        headers: m.headers,
    }
}

/// Hands up to `max` messages to `consumer`: those whose ack wait ran out
/// (or that were nak'ed, or whose delay passed) first, then new ones.
pub fn fetch(
    topic_name: &str,
    name: &str,
    consumer: &str,
    max: u32,
    now: u64,
) -> Result<Outcome, Rejected> {
    let mut t = topic(topic_name)?.ok_or_else(|| no_topic(topic_name))?;
    trim(topic_name, &mut t, Some(now))?;
    save_topic(topic_name, &t)?;
    let mut g = group(topic_name, name)?.ok_or_else(|| no_group(topic_name, name))?;
    let (max, wait) = (max as usize, g.config.ack_wait_ms);
    let mut out = Vec::new();
    for kv in storage::scan_all(held_prefix(topic_name, name))? {
        if out.len() >= max {
            break;
        }
        let mut held: Held = plexus_sdk::codec::decode(&kv.value.value)
            .map_err(|e| storage::Error::Io(e.to_string()))?;
        if held.due_ms > now {
            continue;
        }
        let seq = seq_of(&kv.key);
        let key = held_key(topic_name, name, seq);
        let Some(m) = get::<Message>(&msg_key(topic_name, seq))? else {
            // Gone by the topic's limits.
            storage::delete(&key)?;
            if held.deliveries > 0 {
                g.out = g.out.saturating_sub(1);
            }
            continue;
        };
        if held.deliveries == 0 {
            if g.out >= g.config.max_ack_pending {
                continue;
            }
            g.out += 1;
        } else if g.config.max_deliver > 0 && held.deliveries >= g.config.max_deliver {
            dead_letter(topic_name, name, seq, m, held.deliveries, now)?;
            storage::delete(&key)?;
            g.out = g.out.saturating_sub(1);
            continue;
        }
        held.deliveries += 1;
        held.due_ms = now.saturating_add(wait);
        held.consumer = consumer.to_string();
        storage::put_typed(&key, &held)?;
        out.push(delivery(seq, m, held.deliveries));
    }
    while out.len() < max && g.cursor <= t.last_seq && g.out < g.config.max_ack_pending {
        let seq = g.cursor.max(t.first_seq);
        g.cursor = seq + 1;
        let Some(m) = get::<Message>(&msg_key(topic_name, seq))? else {
            continue;
        };
        let key = held_key(topic_name, name, seq);
        if m.not_before_ms > now {
            let later = Held {
                consumer: String::new(),
                due_ms: m.not_before_ms,
                deliveries: 0,
            };
            storage::put_typed(&key, &later)?;
            continue;
        }
        let held = Held {
            consumer: consumer.to_string(),
            due_ms: now.saturating_add(wait),
            deliveries: 1,
        };
        storage::put_typed(&key, &held)?;
        g.out += 1;
        out.push(delivery(seq, m, 1));
    }
    save_group(topic_name, name, &g)?;
    Ok(Outcome::Delivered(out))
}

/// Moves a message that was not acked after `deliveries` deliveries to
/// `<topic>.dlq`, with headers saying where it came from and why.
fn dead_letter(
    topic_name: &str,
    group_name: &str,
    seq: u64,
    m: Message,
    deliveries: u32,
    now: u64,
) -> Result<(), Rejected> {
    let dlq = format!("{topic_name}.dlq");
    if topic(&dlq)?.is_none() {
        save_topic(&dlq, &Topic::default())?;
    }
    let mut headers = m.headers;
    headers.extend([
        ("dead-letter-topic".to_string(), topic_name.to_string()),
        ("dead-letter-group".to_string(), group_name.to_string()),
        ("dead-letter-seq".to_string(), seq.to_string()),
        (
            "dead-letter-reason".to_string(),
            format!("not acknowledged after {deliveries} deliveries (max_deliver)"),
        ),
    ]);
    publish(&dlq, None, m.data, headers, now, now).map(drop)
}

/// Takes an acked message off the group's books. Acking one that is not
/// out (acked before, or never delivered) changes nothing.
pub fn ack(topic_name: &str, name: &str, seq: u64) -> Result<Outcome, Rejected> {
    let acked = ack_many(topic_name, name, &[seq])? == 1;
    Ok(Outcome::Done(json!({ "seq": seq, "acked": acked })))
}

/// Acks each of `seqs` that is out: the number that were.
pub fn ack_many(topic_name: &str, name: &str, seqs: &[u64]) -> Result<u64, Rejected> {
    let mut g = group(topic_name, name)?.ok_or_else(|| no_group(topic_name, name))?;
    let mut acked = 0;
    for &seq in seqs {
        let key = held_key(topic_name, name, seq);
        if let Some(h) = get::<Held>(&key)?
            && h.deliveries > 0
        {
            storage::delete(&key)?;
            g.out = g.out.saturating_sub(1);
            acked += 1;
        }
    }
    if acked > 0 {
        save_group(topic_name, name, &g)?;
    }
    Ok(acked)
}

/// Sends a message out again at `at` (a nak), or, with `progress`, gives
/// its consumer another ack wait from `at`.
pub fn retry_at(
    topic_name: &str,
    name: &str,
    seq: u64,
    at: u64,
    progress: bool,
) -> Result<Outcome, Rejected> {
    let g = group(topic_name, name)?.ok_or_else(|| no_group(topic_name, name))?;
    let key = held_key(topic_name, name, seq);
    let mut held = match get::<Held>(&key)? {
        Some(h) if h.deliveries > 0 => h,
        _ => {
            return Err(Rejected::new(
                404,
                &format!("message {seq} is not out to `{name}`"),
            ));
        }
    };
    held.due_ms = if progress {
        at.saturating_add(g.config.ack_wait_ms)
    } else {
        at
    };
    storage::put_typed(&key, &held)?;
    Ok(Outcome::Done(json!({ "seq": seq, "due_ms": held.due_ms })))
}

/// A group as an operator sees it.
pub fn group_view(
    topic_name: &str,
    name: &str,
) -> Result<Option<serde_json::Value>, storage::Error> {
    let (Some(t), Some(g)) = (topic(topic_name)?, group(topic_name, name)?) else {
        return Ok(None);
    };
    let scheduled = storage::scan_all(held_prefix(topic_name, name))?
        .iter()
        .filter(|kv| {
            plexus_sdk::codec::decode::<Held>(&kv.value.value).is_ok_and(|h| h.deliveries == 0)
        })
        .count();
    Ok(Some(json!({
        "topic": topic_name,
        "group": name,
        "config": g.config,
        "cursor": g.cursor,
        "out": g.out,
        "scheduled": scheduled,
        "lag": (t.last_seq + 1).saturating_sub(g.cursor),
    })))
}
