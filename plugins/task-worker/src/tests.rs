//! The worker's loop against a stand-in queue on the in-memory host: what
//! it leases, runs and reports, and how it waits.

use std::cell::RefCell;
use std::rc::Rc;

use plexus_sdk::plugins::Error;
use plexus_sdk::testing::TestHost;
use plexus_sdk::{Method, Request, Response};
use serde_json::{Value, json};

use super::{Worker, run};

/// The queue as the worker sees it: tasks to hand out, and what came back.
#[derive(Default)]
struct Queue {
    ready: Vec<Value>,
    leases: Vec<String>,
    reports: Vec<(String, String, String)>,
    /// Answer every report with 409 (a lease already lost).
    stale: bool,
    down: bool,
}

fn worker(queue: &Rc<RefCell<Queue>>) -> TestHost<Worker> {
    let mut h = TestHost::<Worker>::setup()
        .node("n1")
        .config(json!({ "batch": 3, "wait_ms": 0 }))
        .start()
        .unwrap();
    let q = queue.clone();
    h.on_plugin_call(move |plugin, node, req: &Request| {
        assert_eq!((plugin, node), ("wq", None));
        let mut q = q.borrow_mut();
        if q.down {
            return Err(Error::NoSuchPlugin("wq".into()));
        }
        assert_eq!(req.method, Method::Post);
        if req.path == "/queues/jobs/lease" {
            q.leases.push(req.query.clone());
            let n = q.ready.len().min(3);
            let tasks: Vec<Value> = q.ready.drain(..n).collect();
            return Ok(match tasks.is_empty() {
                true => Response::new(204, "application/json", Vec::new()),
                false => Response::json(200, &tasks),
            });
        }
        let body = String::from_utf8_lossy(&req.body).into_owned();
        q.reports.push((req.path.clone(), req.query.clone(), body));
        Ok(match q.stale {
            true => Response::error(409, "stale token"),
            false => Response::json(200, &json!({})),
        })
    });
    h
}

fn task(id: &str, token: u64, payload: Value) -> Value {
    json!({ "id": id, "token": token, "payload": payload })
}

fn stats(h: &mut TestHost<Worker>) -> Value {
    serde_json::from_slice(&h.get("/stats").body).unwrap()
}

#[test]
fn each_op_gives_its_result_or_its_error() {
    assert_eq!(
        run(&json!({ "op": "sum", "args": [1, 2, 3.5] })),
        Ok(json!({ "sum": 6.5 }))
    );
    assert_eq!(
        run(&json!({ "op": "words", "text": "to be or Not to BE" })),
        Ok(json!({ "words": 6, "distinct": 4 }))
    );
    let once = run(&json!({ "op": "hash", "text": "a" })).unwrap();
    assert_eq!(once["hash"], "af63dc4c8601ec8c");
    let twice = run(&json!({ "op": "hash", "text": "a", "rounds": 2 })).unwrap();
    assert_ne!(once, twice);
    assert_eq!(
        run(&json!({ "op": "fail", "error": "boom" })),
        Err("boom".into())
    );
    assert!(run(&json!({ "op": "sum", "args": ["x"] })).is_err());
    assert!(run(&json!({ "op": "hash", "text": "a", "rounds": 0 })).is_err());
    assert_eq!(run(&json!({ "op": "nap" })), Err("unknown op `nap`".into()));
    assert!(run(&json!(7)).is_err());
}

