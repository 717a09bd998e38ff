//! The operator's page in a real browser: headless Chromium loads `/ui`
//! from the nodes of a 3-node cluster of `plexus` processes, and the test
//! reads the DOM once the page's script has polled the state: every
//! member, the leader, each plugin's version; then the new version after
//! a cluster-wide swap, on every node, and a trapped plugin's message.
//!
//! Without a Chromium binary the test says so and skips (`.ci/run`
//! installs one). `PLEXUS_CHROMIUM` names the binary to use;
//! `PLEXUS_UI_SCREENSHOT=PATH` also saves the page's screenshot there
//! (`examples/dashboard.png`, shown in the README, comes from it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plexus_tests::{Processes, cluster_node_config, http};

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
        println!(
            "SKIPPED the_page_shows_the_cluster_a_swap_and_a_failure_in_a_real_browser: \
             no chromium on PATH (apt-get install chromium, or set PLEXUS_CHROMIUM)"
        );
        eprintln!("SKIPPED: no chromium binary found; the dashboard was not tested in a browser");
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
