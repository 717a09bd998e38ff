//! Golden config files: every file under `tests/configs/valid` parses;
//! every file under `tests/configs/invalid` fails with exactly the error in
//! the `.err` file beside it (file, line, column, key, message).
//!
//! Set `PLEXUS_BLESS=1` to write the `.err` files from the current output.

use std::path::Path;

use plexus::config::Config;

fn files(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no configs in {}", dir.display());
    files
}

#[test]
fn valid_configs_parse() {
    for path in files("valid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = format!("valid/{}", path.file_name().unwrap().to_string_lossy());
        if let Err(e) = Config::parse(&text, &name, Path::new("/base")) {
            panic!("{name} should be valid: {e}");
        }
    }
}

#[test]
fn invalid_configs_fail_with_the_golden_error() {
    let bless = std::env::var_os("PLEXUS_BLESS").is_some();
    let mut mismatches = Vec::new();
    for path in files("invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = format!("invalid/{}", path.file_name().unwrap().to_string_lossy());
        let err = match Config::parse(&text, &name, Path::new("/base")) {
            Ok(_) => panic!("{name} should be rejected"),
            Err(e) => format!("{e}\n"),
        };
        let golden = path.with_extension("err");
        if bless {
            std::fs::write(&golden, &err).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("missing {}", golden.display()));
        if expected != err {
            mismatches.push(format!("{name}:\n  expected: {expected}  actual:   {err}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn full_config_carries_every_setting() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/valid/full.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c.node.id, "edge-7");
    assert_eq!(c.node.request_timeout_ms, 2500);
    assert_eq!(c.node.metadata["rack"], "r12");
    assert_eq!(c.cluster.peers.len(), 2);
    assert_eq!(c.cluster.snapshot_every, 5000);
    assert_eq!(c.cluster.heartbeat_ms, 100);
    assert_eq!(c.cluster.election_timeout_ms, [400, 800]);
    let kv = &c.plugins[0];
    assert_eq!(kv.limits.to_limits().memory_bytes, 128 << 20);
    assert_eq!(kv.limits.to_limits().mailbox, 64);
    let config: serde_json::Value = serde_json::from_str(&kv.config_json()).unwrap();
    assert_eq!(
        config,
        serde_json::json!({ "replicas": 3, "mode": "strict" })
    );
}

#[test]
fn example_configs_are_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for dir in [examples.clone(), examples.join("cluster")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 5, "single-node.toml and the four cluster nodes");
}
