//! The plugin host: one wasmtime engine, components compiled once and cached on disk, and
//! sandboxed instances with memory caps, wall-clock deadlines, output budgets and captured,
//! capped output.
//!
//! Sandbox defaults: no preopened directories, no environment variables, no arguments, no
//! sockets (TCP, UDP and name lookup all denied), stdin closed, stdout/stderr captured and
//! forwarded to the log with the plugin's name. A plugin reaches the outside world only
//! through the `weir:plugin/host` imports, and HMAC keys only by the secret names the
//! pipeline grants it.

pub mod grants;
mod pipe;

pub mod cache;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cpu_clock::CpuTime;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub use grants::Grants;
pub use pipe::CappedPipe;

mod bindings {
    wasmtime::component::bindgen!({
        world: "transform-plugin",
        path: "../wit",
    });
}

mod extractor_bindings {
    wasmtime::component::bindgen!({
        world: "extractor-plugin",
        path: "../wit",
        with: {
            "weir:plugin/host": super::bindings::weir::plugin::host,
            "weir:plugin/types": super::bindings::weir::plugin::types,
        },
    });
}

mod rule_bindings {
    wasmtime::component::bindgen!({
        world: "quality-rule-plugin",
        path: "../wit",
        with: {
            "weir:plugin/host": super::bindings::weir::plugin::host,
            "weir:plugin/types": super::bindings::weir::plugin::types,
        },
    });
}

use bindings::weir::plugin::host as wit_host;
use bindings::weir::plugin::state as wit_state;
use bindings::weir::plugin::types as wit_types;

/// The contract versions this host runs: `weir:plugin@0.2.x`.
pub const SUPPORTED_CONTRACT: &str = "0.2";

/// How often the engine's epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(5);

/// What can go wrong loading or running a plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read plugin {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "plugin {path} has sha256 {actual}, but the pipeline pins {expected}; rebuild the plugin or update the pin"
    )]
    DigestMismatch { path: PathBuf, expected: String, actual: String },
    #[error("{path} is not a WebAssembly component: {message}")]
    NotAComponent { path: PathBuf, message: String },
    #[error("plugin {path} {message}")]
    Incompatible { path: PathBuf, message: String },
    #[error("cannot set up the plugin engine: {0}")]
    Engine(String),
    /// A grant in the plugin's table cannot be given, or the plugin needs one it lacks.
    #[error("plugin `{plugin}`: {message}")]
    Grant { plugin: String, message: String },
    /// A plugin call failed: the plugin returned an error, trapped, or broke the contract.
    #[error("{0}")]
    Call(#[from] CallError),
}

/// `Result` with the plugin [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed call into a plugin instance, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("invalid input{}{}: {message}", row.map(|r| format!(" at row {r}")).unwrap_or_default(), column.as_ref().map(|c| format!(" (column `{c}`)")).unwrap_or_default())]
    InvalidInput { row: Option<u64>, column: Option<String>, message: String },
    #[error("plugin error: {0}")]
    Internal(String),
    #[error("exceeded its wall-clock deadline of {0:?} for one call (timeout_ms) and was stopped")]
    Deadline(Duration),
    #[error("returned {got} in one call, over its output budget of {budget} per call ({key}); raise `{key}` on the plugin if that much output is legitimate")]
    OutputBudget { got: String, budget: String, key: &'static str },
    #[error("declared an output schema weir cannot publish faithfully: {0}")]
    BadSchema(String),
    #[error("hit its memory cap of {} MiB and was stopped", .0 / (1024 * 1024))]
    Memory(u64),
    #[error("trapped (crashed): {message}{}", if stderr.is_empty() { String::new() } else { format!("\n  plugin stderr: {stderr}") })]
    Trap { message: String, stderr: String },
    #[error("returned bytes that are not a valid Arrow IPC stream: {0}")]
    BadOutput(String),
    #[error("returned a batch whose schema [{got}] differs from the schema it declared in init [{declared}]")]
    SchemaMismatch { got: String, declared: String },
    #[error("broke its column rewrite declaration (`weir.rewrites`): {0}")]
    Rewrite(String),
    #[error("broke its row filter declaration (`weir.filter`): {0}")]
    Filter(String),
}

impl CallError {
    /// Why the host stopped the plugin, when it did: `deadline`, `memory` (its cap) or
    /// `output_budget`. None for failures of the plugin's own.
    pub fn kill(&self) -> Option<&'static str> {
        match self {
            CallError::Deadline(_) => Some("deadline"),
            CallError::Memory(_) => Some("memory"),
            CallError::OutputBudget { .. } => Some("output_budget"),
            _ => None,
        }
    }
}

/// Per-plugin limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Linear-memory cap per instance, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock deadline per call, whatever the plugin does or waits on (an epoch
    /// ticker interrupts running code; a sleep is cut short at the deadline).
    pub timeout: Duration,
    /// Per call: bytes of stdout, of stderr and of `log` lines forwarded; the rest is
    /// dropped and counted.
    pub output_cap: usize,
    /// Per instance (a step's run of the plugin): bytes of stdout, stderr and `log` lines
    /// forwarded in all; the rest is dropped, said once, and counted.
    pub log_bytes: usize,
    /// Rows one call may return.
    pub output_rows: u64,
    /// Arrow IPC bytes one call may return.
    pub output_bytes: u64,
    /// Bytes of keyed state the host keeps for the instance in memory (`weir:plugin/state`);
    /// tables spill to disk past it, sets fail.
    pub state_bytes: u64,
}

impl Limits {
    pub const DEFAULT_MEMORY_MB: u64 = 256;
    pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
    pub const DEFAULT_LOG_KB: usize = 1024;
    pub const DEFAULT_OUTPUT_ROWS: u64 = 100_000_000;
    pub const DEFAULT_OUTPUT_MB: u64 = 1024;
    pub const DEFAULT_STATE_MB: u64 = 256;
    /// Named states one instance may open.
    pub const MAX_STATES: usize = 16;
    /// Distinct counter names one instance may create.
    pub const MAX_COUNTERS: usize = 1000;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: Self::DEFAULT_MEMORY_MB << 20,
            timeout: Duration::from_millis(Self::DEFAULT_TIMEOUT_MS),
            output_cap: 64 << 10,
            log_bytes: Self::DEFAULT_LOG_KB << 10,
            output_rows: Self::DEFAULT_OUTPUT_ROWS,
            output_bytes: Self::DEFAULT_OUTPUT_MB << 20,
            state_bytes: Self::DEFAULT_STATE_MB << 20,
        }
    }
}

/// What `weir plugin inspect` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub size_bytes: u64,
    /// `transform`, `extractor` or `quality-rule`, from the interface it exports.
    pub world: Option<String>,
    /// The `weir:plugin` contract version it was built against.
    pub contract_version: Option<String>,
    pub compatible: bool,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// Filled by [`PluginEngine::time_start`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<StartTimings>,
}

/// How long starting a plugin takes (what `weir plugin inspect` reports).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StartTimings {
    /// Seconds compiling the component; `None` when it came from the compile cache.
    pub compile_secs: Option<f64>,
    /// Seconds to read and hash the file, load the compiled component from the cache, check
    /// the contract and pre-instantiate (once per plugin per run).
    pub load_secs: Option<f64>,
    /// Seconds for a fresh store and instance (once per step and attempt).
    pub instantiate_secs: Option<f64>,
    /// Why the plugin cannot start in weir's sandbox (an import weir does not provide, an
    /// export of the wrong shape); `None` when it starts.
    pub error: Option<String>,
}

/// The one engine of a weir process, with its component cache.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    ticker: Arc<Ticker>,
}

