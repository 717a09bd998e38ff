//! The guest SDK for Plexus pattern plugins.
//!
//! A plugin is one type implementing [`Pattern`], exported with
//! [`export_pattern!`] from a `cdylib` crate built for `wasm32-wasip2`.
//!
//! Layout:
//! - [`Pattern`]: the hooks; all but `init` have defaults.
//! - [`http`]: [`Request`], [`Response`] and a small [`http::Router`].
//! - [`consensus`], [`storage`], [`messaging`], [`membership`], [`timers`],
//!   [`log`]: the host's interfaces with typed helpers.
//! - [`codec`]: the compact binary encoding used for log entries and
//!   messages, and versioned snapshots.
//! - [`polls`]: long polls, requests held until something happens.
//! - `testing` (feature `testing`): an in-memory host to unit-test a
//!   plugin with plain `cargo test`.
//!
//! A plugin that uses the log names its command type
//! ([`Pattern::Command`]); [`consensus::propose`] and [`consensus::submit`]
//! encode it and [`Pattern::apply`] gets it back decoded, refusing it with
//! a [`consensus::Rejected`] when a rule of the pattern says no.
//!
//! ```no_run
//! use plexus_sdk::{export_pattern, http::Router, InitContext, Pattern, Reply, Request, Response};
//!
//! struct Counter {
//!     hits: u64,
//! }
//!
//! impl Pattern for Counter {
//!     type Command = ();
//!     type Output = ();
//!
//!     fn init(_ctx: InitContext) -> Result<Self, String> {
//!         Ok(Counter { hits: 0 })
//!     }
//!
//!     fn on_request(&mut self, req: Request) -> Reply {
//!         Router::new()
//!             .get("/hits", |this: &mut Self, _req, _params| {
//!                 this.hits += 1;
//!                 Ok(Response::json(200, &this.hits))
//!             })
//!             .handle(self, req)
//!     }
//!
//!     fn snapshot(&mut self) -> Vec<u8> {
//!         self.hits.to_le_bytes().to_vec()
//!     }
//!
//!     fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
//!         let bytes: [u8; 8] = state.try_into().map_err(|_| "bad snapshot".to_string())?;
//!         self.hits = u64::from_le_bytes(bytes);
//!         Ok(())
//!     }
//! }
//!
//! export_pattern!(Counter);
//! ```
#![deny(missing_docs)]

/// Bindings generated from the `plexus:cluster` WIT package.
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "plexus_sdk::bindings",
    });
}

pub mod codec;
pub mod consensus;
mod errors;
mod host;
pub mod http;
pub mod log;
pub mod membership;
pub mod messaging;
pub mod plugins;
pub mod polls;
pub mod replies;
pub mod storage;
pub mod timers;

#[cfg(not(target_arch = "wasm32"))]
mod memory;
#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
pub mod testing;

#[doc(hidden)]
pub mod __private;

pub use bindings::exports::plexus::cluster::pattern::{ForwardTo, InitContext, Reply};
pub use bindings::plexus::cluster::types::{
    CallOutcome, Caller, CommittedEntry, Limits, Member, MemberEvent, MemberState, Method, NodeId,
    Request, RequestSource, Response,
};
pub use replies::Pending;

