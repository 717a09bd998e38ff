//! Operating a running `plexus` process: live reconcile of an edited
//! config, the admin API, the `plexus plugin …` / `cluster status` CLI, and
//! `plexus new` scaffolding a plugin that builds, loads and answers.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use plexus_tests::{Process, free_port, http, plexus_bin};

const TOKEN: &str = "operate-token";

fn config(port: u16, plugins: &str) -> String {
    format!(
        r#"version = 1

[node]
id = "node-1"
data_dir = "data"
http = "127.0.0.1:{port}"

[admin]
token = "{TOKEN}"
{plugins}"#
    )
}

const KV: &str = r#"
[[plugins]]
name = "kv"
component = "bundled:replicated-kv"
capabilities = ["consensus", "storage"]
"#;

fn election(ttl: u64) -> String {
    election_with(&format!("{{ ttl_ms = {ttl} }}"))
}

async fn plugins(addr: SocketAddr) -> serde_json::Value {
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(
        addr,
        "GET",
        "/v1/admin/plugins",
        &[("authorization", &auth)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// Waits until the plugin list satisfies `check`.
async fn wait_for(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = plugins(addr).await;
        if check(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; plugins: {list:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (up to 20 s) for a line of `p`'s log that contains `needle`;
/// returns that line and the whole log.
async fn log_line(p: &Process, needle: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&p.log).unwrap();
        if let Some(line) = log.lines().find(|l| l.contains(needle)) {
            return (line.to_string(), log);
        }
        assert!(Instant::now() < deadline, "no `{needle}` in the log: {log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn find<'a>(list: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    list.as_array().unwrap().iter().find(|p| p["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_config_reconciles_the_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config(port, KV)).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = Process::up(dir.path(), &path, addr).await;
    http(addr, "PUT", "/v1/plugins/kv/kv/a", &[], b"1")
        .await
        .unwrap();

    // Add a plugin.
    std::fs::write(&path, config(port, &format!("{KV}{}", election(3000)))).unwrap();
    wait_for(addr, "election to load", |l| find(l, "election").is_some()).await;

    // Change its config: a swap, not a reload.
    std::fs::write(&path, config(port, &format!("{KV}{}", election(5000)))).unwrap();
    let list = wait_for(addr, "election to swap", |l| {
        find(l, "election").is_some_and(|e| e["swaps"] == 1)
    })
    .await;
    assert_eq!(find(&list, "kv").unwrap()["swaps"], 0, "kv was not touched");

    // An invalid edit is rejected and changes nothing.
    std::fs::write(&path, "version = 1\n[[plugins]]\nname = 7\n").unwrap();
    let (_, log) = log_line(&p, "config change rejected").await;
    assert!(log.contains("plugins[0].name"), "{log}");
    let list = plugins(addr).await;
    assert_eq!(list.as_array().unwrap().len(), 2);

    // Remove kv: it unloads; its data stays for when it comes back.
    std::fs::write(&path, config(port, &election(5000))).unwrap();
    wait_for(addr, "kv to unload", |l| find(l, "kv").is_none()).await;
    let (status, _) = http(addr, "GET", "/v1/plugins/kv/kv/a", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 404);
    std::fs::write(&path, config(port, &format!("{KV}{}", election(5000)))).unwrap();
    wait_for(addr, "kv to load again", |l| find(l, "kv").is_some()).await;
    let (status, body) = http(addr, "GET", "/v1/plugins/kv/kv/a", &[], b"")
        .await
        .unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"1"[..]));

    // A `[node]` setting changes only at a restart, and the log says so.
    let edited = config(port, &format!("{KV}{}", election(5000)))
        .replace("[admin]", "max_connections = 100\n\n[admin]");
    std::fs::write(&path, edited).unwrap();
    let (line, _) = log_line(&p, "take effect when the node restarts").await;
    assert!(line.contains("sections=node"), "{line}");
    drop(p);
}

fn cli(addr: SocketAddr, token: &str, args: &[&str]) -> Output {
    std::process::Command::new(plexus_bin())
        .args(args)
        .env("PLEXUS_ADDR", addr.to_string())
        .env("PLEXUS_TOKEN", token)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn node_with_kv() -> (tempfile::TempDir, Process) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config(port, KV)).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = Process::up(dir.path(), &path, addr).await;
    (dir, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_commands_drive_a_running_node() {
    let (dir, p) = node_with_kv().await;
    let addr = p.addr;

    let list = stdout(&cli(addr, TOKEN, &["plugin", "list"]));
    let header = list.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("VERSION") && header.contains("RESTARTS"),
        "{list}"
    );
    assert!(list.lines().nth(1).unwrap().starts_with("kv "), "{list}");

    // Load from a local file (uploaded), with capabilities and config.
    let wasm = dir.path().join("election.wasm");
    std::fs::write(&wasm, plexus::bundled::get("leader-election").unwrap()).unwrap();
    let out = stdout(&cli(
        addr,
        TOKEN,
        &[
            "plugin",
            "load",
            "election",
            wasm.to_str().unwrap(),
            "--cap",
            "consensus",
            "--cap",
            "storage",
            "--cap",
            "timers",
            "--cap",
            "log",
            "--config",
            r#"{"ttl_ms": 2000}"#,
        ],
    ));
    assert!(out.starts_with("loaded election (version "), "{out}");
    let (status, _) = http(
        addr,
        "POST",
        "/v1/plugins/election/roles/db/acquire",
        &[],
        br#"{"holder": "me"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);

    // Swap to a bundled build, then list as JSON.
    let out = stdout(&cli(
        addr,
        TOKEN,
        &["plugin", "swap", "kv", "bundled:replicated-kv"],
    ));
    assert!(out.starts_with("swapped kv: "), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&cli(addr, TOKEN, &["plugin", "list", "--json"]))).unwrap();
    assert_eq!(find(&json, "kv").unwrap()["swaps"], 1);
    assert_eq!(json.as_array().unwrap().len(), 2);

    // A refused load explains why and exits non-zero.
    let bad = cli(
        addr,
        TOKEN,
        &[
            "plugin",
            "load",
            "kv2",
            "bundled:replicated-kv",
            "--cap",
            "storage",
        ],
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("plexus:cluster/consensus") && err.contains("not granted"),
        "{err}"
    );

    let status = stdout(&cli(addr, TOKEN, &["cluster", "status"]));
    assert!(status.contains("node          node-1"), "{status}");
    assert!(status.contains("leader        node-1"), "{status}");

    let out = stdout(&cli(addr, TOKEN, &["plugin", "unload", "election"]));
    assert_eq!(out.trim(), "unloaded election");

    let denied = cli(addr, "wrong-token", &["plugin", "list"]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("--token"));
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_load_and_unload_over_http() {
    let (_dir, p) = node_with_kv().await;
    let auth = format!("Bearer {TOKEN}");
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let body = br#"{"name": "chaos", "component": "bundled:chaos", "capabilities": ["timers"], "limits": {"memory_mib": 32}}"#;
    let (status, out) = http(p.addr, "POST", "/v1/admin/plugins", &h, body)
        .await
        .unwrap();
    assert_eq!(
        status,
        422,
        "chaos imports more than timers: {}",
        String::from_utf8_lossy(&out)
    );
    let body = br#"{"name": "chaos", "component": "bundled:chaos", "capabilities": ["consensus", "messaging", "storage", "timers", "log"]}"#;
    let (status, _) = http(p.addr, "POST", "/v1/admin/plugins", &h, body)
        .await
        .unwrap();
    assert_eq!(status, 201);
    let (status, _) = http(p.addr, "POST", "/v1/admin/plugins", &h, body)
        .await
        .unwrap();
    assert_eq!(status, 409);
    let (status, _) = http(p.addr, "POST", "/v1/admin/plugins", &h, b"{\"name\": 1}")
        .await
        .unwrap();
    assert_eq!(status, 400);
    let (status, _) = http(p.addr, "GET", "/v1/plugins/chaos/ping", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    // A looping request answers 503 to its caller, not a hang.
    let (status, _) = http(p.addr, "POST", "/v1/plugins/chaos/loop", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 503);
    let (status, _) = http(p.addr, "DELETE", "/v1/admin/plugins/chaos", &h, b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, _) = http(p.addr, "GET", "/v1/plugins/chaos/ping", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 404);

    // The component's bytes themselves, as `wasm_base64`.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(plexus_tests::wasm("chaos"));
    let body = format!(
        r#"{{"name": "chaos-2", "wasm_base64": "{b64}", "capabilities": ["consensus", "messaging", "storage", "timers", "log"]}}"#
    );
    let (status, out) = http(p.addr, "POST", "/v1/admin/plugins", &h, body.as_bytes())
        .await
        .unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&out));
    let (status, _) = http(p.addr, "GET", "/v1/plugins/chaos-2/ping", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let body = br#"{"name": "chaos-3", "wasm_base64": "not base64!"}"#;
    let (status, out) = http(p.addr, "POST", "/v1/admin/plugins", &h, body)
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&out).contains("wasm_base64"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffolded_plugin_builds_loads_and_answers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let work = tempfile::tempdir().unwrap();
    let crate_dir = work.path().join("counter");
    let out = std::process::Command::new(plexus_bin())
        .args(["new", "counter", "--dir"])
        .arg(&crate_dir)
        .arg("--sdk")
        .arg(root.join("sdk"))
        .output()
        .unwrap();
    let printed = stdout(&out);
    assert!(printed.contains("created"), "{printed}");

    // Same dependency versions as the workspace, so the shared target
    // directory already holds them.
    std::fs::copy(root.join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    let target = root.join("target/plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--offline",
            "--target-dir",
        ])
        .arg(&target)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .current_dir(&crate_dir)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let wasm = target.join("wasm32-wasip2/release/plexus_plugin_counter.wasm");

    // Its native unit tests pass on the in-memory host. (The plugins'
    // target directory: the outer build may hold the lock on the main one.)
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tested = std::process::Command::new(cargo)
        .args(["test", "--offline", "--target-dir"])
        .arg(&target)
        .current_dir(&crate_dir)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&tested.stdout);
    assert!(
        tested.status.success() && report.contains("5 passed"),
        "{report}\n{}",
        String::from_utf8_lossy(&tested.stderr)
    );

    // `plexus inspect` derives the load command from the imports.
    let inspected = stdout(
        &std::process::Command::new(plexus_bin())
            .args(["inspect", wasm.to_str().unwrap(), "--name", "counter"])
            .output()
            .unwrap(),
    );
    assert!(
        inspected.contains("capabilities = [\"consensus\", \"storage\", \"log\"]"),
        "{inspected}"
    );
    let load = inspected
        .lines()
        .find_map(|l| l.strip_prefix("plexus "))
        .expect("a load command");

    let (_dir, p) = node_with_kv().await;
    let args: Vec<&str> = load.split_whitespace().collect();
    let out = stdout(&cli(p.addr, TOKEN, &args));
    assert!(out.starts_with("loaded counter"), "{out}");
    let (status, body) = http(
        p.addr,
        "POST",
        "/v1/plugins/counter/add",
        &[],
        br#"{"by": 5}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (_, body) = http(
        p.addr,
        "POST",
        "/v1/plugins/counter/add",
        &[],
        br#"{"by": 2}"#,
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["count"], 7);
    let (_, body) = http(p.addr, "GET", "/v1/plugins/counter/count", &[], b"")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["count"], 7);
}

/// A log written to a file has no colour codes; `PLEXUS_LOG_FORMAT=json`
/// gives one JSON object a line, with the event's fields as fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_plain_in_a_file_and_json_on_request() {
    for json in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, config(port, KV)).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Debug for plugins, to see leader-election's events.
        let env: &[(&str, &str)] = if json {
            &[
                ("PLEXUS_LOG_FORMAT", "json"),
                ("PLEXUS_LOG", "info,plugin=debug"),
            ]
        } else {
            &[("PLEXUS_LOG", "info,plugin=debug")]
        };
        let p = Process::up_with_env(dir.path(), &path, addr, env).await;
        // An event with fields: a config edit the node reports.
        std::fs::write(
            &path,
            config(port, KV).replace("[admin]", "max_connections = 100\n\n[admin]"),
        )
        .unwrap();
        let (line, log) = log_line(&p, "take effect when the node restarts").await;
        assert!(!log.contains('\x1b'), "colour codes in a log file: {log}");
        if json {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["level"], "WARN", "{line}");
            assert_eq!(v["fields"]["sections"], "node", "{line}");
        } else {
            assert!(
                line.contains("WARN") && line.contains("sections=node"),
                "{line}"
            );
        }
        // A plugin's event keeps its own fields: leader-election logs
        // `holding {role}` with the entry's index when it takes a role.
        let campaigning = format!(
            "{KV}{}",
            election_with(r#"{ campaign = ["primary"], ttl_ms = 3000 }"#)
        );
        std::fs::write(&path, config(port, &campaigning)).unwrap();
        let (line, _) = log_line(&p, "holding primary").await;
        if json {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(
                (v["level"].as_str(), v["target"].as_str()),
                (Some("DEBUG"), Some("plugin")),
                "{line}"
            );
            assert_eq!(v["fields"]["plugin"], "election", "{line}");
            assert!(
                v["fields"]["index"]
                    .as_str()
                    .is_some_and(|i| i.parse::<u64>().is_ok()),
                "{line}"
            );
        } else {
            assert!(line.contains("holding primary index="), "{line}");
            assert!(
                line.contains("plugin=election") && !line.contains('\x1b'),
                "{line}"
            );
        }
    }
}

