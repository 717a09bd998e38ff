//! The `plexus` command line.

pub mod client;
pub mod scaffold;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use client::{AdminClient, human_duration, table};

/// Run distributed-system patterns as hot-swappable WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "plexus", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach a running node's admin API.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The node's HTTP address.
    #[arg(
        long,
        env = "PLEXUS_ADDR",
        default_value = "127.0.0.1:7070",
        global = true
    )]
    pub addr: String,
    /// The admin bearer token (`admin.token` in the node's config).
    #[arg(long, env = "PLEXUS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Remote {
    fn client(&self) -> AdminClient {
        AdminClient {
            addr: self.addr.clone(),
            token: self.token.clone(),
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a node. Without CONFIG: one node on 127.0.0.1:7070 with data in
    /// ./plexus-data and the bundled pattern plugins. With CONFIG, edits to
    /// the file are applied while the node runs.
    Up {
        /// The node's TOML config.
        config: Option<PathBuf>,
    },
    /// Validate a config and compile its components, without starting.
    Check {
        /// The node's TOML config.
        config: PathBuf,
    },
    /// Manage the plugins of a running node.
    Plugin {
        /// What to do.
        #[command(subcommand)]
        command: PluginCommand,
        /// Where the node is.
        #[command(flatten)]
        remote: Remote,
    },
    /// Inspect the cluster and change its voters.
    Cluster {
        /// What to do.
        #[command(subcommand)]
        command: ClusterCommand,
        /// Where the node is.
        #[command(flatten)]
        remote: Remote,
    },
    /// Create a plugin crate that builds and loads as is.
    New {
        /// Plugin name, `[a-z0-9-]`.
        name: String,
        /// Directory to create (default: `plugins/NAME` inside the Plexus
        /// workspace, else `./NAME`).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Path to the plexus SDK sources, for a crate outside the workspace.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Print a component's contract version, imports and exports, and the
    /// `[[plugins]]` entry and load command its imports call for.
    Inspect {
        /// The `.wasm` file, or `bundled:NAME`.
        file: String,
        /// The plugin name to use in the printed entry (default: from the
        /// file name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the plugins bundled in this binary.
    Bundled,
}

/// `plexus plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// List loaded plugins.
    List,
    /// Load a plugin.
    Load {
        /// Its name on the node.
        name: String,
        /// A `.wasm` file (uploaded) or `bundled:NAME`.
        component: String,
        /// Interfaces to grant (repeatable): membership, consensus,
        /// messaging, storage, timers, log.
        #[arg(long = "cap", value_name = "CAPABILITY")]
        caps: Vec<String>,
        /// Linear memory cap in MiB.
        #[arg(long, default_value_t = 64)]
        memory_mib: u64,
        /// CPU deadline per hook call in ms.
        #[arg(long, default_value_t = 1000)]
        cpu_ms: u64,
        /// Mailbox capacity.
        #[arg(long, default_value_t = 1024)]
        mailbox: usize,
        /// The plugin's config, as JSON.
        #[arg(long)]
        config: Option<String>,
    },
    /// Replace a running plugin by a new component, handing its state over.
    Swap {
        /// The plugin.
        name: String,
        /// A `.wasm` file (uploaded) or `bundled:NAME`.
        component: String,
        /// New config for the plugin, as JSON (default: unchanged).
        #[arg(long)]
        config: Option<String>,
        /// Swap on every node of the cluster, at the same log index.
        #[arg(long)]
        cluster: bool,
    },
    /// Stop and remove a plugin (its storage stays on the node).
    Unload {
        /// The plugin.
        name: String,
        /// Also delete this node's storage of it, so that a later load
        /// under the same name starts empty.
        #[arg(long)]
        purge: bool,
    },
}

/// `plexus cluster …`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the node and cluster state.
    Status,
    /// Add a node as a voter. Start it first with `cluster.join = true`;
    /// it catches up as a learner, then votes.
    Join {
        /// The new node's id (`node.id` in its config).
        id: String,
        /// Its peer address (`cluster.listen` in its config).
        #[arg(value_name = "PEER_ADDR")]
        peer: std::net::SocketAddr,
    },
    /// Remove a voter. The node stops taking part in consensus; stop it
    /// afterwards.
    Leave {
        /// The node's id.
        id: String,
    },
}

fn component_json(component: &str) -> anyhow::Result<serde_json::Value> {
    if component.starts_with("bundled:") {
        return Ok(serde_json::json!({ "component": component }));
    }
    let bytes = std::fs::read(component).with_context(|| format!("reading {component}"))?;
    Ok(
        serde_json::json!({ "wasm_base64": base64::engine::general_purpose::STANDARD.encode(bytes) }),
    )
}

fn parse_config(config: Option<&str>) -> anyhow::Result<Option<serde_json::Value>> {
    config
        .map(|c| serde_json::from_str(c).with_context(|| "--config is not valid JSON"))
        .transpose()
}

fn merge(mut base: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(b), serde_json::Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

fn print_plugins(list: &serde_json::Value) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or("-").to_string();
            let n = |k: &str| p[k].as_u64().map_or("-".into(), |v| v.to_string());
            let uptime = p["loaded_at_ms"].as_u64().map_or("-".into(), |t| {
                human_duration(now_ms.saturating_sub(t) / 1000)
            });
            let pause = p["last_swap_pause_us"]
                .as_u64()
                .map_or("-".into(), |us| format!("{us} us"));
            vec![
                s("name"),
                s("version"),
                s("state"),
                uptime,
                n("restarts"),
                n("traps"),
                n("requests"),
                n("swaps"),
                pause,
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "NAME",
                "VERSION",
                "STATE",
                "UPTIME",
                "RESTARTS",
                "TRAPS",
                "REQUESTS",
                "SWAPS",
                "LAST PAUSE"
            ],
            &rows
        )
    );
    // What needs a person: a failed plugin and a refused config change.
    for p in list.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("-");
        if p["state"] == "failed"
            && let Some(why) = p["last_error"].as_str()
        {
            println!("{name}: {why}");
        }
        if let Some(why) = p["reload_error"].as_str() {
            println!("{name}: config change refused, still running as before: {why}");
        }
    }
}