/// Keeps the epoch ticker running while the engine or any plugin it loaded is alive: a
/// plugin's deadline is counted in the ticker's epochs, so a plugin that outlives the
/// engine it came from must keep it going (else a looping plugin is never stopped).
struct Ticker(Arc<AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A compiled, checked plugin, ready to instantiate many times.
#[derive(Clone)]
pub struct LoadedPlugin {
    pub info: PluginInfo,
    pre: Prepared,
    /// What its instances may reach beyond the sandbox ([`LoadedPlugin::with_grants`]).
    grants: Arc<Grants>,
    engine: Engine,
    _ticker: Arc<Ticker>,
}

#[derive(Clone)]
enum Prepared {
    Transform(bindings::TransformPluginPre<HostState>),
    Rule(rule_bindings::QualityRulePluginPre<HostState>),
    Extractor(extractor_bindings::ExtractorPluginPre<HostState>),
}

impl PluginEngine {
    /// Build the engine. `cache_dir` holds compiled components (created if missing);
    /// `None` compiles every time.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        // `WEIR_PROFILE=perfmap weir run ...` writes /tmp/perf-<pid>.map so `perf report`
        // names the plugins' functions (how the benchmark's guest loops were profiled).
        if std::env::var("WEIR_PROFILE").as_deref() == Ok("perfmap") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| Error::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| Error::Engine(e.to_string()))?;
        shadow_clock_subscriptions(&mut linker).map_err(|e| Error::Engine(e.to_string()))?;
        // outgoing HTTP is linked for every plugin and refused per request unless granted
        // (`allowed_hosts`); a plugin importing it without the grant is refused at load
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker).map_err(|e| Error::Engine(e.to_string()))?;
        wit_host::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(|e| Error::Engine(e.to_string()))?;
        wit_state::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(|e| Error::Engine(e.to_string()))?;
        wit_types::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(|e| Error::Engine(e.to_string()))?;

        // One ticker thread advances the epoch; it holds only a weak handle, so it ends
        // with the engine.
        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.weak();
        let ticker_stop = stop.clone();
        std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                if ticker_stop.load(Ordering::Relaxed) {
                    break;
                }
                match ticker_engine.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => break,
                }
            })
            .map_err(|e| Error::Engine(e.to_string()))?;

        if let Some(dir) = &cache_dir {
            if let Err(e) = create_private_dir(dir) {
                tracing_warn(&format!("component cache {} unusable ({e}); compiling without it", dir.display()));
            }
        }
        Ok(PluginEngine { engine, linker, cache_dir, ticker: Arc::new(Ticker(stop)) })
    }

    /// The default cache directory: `$WEIR_CACHE_DIR`, else `$XDG_CACHE_HOME/weir`, else
    /// `~/.cache/weir`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("WEIR_CACHE_DIR") {
            return Some(PathBuf::from(d));
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(d).join("weir"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("weir"))
    }

    /// Read, pin-check, compile (or load from cache), contract-check and pre-instantiate a
    /// transform or quality-rule plugin.
    pub fn load(&self, path: &Path, pinned_sha256: Option<&str>) -> Result<LoadedPlugin> {
        let (component, sha256, size, _) = self.component(path, |sha256| match pinned_sha256 {
            Some(expected) if !expected.eq_ignore_ascii_case(sha256) => Err(Error::DigestMismatch {
                path: path.to_path_buf(),
                expected: expected.to_string(),
                actual: sha256.to_string(),
            }),
            _ => Ok(()),
        })?;
        let info = self.describe(path, &component, sha256, size);
        check_contract(path, &info)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| Error::Incompatible {
            path: path.to_path_buf(),
            message: format!("imports something the weir sandbox does not provide: {e:#}"),
        })?;
        let world = info.world.clone().unwrap_or_default();
        let bad_exports = |e: wasmtime::Error| Error::Incompatible {
            path: path.to_path_buf(),
            message: format!("does not export the {world} interface weir expects: {e:#}"),
        };
        let pre = match world.as_str() {
            "transform" => Prepared::Transform(bindings::TransformPluginPre::new(pre).map_err(bad_exports)?),
            "quality-rule" => Prepared::Rule(rule_bindings::QualityRulePluginPre::new(pre).map_err(bad_exports)?),
            "extractor" => Prepared::Extractor(extractor_bindings::ExtractorPluginPre::new(pre).map_err(bad_exports)?),
            other => {
                return Err(Error::Incompatible {
                    path: path.to_path_buf(),
                    message: format!("is a {other} plugin, which this weir cannot run yet"),
                })
            }
        };
        let grants = Arc::new(Grants::default());
        Ok(LoadedPlugin { info, pre, grants, engine: self.engine.clone(), _ticker: self.ticker.clone() })
    }

    /// Describe a component file; also the seconds compiling took (`None`: from the cache).
    fn inspect_compiling(&self, path: &Path) -> Result<(PluginInfo, Option<f64>)> {
        let (component, sha256, size, compile_secs) = self.component(path, |_| Ok(()))?;
        Ok((self.describe(path, &component, sha256, size), compile_secs))
    }

    /// The compiled component of the file at `path`, its sha256 and size, and the seconds
    /// compiling took (`None`: from the cache). `check` sees the digest before anything is
    /// compiled or loaded.
    ///
    /// A cached component is found without reading the file when the digest index knows the
    /// file: same device, inode, size, mtime and ctime as when its digest was recorded.
    /// (ctime cannot be set back by a user, so a rewritten file is read and hashed again.)
    /// That skips reading and hashing megabytes on every run: 9 of the 12 ms a cached
    /// 8.6 MB plugin took to load.
    fn component(
        &self,
        path: &Path,
        check: impl Fn(&str) -> Result<()>,
    ) -> Result<(Component, String, u64, Option<f64>)> {
        let read_err = |source| Error::Read { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let index = self.cache_dir.as_ref().map(|d| DigestIndex::new(d, path, &meta));
        if let Some(sha256) = index.as_ref().and_then(DigestIndex::known) {
            check(&sha256)?;
            if let Some(c) = self.cached(&sha256) {
                return Ok((c, sha256, meta.len(), None));
            }
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        let sha256 = hex(&Sha256::digest(&bytes));
        check(&sha256)?;
        let t = std::time::Instant::now();
        let (component, from_cache) = self.compile_or_load(path, &bytes, &sha256)?;
        if let Some(index) = &index {
            index.record(&sha256);
        }
        let compile_secs = (!from_cache).then(|| t.elapsed().as_secs_f64());
        Ok((component, sha256, bytes.len() as u64, compile_secs))
    }

    /// The cached compiled component for this digest, if there is a loadable one.
    fn cached(&self, sha256: &str) -> Option<Component> {
        let file = self.cache_dir.as_ref()?.join(self.cache_key(sha256));
        if !file.exists() {
            return None;
        }
        // SAFETY: the cache directory is created private to this user and holds only files
        // `compile_or_load` serialised with the same engine settings (the key includes the
        // engine's compatibility hash). A file that fails to load is recompiled and replaced.
        match unsafe { Component::deserialize_file(&self.engine, &file) } {
            Ok(c) => {
                cache::mark_used(&file);
                Some(c)
            }
            Err(e) => {
                tracing_warn(&format!("ignoring unreadable cached component {}: {e}", file.display()));
                None
            }
        }
    }

    /// Describe a component file and time its start as a run does it: compile (unless
    /// cached), then load from the cache and instantiate once. Plugins this weir cannot run
    /// are described without the load and instantiate timings.
    pub fn time_start(&self, path: &Path) -> Result<PluginInfo> {
        let (mut info, compile_secs) = self.inspect_compiling(path)?;
        let mut timings = StartTimings { compile_secs, load_secs: None, instantiate_secs: None, error: None };
        if info.compatible && info.world.is_some() {
            // a plugin that cannot start is still described: the failure is one more finding
            let mut start = || -> Result<()> {
                let t = std::time::Instant::now();
                let plugin = self.load(path, None)?;
                timings.load_secs = Some(t.elapsed().as_secs_f64());
                let quiet: LogSink = Arc::new(|_: &LogLine| {});
                let t = std::time::Instant::now();
                match &plugin.pre {
                    Prepared::Transform(_) => {
                        drop(TransformInstance::new(&plugin, Limits::default(), Arc::default(), quiet)?)
                    }
                    Prepared::Rule(_) => drop(RuleInstance::new(&plugin, Limits::default(), quiet)?),
                    Prepared::Extractor(_) => drop(ExtractorInstance::new(&plugin, Limits::default(), quiet)?),
                }
                timings.instantiate_secs = Some(t.elapsed().as_secs_f64());
                Ok(())
            };
            if let Err(e) = start() {
                timings.error = Some(match e {
                    Error::Incompatible { message, .. } => message,
                    other => other.to_string(),
                });
            }
        }
        info.start = Some(timings);
        Ok(info)
    }

    fn describe(&self, path: &Path, component: &Component, sha256: String, size_bytes: u64) -> PluginInfo {
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(&self.engine).map(|(n, _)| n.to_string()).collect();
        let exports: Vec<String> = ty.exports(&self.engine).map(|(n, _)| n.to_string()).collect();
        let mut world = None;
        let mut contract_version = None;
        for name in &exports {
            if let Some(rest) = name.strip_prefix("weir:plugin/") {
                let (iface, version) = rest.split_once('@').unwrap_or((rest, ""));
                if matches!(iface, "transform" | "extractor" | "quality-rule") {
                    world = Some(iface.to_string());
                    contract_version = Some(version.to_string()).filter(|v| !v.is_empty());
                }
            }
        }
        let compatible = contract_version.as_deref().map(version_supported).unwrap_or(false);
        PluginInfo {
            path: path.to_path_buf(),
            sha256,
            size_bytes,
            world,
            contract_version,
            compatible,
            imports,
            exports,
            start: None,
        }
    }

    fn cache_key(&self, sha256: &str) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        format!("{sha256}-{:016x}.cwasm", h.finish())
    }

    /// Keep the cache within its size limit after `written` was added (see [`cache`]).
    fn prune_cache(&self, written: &Path) {
        let Some(dir) = &self.cache_dir else { return };
        let (limit, problem) = cache::limit_bytes();
        if let Some(p) = problem {
            tracing_warn(&p);
        }
        match cache::prune(dir, limit, written) {
            Ok(r) if r.entries > 0 => tracing_info(&format!(
                "removed {} compiled plugin(s) used longest ago ({:.0} MB) to keep {} within {} MB",
                r.entries,
                r.bytes as f64 / 1e6,
                dir.display(),
                limit >> 20
            )),
            Ok(_) => {}
            Err(e) => tracing_warn(&format!("could not prune the plugin cache {}: {e}", dir.display())),
        }
    }

    /// The compiled component, and whether it came from the cache.
    fn compile_or_load(&self, path: &Path, bytes: &[u8], sha256: &str) -> Result<(Component, bool)> {
        if let Some(c) = self.cached(sha256) {
            return Ok((c, true));
        }
        let cached = self.cache_dir.as_ref().map(|d| d.join(self.cache_key(sha256)));
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| Error::NotAComponent { path: path.to_path_buf(), message: format!("{e:#}") })?;
        if let Some(file) = &cached {
            if let Ok(serialized) = component.serialize() {
                let tmp = file.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &serialized).is_ok() && std::fs::rename(&tmp, file).is_ok() {
                    self.prune_cache(file);
                }
                let _ = std::fs::remove_file(&tmp);
            }
        }
        Ok((component, false))
    }
}

