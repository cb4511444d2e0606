//! `weir serve`: an HTTP API over the same pipelines, run store and runs as the CLI.
//!
//! Operators register pipeline files (on the command line, or `POST /pipelines`); every
//! file, input, output, plugin and run store a registered pipeline names must lie under one
//! of the server's roots, and a partition value cannot step out of them. Runs and backfills
//! started here are the CLI's runs: the same engine, store, leases and exclusion (a CLI run
//! of the same partition makes the API answer 409, and the other way round). A run is a
//! thread of the server; a run that fails or a plugin that traps ends that run only.
//!
//! Run and backfill ids in the API are `PIPELINE.N`, N being the id in the pipeline's run
//! store (the number `weir runs` shows): pipelines may keep separate stores.
//!
//! Without bearer tokens the server listens on loopback only. `/health` and
//! `/openapi.json` need no token; everything else does when tokens are set.

mod api;
mod paths;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::config::Pipeline;
use crate::engine::{Level, LogFn};
use crate::metrics::Sample;
use crate::store::RunStore;

pub use api::openapi_json;

/// How the server runs.
pub struct Config {
    pub listen: SocketAddr,
    /// Directories every path a registered pipeline uses must lie under.
    pub roots: Vec<PathBuf>,
    /// Pipeline files registered at start (besides those in the registry file).
    pub pipelines: Vec<PathBuf>,
    /// Where registered pipelines are remembered across restarts.
    pub registry: PathBuf,
    /// Bearer tokens; empty: no authentication, loopback only.
    pub tokens: Vec<String>,
    /// The server's own files (its token file): no pipeline may read or write them.
    pub protected: Vec<PathBuf>,
    /// Runs (backfill partitions included) at once; more are refused with 429.
    pub max_runs: usize,
    pub cache_dir: Option<PathBuf>,
    pub log: LogFn,
    pub plugin_log: LogFn,
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("refusing to listen on {0} without authentication: give --token-file (or WEIR_SERVE_TOKEN), or listen on 127.0.0.1")]
    Insecure(SocketAddr),
    #[error("root {}: {message}", path.display())]
    Root { path: PathBuf, message: String },
    #[error("pipeline {}: {message}", path.display())]
    Pipeline { path: PathBuf, message: String },
    #[error("registry {}: {message}", path.display())]
    Registry { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("server: {0}")]
    Runtime(std::io::Error),
}

/// A registered pipeline.
struct Served {
    /// The file, canonical.
    file: PathBuf,
    /// As last loaded (runs load the file again, so edits apply as they do for the CLI).
    pipeline: Arc<Pipeline>,
    store: Arc<dyn RunStore>,
}

/// What a finished run left for `/metrics`.
#[derive(Default)]
struct Exposed {
    /// The last run's samples per (pipeline, partition), with when it ended.
    last: BTreeMap<(String, String), (i64, Vec<Sample>)>,
    /// When each (pipeline, partition) last succeeded, Unix seconds.
    success: BTreeMap<(String, String), f64>,
    /// Runs started through this server, by pipeline and how they ended.
    ended: BTreeMap<(String, String), u64>,
}

/// The server's shared state.
pub(crate) struct App {
    roots: Vec<PathBuf>,
    tokens: Vec<[u8; 32]>,
    registry: PathBuf,
    /// Files no pipeline may use: the registry, the token file, the registry's folder.
    protected: Vec<PathBuf>,
    /// Registered files that did not load at start (kept in the registry, tried again at
    /// the next start).
    unloaded: Mutex<Vec<PathBuf>>,
    /// One registry write at a time.
    saving: Mutex<()>,
    max_runs: usize,
    cache_dir: Option<PathBuf>,
    log: LogFn,
    plugin_log: LogFn,
    pipelines: RwLock<BTreeMap<String, Served>>,
    stores: Mutex<HashMap<PathBuf, Arc<dyn RunStore>>>,
    /// Cancel flags of the runs (`PIPELINE.N`) and backfills (`backfill PIPELINE.N`) this
    /// server is running.
    active: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Run slots taken (a backfill takes its parallelism).
    busy: AtomicUsize,
    exposed: Mutex<Exposed>,
}

