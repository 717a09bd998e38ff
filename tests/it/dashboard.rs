//! The operator's page in a real browser: headless Chromium loads `/ui`
//! from the nodes of a 3-node cluster of `plexus` processes, and the test
//! reads the DOM once the page's script has polled the state: every
//! member, the leader, each plugin's version; then the new version after
//! a cluster-wide swap, on every node, and a trapped plugin's message.
//! Driven over the DevTools protocol, the page takes the admin token,
//! swaps a plugin to a file chosen in it and unloads another.
//!
//! Without a Chromium binary the test says so and skips (`.ci/run`
//! installs one). `PLEXUS_CHROMIUM` names the binary to use;
//! `PLEXUS_UI_SCREENSHOT=PATH` also saves the page's screenshot there
//! (`examples/dashboard.png`, shown in the README, comes from it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plexus_tests::{Processes, cluster_node_config, http};
use serde_json::{Value, json};

const TOKEN: &str = "dashboard-token";

fn config(i: usize, http: &[SocketAddr], peer: &[SocketAddr]) -> String {
    cluster_node_config(
        i,
        http,
        peer,
        "",
        &format!(
            r#"
[admin]
token = "{TOKEN}"

[[plugins]]
name = "kv"
component = "bundled:replicated-kv"
capabilities = ["consensus", "storage", "log"]

[[plugins]]
name = "election"
component = "bundled:leader-election"
capabilities = ["consensus", "storage", "timers", "log"]
config = {{ campaign = ["primary"], ttl_ms = 3000 }}

[[plugins]]
name = "chaos"
component = "bundled:chaos"
capabilities = ["consensus", "messaging", "storage", "timers"]
"#
        ),
    )
}

/// A Chromium (or Chrome) binary: `PLEXUS_CHROMIUM`, or the first of the
/// usual names on `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PLEXUS_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|p| p.is_file())
}

