//! What the proxy passes on and how it answers failures, on the in-memory
//! host with a stand-in upstream.

use std::cell::RefCell;
use std::rc::Rc;

use plexus_sdk::http::FetchError;
use plexus_sdk::testing::{TestHost, request};
use plexus_sdk::{Method, Response};
use serde_json::json;

use super::Proxy;

fn proxy() -> TestHost<Proxy> {
    TestHost::with_config(json!({ "upstream": "http://127.0.0.1:9000/" })).unwrap()
}

#[test]
fn the_path_query_method_and_end_to_end_headers_reach_the_upstream() {
    let mut p = proxy();
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    p.on_fetch(move |req| {
        log.borrow_mut().push(req.clone());
        Ok(Response::text(201, "made").with_header("connection", "close"))
    });
    let mut req = request(Method::Put, "/users/7?full=1", b"{}".to_vec());
    req.headers = vec![
        ("x-trace".into(), "abc".into()),
        ("connection".into(), "keep-alive".into()),
        ("content-length".into(), "2".into()),
    ];
    let r = p.request(req).response();
    assert_eq!((r.status, r.body.as_slice()), (201, &b"made"[..]));
    assert!(!r.headers.iter().any(|(k, _)| k == "connection"));
    let seen = seen.borrow();
    assert_eq!(seen[0].url, "http://127.0.0.1:9000/users/7?full=1");
    assert_eq!(seen[0].method, Method::Put);
    assert_eq!(
        seen[0].headers,
        [("x-trace".to_string(), "abc".to_string())]
    );
    assert_eq!(seen[0].body, b"{}");
}

#[test]
fn a_refused_connection_is_502_and_a_lost_one_504() {
    let mut p = proxy();
    p.on_fetch(|req| {
        Err(if req.url.ends_with("/down") {
            FetchError::Connect("refused".into())
        } else {
            FetchError::Timeout
        })
    });
    assert_eq!(p.get("/down").status, 502);
    assert_eq!(p.get("/slow").status, 504);
    let stats: serde_json::Value = serde_json::from_slice(&p.get("/_proxy/stats").body).unwrap();
    assert_eq!(
        stats,
        json!({ "passed": 2, "answered": 0, "unknown_outcome": 1, "failed": 1 })
    );
}

#[test]
fn the_counts_survive_a_swap() {
    let mut p = proxy();
    p.on_fetch(|_| Ok(Response::text(200, "ok")));
    p.get("/a");
    let mut p = p.swap::<Proxy>().unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&p.get("/_proxy/stats").body).unwrap();
    assert_eq!(stats["answered"], 1);
}

#[test]
fn a_proxy_without_an_upstream_does_not_start() {
    let err = TestHost::<Proxy>::start().err().unwrap();
    assert_eq!(err, "config: missing field `upstream`");
}
