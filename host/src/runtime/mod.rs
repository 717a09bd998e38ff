//! The component runtime: engine, capability linker, plugin actors with
//! supervision and hot swap.

pub mod actor;
#[allow(missing_docs)]
pub mod bindings;
pub mod engine;
pub mod journal;
pub mod mail;
pub mod metrics;
pub mod state;
pub mod stderr;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};

use crate::primitives;
use bindings::PluginPre;
use engine::Runtime;
use state::PluginState;

/// The WIT package the host implements.
pub const WIT_PACKAGE: &str = "plexus:cluster";
/// Its version.
pub const WIT_VERSION: &str = "0.2.0";

/// An interface of `plexus:cluster` that a plugin may be granted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// `membership`
    Membership,
    /// `consensus`
    Consensus,
    /// `messaging`
    Messaging,
    /// `storage`
    Storage,
    /// `timers`
    Timers,
    /// `log`
    Log,
    /// `plugins`: calls to the plugins listed in `allowed_plugins`.
    Plugins,
    /// `outbound-http`: requests to the origins listed in
    /// `allowed_outbound_hosts`.
    OutboundHttp,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 8] = [
        Capability::Membership,
        Capability::Consensus,
        Capability::Messaging,
        Capability::Storage,
        Capability::Timers,
        Capability::Log,
        Capability::Plugins,
        Capability::OutboundHttp,
    ];

    /// The interface name in WIT.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Membership => "membership",
            Capability::Consensus => "consensus",
            Capability::Messaging => "messaging",
            Capability::Storage => "storage",
            Capability::Timers => "timers",
            Capability::Log => "log",
            Capability::Plugins => "plugins",
            Capability::OutboundHttp => "outbound-http",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Capability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Capability::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown capability `{s}`"))
    }
}

/// Why a component cannot be loaded. Nothing running is affected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// The bytes do not start with the wasm magic number.
    #[error("not a WebAssembly file (bad magic number)")]
    NotWasm,
    /// A core module, not a component.
    #[error("a core WebAssembly module, not a component: build the plugin for wasm32-wasip2")]
    CoreModule,
    /// Malformed or failing validation.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// Does not export the `pattern` interface.
    #[error(
        "component does not target the `plugin` world of {WIT_PACKAGE}@{WIT_VERSION}: it does not export `{WIT_PACKAGE}/pattern` (it exports: {exports})"
    )]
    WrongWorld {
        /// What it exports instead.
        exports: String,
    },
    /// Built against an earlier, incompatible version of the contract.
    #[error(
        "component was built against {WIT_PACKAGE}@{found}, and this host runs {WIT_PACKAGE}@{WIT_VERSION}, which changed the contract (calls return tickets answered in `on-reply`; `apply` answers with `replies.answer`): rebuild the plugin with plexus-sdk 0.2 (`cargo update -p plexus-sdk`, then `cargo build --release --target wasm32-wasip2`); nothing was loaded or swapped"
    )]
    OldContract {
        /// The version it was built against.
        found: String,
    },
    /// Imports an interface that was not granted.
    #[error(
        "component imports `{interface}`, which the plugin is not granted; add \"{capability}\" to its capabilities"
    )]
    NotGranted {
        /// The full interface name.
        interface: String,
        /// The capability to grant.
        capability: Capability,
    },
    /// Imports something this host does not provide.
    #[error(
        "component imports `{0}`, which this host does not provide (it provides {WIT_PACKAGE}@{WIT_VERSION} and wasi 0.2)"
    )]
    UnknownImport(String),
    /// `init` returned an error or trapped.
    #[error("init failed: {0}")]
    Init(String),
}

/// Splits `ns:pkg/iface@ver` into (`ns:pkg`, `iface`, `ver`).
fn split_interface(name: &str) -> Option<(&str, &str, Option<&str>)> {
    let (pkg, rest) = name.split_once('/')?;
    let (iface, ver) = match rest.split_once('@') {
        Some((i, v)) => (i, Some(v)),
        None => (rest, None),
    };
    Some((pkg, iface, ver))
}

fn compatible(ver: Option<&str>) -> bool {
    // 0.x versions are compatible within the same minor, as in semver.
    ver.is_some_and(|v| v.starts_with("0.2."))
}

/// The version of `plexus:cluster` a component was built against, when it
/// is not this host's.
fn foreign_version(names: &[String]) -> Option<String> {
    names.iter().find_map(|n| {
        let (pkg, _, ver) = split_interface(n)?;
        (pkg == WIT_PACKAGE && !compatible(ver)).then(|| ver.unwrap_or("unversioned").to_string())
    })
}

