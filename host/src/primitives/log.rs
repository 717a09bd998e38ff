//! `plexus:cluster/log`: guest log events into `tracing`.

use wasmtime::component::{HasData, Linker};

use crate::runtime::bindings::plexus::cluster::log::{self as wit, Level};
use crate::runtime::state::PluginState;

const MAX_MESSAGE: usize = 4096;
const MAX_FIELDS: usize = 16;

/// One plugin instance's log context: who is speaking.
pub struct LogCtx {
    plugin: String,
    version: String,
}

impl LogCtx {
    /// A context for `plugin` at `version`.
    pub fn new(plugin: &str, version: &str) -> Self {
        LogCtx {
            plugin: plugin.to_string(),
            version: version.to_string(),
        }
    }
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl wit::Host for LogCtx {
    fn emit(
        &mut self,
        level: Level,
        message: String,
        fields: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        let message = cut(&message, MAX_MESSAGE);
        let fields: Vec<String> = fields
            .iter()
            .take(MAX_FIELDS)
            .map(|(k, v)| format!("{}={}", cut(k, 64), cut(v, 256)))
            .collect();
        let fields = fields.join(" ");
        let (plugin, version) = (&self.plugin, &self.version);
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin, version, fields, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin, version, fields, "{message}"),
            Level::Info => tracing::info!(target: "plugin", plugin, version, fields, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin, version, fields, "{message}"),
            Level::Error => tracing::error!(target: "plugin", plugin, version, fields, "{message}"),
        }
        Ok(())
    }

    fn enabled(&mut self, level: Level) -> wasmtime::Result<bool> {
        Ok(match level {
            Level::Trace => tracing::enabled!(target: "plugin", tracing::Level::TRACE),
            Level::Debug => tracing::enabled!(target: "plugin", tracing::Level::DEBUG),
            Level::Info => tracing::enabled!(target: "plugin", tracing::Level::INFO),
            Level::Warn => tracing::enabled!(target: "plugin", tracing::Level::WARN),
            Level::Error => tracing::enabled!(target: "plugin", tracing::Level::ERROR),
        })
    }
}

struct Log;

impl HasData for Log {
    type Data<'a> = &'a mut LogCtx;
}

/// Grants `log`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<PluginState, Log>(linker, |s| &mut s.log)
}
