//! pubsub: durable topics with consumer groups, acknowledgements,
//! redelivery, dead letters and delayed delivery, on the consensus log.
//!
//! Every change is a command of the log: a publish, a fetch (which hands
//! messages to a consumer), an ack. So every node holds the same topics,
//! messages and group cursors, any node serves any client, and a publish
//! is durable on a majority before its 2xx. Time is the proposer's clock,
//! carried in the command, so applying stays deterministic.
//!
//! Semantics, after NATS JetStream's:
//! - a topic keeps messages up to `max_msgs`, `max_bytes` and `max_age_ms`
//!   (the oldest go first); a publish with an id that the topic saw within
//!   `duplicate_window_ms` is not stored again (`"duplicate": true`);
//! - a group is a durable cursor: its members share the messages (each to
//!   one member at a time), and every group gets every message;
//! - a fetched message is the consumer's until `ack_wait_ms`; unacked by
//!   then (or nak'ed) it goes out again; after `max_deliver` deliveries it
//!   moves to the topic `<topic>.dlq` with why; `max_ack_pending` bounds
//!   what a group has out;
//! - a publish with `delay_ms` is delivered no earlier than that.
//!
//! HTTP (below `/v1/plugins/<name>`):
//! - `PUT /topics/{topic}` with the limits as JSON; `GET /topics/{topic}`.
//! - `POST /topics/{topic}/publish?id=ID&delay_ms=N`, the body is the
//!   message: `{"seq", "duplicate"}`.
//! - `PUT /topics/{topic}/groups/{group}` with `{"deliver": "all" | "new" |
//!   {"seq": N} | {"time_ms": T}, "ack_wait_ms", "max_deliver",
//!   "max_ack_pending"}`; `GET` shows its cursor and what it has out.
//! - `POST /topics/{topic}/groups/{group}/fetch?max=N&consumer=C&wait_ms=W`:
//!   up to N messages as `[{"seq", "data" (or "data_b64"), "deliveries",
//!   "published_ms", "headers"}]`; with `wait_ms`, an empty fetch waits up
//!   to W ms for a message (a long poll) before answering `[]`.
//! - `POST .../ack/{seq}`, `.../nak/{seq}?delay_ms=N`,
//!   `POST .../ack` with a JSON list of seqs (up to 1000) acks them all in
//!   one log entry: `{"acked": n}`, the number that were out;
//!   `.../progress/{seq}` (more time to work on it).

use base64::Engine;
use plexus_sdk::consensus::{self, Committed, Pending, Rejected};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::polls::{self, LongPolls, Poll};
use plexus_sdk::{InitContext, Pattern, Reply, Request, Response, export_pattern, timers};
use serde::{Deserialize, Serialize};
use serde_json::json;

mod state;

use state::{Delivery, GroupConfig, Outcome, TopicConfig};

const MAX_FETCH: u32 = 1000;
/// Longest a fetch may wait for a message.
const MAX_WAIT_MS: u64 = 60_000;
/// The timer of the waiting fetches.
const POLLS: u64 = 1;

/// A command of the log. Add variants at the end; never change these.
#[derive(Serialize, Deserialize)]
pub enum Command {
    Topic {
        topic: String,
        config: TopicConfig,
    },
    Publish {
        topic: String,
        id: Option<String>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        delay_ms: u64,
        now_ms: u64,
    },
    Group {
        topic: String,
        group: String,
        config: GroupConfig,
        now_ms: u64,
    },
    Fetch {
        topic: String,
        group: String,
        consumer: String,
        max: u32,
        now_ms: u64,
    },
    Ack {
        topic: String,
        group: String,
        seq: u64,
    },
    Nak {
        topic: String,
        group: String,
        seq: u64,
        delay_ms: u64,
        now_ms: u64,
    },
    Progress {
        topic: String,
        group: String,
        seq: u64,
        now_ms: u64,
    },
    /// Several acks in one entry.
    AckMany {
        topic: String,
        group: String,
        seqs: Vec<u64>,
    },
}

pub struct PubSub {
    /// Fetches waiting for a message, by topic.
    polls: LongPolls<Fetch>,
}

/// What a waiting fetch asks for (its topic is the poll's key).
struct Fetch {
    group: String,
    consumer: String,
    max: u32,
}

