//! strangler-fig: moves an application from a legacy backend to new
//! implementations route by route.
//!
//! Every request under the plugin's route goes to the legacy upstream
//! unless a route of the table takes it: a path prefix (a whole segment)
//! and optionally methods, whose new side is a plugin on this node or a
//! service outside the cluster. A route sends `weight` percent of users to
//! the new side; a user is the value of the `cohort_header` (default
//! `x-user-id`), and stays on the new side as the weight grows (its
//! bucket, a hash of user and route, is below the weight). A request
//! without the header is placed at random. With `shadow`, a request that
//! stays on the legacy side is also sent to the new side: the client gets
//! the legacy answer, and the two are compared (status and body) and
//! counted. Every answer says which side gave it in `x-fig-side`.
//!
//! The table is committed through the consensus log: every node switches
//! at the same index, which the table shows, and `rollback` is one entry
//! that puts the previous table back (a second one puts it forward again).
//! The config's `routes` are the table until the first change.
//!
//! Routes of its own, under `/_fig/`: `GET routes`; `PUT routes` with a
//! JSON list of routes, and `POST rollback`, both with `authorization:
//! Bearer <admin_token>` (refused when the config has no `admin_token`);
//! `GET status`: per route, requests to each side, the share that went
//! new, shadow comparisons and mismatches, and the last mismatches.

use std::collections::{BTreeMap, HashMap, VecDeque};

use plexus_sdk::consensus::{self, Committed, Rejected};
use plexus_sdk::http::OutgoingRequest;
use plexus_sdk::{
    InitContext, Pattern, Reply, Request, RequestSource, Response, export_pattern, http, plugins,
    storage,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub mod table;

use table::{Route, Table, Target};

/// The plugin's config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The legacy upstream, `http://host:port`.
    legacy: String,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default = "default_header")]
    cohort_header: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u32,
    admin_token: Option<String>,
}

fn default_header() -> String {
    "x-user-id".into()
}

fn default_timeout() -> u32 {
    5000
}

/// A command of the log. Add variants at the end.
#[derive(Serialize, Deserialize)]
pub enum Command {
    Routes(Vec<Route>),
    Rollback,
}

/// What one route (or the legacy default, `""`) has seen on this node.
#[derive(Serialize, Deserialize, Default, Clone)]
struct Counts {
    legacy: u64,
    new: u64,
    errors: u64,
    shadowed: u64,
    mismatched: u64,
}

/// A shadowed request whose two answers are not both in yet.
struct Shadowed {
    prefix: String,
    path: String,
    legacy: Option<(u16, Vec<u8>)>,
    new: Option<(u16, Vec<u8>)>,
}

pub struct Fig {
    legacy: String,
    cohort_header: String,
    timeout_ms: u32,
    admin_token: Option<String>,
    table: Table,
    counts: BTreeMap<String, Counts>,
    shadows: HashMap<u64, Shadowed>,
    mismatches: VecDeque<serde_json::Value>,
    /// Numbers requests (shadow pairs, and users without a header).
    seq: u64,
}

fn with_side(mut r: Response, side: &str) -> Response {
    r.headers = plexus_sdk::http::end_to_end(&r.headers);
    r.with_header("x-fig-side", side)
}

/// The table as stored; the config's routes before the first change.
fn stored_table() -> Result<Option<Table>, storage::Error> {
    Ok(storage::get_typed::<Table>("table")?.map(|(t, _)| t))
}

impl Fig {
    fn count(&mut self, prefix: &str) -> &mut Counts {
        self.counts.entry(prefix.to_string()).or_default()
    }

