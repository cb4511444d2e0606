//! The streaming executor.
//!
//! A run, top to bottom:
//!
//! ```text
//!   run            recover dead runs, load plugins, fingerprint, begin (one live run per
//!                  partition), heartbeat                                  (this module)
//!   execute        each step in order, with retries                        (this module)
//!     run_step     open source, start transforms, open sink, wire checks   (step)
//!       flow       reader -> plugin 1 -> ... -> writer, bounded channels   (flow)
//!       gate       check results recorded; a failed block check stops     (quality)
//!   publish        plan, record the decision, switch each dataset          (publish)
//!   recover        a dead run: discarded before its decision, completed after (recovery)
//! ```
//!
//! Each step runs as a chain of threads joined by bounded channels, so memory stays
//! bounded whatever the input size and the stages run on both cores at once. Every stage
//! ends by either sending `End` (all input seen) or dropping its sender after an error; a
//! stage that sees its input close without `End` stops without finishing, so a failure
//! upstream never turns into a partial output downstream.
//!
//! Sources and sinks are reached only through `io::source::Source` and `io::sink::Sink`;
//! staged outputs are published through [`publish`]'s `Publisher`. Outputs are written to
//! staging directories beside the datasets. Only when every step has succeeded are they
//! published; on failure they are removed. The decision to publish is recorded before the
//! first switch: a run that crashes after it is completed by recovery ([`recover`]), so the
//! published datasets always come from one run.

pub mod backfill;
mod contract;
mod flow;
mod lineage;
mod merge;
mod publish;
mod quality;
mod recovery;
mod staging;
mod step;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_schema::SchemaRef;

use self::staging::{quarantine_staging, staging_dir, state_staging, StagingGuard};
use self::step::{run_step, StepCtx};
use crate::config::{Pipeline, Step};
use crate::io::source::{self as sources, Skipped};
use crate::plugin::{CallTimings, LoadedPlugin, PluginEngine};
use crate::quality::{CheckResult, Kind};
use crate::store::{Checkpoint, NewRun, RunFilter, RunRecord, RunStore, Status, StepRows};
use crate::{Error, Result};

pub(crate) use self::lineage::input_dataset;
pub use self::recovery::recover;
pub use self::staging::quarantine_target;

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

pub use tracing::Level;

/// Where log lines go, each with its level (weir's own and the plugins').
pub type LogFn = Arc<dyn Fn(Level, &str) + Send + Sync>;

/// How to run.
#[derive(Clone)]
pub struct RunOptions {
    /// The run's partition (`--partition`), substituted for `{partition}` in source paths.
    pub partition: Option<String>,
    /// Compiled-component cache; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Where weir's own log lines go (its notes about plugins included).
    pub log: LogFn,
    /// Where the lines plugins write go (their `log` calls, stdout and stderr), already
    /// prefixed with `[step/plugin]`: the binary logs them under the target `weir::plugin`,
    /// so `WEIR_LOG=info,weir::plugin=warn` quiets chatty plugins alone.
    pub plugin_log: LogFn,
    /// Called about every 200 ms with the live counters, for a progress display.
    pub progress: Option<ProgressFn>,
    /// The run store file; `None` uses the pipeline's (`<pipeline dir>/.weir/state.db`).
    pub state: Option<PathBuf>,
    /// Run even when an identical run already published.
    pub force: bool,
    /// The backfill this run is part of.
    pub backfill_id: Option<i64>,
    /// Continue the newest crashed run of this partition from its last checkpoints.
    pub resume: bool,
    /// Incremental sources read everything, ignoring their committed watermarks, which the
    /// run then replaces (`--full-refresh`).
    pub full_refresh: bool,
    /// When a run of the same partition is live, wait for it to end instead of refusing.
    pub wait: bool,
    /// Set to stop the run: it stops at the next batch boundary (or before its next step,
    /// or before it decides to publish) with [`Error::Cancelled`] and is recorded
    /// CANCELLED. Once the run has decided to publish, it completes.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Called with the run's id as soon as the store has recorded it (before any step).
    pub started: Option<Arc<dyn Fn(i64) + Send + Sync>>,
    /// Called when the run has ended (after its metrics were pushed): its partition, its
    /// outcome and its wall seconds. Up-to-date runs included.
    pub ended: Option<EndedFn>,
}

/// See [`RunOptions::ended`].
pub type EndedFn = Arc<dyn Fn(Option<&str>, std::result::Result<&RunSummary, &Error>, f64) + Send + Sync>;

