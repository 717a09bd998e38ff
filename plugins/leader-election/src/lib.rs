//! leader-election: named roles held under leases, with fencing tokens.
//!
//! Acquiring, renewing and releasing are log entries, so every node agrees
//! on who holds a role. A lease carries a fencing token that grows every
//! time the role changes hands: a resource that remembers the highest token
//! it has seen can refuse a deposed leader's late writes. Expiry is judged
//! with the proposer's clock reading carried in the entry, so applying is
//! deterministic.
//!
//! The node itself can campaign: with `campaign = ["scheduler"]` in the
//! plugin's config it tries to take each role on a timer and renews at a
//! third of the lease.
//!
//! HTTP (below `/v1/plugins/<name>`):
//! - `POST /roles/{role}/acquire` `{"holder": "...", "ttl_ms": 5000}`:
//!   acquire or renew; 200 with the lease, 409 with the current holder.
//! - `POST /roles/{role}/release` `{"holder": "...", "token": N}`.
//! - `GET /roles/{role}`, `GET /roles`: current leases.

use plexus_sdk::consensus::{self, Error as ConsensusError};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::{
    CommittedEntry, InitContext, Pattern, Reply, Request, Response, export_pattern, storage, timers,
};
use serde::{Deserialize, Serialize};

const LEASE: &str = "lease/";
const TOKEN: &str = "token/";
const CAMPAIGN_TIMER: u64 = 1;
const MIN_TTL_MS: u64 = 100;
const MAX_TTL_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Serialize, Deserialize)]
enum Command {
    Acquire {
        role: String,
        holder: String,
        ttl_ms: u64,
        now_ms: u64,
    },
    Release {
        role: String,
        holder: String,
        token: u64,
    },
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Lease {
    holder: String,
    token: u64,
    expires_at_ms: u64,
}

#[derive(Default)]
enum Outcome {
    #[default]
    Invalid,
    Granted(Lease),
    Held(Lease),
    Released,
    NotHolder(Option<Lease>),
    Failed(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    campaign: Vec<String>,
    #[serde(default = "default_ttl")]
    ttl_ms: u64,
}

fn default_ttl() -> u64 {
    3000
}

struct Election {
    node: String,
    settings: Settings,
}

fn lease(role: &str) -> Result<Option<Lease>, storage::Error> {
    Ok(storage::get_typed::<Lease>(format!("{LEASE}{role}"))?.map(|(l, _)| l))
}

fn lease_json(role: &str, l: &Lease, now: u64) -> serde_json::Value {
    serde_json::json!({
        "role": role,
        "holder": l.holder,
        "token": l.token,
        "expires_at_ms": l.expires_at_ms,
        "expired": now >= l.expires_at_ms,
    })
}

impl Election {
    fn run(&mut self, cmd: Command) -> Result<Outcome, storage::Error> {
        match cmd {
            Command::Acquire {
                role,
                holder,
                ttl_ms,
                now_ms,
            } => {
                let expires_at_ms = now_ms.saturating_add(ttl_ms);
                match lease(&role)? {
                    Some(l) if l.holder == holder && now_ms < l.expires_at_ms => {
                        let renewed = Lease { expires_at_ms, ..l };
                        storage::put_typed(format!("{LEASE}{role}"), &renewed)?;
                        Ok(Outcome::Granted(renewed))
                    }
                    Some(l) if now_ms < l.expires_at_ms => Ok(Outcome::Held(l)),
                    _ => {
                        let last = storage::get_typed::<u64>(format!("{TOKEN}{role}"))?
                            .map_or(0, |(t, _)| t);
                        let token = last + 1;
                        storage::put_typed(format!("{TOKEN}{role}"), &token)?;
                        let granted = Lease {
                            holder,
                            token,
                            expires_at_ms,
                        };
                        storage::put_typed(format!("{LEASE}{role}"), &granted)?;
                        Ok(Outcome::Granted(granted))
                    }
                }
            }
            Command::Release {
                role,
                holder,
                token,
            } => match lease(&role)? {
                Some(l) if l.holder == holder && l.token == token => {
                    storage::delete(format!("{LEASE}{role}"))?;
                    Ok(Outcome::Released)
                }
                other => Ok(Outcome::NotHolder(other)),
            },
        }
    }

    fn propose(&mut self, cmd: Command) -> Result<Outcome, ConsensusError> {
        consensus::propose(self, &cmd).map(|c| c.output)
    }

