//! Plexus: a runtime for distributed-system patterns as hot-swappable
//! WebAssembly components.
//!
//! Layout:
//! - [`runtime`]: the wasmtime engine, the capability linker, plugin actors
//!   with supervision and hot swap;
//! - [`primitives`]: one module per WIT interface the host provides;
//! - [`cluster`]: the consensus log and storage engines behind them;
//! - [`node`]: a node tying these together;
//! - [`config`], [`ingress`], [`cli`]: how people run it.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use plexus::config::Config;
//! let config = Config::embedded_default();
//! let node = plexus::serve::start(&config).await?;
//! println!("node {} serving on {}", node.node.id(), node.http_addr);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod bundled;
pub mod cli;
pub mod cluster;
pub mod config;
#[cfg(test)]
mod fuzz;
pub mod ingress;
pub mod node;
pub mod primitives;
pub mod runtime;
pub mod serve;