impl RunOptions {
    /// [`Error::Cancelled`] when the run was asked to stop.
    pub(crate) fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(c) if c.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(Error::Cancelled("stopped on request".into()))
            }
            _ => Ok(()),
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            partition: None,
            cache_dir: PluginEngine::default_cache_dir(),
            log: Arc::new(|_, line| eprintln!("{line}")),
            plugin_log: Arc::new(|_, line| eprintln!("{line}")),
            progress: None,
            state: None,
            force: false,
            backfill_id: None,
            resume: false,
            full_refresh: false,
            wait: false,
            cancel: None,
            started: None,
            ended: None,
        }
    }
}

/// Live counters of a run.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub step: String,
    pub rows_read: u64,
    pub rows_written: u64,
    pub elapsed: Duration,
}

/// What a run did, for the summary line and `--json`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunSummary {
    pub pipeline: String,
    pub partition: Option<String>,
    /// SUCCESS, or UP_TO_DATE when an identical run had already published.
    pub status: String,
    /// The run's id in the run store (none when up to date).
    pub run_id: Option<i64>,
    /// The earlier run this one was identical to, when up to date.
    pub identical_to: Option<i64>,
    /// The crashed run this one continued (`--resume`).
    pub resumed_from: Option<i64>,
    pub seconds: f64,
    pub steps: Vec<StepSummary>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepSummary {
    pub name: String,
    pub input: String,
    /// Files the step read (for a source input).
    pub files: usize,
    pub rows_read: u64,
    pub rows_skipped: u64,
    /// Where skipped rows were (the first 20).
    pub skipped: Vec<Skipped>,
    pub rows_written: u64,
    /// Bytes and files of the step's staged output (before publish).
    #[serde(default)]
    pub bytes_written: u64,
    #[serde(default)]
    pub files_written: u64,
    /// Attempts the step took (more than 1 after transient failures).
    #[serde(default)]
    pub attempts: u32,
    pub output: Option<PathBuf>,
    /// Partition directories published.
    pub partitions: Vec<String>,
    /// Counters plugins added, per plugin.
    pub counters: BTreeMap<String, BTreeMap<String, i64>>,
    pub seconds: f64,
    /// Rows moved to the quarantine dataset by `quarantine` checks.
    pub rows_quarantined: u64,
    /// An incremental source's read: where it started and the watermark it moves to.
    #[serde(default)]
    pub watermark: Option<crate::store::WatermarkUpdate>,
    /// Columns no plugin touched, copied from the input's Parquet pages where it could be.
    pub copied_columns: Vec<String>,
    /// Row groups written that way (the others decoded and encoded every column).
    pub copied_row_groups: u64,
    /// Every check's result.
    pub checks: Vec<CheckResult>,
    /// Where the step's CPU time went, per stage (stages run in parallel, so these can add
    /// up to more than `seconds`).
    pub timings: StepTimings,
}

/// CPU time of each stage of a step, in seconds (each stage runs on its own thread).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepTimings {
    /// The source: reading files and decoding them into batches.
    pub read: f64,
    /// Each transform in order: the Wasm boundary and the guest's phases.
    pub plugins: Vec<PluginTimings>,
    /// Row-level quality checks.
    pub checks: f64,
    /// The sink: encoding Parquet and writing staging files.
    pub write: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PluginTimings {
    pub plugin: String,
    #[serde(flatten)]
    pub calls: CallTimings,
}

/// A step's finished staging output, ready to publish.
struct Staged {
    step: String,
    staging: PathBuf,
    schema: SchemaRef,
    output: Option<crate::config::Output>,
    partitions: Vec<String>,
    /// Staged quarantine rows, when the step quarantines.
    quarantine: Option<PathBuf>,
}

/// How long a RUNNING run may go without a heartbeat before another run declares it dead.
pub const LEASE: Duration = crate::store::LEASE;
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How often `--wait` asks the store whether the live run has ended.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// Renews a run's lease until dropped. Dropping it stops the thread at once (it waits on a
/// channel, not in sleeps: a run must not end up to a tick later than its work).
struct Heartbeat {
    stop: Option<std::sync::mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    /// Renew a run's lease.
    fn start(store: Arc<dyn RunStore>, id: i64) -> Heartbeat {
        Heartbeat::every(move || {
            let _ = store.heartbeat(id);
        })
    }

