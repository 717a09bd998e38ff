//! Structured logging into the host's `tracing`.
//!
//! Use the macros: `plexus_sdk::info!("elected {}", role; "role" => role)`.
//! Fields after `;` are key/value pairs.

use crate::host::log as wit;

pub use wit::Level;

/// Emits one event with fields.
pub fn emit(level: Level, message: &str, fields: &[(String, String)]) {
    wit::emit(level, message, fields)
}

/// Whether `level` is recorded.
pub fn enabled(level: Level) -> bool {
    wit::enabled(level)
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log {
    ($level:expr, $fmt:literal $(, $arg:expr)* $(; $($k:literal => $v:expr),+ )?) => {
        if $crate::log::enabled($level) {
            let fields: Vec<(String, String)> = vec![$($(($k.to_string(), $v.to_string())),+)?];
            $crate::log::emit($level, &format!($fmt $(, $arg)*), &fields);
        }
    };
}

/// Logs at debug level.
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::__log!($crate::log::Level::Debug, $($t)*) }; }
/// Logs at info level.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::__log!($crate::log::Level::Info, $($t)*) }; }
/// Logs at warn level.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::__log!($crate::log::Level::Warn, $($t)*) }; }
/// Logs at error level.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::__log!($crate::log::Level::Error, $($t)*) }; }
