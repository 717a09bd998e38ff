//! Many plugins on one node: past the engine's old fixed pool, and a full
//! pool reported in words that name the setting.

use plexus::node::LoadSpec;
use plexus::runtime::actor::PluginLimits;
use plexus::runtime::bindings::pattern::Method;
use plexus_tests::{TestNode, caps, variant, wasm};

fn kv(name: &str) -> LoadSpec {
    LoadSpec {
        name: name.into(),
        component: wasm("replicated-kv"),
        capabilities: caps(&["consensus", "storage", "log"]),
        limits: PluginLimits::default(),
        config_json: "{}".into(),
        access: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_three_hundred_copies_of_a_plugin() {
    // The fixed pool of before refused the 171st.
    let n = TestNode::new();
    for i in 0..300 {
        n.node
            .load(kv(&format!("kv-{i}")))
            .await
            .unwrap_or_else(|e| panic!("loading kv-{i}: {e}"));
    }
    for i in [0, 170, 299] {
        let r = n.call(&format!("kv-{i}"), Method::Put, "/kv/k", b"v").await;
        assert_eq!(r.status, 200, "kv-{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_instance_pool_is_refused_in_words_that_name_the_setting() {
    let n = TestNode::with_instance_slots(3);
    for i in 0..3 {
        n.node.load(kv(&format!("kv-{i}"))).await.unwrap();
    }
    let err = n.node.load(kv("kv-3")).await.unwrap_err().to_string();
    assert!(
        err.contains(
            "no room for another plugin instance: this node holds at most 3 at once (node.max_plugin_instances"
        ),
        "{err}"
    );
    // A swap needs a second instance for a moment: refused the same way,
    // and the running version keeps serving.
    let err = n
        .node
        .swap("kv-0", variant(&wasm("replicated-kv"), 1), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("node.max_plugin_instances"), "{err}");
    let r = n.call("kv-0", Method::Put, "/kv/k", b"v").await;
    assert_eq!(r.status, 200);
    // Unloading one makes room.
    n.node.unload("kv-2").await.unwrap();
    n.node.load(kv("kv-3")).await.unwrap();
    let r = n.call("kv-3", Method::Put, "/kv/k", b"v").await;
    assert_eq!(r.status, 200);
}