    /// Call `beat` every few seconds until dropped.
    fn every(beat: impl Fn() + Send + 'static) -> Heartbeat {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("weir-heartbeat".into())
            .spawn(move || {
                // a message or a closed channel both mean stop
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(HEARTBEAT) {
                    beat();
                }
            })
            .ok();
        Heartbeat { stop: Some(stop), handle }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Open the pipeline's run store (`options.state`, else the pipeline's `state`).
pub fn open_store(pipeline: &Pipeline, options: &RunOptions) -> Result<Arc<dyn RunStore>> {
    let path = options.state.clone().unwrap_or_else(|| pipeline.state_path.clone());
    Ok(crate::store::open(&path)?)
}

/// Pause at a named point when `WEIR_DEBUG_PAUSE=<point>:<ms>` says so (crash tests kill
/// the process there); `<point>#<n>:<ms>` pauses only at the point's nth occurrence in the
/// process. Points: `after-checkpoint`, `before-publish` (before the decision),
/// `after-decision`, `after-switch` (a switch made, not yet recorded), `between-publishes`
/// (after each recorded switch), `before-finish` (all switched, SUCCESS not yet recorded).
fn debug_pause(point: &str, log: &dyn Fn(Level, &str)) {
    static SEEN: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());
    let Ok(spec) = std::env::var("WEIR_DEBUG_PAUSE") else { return };
    let nth = {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        match seen.iter_mut().find(|(p, _)| p == point) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                seen.push((point.to_string(), 1));
                1
            }
        }
    };
    for part in spec.split(',') {
        let Some((at, ms)) = part.split_once(':') else { continue };
        let (p, only) = match at.split_once('#') {
            Some((p, n)) => (p, n.parse::<usize>().ok()),
            None => (at, None),
        };
        if p == point && only.is_none_or(|n| n == nth) {
            if let Ok(ms) = ms.parse::<u64>() {
                log(Level::WARN, &format!("weir: debug pause at {point} for {ms} ms"));
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
    }
}

/// A wait between half and all of `d` when `jitter`, so retries of many runs spread out.
fn jittered(d: Duration, jitter: bool) -> Duration {
    if !jitter || d.is_zero() {
        return d;
    }
    // xorshift over the clock: enough randomness to spread retries, no dependency
    let mut x =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.as_nanos() as u64).unwrap_or(1)
            | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let half = d.as_millis() as u64 / 2;
    Duration::from_millis(half + x % (half + 1))
}

/// The level a plugin's log line is logged at (`stdout` as info, `stderr` as a warning).
fn plugin_level(level: &str) -> Level {
    match level {
        "trace" => Level::TRACE,
        "debug" => Level::DEBUG,
        "warn" | "stderr" => Level::WARN,
        "error" => Level::ERROR,
        _ => Level::INFO,
    }
}

/// What a run shares with its steps.
struct RunCtx<'a> {
    pipeline: &'a Pipeline,
    options: &'a RunOptions,
    loaded: &'a HashMap<String, LoadedPlugin>,
    secrets: &'a HashMap<String, Vec<u8>>,
    store: &'a dyn RunStore,
    run_id: i64,
    /// The run's OpenLineage events, when configured.
    lineage: Option<&'a std::sync::Mutex<lineage::RunLineage>>,
}

/// Run a validated pipeline once: recover crashed runs, skip if an identical run already
/// published, else record the run, execute, publish and commit the outcome.
pub fn run(pipeline: &Pipeline, options: &RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    let pushgateway = pushgateway(pipeline)?;
    let outcome = run_once(pipeline, options);
    if let Some(config) = &pushgateway {
        // an up-to-date run did nothing: the last run's metrics stand
        if !matches!(&outcome, Ok(s) if s.status == "UP_TO_DATE") {
            let text = crate::metrics::run_metrics(&pipeline.name, outcome.as_ref(), started.elapsed().as_secs_f64());
            let partition = options.partition.as_deref();
            if let Err(e) = crate::metrics::push(config, &pipeline.name, partition, &text, outcome.is_ok()) {
                (options.log)(Level::WARN, &format!("weir: warning: metrics were not pushed ({e})"));
            }
        }
    }
    if let Some(ended) = &options.ended {
        ended(options.partition.as_deref(), outcome.as_ref(), started.elapsed().as_secs_f64());
    }
    outcome
}