/// Where the digest of a plugin file is remembered, keyed by the file's path: one small file
/// per plugin path under `<cache>/digests/`, holding the file's identity and its sha256.
struct DigestIndex {
    entry: PathBuf,
    identity: Option<String>,
}

impl DigestIndex {
    /// Files changed less than this long ago are not remembered: a rewrite within the
    /// timestamps' granularity could otherwise keep the same identity.
    const SETTLED: Duration = Duration::from_secs(2);

    fn new(cache_dir: &Path, path: &Path, meta: &std::fs::Metadata) -> DigestIndex {
        let full = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let key = hex(&Sha256::digest(full.to_string_lossy().as_bytes()));
        DigestIndex { entry: cache_dir.join("digests").join(key), identity: Self::identity(meta) }
    }

    #[cfg(unix)]
    fn identity(meta: &std::fs::Metadata) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let changed = std::time::UNIX_EPOCH
            + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec().clamp(0, 999_999_999) as u32);
        let modified = meta.modified().ok()?;
        let settled = std::time::SystemTime::now().checked_sub(Self::SETTLED)?;
        if changed > settled || modified > settled {
            return None;
        }
        Some(format!(
            "{} {} {} {}.{} {}.{}",
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        ))
    }

    #[cfg(not(unix))]
    fn identity(_meta: &std::fs::Metadata) -> Option<String> {
        None
    }

    /// The recorded digest, if the file is still the one it was recorded for.
    fn known(&self) -> Option<String> {
        let identity = self.identity.as_ref()?;
        let text = std::fs::read_to_string(&self.entry).ok()?;
        let (recorded, sha256) = text.trim_end().rsplit_once(' ')?;
        (recorded == identity && sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| sha256.to_string())
    }

    /// Remember the digest (best effort: the index only saves time).
    fn record(&self, sha256: &str) {
        let Some(identity) = &self.identity else { return };
        let Some(dir) = self.entry.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let tmp = self.entry.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, format!("{identity} {sha256}\n")).is_ok() {
            let _ = std::fs::rename(&tmp, &self.entry);
        }
        let _ = std::fs::remove_file(&tmp);
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn tracing_warn(message: &str) {
    eprintln!("weir: warning: {message}");
}

fn tracing_info(message: &str) {
    eprintln!("weir: {message}");
}

/// Whether a component imports the `state` interface at 0.2.2 or later, so it reads the
/// snapshot it restores in parts.
fn reads_snapshot_in_parts(imports: &[String]) -> bool {
    imports.iter().any(|name| {
        let Some(v) = name.strip_prefix("weir:plugin/state@") else { return false };
        let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        let (major, minor, patch) = (parts.next(), parts.next(), parts.next());
        (major, minor) == (Some(0), Some(2)) && patch >= Some(2)
    })
}

fn version_supported(v: &str) -> bool {
    let mut parts = v.split('.');
    let (major, minor) = (parts.next(), parts.next());
    let mut want = SUPPORTED_CONTRACT.split('.');
    major == want.next() && minor == want.next()
}

fn check_contract(path: &Path, info: &PluginInfo) -> Result<()> {
    match (&info.world, &info.contract_version) {
        (None, _) => Err(Error::Incompatible {
            path: path.to_path_buf(),
            message: "does not export a weir:plugin interface (transform, extractor or quality-rule); build it with weir-sdk".into(),
        }),
        (Some(_), v) if !info.compatible => Err(Error::Incompatible {
            path: path.to_path_buf(),
            message: format!(
                "was built against weir:plugin@{}, but this weir supports weir:plugin@{SUPPORTED_CONTRACT}.x; rebuild it with a matching weir-sdk",
                v.as_deref().unwrap_or("(no version)")
            ),
        }),
        _ => Ok(()),
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A log line a plugin wrote, via the `log` import or stdout/stderr.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
    /// Written by the plugin itself (its `log` calls, stdout and stderr), not weir's notes
    /// about it (caps reached, lines dropped).
    pub own: bool,
}

/// Where a plugin's log lines go.
pub type LogSink = Arc<dyn Fn(&LogLine) + Send + Sync>;

/// Per-instance state inside the store.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: wasmtime_wasi_http::WasiHttpCtx,
    /// The origin check and granted headers of outgoing requests.
    http_hooks: grants::HttpHooks,
    memory_cap: u64,
    memory_hit: bool,
    /// The most linear memory the instance grew to, in bytes.
    memory_peak: u64,
    /// Per granted secret, its HMAC key state (the key blocks absorbed once, at start-up).
    hmac_keys: HashMap<String, weir_sdk::hashing::Hasher>,
    counters: HashMap<String, i64>,
    /// Counter names refused past [`Limits::MAX_COUNTERS`].
    counters_refused: u64,
    /// When the guest marked each phase of the current call (see `weir_sdk::host::phase`).
    marks: [Option<CpuTime>; 4],
    log: LogSink,
    limits: Limits,
    /// When the current call must end (none between calls).
    deadline: Option<std::time::Instant>,
    /// Set when a sleep of the current call was cut short at its deadline.
    sleep_cut: Arc<AtomicBool>,
    /// The origin of the guest's monotonic clock.
    clock_origin: std::time::Instant,
    budget: LogBudget,
    /// The keyed states the plugin opened (`weir:plugin/state`), by handle.
    states: Vec<crate::state::KeyedState>,
    /// Where they spill and checkpoint (none: in memory only), and what a resumed run
    /// reopens them from.
    state_dir: Option<PathBuf>,
    restored: HashMap<String, crate::state::Manifest>,
    /// The current `finish` asked to be called again (`more-output`).
    more_output: bool,
    /// During `snapshot`: the parts the plugin sent so far (`snapshot-write`).
    snapshot_parts: Option<Vec<u8>>,
    /// During `restore`: the snapshot being read back in parts, and how far.
    restore_parts: Option<(Vec<u8>, usize)>,
}

/// What a plugin may still write to weir's log, and what it lost.
#[derive(Debug, Default)]
struct LogBudget {
    /// Bytes of `log` lines this call.
    call_bytes: usize,
    /// Bytes forwarded this run (log lines, stdout, stderr).
    run_bytes: usize,
    /// Dropped this call (log lines only; stdout/stderr count their own).
    call_dropped: (u64, u64),
    /// Dropped over the run: lines, bytes.
    run_dropped: (u64, u64),
    /// The run's cap was reached and said.
    run_cap_said: bool,
}

impl HostState {
    /// Whether `len` more bytes may go to the log; counts them either way. `per_call`
    /// applies the per-call cap too (log lines; stdout/stderr are capped by their pipes).
    fn admit(&mut self, len: usize, per_call: bool) -> bool {
        let b = &mut self.budget;
        let over_call = per_call && b.call_bytes + len > self.limits.output_cap;
        let over_run = b.run_bytes + len > self.limits.log_bytes;
        if over_call || over_run {
            if per_call {
                b.call_dropped.0 += 1;
                b.call_dropped.1 += len as u64;
            }
            b.run_dropped.0 += 1;
            b.run_dropped.1 += len as u64;
            return false;
        }
        if per_call {
            b.call_bytes += len;
        }
        b.run_bytes += len;
        true
    }

    /// Say once that the run's log budget is spent.
    fn say_run_cap(&mut self) {
        if self.budget.run_bytes + 1024 > self.limits.log_bytes
            && self.budget.run_dropped.0 > 0
            && !self.budget.run_cap_said
        {
            self.budget.run_cap_said = true;
            (self.log)(&LogLine {
                level: "warn",
                message: format!(
                    "log budget of {} KiB per run reached (max_log_kb): this plugin's further log lines, stdout and stderr are dropped and counted",
                    self.limits.log_bytes >> 10
                ),
                own: false,
            });
        }
    }

    /// The guest's monotonic clock, in nanoseconds.
    fn clock_now(&self) -> u64 {
        self.clock_origin.elapsed().as_nanos() as u64
    }

    /// When a sleep of `d` that starts now ends: at the call's deadline at the latest.
    /// Past the deadline already, the call is stopped.
    fn sleep(&self, d: Duration) -> wasmtime::Result<CappedSleep> {
        let now = std::time::Instant::now();
        let until = now.checked_add(d).unwrap_or(now + Duration::from_secs(365 * 86_400));
        let (until, cut) = match self.deadline {
            Some(deadline) if now >= deadline => return Err(wasmtime::Trap::Interrupt.into()),
            Some(deadline) => (until.min(deadline), until > deadline),
            None => (until, false),
        };
        Ok(CappedSleep { until: tokio::time::Instant::from_std(until), cut: cut.then(|| self.sleep_cut.clone()) })
    }
}

