//! The process-wide wasmtime engine and the on-disk cache of compiled
//! components.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::LoadError;

/// How often the epoch advances: the granularity of CPU deadlines and of
/// the yields that keep a busy guest from starving other tasks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Largest linear memory any plugin may be configured with.
pub const MAX_MEMORY_BYTES: u64 = 1 << 30;

/// Plugin instances a node holds at once unless its config says
/// otherwise (`node.max_plugin_instances`).
pub const DEFAULT_INSTANCE_SLOTS: usize = 1024;

/// The engine, its epoch ticker, and the compiled-component cache.
pub struct Runtime {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    slots: usize,
}

impl Runtime {
    /// Builds the engine with room for `slots` plugin instances at once
    /// (a plugin holds one, two while it is swapped). `cache_dir`, when
    /// given, keeps precompiled components across restarts.
    ///
    /// Instances come from a pool sized here, which makes instantiating
    /// one a matter of microseconds. Its slots reserve address space, not
    /// memory: a slot's pages are touched only by the instance in it.
    pub fn new(cache_dir: Option<PathBuf>, slots: usize) -> anyhow::Result<Arc<Runtime>> {
        let slots = slots.max(1);
        let slots32 = u32::try_from(slots).unwrap_or(u32::MAX);
        let mut pool = PoolingAllocationConfig::default();
        // A plugin built for wasm32-wasip2 is one component of about three
        // core instances (its module, the WASI adapter, shims), each with
        // up to a memory and a table or two.
        pool.total_component_instances(slots32)
            .total_core_instances(slots32.saturating_mul(4))
            .total_memories(slots32.saturating_mul(2))
            .total_tables(slots32.saturating_mul(4))
            .max_memory_size(MAX_MEMORY_BYTES as usize)
            .max_memories_per_component(4)
            .max_tables_per_component(8);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // The component-model async ABI is not used; leaving it on makes
            // every call several times slower.
            .concurrency_support(false);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("creating engine: {e}"))?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir)?;
        }
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plexus-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Arc::new(Runtime {
            engine,
            cache_dir,
            slots,
        }))
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// How many plugin instances the engine holds at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The content hash of a component, as shown to people (first 12 hex
    /// digits of its SHA-256).
    pub fn version_of(bytes: &[u8]) -> String {
        let digest = Sha256::digest(bytes);
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }

    /// Compiles `bytes`, or loads the compiled form from the cache.
    pub fn compile(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
            return Err(LoadError::NotWasm);
        }
        // Layer 1 is a component; a core module has layer 0.
        if bytes[6..8] != [1, 0] {
            return Err(LoadError::CoreModule);
        }
        let Some(dir) = &self.cache_dir else {
            return Component::new(&self.engine, bytes)
                .map_err(|e| LoadError::Invalid(format!("{e:#}")));
        };
        let path = dir.join(format!("{}.cwasm", self.cache_key(bytes)));
        if path.exists() {
            match load_cached(&self.engine, &path) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring unreadable compile cache entry: {e:#}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        match component.serialize() {
            Ok(compiled) => {
                // Write then rename, so a crash never leaves a torn entry.
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, compiled)
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .is_err()
                {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            Err(e) => tracing::warn!("cannot cache compiled component: {e:#}"),
        }
        Ok(component)
    }

    fn cache_key(&self, bytes: &[u8]) -> String {
        let mut h = DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let digest = Sha256::digest(bytes);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{hex}-{:016x}", h.finish())
    }
}

#[allow(unsafe_code)]
fn load_cached(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: the file was produced by `Component::serialize` of an engine
    // with the same compatibility hash (part of its name) and lives in the
    // node's own data directory, written atomically by `compile`. wasmtime
    // additionally checks the header and engine settings on load.
    unsafe { Component::deserialize_file(engine, path) }
}
