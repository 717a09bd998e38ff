//! Host-side bindings generated from `wit/`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    imports: {
        "plexus:cluster/consensus.propose": async | trappable,
        "plexus:cluster/consensus.read-barrier": async | trappable,
        "plexus:cluster/messaging.request": async | trappable,
        default: trappable,
    },
    exports: { default: async },
});

pub use plexus::cluster::types;

/// The `pattern` export, with the request and response types it shares
/// with the host's interfaces.
pub mod pattern {
    pub use super::exports::plexus::cluster::pattern::*;
    pub use super::plexus::cluster::types::{Caller, Method, Request, RequestSource, Response};
}
