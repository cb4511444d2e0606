//! One attempt of one step, top to bottom: open its input, start its transforms, open its
//! sink, wire its checks, let the batches flow ([`super::flow`]), gate on the checks, and
//! record the step complete.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arrow_schema::SchemaRef;

use super::flow::{self, Flow, Flowed};
use super::quality::{Audited, Quality};
use super::{plugin_level, RunOptions, Staged, StepSummary, StepTimings};
use crate::config::{Pipeline, Step};
use crate::io::sink::{self, Sink};
use crate::io::source::{self as sources, CopyColumn, Source};
use crate::plugin::{CallError, LoadedPlugin, LogLine, LogSink, TransformInstance};
use crate::store::{Checkpoint, RunStore};
use crate::{Error, Result};

use tracing::Level;

/// What every part of a step's attempt shares.
pub(super) struct StepCtx<'a> {
    pub pipeline: &'a Pipeline,
    pub step: &'a Step,
    pub options: &'a RunOptions,
    /// Every plugin the pipeline uses, compiled.
    pub loaded: &'a HashMap<String, LoadedPlugin>,
    /// Resolved secrets, granted per plugin.
    pub secrets: &'a HashMap<String, Vec<u8>>,
    /// The outputs of the steps before this one.
    pub staged: &'a HashMap<String, Staged>,
    pub store: &'a dyn RunStore,
    pub run_id: i64,
}

impl StepCtx<'_> {
    pub(super) fn log(&self, level: Level, line: &str) {
        (self.options.log)(level, line)
    }

    /// What a plugin is told about where it runs.
    pub fn plugin_context(&self, plugin: &str) -> weir_sdk::Context {
        weir_sdk::Context {
            pipeline: self.pipeline.name.clone(),
            step: self.step.name.clone(),
            plugin: plugin.to_string(),
            partition: self.options.partition.clone(),
        }
    }

    /// A plugin refused its `config` table (declared at `line` of the pipeline file).
    pub fn plugin_config_error(&self, line: usize, plugin: &str, message: String) -> Error {
        Error::PluginConfig {
            file: self.pipeline.file.clone(),
            line,
            step: self.step.name.clone(),
            plugin: plugin.to_string(),
            message,
        }
    }

    fn plugin_failure(&self, plugin: &str, cause: String) -> Error {
        Error::Plugin(crate::PluginFailure {
            pipeline: self.pipeline.name.clone(),
            step: self.step.name.clone(),
            plugin: plugin.to_string(),
            batch: None,
            cause,
            kill: None,
        })
    }
}

/// Where a plugin's log lines go, prefixed with the step and plugin: the plugin's own lines
/// to the plugins' log, weir's notes about it to weir's.
pub(super) fn plugin_log(ctx: &StepCtx<'_>, plugin: &str) -> LogSink {
    let prefix = format!("[{}/{plugin}]", ctx.step.name);
    let (own, notes) = (ctx.options.plugin_log.clone(), ctx.options.log.clone());
    Arc::new(move |l: &LogLine| {
        let log = if l.own { &own } else { &notes };
        log(plugin_level(l.level), &format!("{prefix} {}: {}", l.level, l.message))
    })
}

/// How errors name a step's transform: `mask (transform 2 of 3)`.
pub(super) fn transform_label(step: &Step, index: usize) -> String {
    format!("{} (transform {} of {})", step.transforms[index].plugin, index + 1, step.transforms.len())
}