/// Runs the CLI.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up { config } => up(config).await,
        Command::Check { config } => check(config).await,
        Command::Plugin { command, remote } => plugin(command, &remote).await,
        Command::Cluster { command, remote } => cluster(command, &remote).await,
        Command::New { name, dir, sdk } => {
            let done = scaffold::scaffold(&name, dir.as_deref(), sdk.as_deref())?;
            println!("created {}", done.dir.display());
            if let Some(test) = &done.test {
                println!("created {}", test.display());
            }
            println!("created {}", done.entry.display());
            println!("test:   {}", done.test_command);
            println!("build:  {}", done.build);
            println!(
                "then:   plexus inspect {} --name {name}   (its [[plugins]] entry and load command, from the component's imports)",
                done.wasm.display()
            );
            Ok(())
        }
        Command::Inspect { file, name } => inspect(&file, name.as_deref()),
        Command::Bundled => {
            for name in crate::bundled::names() {
                println!("{name}");
            }
            Ok(())
        }
    }
}

/// `plexus check`: the file parses and validates, and every plugin it
/// names compiles, links with its capabilities and runs `init` with its
/// config, on a scratch node in a temporary directory.
async fn check(path: PathBuf) -> anyhow::Result<()> {
    let config = load(Some(path))?;
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let node = crate::node::Node::open(crate::node::NodeOptions {
        id: config.node.id.clone(),
        data_dir: scratch.path().to_path_buf(),
        call_limits: crate::primitives::CallLimits::default(),
        metadata: Vec::new(),
        max_plugin_instances: config.node.max_plugin_instances,
        clock: Arc::new(crate::primitives::timers::SystemClock),
    })?;
    let mut failed = Vec::new();
    for p in &config.plugins {
        let outcome = match p.component_bytes(&config.base_dir) {
            Ok(bytes) => node
                .load(p.load_spec(bytes))
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => println!("ok  {:<20} {}", p.name, p.component),
            Err(e) => failed.push(config.locate_plugin_error(&p.name, &e)),
        }
    }
    for name in config.plugins.iter().map(|p| p.name.clone()) {
        let _ = node.unload(&name).await;
    }
    if !failed.is_empty() {
        anyhow::bail!("{}", failed.join("\n"));
    }
    println!(
        "config valid: {} plugin(s), each ran init",
        config.plugins.len()
    );
    Ok(())
}

