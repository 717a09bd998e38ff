//! Bad components are refused with a clear error and nothing running is
//! disturbed.

use plexus::node::LoadSpec;
use plexus::runtime::actor::PluginLimits;
use plexus::runtime::bindings::pattern::Method;
use plexus_tests::{TestNode, caps, wasm};
use std::sync::Arc;

async fn load_bytes(n: &TestNode, bytes: Vec<u8>) -> String {
    n.node
        .load(LoadSpec {
            name: "bad".into(),
            component: Arc::from(bytes),
            capabilities: caps(&["storage"]),
            limits: PluginLimits::default(),
            config_json: "{}".into(),
            access: Default::default(),
        })
        .await
        .unwrap_err()
        .to_string()
}

async fn kv_node() -> TestNode {
    let n = TestNode::new();
    n.load(
        "kv",
        "replicated-kv",
        caps(&["consensus", "storage"]),
        PluginLimits::default(),
        "{}",
    )
    .await;
    n.call("kv", Method::Put, "/kv/before", b"1").await;
    n
}

async fn kv_untouched(n: &TestNode) {
    assert_eq!(
        n.call("kv", Method::Get, "/kv/before", b"").await.body,
        b"1"
    );
    assert_eq!(n.node.plugins().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_are_not_wasm() {
    let n = kv_node().await;
    let err = load_bytes(&n, b"this is not a component".to_vec()).await;
    assert!(err.contains("not a WebAssembly file"), "{err}");
    kv_untouched(&n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_component_is_refused() {
    let n = kv_node().await;
    let mut bytes = wasm("replicated-kv").to_vec();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b = 0xff;
    }
    let err = load_bytes(&n, bytes).await;
    assert!(err.contains("invalid component"), "{err}");
    let truncated = wasm("replicated-kv")[..1000].to_vec();
    let err = load_bytes(&n, truncated).await;
    assert!(err.contains("invalid component"), "{err}");
    kv_untouched(&n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_module_is_refused() {
    let n = kv_node().await;
    let err = load_bytes(&n, b"\0asm\x01\0\0\0".to_vec()).await;
    assert!(err.contains("core WebAssembly module"), "{err}");
    kv_untouched(&n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_of_another_world_is_refused() {
    let n = kv_node().await;
    // A valid component that exports a function instead of the pattern
    // interface.
    let other = wat::parse_str(
        r#"(component
             (core module $m (func (export "run") (result i32) i32.const 0))
             (core instance $i (instantiate $m))
             (func (export "run") (result u32) (canon lift (core func $i "run"))))"#,
    )
    .unwrap();
    let err = load_bytes(&n, other).await;
    assert!(
        err.contains("does not export `plexus:cluster/pattern`"),
        "{err}"
    );
    assert!(err.contains("run"), "{err}");
    kv_untouched(&n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_to_a_broken_component_keeps_the_old_version() {
    let n = kv_node().await;
    let before = n.node.plugin("kv").unwrap().version;
    let err = n
        .node
        .swap("kv", Arc::from(b"\0asm garbage".to_vec()), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(n.node.plugin("kv").unwrap().version, before);
    kv_untouched(&n).await;
}
