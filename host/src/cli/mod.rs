//! The `plexus` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// Run distributed-system patterns as hot-swappable WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "plexus", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a node. Without CONFIG: one node on 127.0.0.1:7070 with data in
    /// ./plexus-data and the bundled pattern plugins.
    Up {
        /// The node's TOML config.
        config: Option<PathBuf>,
    },
    /// Validate a config and compile its components, without starting.
    Check {
        /// The node's TOML config.
        config: PathBuf,
    },
    /// List the plugins bundled in this binary.
    Bundled,
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up { config } => {
            let config = load(config)?;
            let running =
                crate::serve::start_with_progress(&config, |line| eprintln!("plexus: {line}"))
                    .await?;
            eprintln!(
                "plexus: node {} serving http://{} (data in {})",
                running.node.id(),
                running.http_addr,
                config.node.data_dir.display()
            );
            shutdown_signal().await;
            eprintln!("plexus: shutting down");
            running.shutdown().await;
            Ok(())
        }
        Command::Check { config } => {
            let config = load(Some(config))?;
            let runtime = crate::runtime::engine::Runtime::new(None)?;
            for p in &config.plugins {
                let bytes = p.component_bytes(&config.base_dir)?;
                crate::runtime::prepare(&runtime, &bytes, &p.capabilities)
                    .map_err(|e| anyhow::anyhow!("plugin `{}`: {e}", p.name))?;
                println!("ok  {:<20} {}", p.name, p.component);
            }
            println!("config valid: {} plugin(s)", config.plugins.len());
            Ok(())
        }
        Command::Bundled => {
            for name in crate::bundled::names() {
                println!("{name}");
            }
            Ok(())
        }
    }
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
