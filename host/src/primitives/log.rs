//! `plexus:cluster/log`: guest log events into the node's log.
//!
//! A guest's fields have names only known at run time, which `tracing`
//! events cannot carry. In text they follow the message as `key=value`;
//! with JSON lines (`PLEXUS_LOG_FORMAT=json`) the event is written here,
//! in the shape of the node's own events, each field a field of its own.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::component::{HasData, Linker};

use crate::runtime::bindings::plexus::cluster::log::{self as wit, Level};
use crate::runtime::state::PluginState;

static JSON_LINES: AtomicBool = AtomicBool::new(false);

/// Makes plugin events JSON lines on stderr, like the node's own with
/// `PLEXUS_LOG_FORMAT=json`.
pub fn write_json_lines(on: bool) {
    JSON_LINES.store(on, Ordering::Relaxed);
}

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
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .take(MAX_FIELDS)
            .map(|(k, v)| (cut(k, 64), cut(v, 256)))
            .collect();
        if JSON_LINES.load(Ordering::Relaxed) {
            if self.enabled(level)? {
                json_line(level, message, &self.plugin, &self.version, &fields);
            }
            return Ok(());
        }
        let (plugin, version) = (&self.plugin, &self.version);
        let mut text = message.to_string();
        for (k, v) in &fields {
            text.push(' ');
            text.push_str(k);
            text.push('=');
            text.push_str(v);
        }
        match level {
            Level::Trace => {
                tracing::trace!(target: "plugin", plugin = %plugin, version = %version, "{text}")
            }
            Level::Debug => {
                tracing::debug!(target: "plugin", plugin = %plugin, version = %version, "{text}")
            }
            Level::Info => {
                tracing::info!(target: "plugin", plugin = %plugin, version = %version, "{text}")
            }
            Level::Warn => {
                tracing::warn!(target: "plugin", plugin = %plugin, version = %version, "{text}")
            }
            Level::Error => {
                tracing::error!(target: "plugin", plugin = %plugin, version = %version, "{text}")
            }
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

/// Writes one event as a JSON line: `{"timestamp", "level", "fields":
/// {"message", "plugin", "version", KEY...}, "target": "plugin"}`. A guest
/// field named like one of the node's keeps them: it is prefixed `field.`.
fn json_line(level: Level, message: &str, plugin: &str, version: &str, fields: &[(&str, &str)]) {
    let mut object = serde_json::Map::new();
    object.insert("message".into(), message.into());
    object.insert("plugin".into(), plugin.into());
    object.insert("version".into(), version.into());
    for (k, v) in fields {
        let key = if object.contains_key(*k) {
            format!("field.{k}")
        } else {
            k.to_string()
        };
        object.insert(key, (*v).into());
    }
    let level = match level {
        Level::Trace => "TRACE",
        Level::Debug => "DEBUG",
        Level::Info => "INFO",
        Level::Warn => "WARN",
        Level::Error => "ERROR",
    };
    let event = serde_json::json!({
        "timestamp": rfc3339_now(),
        "level": level,
        "fields": object,
        "target": "plugin",
    });
    let mut line = event.to_string();
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// The time now as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (year, month, day) = civil((secs / 86_400) as i64);
    let rest = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        now.subsec_micros()
    )
}

/// The civil date (year, month, day) of a day counted from 1970-01-01
/// (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

struct Log;

impl HasData for Log {
    type Data<'a> = &'a mut LogCtx;
}

/// Grants `log`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<PluginState, Log>(linker, |s| &mut s.log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_civil_date_is_right_across_leap_years() {
        // Checked against `date -u -d @SECS`.
        let at = |secs: u64| civil((secs / 86_400) as i64);
        assert_eq!(at(0), (1970, 1, 1));
        assert_eq!(at(951_782_400), (2000, 2, 29));
        assert_eq!(at(1_798_675_200), (2026, 12, 31));
        assert!(rfc3339_now().ends_with('Z'));
    }
}
