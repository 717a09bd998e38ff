//! http-proxy: passes every request under its route to one upstream
//! service over outbound HTTP and answers with the upstream's response.
//! The plugin never waits: each request is one call in flight, answered
//! when the upstream's response arrives, so one instance carries as many
//! requests at once as `limits.max_calls_in_flight` allows.
//!
//! Config: `upstream = "http://HOST:PORT"` (its origin must be in
//! `allowed_outbound_hosts`), `timeout_ms = 5000`.
//!
//! `GET /_proxy/stats` is answered by the plugin itself: requests passed,
//! answered, and failed by kind. Every other path, with its query, method,
//! headers and body, goes to the upstream. A failure is answered as the
//! SDK maps it, with a JSON `{"error", "kind"}`: 502 when the upstream
//! surely did not handle the request (refused, response too large), 504
//! when it may have (no response in time, connection lost).

use plexus_sdk::http::{FetchError, OutgoingRequest};
use plexus_sdk::{InitContext, Pattern, Reply, Request, Response, export_pattern, http};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    upstream: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u32,
}

fn default_timeout() -> u32 {
    5000
}

#[derive(Default, serde::Serialize, Deserialize)]
struct Stats {
    passed: u64,
    answered: u64,
    unknown_outcome: u64,
    failed: u64,
}

struct Proxy {
    upstream: String,
    timeout_ms: u32,
    stats: Stats,
}

impl Pattern for Proxy {
    type Command = ();
    type Output = ();

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        Ok(Proxy {
            upstream: settings.upstream.trim_end_matches('/').to_string(),
            timeout_ms: settings.timeout_ms,
            stats: Stats::default(),
        })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        if req.path == "/_proxy/stats" {
            return Response::json(200, &self.stats).into();
        }
        let mut url = format!("{}{}", self.upstream, req.path);
        if !req.query.is_empty() {
            url.push('?');
            url.push_str(&req.query);
        }
        let out = OutgoingRequest {
            method: req.method,
            url,
            headers: plexus_sdk::http::end_to_end(&req.headers),
            body: req.body,
        };
        self.stats.passed += 1;
        let sent = http::fetch(
            self,
            out,
            self.timeout_ms,
            |this: &mut Proxy, result| match result {
                Ok(mut response) => {
                    this.stats.answered += 1;
                    response.headers = plexus_sdk::http::end_to_end(&response.headers);
                    response
                }
                Err(e) => {
                    match e {
                        FetchError::Timeout | FetchError::Broken(_) => {
                            this.stats.unknown_outcome += 1
                        }
                        _ => this.stats.failed += 1,
                    }
                    e.into()
                }
            },
        );
        match sent {
            Ok(pending) => pending.into(),
            Err(e) => {
                self.stats.failed += 1;
                Response::from(e).into()
            }
        }
    }

    fn snapshot(&mut self) -> Vec<u8> {
        serde_json::to_vec(&self.stats).unwrap_or_default()
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        if !state.is_empty() {
            self.stats = serde_json::from_slice(&state).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

export_pattern!(Proxy);

#[cfg(test)]
mod tests;