/// Where the run's metrics go: `WEIR_PUSHGATEWAY_URL` over the pipeline file's `[metrics]`.
fn pushgateway(pipeline: &Pipeline) -> Result<Option<crate::metrics::Config>> {
    match std::env::var("WEIR_PUSHGATEWAY_URL") {
        Ok(url) if !url.trim().is_empty() => {
            let url = url.trim().to_string();
            crate::metrics::Config::check_url(&url)
                .map_err(|e| Error::Metrics(format!("WEIR_PUSHGATEWAY_URL: {e}")))?;
            let timeout = pipeline.metrics.as_ref().map_or(Duration::from_secs(2), |m| m.timeout);
            Ok(Some(crate::metrics::Config { pushgateway: url, timeout }))
        }
        _ => Ok(pipeline.metrics.clone()),
    }
}

fn run_once(pipeline: &Pipeline, options: &RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    let log = options.log.clone();
    let emitter = lineage::emitter(pipeline, &options.log)?;
    let store = open_store(pipeline, options)?;
    let dead = recover(store.as_ref(), Some(&pipeline.name), "a new run", &*log, options.resume)?;
    let secrets = resolve_secrets(pipeline)?;
    let loaded = load_plugins(pipeline, options)?;
    let fp = fingerprint(pipeline, options.partition.as_deref(), &loaded);
    let resume_from = match options.resume {
        true => find_resume(store.as_ref(), pipeline, options, &fp, &dead)?,
        false => None,
    };
    let summary = |status: &str, run_id, identical_to, steps| RunSummary {
        pipeline: pipeline.name.clone(),
        partition: options.partition.clone(),
        status: status.into(),
        run_id,
        identical_to,
        resumed_from: resume_from.as_ref().map(|(r, _)| r.id),
        seconds: started.elapsed().as_secs_f64(),
        steps,
    };
    let new_run = new_run(pipeline, options, &loaded, fp);
    let id = match begin(store.as_ref(), pipeline, options, &new_run, resume_from.is_some())? {
        Begun::UpToDate(last) => return Ok(summary("UP_TO_DATE", None, Some(last), Vec::new())),
        Begun::Started(id) => id,
    };
    if let Some(started) = &options.started {
        started(id);
    }
    let heartbeat = Heartbeat::start(store.clone(), id);
    let events = emitter.map(|e| {
        let partition = options.partition.as_deref();
        std::sync::Mutex::new(lineage::RunLineage::start(e, pipeline, partition, options.backfill_id, id, &loaded))
    });
    let run = RunCtx {
        pipeline,
        options,
        loaded: &loaded,
        secrets: &secrets,
        store: store.as_ref(),
        run_id: id,
        lineage: events.as_ref(),
    };
    let result = match &resume_from {
        Some((old, checkpoints)) => adopt(&run, old, checkpoints).and_then(|()| execute(&run, Some(checkpoints))),
        None => execute(&run, None),
    };
    drop(heartbeat);
    match result {
        Ok(steps) => {
            debug_pause("before-finish", &*log);
            store.finish_run(id, Status::Success, &step_rows(&steps), None)?;
            if let Some(l) = events {
                l.into_inner().unwrap_or_else(|e| e.into_inner()).end(None);
            }
            Ok(summary("SUCCESS", Some(id), None, steps))
        }
        Err(e) => {
            if let Some(l) = events {
                let l = l.into_inner().unwrap_or_else(|e| e.into_inner());
                match &e {
                    // stopped on request: ABORT, as for a signal
                    Error::Cancelled(why) => l.abort(why),
                    e => l.end(Some(&e.to_string())),
                }
            }
            let status = if matches!(e, Error::Cancelled(_)) { Status::Cancelled } else { Status::Failed };
            if let Err(store_err) = store.finish_run(id, status, &[], Some(&e.to_string())) {
                log(Level::WARN, &format!("weir: warning: could not record the failure of run #{id}: {store_err}"));
            }
            Err(e)
        }
    }
}

/// Secrets: resolved once, granted per plugin.
fn resolve_secrets(pipeline: &Pipeline) -> Result<HashMap<String, Vec<u8>>> {
    let mut resolved: HashMap<String, Vec<u8>> = HashMap::new();
    for (name, plugin) in &pipeline.plugins {
        for s in &plugin.secrets {
            if resolved.contains_key(s) {
                continue;
            }
            let secret = pipeline.secrets.get(s).ok_or_else(|| Error::Secret {
                name: s.clone(),
                message: format!("granted to plugin `{name}` but not declared"),
            })?;
            let bytes = secret.resolve().map_err(|message| Error::Secret { name: s.clone(), message })?;
            resolved.insert(s.clone(), bytes);
        }
    }
    Ok(resolved)
}

