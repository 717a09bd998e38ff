//! Capturing the plugins' state for a consensus snapshot.

use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::runtime::actor::PluginHandle;

/// Takes a plugin's state for a consensus snapshot from its actor.
pub(super) struct Captor(pub(super) std::sync::Weak<Node>);

impl crate::cluster::log::Capture for Captor {
    fn capture(
        &self,
        deadline: Duration,
    ) -> crate::cluster::log::BoxFuture<
        'static,
        std::collections::HashMap<String, crate::cluster::log::RestorePoint>,
    > {
        let handles: Vec<Arc<PluginHandle>> = self.0.upgrade().map_or_else(Vec::new, |node| {
            node.plugins.read().values().cloned().collect()
        });
        Box::pin(async move {
            let mut set = tokio::task::JoinSet::new();
            for h in handles {
                set.spawn(async move {
                    let point = tokio::time::timeout(deadline, h.capture()).await;
                    (h.name().to_string(), point)
                });
            }
            let mut points = std::collections::HashMap::new();
            while let Some(done) = set.join_next().await {
                match done {
                    Ok((name, Ok(Some(point)))) => {
                        points.insert(name, point);
                    }
                    Ok((name, Err(_))) => tracing::warn!(
                        plugin = %name,
                        "plugin state not captured in time; its stream is not compacted by this snapshot"
                    ),
                    _ => {}
                }
            }
            points
        })
    }
}
