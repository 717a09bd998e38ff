//! chaos: a plugin that misbehaves on purpose, to check that the node
//! contains it. Each route or config switch makes one hook loop, trap,
//! exhaust memory or send something oversized; the node must restart or
//! refuse it and keep every other plugin serving.
//!
//! Config: `{"fail_in": "init" | "init-trap" | "restore" | "restore-trap" |
//! "snapshot" | "on-membership"}` makes that hook fail on every call.
//!
//! Routes: `GET /ping`, `POST /loop`, `POST /oom`, `POST /trap`,
//! `POST /propose-big?mb=N`, `POST /trap-message`, `POST /trap-timer`,
//! `POST /trap-apply?ms=N` (apply traps for N ms of wall time, then
//! succeeds), `POST /message-big?mb=N`.

use plexus_sdk::consensus::{ProposeError, Rejected};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::{
    InitContext, MemberEvent, Pattern, Reply, Request, Response, consensus, export_pattern,
    messaging, timers,
};
use serde::{Deserialize, Serialize};

/// What chaos writes to its log.
#[derive(Serialize, Deserialize)]
enum Command {
    /// Bytes that only take room.
    Fill(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Trap in `apply` until this wall-clock time.
    TrapUntil(u64),
}

const TRAP_TIMER: u64 = 13;

#[derive(Deserialize, Default)]
struct Settings {
    #[serde(default)]
    fail_in: Option<String>,
}

struct Chaos {
    settings: Settings,
    node: String,
    pings: u64,
}

impl Chaos {
    fn fails_in(&self, hook: &str) -> bool {
        self.settings.fail_in.as_deref() == Some(hook)
    }
}

fn mb(req: &Request) -> usize {
    req.query_param("mb")
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn ping(c: &mut Chaos, _: &Request, _: &Params) -> http::Result {
    Ok({
        c.pings += 1;
        Response::json(200, &serde_json::json!({ "pong": c.pings }))
    })
}

fn spin(_: &mut Chaos, _: &Request, _: &Params) -> http::Result {
    let mut x: u64 = 1;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

fn oom(_: &mut Chaos, _: &Request, _: &Params) -> http::Result {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

fn trap(_: &mut Chaos, _: &Request, _: &Params) -> http::Result {
    panic!("chaos: trap in on-request");
}

fn propose_big(c: &mut Chaos, req: &Request, _: &Params) -> http::Result {
    Ok({
        let data = vec![7u8; mb(req) << 20];
        match consensus::propose(c, &Command::Fill(data)) {
            Ok(done) => Response::json(200, &serde_json::json!({ "index": done.index })),
            Err(ProposeError::Consensus(consensus::Error::TooLarge(limit))) => Response::json(
                413,
                &serde_json::json!({ "error": "too-large", "limit": limit }),
            ),
            Err(e) => Response::error(503, &e.to_string()),
        }
    })
}

fn message_big(c: &mut Chaos, req: &Request, _: &Params) -> http::Result {
    Ok({
        let data = vec![7u8; mb(req) << 20];
        match messaging::send(&c.node, "noop", &data) {
            Ok(()) => Response::json(200, &serde_json::json!({ "sent": true })),
            Err(messaging::Error::TooLarge(limit)) => Response::json(
                413,
                &serde_json::json!({ "error": "too-large", "limit": limit }),
            ),
            Err(e) => Response::error(503, &e.to_string()),
        }
    })
}

fn trap_message(c: &mut Chaos, _: &Request, _: &Params) -> http::Result {
    Ok({
        match messaging::send(&c.node, "trap", b"") {
            Ok(()) => Response::json(202, &serde_json::json!({ "sent": true })),
            Err(e) => Response::error(503, &e.to_string()),
        }
    })
}

fn trap_timer(_: &mut Chaos, _: &Request, _: &Params) -> http::Result {
    Ok({
        timers::set(TRAP_TIMER, 10);
        Response::json(202, &serde_json::json!({ "timer": TRAP_TIMER }))
    })
}

fn trap_apply(c: &mut Chaos, req: &Request, _: &Params) -> http::Result {
    Ok({
        let ms: u64 = req
            .query_param("ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let until = timers::now_ms() + ms;
        match consensus::propose(c, &Command::TrapUntil(until)) {
            Ok(done) => Response::json(200, &serde_json::json!({ "index": done.index })),
            Err(e) => Response::error(503, &e.to_string()),
        }
    })
}

impl Pattern for Chaos {
    type Command = Command;
    type Output = ();

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        let chaos = Chaos {
            settings,
            node: ctx.node,
            pings: 0,
        };
        if chaos.fails_in("init") {
            return Err("chaos: refusing to start".into());
        }
        if chaos.fails_in("init-trap") {
            panic!("chaos: trap in init");
        }
        Ok(chaos)
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .get("/ping", ping)
            .post("/loop", spin)
            .post("/oom", oom)
            .post("/trap", trap)
            .post("/propose-big", propose_big)
            .post("/message-big", message_big)
            .post("/trap-message", trap_message)
            .post("/trap-timer", trap_timer)
            .post("/trap-apply", trap_apply)
            .handle(self, req)
    }

    fn on_message(&mut self, _from: String, topic: String, _payload: Vec<u8>) -> Option<Vec<u8>> {
        if topic == "trap" {
            panic!("chaos: trap in on-message");
        }
        None
    }

    fn apply(&mut self, index: u64, command: Command) -> Result<(), Rejected> {
        match command {
            Command::TrapUntil(until) if timers::now_ms() < until => {
                panic!("chaos: trap in apply of entry {index}")
            }
            _ => Ok(()),
        }
    }

    fn on_membership(&mut self, _events: Vec<MemberEvent>) {
        if self.fails_in("on-membership") {
            panic!("chaos: trap in on-membership");
        }
    }

    fn on_timer(&mut self, id: u64) {
        if id == TRAP_TIMER {
            panic!("chaos: trap in on-timer");
        }
    }

    fn snapshot(&mut self) -> Vec<u8> {
        if self.fails_in("snapshot") {
            panic!("chaos: trap in snapshot");
        }
        self.pings.to_le_bytes().to_vec()
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        if self.fails_in("restore") {
            return Err("chaos: refusing the handed-over state".into());
        }
        if self.fails_in("restore-trap") {
            panic!("chaos: trap in restore");
        }
        if let Ok(bytes) = <[u8; 8]>::try_from(state.as_slice()) {
            self.pings = u64::from_le_bytes(bytes);
        }
        Ok(())
    }
}

export_pattern!(Chaos);

#[cfg(test)]
mod tests;