/// Start the server and serve until the process is stopped. `ready` is told the address
/// it listens on (the port chosen when `listen` asked for port 0).
pub fn serve(config: Config, ready: impl FnOnce(SocketAddr)) -> Result<(), Error> {
    if !config.listen.ip().is_loopback() && config.tokens.is_empty() {
        return Err(Error::Insecure(config.listen));
    }
    let mut roots = Vec::new();
    for r in &config.roots {
        let c = std::fs::canonicalize(r).map_err(|e| Error::Root {
            path: r.clone(),
            message: format!("{e} (a root must be an existing directory)"),
        })?;
        if !c.is_dir() {
            return Err(Error::Root { path: r.clone(), message: "not a directory".into() });
        }
        roots.push(c);
    }
    if roots.is_empty() {
        return Err(Error::Root { path: PathBuf::from("."), message: "no root given".into() });
    }
    let mut protected: Vec<PathBuf> = config.protected.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
    if let Some(dir) = config.registry.parent() {
        let _ = std::fs::create_dir_all(dir);
        protected
            .extend(std::fs::canonicalize(dir).ok().map(|d| d.join(config.registry.file_name().unwrap_or_default())));
    }
    let app = Arc::new(App {
        roots,
        tokens: config.tokens.iter().map(|t| api::digest(t.as_bytes())).collect(),
        registry: config.registry.clone(),
        protected,
        unloaded: Mutex::new(Vec::new()),
        saving: Mutex::new(()),
        max_runs: config.max_runs.max(1),
        cache_dir: config.cache_dir.clone(),
        log: config.log.clone(),
        plugin_log: config.plugin_log.clone(),
        pipelines: RwLock::new(BTreeMap::new()),
        stores: Mutex::new(HashMap::new()),
        active: Mutex::new(HashMap::new()),
        busy: AtomicUsize::new(0),
        exposed: Mutex::new(Exposed::default()),
    });
    // the command line's pipelines first (they win a name); then the remembered ones, of
    // which one that does not load now is logged, kept in the registry and tried next time
    for file in &config.pipelines {
        app.register(file).map_err(|e| Error::Pipeline { path: file.clone(), message: e.message })?;
    }
    for file in app.read_registry() {
        if let Err(e) = app.register(&file) {
            (app.log)(
                Level::WARN,
                &format!("weir serve: registered pipeline {} left out: {}", file.display(), e.message),
            );
            app.unloaded.lock().unwrap_or_else(|e| e.into_inner()).push(file);
        }
    }
    app.save_registry().map_err(|message| Error::Registry { path: app.registry.clone(), message })?;
    app.recover_all();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weir-serve")
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Listen { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(Error::Runtime)?;
        (app.log)(
            Level::INFO,
            &format!(
                "weir serve: listening on http://{addr} ({} pipelines, roots {}, {})",
                app.pipelines.read().unwrap_or_else(|e| e.into_inner()).len(),
                app.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "),
                if app.tokens.is_empty() { "no authentication: loopback only" } else { "bearer tokens required" }
            ),
        );
        ready(addr);
        accept(listener, api::router(app)).await;
        Ok(())
    })
}

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's headers (a slow client cannot hold a
/// connection open forever).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serve connections (HTTP/1, keep-alive) with a bound on their number and on how long a
/// request's headers may take.
async fn accept(listener: tokio::net::TcpListener, router: axum::Router) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // out of file descriptors and the like: pause instead of spinning
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// An API error: the HTTP status and what to tell the client.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }
}