/// A plugin's sleep (a clock subscription), cut short at its call's deadline; a sleep that
/// was cut says so when it ends, and the call fails with its deadline.
struct CappedSleep {
    until: tokio::time::Instant,
    cut: Option<Arc<AtomicBool>>,
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for CappedSleep {
    async fn ready(&mut self) {
        tokio::time::sleep_until(self.until).await;
        if let Some(cut) = &self.cut {
            cut.store(true, Ordering::Relaxed);
        }
    }
}

/// The guest's monotonic clock: time since the instance was made (shared with the host's
/// sleep replacement, which needs to turn the guest's instants into durations).
struct GuestClock {
    origin: std::time::Instant,
}

impl wasmtime_wasi::HostMonotonicClock for GuestClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

/// Replace WASI's clock subscriptions with ones that end at the call's deadline: a plugin
/// blocked in a sleep cannot hold a run past its deadline (the epoch ticker only stops
/// running code).
fn shadow_clock_subscriptions(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;
    type Subscribed = wasmtime::Result<(Resource<DynPollable>,)>;
    /// A pollable for a sleep of `nanos` (or until the guest's clock reads `nanos`).
    fn subscribe(mut store: wasmtime::StoreContextMut<'_, HostState>, nanos: u64, absolute: bool) -> Subscribed {
        let state = store.data_mut();
        let nanos = if absolute { nanos.saturating_sub(state.clock_now()) } else { nanos };
        let sleep = state.sleep(Duration::from_nanos(nanos))?;
        let sleep = state.table.push(sleep)?;
        Ok((wasmtime_wasi::p2::subscribe(&mut state.table, sleep)?,))
    }
    linker.allow_shadowing(true);
    let mut clock = linker.instance("wasi:clocks/monotonic-clock@0.2.12")?;
    clock.func_wrap("subscribe-duration", |store, (nanos,): (u64,)| subscribe(store, nanos, false))?;
    clock.func_wrap("subscribe-instant", |store, (when,): (u64,)| subscribe(store, when, true))?;
    linker.allow_shadowing(false);
    Ok(())
}

impl wasmtime_wasi_http::WasiHttpView for HostState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.http_hooks }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_cap {
            self.memory_hit = true;
            return Ok(false);
        }
        self.memory_peak = self.memory_peak.max(desired as u64);
        Ok(true)
    }
    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl wit_types::Host for HostState {}

impl wit_host::Host for HostState {
    fn log(&mut self, level: wit_host::Level, message: String) {
        use wit_host::Level::*;
        let level = match level {
            Trace => "trace",
            Debug => "debug",
            Info => "info",
            Warn => "warn",
            Error => "error",
        };
        let mut message = message;
        if message.len() > 8 * 1024 {
            let cut = (0..=8 * 1024).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
            message.truncate(cut);
        }
        if self.admit(message.len(), true) {
            (self.log)(&LogLine { level, message, own: true });
        } else {
            self.say_run_cap();
        }
    }

    fn counter_add(&mut self, name: String, delta: i64) {
        if name == weir_sdk::host::PHASE_COUNTER {
            if let Some(m) = usize::try_from(delta).ok().and_then(|i| self.marks.get_mut(i)) {
                *m = Some(CpuTime::now());
            }
            return;
        }
        if self.counters.len() < Limits::MAX_COUNTERS || self.counters.contains_key(&name) {
            let c = self.counters.entry(name).or_insert(0);
            *c = c.saturating_add(delta);
        } else {
            if self.counters_refused == 0 {
                let mut name = name;
                name.truncate((0..=64.min(name.len())).rev().find(|&i| name.is_char_boundary(i)).unwrap_or(0));
                (self.log)(&LogLine {
                    level: "warn",
                    message: format!(
                        "counter `{name}` refused: at most {} distinct counter names per plugin; further new names are dropped and counted",
                        Limits::MAX_COUNTERS
                    ),
                    own: false,
                });
            }
            self.counters_refused += 1;
        }
    }

    fn hash_strings(
        &mut self,
        algorithm: wit_host::HashAlgorithm,
        offsets: Vec<u32>,
        data: Vec<u8>,
    ) -> std::result::Result<Vec<u8>, String> {
        let sha256;
        let hasher = match &algorithm {
            wit_host::HashAlgorithm::Sha256 => {
                sha256 = weir_sdk::hashing::Hasher::sha256();
                &sha256
            }
            wit_host::HashAlgorithm::HmacSha256(name) => self.hmac_keys.get(name).ok_or_else(|| {
                format!("secret `{name}` is not granted to this plugin; add it to the plugin's `secrets` list in the pipeline file")
            })?,
        };
        weir_sdk::hashing::hash_strings_with(hasher, &offsets, &data)
    }
}

/// The most rows one `scan` call hands back.
const MAX_SCAN_ROWS: u32 = 1 << 20;

impl HostState {
    fn state_at(&mut self, handle: u32) -> std::result::Result<(usize, usize), String> {
        let i = handle as usize;
        if i >= self.states.len() {
            return Err(format!("no state has handle {handle}"));
        }
        // the budget is the instance's: what the other states hold counts against it
        let others: usize =
            self.states.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, s)| s.memory_bytes()).sum();
        let budget = usize::try_from(self.limits.state_bytes).unwrap_or(usize::MAX).saturating_sub(others);
        Ok((i, budget))
    }

    /// The states' spill and size counters, for the run summary.
    fn state_counters(&mut self) {
        let spills: u64 = self.states.iter().map(|s| s.spills).sum();
        if spills > 0 {
            self.counters.insert("state_spills".into(), spills as i64);
            let mb = self.states.iter().map(|s| s.spilled_bytes).sum::<u64>() >> 20;
            self.counters.insert("state_spilled_mb".into(), mb as i64);
        }
    }
}

/// Marks a checkpoint holding keyed-state manifests beside the plugin's own snapshot
/// (a checkpoint without it is a plugin snapshot as weir 0.1 stored it).
const CHECKPOINT_MAGIC: u64 = u64::from_le_bytes(*b"WEIRCKP1");

type Manifests = HashMap<String, crate::state::Manifest>;

/// A stored checkpoint: the plugin's own snapshot and the manifests of its keyed states.
fn split_checkpoint(bytes: &[u8]) -> std::result::Result<(Option<Vec<u8>>, Manifests), String> {
    let mut r = weir_sdk::state::Reader::new(bytes);
    if bytes.len() < 8 || r.u64().ok() != Some(CHECKPOINT_MAGIC) {
        return Ok((Some(bytes.to_vec()), HashMap::new()));
    }
    let bad = |e: weir_sdk::Error| format!("its checkpoint is damaged: {e}");
    let own = match r.u64().map_err(bad)? {
        0 => None,
        _ => Some(r.bytes().map_err(bad)?.to_vec()),
    };
    let manifests =
        serde_json::from_slice(r.bytes().map_err(bad)?).map_err(|e| format!("its checkpoint is damaged: {e}"))?;
    r.end().map_err(bad)?;
    Ok((own, manifests))
}

/// One IPC stream from the guest as one batch.
fn guest_batch(bytes: Vec<u8>) -> std::result::Result<RecordBatch, String> {
    let (schema, mut batches) = decode_guarded(bytes)?;
    if batches.len() == 1 {
        return Ok(batches.remove(0));
    }
    arrow_select::concat::concat_batches(&schema, &batches).map_err(|e| e.to_string())
}

impl HostState {
    /// Run host work for the plugin's state; its time does not count against the call's
    /// deadline (it is the host's, bounded by the data the state holds).
    fn on_host_time<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let t = std::time::Instant::now();
        let out = f(self);
        if let Some(d) = &mut self.deadline {
            *d += t.elapsed();
        }
        out
    }
}

impl wit_state::Host for HostState {
    fn open(&mut self, spec: wit_state::Spec, schema: Vec<u8>) -> std::result::Result<u32, String> {
        use crate::state::Combine;
        let name = spec.name.clone();
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!("state name {name:?}: use 1 to 64 letters, digits, `_` or `-`"));
        }
        if self.states.iter().any(|s| s.spec().name == name) {
            return Err(format!("state `{name}` is already open"));
        }
        if self.states.len() >= Limits::MAX_STATES {
            return Err(format!("at most {} states per plugin instance", Limits::MAX_STATES));
        }
        let schema = weir_sdk::ipc::decode_schema(&schema).map_err(|e| format!("state `{name}`: its schema: {e}"))?;
        let values = spec
            .values
            .into_iter()
            .map(|v| {
                let c = match v.combine {
                    wit_state::Combine::First => Combine::First,
                    wit_state::Combine::Last => Combine::Last,
                    wit_state::Combine::Sum => Combine::Sum,
                    wit_state::Combine::Min => Combine::Min,
                    wit_state::Combine::Max => Combine::Max,
                };
                (v.name, c)
            })
            .collect();
        let spec = crate::state::Spec { name: name.clone(), key: spec.key, values, order_by: spec.order_by };
        let dir = self.state_dir.as_ref().map(|d| d.join(&name));
        let restored = self.restored.get(&name);
        let state = crate::state::KeyedState::open(spec, schema, dir, restored).map_err(|e| e.to_string())?;
        self.states.push(state);
        Ok((self.states.len() - 1) as u32)
    }

    fn insert_new(&mut self, state: u32, batch: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
        self.on_host_time(|s| s.insert_new_now(state, batch))
    }

    fn merge(&mut self, state: u32, batch: Vec<u8>) -> std::result::Result<(), String> {
        self.on_host_time(|s| s.merge_now(state, batch))
    }

    fn more_output(&mut self) {
        self.more_output = true;
    }

    fn snapshot_write(&mut self, part: Vec<u8>) -> std::result::Result<(), String> {
        let cap = self.memory_cap;
        let Some(parts) = &mut self.snapshot_parts else {
            return Err("snapshot-write is only for a `snapshot` call".into());
        };
        if (parts.len() + part.len()) as u64 > cap {
            let e = format!("a snapshot is at most the plugin's memory cap of {} MiB", cap >> 20);
            // the checkpoint fails even if the plugin goes on as if it had not
            self.snapshot_parts = None;
            return Err(e);
        }
        parts.extend_from_slice(&part);
        Ok(())
    }

    fn snapshot_read(&mut self, max_bytes: u32) -> Vec<u8> {
        match &mut self.restore_parts {
            Some((bytes, at)) => {
                let n = (max_bytes as usize).min(16 << 20).min(bytes.len() - *at);
                *at += n;
                bytes[*at - n..*at].to_vec()
            }
            None => Vec::new(),
        }
    }

    fn scan(&mut self, state: u32, max_rows: u32) -> std::result::Result<Option<Vec<u8>>, String> {
        self.on_host_time(|s| s.scan_now(state, max_rows))
    }
}

