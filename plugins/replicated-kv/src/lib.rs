//! replicated-kv: a linearizable key-value store on the consensus log.
//!
//! Writes are log entries; every node applies them in order into its local
//! storage, so any node can serve reads. A write is submitted without
//! waiting and answered when its entry is applied, so one node keeps many
//! writes in flight and the host batches them into the log. A key's version is the log index of
//! the entry that last wrote it, the same on every node, which makes
//! compare-and-swap work across the cluster. Reads wait for a read barrier
//! unless `?consistency=local` asks for a possibly stale local read.
//!
//! HTTP (below `/v1/plugins/<name>`):
//! - `GET /kv/{key}`: the value as the body, its version in `x-version`.
//! - `PUT /kv/{key}`: body is the value; `?version=N` makes it a
//!   compare-and-swap (`N = 0`: the key must not exist).
//! - `DELETE /kv/{key}`: optionally `?version=N`.
//! - `GET /kv?prefix=P`: keys and versions under a prefix, as JSON.
//! - `GET /stats`: entries applied (durable) and writes served by this
//!   instance lineage (handed over on hot swap).

use plexus_sdk::consensus::{self, Pending};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::{
    CommittedEntry, InitContext, Pattern, Reply, Request, Response, codec, export_pattern, storage,
};
use serde::{Deserialize, Serialize};

const DATA: &str = "k/";
const APPLIED: &str = "meta/applied";

#[derive(Serialize, Deserialize)]
enum Command {
    Put {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    Cas {
        key: String,
        expected: u64,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
    },
}

/// A stored value: the bytes and the log index that wrote them.
#[derive(Serialize, Deserialize)]
struct Stored {
    version: u64,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
}

/// What applying a command did.
#[derive(Default)]
enum Outcome {
    #[default]
    Invalid,
    Written {
        version: u64,
    },
    Deleted {
        existed: bool,
    },
    Conflict {
        current: u64,
    },
    Failed(String),
}

struct Kv {
    /// Writes acknowledged by this plugin on this node since it was first
    /// loaded; handed from version to version on hot swap.
    served: u64,
    /// Entries applied since the last `after_apply`, to add to the count
    /// stored under [`APPLIED`].
    unrecorded: u64,
}

/// Entries applied on this node, as stored.
fn applied_count() -> u64 {
    storage::get_typed::<u64>(APPLIED)
        .ok()
        .flatten()
        .map_or(0, |(n, _)| n)
}

fn current(key: &str) -> Result<Option<Stored>, storage::Error> {
    Ok(storage::get_typed::<Stored>(format!("{DATA}{key}"))?.map(|(s, _)| s))
}

impl Kv {
    fn execute(&mut self, cmd: Command, index: u64) -> Result<Outcome, storage::Error> {
        let (key, expected, value) = match cmd {
            Command::Put { key, value } => (key, None, Some(value)),
            Command::Delete { key } => (key, None, None),
            Command::Cas {
                key,
                expected,
                value,
            } => (key, Some(expected), value),
        };
        if let Some(expected) = expected {
            let now = current(&key)?.map_or(0, |s| s.version);
            if now != expected {
                return Ok(Outcome::Conflict { current: now });
            }
        }
        Ok(match value {
            Some(value) => {
                storage::put_typed(
                    format!("{DATA}{key}"),
                    &Stored {
                        version: index,
                        value,
                    },
                )?;
                Outcome::Written { version: index }
            }
            None => Outcome::Deleted {
                existed: storage::delete(format!("{DATA}{key}"))?,
            },
        })
    }

    /// Submits `cmd`; the request is answered once it is applied here.
    fn write(&mut self, cmd: Command) -> http::Result<Pending> {
        consensus::submit(self, &cmd, |kv: &mut Kv, done| {
            kv.served += 1;
            answer(done.output)
        })
        .map_err(Response::from)
    }
}

#[derive(Serialize)]
struct Written {
    version: u64,
}

#[derive(Serialize)]
struct Deleted {
    deleted: bool,
}

fn answer(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Written { version } => Response::json(200, &Written { version }),
        Outcome::Deleted { existed } => Response::json(200, &Deleted { deleted: existed }),
        Outcome::Conflict { current } => Response::json(
            409,
            &serde_json::json!({ "error": "version mismatch", "current": current }),
        ),
        Outcome::Failed(msg) => Response::error(500, &msg),
        Outcome::Invalid => Response::error(500, "entry could not be decoded"),
    }
}

