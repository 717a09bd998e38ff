//! One `[[plugins]]` entry: what it says, and what the node loads for it.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::runtime::Capability;
use crate::runtime::actor::PluginLimits;

/// One `[[plugins]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// Unique name, `[a-z0-9-]`, 1..=64 bytes.
    pub name: String,
    /// `bundled:NAME` or a path to a `.wasm` component.
    pub component: String,
    /// Interfaces granted; anything else the component imports is refused.
    #[serde(default)]
    pub capabilities: BTreeSet<Capability>,
    /// Resource limits.
    #[serde(default)]
    pub limits: LimitsEntry,
    /// Passed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// Plugins it may call (`plugins` capability).
    #[serde(default)]
    pub allowed_plugins: BTreeSet<String>,
    /// Origins it may send HTTP requests to (`outbound-http` capability):
    /// `http://HOST`, `http://HOST:PORT` or `http://HOST:*`.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
}

/// `limits` of a plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsEntry {
    /// Linear memory cap in MiB (1..=1024).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// CPU deadline per hook call in ms (1..=60000).
    #[serde(default = "default_cpu")]
    pub cpu_ms: u64,
    /// Mailbox capacity (1..=65536).
    #[serde(default = "default_mailbox")]
    pub mailbox: usize,
    /// Most calls (messaging, plugins, outbound HTTP) in flight at once
    /// (1..=65536).
    #[serde(default = "default_calls")]
    pub max_calls_in_flight: u32,
    /// Largest outbound HTTP response body, in bytes (1..=64 MiB).
    #[serde(default = "default_response")]
    pub max_response_bytes: u64,
}

impl Default for LimitsEntry {
    fn default() -> Self {
        LimitsEntry {
            memory_mib: default_memory(),
            cpu_ms: default_cpu(),
            mailbox: default_mailbox(),
            max_calls_in_flight: default_calls(),
            max_response_bytes: default_response(),
        }
    }
}

fn default_calls() -> u32 {
    crate::primitives::CallQuota::default().max_in_flight
}
fn default_response() -> u64 {
    crate::primitives::CallQuota::default().max_response_bytes
}

fn default_memory() -> u64 {
    64
}
fn default_cpu() -> u64 {
    1000
}
fn default_mailbox() -> usize {
    1024
}

impl LimitsEntry {
    /// As runtime limits.
    pub fn to_limits(&self) -> PluginLimits {
        PluginLimits {
            memory_bytes: self.memory_mib << 20,
            cpu: Duration::from_millis(self.cpu_ms),
            mailbox: self.mailbox,
            quota: crate::primitives::CallQuota {
                max_in_flight: self.max_calls_in_flight,
                max_response_bytes: self.max_response_bytes,
            },
        }
    }
}

impl PluginEntry {
    /// The `config` table as JSON text.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".into())
    }

    /// What the node loads for this entry, given the component's bytes.
    pub fn load_spec(&self, component: Vec<u8>) -> crate::node::LoadSpec {
        crate::node::LoadSpec {
            name: self.name.clone(),
            component: std::sync::Arc::from(component),
            capabilities: self.capabilities.clone(),
            limits: self.limits.to_limits(),
            config_json: self.config_json(),
            access: self.access(),
        }
    }

    /// Whom the plugin may call. Call after [`PluginEntry::validate`].
    pub fn access(&self) -> crate::runtime::actor::Access {
        crate::runtime::actor::Access {
            plugins: std::sync::Arc::new(self.allowed_plugins.clone()),
            outbound: std::sync::Arc::new(
                self.allowed_outbound_hosts
                    .iter()
                    .filter_map(|o| o.parse().ok())
                    .collect(),
            ),
        }
    }

    /// The component's bytes: bundled or read from disk.
    pub fn component_bytes(&self, base_dir: &Path) -> anyhow::Result<Vec<u8>> {
        if let Some(name) = self.component.strip_prefix("bundled:") {
            let bytes = crate::bundled::get(name).ok_or_else(|| {
                let known: Vec<_> = crate::bundled::names().collect();
                anyhow::anyhow!("no bundled plugin `{name}` (bundled: {})", known.join(", "))
            })?;
            return Ok(bytes.to_vec());
        }
        read_component_file(&base_dir.join(&self.component)).map_err(|e| anyhow::anyhow!(e))
    }
}

/// Largest component file read from disk.
pub const MAX_COMPONENT_BYTES: u64 = 64 << 20;

/// Reads a component file: a regular file only (not a FIFO, a device or a
/// directory, which could block or never end), at most
/// [`MAX_COMPONENT_BYTES`]. Blocking: call it off the async runtime.
pub fn read_component_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    // Opened without blocking (a FIFO's open would wait for a writer),
    // then checked on the open file itself, so it cannot be swapped
    // between the check and the read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("reading component {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("reading component {shown}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("reading component {shown}: not a regular file"));
    }
    if meta.len() > MAX_COMPONENT_BYTES {
        return Err(format!(
            "reading component {shown}: {} bytes, more than the {MAX_COMPONENT_BYTES} byte limit",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_COMPONENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading component {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        return Err(format!(
            "reading component {shown}: more than the {MAX_COMPONENT_BYTES} byte limit"
        ));
    }
    Ok(bytes)
}