/// Headless Chromium with a profile of its own.
struct Browser {
    bin: PathBuf,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Runs Chromium on `url` with `args`, giving the page's script five
    /// seconds of (virtual) time; its stdout.
    async fn run(&self, url: &str, args: &[&str]) -> String {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", self.profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("chromium on {url} did not finish within 90 s"))
            .expect("running chromium");
        assert!(
            out.status.success(),
            "chromium on {url} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The page's DOM once its script has run.
    async fn dom(&self, addr: SocketAddr) -> String {
        self.run(&format!("http://{addr}/ui"), &["--dump-dom"])
            .await
    }

    /// Loads the page until its DOM passes `check` (which says what is
    /// missing), up to a minute; the DOM that passed.
    async fn wait_for(
        &self,
        addr: SocketAddr,
        what: &str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let dom = self.dom(addr).await;
            match check(&dom) {
                Ok(()) => return dom,
                Err(missing) => assert!(
                    Instant::now() < deadline,
                    "the page on {addr} never showed {what}: {missing}\n{dom}"
                ),
            }
        }
    }

    /// Saves a screenshot of the page at `path`.
    async fn screenshot(&self, addr: SocketAddr, path: &Path) {
        let shot = format!("--screenshot={}", path.display());
        self.run(
            &format!("http://{addr}/ui"),
            &[&shot, "--window-size=1360,1020"],
        )
        .await;
    }
}

/// A page in headless Chromium driven over the DevTools protocol, for
/// what a DOM dump cannot do: typing the token, choosing a file,
/// clicking. Chromium listens on a port it picks and writes it to
/// `DevToolsActivePort` in its profile; the protocol runs over a
/// WebSocket, spoken here in its simplest form (text frames, a zero
/// mask).
struct Devtools {
    _chromium: tokio::process::Child,
    _profile: tempfile::TempDir,
    ws: tokio::net::TcpStream,
    id: u64,
    session: String,
}

impl Devtools {
    /// Opens `url` in a new headless Chromium.
    async fn open(bin: &Path, url: &str) -> Devtools {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let profile = tempfile::tempdir().unwrap();
        let chromium = tokio::process::Command::new(bin)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1360,1020",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromium");
        let active = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        let (port, path) = loop {
            let said = std::fs::read_to_string(&active).unwrap_or_default();
            // The port, a newline, and the browser's path, whose id is a
            // UUID: whole once it is that long.
            if let Some((port, path)) = said.split_once('\n')
                && path.trim().len() >= "/devtools/browser/".len() + 36
            {
                break (port.to_string(), path.trim().to_string());
            }
            assert!(
                Instant::now() < deadline,
                "chromium never opened its DevTools port"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut ws = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        let upgrade = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: cGxleHVzLWRhc2hib2FyZA==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.write_all(upgrade.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(ws.read_u8().await.unwrap());
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut page = Devtools {
            _chromium: chromium,
            _profile: profile,
            ws,
            id: 0,
            session: String::new(),
        };
        let target = page
            .call("Target.createTarget", json!({ "url": url }))
            .await;
        let attached = page
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        page.session = attached["sessionId"].as_str().unwrap().to_string();
        page
    }

    /// Sends a command (to the page, once attached) and waits for its
    /// result, passing over the events that come first.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.id += 1;
        let mut msg = json!({ "id": self.id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        let payload = msg.to_string().into_bytes();
        // FIN and a text frame; masked, with the mask 0 (which leaves the
        // payload as it is).
        let mut frame = vec![0x81];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend((n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend((n as u64).to_be_bytes());
            }
        }
        frame.extend([0; 4]);
        frame.extend(payload);
        self.ws.write_all(&frame).await.unwrap();
        loop {
            let mut message = Vec::new();
            loop {
                let (b0, b1) = (
                    self.ws.read_u8().await.unwrap(),
                    self.ws.read_u8().await.unwrap(),
                );
                let len = match b1 & 0x7f {
                    126 => u64::from(self.ws.read_u16().await.unwrap()),
                    127 => self.ws.read_u64().await.unwrap(),
                    n => u64::from(n),
                };
                let mut data = vec![0; len as usize];
                self.ws.read_exact(&mut data).await.unwrap();
                assert_ne!(b0 & 0x0f, 8, "chromium closed the DevTools connection");
                message.extend(data);
                if b0 & 0x80 != 0 {
                    break;
                }
            }
            let reply: Value = serde_json::from_slice(&message).unwrap();
            if reply["id"] == self.id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// The value of `expr`, evaluated in the page.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(r["exceptionDetails"].is_null(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits (up to 30 s) until `expr` is true in the page.
    async fn wait(&mut self, expr: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.eval(&format!("!!({expr})")).await != json!(true) {
            assert!(Instant::now() < deadline, "the page never had {expr}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The value of attribute `attr` of the first element whose tag holds
/// `marker` (`data-plugin="kv"`).
fn attr(dom: &str, marker: &str, attr: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let tag = &dom[start..at + dom[at..].find('>')?];
    let key = format!("{attr}=\"");
    let from = tag.find(&key)? + key.len();
    Some(tag[from..from + tag[from..].find('"')?].to_string())
}

/// What the `tbody` with `id` holds.
fn table<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("<tbody id=\"{id}\">");
    let Some(at) = dom.find(&open) else {
        return "";
    };
    let body = &dom[at + open.len()..];
    &body[..body.find("</tbody>").unwrap_or(body.len())]
}

/// `GET path` on the admin API of `addr`, as JSON.
async fn admin_get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(addr, "GET", path, &[("authorization", &auth)], b"")
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// The page on every node shows every member with its own figures and
/// the one leader; each node's page shows its plugins' versions.
fn cluster_shown(dom: &str, leader: &str, kv: &str) -> Result<(), String> {
    for n in 1..=3 {
        let role = attr(dom, &format!("data-node=\"node-{n}\""), "data-role")
            .ok_or(format!("no row for node-{n}"))?;
        let expected = if format!("node-{n}") == leader {
            "leader"
        } else {
            "follower"
        };
        if role != expected {
            return Err(format!("node-{n} is shown as {role}, not {expected}"));
        }
    }
    if !dom.contains(&format!("<b id=\"leader\">{leader}</b>")) {
        return Err(format!("the header does not name {leader} as the leader"));
    }
    let shown = attr(dom, "data-plugin=\"kv\"", "data-version");
    if shown.as_deref() != Some(kv) {
        return Err(format!("kv's version is shown as {shown:?}, not {kv}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_cluster_a_swap_and_a_failure_in_a_real_browser() {
    let Some(bin) = chromium() else {
        // Output of a passing test is shown with `--nocapture` (or
        // nextest's `--success-output`).
        eprintln!(
            "SKIPPED dashboard: no chromium on PATH (apt-get install chromium, or set \
             PLEXUS_CHROMIUM); the page was not tested in a browser"
        );
        return;
    };
    let browser = Browser {
        bin,
        profile: tempfile::tempdir().unwrap(),
    };
    let nodes = Processes::start(3, config).await;
    let leader = format!("node-{}", nodes.leader(TOKEN).await + 1);
    let kv = admin_get(nodes.http[0], "/v1/admin/plugins/kv").await["version"]
        .as_str()
        .unwrap()
        .to_string();

    // Every node's page: the members, the leader, the versions.
    for addr in &nodes.http {
        let dom = browser
            .wait_for(*addr, "the cluster", |dom| cluster_shown(dom, &leader, &kv))
            .await;
        let members = table(&dom, "nodes");
        assert_eq!(
            members.matches(&format!("kv {kv}")).count(),
            3,
            "every member runs kv {kv}: {members}"
        );
        // Without the token, read-only: no admin buttons.
        let plugins = table(&dom, "plugins");
        assert!(plugins.contains("data-plugin=\"chaos\""), "{plugins}");
        assert!(
            !plugins.contains("<button") && !plugins.contains("type=\"file\""),
            "{plugins}"
        );
    }

    // A cluster-wide swap through node-1: node-3's page shows the new
    // version, on itself and on every member, and the swap itself.
    let next = plexus_tests::variant(&plexus_tests::wasm("replicated-kv"), 7);
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(
        nodes.http[0],
        "POST",
        "/v1/admin/plugins/kv/swap?scope=cluster",
        &[("authorization", &auth)],
        &next,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let done: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let swapped = done["version"].as_str().unwrap().to_string();
    assert_ne!(swapped, kv);
    let dom = browser
        .wait_for(nodes.http[2], "the swapped version", |dom| {
            let here = attr(dom, "data-plugin=\"kv\"", "data-version");
            if here.as_deref() != Some(swapped.as_str()) {
                return Err(format!("kv here is {here:?}"));
            }
            let everywhere = table(dom, "nodes")
                .matches(&format!("kv {swapped}"))
                .count();
            if everywhere != 3 {
                return Err(format!("{everywhere} of 3 members show kv {swapped}"));
            }
            Ok(())
        })
        .await;
    let swaps = table(&dom, "swaps");
    assert!(
        swaps.contains("data-swap-of=\"kv\"")
            && swaps.contains(&kv)
            && swaps.contains(&swapped)
            && swaps.contains(&format!("cluster @ {}", done["index"])),
        "{swaps}"
    );

    // chaos traps on node-2: its page shows the message, in the plugin's
    // row and in the recent errors.
    let (status, _) = http(nodes.http[1], "POST", "/v1/plugins/chaos/trap", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 503);
    let dom = browser
        .wait_for(nodes.http[1], "chaos's failure", |dom| {
            let row = attr(dom, "data-error-of=\"chaos\"", "class");
            if row.is_none() {
                return Err("no message under chaos".into());
            }
            if !table(dom, "errors").contains("chaos: trap in on-request") {
                return Err("the trap is not among the recent errors".into());
            }
            Ok(())
        })
        .await;
    let plugins = table(&dom, "plugins");
    assert!(plugins.contains("chaos: trap in on-request"), "{plugins}");

    // With the admin token entered in node-1's page: a wrong one is
    // refused, the right one brings swap and unload buttons, which work.
    let mut page = Devtools::open(&browser.bin, &format!("http://{}/ui", nodes.http[0])).await;
    page.wait("document.querySelector('[data-plugin=\"kv\"]')")
        .await;
    page.eval("$('token').value = 'not-the-token'; $('login').requestSubmit()")
        .await;
    page.wait("$('outcome').textContent.includes('token refused (401)')")
        .await;
    assert_eq!(
        page.eval("document.querySelectorAll('[data-swap]').length")
            .await,
        0
    );
    page.eval(&format!(
        "$('token').value = '{TOKEN}'; $('login').requestSubmit()"
    ))
    .await;
    page.wait("document.querySelector('[data-swap=\"kv\"]')")
        .await;
    let file = nodes.dir.path().join("kv-next.wasm");
    std::fs::write(
        &file,
        &*plexus_tests::variant(&plexus_tests::wasm("replicated-kv"), 8),
    )
    .unwrap();
    let document = page.call("DOM.getDocument", json!({})).await;
    let input = page
        .call(
            "DOM.querySelector",
            json!({ "nodeId": document["root"]["nodeId"], "selector": "[data-file=\"kv\"]" }),
        )
        .await;
    page.call(
        "DOM.setFileInputFiles",
        json!({ "nodeId": input["nodeId"], "files": [file.display().to_string()] }),
    )
    .await;
    // The chosen file outlives the next poll's re-rendering.
    let seen = page.eval("last.at_ms").await;
    page.wait(&format!("last.at_ms > {seen}")).await;
    assert_eq!(
        page.eval("document.querySelector('[data-file=\"kv\"]').files.length")
            .await,
        1
    );
    page.eval("document.querySelector('[data-swap=\"kv\"]').click()")
        .await;
    page.wait(&format!(
        "document.querySelector('[data-plugin=\"kv\"]').dataset.version != '{swapped}'"
    ))
    .await;
    let outcome = page.eval("$('outcome').textContent").await;
    assert!(outcome.as_str().unwrap().contains("paused"), "{outcome}");
    let now = admin_get(nodes.http[0], "/v1/admin/plugins/kv").await["version"].clone();
    assert_eq!(
        page.eval("document.querySelector('[data-plugin=\"kv\"]').dataset.version")
            .await,
        now
    );
    assert_ne!(now, json!(swapped));
    page.eval(
        "window.confirm = () => true; document.querySelector('[data-unload=\"election\"]').click()",
    )
    .await;
    page.wait("!document.querySelector('[data-plugin=\"election\"]')")
        .await;
    let auth = format!("Bearer {TOKEN}");
    let (status, _) = http(
        nodes.http[0],
        "GET",
        "/v1/admin/plugins/election",
        &[("authorization", &auth)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 404, "election is unloaded on node-1");
    page.eval("$('logout').click()").await;
    assert_eq!(
        page.eval("document.querySelectorAll('[data-swap]').length")
            .await,
        0
    );
    drop(page);

    // node-2's page marks kv, whose version on node-1 now differs.
    let differs = format!("node-1 runs <code>{}</code>", now.as_str().unwrap());
    browser
        .wait_for(nodes.http[1], "kv's version differing on node-1", |dom| {
            let row = table(dom, "plugins");
            if row.contains("data-differs=\"kv\"") && row.contains(&differs) {
                Ok(())
            } else {
                Err(format!("no \"{differs}\" under kv"))
            }
        })
        .await;

    // What an operator sees, saved.
    let shot = nodes.dir.path().join("dashboard.png");
    browser.screenshot(nodes.http[1], &shot).await;
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("PLEXUS_UI_SCREENSHOT") {
        std::fs::write(&keep, &png).expect("saving the screenshot");
        println!("screenshot saved to {}", PathBuf::from(keep).display());
    }
}
