//! The streaming executor.
//!
//! Each step runs as a chain of threads joined by bounded channels:
//!
//! ```text
//! reader (source or earlier step) -> plugin 1 -> plugin 2 -> ... -> writer (staging)
//! ```
//!
//! A channel holds at most `channel_capacity` batches, so memory stays bounded whatever
//! the input size, and the stages run on both cores at once. Every stage ends by either
//! sending `End` (all input seen) or dropping its sender after an error; a stage that sees
//! its input close without `End` stops without finishing, so a failure upstream never turns
//! into a partial output downstream.
//!
//! Outputs are written to staging directories beside the datasets. Only when every step
//! has succeeded are they published (see [`publish`]); on failure they are removed. The
//! decision to publish is recorded before the first switch: a run that crashes after it is
//! completed by recovery ([`recover`]), so the published datasets always come from one run.

pub mod backfill;
mod publish;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::{Array, RecordBatch};
use arrow_schema::SchemaRef;

use crate::config::{Pipeline, Step};
use crate::cpu_clock::CpuTime;
use crate::io::sink::{CopiedGroup, ParquetSink};
use crate::io::source::{CopyColumn, Skipped, SourceReader};
use crate::plugin::{
    CallError, CallTimings, LoadedPlugin, LogLine, LogSink, PluginEngine, RuleInstance, TransformInstance,
};
use crate::quality::{CheckResult, Checker, History, Kind, RelTarget, Severity};
use crate::store::{
    Checkpoint, Decision, NewRun, PlannedSwitch, PublishEntry, RunFilter, RunRecord, RunStore, Status, StepRows,
};
use crate::{Error, Result};

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

pub use tracing::Level;

/// Where log lines go, each with its level (weir's own and the plugins').
pub type LogFn = Arc<dyn Fn(Level, &str) + Send + Sync>;

/// Skipped-row count and the first skipped rows, from the reader thread.
type ReaderStats = (u64, Vec<Skipped>);

/// How to run.
#[derive(Clone)]
pub struct RunOptions {
    /// The run's partition (`--partition`), substituted for `{partition}` in source paths.
    pub partition: Option<String>,
    /// Compiled-component cache; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Where log lines (weir's and plugins') go.
    pub log: LogFn,
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
    /// When a run of the same partition is live, wait for it to end instead of refusing.
    pub wait: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            partition: None,
            cache_dir: PluginEngine::default_cache_dir(),
            log: Arc::new(|_, line| eprintln!("{line}")),
            progress: None,
            state: None,
            force: false,
            backfill_id: None,
            resume: false,
            wait: false,
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
    pub output: Option<PathBuf>,
    /// Partition directories published.
    pub partitions: Vec<String>,
    /// Counters plugins added, per plugin.
    pub counters: BTreeMap<String, BTreeMap<String, i64>>,
    pub seconds: f64,
    /// Rows moved to the quarantine dataset by `quarantine` checks.
    pub rows_quarantined: u64,
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

/// Where a step's quarantined rows are staged.
fn quarantine_staging(staging: &Path) -> PathBuf {
    let name = staging.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    staging.with_file_name(format!("{name}-quarantine"))
}

/// The quarantine dataset beside a step's output: `<output>_quarantine/partition=<P>/`.
pub fn quarantine_target(output: &Path, partition: Option<&str>) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let p = crate::io::sink::escape_partition(partition.unwrap_or("__all__"));
    output.with_file_name(format!("{name}_quarantine")).join(format!("partition={p}"))
}

/// Every value of `column` in the dataset a `relationships` check points at.
fn relationship_values(
    pipeline: &Pipeline,
    staged: &HashMap<String, Staged>,
    target: &RelTarget,
    column: &str,
) -> Result<std::collections::HashSet<String>> {
    let reader = match target {
        RelTarget::Step(s) => {
            let up = staged.get(s).ok_or_else(|| Error::Check {
                step: s.clone(),
                message: format!("`relationships` refers to step `{s}`, which must run earlier in the pipeline"),
            })?;
            let partition_col = up.output.as_ref().and_then(|o| o.partition_by.as_deref());
            SourceReader::open_dataset(&up.staging, up.schema.clone(), partition_col, pipeline.batch_size)?
        }
        RelTarget::Path(p) => {
            let source = crate::config::Source {
                name: "relationships".into(),
                format: crate::config::Format::Parquet,
                path: p.to_string_lossy().into_owned(),
                schema: Vec::new(),
                on_error: crate::config::OnError::Fail,
                delimiter: b',',
                header: true,
                infer_rows: 1,
                null_values: Vec::new(),
                retry: crate::config::Retry::NONE,
                columns: None,
            };
            SourceReader::open(&source, None, pipeline.batch_size)?
        }
    };
    let index = reader.schema().index_of(column).map_err(|_| Error::Check {
        step: String::new(),
        message: format!("the `relationships` target has no column `{column}`"),
    })?;
    let mut values = std::collections::HashSet::new();
    for batch in reader {
        let batch = batch?;
        let col = batch.column(index);
        let f = arrow_cast::display::ArrayFormatter::try_new(col.as_ref(), &Default::default())
            .map_err(|e| Error::Internal(e.to_string()))?;
        for r in 0..batch.num_rows() {
            if col.is_valid(r) {
                values.insert(f.value(r).to_string());
            }
        }
    }
    Ok(values)
}

/// Removes what a run staged, and the output folders it had to create, when dropped. On
/// success the staging directories have been moved away by publish, so only leftovers go.
#[derive(Default)]
struct StagingGuard {
    staging: Vec<PathBuf>,
    created_parents: Vec<PathBuf>,
}

impl StagingGuard {
    /// The run decided to publish `plan`: what it staged for it is no longer this guard's
    /// to remove (if the publish breaks off, recovery completes it from there), and the
    /// folders it created hold, or will hold, published data.
    fn decided(&mut self, plan: &[PlannedSwitch]) {
        self.staging.retain(|d| !plan.iter().any(|sw| sw.staged.starts_with(d)));
        self.created_parents.clear();
    }

    fn add(&mut self, staging: &Path) {
        if let Some(parent) = staging.parent() {
            if !parent.exists() && !self.created_parents.iter().any(|p| p == parent) {
                self.created_parents.push(parent.to_path_buf());
            }
        }
        self.staging.push(staging.to_path_buf());
    }
}

