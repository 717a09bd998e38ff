//! A guest's stderr. Each line it writes is logged, tagged with the
//! plugin and version; the last few KiB are kept, so that when the guest
//! traps its panic message and source location go into the failure's
//! report (the log, the client's 503 and the plugin's status) instead of
//! only "unreachable executed".

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes of the most recent output kept for a failure's report.
const TAIL: usize = 4096;
/// A longer line is logged cut to this many bytes.
const MAX_LINE: usize = 1024;

/// One instance's stderr; clones share it.
#[derive(Clone)]
pub struct GuestStderr(Arc<Mutex<Inner>>);

struct Inner {
    plugin: Arc<str>,
    version: Arc<str>,
    tail: VecDeque<u8>,
    line: Vec<u8>,
}

impl GuestStderr {
    /// The stderr of an instance of `plugin` at `version`.
    pub fn new(plugin: &str, version: &str) -> GuestStderr {
        GuestStderr(Arc::new(Mutex::new(Inner {
            plugin: plugin.into(),
            version: version.into(),
            tail: VecDeque::new(),
            line: Vec::new(),
        })))
    }

    fn write(&self, bytes: &[u8]) {
        let mut inner = self.0.lock().expect("stderr poisoned");
        let keep = bytes.len().min(TAIL);
        inner.tail.extend(&bytes[bytes.len() - keep..]);
        let excess = inner.tail.len().saturating_sub(TAIL);
        inner.tail.drain(..excess);
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut inner.line);
                let text = String::from_utf8_lossy(&line);
                tracing::info!(target: "plugin", plugin = %inner.plugin, version = %inner.version, stream = "stderr", "{text}");
            } else if inner.line.len() < MAX_LINE {
                inner.line.push(b);
            }
        }
    }

    /// The last panic the guest reported, as `panicked at FILE:LINE:COL:
    /// MESSAGE`, if its output holds one.
    pub fn panic(&self) -> Option<String> {
        let inner = self.0.lock().expect("stderr poisoned");
        let tail: Vec<u8> = inner.tail.iter().copied().collect();
        drop(inner);
        panic_in(&String::from_utf8_lossy(&tail))
    }
}

/// Finds Rust's panic report (`... panicked at src/lib.rs:9:5:\nmessage`)
/// in `out`, without the hint about backtraces that follows it.
fn panic_in(out: &str) -> Option<String> {
    let at = out.rfind("panicked at ")?;
    let report = &out[at..];
    let report = report.find("\nnote: ").map_or(report, |end| &report[..end]);
    let (place, message) = report.split_once('\n').unwrap_or((report, ""));
    let place = place.trim_end().trim_end_matches(':');
    let message = message.trim();
    Some(if message.is_empty() {
        place.to_string()
    } else {
        format!("{place}: {message}")
    })
}

impl IsTerminal for GuestStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStderr {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestStderr {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        GuestStderr::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStderr {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestStderr {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        GuestStderr::write(&self, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_report_is_found_without_the_backtrace_hint() {
        let out = "starting\nthread '<unnamed>' panicked at src/lib.rs:71:5:\nchaos: trap in apply of entry 9\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_in(out).as_deref(),
            Some("panicked at src/lib.rs:71:5: chaos: trap in apply of entry 9")
        );
        assert_eq!(panic_in("just a line\n"), None);
    }

    #[test]
    fn only_the_tail_is_kept() {
        let e = GuestStderr::new("p", "v");
        e.write(&vec![b'x'; 3 * TAIL]);
        e.write(b"panicked at a.rs:1:1:\nboom\n");
        assert_eq!(e.panic().as_deref(), Some("panicked at a.rs:1:1: boom"));
        assert_eq!(e.0.lock().unwrap().tail.len(), TAIL);
    }
}
