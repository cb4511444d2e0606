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
//! has succeeded are they published (see [`publish`]); on failure they are removed.

mod publish;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::config::{Pipeline, Step};
use crate::io::sink::ParquetSink;
use crate::io::source::{Skipped, SourceReader};
use crate::plugin::{CallError, Limits, LoadedPlugin, LogLine, LogSink, PluginEngine, TransformInstance};
use crate::{Error, Result};

pub use publish::publish_output;

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

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
    pub log: Arc<dyn Fn(&str) + Send + Sync>,
    /// Called about every 200 ms with the live counters, for a progress display.
    pub progress: Option<ProgressFn>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            partition: None,
            cache_dir: PluginEngine::default_cache_dir(),
            log: Arc::new(|line| eprintln!("{line}")),
            progress: None,
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
    pub status: String,
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
}

/// A step's finished staging output, ready to publish.
struct Staged {
    step: String,
    staging: PathBuf,
    schema: SchemaRef,
    output: Option<crate::config::Output>,
    partitions: Vec<String>,
}

/// Removes what a run staged, and the output folders it had to create, when dropped. On
/// success the staging directories have been moved away by publish, so only leftovers go.
#[derive(Default)]
struct StagingGuard {
    staging: Vec<PathBuf>,
    created_parents: Vec<PathBuf>,
}

impl StagingGuard {
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

/// Run a validated pipeline once.
pub fn run(pipeline: &Pipeline, options: &RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    let run_id = format!("{}-{}", std::process::id(), started.elapsed().as_nanos() ^ now_nanos());
    let log = options.log.clone();

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
            let bytes = secret.resolve().map_err(|message| Error::Secret {
                name: s.clone(),
                message,
            })?;
            resolved.insert(s.clone(), bytes);
        }
    }

    // Plugins: compiled (or loaded from cache) once each.
    let used: Vec<&String> = {
        let mut v: Vec<&String> = pipeline
            .steps
            .iter()
            .flat_map(|s| s.transforms.iter().map(|t| &t.plugin))
            .collect();
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
            .map_err(|e| Error::PluginLoad {
                plugin: name.clone(),
                message: e.to_string(),
            })?;
        log(&format!(
            "weir: plugin `{name}` ready ({} contract {}, sha256 {}…, {:.0} ms)",
            lp.info.world.as_deref().unwrap_or("?"),
            lp.info.contract_version.as_deref().unwrap_or("?"),
            &lp.info.sha256[..12],
            t.elapsed().as_secs_f64() * 1000.0
        ));
        loaded.insert(name.clone(), lp);
    }

    let mut guard = StagingGuard::default();
    let mut staged: HashMap<String, Staged> = HashMap::new();
    let mut summaries = Vec::new();
    for step in &pipeline.steps {
        let staging = staging_dir(pipeline, step, &run_id);
        guard.add(&staging);
        let (summary, s) = run_step(pipeline, step, options, &loaded, &resolved, &staged, staging)?;
        summaries.push(summary);
        staged.insert(step.name.clone(), s);
    }

    // Publish: every step succeeded.
    for step in &pipeline.steps {
        let s = &staged[&step.name];
        if let Some(out) = &s.output {
            let published = publish_output(
                &s.staging,
                &out.path,
                out.partition_by.is_some(),
                options.partition.is_some(),
                &s.partitions,
            )
            .map_err(|e| Error::Publish {
                step: s.step.clone(),
                message: e,
            })?;
            let _ = s.schema.clone();
            if let Some(summary) = summaries.iter_mut().find(|x: &&mut StepSummary| x.name == step.name) {
                summary.partitions = published;
            }
        }
    }
    drop(guard);
    Ok(RunSummary {
        pipeline: pipeline.name.clone(),
        partition: options.partition.clone(),
        status: "SUCCESS".into(),
        seconds: started.elapsed().as_secs_f64(),
        steps: summaries,
    })
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn staging_dir(pipeline: &Pipeline, step: &Step, run_id: &str) -> PathBuf {
    match &step.output {
        Some(o) => {
            let name = o
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| step.name.clone());
            o.path.with_file_name(format!(".{name}.weir-staging-{run_id}"))
        }
        None => pipeline
            .file
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!(".weir-staging-{}-{run_id}", step.name)),
    }
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

enum Msg {
    Batch(RecordBatch),
    End,
}

type StageResult = std::result::Result<(), Error>;

