//! `plexus new NAME`: a plugin crate that builds and loads as is.
//!
//! Inside the Plexus workspace it goes to `plugins/NAME` with an
//! integration test in `tests/it/` (the build requires one per plugin);
//! elsewhere it is a standalone crate depending on the SDK by path.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::check_name;

/// Where the generated crate went and how to build it.
#[derive(Debug)]
pub struct Scaffolded {
    /// The crate directory.
    pub dir: PathBuf,
    /// The test file, when created inside the workspace.
    pub test: Option<PathBuf>,
    /// The command that builds the component.
    pub build: String,
    /// Where the built component will be.
    pub wasm: PathBuf,
}

/// The SDK this binary was built with, if its sources are still there.
pub fn default_sdk_path() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    sdk.join("Cargo.toml")
        .exists()
        .then(|| sdk.canonicalize().unwrap_or(sdk))
}

fn workspace_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| {
            d.join("plugins").is_dir()
                && d.join("sdk/Cargo.toml").exists()
                && d.join("wit").is_dir()
        })
        .map(Path::to_path_buf)
}

/// Generates plugin `name`. `dir` overrides the location; `sdk` the SDK
/// path for a standalone crate.
pub fn scaffold(name: &str, dir: Option<&Path>, sdk: Option<&Path>) -> anyhow::Result<Scaffolded> {
    check_name(name).map_err(|e| anyhow::anyhow!("plugin name {e}"))?;
    let cwd = std::env::current_dir()?;
    let in_workspace = if dir.is_none() {
        workspace_root(&cwd)
    } else {
        None
    };
    let crate_name = format!("plexus-plugin-{name}");
    let lib_name = crate_name.replace('-', "_");
    let (target, manifest, test) = match &in_workspace {
        Some(root) => {
            let target = root.join("plugins").join(name);
            let manifest = format!(
                r#"[package]
name = "{crate_name}"
version.workspace = true
edition.workspace = true
rust-version.workspace = true
license.workspace = true
publish = false

[lints]
workspace = true

[lib]
crate-type = ["cdylib"]

[dependencies]
plexus-sdk.workspace = true
serde.workspace = true
serde_json.workspace = true
"#
            );
            (
                target,
                manifest,
                Some(
                    root.join("tests/it")
                        .join(format!("{}.rs", name.replace('-', "_"))),
                ),
            )
        }
        None => {
            let target = dir.map_or_else(|| cwd.join(name), Path::to_path_buf);
            let sdk = match sdk.map(Path::to_path_buf).or_else(default_sdk_path) {
                Some(s) => s,
                None => bail!("cannot find the plexus SDK; pass --sdk PATH to its sources"),
            };
            let manifest = format!(
                r#"[package]
name = "{crate_name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
plexus-sdk = {{ path = {sdk:?} }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

# A crate of its own, not a member of an enclosing workspace.
[workspace]
"#,
                sdk = sdk.display().to_string()
            );
            (target, manifest, None)
        }
    };
    if target.exists() {
        bail!("{} already exists", target.display());
    }
    std::fs::create_dir_all(target.join("src"))
        .with_context(|| format!("creating {}", target.display()))?;
    std::fs::write(target.join("Cargo.toml"), manifest)?;
    std::fs::write(target.join("src/lib.rs"), plugin_source(name))?;
    if let (Some(test), Some(root)) = (&test, &in_workspace) {
        std::fs::write(test, test_source(name))?;
        let main = root.join("tests/it/main.rs");
        let text = std::fs::read_to_string(&main)?;
        let module = format!("mod {};", name.replace('-', "_"));
        if !text.lines().any(|l| l.trim() == module) {
            std::fs::write(&main, format!("{}\n{module}\n", text.trim_end()))?;
        }
    }
    let (build, wasm) = match &in_workspace {
        Some(root) => (
            format!("cargo build  (the host's build step compiles plugins/{name})"),
            root.join("target/plugins/wasm32-wasip2/release")
                .join(format!("{lib_name}.wasm")),
        ),
        None => (
            format!(
                "cd {} && cargo build --release --target wasm32-wasip2",
                target.display()
            ),
            target
                .join("target/wasm32-wasip2/release")
                .join(format!("{lib_name}.wasm")),
        ),
    };
    Ok(Scaffolded {
        dir: target,
        test,
        build,
        wasm,
    })
}

fn plugin_source(name: &str) -> String {
    TEMPLATE.replace("{{name}}", name)
}

const TEMPLATE: &str = r#"//! {{name}}: a Plexus pattern plugin.
//!
//! A replicated counter to start from: `POST /add` with `{"by": N}` goes
//! through the consensus log, every node applies it into its storage, and
//! `GET /count` reads it behind a read barrier.

use plexus_sdk::consensus::{self, Pending};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::{CommittedEntry, InitContext, Pattern, Reply, Request, Response, export_pattern, storage};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
enum Command {
    Add { by: u64 },
}

struct Plugin {
    node: String,
}

#[derive(Deserialize)]
struct AddBody {
    by: u64,
}

fn count() -> u64 {
    storage::get_typed::<u64>("count").ok().flatten().map_or(0, |(n, _)| n)
}

fn hello(p: &mut Plugin, _: &Request, _: &Params) -> http::Result {
    Ok(Response::json(200, &serde_json::json!({ "plugin": "{{name}}", "node": p.node })))
}

fn add(p: &mut Plugin, req: &Request, _: &Params) -> http::Result<Pending> {
    let body: AddBody = req.json()?;
    // Submitted without waiting: the plugin goes on with other requests, and
    // this one is answered once its entry is applied on this node.
    consensus::submit(p, &Command::Add { by: body.by }, |_p: &mut Plugin, done| {
        Response::json(200, &serde_json::json!({ "count": done.output, "index": done.index }))
    })
    .map_err(|e| Response::error(503, &format!("{e:?}")))
}

fn get_count(p: &mut Plugin, _: &Request, _: &Params) -> http::Result {
    consensus::read_barrier(p).map_err(|e| Response::error(503, &format!("{e:?}")))?;
    Ok(Response::json(200, &serde_json::json!({ "count": count() })))
}

impl Pattern for Plugin {
    /// `apply` returns the counter after the entry.
    type Output = u64;

    fn init(ctx: InitContext) -> Result<Self, String> {
        plexus_sdk::info!("{{name}} starting on {}", ctx.node);
        Ok(Plugin { node: ctx.node })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .get("/", hello)
            .post("/add", add)
            .get("/count", get_count)
            .handle(self, req)
    }

    fn apply(&mut self, entry: CommittedEntry) -> u64 {
        let Ok(Command::Add { by }) = consensus::decode(&entry) else {
            return count();
        };
        let next = count().saturating_add(by);
        // Storage writes of one hook call commit together with the
        // delivery of this entry: exactly once, also across restarts.
        let _ = storage::put_typed("count", &next);
        next
    }
}

export_pattern!(Plugin);
"#;

fn test_source(name: &str) -> String {
    format!(
        r##"//! {name}: loads the real component and calls it.

use plexus::runtime::actor::PluginLimits;
use plexus::runtime::bindings::pattern::Method;
use plexus_tests::{{TestNode, body_json, caps}};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_through_the_log_and_reads_back() {{
    let n = TestNode::new();
    n.load("{name}", "{name}", caps(&["consensus", "storage", "log"]), PluginLimits::default(), "{{}}").await;
    let r = n.call("{name}", Method::Post, "/add", br#"{{"by": 2}}"#).await;
    assert_eq!(body_json(&r)["count"], 2);
    let r = n.call("{name}", Method::Get, "/count", b"").await;
    assert_eq!(body_json(&r)["count"], 2);
}}
"##
    )
}
