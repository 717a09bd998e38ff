//! Failure detection and membership: SWIM (foca) over UDP.
//!
//! foca is sans-IO: this module feeds it datagrams from a tokio UDP socket
//! bound on the node's peer address, runs its timers, sends what it asks
//! to send, and turns its member up/down notifications into changes of the
//! node's [`MembershipView`], which plugins see through `membership` and
//! `on-membership`. Every datagram carries an HMAC-SHA256 tag keyed by the
//! cluster secret (the first one; any of the node's secrets is accepted,
//! for rotation); untagged or mis-tagged datagrams are dropped, counted and
//! logged at most once a second ([`super::junk`]). Raft voters are never
//! changed by gossip, only explicitly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use foca::{AccumulatingRuntime, Config, Foca, Identity, OwnedNotification, PostcardCodec, Timer};
use hmac::{Hmac, Mac};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use sha2::Sha256;

use super::junk;
use super::membership::MembershipView;
use crate::runtime::bindings::types::{MemberEvent, MemberState};

const TAG: usize = 32;
const MAX_DATAGRAM: usize = 1400;

/// A member's identity in gossip: its name, its gossip address, and a
/// generation that grows each time the process starts, so a restarted node
/// wins over its old, dead self.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Id {
    /// Node name.
    pub name: String,
    /// UDP address.
    pub addr: SocketAddr,
    /// Start generation.
    pub generation: u64,
}

impl Identity for Id {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Id {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// HMAC-SHA256 keyed by the cluster secret over `parts`, in order.
fn keyed(secret: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    for part in parts {
        m.update(part);
    }
    m
}

fn sign(secret: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = keyed(secret, &[data]).finalize().into_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

fn open<'a>(secret: &[u8], packet: &'a [u8]) -> Option<&'a [u8]> {
    if packet.len() < TAG {
        return None;
    }
    let (tag, data) = packet.split_at(TAG);
    keyed(secret, &[data]).verify_slice(tag).ok().map(|()| data)
}

/// Starts gossip on `bind` for `me`, introducing it to `peers`. Membership
/// changes go into `view`, and as events into `events`.
pub async fn start(
    me: Id,
    peers: Vec<Id>,
    secrets: Arc<[Vec<u8>]>,
    view: Arc<MembershipView>,
    events: mpsc::UnboundedSender<Vec<MemberEvent>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let socket = UdpSocket::bind(me.addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding gossip socket on udp {}: {e}", me.addr))?;
    let size = NonZeroU32::new(u32::try_from(peers.len() + 1).unwrap_or(u32::MAX))
        .unwrap_or(NonZeroU32::MIN);
    let mut config = Config::new_lan(size);
    // Small clusters on one machine or a LAN: find a dead member within a
    // couple of seconds.
    config.probe_period = Duration::from_millis(500);
    config.probe_rtt = Duration::from_millis(200);
    config.suspect_to_down_after = Duration::from_millis(1500);
    let seed = {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("the OS random source is available");
        u64::from_le_bytes(b)
    };
    let mut foca = Foca::new(
        me.clone(),
        config,
        SmallRng::seed_from_u64(seed),
        PostcardCodec,
    );
    Ok(tokio::spawn(async move {
        let mut rt = AccumulatingRuntime::new();
        for peer in &peers {
            let _ = foca.announce(peer.clone(), &mut rt);
        }
        let (timer_tx, mut timer_rx) = mpsc::unbounded_channel::<Timer<Id>>();
        let mut buf = vec![0u8; 64 * 1024];
        let mut addrs: HashMap<String, SocketAddr> =
            peers.iter().map(|p| (p.name.clone(), p.addr)).collect();
        let mut reannounce = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                r = socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    match secrets.iter().find_map(|s| open(s, &buf[..n])) {
                        Some(data) => {
                            if let Err(e) = foca.handle_data(data, &mut rt) {
                                junk::GOSSIP.note(format_args!("gossip datagram from {from} refused: {e}"));
                            }
                        }
                        None => junk::GOSSIP.note(format_args!(
                            "dropping a gossip datagram from {from} without a valid cluster tag"
                        )),
                    }
                }
                Some(timer) = timer_rx.recv() => {
                    let _ = foca.handle_timer(timer, &mut rt);
                }
                _ = reannounce.tick() => {
                    // Members that were never reached (started later, or
                    // declared down) are introduced again.
                    let known: Vec<String> = foca.iter_members().map(|m| m.id().name.clone()).collect();
                    for peer in &peers {
                        if !known.contains(&peer.name) {
                            let _ = foca.announce(peer.clone(), &mut rt);
                        }
                    }
                }
            }
            while let Some((to, data)) = rt.to_send() {
                addrs.insert(to.name.clone(), to.addr);
                let Some(secret) = secrets.first() else { break };
                let packet = sign(secret, &data);
                if packet.len() <= MAX_DATAGRAM + TAG {
                    let _ = socket.send_to(&packet, to.addr).await;
                }
            }
            while let Some((after, timer)) = rt.to_schedule() {
                let tx = timer_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = tx.send(timer);
                });
            }
            let mut changed = Vec::new();
            while let Some(n) = rt.to_notify() {
                let (id, state) = match n {
                    OwnedNotification::MemberUp(id) => (id, MemberState::Alive),
                    OwnedNotification::MemberDown(id) => (id, MemberState::Dead),
                    _ => continue,
                };
                if let Some(event) = view.set_state(&id.name, state) {
                    tracing::info!(member = %id.name, state = ?state, "membership changed");
                    changed.push(event);
                }
            }
            if !changed.is_empty() {
                let _ = events.send(changed);
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::Rng;

    #[test]
    fn tags_are_checked() {
        let packet = sign(b"secret-one-secret", b"hello");
        assert_eq!(open(b"secret-one-secret", &packet), Some(&b"hello"[..]));
        assert_eq!(open(b"secret-two-secret", &packet), None);
        assert_eq!(open(b"secret-one-secret", b"short"), None);
    }

    /// Datagrams that pass the tag check (a member's, or an attacker's who
    /// holds the secret) but carry garbage or a cut message are refused by
    /// gossip, never a panic.
    #[test]
    fn garbage_behind_a_valid_tag_never_panics_gossip() {
        let id = |name: &str, port: u16| Id {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            generation: 1,
        };
        let config = || Config::new_lan(NonZeroU32::new(3).unwrap());
        let mut foca = Foca::new(
            id("a", 1),
            config(),
            SmallRng::seed_from_u64(7),
            PostcardCodec,
        );
        let mut rt = AccumulatingRuntime::new();
        // A real message to mutate: what `b` sends when announcing itself.
        let mut b = Foca::new(
            id("b", 2),
            config(),
            SmallRng::seed_from_u64(8),
            PostcardCodec,
        );
        let mut brt = AccumulatingRuntime::new();
        b.announce(id("a", 1), &mut brt).unwrap();
        let (_, real) = brt.to_send().expect("an announce to send");
        let mut rng = Rng(0x5eed_0002);
        for _ in 0..5_000 {
            let mut data = if rng.below(2) == 0 {
                real.to_vec()
            } else {
                rng.bytes(300)
            };
            if !data.is_empty() {
                let at = rng.below(data.len());
                data[at] = rng.next() as u8;
                data.truncate(rng.below(data.len() + 1));
            }
            let packet = sign(b"secret-one-secret", &data);
            let data = open(b"secret-one-secret", &packet).expect("the tag is valid");
            let _ = foca.handle_data(data, &mut rt);
        }
    }
}