impl PubSub {
    /// Fetches for `poll` again: answers it with what comes, or parks it
    /// again if nothing came and it may still wait.
    fn retry(&mut self, poll: Poll<Fetch>) {
        let cmd = Command::Fetch {
            topic: poll.key.clone(),
            group: poll.item.group.clone(),
            consumer: poll.item.consumer.clone(),
            max: poll.item.max,
            now_ms: timers::now_ms(),
        };
        let found = |o: &Outcome| !matches!(o, Outcome::Delivered(v) if v.is_empty());
        polls::submit_again(self, poll, &cmd, |p| &mut p.polls, found, answer);
    }
}

fn answer(_: &mut PubSub, done: Committed<Outcome>) -> Response {
    match done.output {
        Outcome::Published { seq, duplicate } => {
            Response::json(200, &json!({ "seq": seq, "duplicate": duplicate }))
        }
        Outcome::Delivered(messages) => {
            let shown: Vec<_> = messages.iter().map(show).collect();
            Response::json(200, &shown)
        }
        Outcome::Done(value) => Response::json(200, &value),
    }
}

fn show(d: &Delivery) -> serde_json::Value {
    let mut v = json!({
        "seq": d.seq,
        "deliveries": d.deliveries,
        "published_ms": d.published_ms,
        "headers": d.headers,
    });
    match std::str::from_utf8(&d.data) {
        Ok(text) => v["data"] = text.into(),
        Err(_) => {
            v["data_b64"] = base64::engine::general_purpose::STANDARD
                .encode(&d.data)
                .into()
        }
    }
    v
}

fn submit(p: &mut PubSub, cmd: Command) -> http::Result<Pending> {
    Ok(consensus::submit(p, &cmd, answer)?)
}

fn names(params: &Params) -> http::Result<(String, String)> {
    Ok((params.ident("topic")?, params.ident("group")?))
}

fn put_topic(p: &mut PubSub, req: &Request, params: &Params) -> http::Result<Pending> {
    let topic = params.ident("topic")?;
    let config: TopicConfig = if req.body.is_empty() {
        TopicConfig::default()
    } else {
        req.json()?
    };
    submit(p, Command::Topic { topic, config })
}

fn get_topic(p: &mut PubSub, _: &Request, params: &Params) -> http::Result {
    let topic = params.ident("topic")?;
    consensus::read_barrier(p)?;
    match state::topic(&topic)? {
        Some(t) => Ok(Response::json(200, &t)),
        None => Ok(Response::error(404, "no such topic")),
    }
}

fn publish(p: &mut PubSub, req: &Request, params: &Params) -> http::Result<Pending> {
    let topic = params.ident("topic")?;
    let id = req
        .query_param("id")
        .or_else(|| req.header("nats-msg-id").map(str::to_string));
    let delay_ms = req.query::<u64>("delay_ms")?.unwrap_or(0);
    let data = req.body.clone();
    submit(
        p,
        Command::Publish {
            topic,
            id,
            data,
            delay_ms,
            now_ms: timers::now_ms(),
        },
    )
}

fn put_group(p: &mut PubSub, req: &Request, params: &Params) -> http::Result<Pending> {
    let (topic, group) = names(params)?;
    let config: GroupConfig = if req.body.is_empty() {
        GroupConfig::default()
    } else {
        req.json()?
    };
    config.check().map_err(|why| Response::error(400, &why))?;
    submit(
        p,
        Command::Group {
            topic,
            group,
            config,
            now_ms: timers::now_ms(),
        },
    )
}

fn get_group(p: &mut PubSub, _: &Request, params: &Params) -> http::Result {
    let (topic, group) = names(params)?;
    consensus::read_barrier(p)?;
    match state::group_view(&topic, &group)? {
        Some(v) => Ok(Response::json(200, &v)),
        None => Ok(Response::error(404, "no such group")),
    }
}

fn fetch(p: &mut PubSub, req: &Request, params: &Params) -> http::Result<Pending> {
    let (topic, group) = names(params)?;
    let max = req.query::<u32>("max")?.unwrap_or(1).clamp(1, MAX_FETCH);
    let consumer = req.query_param("consumer").unwrap_or_default();
    let wait_ms = req.query::<u64>("wait_ms")?.unwrap_or(0).min(MAX_WAIT_MS);
    let cmd = Command::Fetch {
        topic: topic.clone(),
        group: group.clone(),
        consumer: consumer.clone(),
        max,
        now_ms: timers::now_ms(),
    };
    Ok(consensus::submit(
        p,
        &cmd,
        move |p: &mut PubSub, done| -> Reply {
            match &done.output {
                // Nothing yet: the client waits for the next publish instead.
                Outcome::Delivered(found) if found.is_empty() && wait_ms > 0 => {
                    let fetch = Fetch {
                        group,
                        consumer,
                        max,
                    };
                    p.polls.hold(&topic, wait_ms, fetch).into()
                }
                _ => answer(p, done).into(),
            }
        },
    )?)
}