    fn authorized(&self, req: &Request) -> Result<(), Response> {
        let Some(token) = &self.admin_token else {
            return Err(Response::error(
                403,
                "set admin_token in the config to change routes",
            ));
        };
        let given = req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return Err(Response::error(401, "a bearer token is needed"));
        }
        Ok(())
    }

    fn url(&self, base: &str, req: &Request) -> String {
        let mut url = format!("{}{}", base.trim_end_matches('/'), req.path);
        if !req.query.is_empty() {
            url.push('?');
            url.push_str(&req.query);
        }
        url
    }

    /// Sends `req` to the legacy upstream; `then` gets the answer.
    fn send_legacy(
        &mut self,
        req: &Request,
        then: impl FnOnce(&mut Fig, Response) -> Response + 'static,
    ) -> Reply {
        let out = OutgoingRequest {
            method: req.method,
            url: self.url(&self.legacy.clone(), req),
            headers: plexus_sdk::http::end_to_end(&req.headers),
            body: req.body.clone(),
        };
        let sent = http::fetch(self, out, self.timeout_ms, move |p: &mut Fig, r| {
            then(p, r.unwrap_or_else(Response::from))
        });
        match sent {
            Ok(pending) => pending.into(),
            Err(e) => Response::from(e).into(),
        }
    }

    /// Sends `req` to a route's new side; `then` gets the answer.
    fn send_new(
        &mut self,
        target: &Target,
        req: &Request,
        then: impl FnOnce(&mut Fig, Response) -> Response + 'static,
    ) -> Reply {
        match target {
            Target::Url(base) => {
                let out = OutgoingRequest {
                    method: req.method,
                    url: self.url(base, req),
                    headers: plexus_sdk::http::end_to_end(&req.headers),
                    body: req.body.clone(),
                };
                match http::fetch(self, out, self.timeout_ms, move |p: &mut Fig, r| {
                    then(p, r.unwrap_or_else(Response::from))
                }) {
                    Ok(pending) => pending.into(),
                    Err(e) => Response::from(e).into(),
                }
            }
            Target::Plugin(name) => {
                let call = Request {
                    source: RequestSource::Client,
                    ..req.clone()
                };
                match plugins::call(
                    self,
                    name,
                    None,
                    call,
                    self.timeout_ms,
                    move |p: &mut Fig, r| {
                        then(
                            p,
                            r.unwrap_or_else(|e| Response::error(502, &format!("plugin: {e:?}"))),
                        )
                    },
                ) {
                    Ok(pending) => pending.into(),
                    Err(e) => Response::error(502, &format!("plugin {name}: {e:?}")).into(),
                }
            }
        }
    }

    /// Records one half of a shadowed pair; compares once both are in.
    fn shadow_half(&mut self, id: u64, legacy: bool, status: u16, body: Vec<u8>) {
        let Some(s) = self.shadows.get_mut(&id) else {
            return;
        };
        if legacy {
            s.legacy = Some((status, body));
        } else {
            s.new = Some((status, body));
        }
        if s.legacy.is_none() || s.new.is_none() {
            return;
        }
        let s = self.shadows.remove(&id).expect("present");
        let (l, n) = (s.legacy.unwrap_or_default(), s.new.unwrap_or_default());
        let c = self.count(&s.prefix);
        c.shadowed += 1;
        if l != n {
            c.mismatched += 1;
            if self.mismatches.len() == 20 {
                self.mismatches.pop_front();
            }
            self.mismatches.push_back(json!({
                "route": s.prefix,
                "path": s.path,
                "legacy_status": l.0,
                "new_status": n.0,
                "bodies_differ": l.1 != n.1,
            }));
        }
    }

    fn pass(&mut self, req: Request) -> Reply {
        let Some(route) = self.table.route(req.method.as_str(), &req.path).cloned() else {
            self.count("").legacy += 1;
            return self.send_legacy(&req, |p, r| {
                if r.status >= 500 {
                    p.count("").errors += 1;
                }
                with_side(r, "legacy")
            });
        };
        self.seq += 1;
        let user = req
            .header(&self.cohort_header)
            .map(str::to_string)
            .unwrap_or_else(|| format!("#{}", self.seq));
        let prefix = route.prefix.clone();
        if route.is_new(&user) {
            self.count(&prefix).new += 1;
            return self.send_new(&route.new, &req, move |p, r| {
                if r.status >= 500 {
                    p.count(&prefix).errors += 1;
                }
                with_side(r, "new")
            });
        }
        self.count(&prefix).legacy += 1;
        if !route.shadow {
            return self.send_legacy(&req, move |p, r| {
                if r.status >= 500 {
                    p.count(&prefix).errors += 1;
                }
                with_side(r, "legacy")
            });
        }
        let id = self.seq;
        self.shadows.insert(
            id,
            Shadowed {
                prefix: prefix.clone(),
                path: req.path.clone(),
                legacy: None,
                new: None,
            },
        );
        // The copy: its answer is compared, never sent.
        let copy = self.send_new(&route.new, &req, move |p, r| {
            p.shadow_half(id, false, r.status, r.body);
            Response::new(204, "text/plain", Vec::new())
        });
        if let Reply::Done(r) = copy {
            self.shadow_half(id, false, r.status, r.body);
        }
        let answer = self.send_legacy(&req, move |p, r| {
            if r.status >= 500 {
                p.count(&prefix).errors += 1;
            }
            p.shadow_half(id, true, r.status, r.body.clone());
            with_side(r, "legacy")
        });
        if let Reply::Done(r) = &answer {
            self.shadow_half(id, true, r.status, r.body.clone());
        }
        answer
    }

    fn status(&self) -> Response {
        let routes: BTreeMap<&str, serde_json::Value> = self
            .counts
            .iter()
            .map(|(prefix, c)| {
                let total = c.legacy + c.new;
                let share = if total == 0 {
                    0.0
                } else {
                    c.new as f64 / total as f64
                };
                let name = if prefix.is_empty() {
                    "(no route)"
                } else {
                    prefix.as_str()
                };
                (
                    name,
                    json!({
                        "legacy": c.legacy,
                        "new": c.new,
                        "new_share": share,
                        "errors": c.errors,
                        "shadowed": c.shadowed,
                        "mismatched": c.mismatched,
                    }),
                )
            })
            .collect();
        Response::json(
            200,
            &json!({
                "table": { "version": self.table.version, "index": self.table.index },
                "routes": routes,
                "last_mismatches": self.mismatches,
            }),
        )
    }
}

