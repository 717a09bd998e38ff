//! cqrs over event-store on three `plexus` processes: a command answered
//! with a position is seen by a read that waits for it on another node; a
//! projection rebuilt blue/green under write load switches on every node
//! without a failed or stale read, and rolls back in one step; an event
//! the projection cannot apply is parked and the projection goes on;
//! deposits through a cluster-wide swap of both plugins and a kill -9
//! are all in the balances read on every node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plexus_tests::{Processes, cluster_node_config, http};
use serde_json::{Value, json};

const BANK: &str = "/v1/plugins/bank";

fn config(i: usize, http: &[SocketAddr], peer: &[SocketAddr]) -> String {
    let plugins = r#"
[admin]
token = "cqrs-token"

[[plugins]]
name = "events"
component = "bundled:event-store"
capabilities = ["consensus", "storage", "timers", "plugins"]
allowed_plugins = ["bank"]

[[plugins]]
name = "bank"
component = "bundled:cqrs"
capabilities = ["consensus", "storage", "timers", "plugins", "log"]
allowed_plugins = ["events"]
[plugins.config]
store = "events"
[plugins.config.aggregates.account.on]
Opened = { set = { owner = "$.owner", balance = 0 } }
Deposited = { add = { balance = "$.amount" } }
Withdrawn = { add = { spent = "$.amount" } }
[plugins.config.aggregates.account.commands.open]
event = "Opened"
expect = "new"
required = ["owner"]
[plugins.config.aggregates.account.commands.deposit]
event = "Deposited"
required = ["amount"]
rules = [{ field = "amount", min = 1 }]
[plugins.config.aggregates.account.commands.withdraw]
event = "Withdrawn"
required = ["amount"]
rules = [{ field = "amount", min = 1, at_most_state = "balance", message = "insufficient funds" }]
[plugins.config.projections.balances]
streams = "account-"
[plugins.config.projections.balances.on]
Opened = { set = { owner = "$.owner", balance = 0 } }
Deposited = { add = { balance = "$.amount" } }
"#;
    cluster_node_config(i, http, peer, "", plugins)
}