#[test]
fn it_leases_in_batches_and_reports_each_task_under_its_token() {
    let queue = Rc::new(RefCell::new(Queue::default()));
    queue.borrow_mut().ready = vec![
        task("a", 1, json!({ "op": "sum", "args": [1, 2] })),
        task("b", 4, json!({ "op": "fail", "error": "no" })),
        task("c", 1, json!({ "op": "words", "text": "x y" })),
        task("d", 2, json!({ "op": "sum", "args": [5] })),
    ];
    let mut h = worker(&queue);
    h.advance(0);
    let q = queue.borrow();
    assert!(q.leases[0].contains("worker=task-worker@n1") && q.leases[0].contains("max=3"));
    let reports: Vec<(&str, &str, &str)> = q
        .reports
        .iter()
        .map(|(p, q, b)| (p.as_str(), q.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        reports,
        [
            ("/tasks/a/complete", "token=1", r#"{"sum":3.0}"#),
            ("/tasks/b/fail", "token=4", "no"),
            (
                "/tasks/c/complete",
                "token=1",
                r#"{"distinct":2,"words":2}"#
            ),
            ("/tasks/d/complete", "token=2", r#"{"sum":5.0}"#),
        ]
    );
    drop(q);
    let s = stats(&mut h);
    assert_eq!(
        (s["done"].clone(), s["failed"].clone(), s["leases"].clone()),
        (json!(3), json!(1), json!(2))
    );
}

#[test]
fn a_refused_result_counts_as_stale_and_the_loop_goes_on() {
    let queue = Rc::new(RefCell::new(Queue {
        stale: true,
        ..Queue::default()
    }));
    queue.borrow_mut().ready = vec![task("a", 1, json!({ "op": "sum", "args": [] }))];
    let mut h = worker(&queue);
    h.advance(0);
    assert_eq!(stats(&mut h)["stale"], 1);
    queue.borrow_mut().ready = vec![task("b", 1, json!({ "op": "sum", "args": [] }))];
    h.advance(1000);
    assert_eq!(stats(&mut h)["stale"], 2);
}

#[test]
fn an_empty_or_failed_lease_waits_a_second_before_the_next() {
    let queue = Rc::new(RefCell::new(Queue {
        down: true,
        ..Queue::default()
    }));
    let mut h = worker(&queue);
    h.advance(0);
    let s = stats(&mut h);
    assert_eq!(s["errors"], 1);
    assert!(s["last_error"].as_str().unwrap().contains("lease"), "{s}");
    queue.borrow_mut().down = false;
    h.advance(999);
    assert!(queue.borrow().leases.is_empty());
    h.advance(1);
    assert_eq!(queue.borrow().leases.len(), 1);
    // Nothing there: the next look is a second later too.
    h.advance(999);
    assert_eq!(queue.borrow().leases.len(), 1);
    h.advance(1);
    assert_eq!(queue.borrow().leases.len(), 2);
}

#[test]
fn a_paused_worker_leases_nothing_until_resumed() {
    let queue = Rc::new(RefCell::new(Queue::default()));
    let mut h = worker(&queue);
    assert_eq!(h.post("/pause", "").status, 200);
    queue.borrow_mut().ready = vec![task("a", 1, json!({ "op": "sum", "args": [] }))];
    h.advance(5000);
    assert!(queue.borrow().leases.is_empty());
    assert_eq!(h.post("/resume", "").status, 200);
    h.advance(0);
    assert_eq!(stats(&mut h)["done"], 1);
}

#[test]
fn bad_config_is_refused_at_init() {
    let err = TestHost::<Worker>::setup()
        .config(json!({ "batch": 0 }))
        .start()
        .err()
        .unwrap();
    assert!(err.contains("batch"), "{err}");
    let err = TestHost::<Worker>::setup()
        .config(json!({ "queu": "x" }))
        .start()
        .err()
        .unwrap();
    assert!(err.contains("queu"), "{err}");
}

#[test]
fn the_counts_carry_over_a_swap() {
    let queue = Rc::new(RefCell::new(Queue::default()));
    queue.borrow_mut().ready = vec![task("a", 1, json!({ "op": "sum", "args": [] }))];
    let mut h = worker(&queue);
    h.advance(0);
    let mut h = h.swap::<Worker>().unwrap();
    assert_eq!(stats(&mut h)["done"], 1);
}
