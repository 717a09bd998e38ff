//! Where the SDK's host calls go: the component's imports in a
//! `wasm32` build, the in-memory host of [`crate::testing`] in a native
//! one, so a plugin's logic runs under plain `cargo test`.

#[cfg(target_arch = "wasm32")]
pub(crate) use crate::bindings::plexus::cluster::{
    consensus, log, membership, messaging, outbound_http, plugins, replies, storage, timers,
};

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::memory::{
    consensus, log, membership, messaging, outbound_http, plugins, replies, storage, timers,
};
