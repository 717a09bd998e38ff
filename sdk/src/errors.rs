//! Every host error as an HTTP response, in one place: a handler returning
//! [`crate::http::Result`] can use `?` on any host call.
//!
//! | error | status |
//! |---|---|
//! | consensus `not-leader` | 421 (the leader, if known, in `x-leader`) |
//! | any `too-large` | 413 |
//! | consensus `timeout` / `shutting-down`, call `timeout`, fetch `timeout` / `broken` | 504: the outcome is unknown |
//! | storage `version-mismatch` | 409 (the current version in `x-version`) |
//! | call `busy` | 503 |
//! | a peer, plugin or service that failed or could not be reached | 502 |
//! | a capability not granted, a call not allowed | 500: the plugin's configuration |
//! | storage or log I/O | 503 |
//!
//! The body is `{"error": message, "kind": kind}`.

use crate::Response;
use crate::consensus::Error as Consensus;
use crate::http::FetchError;
use crate::messaging::Error as Messaging;
use crate::plugins::Error as Plugins;
use crate::storage::Error as Storage;

fn error(status: u16, kind: &str, message: impl std::fmt::Display) -> Response {
    Response::json(
        status,
        &serde_json::json!({ "error": message.to_string(), "kind": kind }),
    )
}

impl From<Consensus> for Response {
    fn from(e: Consensus) -> Response {
        match e {
            Consensus::NotLeader(leader) => {
                let r = error(
                    421,
                    "not-leader",
                    "this node is not the leader and could not forward",
                );
                match leader {
                    Some(l) => r.with_header("x-leader", &l),
                    None => r,
                }
            }
            Consensus::TooLarge(max) => {
                error(413, "too-large", format!("entry larger than {max} bytes"))
            }
            Consensus::Timeout => error(
                504,
                "timeout",
                "outcome unknown: no quorum before the deadline",
            ),
            Consensus::ShuttingDown => error(
                504,
                "shutting-down",
                "outcome unknown: the node is stopping",
            ),
            Consensus::AccessDenied => error(
                500,
                "access-denied",
                "the plugin is not granted `consensus` here",
            ),
            Consensus::Storage(why) => error(503, "storage", format!("log store failed: {why}")),
        }
    }
}

impl From<Storage> for Response {
    fn from(e: Storage) -> Response {
        match e {
            Storage::TooLarge(max) => error(
                413,
                "too-large",
                format!("key or value larger than {max} bytes"),
            ),
            Storage::VersionMismatch(current) => {
                let r = error(
                    409,
                    "version-mismatch",
                    format!("the current version is {}", current.unwrap_or(0)),
                );
                r.with_header("x-version", &current.unwrap_or(0).to_string())
            }
            Storage::AccessDenied => {
                error(500, "access-denied", "the plugin is not granted `storage`")
            }
            Storage::Io(why) => error(503, "io", format!("storage failed: {why}")),
        }
    }
}

impl From<Messaging> for Response {
    fn from(e: Messaging) -> Response {
        match e {
            Messaging::TooLarge(max) => {
                error(413, "too-large", format!("message larger than {max} bytes"))
            }
            Messaging::UnknownNode(node) => error(
                502,
                "unknown-node",
                format!("`{node}` is not a reachable member"),
            ),
            Messaging::NoHandler => error(
                502,
                "no-handler",
                "the receiver does not run this plugin, or it failed",
            ),
            Messaging::Timeout => error(504, "timeout", "outcome unknown: no reply in time"),
            Messaging::Loopback => error(500, "loopback", "a blocking request to this node itself"),
            Messaging::AccessDenied => error(
                500,
                "access-denied",
                "the plugin is not granted `messaging`",
            ),
            Messaging::Busy(max) => error(503, "busy", format!("{max} calls already in flight")),
        }
    }
}

impl From<Plugins> for Response {
    fn from(e: Plugins) -> Response {
        match e {
            Plugins::NotAllowed(p) => error(
                500,
                "not-allowed",
                format!("`{p}` is not in allowed_plugins"),
            ),
            Plugins::NoSuchPlugin(p) => {
                error(502, "no-such-plugin", format!("no plugin `{p}` runs there"))
            }
            Plugins::UnknownNode(n) => error(
                502,
                "unknown-node",
                format!("`{n}` is not a reachable member"),
            ),
            Plugins::Failed(why) => error(502, "failed", why),
            Plugins::TooLarge(max) => {
                error(413, "too-large", format!("request larger than {max} bytes"))
            }
            Plugins::Timeout => error(504, "timeout", "outcome unknown: no answer in time"),
            Plugins::Busy(max) => error(503, "busy", format!("{max} calls already in flight")),
        }
    }
}

impl From<FetchError> for Response {
    fn from(e: FetchError) -> Response {
        match e {
            FetchError::NotAllowed(origin) => error(
                500,
                "not-allowed",
                format!("{origin} is not in allowed_outbound_hosts"),
            ),
            FetchError::InvalidRequest(why) => error(500, "invalid-request", why),
            FetchError::Connect(why) => error(502, "connect", why),
            FetchError::Timeout => error(504, "timeout", "outcome unknown: no response in time"),
            FetchError::Broken(why) => error(504, "broken", format!("outcome unknown: {why}")),
            FetchError::TooLarge(max) => error(
                502,
                "too-large",
                format!("response larger than {max} bytes"),
            ),
            FetchError::Busy(max) => error(503, "busy", format!("{max} calls already in flight")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: &Response) -> serde_json::Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn unknown_outcomes_are_504_and_definite_failures_are_not() {
        for r in [
            Response::from(Consensus::Timeout),
            Response::from(Messaging::Timeout),
            Response::from(Plugins::Timeout),
            Response::from(FetchError::Broken("reset".into())),
        ] {
            assert_eq!(r.status, 504, "{}", body(&r));
            assert!(
                body(&r)["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("outcome unknown")
            );
        }
        assert_eq!(
            Response::from(FetchError::Connect("refused".into())).status,
            502
        );
        assert_eq!(Response::from(Messaging::NoHandler).status, 502);
    }

    #[test]
    fn the_leader_and_the_current_version_travel_in_headers() {
        let r = Response::from(Consensus::NotLeader(Some("n2".into())));
        assert_eq!((r.status, header(&r, "x-leader")), (421, Some("n2")));
        let r = Response::from(Storage::VersionMismatch(Some(7)));
        assert_eq!((r.status, header(&r, "x-version")), (409, Some("7")));
        assert_eq!(body(&r)["kind"], "version-mismatch");
    }
}
