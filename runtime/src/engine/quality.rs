//! A step's quality wiring: its checks built (relationship targets read, rule plugins
//! started), applied to every batch on its way to the sink (failing rows to the quarantine
//! sink), and the gate at the end: every result recorded, a failed `block` check stops the
//! run before anything is published.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use arrow_array::{Array, RecordBatch};
use arrow_schema::SchemaRef;

use super::staging::quarantine_staging;
use super::step::{plugin_log, StepCtx};
use super::Staged;
use crate::config::{Pipeline, Step};
use crate::io::sink::{self, Sink};
use crate::io::source::{self as sources, Source};
use crate::plugin::{CallError, RuleInstance};
use crate::quality::{CheckResult, Checker, History, Kind, RelTarget, Severity};
use crate::store::{RunFilter, RunStore, Status};
use crate::{Error, Result};

/// A step's checks while it runs.
pub(super) struct Quality {
    checker: Checker,
    /// The quarantine sink and where it stages, when a check quarantines.
    quarantine: Option<(Box<dyn Sink>, PathBuf)>,
    pub rows_quarantined: u64,
}

/// What the gate let through.
pub(super) struct Audited {
    pub results: Vec<CheckResult>,
    /// The staged quarantine dataset, when rows were set aside.
    pub quarantine: Option<PathBuf>,
}

fn check_err(step: &Step, message: String) -> Error {
    Error::Check { step: step.name.clone(), message }
}

impl Quality {
    /// The step's checks over batches of `schema`, or none for a step without checks.
    pub fn open(ctx: &StepCtx<'_>, schema: &SchemaRef, staging: &std::path::Path) -> Result<Option<Quality>> {
        let step = ctx.step;
        if step.checks.is_empty() {
            return Ok(None);
        }
        let mut targets = HashMap::new();
        for (i, c) in step.checks.iter().enumerate() {
            if let Kind::Relationships { target, target_column, .. } = &c.kind {
                let values =
                    relationship_values(ctx.pipeline, ctx.staged, target, target_column).map_err(|e| match e {
                        Error::Check { message, .. } => check_err(step, format!("check `{}`: {message}", c.name)),
                        other => other,
                    })?;
                targets.insert(i, values);
            }
        }
        let checker = Checker::new(
            &step.name,
            step.checks.clone(),
            schema,
            targets,
            ctx.run_id,
            ctx.options.partition.as_deref(),
        )
        .map_err(|m| check_err(step, m))?
        .with_rules(start_rules(ctx, schema)?);
        let quarantine = if checker.quarantines() {
            let at = quarantine_staging(staging);
            Some((sink::open_quarantine(&at, checker.quarantine_schema())?, at))
        } else {
            None
        };
        Ok(Some(Quality { checker, quarantine, rows_quarantined: 0 }))
    }

    /// Check one batch: the rows that pass go on, those a `quarantine` check fails are
    /// written to the quarantine sink.
    pub fn apply(&mut self, step: &str, batch: &RecordBatch) -> Result<RecordBatch> {
        let (good, bad) =
            self.checker.apply(batch).map_err(|message| Error::Check { step: step.to_string(), message })?;
        if let (Some((q, _)), Some(bad)) = (self.quarantine.as_mut(), bad) {
            q.write(&bad)?;
            self.rows_quarantined += bad.num_rows() as u64;
        }
        Ok(good)
    }

    /// The gate: every result recorded; a failed `block` check fails the step (nothing is
    /// published); other failures are logged.
    pub fn gate(mut self, ctx: &StepCtx<'_>) -> Result<Audited> {
        let step = ctx.step;
        let partition = ctx.options.partition.as_deref();
        let history = check_history(ctx.pipeline, step, ctx.store, partition)?;
        let results = self.checker.finish(&history);
        ctx.store.record_checks(ctx.run_id, partition, &results)?;
        let quarantine = match self.quarantine.take() {
            Some((q, at)) => {
                q.finish()?;
                Some(at)
            }
            None => None,
        };
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
            (ctx.options.log)(
                tracing::Level::INFO,
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
        Ok(Audited { results, quarantine })
    }
}

/// One sandboxed instance per quality-rule plugin check, started on `schema`.
fn start_rules(ctx: &StepCtx<'_>, schema: &SchemaRef) -> Result<HashMap<usize, RuleInstance>> {
    let step = ctx.step;
    let mut rules = HashMap::new();
    for (i, c) in step.checks.iter().enumerate() {
        let Kind::Plugin { plugin, config_json } = &c.kind else { continue };
        let limits = ctx.pipeline.plugins[plugin].limits();
        let fail = |cause: String| check_err(step, format!("check `{}`: plugin `{plugin}` {cause}", c.name));
        let mut rule =
            RuleInstance::new(&ctx.loaded[plugin], limits, plugin_log(ctx, plugin)).map_err(|e| fail(e.to_string()))?;
        rule.init(config_json, schema, &ctx.plugin_context(plugin)).map_err(|e| match e {
            CallError::InvalidConfig(m) => ctx.plugin_config_error(c.line, plugin, m),
            other => fail(format!("failed to start: {other}")),
        })?;
        rules.insert(i, rule);
    }
    Ok(rules)
}

/// Every value of `column` in the dataset a `relationships` check points at.
fn relationship_values(
    pipeline: &Pipeline,
    staged: &HashMap<String, Staged>,
    target: &RelTarget,
    column: &str,
) -> Result<HashSet<String>> {
    let mut source: Box<dyn Source> = match target {
        RelTarget::Step(s) => {
            let up = staged.get(s).ok_or_else(|| Error::Check {
                step: s.clone(),
                message: format!("`relationships` refers to step `{s}`, which must run earlier in the pipeline"),
            })?;
            let partition_col = up.output.as_ref().and_then(|o| o.partition_by.as_deref());
            sources::open_dataset(&up.staging, up.schema.clone(), partition_col, pipeline.batch_size)?
        }
        RelTarget::Path(p) => sources::open_parquet(p, pipeline.batch_size)?,
    };
    let index = source.schema().index_of(column).map_err(|_| Error::Check {
        step: String::new(),
        message: format!("the `relationships` target has no column `{column}`"),
    })?;
    let mut values = HashSet::new();
    while let Some(batch) = source.next_batch() {
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