fn ack(p: &mut PubSub, _: &Request, params: &Params) -> http::Result<Pending> {
    let (topic, group) = names(params)?;
    let seq = params.parse("seq")?;
    submit(p, Command::Ack { topic, group, seq })
}

fn ack_many(p: &mut PubSub, req: &Request, params: &Params) -> http::Result<Pending> {
    let (topic, group) = names(params)?;
    let seqs: Vec<u64> = req.json()?;
    if !(1..=MAX_FETCH as usize).contains(&seqs.len()) {
        return Err(Response::error(
            400,
            &format!("the body is a list of 1 to {MAX_FETCH} sequence numbers"),
        ));
    }
    submit(p, Command::AckMany { topic, group, seqs })
}

fn nak(p: &mut PubSub, req: &Request, params: &Params) -> http::Result<Pending> {
    let (topic, group) = names(params)?;
    let seq = params.parse("seq")?;
    let delay_ms = req.query::<u64>("delay_ms")?.unwrap_or(0);
    submit(
        p,
        Command::Nak {
            topic,
            group,
            seq,
            delay_ms,
            now_ms: timers::now_ms(),
        },
    )
}

fn progress(p: &mut PubSub, _: &Request, params: &Params) -> http::Result<Pending> {
    let (topic, group) = names(params)?;
    let seq = params.parse("seq")?;
    submit(
        p,
        Command::Progress {
            topic,
            group,
            seq,
            now_ms: timers::now_ms(),
        },
    )
}

impl Pattern for PubSub {
    type Command = Command;
    type Output = Outcome;

    fn init(_ctx: InitContext) -> Result<Self, String> {
        Ok(PubSub {
            polls: LongPolls::new(POLLS, Response::json(200, &serde_json::json!([]))),
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        const GROUP: &str = "/topics/{topic}/groups/{group}";
        Router::new()
            .put("/topics/{topic}", put_topic)
            .get("/topics/{topic}", get_topic)
            .post("/topics/{topic}/publish", publish)
            .put(GROUP, put_group)
            .get(GROUP, get_group)
            .post(&format!("{GROUP}/fetch"), fetch)
            .post(&format!("{GROUP}/ack/{{seq}}"), ack)
            .post(&format!("{GROUP}/ack"), ack_many)
            .post(&format!("{GROUP}/nak/{{seq}}"), nak)
            .post(&format!("{GROUP}/progress/{{seq}}"), progress)
            .handle(self, req)
    }

    fn apply(&mut self, _index: u64, cmd: Command) -> Result<Outcome, Rejected> {
        match cmd {
            Command::Topic { topic, config } => state::put_topic(&topic, config),
            Command::Publish {
                topic,
                id,
                data,
                delay_ms,
                now_ms,
            } => {
                let not_before = now_ms.saturating_add(delay_ms);
                let published = state::publish(&topic, id, data, Vec::new(), not_before, now_ms);
                // Fetches waiting here look again once this hook is over.
                self.polls.wake(&topic);
                published
            }
            Command::Group {
                topic,
                group,
                config,
                now_ms,
            } => state::put_group(&topic, &group, config, now_ms),
            Command::Fetch {
                topic,
                group,
                consumer,
                max,
                now_ms,
            } => state::fetch(&topic, &group, &consumer, max, now_ms),
            Command::Ack { topic, group, seq } => state::ack(&topic, &group, seq),
            Command::Nak {
                topic,
                group,
                seq,
                delay_ms,
                now_ms,
            } => state::retry_at(&topic, &group, seq, now_ms.saturating_add(delay_ms), false),
            Command::Progress {
                topic,
                group,
                seq,
                now_ms,
            } => state::retry_at(&topic, &group, seq, now_ms, true),
            Command::AckMany { topic, group, seqs } => state::ack_many(&topic, &group, &seqs)
                .map(|acked| Outcome::Done(json!({ "acked": acked }))),
        }
    }

    fn on_timer(&mut self, id: u64) {
        for poll in self.polls.due(id) {
            self.retry(poll);
        }
    }

    // Writes the version before a swap accepted are answered as it would
    // have: the answer depends on the outcome only.
    fn answer_inherited(&mut self, done: Committed<Outcome>) -> Option<Response> {
        Some(answer(self, done))
    }
}

export_pattern!(PubSub);

#[cfg(test)]
mod tests;
