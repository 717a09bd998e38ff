//! event-store on three `plexus` processes: 32 writers on 10 streams with
//! expected versions lose and double nothing; multi-stream appends are
//! all or none across a cluster-wide swap and a kill -9 of the leader; a
//! catch-up read sees every event once, in order, while appends go on; a
//! persistent subscription's killed consumer has its events handed to the
//! others; a tombstoned stream is unreadable on every node and leaves a
//! node's storage file when the node restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plexus_tests::{Processes, cluster_node_config};
use serde_json::{Value, json};

const TOKEN: &str = "events-token";
const BASE: &str = "/v1/plugins/events";

fn config(i: usize, http: &[SocketAddr], peer: &[SocketAddr]) -> String {
    let plugin = format!(
        r#"
[admin]
token = "{TOKEN}"

[[plugins]]
name = "events"
component = "bundled:event-store"
capabilities = ["consensus", "storage", "timers", "plugins"]
"#
    );
    // Frequent snapshots, so the log is compacted within the test.
    cluster_node_config(i, http, peer, "snapshot_every = 50", &plugin)
}

fn event(kind: &str, data: Value, id: &str) -> Value {
    json!({ "type": kind, "data": data, "id": id })
}

/// Every event of `stream` read forwards through node `i`.
async fn read_stream(nodes: &Processes, i: usize, stream: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let path = format!("{BASE}/streams/{stream}?from={from}&max=1000");
        let (status, page) = nodes.call(i, "GET", &path, b"").await;
        if status == 404 {
            return out;
        }
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            return out;
        }
        from = page["next"].as_u64().unwrap();
        out.extend(events);
    }
}