impl HostState {
    fn insert_new_now(&mut self, state: u32, batch: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
        let (i, budget) = self.state_at(state)?;
        let batch = guest_batch(batch)?;
        let fresh = self.states[i].insert_new(&batch, budget).map_err(|e| match e {
            crate::state::Error::Budget { .. } => format!("{e}; raise the plugin's `state_mb`"),
            e => e.to_string(),
        });
        self.state_counters();
        Ok(fresh?.into_iter().map(u8::from).collect())
    }

    fn merge_now(&mut self, state: u32, batch: Vec<u8>) -> std::result::Result<(), String> {
        let (i, budget) = self.state_at(state)?;
        let batch = guest_batch(batch)?;
        let merged = self.states[i].merge(&batch, budget).map_err(|e| e.to_string());
        self.state_counters();
        merged
    }

    fn scan_now(&mut self, state: u32, max_rows: u32) -> std::result::Result<Option<Vec<u8>>, String> {
        let (i, _) = self.state_at(state)?;
        let s = &mut self.states[i];
        let scanned = s.scan(max_rows.min(MAX_SCAN_ROWS) as usize).map_err(|e| e.to_string());
        self.state_counters();
        match scanned? {
            Some(b) => weir_sdk::ipc::encode(&b.schema(), &[b]).map(Some).map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }
}

/// A store with its limits and captured output: what every plugin instance runs in.
struct Sandbox {
    store: Store<HostState>,
    limits: Limits,
    stdout: CappedPipe,
    stderr: CappedPipe,
    poisoned: bool,
    stderr_tail: String,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let state = self.store.data();
        let (lines, bytes) = state.budget.run_dropped;
        let mut lost = Vec::new();
        if lines > 0 || bytes > 0 {
            lost.push(format!("its log caps dropped {lines} lines ({bytes} bytes)"));
        }
        if state.counters_refused > 0 {
            lost.push(format!("{} new counter names were refused", state.counters_refused));
        }
        if !lost.is_empty() {
            (state.log)(&LogLine { level: "warn", message: format!("over this run {}", lost.join("; ")), own: false });
        }
    }
}

impl Sandbox {
    fn new(
        plugin: &LoadedPlugin,
        limits: Limits,
        secrets: Arc<HashMap<String, Vec<u8>>>,
        log: LogSink,
    ) -> Result<Sandbox> {
        let stdout = CappedPipe::new(limits.output_cap);
        let stderr = CappedPipe::new(limits.output_cap);
        let clock_origin = std::time::Instant::now();
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            .monotonic_clock(GuestClock { origin: clock_origin })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for f in &plugin.grants.files {
            wasi.preopened_dir(&f.host, &f.guest, wasmtime_wasi::FsPerms::ReadOnly).map_err(|e| Error::Grant {
                plugin: plugin.grants.plugin.clone(),
                message: format!("files: cannot open {} for it: {e}", f.host.display()),
            })?;
        }
        let wasi = wasi.build();
        let http_hooks = grants::HttpHooks {
            grants: plugin.grants.clone(),
            log: log.clone(),
            counts: Default::default(),
            deadline: None,
        };
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_hooks,
            memory_cap: limits.memory_bytes,
            memory_hit: false,
            memory_peak: 0,
            hmac_keys: secrets.iter().map(|(name, key)| (name.clone(), weir_sdk::hashing::Hasher::hmac(key))).collect(),
            counters: HashMap::new(),
            counters_refused: 0,
            marks: [None; 4],
            log,
            limits,
            // instantiation may run guest code too (start functions): it has a deadline
            deadline: Some(std::time::Instant::now() + limits.timeout),
            sleep_cut: Arc::default(),
            clock_origin,
            budget: LogBudget::default(),
            states: Vec::new(),
            state_dir: None,
            restored: HashMap::new(),
            more_output: false,
            snapshot_parts: None,
            restore_parts: None,
        };
        let mut store = Store::new(&plugin.engine, state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        // one call may hand the host as much as the plugin's memory holds (a snapshot, a
        // batch): its memory cap is the bound, not wasmtime's default of 128 MiB per call
        store.set_hostcall_fuel(usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX).max(128 << 20));
        store.set_epoch_deadline(deadline_ticks(limits.timeout));
        // when the ticks run out, the call's deadline decides: host work done for the plugin
        // (its keyed state) pushes the deadline back by its own time
        store.epoch_deadline_callback(|ctx| {
            let now = std::time::Instant::now();
            Ok(match ctx.data().deadline {
                Some(d) if now < d => wasmtime::UpdateDeadline::Continue(deadline_ticks(d - now)),
                _ => wasmtime::UpdateDeadline::Interrupt,
            })
        });
        Ok(Sandbox { store, limits, stdout, stderr, poisoned: false, stderr_tail: String::new() })
    }

    /// The error for a failed instantiation.
    fn instantiate_error(&mut self, e: wasmtime::Error) -> Error {
        let tail = String::from_utf8_lossy(&self.stderr.drain().0).into_owned();
        let mut err = classify(e, self.store.data().memory_hit, self.limits, tail);
        if let CallError::Trap { message, .. } = &mut err {
            *message = format!("could not be instantiated: {message}");
        }
        Error::Call(err)
    }

    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<std::result::Result<T, wit_types::PluginError>>,
    ) -> Result<T, CallError> {
        if self.poisoned {
            return Err(CallError::Internal("instance is unusable after an earlier trap".into()));
        }
        self.store.set_epoch_deadline(deadline_ticks(self.limits.timeout));
        let state = self.store.data_mut();
        state.deadline = Some(std::time::Instant::now() + self.limits.timeout);
        state.http_hooks.deadline = state.deadline;
        state.budget.call_bytes = 0;
        state.sleep_cut.store(false, Ordering::Relaxed);
        let result = f(&mut self.store);
        let state = self.store.data_mut();
        state.deadline = None;
        state.http_hooks.deadline = None;
        let counts = state.http_hooks.counts;
        if counts.sent + counts.denied > 0 {
            state.counters.insert("http_requests_sent".into(), counts.sent as i64);
            state.counters.insert("http_requests_denied".into(), counts.denied as i64);
        }
        self.forward_output();
        if self.store.data().sleep_cut.load(Ordering::Relaxed) {
            // it waited until its deadline: the call is over, whatever it returned
            self.poisoned = true;
            return Err(CallError::Deadline(self.limits.timeout));
        }
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(match e {
                wit_types::PluginError::InvalidConfig(m) => CallError::InvalidConfig(m),
                wit_types::PluginError::InvalidInput(i) => {
                    CallError::InvalidInput { row: i.row, column: i.column, message: i.message }
                }
                wit_types::PluginError::Internal(m) => CallError::Internal(m),
            }),
            Err(trap) => {
                self.poisoned = true;
                Err(classify(trap, self.store.data().memory_hit, self.limits, self.stderr_tail.clone()))
            }
        }
    }

    fn forward_output(&mut self) {
        let log = self.store.data().log.clone();
        let (lines, bytes) = std::mem::take(&mut self.store.data_mut().budget.call_dropped);
        if lines > 0 && !self.store.data().budget.run_cap_said {
            log(&LogLine {
                level: "warn",
                message: format!(
                    "({lines} log lines, {bytes} bytes, dropped: `log` is capped at {} bytes per call)",
                    self.limits.output_cap
                ),
                own: false,
            });
        }
        for (pipe, level) in [(&self.stdout, "stdout"), (&self.stderr, "stderr")] {
            let (bytes, dropped) = pipe.drain();
            let text = String::from_utf8_lossy(&bytes);
            let state = self.store.data_mut();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                if state.admit(line.len(), false) {
                    log(&LogLine { level, message: line.to_string(), own: true });
                }
            }
            state.say_run_cap();
            if dropped > 0 {
                state.budget.run_dropped.1 += dropped;
                if !state.budget.run_cap_said {
                    log(&LogLine {
                        level,
                        message: format!(
                            "({dropped} more bytes dropped: output is capped at {} bytes per call)",
                            self.limits.output_cap
                        ),
                        own: false,
                    });
                }
            }
            if level == "stderr" && !bytes.is_empty() {
                // keep the tail for trap messages (a panic message ends up here)
                self.stderr_tail.push_str(text.trim_end());
                self.stderr_tail.push('\n');
                if self.stderr_tail.len() > 4096 {
                    let cut = self.stderr_tail.len() - 4096;
                    let cut =
                        (cut..self.stderr_tail.len()).find(|&i| self.stderr_tail.is_char_boundary(i)).unwrap_or(0);
                    self.stderr_tail.drain(..cut);
                }
            }
        }
    }
}

