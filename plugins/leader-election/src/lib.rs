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

use plexus_sdk::consensus::{self, ProposeError, Rejected};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::{InitContext, Pattern, Reply, Request, Response, export_pattern, storage, timers};
use serde::{Deserialize, Serialize};
use serde_json::json;

const LEASE: &str = "lease/";
const TOKEN: &str = "token/";
const CAMPAIGN_TIMER: u64 = 1;
const MIN_TTL_MS: u64 = 100;
const MAX_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// An entry of the log. Encoded field by field, so `Claim` and `Held`
/// keep the layout of the flat fields earlier versions wrote.
#[derive(Serialize, Deserialize)]
enum Command {
    Acquire {
        role: String,
        claim: Claim,
        now_ms: u64,
    },
    Release {
        role: String,
        held: Held,
    },
}

/// A request for a role: `{"holder", "ttl_ms"}`.
#[derive(Serialize, Deserialize)]
struct Claim {
    holder: String,
    #[serde(default = "default_ttl")]
    ttl_ms: u64,
}

/// A role given back: `{"holder", "token"}`.
#[derive(Serialize, Deserialize)]
struct Held {
    holder: String,
    token: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Lease {
    holder: String,
    token: u64,
    expires_at_ms: u64,
}

/// A lease as clients see it.
#[derive(Serialize)]
struct View<'a> {
    role: &'a str,
    #[serde(flatten)]
    lease: &'a Lease,
    expired: bool,
}

fn view<'a>(role: &'a str, lease: &'a Lease, now: u64) -> View<'a> {
    let expired = now >= lease.expires_at_ms;
    View {
        role,
        lease,
        expired,
    }
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

fn check_ttl(ttl_ms: u64) -> Result<(), String> {
    match (MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
        true => Ok(()),
        false => Err(format!("ttl_ms must be in {MIN_TTL_MS}..={MAX_TTL_MS}")),
    }
}

struct Election {
    node: String,
    settings: Settings,
}

fn lease(role: &str) -> Result<Option<Lease>, storage::Error> {
    Ok(storage::get_typed::<Lease>(format!("{LEASE}{role}"))?.map(|(l, _)| l))
}

/// Grants the role to the claimant if it is free, expired or already
/// theirs; a new holder gets a token above every earlier one.
fn acquire(role: &str, claim: Claim, now: u64) -> Result<Lease, Rejected> {
    let expires_at_ms = now.saturating_add(claim.ttl_ms);
    let granted = match lease(role)? {
        Some(l) if now < l.expires_at_ms && l.holder != claim.holder => {
            return Err(Rejected::json(409, &view(role, &l, now)));
        }
        Some(l) if now < l.expires_at_ms => Lease { expires_at_ms, ..l },
        _ => {
            let key = format!("{TOKEN}{role}");
            let token = storage::get_typed::<u64>(&key)?.map_or(0, |(t, _)| t) + 1;
            storage::put_typed(key, &token)?;
            Lease {
                holder: claim.holder,
                token,
                expires_at_ms,
            }
        }
    };
    storage::put_typed(format!("{LEASE}{role}"), &granted)?;
    Ok(granted)
}

/// Frees the role if `held` names its current holder and token.
fn release(role: &str, held: Held) -> Result<Option<Lease>, Rejected> {
    match lease(role)? {
        Some(l) if l.holder == held.holder && l.token == held.token => {
            storage::delete(format!("{LEASE}{role}"))?;
            Ok(None)
        }
        other => {
            let current = other.as_ref().map(|l| view(role, l, timers::now_ms()));
            Err(Rejected::json(
                409,
                &json!({ "error": "not the holder", "current": current }),
            ))
        }
    }
}

impl Election {
    fn campaign(&mut self) {
        for role in self.settings.campaign.clone() {
            let claim = Claim {
                holder: self.node.clone(),
                ttl_ms: self.settings.ttl_ms,
            };
            let cmd = Command::Acquire {
                role: role.clone(),
                claim,
                now_ms: timers::now_ms(),
            };
            match consensus::propose(self, &cmd) {
                Ok(done) => plexus_sdk::debug!("holding {}", role; "index" => done.index),
                Err(ProposeError::Rejected(_)) => {}
                Err(e) => plexus_sdk::warn!("campaign for {} failed: {}", role, e),
            }
        }
        timers::set(
            CAMPAIGN_TIMER,
            (self.settings.ttl_ms / 3).max(MIN_TTL_MS / 2),
        );
    }
}

/// Proposes `cmd` and answers with the lease granted, or that it was released.
fn decide(e: &mut Election, role: &str, cmd: Command) -> http::Result {
    Ok(match consensus::propose(e, &cmd)?.output {
        Some(l) => Response::json(200, &view(role, &l, timers::now_ms())),
        None => Response::json(200, &json!({ "role": role, "released": true })),
    })
}

fn post_acquire(e: &mut Election, req: &Request, params: &Params) -> http::Result {
    let role = params.text("role", 256)?;
    let claim: Claim = req.json()?;
    check_ttl(claim.ttl_ms).map_err(|why| Response::error(400, &why))?;
    if claim.holder.is_empty() {
        return Err(Response::error(400, "holder must not be empty"));
    }
    let now_ms = timers::now_ms();
    decide(
        e,
        &role,
        Command::Acquire {
            role: role.clone(),
            claim,
            now_ms,
        },
    )
}

fn post_release(e: &mut Election, req: &Request, params: &Params) -> http::Result {
    let role = params.text("role", 256)?;
    let held: Held = req.json()?;
    decide(
        e,
        &role,
        Command::Release {
            role: role.clone(),
            held,
        },
    )
}

fn show(e: &mut Election, _req: &Request, params: &Params) -> http::Result {
    let role = params.text("role", 256)?;
    consensus::read_barrier(e)?;
    Ok(match lease(&role)? {
        Some(l) => Response::json(200, &view(&role, &l, timers::now_ms())),
        None => Response::error(404, "role not held"),
    })
}

fn list(e: &mut Election, _req: &Request, _: &Params) -> http::Result {
    consensus::read_barrier(e)?;
    let now = timers::now_ms();
    let all = storage::scan_all(LEASE)?;
    let leases: Vec<_> = all
        .iter()
        .filter_map(|kv| {
            let role = std::str::from_utf8(&kv.key[LEASE.len()..]).ok()?;
            let l: Lease = plexus_sdk::codec::decode(&kv.value.value).ok()?;
            serde_json::to_value(view(role, &l, now)).ok()
        })
        .collect();
    Ok(Response::json(200, &leases))
}

impl Pattern for Election {
    type Command = Command;
    /// The lease granted, or `None` when the role was released.
    type Output = Option<Lease>;

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        check_ttl(settings.ttl_ms)?;
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
            .post("/roles/{role}/acquire", post_acquire)
            .post("/roles/{role}/release", post_release)
            .handle(self, req)
    }

    fn apply(&mut self, _index: u64, cmd: Command) -> Result<Option<Lease>, Rejected> {
        match cmd {
            Command::Acquire {
                role,
                claim,
                now_ms,
            } => acquire(&role, claim, now_ms).map(Some),
            Command::Release { role, held } => release(&role, held),
        }
    }

    fn on_timer(&mut self, id: u64) {
        if id == CAMPAIGN_TIMER {
            self.campaign();
        }
    }
}

export_pattern!(Election);

#[cfg(test)]
mod tests;