/// Every plugin a step or check uses, compiled (or loaded from the cache) once each.
fn load_plugins(pipeline: &Pipeline, options: &RunOptions) -> Result<HashMap<String, LoadedPlugin>> {
    let mut used: Vec<&String> = pipeline.steps.iter().flat_map(|s| s.transforms.iter().map(|t| &t.plugin)).collect();
    for s in &pipeline.steps {
        if let Some(x) = pipeline.sources.get(&s.input).and_then(|src| src.extractor.as_ref()) {
            used.push(&x.plugin);
        }
    }
    for c in pipeline.steps.iter().flat_map(|s| &s.checks) {
        if let Kind::Plugin { plugin, .. } = &c.kind {
            used.push(plugin);
        }
    }
    used.sort();
    used.dedup();
    let mut loaded = HashMap::new();
    if used.is_empty() {
        return Ok(loaded);
    }
    let engine = PluginEngine::new(options.cache_dir.clone()).map_err(|e| {
        Error::Plugin(crate::PluginFailure {
            pipeline: pipeline.name.clone(),
            step: "-".into(),
            plugin: "-".into(),
            batch: None,
            cause: e.to_string(),
            kill: None,
        })
    })?;
    for name in used {
        let p = &pipeline.plugins[name];
        let t = Instant::now();
        let lp = engine
            .load(&p.path, p.sha256.as_deref())
            .and_then(|lp| lp.with_grants(grants(pipeline, p)?))
            .map_err(|e| match e {
                crate::plugin::Error::Grant { message, .. } => Error::PluginLoad { plugin: name.clone(), message },
                e => Error::PluginLoad { plugin: name.clone(), message: e.to_string() },
            })?;
        (options.log)(
            Level::INFO,
            &format!(
                "weir: plugin `{name}` ready ({} contract {}, sha256 {}…, {:.0} ms)",
                lp.info.world.as_deref().unwrap_or("?"),
                lp.info.contract_version.as_deref().unwrap_or("?"),
                &lp.info.sha256[..12],
                t.elapsed().as_secs_f64() * 1000.0
            ),
        );
        loaded.insert(name.clone(), lp);
    }
    Ok(loaded)
}

/// The differences between two recorded source schemas (empty when none).
pub fn schema_diff(old: &[crate::store::SchemaColumn], new: &[crate::store::SchemaColumn]) -> String {
    contract::Diff::of(old, new).text()
}

/// What a plugin's table grants it, with the secrets of its headers read and filled in.
fn grants(pipeline: &Pipeline, p: &crate::config::Plugin) -> Result<crate::plugin::Grants, crate::plugin::Error> {
    let fail = |message: String| crate::plugin::Error::Grant { plugin: p.name.clone(), message };
    let mut headers = Vec::new();
    for h in &p.headers {
        let secret = pipeline
            .secrets
            .get(&h.secret)
            .ok_or_else(|| fail(format!("headers.{}: secret `{}` is not declared", h.name, h.secret)))?;
        let value = secret.resolve().map_err(|m| fail(format!("headers.{}: secret `{}`: {m}", h.name, h.secret)))?;
        let (before, after) = h.template.split_once("{}").unwrap_or(("", ""));
        let value = [before.as_bytes(), &value, after.as_bytes()].concat();
        let value = http::HeaderValue::from_bytes(&value).map_err(|_| {
            fail(format!("headers.{}: secret `{}` holds bytes a header cannot carry (a line break?)", h.name, h.secret))
        })?;
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| fail(format!("headers.{}: not a header name", h.name)))?;
        headers.push(crate::plugin::grants::GrantedHeader { name, value, origin: h.origin.clone() });
    }
    Ok(crate::plugin::Grants {
        plugin: p.name.clone(),
        allowed_hosts: p.allowed_hosts.clone(),
        headers,
        files: p.files.clone(),
    })
}

/// Hash of everything that decides a run's output: the pipeline file, the plugins, the
/// partition and what each source says decides its content (for files: every input file's
/// name, size and modification time).
fn fingerprint(pipeline: &Pipeline, partition: Option<&str>, plugins: &HashMap<String, LoadedPlugin>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(pipeline.config_sha256.as_bytes());
    h.update(format!("\0partition={partition:?}\0").as_bytes());
    let mut names: Vec<&String> = plugins.keys().collect();
    names.sort();
    for n in names {
        h.update(format!("plugin {n} {}\0", plugins[n].info.sha256).as_bytes());
    }
    let mut sources: Vec<_> = pipeline.sources.values().collect();
    sources.sort_by(|a, b| a.name.cmp(&b.name));
    for source in sources {
        h.update(format!("source {} {}\0", source.name, sources::fingerprint(source, partition)).as_bytes());
    }
    crate::plugin::hex(&h.finalize())
}

