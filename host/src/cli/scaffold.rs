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
    /// The `[[plugins]]` entry to paste into a node's config.
    pub entry: PathBuf,
    /// The command that runs the plugin's native unit tests.
    pub test_command: String,
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

[dev-dependencies]
plexus-sdk = {{ workspace = true, features = ["testing"] }}
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

[dev-dependencies]
plexus-sdk = {{ path = {sdk:?}, features = ["testing"] }}

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
    std::fs::write(
        target.join("src/lib.rs"),
        TEMPLATE.replace("{{name}}", name),
    )?;
    std::fs::write(target.join("src/tests.rs"), TESTS.replace("{{name}}", name))?;
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
    let entry = target.join("plugin.toml");
    std::fs::write(
        &entry,
        format!(
            "# The entry for a node's config (node.toml). `plexus inspect {}`\n\
             # prints it again from the built component's imports.\n\
             [[plugins]]\n\
             name = {name:?}\n\
             component = {:?}\n\
             capabilities = [\"consensus\", \"storage\", \"log\"]\n\
             \n\
             [plugins.config]\n\
             max_step = 100\n",
            wasm.display(),
            wasm.display().to_string()
        ),
    )?;
    let test_command = match &in_workspace {
        Some(_) => format!(
            "cargo test -p {crate_name}  (native, in-memory host; the integration test runs with cargo test --workspace)"
        ),
        None => format!("cd {} && cargo test", target.display()),
    };
    Ok(Scaffolded {
        dir: target,
        test,
        build,
        wasm,
        entry,
        test_command,
    })
}

const TEMPLATE: &str = r#"//! {{name}}: a Plexus pattern plugin.
//!
//! A replicated counter to start from. `POST /add` with `{"by": N}` is a
//! command of the consensus log: every node applies it, in the same
//! order, into its own storage. `GET /count` reads it behind a read
//! barrier, so it sees every add acknowledged before it.
//!
//! Config (the `[plugins.config]` table): `max_step = 100`, the largest
//! `by` one add may carry.

use plexus_sdk::consensus::{self, Pending, Rejected};
use plexus_sdk::http::{self, Params, Router};
use plexus_sdk::{InitContext, Pattern, Reply, Request, Response, codec, export_pattern, storage};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The plugin's config table. A misspelt key refuses the load, naming it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_max_step")]
    max_step: u64,
}

fn default_max_step() -> u64 {
    100
}

/// A command of the log. Its encoding is the log's format: add new
/// variants at the end, and never change or reorder existing ones.
#[derive(Serialize, Deserialize)]
pub enum Command {
    Add { by: u64 },
}

pub struct Plugin {
    settings: Settings,
    /// Adds answered on this node, handed to the next version at a swap.
    answered: u64,
}

fn count() -> Result<u64, storage::Error> {
    Ok(storage::get_typed::<u64>("count")?.map_or(0, |(n, _)| n))
}

#[derive(Deserialize)]
struct AddBody {
    by: u64,
}

fn add(p: &mut Plugin, req: &Request, _: &Params) -> http::Result<Pending> {
    let AddBody { by } = req.json()?;
    if by > p.settings.max_step {
        let why = format!("by must be at most {}", p.settings.max_step);
        return Err(Response::error(400, &why));
    }
    // Submitted without waiting: the plugin goes on with other requests,
    // and this one is answered once its entry is applied here. A failure
    // (no leader, no quorum) or a refusal by `apply` becomes its status.
    Ok(consensus::submit(p, &Command::Add { by }, |p: &mut Plugin, done| {
        p.answered += 1;
        Response::json(200, &json!({ "count": done.output, "index": done.index }))
    })?)
}

fn get_count(p: &mut Plugin, _: &Request, _: &Params) -> http::Result {
    consensus::read_barrier(p)?;
    Ok(Response::json(200, &json!({ "count": count()?, "answered_here": p.answered })))
}

impl Pattern for Plugin {
    type Command = Command;
    /// The count after the command.
    type Output = u64;

    fn init(ctx: InitContext) -> Result<Self, String> {
        let settings: Settings = ctx.config()?;
        plexus_sdk::info!("{{name}} starting"; "node" => ctx.node, "max_step" => settings.max_step);
        Ok(Plugin { settings, answered: 0 })
    }

    fn on_request(&mut self, req: Request) -> Reply {
        Router::new()
            .post("/add", add)
            .get("/count", get_count)
            .handle(self, req)
    }

    // Every node applies the same commands in the same order and must reach
    // the same result: decide from the command and storage only (not from
    // config, clocks or randomness). Storage writes commit with the entry.
    fn apply(&mut self, _index: u64, command: Command) -> Result<u64, Rejected> {
        let Command::Add { by } = command;
        let next = count()?
            .checked_add(by)
            .ok_or_else(|| Rejected::new(409, "the count would overflow"))?;
        storage::put_typed("count", &next)?;
        Ok(next)
    }

    // The state a hot swap hands to the next version, in format 1. A
    // version that changes it writes format 2 and still reads format 1.
    fn snapshot(&mut self) -> Vec<u8> {
        codec::encode_versioned(1, &self.answered)
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        let state = codec::versioned(&state)?;
        match state.version {
            0 => {} // nothing handed over
            1 => self.answered = state.decode()?,
            v => return Err(format!("snapshot format {v} is newer than this version")),
        }
        Ok(())
    }
}

export_pattern!(Plugin);

#[cfg(test)]
mod tests;
"#;

const TESTS: &str = r##"//! {{name}} on the SDK's in-memory host: `cargo test`, in milliseconds.

use plexus_sdk::testing::TestHost;
use serde_json::{Value, json};

use super::{Command, Plugin};

fn body(r: &plexus_sdk::Response) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn adds_go_through_the_log_and_add_up() {
    let mut p = TestHost::<Plugin>::start().unwrap();
    assert_eq!(body(&p.post("/add", r#"{"by": 2}"#))["count"], 2);
    assert_eq!(body(&p.post("/add", r#"{"by": 3}"#))["count"], 5);
    assert_eq!(p.entries().len(), 2);
    assert_eq!(body(&p.get("/count"))["count"], 5);
}

#[test]
fn a_step_over_the_limit_is_refused_before_the_log() {
    let mut p = TestHost::<Plugin>::with_config(json!({ "max_step": 10 })).unwrap();
    assert_eq!(p.post("/add", r#"{"by": 11}"#).status, 400);
    assert!(p.entries().is_empty());
}

#[test]
fn an_add_that_would_overflow_is_refused_by_every_node() {
    let mut p = TestHost::<Plugin>::start().unwrap();
    p.commit(&Command::Add { by: u64::MAX });
    let r = p.post("/add", r#"{"by": 1}"#);
    assert_eq!(r.status, 409);
    assert_eq!(body(&p.get("/count"))["count"], u64::MAX);
}

#[test]
fn the_answered_count_survives_a_swap_but_not_a_restart() {
    let mut p = TestHost::<Plugin>::start().unwrap();
    p.post("/add", r#"{"by": 1}"#);
    let mut p = p.swap::<Plugin>().unwrap();
    assert_eq!(body(&p.get("/count"))["answered_here"], 1);
    let mut p = p.restart().unwrap();
    assert_eq!(body(&p.get("/count")), json!({ "count": 1, "answered_here": 0 }));
}

#[test]
fn a_misspelt_config_key_is_named() {
    let err = TestHost::<Plugin>::with_config(json!({ "max_stpe": 1 })).err().unwrap();
    assert_eq!(err, "config.max_stpe: unknown field, expected `max_step`");
}
"##;

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