/// Run one attempt of a step into `staging`, continuing from `resume` if given.
pub(super) fn run_step(
    ctx: &StepCtx<'_>,
    staging: PathBuf,
    resume: Option<&Checkpoint>,
) -> Result<(StepSummary, Staged)> {
    let started = Instant::now();
    let (mut source, watermark_start) = open_input(ctx)?;
    let inputs = source.inputs();
    let state_dir = super::staging::state_staging(&staging);
    let (transforms, schema) = start_transforms(ctx, source.schema(), resume, &state_dir)?;
    check_publishable(ctx, &schema)?;
    let sink_schema = super::merge::staged_schema(ctx.step.output.as_ref(), &schema)
        .map_err(|message| Error::Output { step: ctx.step.name.clone(), message })?;
    let mut sink = sink::open(ctx.step.output.as_ref(), &staging, sink_schema)?;
    if let Some(c) = resume {
        sink.resume(&c.sink, c.rows_written)?;
    }
    let copied_columns = plan_copy(ctx, &transforms, source.as_mut(), sink.as_ref());
    // (after the copy plan: the file the run resumes in may copy columns too)
    if let Some(c) = resume {
        seek(ctx, source.as_mut(), c)?;
    }
    let schema_ipc = weir_sdk::ipc::encode_schema(&schema).map_err(|e| Error::Internal(e.to_string()))?;
    let mut quality = Quality::open(ctx, &schema, &staging)?;
    // a step with checks only checkpoints when complete (check state is not part of
    // checkpoints); so does an append or merge (folding the published data in rewrites
    // staged files: a resumed run must not find them half done)
    let folds = ctx.step.output.as_ref().is_some_and(|o| o.folds_published() || o.merges_table());
    let every = if ctx.step.checks.is_empty() && !folds { ctx.pipeline.checkpoint_every } else { 0 };
    let flow = Flow {
        source,
        transforms,
        sink,
        quality: quality.as_mut(),
        base: resume.cloned().unwrap_or_default(),
        every,
        schema_ipc: schema_ipc.clone(),
    };
    let flowed = flow::run(ctx, flow, started)?;
    report_skipped(ctx, &flowed);
    let (audited, rows_quarantined) = match quality {
        Some(q) => {
            let rows = q.rows_quarantined;
            (q.gate(ctx)?, rows)
        }
        None => (Audited { results: Vec::new(), quarantine: None }, 0),
    };
    let new_watermark = flowed.high_watermark.clone();
    let mut summary = summarize(ctx, flowed, audited.results, copied_columns, rows_quarantined, inputs, started);
    // a partition run (a backfill's too) reads its partition whole and moves no watermark:
    // the watermark is the progress of the runs without --partition, and one partition's
    // run must not make the next partition's skip rows
    let incremental = ctx.pipeline.sources.get(&ctx.step.input).is_some_and(|s| s.incremental.is_some());
    if incremental && ctx.options.partition.is_some() {
        ctx.log(
            Level::INFO,
            &format!(
                "weir: step `{}`: source `{}` is incremental; a --partition run reads the partition whole and leaves its watermark as it is",
                ctx.step.name, ctx.step.input
            ),
        );
    }
    if let (true, None, Some(end)) = (incremental, ctx.options.partition.as_ref(), new_watermark) {
        summary.watermark =
            Some(crate::store::WatermarkUpdate { source: ctx.step.input.clone(), start: watermark_start, end });
    }
    fold_published(ctx, &staging, &summary.partitions)?;
    // The step is complete: a resumed run reuses its staging as it is.
    let complete = Checkpoint {
        step: ctx.step.name.clone(),
        complete: true,
        rows_read: summary.rows_read,
        rows_written: summary.rows_written,
        rows_skipped: summary.rows_skipped,
        schema: schema_ipc,
        partitions: summary.partitions.clone(),
        ..Default::default()
    };
    ctx.store.save_checkpoint(ctx.run_id, &complete)?;
    // the plugins' keyed state went into the output: a resumed run reuses the output
    let _ = std::fs::remove_dir_all(&state_dir);
    let staged = Staged {
        step: ctx.step.name.clone(),
        staging,
        schema,
        output: ctx.step.output.clone(),
        partitions: summary.partitions.clone(),
        quarantine: audited.quarantine,
    };
    Ok((summary, staged))
}