    fn campaign(&mut self) {
        let roles = self.settings.campaign.clone();
        for role in roles {
            let cmd = Command::Acquire {
                role: role.clone(),
                holder: self.node.clone(),
                ttl_ms: self.settings.ttl_ms,
                now_ms: timers::now_ms(),
            };
            match self.propose(cmd) {
                Ok(Outcome::Granted(l)) => {
                    plexus_sdk::debug!("holding {}", role; "token" => l.token)
                }
                Ok(_) => {}
                Err(e) => plexus_sdk::warn!("campaign for {} failed: {}", role, e),
            }
        }
        timers::set(
            CAMPAIGN_TIMER,
            (self.settings.ttl_ms / 3).max(MIN_TTL_MS / 2),
        );
    }
}

fn respond(role: &str, outcome: Result<Outcome, ConsensusError>) -> Response {
    let now = timers::now_ms();
    match outcome {
        Ok(Outcome::Granted(l)) => Response::json(200, &lease_json(role, &l, now)),
        Ok(Outcome::Held(l)) => Response::json(409, &lease_json(role, &l, now)),
        Ok(Outcome::Released) => {
            Response::json(200, &serde_json::json!({ "role": role, "released": true }))
        }
        Ok(Outcome::NotHolder(l)) => Response::json(
            409,
            &serde_json::json!({ "error": "not the holder", "current": l.map(|l| lease_json(role, &l, now)) }),
        ),
        Ok(Outcome::Failed(msg)) => Response::error(500, &msg),
        Ok(Outcome::Invalid) => Response::error(500, "entry could not be decoded"),
        Err(e) => e.into(),
    }
}

#[derive(Deserialize)]
struct AcquireBody {
    holder: String,
    #[serde(default = "default_ttl")]
    ttl_ms: u64,
}

#[derive(Deserialize)]
struct ReleaseBody {
    holder: String,
    token: u64,
}

fn role_of(params: &Params) -> Result<String, Response> {
    let role = params.get("role").unwrap_or_default();
    if role.is_empty() || role.len() > 256 {
        return Err(Response::error(400, "role must be 1..=256 bytes"));
    }
    Ok(role.to_string())
}

fn acquire(e: &mut Election, req: &Request, params: &Params) -> http::Result {
    let role = role_of(params)?;
    let body: AcquireBody = req.json()?;
    if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&body.ttl_ms) {
        return Err(Response::error(
            400,
            &format!("ttl_ms must be in {MIN_TTL_MS}..={MAX_TTL_MS}"),
        ));
    }
    if body.holder.is_empty() {
        return Err(Response::error(400, "holder must not be empty"));
    }
    let cmd = Command::Acquire {
        role: role.clone(),
        holder: body.holder,
        ttl_ms: body.ttl_ms,
        now_ms: timers::now_ms(),
    };
    Ok(respond(&role, e.propose(cmd)))
}

fn release(e: &mut Election, req: &Request, params: &Params) -> http::Result {
    let role = role_of(params)?;
    let body: ReleaseBody = req.json()?;
    let cmd = Command::Release {
        role: role.clone(),
        holder: body.holder,
        token: body.token,
    };
    Ok(respond(&role, e.propose(cmd)))
}

fn show(e: &mut Election, _req: &Request, params: &Params) -> http::Result {
    let role = role_of(params)?;
    consensus::read_barrier(e)?;
    match lease(&role)? {
        Some(l) => Ok(Response::json(
            200,
            &lease_json(&role, &l, timers::now_ms()),
        )),
        None => Ok(Response::error(404, "role not held")),
    }
}

fn list(e: &mut Election, _req: &Request, _: &Params) -> http::Result {
    consensus::read_barrier(e)?;
    let now = timers::now_ms();
    let all = storage::scan_all(LEASE)?;
    let leases: Vec<_> = all
        .iter()
        .filter_map(|kv| {
            let role = String::from_utf8_lossy(&kv.key[LEASE.len()..]).into_owned();
            let l: Lease = plexus_sdk::codec::decode(&kv.value.value).ok()?;
            Some(lease_json(&role, &l, now))
        })
        .collect();
    Ok(Response::json(200, &leases))
}

impl Pattern for Election {
    type Output = Outcome;

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&settings.ttl_ms) {
            return Err(format!("ttl_ms must be in {MIN_TTL_MS}..={MAX_TTL_MS}"));
        }
        if !settings.campaign.is_empty() {
            timers::set(CAMPAIGN_TIMER, 0);
        }
        Ok(Election {
            node: ctx.node,
            settings,
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .get("/roles", list)
            .get("/roles/{role}", show)
            .post("/roles/{role}/acquire", acquire)
            .post("/roles/{role}/release", release)
            .handle(self, req)
    }

    fn apply(&mut self, entry: CommittedEntry) -> Outcome {
        match consensus::decode::<Command>(&entry) {
            Ok(cmd) => self
                .run(cmd)
                .unwrap_or_else(|e| Outcome::Failed(e.to_string())),
            Err(_) => Outcome::Invalid,
        }
    }

    fn on_timer(&mut self, id: u64) {
        if id == CAMPAIGN_TIMER {
            self.campaign();
        }
    }
}

export_pattern!(Election);