impl LoadedPlugin {
    /// Give the plugin its grants (from its `[plugins.NAME]` table). A component that
    /// imports what it was not granted (outgoing HTTP without `allowed_hosts`) is refused
    /// here, before any of its code runs.
    pub fn with_grants(mut self, grants: Grants) -> Result<Self> {
        grants
            .check_imports(&self.info.imports)
            .map_err(|message| Error::Grant { plugin: grants.plugin.clone(), message })?;
        self.grants = Arc::new(grants);
        Ok(self)
    }
}

fn wrong_world(plugin: &LoadedPlugin, wanted: &str) -> Error {
    Error::Incompatible {
        path: plugin.info.path.clone(),
        message: format!(
            "is a {} plugin, but is used as a {wanted} plugin",
            plugin.info.world.as_deref().unwrap_or("unknown")
        ),
    }
}

/// One sandboxed instance of a transform plugin.
pub struct TransformInstance {
    sb: Sandbox,
    bindings: bindings::TransformPlugin,
    declared: Option<SchemaRef>,
    /// The plugin rewrites only these columns: only they cross the boundary.
    rewrite: Option<weir_sdk::rewrite::Rewrite>,
    /// The plugin keeps or drops rows reading only these columns: only they cross, a mask
    /// comes back and the host drops the rows.
    row_filter: Option<weir_sdk::row_filter::RowFilter>,
    timings: CallTimings,
    encoder: BatchEncoder,
    /// Built against 0.2.2 or later: restored through `snapshot-read`.
    snapshot_in_parts: bool,
}

/// Encodes batch after batch to IPC bytes for a plugin, reusing the previous batch's buffer
/// once the call that read it returns (no fresh pages to fault in and zero per batch).
#[derive(Default)]
struct BatchEncoder {
    buf: Vec<u8>,
}

impl BatchEncoder {
    /// A buffer above this size (an unusually large batch) is freed, not kept.
    const MAX_KEPT: usize = 64 << 20;

    fn encode(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, CallError> {
        weir_sdk::ipc::encode_into(std::mem::take(&mut self.buf), &batch.schema(), std::slice::from_ref(batch))
            .map_err(|e| CallError::Internal(format!("host could not encode a batch: {e}")))
    }

    fn give_back(&mut self, bytes: Vec<u8>) {
        if bytes.capacity() <= Self::MAX_KEPT {
            self.buf = bytes;
        }
    }
}

/// Where the time of a plugin's `process` and `finish` calls went, summed over the calls
/// (CPU seconds of the plugin's thread). The guest phases come from marks the SDK sets; a plugin built without the
/// SDK's typed runner reports its whole call as `guest_unsplit`.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CallTimings {
    pub calls: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Host: the batch to Arrow IPC bytes.
    pub host_encode: f64,
    /// The bytes into guest memory (canonical ABI lowering, allocation in the guest).
    pub copy_in: f64,
    /// Guest: IPC bytes to a batch.
    pub guest_decode: f64,
    /// Guest: the plugin's own work.
    pub guest_compute: f64,
    /// Guest: the result to IPC bytes.
    pub guest_encode: f64,
    /// Guest time the SDK did not split into phases.
    pub guest_unsplit: f64,
    /// The result bytes out of guest memory.
    pub copy_out: f64,
    /// Host: decoding and validating the plugin's output against its declared schema.
    pub host_decode: f64,
    /// The most linear memory one instance of the plugin grew to, in bytes (the largest
    /// over instances, not a sum).
    pub peak_memory_bytes: u64,
}

impl CallTimings {
    /// Add another instance's timings.
    pub fn add(&mut self, o: &CallTimings) {
        self.calls += o.calls;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.host_encode += o.host_encode;
        self.copy_in += o.copy_in;
        self.guest_decode += o.guest_decode;
        self.guest_compute += o.guest_compute;
        self.guest_encode += o.guest_encode;
        self.guest_unsplit += o.guest_unsplit;
        self.copy_out += o.copy_out;
        self.host_decode += o.host_decode;
        self.peak_memory_bytes = self.peak_memory_bytes.max(o.peak_memory_bytes);
    }

    /// Attribute one call: `start`/`end` bracket the call on the host; the guest's marks
    /// fall in between when the SDK set them.
    fn record_call(&mut self, start: CpuTime, end: CpuTime, marks: [Option<CpuTime>; 4]) {
        let secs = |a: CpuTime, b: CpuTime| b.secs_since(a);
        self.calls += 1;
        match marks {
            [Some(entered), Some(decoded), Some(computed), Some(leaving)]
                if start <= entered
                    && entered <= decoded
                    && decoded <= computed
                    && computed <= leaving
                    && leaving <= end =>
            {
                self.copy_in += secs(start, entered);
                self.guest_decode += secs(entered, decoded);
                self.guest_compute += secs(decoded, computed);
                self.guest_encode += secs(computed, leaving);
                self.copy_out += secs(leaving, end);
            }
            _ => self.guest_unsplit += secs(start, end),
        }
    }
}

impl TransformInstance {
    /// A fresh instance with its own store, limits and secret grants.
    pub fn new(
        plugin: &LoadedPlugin,
        limits: Limits,
        secrets: Arc<HashMap<String, Vec<u8>>>,
        log: LogSink,
    ) -> Result<Self> {
        let Prepared::Transform(pre) = &plugin.pre else { return Err(wrong_world(plugin, "transform")) };
        let mut sb = Sandbox::new(plugin, limits, secrets, log)?;
        let bindings = pre.instantiate(&mut sb.store).map_err(|e| sb.instantiate_error(e))?;
        Ok(TransformInstance {
            sb,
            bindings,
            declared: None,
            rewrite: None,
            row_filter: None,
            timings: CallTimings::default(),
            encoder: BatchEncoder::default(),
            snapshot_in_parts: reads_snapshot_in_parts(&plugin.info.imports),
        })
    }

    /// Counters the plugin added so far.
    pub fn counters(&self) -> &HashMap<String, i64> {
        &self.sb.store.data().counters
    }

    /// The limits the instance runs under.
    pub fn limits(&self) -> Limits {
        self.sb.limits
    }

    /// Where the time of the calls so far went.
    pub fn timings(&self) -> CallTimings {
        CallTimings { peak_memory_bytes: self.sb.store.data().memory_peak, ..self.timings }
    }

    /// Call `init`; returns the declared output schema.
    pub fn init(
        &mut self,
        config_json: &str,
        input: &SchemaRef,
        ctx: &weir_sdk::Context,
    ) -> Result<SchemaRef, CallError> {
        let schema_bytes = weir_sdk::ipc::encode_schema(input)
            .map_err(|e| CallError::Internal(format!("host could not encode the input schema: {e}")))?;
        let ctx = wit_context(ctx);
        let b = &self.bindings;
        let out = self.sb.call(|s| b.weir_plugin_transform().call_init(s, config_json, &schema_bytes, &ctx))?;
        let declared = decode_guarded(out).map(|(s, _)| s).map_err(CallError::BadOutput)?;
        // a column rewrite: checked here once, then only the rewritten columns cross
        let (schema, names) = weir_sdk::rewrite::Rewrite::from_metadata(&declared).map_err(CallError::Rewrite)?;
        self.rewrite = match names {
            Some(names) => Some(weir_sdk::rewrite::Rewrite::new(input, &schema, &names).map_err(CallError::Rewrite)?),
            None => None,
        };
        // a row filter: likewise, only the columns it reads cross and a mask comes back
        let (schema, names) = weir_sdk::row_filter::RowFilter::from_metadata(&schema).map_err(CallError::Filter)?;
        self.row_filter = match names {
            Some(_) if self.rewrite.is_some() => {
                return Err(CallError::Filter(
                    "it also declares a column rewrite; a plugin declares one or neither".into(),
                ))
            }
            Some(names) => {
                Some(weir_sdk::row_filter::RowFilter::new(input, &schema, &names).map_err(CallError::Filter)?)
            }
            None => None,
        };
        publishable_names(&schema).map_err(CallError::BadSchema)?;
        self.declared = Some(schema.clone());
        Ok(schema)
    }

    /// Positions of the columns the plugin rewrites, when `init` declared a column rewrite
    /// (it then leaves every other column as it is, row for row).
    pub fn rewritten_columns(&self) -> Option<&[usize]> {
        self.rewrite.as_ref().map(|r| r.columns.as_slice())
    }

    /// One batch in; the batches out, each checked against the declared schema.
    pub fn process(&mut self, batch: &RecordBatch) -> Result<Vec<RecordBatch>, CallError> {
        let t0 = CpuTime::now();
        let part;
        let sent = match (&self.rewrite, &self.row_filter) {
            (Some(rw), _) => {
                part = rw.project(batch).map_err(CallError::Internal)?;
                &part
            }
            (None, Some(f)) => {
                part = f.project(batch).map_err(CallError::Internal)?;
                &part
            }
            (None, None) => batch,
        };
        let bytes = self.encoder.encode(sent)?;
        self.timings.host_encode += t0.elapsed_secs();
        self.timings.bytes_in += bytes.len() as u64;
        let b = &self.bindings;
        self.sb.store.data_mut().marks = [None; 4];
        let start = CpuTime::now();
        let out = self.sb.call(|s| b.weir_plugin_transform().call_process(s, &bytes));
        self.encoder.give_back(bytes);
        self.output(start, out, Some(batch))
    }