/// `append` and `merge` outputs: complete the staging with the published data (see
/// [`super::merge`]), per partition in a partition run of a partitioned output; a merge into
/// a Delta table reads the table's latest version.
fn fold_published(ctx: &StepCtx<'_>, staging: &std::path::Path, partitions: &[String]) -> Result<()> {
    let Some(out) = ctx.step.output.as_ref().filter(|o| o.folds_published() || o.merges_table()) else {
        return Ok(());
    };
    let fail = |message: String| Error::Publish { step: ctx.step.name.clone(), message };
    let total = if out.merges_table() {
        super::merge::reduce_for_table(staging, out).map_err(fail)?
    } else {
        let units: Vec<(PathBuf, PathBuf)> = if out.partition_by.is_some() && ctx.options.partition.is_some() {
            partitions.iter().map(|p| (staging.join(p), out.path.join(p))).collect()
        } else {
            vec![(staging.to_path_buf(), out.path.clone())]
        };
        let mut total = super::merge::Folded::default();
        for (staged, target) in units {
            total += super::merge::fold(&staged, &target, out).map_err(fail)?;
        }
        total
    };
    let message = if out.merges_table() {
        // the table's rows are folded in at the commit, on the version it commits over
        format!(
            "weir: step `{}` merges by key: {} delete markers, {} of the run's rows superseded by a later one; \
             the table's files holding the run's keys are rewritten at the commit",
            ctx.step.name, total.deleted, total.superseded
        )
    } else {
        format!(
            "weir: step `{}` {}: {} published files kept, {} rewritten; {} published rows replaced or deleted, {} delete markers, {} of the run's rows superseded by a later one, {} older than the published row or delete of their key",
            ctx.step.name,
            if out.mode == crate::config::OutputMode::Merge { "merges by key" } else { "appends" },
            total.linked,
            total.rewritten,
            total.replaced,
            total.deleted,
            total.superseded,
            total.outdated
        )
    };
    ctx.log(Level::INFO, &message);
    Ok(())
}

/// Where an incremental source reads from: the committed watermark less the overlap (none
/// on a first run, with `--full-refresh`, or in a `--partition` run), as the source takes it.
fn read_from(ctx: &StepCtx<'_>, source: &crate::config::Source) -> Result<Option<String>> {
    let Some(inc) = &source.incremental else { return Ok(None) };
    if ctx.options.full_refresh || ctx.options.partition.is_some() {
        return Ok(None);
    }
    let committed = ctx.store.watermarks(&ctx.pipeline.name)?.into_iter().find(|w| w.source == source.name);
    let Some(committed) = committed else { return Ok(None) };
    Ok(Some(match sources::parse_micros(&committed.value) {
        Some(us) => sources::format_micros(us.saturating_sub(inc.overlap.as_micros() as i64)),
        // not a time: an extractor's own watermark, handed over as it is
        None if source.extractor.is_some() => committed.value,
        None => {
            return Err(Error::Io(crate::io::Error::SourceInvalid {
                source_name: source.name.clone(),
                message: format!(
                    "its committed watermark `{}` is not a time; set one with `weir watermarks PIPELINE set {} 2024-01-01T00:00:00Z`, or `weir watermarks PIPELINE reset {}`",
                    committed.value, source.name, source.name
                ),
            }))
        }
    }))
}

/// The step's input: a configured source, or the staged output of an earlier step; and,
/// for an incremental source, where its read starts.
fn open_input(ctx: &StepCtx<'_>) -> Result<(Box<dyn Source>, Option<String>)> {
    let (pipeline, step) = (ctx.pipeline, ctx.step);
    if let Some(source) = pipeline.sources.get(&step.input) {
        let from = read_from(ctx, source)?;
        if let Some(x) = &source.extractor {
            let setup = sources::ExtractorSetup {
                plugin: ctx.loaded[&x.plugin].clone(),
                limits: pipeline.plugins[&x.plugin].limits(),
                log: plugin_log(ctx, &x.plugin),
                context: ctx.plugin_context(&x.plugin),
                watermark: from.clone(),
            };
            let opened = Box::new(sources::ExtractorSource::open(&source.name, &x.config_json, setup)?);
            return Ok((super::contract::apply(ctx, source, opened)?, from));
        }
        // a partition run reads its partition whole (see `read_from`)
        let increment =
            source.incremental.as_ref().filter(|_| ctx.options.partition.is_none()).map(|_| sources::Increment {
                lower: from.as_deref().and_then(sources::parse_micros),
                // fixed when the run reads: rows changed later are the next run's
                upper: crate::store::now_ms().saturating_mul(1000),
            });
        let opened = sources::open(source, ctx.options.partition.as_deref(), pipeline.batch_size, increment)?;
        return Ok((super::contract::apply(ctx, source, opened)?, from));
    }
    let up = ctx
        .staged
        .get(&step.input)
        .ok_or_else(|| Error::Internal(format!("step `{}` runs before its input `{}`", step.name, step.input)))?;
    let partition_col = up.output.as_ref().and_then(|o| o.partition_by.as_deref());
    Ok((sources::open_dataset(&up.staging, up.schema.clone(), partition_col, pipeline.batch_size)?, None))
}