impl Drop for StagingGuard {
    fn drop(&mut self) {
        for d in &self.staging {
            let _ = std::fs::remove_dir_all(d);
        }
        // only removes folders that are empty: published data keeps its parent
        for p in self.created_parents.iter().rev() {
            let _ = std::fs::remove_dir(p);
        }
    }
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

/// Find dead runs of the pipeline. One that had not decided to publish is marked FAILED and
/// what it staged is removed (unless kept for `--resume`); one that had decided is completed:
/// its remaining switches are made from its staged output and it is recorded SUCCESS with a
/// note. Fails (after trying every run) if a decided run cannot be completed: no other run
/// may publish over a half-published one.
pub fn recover(
    store: &dyn RunStore,
    pipeline: Option<&str>,
    by: &str,
    log: &dyn Fn(Level, &str),
    keep_staging: bool,
) -> Result<Vec<RunRecord>> {
    let dead = store.recover_stale(pipeline, LEASE.as_millis() as i64, by)?;
    let mut first_error = None;
    for r in &dead {
        if let Some(decision) = &r.decision {
            match roll_forward(store, r, decision, log) {
                Ok(()) => {}
                // the first is returned (and reported by the caller), the others logged
                Err(e) if first_error.is_some() => log(Level::ERROR, &format!("weir: error: {e}")),
                Err(e) => first_error = Some(e),
            }
            continue;
        }
        if !keep_staging {
            remove_staging(r);
        }
        let published = match r.published.len() {
            0 => "it had not decided to publish, so nothing was published".to_string(),
            // a run of a weir from before decisions were recorded
            n => format!("{n} switch(es) had been published by a weir that recorded no decision to complete"),
        };
        log(
            Level::WARN,
            &format!(
                "weir: recovered run #{} of `{}`: {}; {published}; {}",
                r.id,
                r.pipeline,
                r.error.as_deref().unwrap_or("crashed"),
                if keep_staging { "its staging is kept for --resume" } else { "its staging was removed" }
            ),
        );
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(dead),
    }
}

/// Complete the publish of a run that had decided to publish: make each switch not yet made
/// (a switch made but not recorded is recognised by its token), then record it SUCCESS.
fn roll_forward(store: &dyn RunStore, r: &RunRecord, decision: &Decision, log: &dyn Fn(Level, &str)) -> Result<()> {
    complete_decided(store, r, decision, log).inspect_err(|e| {
        // FAILED with its decision kept: the next recovery tries again, and no other run
        // publishes meanwhile
        let _ = store.finish_run(r.id, Status::Failed, &[], Some(&e.to_string()));
    })
}

fn complete_decided(store: &dyn RunStore, r: &RunRecord, decision: &Decision, log: &dyn Fn(Level, &str)) -> Result<()> {
    let total = decision.switches.len();
    let recorded = total - decision.pending();
    let (mut made_now, mut superseded) = (0, 0);
    for (seq, sw) in decision.switches.iter().enumerate() {
        if sw.done_at_ms.is_none() && !store.renew_lease(r.id)? {
            return Err(Error::Publish {
                step: sw.step.clone(),
                message: format!("run #{} was taken over by another process while it was being completed", r.id),
            });
        }
        let (switch, now) =
            publish::complete_switch(&sw.staged, &sw.target, &sw.token, sw.target_token.as_deref(), log).map_err(
                |e| Error::Publish {
                    step: sw.step.clone(),
                    message: format!(
                        "run #{} had decided to publish, but its switch {} of {total} ({}) cannot be completed: {e}",
                        r.id,
                        seq + 1,
                        sw.target.display()
                    ),
                },
            )?;
        made_now += usize::from(now);
        superseded += usize::from(switch == publish::Switch::Superseded);
        if sw.done_at_ms.is_none() {
            let entry = PublishEntry {
                step: sw.step.clone(),
                path: sw.target.clone(),
                partition: sw.partition.clone(),
                action: switch.as_str().into(),
            };
            store.record_switch(r.id, seq, &entry)?;
        }
    }
    // what is left there is replaced data and emptied partition staging folders
    remove_staging(r);
    let cause = r.error.as_deref().unwrap_or("crashed");
    let note = format!(
        "completed by recovery after {}; of its {total} switches {recorded} had been made and recorded by the run, \
         {} made but not recorded, {made_now} made by recovery{}",
        if let Some(c) = cause.strip_prefix("crashed: ") {
            format!("it crashed ({c})")
        } else if let Some(c) = cause.strip_prefix("publish broke off: ") {
            format!("its publish broke off ({c})")
        } else {
            cause.to_string()
        },
        total - recorded - made_now - superseded,
        if superseded > 0 {
            format!(", {superseded} superseded (a later run had replaced the target)")
        } else {
            String::new()
        }
    );
    store.complete_recovered(r.id, &note)?;
    if let (Some(b), Some(p)) = (r.backfill_id, &r.partition) {
        store.set_backfill_partition(b, p, "SUCCESS", Some(r.id), None)?;
    }
    log(Level::INFO, &format!(
        "weir: recovered run #{} of `{}`: it had decided to publish; {made_now} of its {total} switches completed from its staged output; recorded SUCCESS",
        r.id, r.pipeline
    ));
    Ok(())
}

fn remove_staging(r: &RunRecord) {
    for s in &r.staging {
        if s.exists() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
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

/// Hash of everything that decides a run's output: the pipeline file, the plugins, the
/// partition and every input file's name, size and modification time.
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
    for source in pipeline.sources.values() {
        match crate::io::source::expand_paths(&source.path, partition, source.format) {
            Ok(files) => {
                for f in files {
                    let meta = std::fs::metadata(&f);
                    let (len, mtime) = meta
                        .map(|m| {
                            (
                                m.len(),
                                m.modified()
                                    .ok()
                                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                                    .map(|d| d.as_nanos())
                                    .unwrap_or(0),
                            )
                        })
                        .unwrap_or((0, 0));
                    h.update(format!("file {} {len} {mtime}\0", f.display()).as_bytes());
                }
            }
            Err(e) => h.update(format!("source {} error {e}\0", source.name).as_bytes()),
        }
    }
    crate::plugin::hex(&h.finalize())
}

/// Run a validated pipeline once: recover crashed runs, skip if an identical run already
/// published, else record the run, execute, publish and commit the outcome.
pub fn run(pipeline: &Pipeline, options: &RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    let log = options.log.clone();
    let store = open_store(pipeline, options)?;
    let dead = recover(store.as_ref(), Some(&pipeline.name), "a new run", &*log, options.resume)?;

    // Secrets: resolved once, granted per plugin.
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

    // Plugins: compiled (or loaded from cache) once each.
    let used: Vec<&String> = {
        let mut v: Vec<&String> = pipeline.steps.iter().flat_map(|s| s.transforms.iter().map(|t| &t.plugin)).collect();
        for step in &pipeline.steps {
            for c in &step.checks {
                if let Kind::Plugin { plugin, .. } = &c.kind {
                    v.push(plugin);
                }
            }
        }
        v.sort();
        v.dedup();
        v
    };
    let engine = if used.is_empty() {
        None
    } else {
        Some(
            PluginEngine::new(options.cache_dir.clone())
                .map_err(|e| Error::Plugin(plugin_ctx(pipeline, "-", "-", None, e.to_string())))?,
        )
    };
    let mut loaded: HashMap<String, LoadedPlugin> = HashMap::new();
    for name in used {
        let p = &pipeline.plugins[name];
        let engine = engine.as_ref().expect("engine exists when plugins are used");
        let t = Instant::now();
        let lp = engine
            .load(&p.path, p.sha256.as_deref())
            .map_err(|e| Error::PluginLoad { plugin: name.clone(), message: e.to_string() })?;
        log(
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

    let fp = fingerprint(pipeline, options.partition.as_deref(), &loaded);

    // --resume: continue the newest crashed run of this partition from its checkpoints.
    let mut resume_from: Option<(RunRecord, Vec<Checkpoint>)> = None;
    if options.resume {
        let failed = store.runs(&RunFilter {
            pipeline: Some(pipeline.name.clone()),
            status: Some(Status::Failed),
            limit: 50,
        })?;
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
            resume_from = Some((r, checkpoints));
            break;
        }
        let keep = resume_from.as_ref().map(|(r, _)| r.id);
        for r in dead.iter().filter(|r| Some(r.id) != keep && r.decision.is_none()) {
            remove_staging(r);
        }
        match &resume_from {
            Some((r, c)) => {
                log(Level::INFO, &format!("weir: resuming run #{} from its checkpoints ({} steps)", r.id, c.len()))
            }
            None => {
                log(Level::INFO, "weir: nothing to resume (no crashed run with checkpoints); running from the start")
            }
        }
    }

    let new_run = NewRun {
        pipeline: pipeline.name.clone(),
        partition: options.partition.clone(),
        config_sha256: pipeline.config_sha256.clone(),
        plugins: loaded.iter().map(|(n, p)| (n.clone(), p.info.sha256.clone())).collect(),
        fingerprint: fp.clone(),
        staging: pipeline
            .steps
            .iter()
            .flat_map(|s| {
                let dir = staging_dir(pipeline, s, "{run}");
                [quarantine_staging(&dir), dir]
            })
            .collect(),
        backfill_id: options.backfill_id,
    };
    let (mut waited_for, mut completing) = (None, None);
    let id = loop {
        // An identical run that already published makes this one a no-op.
        if !options.force && resume_from.is_none() {
            if let Some(last) = store.last_success(&pipeline.name, options.partition.as_deref())? {
                let outputs_there = pipeline.steps.iter().filter_map(|s| s.output.as_ref()).all(|o| o.path.exists());
                if last.fingerprint == fp && outputs_there {
                    log(Level::INFO, &format!("weir: up to date: run #{} published this exact input, config and plugins (use --force to run again)", last.id));
                    return Ok(RunSummary {
                        pipeline: pipeline.name.clone(),
                        partition: options.partition.clone(),
                        status: "UP_TO_DATE".into(),
                        run_id: None,
                        identical_to: Some(last.id),
                        resumed_from: None,
                        seconds: started.elapsed().as_secs_f64(),
                        steps: Vec::new(),
                    });
                }
            }
        }
        // One live run per pipeline and partition, decided by the store in one transaction.
        match store.begin_run(&new_run) {
            Ok(id) => break id,
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
                recover(store.as_ref(), Some(&pipeline.name), "a waiting run", &*log, false)?;
            }
            Err(crate::store::Error::Busy { id, pid, host }) => return Err(Error::AlreadyRunning { id, pid, host }),
            Err(crate::store::Error::Unfinished { id }) if completing != Some(id) => {
                // a run's publish broke off after we looked: complete it, then try again
                completing = Some(id);
                recover(store.as_ref(), Some(&pipeline.name), "a new run", &*log, false)?;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let heartbeat = Heartbeat::start(store.clone(), id);
    // A resumed run adopts the crashed run's staging and checkpoints.
    if let Some((old, checkpoints)) = &resume_from {
        for step in &pipeline.steps {
            let (from, to) =
                (staging_dir(pipeline, step, &old.id.to_string()), staging_dir(pipeline, step, &id.to_string()));
            for (a, b) in [(quarantine_staging(&from), quarantine_staging(&to)), (from, to)] {
                if a.exists() {
                    std::fs::rename(&a, &b).map_err(|e| Error::Resume(format!("cannot adopt {}: {e}", a.display())))?;
                }
            }
        }
        for c in checkpoints {
            store.save_checkpoint(id, c)?;
        }
    }
    let resume = resume_from.as_ref().map(|(_, c)| c.as_slice());
    let result = execute(pipeline, options, &loaded, &resolved, store.as_ref(), id, resume);
    drop(heartbeat);
    match result {
        Ok(steps) => {
            debug_pause("before-finish", &*log);
            store.finish_run(id, Status::Success, &step_rows(&steps), None)?;
            Ok(RunSummary {
                pipeline: pipeline.name.clone(),
                partition: options.partition.clone(),
                status: "SUCCESS".into(),
                run_id: Some(id),
                identical_to: None,
                resumed_from: resume_from.as_ref().map(|(r, _)| r.id),
                seconds: started.elapsed().as_secs_f64(),
                steps,
            })
        }
        Err(e) => {
            if let Err(store_err) = store.finish_run(id, Status::Failed, &[], Some(&e.to_string())) {
                log(Level::WARN, &format!("weir: warning: could not record the failure of run #{id}: {store_err}"));
            }
            Err(e)
        }
    }
}

/// Execute every step, then publish; returns the step summaries.
fn execute(
    pipeline: &Pipeline,
    options: &RunOptions,
    loaded: &HashMap<String, LoadedPlugin>,
    resolved: &HashMap<String, Vec<u8>>,
    store: &dyn RunStore,
    run_id: i64,
    resume: Option<&[Checkpoint]>,
) -> Result<Vec<StepSummary>> {
    let log = options.log.clone();
    let mut guard = StagingGuard::default();
    let mut staged: HashMap<String, Staged> = HashMap::new();
    let mut summaries = Vec::new();
    for step in &pipeline.steps {
        let staging = staging_dir(pipeline, step, &run_id.to_string());
        guard.add(&staging);
        guard.add(&quarantine_staging(&staging));
        let checkpoint = resume.and_then(|cs| cs.iter().find(|c| c.step == step.name));
        if let Some(c) = checkpoint.filter(|c| c.complete) {
            // finished before the crash: its staging is complete
            log(
                Level::INFO,
                &format!("weir: step `{}` was complete before the crash; reusing its staged output", step.name),
            );
            let schema = weir_sdk::ipc::decode_schema(&c.schema).map_err(|e| Error::Resume(e.to_string()))?;
            summaries.push(StepSummary {
                name: step.name.clone(),
                input: step.input.clone(),
                rows_read: c.rows_read,
                rows_written: c.rows_written,
                rows_skipped: c.rows_skipped,
                output: step.output.as_ref().map(|o| o.path.clone()),
                partitions: c.files.clone(),
                ..Default::default()
            });
            store.record_attempt(run_id, &step.name, 1, None)?;
            let q = quarantine_staging(&staging);
            let quarantine = q.exists().then_some(q);
            let s = Staged {
                step: step.name.clone(),
                staging,
                schema,
                output: step.output.clone(),
                partitions: c.files.clone(),
                quarantine,
            };
            staged.insert(step.name.clone(), s);
            continue;
        }
        let mut checkpoint = checkpoint;
        if checkpoint.is_none() && staging.exists() {
            let _ = std::fs::remove_dir_all(&staging); // partial output with no checkpoint
        }
        let to = CheckpointTo { store, run_id };
        let mut attempt = 1;
        let (summary, s) = loop {
            match run_step(pipeline, step, options, loaded, resolved, &staged, staging.clone(), to, checkpoint) {
                Ok(done) => {
                    store.record_attempt(run_id, &step.name, attempt, None)?;
                    break done;
                }
                Err(e) => {
                    store.record_attempt(run_id, &step.name, attempt, Some(&e.to_string()))?;
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
                    checkpoint = None; // a retry starts the step afresh
                    std::thread::sleep(wait);
                    attempt += 1;
                }
            }
        };
        summaries.push(summary);
        staged.insert(step.name.clone(), s);
    }

    debug_pause("before-publish", &*log);
    let plan = plan_switches(pipeline, options, &staged)?;
    store.record_decision(run_id, &step_rows(&summaries), &plan)?;
    guard.decided(&plan);
    debug_pause("after-decision", &*log);
    for (seq, sw) in plan.iter().enumerate() {
        let interrupted = |message: String| Error::PublishInterrupted {
            step: sw.step.clone(),
            // a switch whose old copy could not be removed was made all the same
            made: seq + usize::from(publish::dir_token(&sw.target).as_deref() == Some(sw.token.as_str())),
            total: plan.len(),
            message,
        };
        if !store.renew_lease(run_id)? {
            return Err(interrupted("the run was taken over by another process (its lease had expired)".into()));
        }
        let switch = publish::switch_dir(&sw.staged, &sw.target, &*log).map_err(interrupted)?;
        debug_pause("after-switch", &*log);
        let entry = PublishEntry {
            step: sw.step.clone(),
            path: sw.target.clone(),
            partition: sw.partition.clone(),
            action: switch.as_str().into(),
        };
        store.record_switch(run_id, seq, &entry)?;
        debug_pause("between-publishes", &*log);
    }
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

/// Every switch that publishes what the run staged, in the order they are made: per step
/// (in pipeline order) its dataset or, in a partition run of a partitioned output, each
/// partition it wrote; then its quarantined rows.
fn plan_switches(
    pipeline: &Pipeline,
    options: &RunOptions,
    staged: &HashMap<String, Staged>,
) -> Result<Vec<PlannedSwitch>> {
    let mut plan = Vec::new();
    for step in &pipeline.steps {
        let s = &staged[&step.name];
        let Some(out) = &s.output else { continue };
        let mut add = |kind: &str, from: PathBuf, to: PathBuf, partition: Option<String>| -> Result<()> {
            let token = publish::dir_token(&from).ok_or_else(|| Error::Publish {
                step: s.step.clone(),
                message: format!("its staged output {} is missing", from.display()),
            })?;
            let target_token = publish::dir_token(&to);
            plan.push(PlannedSwitch {
                step: s.step.clone(),
                kind: kind.into(),
                replaces: target_token.is_some(),
                staged: from,
                target: to,
                partition,
                token,
                target_token,
                done_at_ms: None,
            });
            Ok(())
        };
        if out.partition_by.is_some() && options.partition.is_some() {
            for p in &s.partitions {
                add("partition", s.staging.join(p), out.path.join(p), Some(p.clone()))?;
            }
        } else {
            add("dataset", s.staging.clone(), out.path.clone(), None)?;
        }
        if let Some(q) = &s.quarantine {
            add("quarantine", q.clone(), quarantine_target(&out.path, options.partition.as_deref()), None)?;
        }
    }
    Ok(plan)
}

fn staging_dir(pipeline: &Pipeline, step: &Step, run_id: &str) -> PathBuf {
    match &step.output {
        Some(o) => {
            let name =
                o.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| step.name.clone());
            o.path.with_file_name(format!(".{name}.weir-staging-{run_id}"))
        }
        None => pipeline.file.parent().unwrap_or(Path::new(".")).join(format!(".weir-staging-{}-{run_id}", step.name)),
    }
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

/// How errors name a step's transform: `mask (transform 2 of 3)`.
fn transform_label(step: &Step, index: usize) -> String {
    format!("{} (transform {} of {})", step.transforms[index].plugin, index + 1, step.transforms.len())
}

fn plugin_ctx(
    pipeline: &Pipeline,
    step: &str,
    plugin: &str,
    batch: Option<u64>,
    cause: String,
) -> crate::PluginFailure {
    crate::PluginFailure {
        pipeline: pipeline.name.clone(),
        step: step.to_string(),
        plugin: plugin.to_string(),
        batch,
        cause,
    }
}

/// The columns of a step's output that can be copied as they are from its input's Parquet
/// pages: those no transform touches, when the input is Parquet, every transform declared a
/// column rewrite (rows are then neither added, dropped nor reordered, and the other columns
/// never reach a sandbox), the step has no checks (they may read any column and quarantine
/// rows), and the output is one unpartitioned dataset that allows it (`copy_columns`).
/// Tells the reader; returns the names.
fn copy_plan(
    step: &Step,
    instances: &[(usize, String, TransformInstance)],
    reader: &mut SourceReader,
    sink: &ParquetSink,
) -> Vec<String> {
    let output = step.output.as_ref();
    if instances.is_empty()
        || !step.checks.is_empty()
        || !reader.is_parquet()
        || !output.is_none_or(|o| o.copy_columns && o.partition_by.is_none())
    {
        return Vec::new();
    }
    let mut touched = std::collections::HashSet::new();
    for (_, _, inst) in instances {
        let Some(columns) = inst.rewritten_columns() else { return Vec::new() };
        touched.extend(columns.iter().copied());
    }
    let columns: Vec<CopyColumn> = sink
        .flat_columns()
        .into_iter()
        .enumerate()
        .filter(|(position, _)| !touched.contains(position))
        .filter_map(|(position, descr)| descr.map(|descr| CopyColumn { position, descr }))
        .collect();
    let codec = output.map(|o| o.compression).unwrap_or_default().parquet();
    let schema = reader.schema();
    reader.copy_columns(columns, codec).into_iter().map(|p| schema.field(p).name().clone()).collect()
}

/// A checkpoint marker travelling down a step's stages behind the batches before it.
struct Mark {
    file: usize,
    rows: u64,
    batches: u64,
    rows_read: u64,
    rows_skipped: u64,
    /// Filled in by each plugin stage, in order.
    states: Vec<Option<Vec<u8>>>,
}

enum Msg {
    Batch(RecordBatch),
    Checkpoint(Box<Mark>),
    /// The batches that follow, up to this many rows, are one input row group whose
    /// untouched columns the sink copies (their values in the batches are placeholders).
    Copy(Box<CopiedGroup>),
    End,
}

type StageResult = std::result::Result<(), Error>;

/// Where checkpoints go: the store and the run.
#[derive(Clone, Copy)]
struct CheckpointTo<'a> {
    store: &'a dyn RunStore,
    run_id: i64,
}

#[allow(clippy::too_many_arguments)]
fn run_step(
    pipeline: &Pipeline,
    step: &Step,
    options: &RunOptions,
    loaded: &HashMap<String, LoadedPlugin>,
    secrets: &HashMap<String, Vec<u8>>,
    staged: &HashMap<String, Staged>,
    staging: PathBuf,
    checkpoints: CheckpointTo<'_>,
    resume: Option<&Checkpoint>,
) -> Result<(StepSummary, Staged)> {
    let started = Instant::now();
    let log = options.log.clone();

    // The input.
    let mut reader = if let Some(source) = pipeline.sources.get(&step.input) {
        SourceReader::open(source, options.partition.as_deref(), pipeline.batch_size)?
    } else {
        let up = staged
            .get(&step.input)
            .ok_or_else(|| Error::Internal(format!("step `{}` runs before its input `{}`", step.name, step.input)))?;
        let partition_col = up.output.as_ref().and_then(|o| o.partition_by.as_deref());
        SourceReader::open_dataset(&up.staging, up.schema.clone(), partition_col, pipeline.batch_size)?
    };
    let files = reader.files().len();

    // Plugin instances: created and initialised in order, each declaring the schema the next
    // one receives; on resume, each gets its checkpointed state back.
    let mut schema = reader.schema();
    let mut instances = Vec::new();
    for (i, t) in step.transforms.iter().enumerate() {
        let p = &pipeline.plugins[&t.plugin];
        let granted: HashMap<String, Vec<u8>> =
            p.secrets.iter().filter_map(|s| secrets.get(s).map(|v| (s.clone(), v.clone()))).collect();
        let prefix = format!("[{}/{}]", step.name, t.plugin);
        let plog = log.clone();
        let sink: LogSink =
            Arc::new(move |l: &LogLine| plog(plugin_level(l.level), &format!("{prefix} {}: {}", l.level, l.message)));
        let limits = p.limits();
        let fail = |cause: String| Error::Plugin(plugin_ctx(pipeline, &step.name, &t.plugin, None, cause));
        let mut inst = TransformInstance::new(&loaded[&t.plugin], limits, Arc::new(granted), sink)
            .map_err(|e| fail(e.to_string()))?;
        let ctx = weir_sdk::Context {
            pipeline: pipeline.name.clone(),
            step: step.name.clone(),
            plugin: t.plugin.clone(),
            partition: options.partition.clone(),
        };
        schema = inst.init(&t.config_json, &schema, &ctx).map_err(|e| match e {
            CallError::InvalidConfig(m) => Error::PluginConfig {
                file: pipeline.file.clone(),
                line: t.line,
                step: step.name.clone(),
                plugin: t.plugin.clone(),
                message: m,
            },
            other => fail(format!("init failed: {other}")),
        })?;
        if let Some(Some(state)) = resume.and_then(|c| c.states.get(i)) {
            inst.restore(state).map_err(|e| fail(format!("restoring its checkpoint state failed: {e}")))?;
        }
        instances.push((i, t.plugin.clone(), inst));
    }

    if let Some(out) = &step.output {
        crate::io::sink::check_output_schema(&schema, out.partition_by.as_deref()).map_err(|m| {
            match step.transforms.last() {
                Some(t) => Error::Plugin(plugin_ctx(
                    pipeline,
                    &step.name,
                    &t.plugin,
                    None,
                    format!("init declared an output schema weir cannot publish: {m}"),
                )),
                None => Error::Output { step: step.name.clone(), message: m },
            }
        })?;
    }
    let mut sink = ParquetSink::new(
        &staging,
        schema.clone(),
        step.output.as_ref().and_then(|o| o.partition_by.as_deref()),
        step.output.as_ref().map(|o| o.row_group_size).unwrap_or(1 << 20),
        step.output.as_ref().map(|o| o.compression).unwrap_or_default(),
    )?;
    if let Some(c) = resume {
        sink.resume(&c.files, c.next_part, c.rows_written)?;
    }
    let copied_columns = copy_plan(step, &instances, &mut reader, &sink);
    if !copied_columns.is_empty() {
        log(
            Level::INFO,
            &format!(
                "weir: step `{}` copies {} column(s) no plugin touches from the input's Parquet pages: {}",
                step.name,
                copied_columns.len(),
                copied_columns.join(", ")
            ),
        );
    }
    // (after the copy plan: the file the run resumes in may copy columns too)
    if let Some(c) = resume {
        reader.seek(c.file, c.rows)?;
        log(
            Level::INFO,
            &format!(
                "weir: step `{}` resumes after batch {} ({} rows already read and staged)",
                step.name, c.batches, c.rows_read
            ),
        );
    }
    let schema_ipc = weir_sdk::ipc::encode_schema(&schema).map_err(|e| Error::Internal(e.to_string()))?;

    let base = resume.cloned().unwrap_or_default();
    let rows_read = Arc::new(AtomicU64::new(base.rows_read));
    let rows_written = Arc::new(AtomicU64::new(base.rows_written));
    let cancel = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<Error>>> = Arc::default();
    let cap = pipeline.channel_capacity;
    let counters: Arc<Mutex<BTreeMap<String, BTreeMap<String, i64>>>> = Arc::default();
    let plugin_timings: Arc<Mutex<Vec<PluginTimings>>> = Arc::new(Mutex::new(
        step.transforms.iter().map(|t| PluginTimings { plugin: t.plugin.clone(), ..Default::default() }).collect(),
    ));
    let (mut read_secs, mut check_secs, mut write_secs) = (0f64, 0f64, 0f64);
    // Quality checks: row-level ones see every batch on its way to the sink. A step with
    // checks only checkpoints when complete (check state is not part of checkpoints).
    let every = if step.checks.is_empty() { pipeline.checkpoint_every } else { 0 };
    let check_err = |message: String| Error::Check { step: step.name.clone(), message };
    let mut checker = if step.checks.is_empty() {
        None
    } else {
        let mut targets = HashMap::new();
        for (i, c) in step.checks.iter().enumerate() {
            if let Kind::Relationships { target, target_column, .. } = &c.kind {
                let values = relationship_values(pipeline, staged, target, target_column).map_err(|e| match e {
                    Error::Check { message, .. } => check_err(format!("check `{}`: {message}", c.name)),
                    other => other,
                })?;
                targets.insert(i, values);
            }
        }
        // quality-rule plugins: one sandboxed instance per plugin check
        let mut rules = HashMap::new();
        for (i, c) in step.checks.iter().enumerate() {
            if let Kind::Plugin { plugin, config_json } = &c.kind {
                let p = &pipeline.plugins[plugin];
                let limits = p.limits();
                let prefix = format!("[{}/{}]", step.name, plugin);
                let plog = log.clone();
                let sink: LogSink = Arc::new(move |l: &LogLine| {
                    plog(plugin_level(l.level), &format!("{prefix} {}: {}", l.level, l.message))
                });
                let fail = |cause: String| check_err(format!("check `{}`: plugin `{plugin}` {cause}", c.name));
                let mut rule = RuleInstance::new(&loaded[plugin], limits, sink).map_err(|e| fail(e.to_string()))?;
                let ctx = weir_sdk::Context {
                    pipeline: pipeline.name.clone(),
                    step: step.name.clone(),
                    plugin: plugin.clone(),
                    partition: options.partition.clone(),
                };
                rule.init(config_json, &schema, &ctx).map_err(|e| match e {
                    CallError::InvalidConfig(m) => Error::PluginConfig {
                        file: pipeline.file.clone(),
                        line: c.line,
                        step: step.name.clone(),
                        plugin: plugin.clone(),
                        message: m,
                    },
                    other => fail(format!("failed to start: {other}")),
                })?;
                rules.insert(i, rule);
            }
        }
        Some(
            Checker::new(
                &step.name,
                step.checks.clone(),
                &schema,
                targets,
                checkpoints.run_id,
                options.partition.as_deref(),
            )
            .map_err(check_err)?
            .with_rules(rules),
        )
    };
    let qstaging = quarantine_staging(&staging);
    let mut qsink = match &checker {
        Some(c) if c.quarantines() => {
            Some(ParquetSink::new(&qstaging, c.quarantine_schema(), None, 1 << 20, Default::default())?)
        }
        _ => None,
    };
    let mut rows_quarantined = 0u64;
    let mut copied_row_groups = 0u64;

    let (mut reader_stats, partitions) = std::thread::scope(|scope| -> Result<(Option<ReaderStats>, Vec<String>)> {
        // reader
        let (tx, mut rx) = sync_channel::<Msg>(cap);
        let rr = rows_read.clone();
        let cancel_r = cancel.clone();
        let (skipped_before, batches_before) = (base.rows_skipped, base.batches);
        let read_secs = &mut read_secs;
        let reader_handle = scope.spawn(move || -> std::result::Result<ReaderStats, Error> {
            let mut reader = reader;
            let mut batches = batches_before;
            let mut marked = batches_before;
            loop {
                let t = CpuTime::now();
                let Some(batch) = reader.next() else { break };
                *read_secs += t.elapsed_secs();
                if cancel_r.load(Ordering::Relaxed) {
                    return Ok((0, Vec::new()));
                }
                let batch = batch?;
                rr.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                if let Some(group) = reader.take_copied() {
                    if tx.send(Msg::Copy(Box::new(group))).is_err() {
                        return Ok((0, Vec::new()));
                    }
                }
                if tx.send(Msg::Batch(batch)).is_err() {
                    return Ok((0, Vec::new())); // downstream stopped; it reports why
                }
                batches += 1;
                // (a row group whose columns are copied is never split by a checkpoint)
                if every > 0 && batches - marked >= every && reader.at_row_group_end() {
                    marked = batches;
                    let (file, rows) = reader.position();
                    let mark = Mark {
                        file,
                        rows,
                        batches,
                        rows_read: rr.load(Ordering::Relaxed),
                        rows_skipped: skipped_before + reader.total_skipped(),
                        states: Vec::new(),
                    };
                    if tx.send(Msg::Checkpoint(Box::new(mark))).is_err() {
                        return Ok((0, Vec::new()));
                    }
                }
            }
            *read_secs += reader.helper_cpu_secs();
            let _ = tx.send(Msg::End);
            Ok((skipped_before + reader.total_skipped(), reader.skipped.clone()))
        });

        // plugin stages
        for (index, _, inst) in instances {
            let (tx, next_rx) = sync_channel::<Msg>(cap);
            let input = std::mem::replace(&mut rx, next_rx);
            let errors = errors.clone();
            let counters = counters.clone();
            let timings = plugin_timings.clone();
            let cancel = cancel.clone();
            let failure = move |batch: Option<u64>, cause: String| {
                Error::Plugin(crate::PluginFailure {
                    pipeline: pipeline.name.clone(),
                    step: step.name.clone(),
                    plugin: transform_label(step, index),
                    batch,
                    cause,
                })
            };
            let name = step.transforms[index].plugin.clone();
            let first_batch = base.batches;
            scope.spawn(move || {
                let stage = Stage { failure: &failure, counters: &counters, timings: &timings, index, name: &name };
                let result = plugin_stage(inst, input, tx, &cancel, stage, first_batch);
                if let Err(e) = result {
                    cancel.store(true, Ordering::Relaxed);
                    errors.lock().unwrap_or_else(|e| e.into_inner()).push(e);
                }
            });
        }

        // progress
        // (it waits on a channel between updates, so the step ends as soon as its work does)
        let (done, stopped) = std::sync::mpsc::channel::<()>();
        let progress_handle = options.progress.clone().map(|cb| {
            let (rr, rw, name) = (rows_read.clone(), rows_written.clone(), step.name.clone());
            scope.spawn(move || loop {
                cb(&Progress {
                    step: name.clone(),
                    rows_read: rr.load(Ordering::Relaxed),
                    rows_written: rw.load(Ordering::Relaxed),
                    elapsed: started.elapsed(),
                });
                if !matches!(
                    stopped.recv_timeout(Duration::from_millis(200)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                ) {
                    break;
                }
            })
        });

        // writer (this thread)
        let write_result = (|| -> Result<bool> {
            loop {
                match rx.recv() {
                    Ok(Msg::Batch(b)) => {
                        let b = match checker.as_mut() {
                            Some(c) => {
                                let t = CpuTime::now();
                                let (good, bad) = c.apply(&b).map_err(check_err)?;
                                check_secs += t.elapsed_secs();
                                if let (Some(q), Some(bad)) = (qsink.as_mut(), bad) {
                                    q.write(&bad)?;
                                    rows_quarantined += bad.num_rows() as u64;
                                }
                                good
                            }
                            None => b,
                        };
                        if b.num_rows() > 0 {
                            let t = CpuTime::now();
                            sink.write(&b)?;
                            write_secs += t.elapsed_secs();
                        }
                        rows_written.fetch_add(b.num_rows() as u64, Ordering::Relaxed);
                    }
                    Ok(Msg::Copy(group)) => {
                        let t = CpuTime::now();
                        sink.copy_next(*group)?;
                        write_secs += t.elapsed_secs();
                        copied_row_groups += 1;
                    }
                    Ok(Msg::Checkpoint(mark)) => {
                        // everything before the mark is through every stage: make it durable
                        sink.rotate()?;
                        let (files, next_part) = sink.progress();
                        let c = Checkpoint {
                            step: step.name.clone(),
                            complete: false,
                            file: mark.file,
                            rows: mark.rows,
                            batches: mark.batches,
                            rows_read: mark.rows_read,
                            rows_written: rows_written.load(Ordering::Relaxed),
                            rows_skipped: mark.rows_skipped,
                            files,
                            next_part,
                            schema: schema_ipc.clone(),
                            states: mark.states,
                        };
                        checkpoints.store.save_checkpoint(checkpoints.run_id, &c)?;
                        debug_pause("after-checkpoint", &*log);
                    }
                    Ok(Msg::End) => return Ok(true),
                    Err(_) => return Ok(false), // upstream failed; its error is recorded
                }
            }
        })();
        let t = CpuTime::now();
        let encode_cpu = sink.encode_cpu();
        let write_result = match write_result {
            Ok(true) => sink.finish().map(Some).map_err(Error::from),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        };
        write_secs += t.elapsed_secs() + encode_cpu();
        if write_result.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        drop(rx);
        let reader_result = reader_handle.join().map_err(|_| Error::Internal("the reader thread panicked".into()))?;
        drop(done);
        if let Some(h) = progress_handle {
            let _ = h.join();
        }
        // scope joins the plugin stages here
        let partitions = write_result?;
        let stats = reader_result?;
        Ok((Some(stats), partitions.unwrap_or_default()))
    })
    .map_err(|e| first_error(e, &errors))?;
    if let Some(e) = errors.lock().unwrap_or_else(|e| e.into_inner()).drain(..).next() {
        return Err(e);
    }
    let (rows_skipped, skipped) = reader_stats.take().unwrap_or_default();
    for s in skipped.iter().take(5) {
        log(Level::WARN, &format!("weir: skipped {}:{}: {}", s.file.display(), s.line, s.message));
    }
    if rows_skipped > 5 {
        log(Level::WARN, &format!("weir: … {} more rows skipped in {}", rows_skipped - 5, step.input));
    }
    // Quality gate: every check's result is recorded; a failed `block` check stops here,
    // before anything is published.
    let mut results = Vec::new();
    let mut quarantine = None;
    if let Some(c) = checker.as_mut() {
        let history = check_history(pipeline, step, checkpoints.store, options.partition.as_deref())?;
        results = c.finish(&history);
        checkpoints.store.record_checks(checkpoints.run_id, options.partition.as_deref(), &results)?;
        if let Some(q) = qsink.take() {
            q.finish()?;
            quarantine = Some(qstaging.clone());
        }
        let blocking: Vec<String> = results
            .iter()
            .filter(|r| !r.passed && r.severity == Severity::Block)
            .map(|r| {
                let sample =
                    if r.sample.is_empty() { String::new() } else { format!("\n    e.g. {}", r.sample.join("; ")) };
                format!("  check `{}` (block) failed: {}; allowed {}{sample}", r.check, r.observed, r.threshold)
            })
            .collect();
        if !blocking.is_empty() {
            return Err(Error::CheckFailed { step: step.name.clone(), message: blocking.join("\n") });
        }
        for r in results.iter().filter(|r| !r.passed) {
            log(
                Level::INFO,
                &format!(
                    "weir: check `{}` on `{}` ({}) failed: {}; allowed {}",
                    r.check,
                    r.step,
                    r.severity.as_str(),
                    r.observed,
                    r.threshold
                ),
            );
        }
    }
    let summary = StepSummary {
        copied_columns,
        copied_row_groups,
        rows_quarantined,
        checks: results,
        name: step.name.clone(),
        input: step.input.clone(),
        files,
        rows_read: rows_read.load(Ordering::Relaxed),
        rows_skipped,
        skipped,
        rows_written: rows_written.load(Ordering::Relaxed),
        output: step.output.as_ref().map(|o| o.path.clone()),
        partitions: partitions.clone(),
        counters: counters.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        seconds: started.elapsed().as_secs_f64(),
        timings: StepTimings {
            read: read_secs,
            plugins: plugin_timings.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            checks: check_secs,
            write: write_secs,
        },
    };
    // The step is complete: a resumed run reuses its staging as it is.
    checkpoints.store.save_checkpoint(
        checkpoints.run_id,
        &Checkpoint {
            step: step.name.clone(),
            complete: true,
            rows_read: summary.rows_read,
            rows_written: summary.rows_written,
            rows_skipped,
            schema: schema_ipc,
            files: partitions.clone(),
            ..Default::default()
        },
    )?;
    let staged =
        Staged { step: step.name.clone(), staging, schema, output: step.output.clone(), partitions, quarantine };
    Ok((summary, staged))
}

/// What the dataset-level checks compare against: the previous successful run, the metric
/// history and the run's logical time.
fn check_history(pipeline: &Pipeline, step: &Step, store: &dyn RunStore, partition: Option<&str>) -> Result<History> {
    let previous =
        store.runs(&RunFilter { pipeline: Some(pipeline.name.clone()), status: Some(Status::Success), limit: 1 })?;
    let previous_rows =
        previous.first().and_then(|r| r.steps.iter().find(|s| s.step == step.name)).map(|s| s.rows_written);
    let mut metrics = HashMap::new();
    for c in &step.checks {
        if let Kind::Anomaly { runs, .. } = &c.kind {
            let past = store.metric_history(&pipeline.name, &step.name, &c.name, *runs)?;
            metrics.insert(
                c.name.clone(),
                past.iter().filter_map(|o| o.split_whitespace().next()?.parse().ok()).collect(),
            );
        }
    }
    // a date partition's logical time is the end of that day; otherwise now
    let logical_time = partition
        .and_then(|p| {
            use arrow_cast::parse::Parser;
            (p.len() == 10).then(|| arrow_array::types::Date32Type::parse(p)).flatten()
        })
        .map(|days| (days as i64 + 1) * 86_400)
        .unwrap_or_else(|| crate::store::now_ms() / 1000);
    Ok(History { previous_rows, metrics, logical_time })
}

/// The error to report: a plugin stage's error beats the "channel closed" symptoms it causes.
fn first_error(e: Error, errors: &Mutex<Vec<Error>>) -> Error {
    let mut errs = errors.lock().unwrap_or_else(|e| e.into_inner());
    if errs.is_empty() {
        e
    } else {
        errs.remove(0)
    }
}

#[allow(clippy::too_many_arguments)]
/// What a plugin stage reports into.
struct Stage<'a> {
    failure: &'a dyn Fn(Option<u64>, String) -> Error,
    counters: &'a Mutex<BTreeMap<String, BTreeMap<String, i64>>>,
    timings: &'a Mutex<Vec<PluginTimings>>,
    /// The transform's position in the step.
    index: usize,
    name: &'a str,
}

fn plugin_stage(
    mut inst: TransformInstance,
    input: Receiver<Msg>,
    output: SyncSender<Msg>,
    cancel: &AtomicBool,
    stage: Stage<'_>,
    first_batch: u64,
) -> StageResult {
    let Stage { failure, counters, timings, index, name } = stage;
    let mut batch_no = first_batch;
    let mut rows_before = 0u64;
    let result = (|| loop {
        match input.recv() {
            Ok(Msg::Batch(b)) => {
                batch_no += 1;
                if cancel.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                let out = inst.process(&b).map_err(|e| failure(Some(batch_no), describe_call_error(e, rows_before)))?;
                rows_before += b.num_rows() as u64;
                for o in out {
                    if output.send(Msg::Batch(o)).is_err() {
                        return Ok(false);
                    }
                }
            }
            Ok(Msg::Copy(group)) => {
                if output.send(Msg::Copy(group)).is_err() {
                    return Ok(false);
                }
            }
            Ok(Msg::Checkpoint(mut mark)) => {
                let state = inst.snapshot().map_err(|e| failure(None, format!("checkpoint snapshot failed: {e}")))?;
                mark.states.push(state);
                if output.send(Msg::Checkpoint(mark)).is_err() {
                    return Ok(false);
                }
            }
            Ok(Msg::End) => {
                let out = inst.finish().map_err(|e| failure(None, format!("finish failed: {e}")))?;
                for o in out {
                    if output.send(Msg::Batch(o)).is_err() {
                        return Ok(false);
                    }
                }
                let _ = output.send(Msg::End);
                return Ok(true);
            }
            Err(_) => return Ok(false),
        }
    })();
    if let Some(t) = timings.lock().unwrap_or_else(|e| e.into_inner()).get_mut(index) {
        t.calls.add(&inst.timings());
    }
    let mut c = counters.lock().unwrap_or_else(|e| e.into_inner());
    let entry = c.entry(name.to_string()).or_default();
    for (k, v) in inst.counters() {
        *entry.entry(k.clone()).or_insert(0) += v;
    }
    result.map(|_| ())
}

/// An invalid-input error also names the row within the step's whole input. Row values
/// are not printed: they may be the very PII the step exists to mask.
fn describe_call_error(e: CallError, rows_before: u64) -> String {
    if let CallError::InvalidInput { row: Some(row), .. } = &e {
        return format!("{e} (row {} of the step's input)", rows_before + row + 1);
    }
    e.to_string()
}
