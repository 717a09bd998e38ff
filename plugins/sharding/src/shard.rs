//! This node's part of the data, in node-local storage, and the shard
//! map's changes as `apply` makes them.
//!
//! Node-local keys: `d/{slot}/{key}` an item; `s/{slot}` the last
//! sequence number this node gave a write to the slot as its primary;
//! `h/{slot}` a mark that this node stores items of the slot.

use std::collections::{BTreeMap, BTreeSet};

use plexus_sdk::codec;
use plexus_sdk::storage::{self, local};
use serde::{Deserialize, Serialize};

use crate::placement;
use crate::{Map, Plan};

/// Orders the writes of a key: a later epoch's first, then the primary's
/// sequence.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub epoch: u64,
    pub seq: u64,
}

/// A key's value, or that it was deleted (kept, so that an older copy
/// does not bring the value back).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Item {
    pub version: Version,
    pub value: Option<Vec<u8>>,
}

fn data_prefix(slot: u32) -> String {
    format!("d/{slot:05}/")
}

fn data_key(slot: u32, key: &[u8]) -> Vec<u8> {
    [data_prefix(slot).as_bytes(), key].concat()
}

fn decode_err(e: codec::CodecError) -> storage::Error {
    storage::Error::Io(e.to_string())
}

fn item(slot: u32, key: &[u8]) -> Result<Option<Item>, storage::Error> {
    local::get(data_key(slot, key))?
        .map(|v| codec::decode(&v.value).map_err(decode_err))
        .transpose()
}

/// The value of `key`, unless it is absent or deleted.
pub fn get(slot: u32, key: &[u8]) -> Result<Option<Vec<u8>>, storage::Error> {
    Ok(item(slot, key)?.and_then(|i| i.value))
}

/// The next sequence number for a write to `slot` at its primary.
pub fn next_seq(slot: u32) -> Result<u64, storage::Error> {
    let key = format!("s/{slot:05}");
    let next = local::get(&key)?
        .and_then(|v| v.value.try_into().ok().map(u64::from_le_bytes))
        .unwrap_or(0)
        + 1;
    local::put(&key, next.to_le_bytes())?;
    Ok(next)
}

/// Stores each item that is newer than what this node has of its key.
pub fn keep_newer(slot: u32, items: &[(Vec<u8>, Item)]) -> Result<(), storage::Error> {
    for (key, new) in items {
        if item(slot, key)?.is_none_or(|old| old.version < new.version) {
            local::put(data_key(slot, key), codec::encode(new))?;
        }
    }
    local::put(format!("h/{slot:05}"), b"")?;
    Ok(())
}

/// Up to `limit` items of `slot` after `after` (a key), in key order.
pub fn page(
    slot: u32,
    after: Option<&[u8]>,
    limit: u32,
) -> Result<Vec<(Vec<u8>, Item)>, storage::Error> {
    let prefix = data_prefix(slot);
    let after = after.map(|k| data_key(slot, k));
    local::scan(&prefix, after.as_deref(), limit)?
        .into_iter()
        .map(|kv| {
            let key = kv.key[prefix.len()..].to_vec();
            Ok((key, codec::decode(&kv.value.value).map_err(decode_err)?))
        })
        .collect()
}

/// The slots this node stores items of.
fn stored_slots() -> Result<Vec<u32>, storage::Error> {
    Ok(local::scan_all("h/")?
        .iter()
        .filter_map(|kv| std::str::from_utf8(&kv.key[2..]).ok()?.parse::<u32>().ok())
        .collect())
}

/// Keys and bytes (values and keys) of `slot` stored here, live ones only.
pub fn size(slot: u32) -> Result<(u64, u64), storage::Error> {
    let (mut keys, mut bytes) = (0, 0);
    let prefix = data_prefix(slot);
    for kv in local::scan_all(&prefix)? {
        let item: Item = codec::decode(&kv.value.value).map_err(decode_err)?;
        if let Some(v) = &item.value {
            keys += 1;
            bytes += (kv.key.len() - prefix.len() + v.len()) as u64;
        }
    }
    Ok((keys, bytes))
}

/// Live keys per slot stored here.
pub fn counts() -> Result<BTreeMap<u32, u64>, storage::Error> {
    stored_slots()?
        .into_iter()
        .map(|s| Ok((s, size(s)?.0)))
        .collect()
}

/// Deletes up to 500 items of the slots stored here that `holds` says
/// this node does not hold; whether there is more to delete.
pub fn drop_unheld(slots: u32, holds: impl Fn(u32) -> bool) -> Result<bool, storage::Error> {
    let mut budget = 500;
    for slot in stored_slots()? {
        if slot < slots && holds(slot) {
            continue;
        }
        if budget == 0 {
            return Ok(true);
        }
        let items = page(slot, None, budget)?;
        for (k, _) in &items {
            local::delete(data_key(slot, k))?;
        }
        budget -= items.len() as u32;
        if budget > 0 {
            local::delete(format!("h/{slot:05}"))?;
            local::delete(format!("s/{slot:05}"))?;
        }
    }
    Ok(false)
}

/// Applies a new placement for `members` to `map`: drops `dead` from
/// their slots at once (a new epoch when that changes anything, a
/// replica becoming primary), and returns the plan toward the placement,
/// or switches to it at once when no slot needs a copy.
pub fn rebalance(
    map: Option<Map>,
    members: &[String],
    dead: &[String],
    (slots, replicas, balance_factor): (u32, u8, u32),
    now_ms: u64,
) -> (Map, Option<Plan>) {
    let Some(mut map) = map else {
        let holders = placement::place(members, slots, replicas as usize, balance_factor);
        let map = Map {
            epoch: 1,
            replicas,
            members: members.to_vec(),
            holders,
        };
        return (map, None);
    };
    let interim: Vec<Vec<String>> = map
        .holders
        .iter()
        .map(|h| {
            let alive: Vec<String> = h.iter().filter(|n| !dead.contains(n)).cloned().collect();
            // The only holders are dead: the slot waits for them.
            if alive.is_empty() { h.clone() } else { alive }
        })
        .collect();
    if interim != map.holders {
        map.holders = interim;
        map.epoch += 1;
    }
    let target = placement::place(
        members,
        map.holders.len() as u32,
        map.replicas as usize,
        balance_factor,
    );
    let pending: BTreeSet<u32> = (0..map.holders.len())
        .filter(|&s| target[s].iter().any(|n| !map.holders[s].contains(n)))
        .map(|s| s as u32)
        .collect();
    if target == map.holders {
        map.members = members.to_vec();
        return (map, None);
    }
    if pending.is_empty() {
        map.holders = target;
        map.members = members.to_vec();
        map.epoch += 1;
        return (map, None);
    }
    let plan = Plan {
        epoch: map.epoch + 1,
        members: members.to_vec(),
        target,
        pending,
        started_ms: now_ms,
    };
    (map, Some(plan))
}