impl Pattern for Fig {
    type Command = Command;
    type Output = Table;

    fn init(ctx: InitContext) -> Result<Self, String> {
        let s: Settings = ctx.config()?;
        if !s.legacy.starts_with("http://") {
            return Err("config.legacy: an http:// URL".into());
        }
        for r in &s.routes {
            r.check().map_err(|e| format!("config.routes: {e}"))?;
        }
        let table = stored_table()
            .map_err(|e| format!("{e:?}"))?
            .unwrap_or(Table {
                version: 0,
                index: 0,
                routes: s.routes,
            });
        Ok(Fig {
            legacy: s.legacy,
            cohort_header: s.cohort_header.to_ascii_lowercase(),
            timeout_ms: s.timeout_ms,
            admin_token: s.admin_token,
            table,
            counts: BTreeMap::new(),
            shadows: HashMap::new(),
            mismatches: VecDeque::new(),
            seq: 0,
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        let own = |p: &str| req.path == format!("/_fig/{p}");
        if own("routes") && req.method.as_str() == "GET" {
            return Response::json(200, &self.table).into();
        }
        if own("status") {
            return self.status().into();
        }
        if own("routes") || own("rollback") {
            if let Err(r) = self.authorized(&req) {
                return r.into();
            }
            let cmd = if own("rollback") {
                Command::Rollback
            } else {
                let routes: Vec<Route> = match req.json() {
                    Ok(r) => r,
                    Err(r) => return r.into(),
                };
                if let Some(e) = routes.iter().find_map(|r| r.check().err()) {
                    return Response::error(400, &e).into();
                }
                Command::Routes(routes)
            };
            let sent = consensus::submit(self, &cmd, |_: &mut Fig, done: Committed<Table>| {
                Response::json(200, &done.output)
            });
            return match sent {
                Ok(pending) => pending.into(),
                Err(e) => Response::from(e).into(),
            };
        }
        self.pass(req)
    }

    fn apply(&mut self, index: u64, cmd: Command) -> Result<Table, Rejected> {
        let current = self.table.clone();
        let next = match cmd {
            Command::Routes(routes) => Table {
                version: current.version + 1,
                index,
                routes,
            },
            Command::Rollback => {
                let Some((previous, _)) = storage::get_typed::<Table>("previous")? else {
                    return Err(Rejected::new(409, "no previous table to go back to"));
                };
                Table {
                    version: current.version + 1,
                    index,
                    routes: previous.routes,
                }
            }
        };
        storage::put_typed("previous", &current)?;
        storage::put_typed("table", &next)?;
        self.table = next.clone();
        Ok(next)
    }

    fn answer_inherited(&mut self, done: Committed<Table>) -> Option<Response> {
        Some(Response::json(200, &done.output))
    }

    fn snapshot(&mut self) -> Vec<u8> {
        serde_json::to_vec(&self.counts).unwrap_or_default()
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        if !state.is_empty() {
            self.counts = serde_json::from_slice(&state).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

export_pattern!(Fig);

#[cfg(test)]
mod tests;