/// A pattern plugin: its state and its hooks.
///
/// The host calls one hook at a time on one instance, so hooks take
/// `&mut self` and need no locking. Every hook except [`Pattern::init`] has
/// a default that does nothing (or answers 404).
///
/// State kept in fields is lost when the instance is restarted after a trap;
/// keep what must survive in [`storage`] (atomic per hook call), or hand it
/// over on hot swap with [`Pattern::snapshot`] and [`Pattern::restore`].
pub trait Pattern: Sized + 'static {
    /// A command of this plugin's log: what [`consensus::propose`] and
    /// [`consensus::submit`] encode with [`codec`], and what
    /// [`Pattern::apply`] gets back decoded. Use `()` when the plugin does
    /// not use the log.
    type Command: serde::Serialize + serde::de::DeserializeOwned;

    /// What [`Pattern::apply`] returns for a command it accepted: handed
    /// back to the caller of [`consensus::propose`], or to the answer given
    /// to [`consensus::submit`], on the proposing node; dropped elsewhere.
    /// Use `()` when the plugin does not use the log.
    type Output;

    /// Builds the instance. Called once per instance, before any other hook.
    fn init(ctx: InitContext) -> Result<Self, String>;

    /// Handles a client request routed to this plugin: answers now with a
    /// [`Response`] (`.into()`), or later, once a write it submitted with
    /// [`consensus::submit`] is applied.
    fn on_request(&mut self, req: Request) -> Reply {
        let _ = req;
        Response::text(404, "no such route").into()
    }

    /// Handles a message from this plugin on another node (or this one).
    /// The returned bytes answer a [`messaging::request`].
    fn on_message(&mut self, from: NodeId, topic: String, payload: Vec<u8>) -> Option<Vec<u8>> {
        let _ = (from, topic, payload);
        None
    }

    /// Applies one committed command of this plugin's log stream, at log
    /// position `index` (the same on every node). Must be deterministic:
    /// every node applies the same commands in the same order, and must
    /// come to the same result.
    ///
    /// An `Err` refuses the command: the proposer's client gets the
    /// [`consensus::Rejected`] response (a `?` on a storage error gives
    /// its status). Writes to [`storage`] made before the refusal stay, so
    /// check before writing. An entry whose bytes do not decode as
    /// [`Pattern::Command`] (written by a version with another command
    /// format) is refused by the SDK without calling `apply`.
    ///
    /// The default refuses every command, which is only right for plugins
    /// that never propose.
    fn apply(
        &mut self,
        index: u64,
        command: Self::Command,
    ) -> Result<Self::Output, consensus::Rejected> {
        let _ = (index, command);
        Err(consensus::Rejected::new(
            500,
            "this plugin does not apply log entries",
        ))
    }

    /// Called once after a run of entries was applied (all the entries one
    /// `apply` call of the host brings, or those a read barrier or a
    /// proposal brings), in the same storage transaction. The place for
    /// bookkeeping that need not be written once per entry, such as a
    /// count of entries applied.
    fn after_apply(&mut self) {}

    /// Answers a write that the version before a hot swap submitted with
    /// [`consensus::submit`] and this version applied: the earlier
    /// version's answer went away with it. This happens to the writes in
    /// flight at a cluster-wide swap (every node switches at the swap's
    /// place in the log, so the entries after it are this version's to
    /// apply) and to those a local swap could not finish within its
    /// drain. Return the response the waiting client gets; the default,
    /// `None`, lets the host answer 504: the write was applied once, but
    /// its outcome (a conditional write may have been refused) is not known
    /// to the host. A plugin whose answers depend only on the output gives
    /// the answer its `submit` would have. A command `apply` refused is
    /// answered with its [`consensus::Rejected`] response without asking.
    fn answer_inherited(&mut self, done: consensus::Committed<Self::Output>) -> Option<Response> {
        let _ = done;
        None
    }

    /// The outcome of a call made without a closure to receive it (the
    /// SDK's call helpers all take one, so this sees only calls made
    /// through the raw bindings). The default drops it.
    fn on_reply(&mut self, ticket: u64, outcome: CallOutcome) {
        let _ = (ticket, outcome);
    }

    /// Reacts to membership changes.
    fn on_membership(&mut self, events: Vec<MemberEvent>) {
        let _ = events;
    }

    /// A timer set with [`timers::set`] fired.
    fn on_timer(&mut self, id: u64) {
        let _ = id;
    }

    /// State to hand to the next version on hot swap.
    fn snapshot(&mut self) -> Vec<u8> {
        Vec::new()
    }

    /// Takes over state from [`Pattern::snapshot`], after `init`.
    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        let _ = state;
        Ok(())
    }
}