/// The step's transforms, created and initialised in order, each declaring the schema the
/// next one receives; on resume each gets its checkpointed state back. Returns them with
/// the step's output schema.
fn start_transforms(
    ctx: &StepCtx<'_>,
    input: SchemaRef,
    resume: Option<&Checkpoint>,
    state_dir: &std::path::Path,
) -> Result<(Vec<(usize, TransformInstance)>, SchemaRef)> {
    let mut schema = input;
    let mut instances = Vec::new();
    for (i, t) in ctx.step.transforms.iter().enumerate() {
        let p = &ctx.pipeline.plugins[&t.plugin];
        let granted: HashMap<String, Vec<u8>> =
            p.secrets.iter().filter_map(|s| ctx.secrets.get(s).map(|v| (s.clone(), v.clone()))).collect();
        let fail = |cause: String| ctx.plugin_failure(&t.plugin, cause);
        let mut inst =
            TransformInstance::new(&ctx.loaded[&t.plugin], p.limits(), Arc::new(granted), plugin_log(ctx, &t.plugin))
                .map_err(|e| fail(e.to_string()))?;
        let checkpoint = resume.and_then(|c| c.states.get(i)).and_then(|s| s.as_deref());
        let own = inst
            .use_state_dir(state_dir.join(i.to_string()), checkpoint)
            .map_err(|e| fail(format!("restoring its checkpoint state failed: {e}")))?;
        schema = inst.init(&t.config_json, &schema, &ctx.plugin_context(&t.plugin)).map_err(|e| match e {
            CallError::InvalidConfig(m) => ctx.plugin_config_error(t.line, &t.plugin, m),
            other => fail(format!("init failed: {other}")),
        })?;
        if let Some(state) = own {
            inst.restore(&state).map_err(|e| fail(format!("restoring its checkpoint state failed: {e}")))?;
        }
        instances.push((i, inst));
    }
    Ok((instances, schema))
}

/// Refuse, before any batch is read, an output schema the sink cannot write faithfully:
/// the last transform's fault if it declared it, else the step's.
fn check_publishable(ctx: &StepCtx<'_>, schema: &SchemaRef) -> Result<()> {
    let Some(out) = &ctx.step.output else { return Ok(()) };
    let checked = sink::check_output_schema(schema, out.partition_by.as_deref()).and_then(|()| match out.format {
        crate::config::OutputFormat::Delta => crate::io::delta::check_schema(schema, out.partition_by.as_deref()),
        crate::config::OutputFormat::Parquet => Ok(()),
    });
    // a table or folder on object storage is reached before any row is read
    if let (Ok(()), Some(remote)) = (&checked, &out.remote) {
        let reached = match out.format {
            crate::config::OutputFormat::Delta => {
                crate::io::delta::Table::open(&out.path, Some(remote)).and_then(|t| t.exists())
            }
            crate::config::OutputFormat::Parquet => crate::io::s3_dataset::pointer(remote).map(|p| p.is_some()),
        };
        reached.map_err(|message| Error::Output { step: ctx.step.name.clone(), message })?;
    }
    checked.map_err(|m| match ctx.step.transforms.last() {
        Some(t) => ctx.plugin_failure(&t.plugin, format!("init declared an output schema weir cannot publish: {m}")),
        None => Error::Output { step: ctx.step.name.clone(), message: m },
    })
}