fn key_of(params: &Params) -> Result<String, Response> {
    let key = params.get("key").unwrap_or_default();
    if key.is_empty() || key.len() > 1024 {
        return Err(Response::error(400, "key must be 1..=1024 bytes"));
    }
    Ok(key.to_string())
}

fn read_barrier(kv: &mut Kv, req: &Request) -> Result<(), Response> {
    if req.query_param("consistency").as_deref() == Some("local") {
        return Ok(());
    }
    consensus::read_barrier(kv).map_err(Response::from)
}

fn get(kv: &mut Kv, req: &Request, params: &Params) -> http::Result {
    let key = key_of(params)?;
    read_barrier(kv, req)?;
    match current(&key)? {
        Some(s) => Ok(Response::new(200, "application/octet-stream", s.value)
            .with_header("x-version", &s.version.to_string())),
        None => Ok(Response::error(404, "no such key")),
    }
}

fn put(kv: &mut Kv, req: &Request, params: &Params) -> http::Result<Pending> {
    let key = key_of(params)?;
    let value = req.body.clone();
    kv.write(match req.query::<u64>("version")? {
        Some(expected) => Command::Cas {
            key,
            expected,
            value: Some(value),
        },
        None => Command::Put { key, value },
    })
}

fn delete(kv: &mut Kv, req: &Request, params: &Params) -> http::Result<Pending> {
    let key = key_of(params)?;
    kv.write(match req.query::<u64>("version")? {
        Some(expected) => Command::Cas {
            key,
            expected,
            value: None,
        },
        None => Command::Delete { key },
    })
}

fn list(kv: &mut Kv, req: &Request, _: &Params) -> http::Result {
    read_barrier(kv, req)?;
    let prefix = req.query_param("prefix").unwrap_or_default();
    let items = storage::scan_all(format!("{DATA}{prefix}"))?;
    let keys: Vec<_> = items
        .iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(&kv.key[DATA.len()..]).into_owned();
            let stored: Stored = codec::decode(&kv.value.value).ok()?;
            Some(serde_json::json!({ "key": key, "version": stored.version }))
        })
        .collect();
    Ok(Response::json(200, &keys))
}

fn stats(kv: &mut Kv, _: &Request, _: &Params) -> http::Result {
    Ok(Response::json(
        200,
        &serde_json::json!({ "applied": applied_count(), "served": kv.served }),
    ))
}

impl Pattern for Kv {
    type Output = Outcome;

    fn init(_ctx: InitContext) -> Result<Self, String> {
        Ok(Kv {
            served: 0,
            unrecorded: 0,
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .get("/kv", list)
            .get("/kv/{*key}", get)
            .put("/kv/{*key}", put)
            .post("/kv/{*key}", put)
            .delete("/kv/{*key}", delete)
            .get("/stats", stats)
            .handle(self, req)
    }

    // A write the version before a swap accepted is answered as that
    // version would have: the answer depends on the outcome only.
    fn answer_inherited(&mut self, done: consensus::Committed<Outcome>) -> Option<Response> {
        self.served += 1;
        Some(answer(done.output))
    }

    fn apply(&mut self, entry: CommittedEntry) -> Outcome {
        let Ok(cmd) = consensus::decode::<Command>(&entry) else {
            return Outcome::Invalid;
        };
        match self.execute(cmd, entry.index) {
            Ok(outcome) => {
                self.unrecorded += 1;
                outcome
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    fn after_apply(&mut self) {
        // Read, not kept in memory: during a hot swap the old instance
        // applies entries after the new one was initialized. The count is
        // a statistic; if storage refuses it, the writes still go in.
        let count = applied_count() + std::mem::take(&mut self.unrecorded);
        let _ = storage::put_typed(APPLIED, &count);
    }

    fn snapshot(&mut self) -> Vec<u8> {
        codec::encode(&self.served)
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        if !state.is_empty() {
            self.served = codec::decode(&state).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

export_pattern!(Kv);