/// `--resume`: the newest crashed run of this partition with checkpoints and staging left,
/// if its fingerprint matches; the staging of the other dead undecided runs is removed.
fn find_resume(
    store: &dyn RunStore,
    pipeline: &Pipeline,
    options: &RunOptions,
    fp: &str,
    dead: &[RunRecord],
) -> Result<Option<(RunRecord, Vec<Checkpoint>)>> {
    let failed =
        store.runs(&RunFilter { pipeline: Some(pipeline.name.clone()), status: Some(Status::Failed), limit: 50 })?;
    let mut found = None;
    for r in failed.into_iter().filter(|r| r.partition == options.partition) {
        if !r.staging.iter().any(|p| p.exists()) {
            continue;
        }
        let checkpoints = store.checkpoints(r.id)?;
        if checkpoints.is_empty() {
            continue;
        }
        if r.fingerprint != fp {
            return Err(Error::Resume(format!(
                "run #{} cannot be resumed: its input files, pipeline file or plugins changed since; run without --resume",
                r.id
            )));
        }
        found = Some((r, checkpoints));
        break;
    }
    let keep = found.as_ref().map(|(r, _)| r.id);
    for r in dead.iter().filter(|r| Some(r.id) != keep && r.decision.is_none()) {
        recovery::remove_staging(r);
    }
    let log = &options.log;
    match &found {
        Some((r, c)) => {
            log(Level::INFO, &format!("weir: resuming run #{} from its checkpoints ({} steps)", r.id, c.len()))
        }
        None => log(Level::INFO, "weir: nothing to resume (no crashed run with checkpoints); running from the start"),
    }
    Ok(found)
}

/// The run as the store records it when it begins.
fn new_run(
    pipeline: &Pipeline,
    options: &RunOptions,
    loaded: &HashMap<String, LoadedPlugin>,
    fingerprint: String,
) -> NewRun {
    NewRun {
        pipeline: pipeline.name.clone(),
        partition: options.partition.clone(),
        config_sha256: pipeline.config_sha256.clone(),
        plugins: loaded.iter().map(|(n, p)| (n.clone(), p.info.sha256.clone())).collect(),
        fingerprint,
        staging: pipeline
            .steps
            .iter()
            .flat_map(|s| {
                let dir = staging_dir(pipeline, s, "{run}");
                [quarantine_staging(&dir), state_staging(&dir), dir]
            })
            .collect(),
        backfill_id: options.backfill_id,
    }
}

enum Begun {
    Started(i64),
    /// An identical run (this id) already published.
    UpToDate(i64),
}

