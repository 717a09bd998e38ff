//! pubsub on its real `.wasm`: on one node, topics, groups, acks and a
//! dead letter; on three `plexus` processes, a group shared across nodes
//! whose killed consumer's messages go to the others, and publishing
//! through a cluster-wide swap and a kill -9 without losing an
//! acknowledged message or storing one twice.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plexus::runtime::actor::PluginLimits;
use plexus::runtime::bindings::pattern::Method;
use plexus_tests::{Processes, TestNode, body_json, caps, cluster_node_config, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_node_a_group_acks_redelivers_and_dead_letters() {
    let n = TestNode::new();
    n.load(
        "pubsub",
        "pubsub",
        caps(&["consensus", "storage", "timers"]),
        PluginLimits::default(),
        "{}",
    )
    .await;
    assert_eq!(
        n.call("pubsub", Method::Put, "/topics/jobs", b"")
            .await
            .status,
        200
    );
    let group = br#"{"ack_wait_ms": 200, "max_deliver": 2}"#;
    let r = n
        .call("pubsub", Method::Put, "/topics/jobs/groups/workers", group)
        .await;
    assert_eq!(r.status, 200);
    for job in ["a", "b"] {
        let r = n
            .call(
                "pubsub",
                Method::Post,
                "/topics/jobs/publish",
                job.as_bytes(),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let fetch = "/topics/jobs/groups/workers/fetch?max=10&consumer=w1";
    let got = body_json(&n.call("pubsub", Method::Post, fetch, b"").await);
    assert_eq!(got.as_array().unwrap().len(), 2);
    let r = n
        .call(
            "pubsub",
            Method::Post,
            "/topics/jobs/groups/workers/ack/1",
            b"",
        )
        .await;
    assert_eq!(body_json(&r)["acked"], true);
    // "b" was not acked: it comes back once its ack wait is over, then goes
    // to the dead-letter topic after its second delivery.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut deliveries = 1;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = body_json(&n.call("pubsub", Method::Post, fetch, b"").await);
        if let Some(m) = got.as_array().unwrap().first() {
            assert_eq!(
                (m["seq"].as_u64(), m["data"].as_str()),
                (Some(2), Some("b"))
            );
            deliveries = m["deliveries"].as_u64().unwrap();
        }
        let dlq = n.call("pubsub", Method::Get, "/topics/jobs.dlq", b"").await;
        if dlq.status == 200 && body_json(&dlq)["count"] == 1 {
            assert_eq!(deliveries, 2, "moved after its second delivery");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "message 2 never reached the dead-letter topic"
        );
    }
}

fn config(i: usize, http: &[SocketAddr], peer: &[SocketAddr]) -> String {
    let plugin = r#"
[admin]
token = "pubsub-token"

[[plugins]]
name = "pubsub"
component = "bundled:pubsub"
capabilities = ["consensus", "storage", "timers"]
"#;
    cluster_node_config(i, http, peer, "", plugin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumers_messages_go_to_the_groups_other_members() {
    let mut nodes = Processes::start(3, config).await;
    assert_eq!(
        nodes
            .call(0, "PUT", "/v1/plugins/pubsub/topics/jobs", b"")
            .await
            .0,
        200
    );
    let group = br#"{"ack_wait_ms": 1000}"#;
    assert_eq!(
        nodes
            .call(0, "PUT", "/v1/plugins/pubsub/topics/jobs/groups/w", group)
            .await
            .0,
        200
    );
    for i in 0..6 {
        let (status, _) = nodes
            .call(
                i % 3,
                "POST",
                "/v1/plugins/pubsub/topics/jobs/publish",
                format!("job-{i}").as_bytes(),
            )
            .await;
        assert_eq!(status, 200);
    }
    // node-3's consumer takes three and dies without acking.
    let fetch =
        |c: &str| format!("/v1/plugins/pubsub/topics/jobs/groups/w/fetch?max=3&consumer={c}");
    let (_, taken) = nodes.call(2, "POST", &fetch("on-3"), b"").await;
    let taken: Vec<u64> = taken
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(taken.len(), 3);
    nodes.procs[2].take().unwrap().kill();
    // node-2's consumer gets the other three at once, and node-3's three
    // once their ack wait is over, as second deliveries.
    let (_, rest) = nodes.call(1, "POST", &fetch("on-2"), b"").await;
    let mut seen: BTreeMap<u64, u64> = rest
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["deliveries"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen.len(), 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    while taken.iter().any(|s| !seen.contains_key(s)) {
        assert!(Instant::now() < deadline, "redelivered so far: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, again) = nodes.call(0, "POST", &fetch("on-1"), b"").await;
        for m in again.as_array().unwrap() {
            seen.insert(
                m["seq"].as_u64().unwrap(),
                m["deliveries"].as_u64().unwrap(),
            );
        }
    }
    for s in &taken {
        assert_eq!(seen[s], 2, "message {s}");
    }
    assert_eq!(seen.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_through_a_swap_and_a_kill_loses_and_doubles_nothing() {
    let mut nodes = Processes::start(3, config).await;
    assert_eq!(
        nodes
            .call(0, "PUT", "/v1/plugins/pubsub/topics/events", b"")
            .await
            .0,
        200
    );
    // Publishers on nodes 1 and 2, each message with an id: a retry after
    // an unknown outcome is stored once.
    let addrs = nodes.http.clone();
    let publisher = |n: usize| {
        let addr = addrs[n];
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..60 {
                let id = format!("n{n}-{i}");
                let path = format!("/v1/plugins/pubsub/topics/events/publish?id={id}");
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match http(addr, "POST", &path, &[], id.as_bytes()).await {
                        Ok((200, _)) => {
                            acked.push(id);
                            break;
                        }
                        _ if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        other => panic!("{id} never published: {other:?}"),
                    }
                }
            }
            acked
        })
    };
    let (a, b) = (publisher(0), publisher(1));
    // Meanwhile: a cluster-wide swap, then kill -9 of node-3 and a restart.
    let component = plexus_tests::variant(&plexus_tests::wasm("pubsub"), 7);
    let auth = ("authorization", "Bearer pubsub-token");
    let (status, body) = http(
        nodes.http[0],
        "POST",
        "/v1/admin/plugins/pubsub/swap?scope=cluster",
        &[auth],
        &component,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    nodes.procs[2].take().unwrap().kill();
    let p = nodes.spawn(2).await;
    nodes.procs[2] = Some(p);
    let mut acked = a.await.unwrap();
    acked.extend(b.await.unwrap());
    assert_eq!(acked.len(), 120);
    // A new group on the restarted node reads the whole topic: every
    // acknowledged message, once.
    assert_eq!(
        nodes
            .call(
                2,
                "PUT",
                "/v1/plugins/pubsub/topics/events/groups/audit",
                b""
            )
            .await
            .0,
        200
    );
    let (_, all) = nodes
        .call(
            2,
            "POST",
            "/v1/plugins/pubsub/topics/events/groups/audit/fetch?max=1000",
            b"",
        )
        .await;
    let mut stored: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_str().unwrap().to_string())
        .collect();
    let total = stored.len();
    stored.sort();
    stored.dedup();
    assert_eq!(stored.len(), total, "a message was stored twice");
    acked.sort();
    assert_eq!(stored, acked);
}

/// A fetch waiting on one node is answered by a publish on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_one_node_is_answered_by_a_publish_on_another() {
    let nodes = Processes::start(3, config).await;
    assert_eq!(
        nodes
            .call(0, "PUT", "/v1/plugins/pubsub/topics/news", b"")
            .await
            .0,
        200
    );
    assert_eq!(
        nodes
            .call(
                0,
                "PUT",
                "/v1/plugins/pubsub/topics/news/groups/readers",
                b""
            )
            .await
            .0,
        200
    );
    // Once node-2 sees the group, its fetch waits.
    let fetch = "/v1/plugins/pubsub/topics/news/groups/readers/fetch?max=5&wait_ms=30000";
    let (status, empty) = nodes
        .call(
            1,
            "POST",
            "/v1/plugins/pubsub/topics/news/groups/readers/fetch",
            b"",
        )
        .await;
    assert_eq!((status, empty), (200, serde_json::json!([])));
    let waiting = tokio::spawn(http(nodes.http[1], "POST", fetch, &[], b""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "an empty long poll answered at once"
    );
    let started = Instant::now();
    assert_eq!(
        nodes
            .call(
                0,
                "POST",
                "/v1/plugins/pubsub/topics/news/publish",
                b"extra"
            )
            .await
            .0,
        200
    );
    let (status, body) = waiting.await.unwrap().unwrap();
    assert_eq!(status, 200);
    let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got[0]["data"], "extra", "{got}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered at the deadline, not by the publish"
    );
}

/// Publishers and a shared group's consumers on the two followers while
/// the leader is killed: every publish that got its 2xx is delivered and
/// acked, and none is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_while_publishing_loses_no_acknowledged_message() {
    const PER_PUBLISHER: usize = 150;
    let mut nodes = Processes::start(3, config).await;
    let topic = "/v1/plugins/pubsub/topics/orders";
    assert_eq!(nodes.call(0, "PUT", topic, b"").await.0, 200);
    let group = br#"{"ack_wait_ms": 2000}"#;
    let (status, _) = nodes
        .call(0, "PUT", &format!("{topic}/groups/g"), group)
        .await;
    assert_eq!(status, 200);
    let leader = nodes.leader("pubsub-token").await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let addrs = nodes.http.clone();
    // A publisher on each follower; a retry after an unknown outcome
    // carries the same id, so it is stored once.
    let publisher = |n: usize| {
        let addr = addrs[n];
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PER_PUBLISHER {
                let id = format!("n{n}-{i}");
                let path = format!("{topic}/publish?id={id}");
                let (status, body) = Processes::call_while_up(addr, "POST", &path, id.as_bytes())
                    .await
                    .unwrap();
                assert_eq!(status, 200, "{body}");
                acked.push(id);
            }
            acked
        })
    };
    // A consumer on each follower, acking what it gets in lists, until
    // told that publishing is over and it finds nothing more.
    let done = Arc::new(AtomicBool::new(false));
    let consumer = |n: usize| {
        let (addr, done) = (addrs[n], done.clone());
        tokio::spawn(async move {
            let fetch = format!("{topic}/groups/g/fetch?max=50&consumer=c{n}&wait_ms=500");
            let (mut got, mut acked, mut redelivered) = (Vec::new(), 0u64, 0u64);
            loop {
                let (status, msgs) = Processes::call_while_up(addr, "POST", &fetch, b"")
                    .await
                    .unwrap();
                assert_eq!(status, 200, "{msgs}");
                let msgs = msgs.as_array().unwrap().clone();
                if msgs.is_empty() && done.load(Ordering::Relaxed) {
                    return (got, acked, redelivered);
                }
                let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
                for m in &msgs {
                    got.push(m["data"].as_str().unwrap().to_string());
                    redelivered += u64::from(m["deliveries"].as_u64().unwrap() > 1);
                }
                if seqs.is_empty() {
                    continue;
                }
                let body = serde_json::to_vec(&seqs).unwrap();
                let path = format!("{topic}/groups/g/ack");
                let (status, r) = Processes::call_while_up(addr, "POST", &path, &body)
                    .await
                    .unwrap();
                assert_eq!(status, 200, "{r}");
                acked += r["acked"].as_u64().unwrap();
            }
        })
    };
    let publishers: Vec<_> = followers.iter().map(|&n| publisher(n)).collect();
    let consumers: Vec<_> = followers.iter().map(|&n| consumer(n)).collect();
    // Once some messages are through, the leader dies.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, t) = nodes.call(followers[0], "GET", topic, b"").await;
        if t["last_seq"].as_u64().unwrap_or(0) >= 50 {
            break;
        }
        assert!(Instant::now() < deadline, "publishing never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes.procs[leader].take().unwrap().kill();
    let mut published = Vec::new();
    for p in publishers {
        published.extend(p.await.unwrap());
    }
    done.store(true, Ordering::Relaxed);
    let (mut delivered, mut acked, mut redelivered) = (Vec::new(), 0, 0);
    for c in consumers {
        let (got, a, r) = c.await.unwrap();
        delivered.extend(got);
        acked += a;
        redelivered += r;
    }
    assert_eq!(published.len(), 2 * PER_PUBLISHER);
    // Every acknowledged publish was delivered; nothing is left out.
    delivered.sort();
    delivered.dedup();
    published.sort();
    assert_eq!(delivered, published, "delivered vs published");
    let (_, g) = nodes
        .call(followers[0], "GET", &format!("{topic}/groups/g"), b"")
        .await;
    assert_eq!(g["out"], 0, "{g}");
    // Acks lost in flight with the leader are sent again and find nothing
    // out, so acks counted here are at most one per message.
    assert!(acked <= published.len() as u64, "{acked} acks");
    // A new group reads the whole topic: each message stored once.
    let (status, _) = nodes
        .call(followers[1], "PUT", &format!("{topic}/groups/audit"), b"")
        .await;
    assert_eq!(status, 200);
    let audit = format!("{topic}/groups/audit/fetch?max=1000");
    let (_, all) = nodes.call(followers[1], "POST", &audit, b"").await;
    let mut stored: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_str().unwrap().to_string())
        .collect();
    stored.sort();
    assert_eq!(stored, published, "stored once each");
    eprintln!("{acked} acks counted, {redelivered} redeliveries");
}