/// Exports a [`Pattern`] implementation as the component's `pattern`
/// interface. Use it once, in the plugin's crate root.
#[macro_export]
macro_rules! export_pattern {
    ($ty:ty) => {
        const _: () = {
            struct __PlexusExport;

            impl $crate::bindings::exports::plexus::cluster::pattern::Guest for __PlexusExport {
                fn init(ctx: $crate::InitContext) -> Result<(), String> {
                    $crate::__private::init::<$ty>(ctx)
                }
                fn on_request(req: $crate::Request) -> $crate::Reply {
                    $crate::__private::on_request::<$ty>(req)
                }
                fn on_message(
                    from: $crate::NodeId,
                    topic: String,
                    payload: Vec<u8>,
                ) -> Option<Vec<u8>> {
                    $crate::__private::on_message::<$ty>(from, topic, payload)
                }
                fn apply(entries: Vec<$crate::CommittedEntry>, dropped: Vec<u64>) {
                    $crate::__private::apply::<$ty>(entries, dropped)
                }
                fn on_reply(ticket: u64, outcome: $crate::CallOutcome) {
                    $crate::__private::on_reply::<$ty>(ticket, outcome)
                }
                fn on_membership(events: Vec<$crate::MemberEvent>) {
                    $crate::__private::on_membership::<$ty>(events)
                }
                fn on_timer(id: u64) {
                    $crate::__private::on_timer::<$ty>(id)
                }
                fn snapshot() -> Vec<u8> {
                    $crate::__private::snapshot::<$ty>()
                }
                fn restore(state: Vec<u8>) -> Result<(), String> {
                    $crate::__private::restore::<$ty>(state)
                }
            }

    $crate::bindings::__export_plugin!(__PlexusExport with_types_in $crate::bindings);
        };
    };
}

impl InitContext {
    /// The plugin's `config` table (from the node config) as `T`. With
    /// `#[serde(deny_unknown_fields)]` on `T`, a misspelt key is refused.
    /// The error names the key, as `config.KEY: what is wrong`; returned
    /// from `init`, it refuses the load or the swap with that message.
    ///
    /// ```
    /// # use plexus_sdk::InitContext;
    /// #[derive(serde::Deserialize)]
    /// #[serde(deny_unknown_fields)]
    /// struct Settings { rate: u32, #[serde(default)] burst: u32 }
    ///
    /// # fn ctx(config: &str) -> InitContext {
    /// #     InitContext { config: config.into(), node: "n1".into(), name: "p".into(), version: "v".into(),
    /// #         limits: plexus_sdk::Limits { max_entry_bytes: 0, max_value_bytes: 0, max_key_bytes: 0,
    /// #             max_message_bytes: 0, max_calls_in_flight: 0, max_response_bytes: 0 } }
    /// # }
    /// let err = ctx(r#"{"rate": 10, "brust": 4}"#).config::<Settings>().err().unwrap();
    /// assert_eq!(err, "config.brust: unknown field, expected `rate` or `burst`");
    /// let err = ctx(r#"{"rate": "fast"}"#).config::<Settings>().err().unwrap();
    /// assert_eq!(err, r#"config.rate: invalid type: string "fast", expected u32"#);
    /// ```
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        let text = if self.config.trim().is_empty() {
            "{}"
        } else {
            &self.config
        };
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let mut path = e.path().to_string();
            let mut message = e.inner().to_string();
            if let Some(at) = message.rfind(" at line ") {
                message.truncate(at);
            }
            // An unknown key is in the path; say it once.
            if let Some(rest) = message.strip_prefix("unknown field `")
                && let Some((key, expected)) = rest.split_once('`')
            {
                if path == "." {
                    path = key.to_string();
                }
                message = format!("unknown field{expected}");
            }
            if path == "." {
                format!("config: {message}")
            } else {
                format!("config.{path}: {message}")
            }
        })
    }
}
