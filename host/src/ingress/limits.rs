//! How many HTTP connections a node holds, in all and per client address.
//!
//! Every connection holds a descriptor for as long as it lives, and the
//! process's descriptors are shared with the peer listener, the storage
//! files and the plugins. The caps keep clients to their share: one
//! connection past a cap is answered at once with a short error and
//! closed, without reading from it, so a flood of idle or slow clients
//! costs the node a descriptor only for the moment of the answer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Descriptors kept out of the clients' reach: peer links, gossip, redb
/// files, the compiled-component cache, plugin work.
pub const RESERVED_DESCRIPTORS: usize = 256;

/// The caps in force.
#[derive(Debug)]
pub struct Connections {
    max: usize,
    per_client: usize,
    open: Mutex<Open>,
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// A connection's place; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    of: Arc<Connections>,
    client: IpAddr,
}

/// Why a connection was refused: the answer written to it.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The node holds `max` connections.
    Full(usize),
    /// This client holds `per_client` connections.
    Client(IpAddr, usize),
}

impl Refusal {
    /// The whole HTTP response that tells the client, closing the
    /// connection.
    pub fn response(&self) -> Vec<u8> {
        let (status, message) = match self {
            Refusal::Full(max) => (
                "503 Service Unavailable",
                format!("too many connections: this node serves at most {max} at once"),
            ),
            Refusal::Client(ip, n) => (
                "429 Too Many Requests",
                format!("too many connections from {ip}: at most {n} at once per client address"),
            ),
        };
        let body = serde_json::json!({ "error": message }).to_string();
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

impl Connections {
    /// Caps of `max` in all and `per_client` per address; `max` is lowered
    /// to what the process's descriptor limit leaves after
    /// [`RESERVED_DESCRIPTORS`].
    pub fn new(max: usize, per_client: usize) -> Arc<Connections> {
        let max = match descriptor_limit() {
            Some(limit) if limit.saturating_sub(RESERVED_DESCRIPTORS) < max => {
                let lowered = limit.saturating_sub(RESERVED_DESCRIPTORS).max(1);
                tracing::warn!(
                    configured = max,
                    lowered,
                    descriptor_limit = limit,
                    "node.max_connections lowered to fit the process's open-file limit (raise it with `ulimit -n`)"
                );
                lowered
            }
            _ => max,
        };
        Arc::new(Connections {
            max,
            per_client: per_client.min(max),
            open: Mutex::new(Open::default()),
            refused: AtomicU64::new(0),
        })
    }

    /// The cap in force on all connections.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().expect("connections poisoned").total
    }

    /// Connections refused since the start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A slot for a connection from `client`, or why there is none.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Slot, Refusal> {
        let client = bucket(client);
        let mut open = self.open.lock().expect("connections poisoned");
        if open.total >= self.max {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Full(self.max));
        }
        let mine = open.by_client.entry(client).or_default();
        if *mine >= self.per_client {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Client(client, self.per_client));
        }
        *mine += 1;
        open.total += 1;
        Ok(Slot {
            of: self.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().expect("connections poisoned");
        open.total -= 1;
        if let Some(n) = open.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.by_client.remove(&self.client);
            }
        }
    }
}

/// The address a client is counted under: an IPv6 client by its /64, the
/// block one host is usually given.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
        v4 => v4,
    }
}

/// The soft open-file limit of this process, where the system tells it.
fn descriptor_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_in_all_and_per_client_and_slots_come_back() {
        let c = Connections::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = c.admit(a).unwrap();
        let _s2 = c.admit(a).unwrap();
        assert_eq!(c.admit(a).unwrap_err(), Refusal::Client(a, 2));
        let _s3 = c.admit(b).unwrap();
        assert_eq!(c.admit(b).unwrap_err(), Refusal::Full(3));
        drop(s1);
        assert_eq!(c.open(), 2);
        assert!(c.admit(a).is_ok());
    }

    #[test]
    fn a_refusal_is_a_complete_http_response() {
        let r = Refusal::Full(7).response();
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(at) = resp.parse(&r).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(resp.code, Some(503));
        let body: serde_json::Value = serde_json::from_slice(&r[at..]).unwrap();
        assert_eq!(
            body["error"],
            "too many connections: this node serves at most 7 at once"
        );
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let c = Connections::new(10, 1);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let _s = c.admit(a).unwrap();
        assert!(c.admit(b).is_err(), "the same /64 is one client");
        assert!(c.admit(other).is_ok());
    }
}
