//! The real `plexus` binary: restart after SIGKILL, HTTP limits, the admin
//! API, and config errors from the CLI.

use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use plexus_tests::{Process, free_port, http, plexus_bin};

const TOKEN: &str = "test-admin-token";

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let config = format!(
        r#"version = 1

[node]
id = "node-1"
data_dir = "data"
http = "127.0.0.1:{port}"
max_body_bytes = 1048576

[admin]
token = "{TOKEN}"

[[plugins]]
name = "kv"
component = "bundled:replicated-kv"
capabilities = ["consensus", "storage", "log"]
"#
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, config).unwrap();
    path
}

async fn start() -> (tempfile::TempDir, Process) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = Process::up(dir.path(), &config, addr).await;
    (dir, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_state_survives_sigkill_and_restart() {
    let (dir, mut p) = start().await;
    for i in 0..20 {
        let (status, _) = http(
            p.addr,
            "PUT",
            &format!("/v1/plugins/kv/kv/key{i}"),
            &[],
            format!("value{i}").as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    }
    let addr = p.addr;
    // Every write above was acknowledged, so each is fsynced: SIGKILL loses
    // nothing.
    p.kill();
    let p = Process::up(dir.path(), &dir.path().join("node.toml"), addr).await;
    for i in 0..20 {
        let (status, body) = http(
            p.addr,
            "GET",
            &format!("/v1/plugins/kv/kv/key{i}"),
            &[],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, format!("value{i}").as_bytes());
    }
    let (_, stats) = http(p.addr, "GET", "/v1/plugins/kv/stats", &[], b"")
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats).unwrap();
    assert_eq!(
        stats["applied"], 20,
        "no entry applied twice or lost across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_gets_413_and_the_node_keeps_serving() {
    let (_dir, p) = start().await;
    // Announce a 64 MiB body: the node answers 413 before reading it.
    let mut stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let head = format!(
        "PUT /v1/plugins/kv/kv/big HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        64 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b'x'; 1 << 16]).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too-large"), "{answer}");
    // Without a length, the body is cut off at the limit as it streams:
    // the node answers 413 and closes while the client is still sending
    // (so the writer may see a broken pipe, which is expected).
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head =
            "PUT /v1/plugins/kv/kv/big HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
        wr.write_all(head.as_bytes()).await?;
        let chunk = format!("{:x}\r\n{}\r\n", 1 << 16, "x".repeat(1 << 16));
        for _ in 0..64 {
            wr.write_all(chunk.as_bytes()).await?;
        }
        wr.write_all(b"0\r\n\r\n").await
    });
    let mut answer = vec![0u8; 4096];
    let n = rd.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let _ = writer.await;
    let (status, _) = http(p.addr, "PUT", "/v1/plugins/kv/kv/small", &[], b"ok")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, body) = http(p.addr, "GET", "/v1/plugins/nope/x", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("no plugin named `nope`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_the_token_and_swaps_over_http() {
    let (_dir, p) = start().await;
    let (status, _) = http(p.addr, "GET", "/v1/admin/plugins", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, _) = http(
        p.addr,
        "GET",
        "/v1/admin/plugins",
        &[("authorization", "Bearer wrong-token")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(
        p.addr,
        "GET",
        "/v1/admin/plugins",
        &[("authorization", &auth)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list[0]["name"], "kv");
    let old = list[0]["version"].as_str().unwrap().to_string();

    http(p.addr, "PUT", "/v1/plugins/kv/kv/a", &[], b"1")
        .await
        .unwrap();
    let component = plexus_tests::variant(&plexus_tests::wasm("replicated-kv"), 4);
    let (status, body) = http(
        p.addr,
        "POST",
        "/v1/admin/plugins/kv/swap",
        &[("authorization", &auth)],
        &component,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["from"], old.as_str());
    assert_ne!(report["to"], old.as_str());
    let (status, body) = http(p.addr, "GET", "/v1/plugins/kv/kv/a", &[], b"")
        .await
        .unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"1"[..]));

    let (status, body) = http(
        p.addr,
        "POST",
        "/v1/admin/plugins/kv/swap",
        &[("authorization", &auth)],
        b"garbage",
    )
    .await
    .unwrap();
    assert_eq!(status, 422);
    assert!(String::from_utf8_lossy(&body).contains("not a WebAssembly file"));
    let (_, metrics) = http(p.addr, "GET", "/metrics", &[], b"").await.unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("plexus_plugin_requests_total{plugin=\"kv\""),
        "{metrics}"
    );
    for expected in [
        "plexus_plugin_call_duration_seconds_bucket{plugin=\"kv\"",
        "hook=\"on-request\"",
        "plexus_plugin_swap_pause_seconds_count{plugin=\"kv\"} 1\n",
        "plexus_consensus_proposals_total 1\n",
        "plexus_consensus_is_leader 1\n",
        "plexus_consensus_log_write_duration_seconds_count 1\n",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from {metrics}"
        );
    }
}

#[test]
fn check_reports_a_type_error_with_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "version = 1\n\n[[plugins]]\nname = \"kv\"\ncomponent = \"bundled:replicated-kv\"\nlimits = { cpu_ms = \"fast\" }\n",
    )
    .unwrap();
    let out = std::process::Command::new(plexus_bin())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:6:", path.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("plugins[0].limits.cpu_ms"), "{stderr}");
    assert!(stderr.contains("invalid type"), "{stderr}");
}

#[test]
fn check_accepts_a_good_config_and_compiles_its_components() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), 1);
    let out = std::process::Command::new(plexus_bin())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("config valid: 1 plugin(s)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_answers_504_within_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        format!(
            r#"version = 1
[node]
http = "127.0.0.1:{port}"
data_dir = "data"
request_timeout_ms = 300

[[plugins]]
name = "chaos"
component = "bundled:chaos"
capabilities = ["consensus", "messaging", "storage", "timers"]
limits = {{ cpu_ms = 6000 }}
"#
        ),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = Process::up(dir.path(), &path, addr).await;
    let started = std::time::Instant::now();
    let (status, body) = http(p.addr, "POST", "/v1/plugins/chaos/loop", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    assert!(started.elapsed() < std::time::Duration::from_millis(4000));
    // Once the deadline stops the loop, the restarted plugin answers again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, _) = http(p.addr, "GET", "/v1/plugins/chaos/ping", &[], b"")
            .await
            .unwrap();
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "chaos never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