#[allow(clippy::too_many_arguments)]
fn run_step(
    pipeline: &Pipeline,
    step: &Step,
    options: &RunOptions,
    loaded: &HashMap<String, LoadedPlugin>,
    secrets: &HashMap<String, Vec<u8>>,
    staged: &HashMap<String, Staged>,
    staging: PathBuf,
) -> Result<(StepSummary, Staged)> {
    let started = Instant::now();
    let log = options.log.clone();

    // The input.
    let reader = if let Some(source) = pipeline.sources.get(&step.input) {
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
    // one receives.
    let mut schema = reader.schema();
    let mut instances = Vec::new();
    for (i, t) in step.transforms.iter().enumerate() {
        let p = &pipeline.plugins[&t.plugin];
        let granted: HashMap<String, Vec<u8>> = p
            .secrets
            .iter()
            .filter_map(|s| secrets.get(s).map(|v| (s.clone(), v.clone())))
            .collect();
        let prefix = format!("[{}/{}]", step.name, t.plugin);
        let plog = log.clone();
        let sink: LogSink = Arc::new(move |l: &LogLine| plog(&format!("{prefix} {}: {}", l.level, l.message)));
        let limits = Limits {
            memory_bytes: p.memory_bytes,
            timeout: p.timeout,
            ..Limits::default()
        };
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
        instances.push((i, t.plugin.clone(), inst));
    }

    let sink = ParquetSink::new(
        &staging,
        schema.clone(),
        step.output.as_ref().and_then(|o| o.partition_by.as_deref()),
        step.output.as_ref().map(|o| o.row_group_size).unwrap_or(1 << 20),
    )?;

    let rows_read = Arc::new(AtomicU64::new(0));
    let rows_written = Arc::new(AtomicU64::new(0));
    let cancel = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<Error>>> = Arc::default();
    let cap = pipeline.channel_capacity;
    let counters: Arc<Mutex<BTreeMap<String, BTreeMap<String, i64>>>> = Arc::default();

    let (mut reader_stats, partitions) = std::thread::scope(|scope| -> Result<(Option<ReaderStats>, Vec<String>)> {
        // reader
        let (tx, mut rx) = sync_channel::<Msg>(cap);
        let rr = rows_read.clone();
        let cancel_r = cancel.clone();
        let reader_handle = scope.spawn(move || -> std::result::Result<ReaderStats, Error> {
            let mut reader = reader;
            for batch in reader.by_ref() {
                if cancel_r.load(Ordering::Relaxed) {
                    return Ok((0, Vec::new()));
                }
                let batch = batch?;
                rr.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                if tx.send(Msg::Batch(batch)).is_err() {
                    return Ok((0, Vec::new())); // downstream stopped; it reports why
                }
            }
            let _ = tx.send(Msg::End);
            Ok((reader.total_skipped(), reader.skipped.clone()))
        });

        // plugin stages
        for (index, plugin, inst) in instances {
            let (tx, next_rx) = sync_channel::<Msg>(cap);
            let input = std::mem::replace(&mut rx, next_rx);
            let errors = errors.clone();
            let counters = counters.clone();
            let cancel = cancel.clone();
            let failure = move |batch: Option<u64>, cause: String| {
                Error::Plugin(crate::PluginFailure {
                    pipeline: pipeline.name.clone(),
                    step: step.name.clone(),
                    plugin: format!("{plugin} (transform {} of {})", index + 1, step.transforms.len()),
                    batch,
                    cause,
                })
            };
            let name = step.transforms[index].plugin.clone();
            scope.spawn(move || {
                let result = plugin_stage(inst, input, tx, &cancel, &failure, &counters, &name);
                if let Err(e) = result {
                    cancel.store(true, Ordering::Relaxed);
                    errors.lock().unwrap_or_else(|e| e.into_inner()).push(e);
                }
            });
        }

        // progress
        let done = Arc::new(AtomicBool::new(false));
        let progress_handle = options.progress.clone().map(|cb| {
            let (rr, rw, done, name) = (rows_read.clone(), rows_written.clone(), done.clone(), step.name.clone());
            scope.spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    cb(&Progress {
                        step: name.clone(),
                        rows_read: rr.load(Ordering::Relaxed),
                        rows_written: rw.load(Ordering::Relaxed),
                        elapsed: started.elapsed(),
                    });
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        });

        // writer (this thread)
        let mut sink = sink;
        let write_result = (|| -> Result<bool> {
            loop {
                match rx.recv() {
                    Ok(Msg::Batch(b)) => {
                        sink.write(&b)?;
                        rows_written.fetch_add(b.num_rows() as u64, Ordering::Relaxed);
                    }
                    Ok(Msg::End) => return Ok(true),
                    Err(_) => return Ok(false), // upstream failed; its error is recorded
                }
            }
        })();
        let write_result = match write_result {
            Ok(true) => sink.finish().map(Some).map_err(Error::from),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        };
        if write_result.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        drop(rx);
        let reader_result = reader_handle
            .join()
            .map_err(|_| Error::Internal("the reader thread panicked".into()))?;
        done.store(true, Ordering::Relaxed);
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
        log(&format!("weir: skipped {}:{}: {}", s.file.display(), s.line, s.message));
    }
    if rows_skipped > 5 {
        log(&format!(
            "weir: … {} more rows skipped in {}",
            rows_skipped - 5,
            step.input
        ));
    }
    let summary = StepSummary {
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
    };
    let staged = Staged {
        step: step.name.clone(),
        staging,
        schema,
        output: step.output.clone(),
        partitions,
    };
    Ok((summary, staged))
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

fn plugin_stage(
    mut inst: TransformInstance,
    input: Receiver<Msg>,
    output: SyncSender<Msg>,
    cancel: &AtomicBool,
    failure: &dyn Fn(Option<u64>, String) -> Error,
    counters: &Mutex<BTreeMap<String, BTreeMap<String, i64>>>,
    name: &str,
) -> StageResult {
    let mut batch_no = 0u64;
    let mut rows_before = 0u64;
    let result = (|| loop {
        match input.recv() {
            Ok(Msg::Batch(b)) => {
                batch_no += 1;
                if cancel.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                let out = inst
                    .process(&b)
                    .map_err(|e| failure(Some(batch_no), describe_call_error(e, rows_before)))?;
                rows_before += b.num_rows() as u64;
                for o in out {
                    if output.send(Msg::Batch(o)).is_err() {
                        return Ok(false);
                    }
                }
            }
            Ok(Msg::End) => {
                let out = inst
                    .finish()
                    .map_err(|e| failure(None, format!("finish failed: {e}")))?;
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