/// The election entry with `config` as its inline config table.
fn election_with(config: &str) -> String {
    format!(
        r#"
[[plugins]]
name = "election"
component = "bundled:leader-election"
capabilities = ["consensus", "storage", "timers", "log"]
config = {config}
"#
    )
}

/// Where `needle` starts in `text`, as `LINE:COLUMN`.
fn place(text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap();
    let line = text[..at].matches('\n').count() + 1;
    let column = at - text[..at].rfind('\n').map_or(0, |nl| nl + 1) + 1;
    format!("{line}:{column}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_a_plugin_config_is_placed_in_the_file_by_check_and_by_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("node.toml");
    let good = config(port, &format!("{KV}{}", election_with("{ ttl_ms = 3000 }")));
    let typo = config(
        port,
        &format!("{KV}{}", election_with(r#"{ campain = ["x"] }"#)),
    );
    let expected = format!(
        "{}:{}: plugins[1].config.campain: unknown field, expected `campaign` or `ttl_ms`",
        path.display(),
        place(&typo, r#"["x"]"#)
    );

    // `plexus check` runs init and says where.
    std::fs::write(&path, &typo).unwrap();
    let checked = std::process::Command::new(plexus_bin())
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!checked.status.success());
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(stderr.trim(), format!("plexus: error: {expected}"));
    std::fs::write(&path, &good).unwrap();
    let checked = stdout(
        &std::process::Command::new(plexus_bin())
            .args(["check", path.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert!(
        checked.contains("config valid: 2 plugin(s), each ran init"),
        "{checked}"
    );

    // A live reload with the typo is refused; the plugin runs on, and its
    // status and `plugin list` say why.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = Process::up(dir.path(), &path, addr).await;
    std::fs::write(&path, &typo).unwrap();
    let list = wait_for(addr, "the refused reload", |l| {
        find(l, "election").is_some_and(|e| e["reload_error"].is_string())
    })
    .await;
    let election = find(&list, "election").unwrap();
    assert_eq!(election["reload_error"], expected.as_str());
    assert_eq!(
        (election["state"].as_str(), election["swaps"].as_u64()),
        (Some("running"), Some(0))
    );
    let shown = stdout(&cli(addr, TOKEN, &["plugin", "list"]));
    assert!(
        shown.contains(&format!(
            "election: config change refused, still running as before: {expected}"
        )),
        "{shown}"
    );
    // Fixed, it applies and the note goes.
    std::fs::write(
        &path,
        config(port, &format!("{KV}{}", election_with("{ ttl_ms = 4000 }"))),
    )
    .unwrap();
    wait_for(addr, "the fixed reload", |l| {
        find(l, "election").is_some_and(|e| e["swaps"] == 1 && e["reload_error"].is_null())
    })
    .await;
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_with_purge_makes_a_later_load_start_empty() {
    let (_dir, p) = node_with_kv().await;
    let addr = p.addr;
    let (status, _) = http(addr, "PUT", "/v1/plugins/kv/kv/a", &[], b"1")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let load = [
        "plugin",
        "load",
        "kv",
        "bundled:replicated-kv",
        "--cap",
        "consensus",
        "--cap",
        "storage",
    ];

    // Unloaded and loaded again, it sees its old data, and is told so.
    stdout(&cli(addr, TOKEN, &["plugin", "unload", "kv"]));
    let out = stdout(&cli(addr, TOKEN, &load));
    let note = out
        .lines()
        .find(|l| l.starts_with("note: "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        note.starts_with(
            "note: this node kept storage from an earlier load of `kv` (applied through log index "
        ) && note.ends_with(
            "), which the plugin now sees; `plexus plugin unload kv --purge` removes it"
        ),
        "{note}"
    );
    let (status, body) = http(addr, "GET", "/v1/plugins/kv/kv/a", &[], b"")
        .await
        .unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"1"[..]));

    // Purged, the next load starts empty and says nothing.
    let out = stdout(&cli(addr, TOKEN, &["plugin", "unload", "kv", "--purge"]));
    assert_eq!(out.trim(), "unloaded kv; purged 2 keys of its storage");
    let out = stdout(&cli(addr, TOKEN, &load));
    assert!(!out.contains("note:"), "{out}");
    let (status, _) = http(addr, "GET", "/v1/plugins/kv/kv/a", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _) = http(addr, "PUT", "/v1/plugins/kv/kv/b", &[], b"2")
        .await
        .unwrap();
    assert_eq!(status, 200);
    // It serves what it writes after the purge.
    let (status, _) = http(addr, "GET", "/v1/plugins/kv/kv/b", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
}
