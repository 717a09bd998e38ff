//! What a config must satisfy beyond its types: ranges, names, and the
//! rules a plugin entry shares with the admin API.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::{Config, LimitsEntry, PluginEntry};
use crate::runtime::Capability;

impl Config {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.version != 1 {
            return Err((
                "version".into(),
                format!(
                    "unsupported config version {}; this node reads version 1",
                    self.version
                ),
            ));
        }
        check_name(&self.node.id).map_err(|m| ("node.id".to_string(), m))?;
        if self.node.request_timeout_ms == 0 || self.node.request_timeout_ms > 600_000 {
            return Err((
                "node.request_timeout_ms".into(),
                "must be in 1..=600000".into(),
            ));
        }
        for (key, value) in [
            (
                "node.header_read_timeout_ms",
                self.node.header_read_timeout_ms,
            ),
            ("node.body_read_timeout_ms", self.node.body_read_timeout_ms),
        ] {
            if !(100..=600_000).contains(&value) {
                return Err((key.into(), "must be in 100..=600000".into()));
            }
        }
        if !(1..=1_000_000).contains(&self.node.max_connections) {
            return Err((
                "node.max_connections".into(),
                "must be in 1..=1000000".into(),
            ));
        }
        if self
            .node
            .max_connections_per_client
            .is_some_and(|n| !(1..=self.node.max_connections).contains(&n))
        {
            return Err((
                "node.max_connections_per_client".into(),
                "must be in 1..=node.max_connections".into(),
            ));
        }
        if !(1..=16_384).contains(&self.node.max_plugin_instances) {
            return Err((
                "node.max_plugin_instances".into(),
                "must be in 1..=16384".into(),
            ));
        }
        if self.node.max_body_bytes == 0 || self.node.max_body_bytes > 256 << 20 {
            return Err((
                "node.max_body_bytes".into(),
                "must be in 1..=268435456".into(),
            ));
        }
        if self.cluster.secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(("cluster.secret".into(), "must be at least 16 bytes".into()));
        }
        for (i, s) in self.cluster.previous_secrets.iter().enumerate() {
            if s.len() < 16 {
                return Err((
                    format!("cluster.previous_secrets[{i}]"),
                    "must be at least 16 bytes".into(),
                ));
            }
        }
        for (i, peer) in self.cluster.peers.iter().enumerate() {
            let ok = peer.split_once('@').is_some_and(|(id, addr)| {
                check_name(id).is_ok() && addr.parse::<SocketAddr>().is_ok()
            });
            if !ok {
                return Err((
                    format!("cluster.peers[{i}]"),
                    format!("`{peer}` is not of the form id@host:port"),
                ));
            }
        }
        if self.cluster.join && self.cluster.peers.is_empty() {
            return Err((
                "cluster.join".into(),
                "needs cluster.peers: the members to reach".into(),
            ));
        }
        if !self.cluster.peers.is_empty() {
            // Other members dial the address recorded for this node in the
            // Raft membership, which is `listen`.
            if self.cluster.listen.is_some_and(|a| a.ip().is_unspecified()) {
                return Err((
                    "cluster.listen".into(),
                    "must be an address the other members can reach, not a wildcard".into(),
                ));
            }
            if self.cluster.listen.is_none() {
                return Err((
                    "cluster.listen".into(),
                    "required when cluster.peers is set".into(),
                ));
            }
            if self.cluster.secret.is_none() {
                return Err((
                    "cluster.secret".into(),
                    "required when cluster.peers is set".into(),
                ));
            }
            if self
                .cluster
                .peers
                .iter()
                .any(|p| p.split_once('@').is_some_and(|(id, _)| id == self.node.id))
            {
                return Err((
                    "cluster.peers".into(),
                    "must not list this node itself".into(),
                ));
            }
        }
        if !(10..=10_000_000).contains(&self.cluster.snapshot_every) {
            return Err((
                "cluster.snapshot_every".into(),
                "must be in 10..=10000000".into(),
            ));
        }
        let [low, high] = self.cluster.election_timeout_ms;
        if !(10..=60_000).contains(&self.cluster.heartbeat_ms) {
            return Err((
                "cluster.heartbeat_ms".into(),
                "must be in 10..=60000".into(),
            ));
        }
        if low <= self.cluster.heartbeat_ms * 2 || high <= low || high > 600_000 {
            return Err((
                "cluster.election_timeout_ms".into(),
                "must be [min, max] with heartbeat_ms * 2 < min < max <= 600000".into(),
            ));
        }
        if self.admin.token.as_ref().is_some_and(|t| t.len() < 8) {
            return Err(("admin.token".into(), "must be at least 8 bytes".into()));
        }
        let mut seen = BTreeSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            let at = |k: &str| format!("plugins[{i}].{k}");
            check_name(&p.name).map_err(|m| (at("name"), m))?;
            if !seen.insert(p.name.as_str()) {
                return Err((at("name"), format!("plugin `{}` is listed twice", p.name)));
            }
            p.validate().map_err(|(k, m)| (at(&k), m))?;
        }
        Ok(())
    }
}

impl PluginEntry {
    /// Checks one plugin entry, from the config file or from the admin
    /// API: the same rules, the key named relative to the entry
    /// (`limits.mailbox`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        check_name(&self.name).map_err(|m| ("name".to_string(), m))?;
        if self.component.is_empty() {
            return Err(("component".into(), "must not be empty".into()));
        }
        for (i, name) in self.allowed_plugins.iter().enumerate() {
            check_name(name).map_err(|m| (format!("allowed_plugins[{i}]"), m))?;
        }
        for (i, origin) in self.allowed_outbound_hosts.iter().enumerate() {
            origin
                .parse::<crate::primitives::outbound::Origin>()
                .map_err(|m| (format!("allowed_outbound_hosts[{i}]"), m))?;
        }
        for (listed, key, cap) in [
            (
                !self.allowed_plugins.is_empty(),
                "allowed_plugins",
                Capability::Plugins,
            ),
            (
                !self.allowed_outbound_hosts.is_empty(),
                "allowed_outbound_hosts",
                Capability::OutboundHttp,
            ),
        ] {
            if listed && !self.capabilities.contains(&cap) {
                return Err((
                    key.into(),
                    format!(
                        "lists whom the plugin may call, but it is not granted `{cap}`: add \"{cap}\" to its capabilities"
                    ),
                ));
            }
        }
        self.limits.validate()
    }
}

impl LimitsEntry {
    /// Checks the limits' ranges; the key is named `limits.FIELD`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(1..=1024).contains(&self.memory_mib) {
            return Err(("limits.memory_mib".into(), "must be in 1..=1024".into()));
        }
        if !(1..=60_000).contains(&self.cpu_ms) {
            return Err(("limits.cpu_ms".into(), "must be in 1..=60000".into()));
        }
        if !(1..=65_536).contains(&self.mailbox) {
            return Err(("limits.mailbox".into(), "must be in 1..=65536".into()));
        }
        if !(1..=65_536).contains(&self.max_calls_in_flight) {
            return Err((
                "limits.max_calls_in_flight".into(),
                "must be in 1..=65536".into(),
            ));
        }
        if !(1..=64 << 20).contains(&self.max_response_bytes) {
            return Err((
                "limits.max_response_bytes".into(),
                "must be in 1..=67108864".into(),
            ));
        }
        Ok(())
    }
}

/// Checks a node or plugin name: `[a-z0-9-]`, 1..=64 bytes, not starting
/// with `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be 1..=64 of [a-z0-9-], not starting with `-`"
        ))
    }
}