/// The columns of a step's output copied as they are from its input's pages, where the
/// source and sink both offer it: those no transform touches, when every transform declared
/// a column rewrite (rows are then neither added, dropped nor reordered, and the other
/// columns never reach a sandbox), the step has no checks (they may read any column and
/// quarantine rows), and the output allows it (`copy_columns`). Returns their names.
fn plan_copy(
    ctx: &StepCtx<'_>,
    transforms: &[(usize, TransformInstance)],
    source: &mut dyn Source,
    sink: &dyn Sink,
) -> Vec<String> {
    let step = ctx.step;
    // an append or merge output rewrites what it folds in: nothing to gain, and a merge's
    // staged rows carry a column of their own
    let copyable = step
        .output
        .as_ref()
        .is_none_or(|o| o.copy_columns && !o.folds_published() && o.mode != crate::config::OutputMode::Merge);
    if transforms.is_empty() || !step.checks.is_empty() || !copyable {
        return Vec::new();
    }
    let mut touched = HashSet::new();
    for (_, inst) in transforms {
        let Some(columns) = inst.rewritten_columns() else { return Vec::new() };
        touched.extend(columns.iter().copied());
    }
    let columns: Vec<CopyColumn> = sink
        .copy_targets()
        .into_iter()
        .enumerate()
        .filter(|(position, _)| !touched.contains(position))
        .filter_map(|(position, descr)| descr.map(|descr| CopyColumn { position, descr }))
        .collect();
    if columns.is_empty() {
        return Vec::new();
    }
    let codec = step.output.as_ref().map(|o| o.compression).unwrap_or_default().parquet();
    let schema = source.schema();
    let names: Vec<String> =
        source.copy_columns(columns, codec).into_iter().map(|p| schema.field(p).name().clone()).collect();
    if !names.is_empty() {
        ctx.log(
            Level::INFO,
            &format!(
                "weir: step `{}` copies {} column(s) no plugin touches from the input's Parquet pages: {}",
                step.name,
                names.len(),
                names.join(", ")
            ),
        );
    }
    names
}

/// Continue the source where the checkpoint left it.
fn seek(ctx: &StepCtx<'_>, source: &mut dyn Source, c: &Checkpoint) -> Result<()> {
    if c.source.is_null() {
        return Err(Error::Resume(format!(
            "the checkpoint of step `{}` was written by an earlier weir that did not record its source's position; run without --resume",
            ctx.step.name
        )));
    }
    source.seek(&c.source)?;
    ctx.log(
        Level::INFO,
        &format!(
            "weir: step `{}` resumes after batch {} ({} rows already read and staged)",
            ctx.step.name, c.batches, c.rows_read
        ),
    );
    Ok(())
}

/// The first few skipped rows with their place, and how many more.
fn report_skipped(ctx: &StepCtx<'_>, flowed: &Flowed) {
    for s in flowed.skipped.iter().take(5) {
        ctx.log(Level::WARN, &format!("weir: skipped {}:{}: {}", s.file.display(), s.line, s.message));
    }
    if flowed.rows_skipped > 5 {
        ctx.log(Level::WARN, &format!("weir: … {} more rows skipped in {}", flowed.rows_skipped - 5, ctx.step.input));
    }
}

fn summarize(
    ctx: &StepCtx<'_>,
    flowed: Flowed,
    checks: Vec<crate::quality::CheckResult>,
    copied_columns: Vec<String>,
    rows_quarantined: u64,
    inputs: usize,
    started: Instant,
) -> StepSummary {
    StepSummary {
        name: ctx.step.name.clone(),
        input: ctx.step.input.clone(),
        files: inputs,
        rows_read: flowed.rows_read,
        rows_skipped: flowed.rows_skipped,
        skipped: flowed.skipped,
        rows_written: flowed.rows_written,
        bytes_written: 0,
        files_written: 0,
        attempts: 1,
        output: ctx.step.output.as_ref().map(|o| o.path.clone()),
        partitions: flowed.partitions,
        counters: flowed.counters,
        seconds: started.elapsed().as_secs_f64(),
        rows_quarantined,
        watermark: None,
        copied_columns,
        copied_row_groups: flowed.copied_row_groups,
        checks,
        timings: StepTimings {
            read: flowed.read_secs,
            plugins: flowed.plugins,
            checks: flowed.check_secs,
            write: flowed.write_secs,
        },
    }
}