async fn command(addr: SocketAddr, account: &str, name: &str, body: Value) -> (u16, Value) {
    let path = format!("{BANK}/commands/account/{account}/{name}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http(addr, "POST", &path, &[], body.to_string().as_bytes()).await {
            Ok((s, b)) if ![421, 502, 503, 504].contains(&s) => {
                return (s, serde_json::from_slice(&b).unwrap_or(Value::Null));
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "{path} never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A document read through `addr` once the projection has reached
/// `position`.
async fn read(addr: SocketAddr, key: &str, position: u64) -> (u16, Value) {
    let path =
        format!("{BANK}/projections/balances/docs/{key}?min_position={position}&wait_ms=20000");
    let (s, b) = http(addr, "GET", &path, &[], b"").await.expect("node up");
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

async fn status(nodes: &Processes, i: usize) -> Value {
    nodes
        .call(i, "GET", &format!("{BANK}/projections"), b"")
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waiting_for_a_commands_position_sees_it_on_every_node() {
    let nodes = Processes::start(3, config).await;
    let (s, b) = command(nodes.http[0], "7", "open", json!({"owner": "ann"})).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = command(nodes.http[1], "7", "deposit", json!({"amount": 40})).await;
    assert_eq!(s, 200, "{b}");
    let position = b["position"].as_u64().unwrap();
    assert_eq!(b["version"], 1);
    for addr in &nodes.http {
        let (s, doc) = read(*addr, "7", position).await;
        assert_eq!(s, 200, "{doc}");
        assert_eq!(doc["doc"], json!({"owner": "ann", "balance": 40}));
        assert!(doc["position"].as_u64() >= Some(position));
    }
    // Refusals name the rule; nothing is appended.
    let (s, b) = command(nodes.http[2], "7", "withdraw", json!({"amount": 41})).await;
    assert_eq!((s, b["error"].as_str()), (422, Some("insufficient funds")));
    let (s, _) = command(nodes.http[2], "7", "open", json!({"owner": "bob"})).await;
    assert_eq!(s, 409);
    let (s, _) = command(nodes.http[2], "8", "deposit", json!({"amount": 1})).await;
    assert_eq!(s, 404);
    // The event store folds the account by the cqrs plugin's rules.
    let (s, state) = nodes
        .call(
            2,
            "GET",
            "/v1/plugins/events/streams/account-7/state?reducer=bank&version=1",
            b"",
        )
        .await;
    assert_eq!(
        (s, &state["state"]),
        (200, &json!({"owner": "ann", "balance": 40}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_writes_switches_everywhere_without_a_stale_read() {
    let nodes = Processes::start(3, config).await;
    for a in 0..8 {
        let (s, b) = command(
            nodes.http[a % 3],
            &a.to_string(),
            "open",
            json!({"owner": a}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    for _ in 0..200 {
        let (s, _) = command(nodes.http[0], "0", "deposit", json!({"amount": 1})).await;
        assert_eq!(s, 200);
    }
    // One client per account deposits and reads back through another node
    // what it knows the balance is, while the projection is rebuilt.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for a in 0..8usize {
        let (addrs, stop) = (nodes.http.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut balance = if a == 0 { 200 } else { 0 };
            let mut reads = 0;
            let mut versions = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (s, b) = command(
                    addrs[a % 3],
                    &a.to_string(),
                    "deposit",
                    json!({"amount": 1}),
                )
                .await;
                assert_eq!(s, 200, "{b}");
                balance += 1;
                let position = b["position"].as_u64().unwrap();
                let (s, doc) = read(addrs[(a + 1) % 3], &a.to_string(), position).await;
                assert_eq!(s, 200, "account {a} at {position}: {doc}");
                assert_eq!(
                    doc["doc"]["balance"], balance,
                    "account {a}: a stale read: {doc}"
                );
                versions.push(doc["version"].as_u64().unwrap());
                reads += 1;
            }
            (reads, versions)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, b) = nodes
        .call(
            1,
            "POST",
            &format!("{BANK}/projections/balances/rebuild"),
            b"",
        )
        .await;
    assert_eq!((s, b["version"].as_u64()), (200, Some(2)), "{b}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(&nodes, 0).await;
        if st["balances"]["active"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never switched: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut saw_new = false;
    for c in clients {
        let (reads, versions) = c.await.unwrap();
        assert!(reads > 0);
        // Reads never go back to the old version once on the new.
        let first_new = versions.iter().position(|v| *v == 2);
        if let Some(i) = first_new {
            saw_new = true;
            assert!(versions[i..].iter().all(|v| *v == 2), "{versions:?}");
        }
    }
    assert!(saw_new, "no read was served by the rebuilt version");
    for i in 0..3 {
        let st = status(&nodes, i).await;
        assert_eq!(
            (
                st["balances"]["active"].as_u64(),
                st["balances"]["previous"].as_u64()
            ),
            (Some(2), Some(1)),
            "{st}"
        );
    }
    // Rollback: one step, and reads answer from version 1 (still fed).
    let (s, _) = nodes
        .call(
            2,
            "POST",
            &format!("{BANK}/projections/balances/rollback"),
            b"",
        )
        .await;
    assert_eq!(s, 200);
    let (s, b) = command(nodes.http[0], "3", "deposit", json!({"amount": 5})).await;
    assert_eq!(s, 200);
    let (s, doc) = read(nodes.http[1], "3", b["position"].as_u64().unwrap()).await;
    assert_eq!((s, doc["version"].as_u64()), (200, Some(1)), "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_projection_cannot_apply_is_parked_and_it_goes_on() {
    let nodes = Processes::start(3, config).await;
    for a in ["1", "2"] {
        let (s, _) = command(nodes.http[0], a, "open", json!({"owner": "x"})).await;
        assert_eq!(s, 200);
    }
    // Appended straight to the store, past the command's rules.
    let bad = json!({"type": "Deposited", "data": {"amount": "a lot"}});
    let (s, _) = nodes
        .call(
            1,
            "POST",
            "/v1/plugins/events/streams/account-2",
            bad.to_string().as_bytes(),
        )
        .await;
    assert_eq!(s, 200);
    let (s, b) = command(nodes.http[2], "1", "deposit", json!({"amount": 3})).await;
    assert_eq!(s, 200, "{b}");
    let (s, doc) = read(nodes.http[2], "1", b["position"].as_u64().unwrap()).await;
    assert_eq!((s, &doc["doc"]["balance"]), (200, &json!(3)), "{doc}");
    let (_, parked) = nodes
        .call(
            2,
            "GET",
            &format!("{BANK}/projections/balances/parked"),
            b"",
        )
        .await;
    assert_eq!(parked.as_array().map(Vec::len), Some(1), "{parked}");
    assert!(
        parked[0]["error"]
            .as_str()
            .unwrap()
            .contains("not a number"),
        "{parked}"
    );
    let st = status(&nodes, 2).await;
    assert_eq!(st["balances"]["versions"]["1"]["parked"], 1, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_reads_go_on_through_a_swap_and_a_kill() {
    let mut nodes = Processes::start(3, config).await;
    for a in 0..4 {
        let (s, _) = command(
            nodes.http[a % 3],
            &a.to_string(),
            "open",
            json!({"owner": a}),
        )
        .await;
        assert_eq!(s, 200);
    }
    // Four clients deposit through nodes 1 and 2; every acknowledged
    // deposit must be in the balance read at the end.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for a in 0..4usize {
        let (addr, stop) = (nodes.http[a % 2], stop.clone());
        clients.push(tokio::spawn(async move {
            let (mut acked, mut unknown) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) || acked < 10 {
                let path = format!("{BANK}/commands/account/{a}/deposit");
                match http(addr, "POST", &path, &[], br#"{"amount": 1}"#).await {
                    Ok((200, _)) => acked += 1,
                    Ok((s, _)) if s >= 500 => {
                        unknown += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok((s, b)) => panic!("{s}: {}", String::from_utf8_lossy(&b)),
                    Err(_) => {
                        unknown += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (acked, unknown)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let auth = ("authorization", "Bearer cqrs-token");
    for plugin in ["bank", "events"] {
        let name = if plugin == "bank" {
            "cqrs"
        } else {
            "event-store"
        };
        let component = plexus_tests::variant(&plexus_tests::wasm(name), 5);
        let (s, b) = http(
            nodes.http[0],
            "POST",
            &format!("/v1/admin/plugins/{plugin}/swap?scope=cluster"),
            &[auth],
            &component,
        )
        .await
        .unwrap();
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }
    nodes.procs[2].take().unwrap().kill();
    let p = nodes.spawn(2).await;
    nodes.procs[2] = Some(p);
    stop.store(true, Ordering::Relaxed);
    let (_, head) = nodes
        .call(0, "GET", "/v1/plugins/events/all?max=1", b"")
        .await;
    let head = head["head"].as_u64().unwrap();
    for (a, c) in clients.into_iter().enumerate() {
        let (acked, unknown) = c.await.unwrap();
        for i in 0..3 {
            let (s, doc) = read(nodes.http[i], &a.to_string(), head).await;
            assert_eq!(s, 200, "{doc}");
            let balance = doc["doc"]["balance"].as_u64().unwrap();
            assert!(
                (acked..=acked + unknown).contains(&balance),
                "account {a} on node-{}: {balance} for {acked} acknowledged, {unknown} unknown",
                i + 1
            );
        }
    }
}