    /// End of input.
    /// End of input: the plugin's last batches, and whether it asked to be called again
    /// (a large result leaves in parts; each part must hold rows).
    pub fn finish(&mut self) -> Result<(Vec<RecordBatch>, bool), CallError> {
        let b = &self.bindings;
        let state = self.sb.store.data_mut();
        state.marks = [None; 4];
        state.more_output = false;
        let start = CpuTime::now();
        let out = self.sb.call(|s| b.weir_plugin_transform().call_finish(s));
        let out = self.output(start, out, None)?;
        let more = std::mem::take(&mut self.sb.store.data_mut().more_output);
        if more && out.iter().all(|b| b.num_rows() == 0) {
            return Err(CallError::Internal(
                "finish asked to be called again (more-output) but returned no rows".into(),
            ));
        }
        Ok((out, more))
    }

    /// Time a finished call and check its output; under a column rewrite, put the
    /// rewritten columns back into `input` (the batch of the call, none for `finish`).
    fn output(
        &mut self,
        start: CpuTime,
        out: Result<Vec<u8>, CallError>,
        input: Option<&RecordBatch>,
    ) -> Result<Vec<RecordBatch>, CallError> {
        let end = CpuTime::now();
        self.timings.record_call(start, end, self.sb.store.data().marks);
        let out = out?;
        self.timings.bytes_out += out.len() as u64;
        within_output_bytes(out.len(), self.sb.limits)?;
        let batches = match (&self.rewrite, &self.row_filter) {
            (Some(rw), _) => self.check_rewrite(rw, out, input),
            (None, Some(f)) => self.check_filter(f, out, input),
            (None, None) => self.check_output(out),
        };
        self.timings.host_decode += end.elapsed_secs();
        batches
    }

    /// The output of a column-rewriting plugin: its columns back in place, one row per
    /// input row, nothing at the end.
    fn check_rewrite(
        &self,
        rw: &weir_sdk::rewrite::Rewrite,
        bytes: Vec<u8>,
        input: Option<&RecordBatch>,
    ) -> Result<Vec<RecordBatch>, CallError> {
        let (schema, batches) = decode_guarded(bytes).map_err(CallError::BadOutput)?;
        let declared = self.declared.as_ref().ok_or_else(|| CallError::Internal("process before init".into()))?;
        if !weir_sdk::util::same_shape(&schema, &rw.output) {
            return Err(CallError::SchemaMismatch {
                got: weir_sdk::util::schema_text(&schema),
                declared: weir_sdk::util::schema_text(&rw.output),
            });
        }
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let Some(input) = input else {
            if rows > 0 {
                return Err(CallError::Rewrite(format!("it emitted {rows} rows at the end of input")));
            }
            return Ok(vec![]);
        };
        let rewritten = match batches.len() {
            1 => batches.into_iter().next().expect("one batch"),
            _ => arrow_select::concat::concat_batches(&schema, &batches)
                .map_err(|e| CallError::Rewrite(format!("its batches do not join: {e}")))?,
        };
        if input.num_rows() == 0 && rows == 0 {
            return Ok(vec![]);
        }
        let merged = rw.merge(input, &rewritten, declared).map_err(CallError::Rewrite)?;
        Ok(vec![merged])
    }

    /// The output of a row filter: a mask, one value per input row, applied here; nothing
    /// at the end.
    fn check_filter(
        &self,
        filter: &weir_sdk::row_filter::RowFilter,
        bytes: Vec<u8>,
        input: Option<&RecordBatch>,
    ) -> Result<Vec<RecordBatch>, CallError> {
        let (_, masks) = decode_guarded(bytes).map_err(CallError::BadOutput)?;
        let declared = self.declared.as_ref().ok_or_else(|| CallError::Internal("process before init".into()))?;
        let Some(input) = input else {
            let rows: usize = masks.iter().map(|b| b.num_rows()).sum();
            if rows > 0 {
                return Err(CallError::Filter(format!("it emitted {rows} rows at the end of input")));
            }
            return Ok(vec![]);
        };
        let kept = filter.apply(input, &masks, declared).map_err(CallError::Filter)?;
        Ok(if kept.num_rows() > 0 { vec![kept] } else { vec![] })
    }

    /// Where the instance's keyed states spill and checkpoint, and the checkpoint they are
    /// reopened from (what [`TransformInstance::snapshot`] returned), before `init`.
    /// Returns the plugin's own part of that checkpoint, for [`TransformInstance::restore`].
    pub fn use_state_dir(&mut self, dir: PathBuf, checkpoint: Option<&[u8]>) -> Result<Option<Vec<u8>>, CallError> {
        let (own, manifests) = match checkpoint {
            Some(bytes) => split_checkpoint(bytes).map_err(CallError::Internal)?,
            None => (None, HashMap::new()),
        };
        let state = self.sb.store.data_mut();
        state.state_dir = Some(dir);
        state.restored = manifests;
        Ok(own)
    }

    /// The instance's checkpoint: the plugin's own snapshot and its keyed states made
    /// durable (each records only what changed since the last checkpoint). None when it
    /// keeps no state across batches.
    pub fn snapshot(&mut self) -> Result<Option<Vec<u8>>, CallError> {
        let b = &self.bindings;
        self.sb.store.data_mut().snapshot_parts = Some(Vec::new());
        let own = self.sb.call(|s| b.weir_plugin_transform().call_snapshot(s));
        let state = self.sb.store.data_mut();
        let parts = state.snapshot_parts.take();
        let own = own?;
        // parts refused past the cap (none left), or parts and tail together past it
        let tail = own.as_ref().map_or(0, Vec::len);
        let Some(parts) = parts.filter(|p| (p.len() + tail) as u64 <= state.memory_cap) else {
            return Err(CallError::Internal(format!(
                "its snapshot passed the memory cap of {} MiB; raise the plugin's `memory_mb`",
                state.memory_cap >> 20
            )));
        };
        // the parts sent with `snapshot-write`, then what the call returned
        let own = match own {
            Some(tail) if parts.is_empty() => Some(tail),
            Some(tail) => {
                let mut whole = parts;
                whole.extend_from_slice(&tail);
                Some(whole)
            }
            None => None,
        };
        if state.states.is_empty() {
            return Ok(own);
        }
        let mut manifests = std::collections::BTreeMap::new();
        for s in &mut state.states {
            let m = s.checkpoint().map_err(|e| CallError::Internal(format!("its keyed state: {e}")))?;
            manifests.insert(s.spec().name.clone(), m);
        }
        state.state_counters();
        let mut w = weir_sdk::state::Writer::default();
        w.u64(CHECKPOINT_MAGIC);
        match &own {
            Some(b) => {
                w.u64(1);
                w.bytes(b);
            }
            None => w.u64(0),
        }
        w.bytes(&serde_json::to_vec(&manifests).map_err(|e| CallError::Internal(e.to_string()))?);
        Ok(Some(w.finish()))
    }

    /// Hand the plugin's own checkpoint state back (after init, before any batch).
    pub fn restore(&mut self, state: &[u8]) -> Result<(), CallError> {
        let b = &self.bindings;
        if !self.snapshot_in_parts {
            return self.sb.call(|s| b.weir_plugin_transform().call_restore(s, state));
        }
        self.sb.store.data_mut().restore_parts = Some((state.to_vec(), 0));
        let out = self.sb.call(|s| b.weir_plugin_transform().call_restore(s, &[]));
        self.sb.store.data_mut().restore_parts = None;
        out
    }

    /// `saved` checkpoints of this attempt are stored: files the keyed states replaced
    /// before the last of them may go.
    pub fn release_state_files(&mut self, saved: u64) {
        for s in &mut self.sb.store.data_mut().states {
            s.release(saved);
        }
    }

    /// The step is done with the instance's keyed states: remove their files.
    pub fn remove_state_files(&mut self) {
        for s in &self.sb.store.data().states {
            s.remove_files();
        }
    }

    fn check_output(&self, bytes: Vec<u8>) -> Result<Vec<RecordBatch>, CallError> {
        let declared = self.declared.as_ref().ok_or_else(|| CallError::Internal("process before init".into()))?;
        checked_output(bytes, declared, self.sb.limits)
    }
}

/// The output byte budget of one call (`max_output_mb`).
fn within_output_bytes(len: usize, limits: Limits) -> Result<(), CallError> {
    if len as u64 > limits.output_bytes {
        return Err(CallError::OutputBudget {
            got: format!("{len} bytes of Arrow IPC"),
            budget: format!("{} MiB", limits.output_bytes >> 20),
            key: "max_output_mb",
        });
    }
    Ok(())
}

/// Decode a call's output and check it against the declared schema and the output budget;
/// empty batches are dropped.
fn checked_output(bytes: Vec<u8>, declared: &SchemaRef, limits: Limits) -> Result<Vec<RecordBatch>, CallError> {
    {
        let (schema, batches) = decode_guarded(bytes).map_err(CallError::BadOutput)?;
        let mismatch = |got: &arrow_schema::Schema| CallError::SchemaMismatch {
            got: weir_sdk::util::schema_text(got),
            declared: weir_sdk::util::schema_text(declared),
        };
        if !weir_sdk::util::same_shape(&schema, declared) {
            return Err(mismatch(&schema));
        }
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        if rows > limits.output_rows {
            return Err(CallError::OutputBudget {
                got: format!("{rows} rows"),
                budget: format!("{} rows", limits.output_rows),
                key: "max_output_rows",
            });
        }
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            if b.num_rows() == 0 {
                continue;
            }
            // Re-stamp with the declared schema: this also checks declared non-null columns.
            let b = RecordBatch::try_new(declared.clone(), b.columns().to_vec()).map_err(|e| {
                CallError::SchemaMismatch {
                    got: format!("{} ({e})", weir_sdk::util::schema_text(&b.schema())),
                    declared: weir_sdk::util::schema_text(declared),
                }
            })?;
            out.push(b);
        }
        Ok(out)
    }
}

