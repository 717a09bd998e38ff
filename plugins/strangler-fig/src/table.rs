//! The route table: which requests go to the new side, and how a user
//! is put in a cohort that stays put as a route's weight grows.

use serde::{Deserialize, Serialize};

/// Where the new side of a route is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// A plugin on this node, called with the request as it came.
    Plugin(String),
    /// A service outside the cluster (its origin in
    /// `allowed_outbound_hosts`): the request's path and query are added.
    Url(String),
}

/// One route: requests under `prefix` (and of `methods`, if listed) go
/// to the new side for `weight` percent of users; with `shadow`, those
/// that stay on the legacy side are also sent to the new side, whose
/// answer is compared and dropped.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub prefix: String,
    #[serde(default)]
    pub methods: Vec<String>,
    pub new: Target,
    #[serde(default)]
    pub weight: f64,
    #[serde(default)]
    pub shadow: bool,
}

/// The table as committed: its version and the log index it took effect
/// at (the same on every node).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Table {
    pub version: u64,
    pub index: u64,
    pub routes: Vec<Route>,
}

impl Route {
    /// Refuses a route that cannot work, naming it.
    pub fn check(&self) -> Result<(), String> {
        if !self.prefix.starts_with('/') {
            return Err(format!("route `{}`: a prefix starts with /", self.prefix));
        }
        if !(0.0..=100.0).contains(&self.weight) {
            return Err(format!(
                "route `{}`: weight is a percentage, 0 to 100",
                self.prefix
            ));
        }
        match &self.new {
            Target::Url(u) if !u.starts_with("http://") => {
                return Err(format!(
                    "route `{}`: new.url is an http:// URL",
                    self.prefix
                ));
            }
            Target::Plugin(p) if p.is_empty() => {
                return Err(format!(
                    "route `{}`: new.plugin names a plugin",
                    self.prefix
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether the route takes a request for `path` with `method`: the
    /// prefix is the path or a whole-segment start of it.
    pub fn takes(&self, method: &str, path: &str) -> bool {
        let under = path == self.prefix
            || (path.starts_with(&self.prefix)
                && (self.prefix.ends_with('/') || path.as_bytes()[self.prefix.len()] == b'/'));
        under
            && (self.methods.is_empty()
                || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
    }

    /// Whether `user` is in the route's new cohort: its bucket (0 to
    /// 9999, fixed per user and route) is below the weight, so a user
    /// moved to the new side stays there as the weight grows.
    pub fn is_new(&self, user: &str) -> bool {
        (bucket(&self.prefix, user) as f64) < self.weight * 100.0
    }
}

impl Table {
    /// The route a request goes by: the longest prefix that takes it.
    pub fn route(&self, method: &str, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.takes(method, path))
            .max_by_key(|r| r.prefix.len())
    }
}

/// A user's bucket on a route: FNV-1a of both, mixed, modulo 10,000.
pub fn bucket(prefix: &str, user: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prefix.bytes().chain([0]).chain(user.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h % 10_000
}