impl App {
    /// The remembered pipeline files. A registry that cannot be read is moved aside (and
    /// said so): the server starts with the command line's pipelines.
    fn read_registry(&self) -> Vec<PathBuf> {
        let parsed = match std::fs::read(&self.registry) {
            Ok(bytes) => serde_json::from_slice::<Vec<PathBuf>>(&bytes).map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => Err(e.to_string()),
        };
        parsed.unwrap_or_else(|e| {
            let aside = self.registry.with_extension(format!("json.unreadable-{}", crate::store::now_ms()));
            let moved = std::fs::rename(&self.registry, &aside);
            (self.log)(
                Level::ERROR,
                &format!(
                    "weir serve: registry {} is unreadable ({e}); {}; register the pipelines again",
                    self.registry.display(),
                    match moved {
                        Ok(()) => format!("moved to {}", aside.display()),
                        Err(m) => format!("could not move it aside: {m}"),
                    }
                ),
            );
            Vec::new()
        })
    }

    /// Write the registered files: one writer at a time, to a temporary file made durable
    /// and then renamed over the registry.
    fn save_registry(&self) -> Result<(), String> {
        use std::io::Write as _;
        let _one = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let mut files: Vec<PathBuf> =
            self.pipelines.read().unwrap_or_else(|e| e.into_inner()).values().map(|s| s.file.clone()).collect();
        files.extend(self.unloaded.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned());
        files.sort();
        files.dedup();
        let text = serde_json::to_vec_pretty(&files).map_err(|e| e.to_string())?;
        let dir = self.registry.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = self.registry.with_extension(format!("json.tmp-{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(&text).and_then(|()| f.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &self.registry).map_err(|e| format!("{}: {e}", self.registry.display()))?;
        crate::io::sync_dir(dir);
        Ok(())
    }

    /// Load a pipeline file and check every path it uses lies under a root.
    fn load(&self, file: &Path) -> Result<(PathBuf, Pipeline), ApiError> {
        let file = paths::resolve(&self.roots, file)?;
        let pipeline = Pipeline::load(&file)
            .map_err(|e| ApiError::new(422, format!("invalid pipeline {}:\n{e}", file.display())))?;
        if pipeline.name.is_empty()
            || !pipeline.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(ApiError::new(
                422,
                format!(
                    "pipeline name `{}`: a served pipeline's name is letters, digits, `_`, `-` and `.` (it is part of URLs and run ids)",
                    pipeline.name
                ),
            ));
        }
        paths::check_pipeline(&self.roots, &self.protected, &pipeline)?;
        Ok((file, pipeline))
    }

    /// Register (or refresh) a pipeline file.
    fn register(&self, file: &Path) -> Result<api::PipelineView, ApiError> {
        let (file, pipeline) = self.load(file)?;
        let store = self.store(&pipeline.state_path)?;
        let mut map = self.pipelines.write().unwrap_or_else(|e| e.into_inner());
        if let Some(other) = map.get(&pipeline.name) {
            if other.file != file {
                return Err(ApiError::new(
                    409,
                    format!(
                        "a pipeline named `{}` is already registered from {}; give this one another name",
                        pipeline.name,
                        other.file.display()
                    ),
                ));
            }
        }
        let view = api::PipelineView::of(&file, &pipeline);
        self.unloaded.lock().unwrap_or_else(|e| e.into_inner()).retain(|f| *f != file);
        map.insert(pipeline.name.clone(), Served { file, pipeline: Arc::new(pipeline), store });
        Ok(view)
    }

    /// The run store at `path`, opened once.
    fn store(&self, path: &Path) -> Result<Arc<dyn RunStore>, ApiError> {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = stores.get(path) {
            return Ok(s.clone());
        }
        let s = crate::store::open(path).map_err(|e| ApiError::new(500, e.to_string()))?;
        stores.insert(path.to_path_buf(), s.clone());
        Ok(s)
    }

    /// Settle runs that died with an earlier server (or any process): as `weir recover`.
    fn recover_all(&self) {
        let served: Vec<(String, Arc<dyn RunStore>)> = self
            .pipelines
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, s)| (n.clone(), s.store.clone()))
            .collect();
        for (name, store) in served {
            // staging of undecided runs stays for `"resume": true`; the next run without it
            // removes it
            match crate::engine::recover(store.as_ref(), Some(&name), "weir serve", &*self.log, true) {
                Ok(dead) if !dead.is_empty() => {
                    (self.log)(Level::INFO, &format!("weir serve: recovered {} dead run(s) of {name}", dead.len()))
                }
                Ok(_) => {}
                Err(e) => (self.log)(Level::ERROR, &format!("weir serve: recovering runs of {name}: {e}")),
            }
            // the SLA metric survives a restart: each partition's last success from the store
            let filter = crate::store::RunFilter {
                pipeline: Some(name.clone()),
                status: Some(crate::store::Status::Success),
                limit: 1000,
            };
            if let Ok(runs) = store.runs(&filter) {
                let mut exposed = self.exposed.lock().unwrap_or_else(|e| e.into_inner());
                for r in runs {
                    let at = r.finished_at_ms.unwrap_or(r.started_at_ms) as f64 / 1000.0;
                    let key = (name.clone(), r.partition.clone().unwrap_or_default());
                    let e = exposed.success.entry(key).or_insert(at);
                    *e = e.max(at);
                }
            }
        }
    }

    /// The registered pipeline `name`, loaded again from its file.
    fn reload(&self, name: &str) -> Result<(Arc<Pipeline>, Arc<dyn RunStore>), ApiError> {
        let file = {
            let map = self.pipelines.read().unwrap_or_else(|e| e.into_inner());
            map.get(name).map(|s| s.file.clone()).ok_or_else(|| no_pipeline(name))?
        };
        let (_, pipeline) = self.load(&file)?;
        if pipeline.name != name {
            return Err(ApiError::new(
                409,
                format!("{} now names its pipeline `{}`; register it again", file.display(), pipeline.name),
            ));
        }
        let store = self.store(&pipeline.state_path)?;
        let pipeline = Arc::new(pipeline);
        if let Some(s) = self.pipelines.write().unwrap_or_else(|e| e.into_inner()).get_mut(name) {
            s.pipeline = pipeline.clone();
            s.store = store.clone();
        }
        Ok((pipeline, store))
    }

    fn served(&self, name: &str) -> Result<(Arc<Pipeline>, Arc<dyn RunStore>), ApiError> {
        let map = self.pipelines.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).map(|s| (s.pipeline.clone(), s.store.clone())).ok_or_else(|| no_pipeline(name))
    }

    fn all_served(&self) -> Vec<(String, Arc<Pipeline>, Arc<dyn RunStore>)> {
        let map = self.pipelines.read().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(n, s)| (n.clone(), s.pipeline.clone(), s.store.clone())).collect()
    }

    /// Take `n` run slots, or say the server is full.
    fn take_slots(&self, n: usize) -> Result<Slots<'_>, ApiError> {
        let mut cur = self.busy.load(Ordering::Acquire);
        loop {
            if cur.checked_add(n).is_none_or(|total| total > self.max_runs) {
                return Err(ApiError::new(
                    429,
                    format!(
                        "the server runs {cur} of at most {} runs at once (--max-runs); try again when one has ended",
                        self.max_runs
                    ),
                ));
            }
            match self.busy.compare_exchange(cur, cur + n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(Slots { busy: &self.busy, n }),
                Err(now) => cur = now,
            }
        }
    }

    /// A finished run's metrics, for `/metrics`.
    fn expose(
        &self,
        pipeline: &str,
        partition: Option<&str>,
        outcome: Result<&crate::engine::RunSummary, &crate::Error>,
        secs: f64,
    ) {
        if matches!(outcome, Ok(s) if s.status == "UP_TO_DATE") {
            return;
        }
        let part = partition.unwrap_or("").to_string();
        let mut samples = crate::metrics::run_samples(pipeline, outcome, secs);
        for s in &mut samples {
            s.labels.insert(1, ("partition".into(), part.clone()));
        }
        let status = match outcome {
            Ok(_) => "SUCCESS",
            Err(crate::Error::Cancelled(_)) => "CANCELLED",
            Err(_) => "FAILED",
        };
        let mut e = self.exposed.lock().unwrap_or_else(|e| e.into_inner());
        // bounded: the partitions run longest ago give way (their last success stays longer)
        let key = (pipeline.to_string(), part.clone());
        e.last.insert(key.clone(), (crate::store::now_ms(), samples));
        evict_oldest(&mut e.last, MAX_EXPOSED_RUNS, |v| v.0);
        if outcome.is_ok() {
            e.success.insert(key, crate::store::now_ms() as f64 / 1000.0);
            evict_oldest(&mut e.success, MAX_EXPOSED_SUCCESS, |v| *v as i64);
        }
        *e.ended.entry((pipeline.to_string(), status.to_string())).or_insert(0) += 1;
    }

    /// The `/metrics` text.
    fn metrics_text(&self) -> String {
        let e = self.exposed.lock().unwrap_or_else(|e| e.into_inner());
        let mut samples: Vec<Sample> = e.last.values().flat_map(|(_, s)| s.iter().cloned()).collect();
        for ((p, part), at) in &e.success {
            samples.push(Sample {
                name: "weir_last_success_timestamp_seconds",
                help: "when the pipeline (and partition) last ran successfully (Unix time)",
                kind: "gauge",
                labels: vec![("pipeline".into(), p.clone()), ("partition".into(), part.clone())],
                value: *at,
            });
        }
        for ((p, status), n) in &e.ended {
            samples.push(Sample {
                name: "weir_serve_runs_ended",
                help: "runs this server started that ended, by status, since it started",
                kind: "counter",
                labels: vec![("pipeline".into(), p.clone()), ("status".into(), status.clone())],
                value: *n as f64,
            });
        }
        samples.push(Sample {
            name: "weir_serve_runs_active",
            help: "run slots in use (a backfill takes its parallelism)",
            kind: "gauge",
            labels: Vec::new(),
            value: self.busy.load(Ordering::Acquire) as f64,
        });
        drop(e);
        crate::metrics::render(&samples)
    }
}