/// Checks a component's world against the host and the grants.
pub fn check_world(
    runtime: &Runtime,
    component: &Component,
    granted: &BTreeSet<Capability>,
) -> Result<(), LoadError> {
    let ty = component.component_type();
    let engine = runtime.engine();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let has_pattern = exports.iter().any(|n| {
        split_interface(n).is_some_and(|(pkg, iface, ver)| {
            pkg == WIT_PACKAGE && iface == "pattern" && compatible(ver)
        })
    });
    if !has_pattern {
        if let Some(found) = foreign_version(&exports) {
            return Err(LoadError::OldContract { found });
        }
        let exports = if exports.is_empty() {
            "nothing".to_string()
        } else {
            exports.join(", ")
        };
        return Err(LoadError::WrongWorld { exports });
    }
    for (name, item) in ty.imports(engine) {
        if !matches!(item.ty, ComponentItem::ComponentInstance(_)) {
            return Err(LoadError::UnknownImport(name.to_string()));
        }
        let Some((pkg, iface, ver)) = split_interface(name) else {
            return Err(LoadError::UnknownImport(name.to_string()));
        };
        if pkg.starts_with("wasi:") {
            continue; // the linker rejects WASI interfaces it lacks
        }
        if pkg != WIT_PACKAGE || !compatible(ver) {
            return Err(LoadError::UnknownImport(name.to_string()));
        }
        if iface == "types" || iface == "replies" {
            continue;
        }
        let Ok(cap) = iface.parse::<Capability>() else {
            return Err(LoadError::UnknownImport(name.to_string()));
        };
        if !granted.contains(&cap) {
            return Err(LoadError::NotGranted {
                interface: name.to_string(),
                capability: cap,
            });
        }
    }
    Ok(())
}

/// What a component asks of a host and offers it, as `plexus inspect`
/// prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Every interface it imports, by full name.
    pub imports: Vec<String>,
    /// Every interface it exports, by full name.
    pub exports: Vec<String>,
    /// The `plexus:cluster` version it was built against, if any.
    pub contract: Option<String>,
    /// The capabilities its imports need, in the order of
    /// [`Capability::ALL`].
    pub capabilities: Vec<Capability>,
    /// Why this host would refuse it, whatever it is granted.
    pub refused: Option<String>,
}

/// Reads a component's imports and exports, and what it needs granted.
pub fn inspect(runtime: &Runtime, bytes: &[u8]) -> Result<Inspection, LoadError> {
    let component = runtime.compile(bytes)?;
    let ty = component.component_type();
    let engine = runtime.engine();
    let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let contract = imports.iter().chain(&exports).find_map(|n| {
        let (pkg, _, ver) = split_interface(n)?;
        (pkg == WIT_PACKAGE).then(|| ver.unwrap_or("unversioned").to_string())
    });
    let needed: BTreeSet<Capability> = imports
        .iter()
        .filter_map(|n| split_interface(n))
        .filter(|(pkg, _, _)| *pkg == WIT_PACKAGE)
        .filter_map(|(_, iface, _)| iface.parse().ok())
        .collect();
    let capabilities: Vec<Capability> = Capability::ALL
        .into_iter()
        .filter(|c| needed.contains(c))
        .collect();
    let refused = check_world(runtime, &component, &needed)
        .err()
        .map(|e| e.to_string());
    Ok(Inspection {
        imports,
        exports,
        contract,
        capabilities,
        refused,
    })
}

/// Builds a linker holding WASI (no files, sockets or environment) and
/// exactly the granted interfaces.
pub fn linker(
    runtime: &Runtime,
    granted: &BTreeSet<Capability>,
) -> anyhow::Result<Linker<PluginState>> {
    let mut linker = Linker::new(runtime.engine());
    let wrap = |e: wasmtime::Error| anyhow::anyhow!("{e:#}");
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wrap)?;
    primitives::add_types_to_linker(&mut linker).map_err(wrap)?;
    for cap in granted {
        match cap {
            Capability::Membership => primitives::membership::add_to_linker(&mut linker),
            Capability::Consensus => primitives::consensus::add_to_linker(&mut linker),
            Capability::Messaging => primitives::messaging::add_to_linker(&mut linker),
            Capability::Storage => primitives::storage::add_to_linker(&mut linker),
            Capability::Timers => primitives::timers::add_to_linker(&mut linker),
            Capability::Log => primitives::log::add_to_linker(&mut linker),
            Capability::Plugins => primitives::plugins::add_to_linker(&mut linker),
            Capability::OutboundHttp => primitives::outbound::add_to_linker(&mut linker),
        }
        .map_err(wrap)?;
    }
    Ok(linker)
}

/// A component compiled, checked and pre-linked: ready to instantiate in
/// microseconds.
#[derive(Clone)]
pub struct Prepared {
    /// The pre-instantiated component.
    pub pre: PluginPre<PluginState>,
    /// Its content version.
    pub version: String,
}

/// Compiles (or loads from cache), checks and links a component.
pub fn prepare(
    runtime: &Arc<Runtime>,
    bytes: &[u8],
    granted: &BTreeSet<Capability>,
) -> Result<Prepared, LoadError> {
    let component = runtime.compile(bytes)?;
    check_world(runtime, &component, granted)?;
    let linker = linker(runtime, granted).map_err(|e| LoadError::Invalid(e.to_string()))?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
    let pre = PluginPre::new(pre).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
    Ok(Prepared {
        pre,
        version: Runtime::version_of(bytes),
    })
}
