//! Each kind of call the relay makes, answered by stand-ins on the
//! in-memory host.

use plexus_sdk::messaging;
use plexus_sdk::plugins;
use plexus_sdk::testing::{Answer, TestHost, request};
use plexus_sdk::{Method, Response};
use serde_json::{Value, json};

use super::Relay;

fn relay() -> TestHost<Relay> {
    TestHost::setup()
        .node("a")
        .members(&["a", "b"])
        .start()
        .unwrap()
}

fn body(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn echo_names_the_node_the_path_and_the_source() {
    let mut r = relay();
    let out = body(&r.post("/echo/x?y=1", "hi"));
    assert_eq!(out["node"], "a");
    assert_eq!(out["path"], "/x");
    assert_eq!(out["query"], "y=1");
    assert_eq!(out["body"], "hi");
    assert_eq!(out["source"], json!({ "client": null }));
}

#[test]
fn a_request_for_another_node_is_forwarded_with_the_hop_count() {
    let mut r = relay();
    let Answer::Forwarded(to) = r.request(request(Method::Get, "/on/b/echo/x", Vec::new())) else {
        panic!("not forwarded");
    };
    assert_eq!(to.node, "b");
    assert!(
        to.headers
            .contains(&("x-relay-hop".to_string(), "1".to_string()))
    );
    // Addressed to itself, it answers.
    assert_eq!(body(&r.get("/on/a/echo/x"))["path"], "/echo/x");
}

#[test]
fn an_ask_is_answered_by_the_other_nodes_echo_and_a_silent_one_is_504() {
    let mut r = relay();
    r.on_message_to(|node, topic, payload| match node {
        "b" => Ok([format!("{node}:{topic}:").as_bytes(), payload].concat()),
        _ => Err(messaging::Error::Timeout),
    });
    assert_eq!(r.post("/ask/b", "ping").body, b"b:echo:ping");
    r.member("c", plexus_sdk::MemberState::Alive);
    assert_eq!(r.post("/ask/c", "ping").status, 504);
    assert_eq!(r.post("/ask/nobody", "ping").status, 502);
    assert_eq!(
        body(&r.get("/stats")),
        json!({ "calls": 2, "outcomes": 2, "echoes": 0 })
    );
}

#[test]
fn a_plugin_call_carries_the_rest_of_the_path_and_the_callees_answer() {
    let mut r = relay();
    r.on_plugin_call(|plugin, node, req| match plugin {
        "kv" => Ok(Response::text(
            200,
            &format!("{:?} {} {:?}", node, req.path, req.body),
        )),
        other => Err(plugins::Error::NoSuchPlugin(other.into())),
    });
    assert_eq!(
        r.post("/call/kv/kv/a?node=b", "v").body,
        br#"Some("b") /kv/a [118]"#
    );
    assert_eq!(r.post("/call/other/x", "").status, 404);
}

#[test]
fn held_requests_wait_until_released() {
    let mut r = relay();
    let Answer::Waiting(first) = r.request(request(Method::Get, "/hold", Vec::new())) else {
        panic!("a held request was answered at once");
    };
    assert_eq!(body(&r.post("/release", ""))["released"], 1);
    assert_eq!(r.answer_of(first).unwrap().body, b"released");
}

#[test]
fn a_message_on_the_echo_topic_is_answered_with_this_nodes_prefix() {
    let mut r = relay();
    assert_eq!(r.message("b", "echo", b"x"), Some(b"a:x".to_vec()));
    assert_eq!(r.message("b", "other", b"x"), None);
}

#[test]
fn a_burst_is_numbered_in_order_and_the_receiver_lists_what_came() {
    let mut r = relay();
    assert_eq!(body(&r.post("/burst/b?n=3", "")), json!({ "sent": 3 }));
    let sent: Vec<(Option<String>, Vec<u8>)> =
        r.sent().into_iter().map(|m| (m.to, m.payload)).collect();
    let expected: Vec<(Option<String>, Vec<u8>)> = (0..3u64)
        .map(|i| (Some("b".to_string()), i.to_le_bytes().to_vec()))
        .collect();
    assert_eq!(sent, expected);
    r.message("b", "seq", &7u64.to_le_bytes());
    assert_eq!(body(&r.get("/seen")), json!([["b", 7]]));
    assert_eq!(r.post("/burst/nobody?n=1", "").status, 502);
}