/// Record the run as RUNNING, unless an identical run already published (without
/// `--force`). One live run per pipeline and partition is decided by the store in one
/// transaction: a live one refuses this run, or is waited for with `--wait`.
fn begin(
    store: &dyn RunStore,
    pipeline: &Pipeline,
    options: &RunOptions,
    new_run: &NewRun,
    resuming: bool,
) -> Result<Begun> {
    let log = &*options.log;
    let (mut waited_for, mut completing) = (None, None);
    loop {
        if !options.force && !resuming {
            if let Some(last) = store.last_success(&pipeline.name, options.partition.as_deref())? {
                let outputs_there = pipeline.steps.iter().filter_map(|s| s.output.as_ref()).all(|o| o.path.exists());
                let rereads = pipeline.sources.values().any(sources::always_reads);
                if last.fingerprint == new_run.fingerprint && outputs_there && !rereads {
                    log(Level::INFO, &format!("weir: up to date: run #{} published this exact input, config and plugins (use --force to run again)", last.id));
                    return Ok(Begun::UpToDate(last.id));
                }
            }
        }
        match store.begin_run(new_run) {
            Ok(id) => return Ok(Begun::Started(id)),
            Err(crate::store::Error::Busy { id, pid, host }) if options.wait => {
                if waited_for != Some(id) {
                    log(
                        Level::INFO,
                        &format!("weir: waiting for run #{id} of this partition (pid {pid} on {host}) to end"),
                    );
                    waited_for = Some(id);
                }
                std::thread::sleep(WAIT_POLL);
                // the run waited for may die instead of ending: settle it as a new run would
                recover(store, Some(&pipeline.name), "a waiting run", log, false)?;
            }
            Err(crate::store::Error::Busy { id, pid, host }) => return Err(Error::AlreadyRunning { id, pid, host }),
            Err(crate::store::Error::Unfinished { id }) if completing != Some(id) => {
                // a run's publish broke off after we looked: complete it, then try again
                completing = Some(id);
                recover(store, Some(&pipeline.name), "a new run", log, false)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A resumed run adopts the crashed run's staging and checkpoints.
fn adopt(run: &RunCtx<'_>, old: &RunRecord, checkpoints: &[Checkpoint]) -> Result<()> {
    for step in &run.pipeline.steps {
        let from = staging_dir(run.pipeline, step, &old.id.to_string());
        let to = staging_dir(run.pipeline, step, &run.run_id.to_string());
        let pairs = [(quarantine_staging(&from), quarantine_staging(&to)), (state_staging(&from), state_staging(&to))];
        for (a, b) in pairs.into_iter().chain([(from, to)]) {
            if a.exists() {
                std::fs::rename(&a, &b).map_err(|e| Error::Resume(format!("cannot adopt {}: {e}", a.display())))?;
            }
        }
    }
    for c in checkpoints {
        run.store.save_checkpoint(run.run_id, c)?;
    }
    Ok(())
}

/// Execute every step, then publish; returns the step summaries.
fn execute(run: &RunCtx<'_>, resume: Option<&[Checkpoint]>) -> Result<Vec<StepSummary>> {
    let (pipeline, store, log) = (run.pipeline, run.store, &*run.options.log);
    let mut guard = StagingGuard::default();
    let mut staged: HashMap<String, Staged> = HashMap::new();
    let mut summaries = Vec::new();
    for step in &pipeline.steps {
        let staging = staging_dir(pipeline, step, &run.run_id.to_string());
        guard.add(&staging);
        guard.add(&quarantine_staging(&staging));
        guard.add(&state_staging(&staging));
        run.options.check_cancel()?;
        let checkpoint = resume.and_then(|cs| cs.iter().find(|c| c.step == step.name));
        let partition = run.options.partition.as_deref();
        let events = || run.lineage.map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(mut l) = events() {
            l.step_start(pipeline, step, partition);
        }
        let done = match checkpoint.filter(|c| c.complete) {
            Some(c) => reuse_complete(run, step, c, staging),
            None => run_with_retries(run, step, &staged, staging, checkpoint),
        };
        let (mut summary, s) = match done {
            Ok(done) => done,
            Err(e) => {
                if let Some(mut l) = events() {
                    let checks = match &e {
                        Error::CheckFailed { .. } => step_checks(store, run.run_id, &step.name),
                        _ => Vec::new(),
                    };
                    l.step_fail(step, &e.to_string(), matches!(e, Error::Cancelled(_)), &checks);
                }
                return Err(e);
            }
        };
        (summary.bytes_written, summary.files_written) = dir_bytes(&s.staging);
        if let Some(mut l) = events() {
            l.step_complete(pipeline, step, partition, &summary, &s);
        }
        summaries.push(summary);
        staged.insert(step.name.clone(), s);
    }

    debug_pause("before-publish", log);
    run.options.check_cancel()?;
    let plan = publish::plan(pipeline, run.run_id, run.options.partition.as_deref(), &staged)?;
    let watermarks: Vec<crate::store::WatermarkUpdate> = summaries.iter().filter_map(|s| s.watermark.clone()).collect();
    store.record_decision(run.run_id, &step_rows(&summaries), &plan, &watermarks)?;
    guard.decided(&plan);
    debug_pause("after-decision", log);
    publish::publish(store, run.run_id, &plan, log)?;
    // a partition run switched each partition out of its step's staging folder, now empty;
    // its dataset's folder exists even when the run wrote no partition
    for s in staged.values() {
        if s.staging.exists() {
            let _ = std::fs::remove_dir_all(&s.staging);
        }
        if let Some(out) = &s.output {
            let _ = std::fs::create_dir_all(&out.path);
        }
        if let Some(summary) = summaries.iter_mut().find(|x: &&mut StepSummary| x.name == s.step) {
            summary.partitions = s.partitions.clone();
        }
    }
    drop(guard);
    Ok(summaries)
}

/// Bytes and files under a directory.
fn dir_bytes(dir: &std::path::Path) -> (u64, u64) {
    let mut total = (0, 0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => {
                    let (b, f) = dir_bytes(&e.path());
                    total = (total.0 + b, total.1 + f);
                }
                Ok(m) => total = (total.0 + m.len(), total.1 + 1),
                Err(_) => {}
            }
        }
    }
    total
}

/// The check results a run recorded for a step (what its quality gate decided on).
fn step_checks(store: &dyn RunStore, run_id: i64, step: &str) -> Vec<crate::quality::CheckResult> {
    let filter = crate::store::CheckFilter { run_id: Some(run_id), limit: 10_000, ..Default::default() };
    let all = store.check_results(&filter).unwrap_or_default();
    all.into_iter().map(|c| c.result).filter(|r| r.step == step).collect()
}

/// A step that finished before the crash of the run being resumed: its staging is
/// complete and is reused as it is.
fn reuse_complete(run: &RunCtx<'_>, step: &Step, c: &Checkpoint, staging: PathBuf) -> Result<(StepSummary, Staged)> {
    (run.options.log)(
        Level::INFO,
        &format!("weir: step `{}` was complete before the crash; reusing its staged output", step.name),
    );
    let schema = weir_sdk::ipc::decode_schema(&c.schema).map_err(|e| Error::Resume(e.to_string()))?;
    let summary = StepSummary {
        name: step.name.clone(),
        input: step.input.clone(),
        rows_read: c.rows_read,
        rows_written: c.rows_written,
        rows_skipped: c.rows_skipped,
        output: step.output.as_ref().map(|o| o.path.clone()),
        partitions: c.partitions.clone(),
        attempts: 1,
        ..Default::default()
    };
    run.store.record_attempt(run.run_id, &step.name, 1, None)?;
    let q = quarantine_staging(&staging);
    let quarantine = q.exists().then_some(q);
    let staged = Staged {
        step: step.name.clone(),
        staging,
        schema,
        output: step.output.clone(),
        partitions: c.partitions.clone(),
        quarantine,
    };
    Ok((summary, staged))
}

/// Run a step, again after a transient failure as its `retry` says (afresh: a retry does
/// not continue from a checkpoint).
fn run_with_retries(
    run: &RunCtx<'_>,
    step: &Step,
    staged: &HashMap<String, Staged>,
    staging: PathBuf,
    mut checkpoint: Option<&Checkpoint>,
) -> Result<(StepSummary, Staged)> {
    let log = &*run.options.log;
    if checkpoint.is_none() && staging.exists() {
        let _ = std::fs::remove_dir_all(&staging); // partial output with no checkpoint
    }
    let ctx = StepCtx {
        pipeline: run.pipeline,
        step,
        options: run.options,
        loaded: run.loaded,
        secrets: run.secrets,
        staged,
        store: run.store,
        run_id: run.run_id,
    };
    let mut attempt = 1;
    loop {
        match run_step(&ctx, staging.clone(), checkpoint) {
            Ok(mut done) => {
                run.store.record_attempt(run.run_id, &step.name, attempt, None)?;
                done.0.attempts = attempt;
                return Ok(done);
            }
            Err(e) => {
                run.store.record_attempt(run.run_id, &step.name, attempt, Some(&e.to_string()))?;
                if !e.is_transient() || attempt >= step.retry.attempts {
                    if attempt > 1 {
                        log(Level::WARN, &format!("weir: step `{}` failed after {attempt} attempts", step.name));
                    }
                    return Err(e);
                }
                let wait = jittered(step.retry.backoff(attempt), step.retry.jitter);
                log(
                    Level::WARN,
                    &format!(
                        "weir: step `{}` attempt {attempt} of {} failed (transient): {e}; retrying in {} ms",
                        step.name,
                        step.retry.attempts,
                        wait.as_millis()
                    ),
                );
                let _ = std::fs::remove_dir_all(&staging);
                checkpoint = None;
                // a cancel is heard during the wait, not after it
                let until = Instant::now() + wait;
                while let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
                    run.options.check_cancel()?;
                    std::thread::sleep(left.min(Duration::from_millis(100)));
                }
                run.options.check_cancel()?;
                attempt += 1;
            }
        }
    }
}

/// Rows per step, as the run store records them.
fn step_rows(steps: &[StepSummary]) -> Vec<StepRows> {
    steps
        .iter()
        .map(|s| StepRows {
            step: s.name.clone(),
            rows_read: s.rows_read,
            rows_written: s.rows_written,
            rows_skipped: s.rows_skipped,
            rows_quarantined: s.rows_quarantined,
        })
        .collect()
}