/// The longest position an extractor may hand back per batch (it goes into checkpoints).
const MAX_POSITION_BYTES: usize = 1 << 20;
/// The longest watermark text.
const MAX_WATERMARK_BYTES: usize = 4096;

/// What an extractor's `next` returned, checked.
#[derive(Debug)]
pub struct Extracted {
    pub batches: Vec<RecordBatch>,
    pub position: Vec<u8>,
    pub watermark: Option<String>,
}

/// One sandboxed instance of an extractor plugin.
pub struct ExtractorInstance {
    sb: Sandbox,
    bindings: extractor_bindings::ExtractorPlugin,
    declared: Option<SchemaRef>,
    timings: CallTimings,
}

impl ExtractorInstance {
    pub fn new(plugin: &LoadedPlugin, limits: Limits, log: LogSink) -> Result<Self> {
        let Prepared::Extractor(pre) = &plugin.pre else { return Err(wrong_world(plugin, "extractor")) };
        let mut sb = Sandbox::new(plugin, limits, Arc::default(), log)?;
        let bindings = pre.instantiate(&mut sb.store).map_err(|e| sb.instantiate_error(e))?;
        Ok(ExtractorInstance { sb, bindings, declared: None, timings: CallTimings::default() })
    }

    /// Counters the plugin (and the host, for its requests) added so far.
    pub fn counters(&self) -> &HashMap<String, i64> {
        &self.sb.store.data().counters
    }

    /// Where the time of the calls so far went.
    pub fn timings(&self) -> CallTimings {
        CallTimings { peak_memory_bytes: self.sb.store.data().memory_peak, ..self.timings }
    }

    /// Call `open` (from `position`, above `watermark`); returns the declared schema.
    pub fn open(
        &mut self,
        config_json: &str,
        ctx: &weir_sdk::Context,
        position: Option<&[u8]>,
        watermark: Option<&str>,
    ) -> Result<SchemaRef, CallError> {
        let ctx = wit_context(ctx);
        let b = &self.bindings;
        let (position, watermark) = (position.map(<[u8]>::to_vec), watermark.map(str::to_string));
        let out = self.sb.call(|s| {
            b.weir_plugin_extractor().call_open(s, config_json, &ctx, position.as_deref(), watermark.as_deref())
        })?;
        let schema = decode_guarded(out).map(|(s, _)| s).map_err(CallError::BadOutput)?;
        publishable_names(&schema).map_err(CallError::BadSchema)?;
        self.declared = Some(schema.clone());
        Ok(schema)
    }

    /// The next batches with the position after them, or `None` at the end.
    pub fn next_batches(&mut self) -> Result<Option<Extracted>, CallError> {
        let declared = self.declared.clone().ok_or_else(|| CallError::Internal("next before open".into()))?;
        let b = &self.bindings;
        self.sb.store.data_mut().marks = [None; 4];
        let start = CpuTime::now();
        let out = self.sb.call(|s| b.weir_plugin_extractor().call_next(s));
        self.timings.record_call(start, CpuTime::now(), self.sb.store.data().marks);
        let Some(e) = out? else { return Ok(None) };
        if e.position.len() > MAX_POSITION_BYTES {
            return Err(CallError::BadOutput(format!(
                "its position is {} bytes, over the {MAX_POSITION_BYTES} bytes a checkpoint keeps",
                e.position.len()
            )));
        }
        if e.watermark.as_ref().is_some_and(|w| w.len() > MAX_WATERMARK_BYTES) {
            return Err(CallError::BadOutput(format!("its watermark is over {MAX_WATERMARK_BYTES} bytes")));
        }
        self.timings.bytes_out += e.batch.len() as u64;
        within_output_bytes(e.batch.len(), self.sb.limits)?;
        let batches = checked_output(e.batch, &declared, self.sb.limits)?;
        Ok(Some(Extracted { batches, position: e.position, watermark: e.watermark }))
    }
}

fn wit_context(ctx: &weir_sdk::Context) -> wit_types::Context {
    wit_types::Context {
        pipeline: ctx.pipeline.clone(),
        step: ctx.step.clone(),
        plugin: ctx.plugin.clone(),
        partition: ctx.partition.clone(),
    }
}

/// A quality rule's judgement of one batch, as the host sees it.
#[derive(Debug, Clone, Default)]
pub struct RuleBatch {
    pub failed_rows: Vec<u32>,
    pub reasons: Vec<String>,
    pub metrics: Vec<(String, f64)>,
}

/// A quality rule's verdict on the partition.
#[derive(Debug, Clone, Default)]
pub struct RuleVerdict {
    pub passed: bool,
    pub observed: Option<String>,
    pub message: String,
    pub metrics: Vec<(String, f64)>,
}

/// One sandboxed instance of a quality-rule plugin.
pub struct RuleInstance {
    sb: Sandbox,
    bindings: rule_bindings::QualityRulePlugin,
    encoder: BatchEncoder,
}

impl RuleInstance {
    pub fn new(plugin: &LoadedPlugin, limits: Limits, log: LogSink) -> Result<Self> {
        let Prepared::Rule(pre) = &plugin.pre else { return Err(wrong_world(plugin, "quality-rule")) };
        let mut sb = Sandbox::new(plugin, limits, Arc::default(), log)?;
        let bindings = pre.instantiate(&mut sb.store).map_err(|e| sb.instantiate_error(e))?;
        Ok(RuleInstance { sb, bindings, encoder: BatchEncoder::default() })
    }

    pub fn init(&mut self, config_json: &str, input: &SchemaRef, ctx: &weir_sdk::Context) -> Result<(), CallError> {
        let schema_bytes = weir_sdk::ipc::encode_schema(input)
            .map_err(|e| CallError::Internal(format!("host could not encode the input schema: {e}")))?;
        let ctx = wit_context(ctx);
        let b = &self.bindings;
        self.sb.call(|s| b.weir_plugin_quality_rule().call_init(s, config_json, &schema_bytes, &ctx))
    }

    /// Judge one batch; row indices are checked against the batch.
    pub fn check(&mut self, batch: &RecordBatch) -> Result<RuleBatch, CallError> {
        let bytes = self.encoder.encode(batch)?;
        let b = &self.bindings;
        let v = self.sb.call(|s| b.weir_plugin_quality_rule().call_check(s, &bytes));
        self.encoder.give_back(bytes);
        let v = v?;
        if let Some(bad) = v.failed_rows.iter().find(|r| **r as usize >= batch.num_rows()) {
            return Err(CallError::BadOutput(format!(
                "failed row {bad} is outside the batch of {} rows",
                batch.num_rows()
            )));
        }
        Ok(RuleBatch {
            failed_rows: v.failed_rows,
            reasons: v.reasons,
            metrics: v.metrics.into_iter().map(|m| (m.name, m.value)).collect(),
        })
    }

    pub fn finish(&mut self) -> Result<RuleVerdict, CallError> {
        let b = &self.bindings;
        let v = self.sb.call(|s| b.weir_plugin_quality_rule().call_finish(s))?;
        Ok(RuleVerdict {
            passed: v.passed,
            observed: v.observed,
            message: v.message,
            metrics: v.metrics.into_iter().map(|m| (m.name, m.value)).collect(),
        })
    }
}

/// Column names every dataset can hold as they are: none empty, no two equal ignoring case
/// (DuckDB, Hive and Spark resolve names case-insensitively, and DuckDB renames a
/// duplicate), none in weir's own `_weir_` namespace.
pub fn publishable_names(schema: &arrow_schema::Schema) -> std::result::Result<(), String> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let name = f.name().as_str();
        if name.trim().is_empty() {
            return Err(format!("column #{} has an empty name", i + 1));
        }
        if name.to_ascii_lowercase().starts_with("_weir_") {
            return Err(format!("column `{name}` uses weir's own `_weir_` prefix"));
        }
        if let Some(first) = seen.insert(name.to_lowercase(), name) {
            return Err(if first == name {
                format!("column `{name}` appears twice")
            } else {
                format!("columns `{first}` and `{name}` differ only in case, which readers treat as the same name")
            });
        }
    }
    Ok(())
}

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / TICK.as_millis()).max(1) as u64 + 1
}

fn classify(e: wasmtime::Error, memory_hit: bool, limits: Limits, stderr: String) -> CallError {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        if *trap == wasmtime::Trap::Interrupt {
            return CallError::Deadline(limits.timeout);
        }
    }
    if memory_hit {
        return CallError::Memory(limits.memory_bytes);
    }
    // Name the trap itself; the wasm backtrace around it is too long for a user.
    let message = match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => e.root_cause().to_string(),
    };
    let message = message.lines().next().unwrap_or("unknown trap").to_string();
    CallError::Trap { message, stderr: stderr.trim().to_string() }
}

/// Decode plugin output. Untrusted bytes: any failure (even a panic inside the decoder) is
/// an error, never a crash of the host. The arrays point into `bytes` (no copy), and are
/// validated.
fn decode_guarded(bytes: Vec<u8>) -> std::result::Result<(SchemaRef, Vec<RecordBatch>), String> {
    match std::panic::catch_unwind(move || weir_sdk::ipc::decode_owned(bytes)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the decoder rejected the bytes".into()),
    }
}