/// What one writer saw: the ids it had acknowledged, those whose outcome
/// it never learned, and the expected versions it lost on.
#[derive(Default)]
struct Seen {
    acked: Vec<(String, String)>,
    unknown: Vec<(String, String)>,
    lost: Vec<(String, u64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_on_ten_streams_lose_and_double_nothing() {
    let nodes = Arc::new(Processes::start(3, config).await);
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..32usize {
        let nodes = nodes.clone();
        writers.spawn(async move {
            let mut seen = Seen::default();
            let mut known: BTreeMap<String, Option<u64>> = BTreeMap::new();
            for n in 0..12 {
                let stream = format!("acct-{}", (w + n) % 10);
                let id = format!("w{w}-{n}");
                let body = event("Deposited", json!({ "by": w, "n": n }), &id).to_string();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let expected = known.get(&stream).copied().flatten();
                    let e = expected.map_or("no_stream".to_string(), |v| v.to_string());
                    let path = format!("{BASE}/streams/{stream}?expected_version={e}");
                    let addr = nodes.http[(w + n) % 3];
                    match plexus_tests::http(addr, "POST", &path, &[], body.as_bytes()).await {
                        Ok((200, b)) => {
                            let b: Value = serde_json::from_slice(&b).unwrap();
                            known.insert(stream.clone(), b["version"].as_u64());
                            seen.acked.push((stream.clone(), id.clone()));
                            break;
                        }
                        Ok((409, b)) => {
                            let b: Value = serde_json::from_slice(&b).unwrap();
                            let current = b["current"].as_u64();
                            assert!(current > expected, "409 at {expected:?}: {b}");
                            seen.lost
                                .push((stream.clone(), expected.map_or(0, |v| v + 1)));
                            known.insert(stream.clone(), current);
                        }
                        // Not committed, or outcome unknown: the same id
                        // again is written at most once.
                        Ok((421 | 502 | 503 | 504, _)) | Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Ok((s, b)) => panic!("{s}: {}", String::from_utf8_lossy(&b)),
                    }
                    if Instant::now() > deadline {
                        seen.unknown.push((stream.clone(), id.clone()));
                        break;
                    }
                }
            }
            (w, seen)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = writers.join_next().await {
        all.push(r.unwrap());
    }
    let mut conflicts = 0;
    let mut by_stream: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for s in 0..10 {
        let stream = format!("acct-{s}");
        let events = read_stream(&nodes, s % 3, &stream).await;
        let versions: Vec<u64> = events
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect();
        assert_eq!(
            versions,
            (0..events.len() as u64).collect::<Vec<_>>(),
            "{stream}"
        );
        by_stream.insert(stream, events);
    }
    let stored: BTreeSet<(String, String)> = by_stream
        .iter()
        .flat_map(|(s, events)| {
            events
                .iter()
                .map(move |e| (s.clone(), e["id"].as_str().unwrap().to_string()))
        })
        .collect();
    let total: usize = by_stream.values().map(Vec::len).sum();
    assert_eq!(stored.len(), total, "an event id stored twice");
    let mut acked = 0;
    for (w, seen) in &all {
        for a in &seen.acked {
            assert!(stored.contains(a), "{a:?} acknowledged and lost");
        }
        acked += seen.acked.len();
        // Every 409 lost to another writer: the version it expected to
        // write holds someone else's event.
        for (stream, version) in &seen.lost {
            conflicts += 1;
            let winner = &by_stream[stream][*version as usize];
            let own_unknown = seen
                .unknown
                .iter()
                .any(|(_, id)| Some(id.as_str()) == winner["id"].as_str());
            assert!(
                winner["data"]["by"] != *w || own_unknown,
                "writer {w} lost {stream}@{version} to itself"
            );
        }
    }
    assert!(
        total >= acked && total <= 32 * 12,
        "{total} stored, {acked} acknowledged"
    );
    assert!(conflicts > 0, "32 writers on 10 streams never conflicted");
    // The same on every node.
    let (_, head) = nodes
        .call(2, "GET", &format!("{BASE}/all?max=1"), b"")
        .await;
    assert_eq!(head["head"].as_u64(), Some(total as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_stream_appends_are_all_or_none_across_a_swap_and_a_kill_of_the_leader() {
    let mut nodes = Processes::start(3, config).await;
    // A transfer a -> b whose check on b fails leaves both untouched.
    let transfer = |n: u64, expect_b: Value| {
        json!([
            {"stream": "from-acct", "expected_version": "any",
             "events": [event("Debited", json!({"t": n}), &format!("d-{n}"))]},
            {"stream": "to-acct", "expected_version": expect_b,
             "events": [event("Credited", json!({"t": n}), &format!("c-{n}"))]}
        ])
        .to_string()
    };
    let (status, body) = nodes
        .call(
            0,
            "POST",
            &format!("{BASE}/append"),
            transfer(0, json!(7)).as_bytes(),
        )
        .await;
    assert_eq!((status, body["stream"].as_str()), (409, Some("to-acct")));
    assert_eq!(read_stream(&nodes, 1, "from-acct").await.len(), 0);
    // Transfers from two nodes while the leader is killed and restarted.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..2u64 {
        let (addrs, stop) = (nodes.http.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = c * 1_000_000 + 1;
            while !stop.load(Ordering::Relaxed) || acked.len() < 20 {
                let body = transfer(n, json!("any"));
                let addr = addrs[(n as usize + c as usize) % addrs.len()];
                if let Ok((200, _)) = plexus_tests::http(
                    addr,
                    "POST",
                    &format!("{BASE}/append"),
                    &[],
                    body.as_bytes(),
                )
                .await
                {
                    acked.push(n);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        }));
    }
    // A cluster-wide swap of the store, then kill -9 of the leader.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let component = plexus_tests::variant(&plexus_tests::wasm("event-store"), 3);
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = plexus_tests::http(
        nodes.http[1],
        "POST",
        "/v1/admin/plugins/events/swap?scope=cluster",
        &[("authorization", &auth)],
        &component,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let leader = nodes.leader(TOKEN).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes.procs[leader].take().unwrap().kill();
    let p = nodes.spawn(leader).await;
    nodes.procs[leader] = Some(p);
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for c in clients {
        acked.extend(c.await.unwrap());
    }
    let ts = |events: Vec<Value>| -> BTreeSet<u64> {
        events
            .iter()
            .map(|e| e["data"]["t"].as_u64().unwrap())
            .collect()
    };
    for i in 0..3 {
        let debits = ts(read_stream(&nodes, i, "from-acct").await);
        let credits = ts(read_stream(&nodes, i, "to-acct").await);
        assert_eq!(debits, credits, "node-{}: a transfer half written", i + 1);
        for n in &acked {
            assert!(debits.contains(n), "transfer {n} acknowledged and lost");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_every_event_once_and_a_dead_consumers_go_to_the_others() {
    let mut nodes = Processes::start(3, config).await;
    let (status, _) = nodes
        .call(
            0,
            "PUT",
            &format!("{BASE}/subscriptions/billing"),
            br#"{"ack_wait_ms": 1000}"#,
        )
        .await;
    assert_eq!(status, 200);
    // A writer appends 300 events on node-1 while a catch-up reader on
    // node-2 follows `$all` from the start with waiting reads.
    let writer_addr = nodes.http[0];
    let writer = tokio::spawn(async move {
        for n in 0..300 {
            let body = event("Tick", json!(n), &format!("t-{n}")).to_string();
            let path = format!("{BASE}/streams/ticks-{}", n % 4);
            loop {
                if let Ok((200, _)) =
                    plexus_tests::http(writer_addr, "POST", &path, &[], body.as_bytes()).await
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let reader_addr = nodes.http[1];
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut from = 1;
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen.len() < 300 {
            assert!(
                Instant::now() < deadline,
                "caught up to {} only",
                seen.len()
            );
            let path = format!("{BASE}/all?from={from}&max=50&wait_ms=2000");
            let Ok((200, body)) = plexus_tests::http(reader_addr, "GET", &path, &[], b"").await
            else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let page: Value = serde_json::from_slice(&body).unwrap();
            for e in page["events"].as_array().unwrap() {
                seen.push(e["data"].as_u64().unwrap());
            }
            from = page["next"].as_u64().unwrap();
        }
        seen
    });
    writer.await.unwrap();
    let seen = reader.await.unwrap();
    // One writer, one at a time: `$all` holds them in the order written.
    assert_eq!(seen, (0..300).collect::<Vec<u64>>());
    // node-3's consumer takes 40 and dies; the others get the rest, and
    // node-3's 40 once their ack wait is over.
    let fetch = |c: &str| format!("{BASE}/subscriptions/billing/fetch?max=100&consumer={c}");
    let (_, taken) = nodes
        .call(2, "POST", &fetch("on-3").replace("max=100", "max=40"), b"")
        .await;
    let taken: BTreeSet<u64> = taken
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(taken.len(), 40);
    nodes.procs[2].take().unwrap().kill();
    let mut got: BTreeMap<u64, u64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < 300 {
        assert!(Instant::now() < deadline, "delivered {} of 300", got.len());
        let (_, batch) = nodes.call(got.len() % 2, "POST", &fetch("live"), b"").await;
        let batch = batch.as_array().unwrap().clone();
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let positions: Vec<u64> = batch
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect();
        for e in &batch {
            let p = e["position"].as_u64().unwrap();
            assert!(
                got.insert(p, e["retry"].as_u64().unwrap()).is_none(),
                "{p} delivered twice after an ack"
            );
        }
        let (status, _) = nodes
            .call(
                0,
                "POST",
                &format!("{BASE}/subscriptions/billing/ack"),
                json!(positions).to_string().as_bytes(),
            )
            .await;
        assert_eq!(status, 200);
    }
    for p in &taken {
        assert_eq!(got[p], 1, "position {p} came back as a retry");
    }
    let (_, view) = nodes
        .call(1, "GET", &format!("{BASE}/subscriptions/billing"), b"")
        .await;
    assert_eq!(view["in_flight"], 0, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstoned_stream_is_gone_on_every_node_and_from_a_restarted_nodes_storage_file() {
    let mut nodes = Processes::start(3, config).await;
    let secret = "erase-me-4f1c9b7d";
    let body = json!([
        event("Registered", json!({ "email": secret }), "r-1"),
        event("Moved", json!({ "to": secret }), "m-1")
    ]);
    let (status, _) = nodes
        .call(
            0,
            "POST",
            &format!("{BASE}/streams/user-7"),
            body.to_string().as_bytes(),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = nodes
        .call(
            1,
            "DELETE",
            &format!("{BASE}/streams/user-7?hard=true"),
            b"",
        )
        .await;
    assert_eq!(status, 200);
    for i in 0..3 {
        let (status, _) = nodes
            .call(i, "GET", &format!("{BASE}/streams/user-7"), b"")
            .await;
        assert_eq!(status, 410, "node-{}", i + 1);
        let (_, all) = nodes
            .call(i, "GET", &format!("{BASE}/all?max=1000"), b"")
            .await;
        assert!(!all.to_string().contains(secret), "node-{}: {all}", i + 1);
    }
    let (status, _) = nodes
        .call(
            2,
            "POST",
            &format!("{BASE}/streams/user-7"),
            body.to_string().as_bytes(),
        )
        .await;
    assert_eq!(status, 410);
    // More entries than `snapshot_every`: every node snapshots and drops
    // the log entry that carried the bytes. Then the nodes are stopped
    // and their files searched.
    for n in 0..120 {
        let e = event("Noise", json!(n), &format!("n-{n}")).to_string();
        let (status, _) = nodes
            .call(
                n % 3,
                "POST",
                &format!("{BASE}/streams/noise"),
                e.as_bytes(),
            )
            .await;
        assert_eq!(status, 200);
    }
    let dir = nodes.dir.path().to_path_buf();
    let holding = |dir: &std::path::Path| -> Vec<String> {
        let mut found = Vec::new();
        for entry in walk(dir) {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                found.push(entry.display().to_string());
            }
        }
        found
    };
    // A node compacts its storage file as it opens: once restarted, the
    // pages the erased values were on are given back, and the bytes are
    // gone from that file.
    nodes.procs[0].take().unwrap().kill();
    let p = nodes.spawn(0).await;
    nodes.procs[0] = Some(p);
    let (status, _) = nodes
        .call(0, "GET", &format!("{BASE}/streams/noise?max=1"), b"")
        .await;
    assert_eq!(status, 200);
    nodes.procs[0].take().unwrap().kill();
    let state = dir.join("data-1").join("state.redb");
    assert!(state.exists());
    let found = holding(&dir.join("data-1"));
    assert!(
        !found.iter().any(|f| f.ends_with("state.redb")),
        "still in node-1's storage file after a restart: {found:?}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
