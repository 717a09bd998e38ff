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

pub use exports::plexus::cluster::pattern;
pub use plexus::cluster::types;