fn inspect(file: &str, name: Option<&str>) -> anyhow::Result<()> {
    use crate::runtime::{WIT_PACKAGE, WIT_VERSION};
    let bytes = match file.strip_prefix("bundled:") {
        Some(b) => crate::bundled::get(b)
            .ok_or_else(|| anyhow::anyhow!("no bundled plugin `{b}`"))?
            .to_vec(),
        None => std::fs::read(file).with_context(|| format!("reading {file}"))?,
    };
    let runtime = crate::runtime::engine::Runtime::new(None, 1)?;
    let seen =
        crate::runtime::inspect(&runtime, &bytes).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    let contract = seen.contract.as_deref().unwrap_or("none");
    println!(
        "component: {file} ({} bytes, version {})",
        bytes.len(),
        crate::runtime::engine::Runtime::version_of(&bytes)
    );
    println!("contract:  {WIT_PACKAGE}@{contract} (this host runs {WIT_VERSION})");
    println!("exports:");
    for e in &seen.exports {
        println!("  {e}");
    }
    println!("imports:");
    for i in &seen.imports {
        println!("  {i}");
    }
    if let Some(why) = seen.refused {
        anyhow::bail!("{file} would be refused: {why}");
    }
    let name = match name {
        Some(n) => n.to_string(),
        None => std::path::Path::new(file.trim_start_matches("bundled:"))
            .file_stem()
            .map(|s| {
                s.to_string_lossy()
                    .trim_start_matches("plexus_plugin_")
                    .replace('_', "-")
            })
            .unwrap_or_else(|| "plugin".into()),
    };
    let caps: Vec<String> = seen
        .capabilities
        .iter()
        .map(|c| format!("{:?}", c.name()))
        .collect();
    let component = if file.starts_with("bundled:") {
        file.to_string()
    } else {
        std::path::Path::new(file)
            .canonicalize()
            .map_or_else(|_| file.to_string(), |p| p.display().to_string())
    };
    println!();
    println!("# node.toml");
    println!("[[plugins]]");
    println!("name = {name:?}");
    println!("component = {component:?}");
    println!("capabilities = [{}]", caps.join(", "));
    println!();
    let flags: String = seen
        .capabilities
        .iter()
        .map(|c| format!(" --cap {}", c.name()))
        .collect();
    println!("# or, into a running node:");
    println!("plexus plugin load {name} {component}{flags}");
    Ok(())
}

