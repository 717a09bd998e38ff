//! Starting a node from a config: open the stores, load the plugins, serve
//! HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::ingress::{self, IngressOptions};
use crate::node::{Node, NodeOptions};
use crate::primitives::CallLimits;

/// A node that is up.
pub struct Running {
    /// The node.
    pub node: Arc<Node>,
    /// Where its HTTP ingress listens.
    pub http_addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops serving and stops every plugin.
    pub async fn shutdown(self) {
        self.server.abort();
        self.node.shutdown().await;
    }
}

/// Opens the node described by `config`, loads its plugins (reporting each
/// on `progress`) and starts the HTTP ingress.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    start_with_progress(config, |_| {}).await
}

/// [`start`], calling `progress` with a line per step.
pub async fn start_with_progress(
    config: &Config,
    progress: impl Fn(&str),
) -> anyhow::Result<Running> {
    let opts = NodeOptions {
        id: config.node.id.clone(),
        data_dir: config.node.data_dir.clone(),
        call_limits: CallLimits::default(),
        max_plugin_instances: config.node.max_plugin_instances,
        metadata: config.node.metadata.clone().into_iter().collect(),
        clock: Arc::new(crate::primitives::timers::SystemClock),
    };
    let node = match config.cluster_options()? {
        Some(cluster) => {
            progress(&format!(
                "joining a cluster of {} on {} (peers: {})",
                cluster.peers.len() + 1,
                cluster.listen,
                cluster
                    .peers
                    .iter()
                    .map(|(n, a)| format!("{n}@{a}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            Node::open_cluster(opts, cluster).await?
        }
        None => Node::open(opts)?,
    };
    for entry in &config.plugins {
        let bytes = entry.component_bytes(&config.base_dir)?;
        let started = std::time::Instant::now();
        // Placed in the file: `node.toml:LINE:COL: plugins[N]: ...`.
        let status = node.load(entry.load_spec(bytes)).await.map_err(|e| {
            anyhow::anyhow!(config.locate_plugin_error(&entry.name, &e.to_string()))
        })?;
        progress(&format!(
            "loaded {} ({}, version {}) in {} ms",
            entry.name,
            entry.component,
            status.version,
            started.elapsed().as_millis()
        ));
    }
    let (http_addr, server) = ingress::serve(
        node.clone(),
        config.node.http,
        IngressOptions {
            max_body_bytes: config.node.max_body_bytes,
            request_timeout: Duration::from_millis(config.node.request_timeout_ms),
            header_read_timeout: Duration::from_millis(config.node.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(config.node.body_read_timeout_ms),
            max_connections: config.node.max_connections,
            max_connections_per_client: config.node.connections_per_client(),
            admin_token: config.admin.token.clone(),
        },
    )
    .await?;
    Ok(Running {
        node,
        http_addr,
        server,
    })
}
