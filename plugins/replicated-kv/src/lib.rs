//! replicated-kv: a linearizable key-value store on the consensus log.
//!
//! Writes are log entries; every node applies them in order into its local
//! storage, so any node can serve reads. A write is submitted without
//! waiting and answered when its entry is applied, so one node keeps many
//! writes in flight and the host batches them into the log. A key's
//! version is the log index of the entry that last wrote it, the same on
//! every node, which makes compare-and-swap work across the cluster. Reads
//! wait for a read barrier unless `?consistency=local` asks for a possibly
//! stale local read.
//!
//! HTTP (below `/v1/plugins/<name>`):
//! - `GET /kv/{key}`: the value as the body, its version in `x-version`.
//! - `PUT /kv/{key}`: body is the value; `?version=N` makes it a
//!   compare-and-swap (`N = 0`: the key must not exist).
//! - `DELETE /kv/{key}`: optionally `?version=N`.
//! - `GET /kv?prefix=P`: keys and versions under a prefix, as JSON.
//! - `GET /stats`: entries applied (durable) and writes served by this
//!   instance lineage (handed over on hot swap).

use plexus_sdk::consensus::{self, Committed, Pending, Rejected};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::{InitContext, Pattern, Reply, Request, Response, codec, export_pattern, storage};
use serde::{Deserialize, Serialize};
use serde_json::json;

const DATA: &str = "k/";
const APPLIED: &str = "meta/applied";
const MAX_KEY: usize = 1024;

/// A write. The variants and their order are the log's format: entries
/// written by earlier versions must still decode.
#[derive(Serialize, Deserialize)]
enum Write {
    Put {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// A compare-and-swap against version `expected` (0: the key must not
    /// exist); `value: None` deletes.
    Cas {
        key: String,
        expected: u64,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
    },
}

impl Write {
    fn new(key: String, expected: Option<u64>, value: Option<Vec<u8>>) -> Write {
        match (expected, value) {
            (Some(expected), value) => Write::Cas {
                key,
                expected,
                value,
            },
            (None, Some(value)) => Write::Put { key, value },
            (None, None) => Write::Delete { key },
        }
    }

    /// The key, the version it must be at, and the value (`None` deletes).
    fn parts(self) -> (String, Option<u64>, Option<Vec<u8>>) {
        match self {
            Write::Put { key, value } => (key, None, Some(value)),
            Write::Delete { key } => (key, None, None),
            Write::Cas {
                key,
                expected,
                value,
            } => (key, Some(expected), value),
        }
    }
}

/// A stored value: the bytes and the log index that wrote them.
#[derive(Serialize, Deserialize)]
struct Stored {
    version: u64,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
}

/// What an accepted write did.
enum Outcome {
    Written(u64),
    Deleted(bool),
}

struct Kv {
    /// Writes acknowledged by this plugin on this node since it was first
    /// loaded; handed from version to version on hot swap.
    served: u64,
    /// Entries applied since the last `after_apply`, to add to the count
    /// stored under [`APPLIED`].
    unrecorded: u64,
}

fn current(key: &str) -> Result<Option<Stored>, storage::Error> {
    Ok(storage::get_typed::<Stored>(format!("{DATA}{key}"))?.map(|(s, _)| s))
}

/// Entries applied on this node, as stored.
fn applied_count() -> u64 {
    storage::get_typed::<u64>(APPLIED)
        .ok()
        .flatten()
        .map_or(0, |(n, _)| n)
}

fn answer(kv: &mut Kv, done: Committed<Outcome>) -> Response {
    kv.served += 1;
    match done.output {
        Outcome::Written(version) => Response::json(200, &json!({ "version": version })),
        Outcome::Deleted(existed) => Response::json(200, &json!({ "deleted": existed })),
    }
}

/// Reads wait for every write committed before them, unless asked not to.
fn read_barrier(kv: &mut Kv, req: &Request) -> http::Result<()> {
    if req.query_param("consistency").as_deref() != Some("local") {
        consensus::read_barrier(kv)?;
    }
    Ok(())
}

fn get(kv: &mut Kv, req: &Request, params: &Params) -> http::Result {
    let key = params.text("key", MAX_KEY)?;
    read_barrier(kv, req)?;
    match current(&key)? {
        Some(s) => Ok(Response::new(200, "application/octet-stream", s.value)
            .with_header("x-version", &s.version.to_string())),
        None => Ok(Response::error(404, "no such key")),
    }
}

fn write(
    kv: &mut Kv,
    req: &Request,
    params: &Params,
    value: Option<Vec<u8>>,
) -> http::Result<Pending> {
    let key = params.text("key", MAX_KEY)?;
    let write = Write::new(key, req.query::<u64>("version")?, value);
    Ok(consensus::submit(kv, &write, answer)?)
}

fn put(kv: &mut Kv, req: &Request, params: &Params) -> http::Result<Pending> {
    write(kv, req, params, Some(req.body.clone()))
}

fn delete(kv: &mut Kv, req: &Request, params: &Params) -> http::Result<Pending> {
    write(kv, req, params, None)
}

fn list(kv: &mut Kv, req: &Request, _: &Params) -> http::Result {
    read_barrier(kv, req)?;
    let prefix = req.query_param("prefix").unwrap_or_default();
    let keys: Vec<_> = storage::scan_all(format!("{DATA}{prefix}"))?
        .iter()
        .filter_map(|kv| {
            let stored: Stored = codec::decode(&kv.value.value).ok()?;
            let key = String::from_utf8_lossy(&kv.key[DATA.len()..]);
            Some(json!({ "key": key, "version": stored.version }))
        })
        .collect();
    Ok(Response::json(200, &keys))
}

fn stats(kv: &mut Kv, _: &Request, _: &Params) -> http::Result {
    Ok(Response::json(
        200,
        &json!({ "applied": applied_count(), "served": kv.served }),
    ))
}

impl Pattern for Kv {
    type Command = Write;
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

    fn apply(&mut self, index: u64, write: Write) -> Result<Outcome, Rejected> {
        let (key, expected, value) = write.parts();
        if let Some(expected) = expected {
            let now = current(&key)?.map_or(0, |s| s.version);
            if now != expected {
                return Err(Rejected::json(
                    409,
                    &json!({ "error": "version mismatch", "current": now }),
                )
                .with_header("x-version", &now.to_string()));
            }
        }
        self.unrecorded += 1;
        let key = format!("{DATA}{key}");
        Ok(match value {
            Some(value) => {
                storage::put_typed(
                    key,
                    &Stored {
                        version: index,
                        value,
                    },
                )?;
                Outcome::Written(index)
            }
            None => Outcome::Deleted(storage::delete(key)?),
        })
    }

    fn after_apply(&mut self) {
        // Read, not kept in memory: during a hot swap the old instance
        // applies entries after the new one was initialized. The count is
        // a statistic; if storage refuses it, the writes still go in.
        let count = applied_count() + std::mem::take(&mut self.unrecorded);
        let _ = storage::put_typed(APPLIED, &count);
    }

    // A write the version before a swap accepted is answered as that
    // version would have: the answer depends on the outcome only.
    fn answer_inherited(&mut self, done: Committed<Outcome>) -> Option<Response> {
        Some(answer(self, done))
    }

    fn snapshot(&mut self) -> Vec<u8> {
        codec::encode_versioned(1, &self.served)
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        // Format 1 and the unversioned format before it hold the same u64.
        let state = codec::versioned(&state)?;
        if !state.body.is_empty() {
            self.served = state.decode()?;
        }
        Ok(())
    }
}

export_pattern!(Kv);

#[cfg(test)]
mod tests;