async fn cluster(command: ClusterCommand, remote: &Remote) -> anyhow::Result<()> {
    let client = remote.client();
    let (answer, done) = match command {
        ClusterCommand::Status => {
            let status = client.get("/v1/admin/status").await?;
            if remote.json {
                println!("{status:#}");
                return Ok(());
            }
            println!("node          {}", status["node"].as_str().unwrap_or("-"));
            println!("leader        {}", status["leader"].as_str().unwrap_or("-"));
            println!("term          {}", status["term"]);
            println!("commit index  {}", status["commit_index"]);
            println!("plugins       {}", status["plugins"]);
            println!();
            let rows: Vec<Vec<String>> = status["members"]
                .as_array()
                .map(|members| {
                    members
                        .iter()
                        .map(|m| {
                            vec![
                                m["id"].as_str().unwrap_or("-").to_string(),
                                m["state"].as_str().unwrap_or("-").to_string(),
                                if m["voter"].as_bool() == Some(true) {
                                    "voter".into()
                                } else {
                                    "-".into()
                                },
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print!("{}", table(&["MEMBER", "STATE", "ROLE"], &rows));
            return Ok(());
        }
        ClusterCommand::Join { id, peer } => {
            let body = serde_json::json!({ "id": id, "addr": peer.to_string() });
            let answer = client
                .call(
                    "POST",
                    "/v1/admin/cluster/members",
                    "application/json",
                    body.to_string().into_bytes(),
                )
                .await?;
            (answer, format!("{id} joined"))
        }
        ClusterCommand::Leave { id } => {
            let answer = client
                .call(
                    "DELETE",
                    &format!("/v1/admin/cluster/members/{id}"),
                    "application/json",
                    Vec::new(),
                )
                .await?;
            (answer, format!("{id} left"))
        }
    };
    if remote.json {
        println!("{answer:#}");
    } else {
        let voters: Vec<&str> = answer["voters"]
            .as_array()
            .map(|v| v.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        println!("{done}; voters: {}", voters.join(", "));
    }
    Ok(())
}

async fn plugin(command: PluginCommand, remote: &Remote) -> anyhow::Result<()> {
    let client = remote.client();
    let answer = match command {
        PluginCommand::List => {
            let list = client.get("/v1/admin/plugins").await?;
            if remote.json {
                println!("{list:#}");
            } else {
                print_plugins(&list);
            }
            return Ok(());
        }
        PluginCommand::Load {
            name,
            component,
            caps,
            memory_mib,
            cpu_ms,
            mailbox,
            config,
        } => {
            let body = merge(
                serde_json::json!({
                    "name": name,
                    "capabilities": caps,
                    "limits": { "memory_mib": memory_mib, "cpu_ms": cpu_ms, "mailbox": mailbox },
                    "config": parse_config(config.as_deref())?.unwrap_or(serde_json::json!({})),
                }),
                component_json(&component)?,
            );
            let status = client
                .call(
                    "POST",
                    "/v1/admin/plugins",
                    "application/json",
                    body.to_string().into_bytes(),
                )
                .await?;
            if !remote.json {
                println!(
                    "loaded {name} (version {})",
                    status["version"].as_str().unwrap_or("-")
                );
                if let Some(note) = status["note"].as_str() {
                    println!("note: {note}");
                }
                return Ok(());
            }
            status
        }
        PluginCommand::Swap {
            name,
            component,
            config,
            cluster,
        } => {
            let mut body = component_json(&component)?;
            if let Some(c) = parse_config(config.as_deref())? {
                body = merge(body, serde_json::json!({ "config": c }));
            }
            let scope = if cluster { "?scope=cluster" } else { "" };
            let path = format!("/v1/admin/plugins/{name}/swap{scope}");
            let done = client
                .call(
                    "POST",
                    &path,
                    "application/json",
                    body.to_string().into_bytes(),
                )
                .await?;
            if remote.json {
                done
            } else {
                if cluster {
                    println!(
                        "swapped {name} cluster-wide at log index {} (now version {})",
                        done["index"],
                        done["version"].as_str().unwrap_or("-")
                    );
                } else {
                    println!(
                        "swapped {name}: {} -> {} (pause {} us, {} bytes of state handed over)",
                        done["from"].as_str().unwrap_or("-"),
                        done["to"].as_str().unwrap_or("-"),
                        done["pause_us"],
                        done["state_bytes"]
                    );
                }
                return Ok(());
            }
        }
        PluginCommand::Unload { name, purge } => {
            let query = if purge { "?purge=true" } else { "" };
            let answer = client
                .call(
                    "DELETE",
                    &format!("/v1/admin/plugins/{name}{query}"),
                    "application/json",
                    Vec::new(),
                )
                .await?;
            if !remote.json {
                match answer["purged_keys"].as_u64() {
                    Some(keys) => println!("unloaded {name}; purged {keys} keys of its storage"),
                    None => println!("unloaded {name}"),
                }
                return Ok(());
            }
            answer
        }
    };
    println!("{answer:#}");
    Ok(())
}

async fn up(path: Option<PathBuf>) -> anyhow::Result<()> {
    let baseline = path.as_deref().map(crate::config::reconcile::fingerprint);
    let config = load(path.clone())?;
    let running =
        crate::serve::start_with_progress(&config, |line| eprintln!("plexus: {line}")).await?;
    eprintln!(
        "plexus: node {} serving http://{} (data in {})",
        running.node.id(),
        running.http_addr,
        config.node.data_dir.display()
    );
    let watcher = match &path {
        Some(p) => {
            let reconciler =
                crate::config::reconcile::Reconciler::new(running.node.clone(), &config)?;
            eprintln!("plexus: watching {} for changes", p.display());
            let (path, started) = (p.clone(), config.clone());
            let baseline = baseline.flatten();
            Some(tokio::spawn(async move {
                crate::config::reconcile::watch(
                    reconciler,
                    path,
                    Duration::from_millis(500),
                    baseline,
                    &started,
                )
                .await
            }))
        }
        None => None,
    };
    shutdown_signal().await;
    eprintln!("plexus: shutting down");
    if let Some(w) = watcher {
        w.abort();
    }
    running.shutdown().await;
    Ok(())
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    match path {
        None => Ok(Config::embedded_default()),
        Some(p) => Config::load(&p).map_err(|e| anyhow::anyhow!("{e}")),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