/// Run slots held by a run or backfill, given back when it ends.
struct Slots<'a> {
    busy: &'a AtomicUsize,
    n: usize,
}

impl Slots<'_> {
    /// Keep the slots taken until the returned guard (moved to the run's thread) drops.
    fn hand_over(self, app: &Arc<App>) -> OwnedSlots {
        let n = self.n;
        std::mem::forget(self);
        OwnedSlots { app: app.clone(), n }
    }
}

impl Drop for Slots<'_> {
    fn drop(&mut self) {
        self.busy.fetch_sub(self.n, Ordering::AcqRel);
    }
}

struct OwnedSlots {
    app: Arc<App>,
    n: usize,
}

impl Drop for OwnedSlots {
    fn drop(&mut self) {
        self.app.busy.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// Runs whose metrics /metrics keeps (one per pipeline and partition).
const MAX_EXPOSED_RUNS: usize = 1000;
/// Last success times /metrics keeps.
const MAX_EXPOSED_SUCCESS: usize = 20_000;

/// Drop the entries with the smallest `at` until `map` holds `max`.
fn evict_oldest<K: Ord + Clone, V>(map: &mut BTreeMap<K, V>, max: usize, at: impl Fn(&V) -> i64) {
    while map.len() > max {
        let Some(oldest) = map.iter().min_by_key(|(_, v)| at(v)).map(|(k, _)| k.clone()) else { break };
        map.remove(&oldest);
    }
}

fn no_pipeline(name: &str) -> ApiError {
    ApiError::new(404, format!("no pipeline `{name}` is registered; POST /pipelines registers one"))
}

/// `PIPELINE.N` to its parts.
fn parse_id(id: &str) -> Result<(&str, i64), ApiError> {
    id.rsplit_once('.')
        .and_then(|(p, n)| Some((p, n.parse::<i64>().ok()?)))
        .filter(|(p, _)| !p.is_empty())
        .ok_or_else(|| ApiError::new(400, format!("`{id}` is not an id: ids are PIPELINE.N, e.g. orders.12")))
}

fn join_id(pipeline: &str, n: i64) -> String {
    format!("{pipeline}.{n}")
}
