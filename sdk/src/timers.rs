//! Clocks and timers. A fired timer calls [`crate::Pattern::on_timer`].

use crate::host::timers as wit;

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    wit::now_ms()
}

/// Monotonic milliseconds.
pub fn monotonic_ms() -> u64 {
    wit::monotonic_ms()
}

/// Fires `on_timer(id)` after `delay_ms`; replaces a pending timer of the
/// same id. Returns false when too many timers are pending.
pub fn set(id: u64, delay_ms: u64) -> bool {
    wit::set_timer(id, delay_ms)
}

/// Cancels a pending timer; returns whether one was pending.
pub fn cancel(id: u64) -> bool {
    wit::cancel_timer(id)
}
