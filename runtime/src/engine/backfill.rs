//! Backfills: one run per partition over a range, planned and persisted before work starts,
//! run up to N at a time, resumable.
//!
//! ```text
//! plan (partitions, PENDING) ──> worker picks a partition ──> RUNNING ──> engine::run
//!        persisted first                                      └─> SUCCESS | FAILED (error kept)
//! all done: SUCCESS, or PARTIAL when any partition failed (exit code 1)
//! resume: partitions not SUCCESS run again; --only-failed: just the FAILED ones
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{run, LogFn, RunOptions};
use crate::config::Pipeline;
use crate::store::{RunStore, Status};
use crate::{Error, Result};

/// Which partitions a backfill covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionSpec {
    /// Days `YYYY-MM-DD`, both ends included.
    Daily { from: String, to: String },
    /// Hours `YYYY-MM-DDTHH`, both ends included.
    Hourly { from: String, to: String },
    /// Any partition values, in order.
    List(Vec<String>),
}

const MAX_PARTITIONS: usize = 100_000;

pub(crate) fn days_of(date: &str) -> Option<i64> {
    use arrow_cast::parse::Parser;
    if date.len() != 10 {
        return None;
    }
    arrow_array::types::Date32Type::parse(date).map(i64::from)
}

impl PartitionSpec {
    /// The partitions, in order. Errors say what is wrong with the range.
    pub fn partitions(&self) -> std::result::Result<Vec<String>, String> {
        let out: Vec<String> = match self {
            PartitionSpec::List(v) => {
                if v.is_empty() {
                    return Err("--partitions lists no partition".into());
                }
                v.clone()
            }
            PartitionSpec::Daily { from, to } => {
                let a = days_of(from).ok_or_else(|| format!("--from {from:?} is not a date (YYYY-MM-DD)"))?;
                let b = days_of(to).ok_or_else(|| format!("--to {to:?} is not a date (YYYY-MM-DD)"))?;
                if b < a {
                    return Err(format!("--to {to} is before --from {from}"));
                }
                if (b - a) as usize >= MAX_PARTITIONS {
                    return Err(format!("{} days is more than a backfill runs ({MAX_PARTITIONS})", b - a + 1));
                }
                (a..=b).map(|d| crate::store::format_time(d * 86_400_000)[..10].to_string()).collect()
            }
            PartitionSpec::Hourly { from, to } => {
                let hour = |s: &str, flag: &str| -> std::result::Result<i64, String> {
                    let bad = || format!("{flag} {s:?} is not an hour (YYYY-MM-DDTHH)");
                    let (d, h) = s.split_once('T').ok_or_else(bad)?;
                    let h: i64 = h.parse().map_err(|_| bad())?;
                    if !(0..24).contains(&h) || h.to_string().len() > 2 {
                        return Err(bad());
                    }
                    Ok(days_of(d).ok_or_else(bad)? * 24 + h)
                };
                let (a, b) = (hour(from, "--from")?, hour(to, "--to")?);
                if b < a {
                    return Err(format!("--to {to} is before --from {from}"));
                }
                if (b - a) as usize >= MAX_PARTITIONS {
                    return Err(format!("{} hours is more than a backfill runs ({MAX_PARTITIONS})", b - a + 1));
                }
                (a..=b)
                    .map(|h| {
                        let t = crate::store::format_time(h * 3_600_000);
                        format!("{}T{}", &t[..10], &t[11..13])
                    })
                    .collect()
            }
        };
        Ok(out)
    }

    /// How the plan is described in the store and `weir backfills`.
    pub fn describe(&self) -> String {
        match self {
            PartitionSpec::Daily { from, to } => format!("{from}..{to} daily"),
            PartitionSpec::Hourly { from, to } => format!("{from}..{to} hourly"),
            PartitionSpec::List(v) => format!("list of {}", v.len()),
        }
    }
}

/// What a backfill did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackfillSummary {
    pub id: i64,
    pub status: Status,
    /// Partitions this invocation ran.
    pub ran: usize,
    pub succeeded: usize,
    /// Failed partitions with their errors.
    pub failed: Vec<(String, String)>,
    /// Partitions that succeeded with warnings (a `warn` check failed, or more rows were
    /// quarantined than a check tolerates), with the failed checks.
    pub warned: Vec<(String, Vec<String>)>,
    /// Partitions of the plan that were already done and not run again.
    pub already_done: usize,
}

/// Check that partitions can run independently: every output is partitioned and the input
/// depends on the partition.
pub fn check_backfillable(pipeline: &Pipeline) -> Result<()> {
    for s in &pipeline.steps {
        if let Some(o) = &s.output {
            if o.partition_by.is_none() {
                return Err(Error::Backfill(format!(
                    "step `{}` writes its whole dataset ({}) with no partition_by: each partition's run would replace it. \
                     Partition the output, or run the pipeline without a backfill",
                    s.name,
                    o.path.display()
                )));
            }
        }
    }
    if !pipeline.sources.values().any(crate::io::source::reads_partition) {
        return Err(Error::Backfill(
            "no source path uses {partition}: every partition would read the same input".into(),
        ));
    }
    Ok(())
}

/// Plan a new backfill, persist it, and run it.
pub fn start(
    pipeline: &Pipeline,
    spec: &PartitionSpec,
    parallel: usize,
    options: &RunOptions,
) -> Result<BackfillSummary> {
    let planned = create(pipeline, spec, parallel, options)?;
    run_planned(pipeline, planned, parallel, options)
}

/// A backfill persisted with every partition PENDING, not yet run.
pub struct Planned {
    pub id: i64,
    store: Arc<dyn RunStore>,
    partitions: Vec<String>,
}

/// Plan a new backfill and persist it (its id is known before any partition runs).
pub fn create(pipeline: &Pipeline, spec: &PartitionSpec, parallel: usize, options: &RunOptions) -> Result<Planned> {
    check_backfillable(pipeline)?;
    let partitions = spec.partitions().map_err(Error::Backfill)?;
    let store = super::open_store(pipeline, options)?;
    let id = store.create_backfill(&pipeline.name, &spec.describe(), parallel as u32, &partitions)?;
    (options.log)(
        super::Level::INFO,
        &format!("weir: backfill #{id}: {} partitions ({}), {parallel} at a time", partitions.len(), spec.describe()),
    );
    Ok(Planned { id, store, partitions })
}

/// Run a backfill [`create`] planned.
pub fn run_planned(
    pipeline: &Pipeline,
    planned: Planned,
    parallel: usize,
    options: &RunOptions,
) -> Result<BackfillSummary> {
    let Planned { id, store, partitions } = planned;
    execute(pipeline, store, id, partitions, 0, parallel, options)
}

/// Resume backfill `id`: run its partitions that are not SUCCESS (only the FAILED ones with
/// `only_failed`).
pub fn resume(
    pipeline: &Pipeline,
    id: i64,
    only_failed: bool,
    parallel: Option<usize>,
    options: &RunOptions,
) -> Result<BackfillSummary> {
    check_backfillable(pipeline)?;
    let store = super::open_store(pipeline, options)?;
    let b = store.backfill(id)?.ok_or_else(|| {
        let path = options.state.clone().unwrap_or_else(|| pipeline.state_path.clone());
        Error::Backfill(format!("no backfill #{id} in {}", path.display()))
    })?;
    if b.pipeline != pipeline.name {
        return Err(Error::Backfill(format!(
            "backfill #{id} belongs to pipeline `{}`, not `{}`",
            b.pipeline, pipeline.name
        )));
    }
    if b.status == Status::Running {
        return Err(Error::Backfill(format!(
            "backfill #{id} is still running (pid {} on {}); resume it once it has ended or been interrupted",
            b.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            b.host.as_deref().unwrap_or("?")
        )));
    }
    let todo: Vec<String> = b
        .partitions
        .iter()
        .filter(|p| if only_failed { p.status == "FAILED" } else { p.status != "SUCCESS" })
        .map(|p| p.partition.clone())
        .collect();
    let done = b.partitions.len() - todo.len();
    let parallel = parallel.unwrap_or(b.parallel as usize).max(1);
    (options.log)(
        super::Level::INFO,
        &format!(
            "weir: backfill #{id}: resuming {} of {} partitions{}",
            todo.len(),
            b.partitions.len(),
            if only_failed { " (only the failed ones)" } else { "" }
        ),
    );
    store.set_backfill_status(id, Status::Running)?;
    execute(pipeline, store, id, todo, done, parallel, options)
}

/// How one partition went: the warnings of a success, or the error.
type Outcome = std::result::Result<Vec<String>, String>;

fn execute(
    pipeline: &Pipeline,
    store: Arc<dyn RunStore>,
    id: i64,
    todo: Vec<String>,
    already_done: usize,
    parallel: usize,
    options: &RunOptions,
) -> Result<BackfillSummary> {
    store.backfill_heartbeat(id)?;
    let lineage = super::lineage::emitter(pipeline, &options.log)?;
    let lineage = lineage.map(|e| {
        let key = super::lineage::backfill_start(&e, pipeline, id);
        (e, key)
    });
    let lease = {
        let store = store.clone();
        super::Heartbeat::every(move || {
            let _ = store.backfill_heartbeat(id);
        })
    };
    let total = todo.len();
    let queue = Mutex::new(todo.into_iter().collect::<VecDeque<String>>());
    let results: Mutex<Vec<(String, Outcome)>> = Mutex::new(Vec::new());
    let log = options.log.clone();
    std::thread::scope(|scope| {
        for _ in 0..parallel.max(1).min(total.max(1)) {
            scope.spawn(|| loop {
                // cancelled (`weir serve`): the partitions not started stay PENDING for a resume
                if options.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
                    break;
                }
                let Some(p) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else { break };
                let _ = store.set_backfill_partition(id, &p, "RUNNING", None, None);
                let prefixed = |inner: &LogFn| -> LogFn {
                    let (prefix, inner) = (format!("[{p}] "), inner.clone());
                    Arc::new(move |level, l: &str| inner(level, &format!("{prefix}{l}")))
                };
                let opts = RunOptions {
                    partition: Some(p.clone()),
                    backfill_id: Some(id),
                    progress: None,
                    started: None,
                    log: prefixed(&log),
                    plugin_log: prefixed(&options.plugin_log),
                    ..options.clone()
                };
                let outcome = match run(pipeline, &opts) {
                    Ok(s) => {
                        let _ = store.set_backfill_partition(id, &p, "SUCCESS", s.run_id.or(s.identical_to), None);
                        Ok(s.steps
                            .iter()
                            .flat_map(|st| st.checks.iter())
                            .filter(|c| !c.passed)
                            .map(|c| {
                                format!("check `{}` on `{}` ({}): {}", c.check, c.step, c.severity.as_str(), c.observed)
                            })
                            .collect())
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        let _ = store.set_backfill_partition(id, &p, "FAILED", None, Some(&msg));
                        Err(msg)
                    }
                };
                let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
                r.push((p.clone(), outcome.clone()));
                let failed = r.iter().filter(|(_, o)| o.is_err()).count();
                log(
                    super::Level::INFO,
                    &format!(
                        "weir: backfill #{id}: {p} {} ({} done, {failed} failed, {} left)",
                        if outcome.is_ok() { "SUCCESS" } else { "FAILED" },
                        r.len() - failed,
                        total - r.len()
                    ),
                );
            });
        }
    });
    drop(lease);
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    // the whole plan decides the status, not only what this invocation ran
    let plan = store.backfill(id)?.map(|b| b.partitions).unwrap_or_default();
    let any_failed = plan.iter().any(|p| p.status != "SUCCESS");
    let status = if any_failed { Status::Partial } else { Status::Success };
    store.set_backfill_status(id, status)?;
    let failed: Vec<(String, String)> =
        results.iter().filter_map(|(p, o)| o.as_ref().err().map(|e| (p.clone(), e.clone()))).collect();
    if let Some((e, key)) = &lineage {
        let failed_names: Vec<&str> =
            plan.iter().filter(|p| p.status != "SUCCESS").map(|p| p.partition.as_str()).collect();
        let error = (!failed_names.is_empty()).then(|| format!("partitions not done: {}", failed_names.join(", ")));
        super::lineage::backfill_end(e, pipeline, id, *key, error.as_deref());
    }
    let mut warned: Vec<(String, Vec<String>)> = results
        .iter()
        .filter_map(|(p, o)| o.as_ref().ok().filter(|w| !w.is_empty()).map(|w| (p.clone(), w.clone())))
        .collect();
    warned.sort();
    Ok(BackfillSummary {
        id,
        status,
        ran: results.len(),
        succeeded: results.len() - failed.len(),
        failed,
        warned,
        already_done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_days_hours_and_lists() {
        let d = PartitionSpec::Daily { from: "2024-02-27".into(), to: "2024-03-02".into() }.partitions().unwrap();
        assert_eq!(d, ["2024-02-27", "2024-02-28", "2024-02-29", "2024-03-01", "2024-03-02"]);
        let h =
            PartitionSpec::Hourly { from: "2024-01-01T22".into(), to: "2024-01-02T01".into() }.partitions().unwrap();
        assert_eq!(h, ["2024-01-01T22", "2024-01-01T23", "2024-01-02T00", "2024-01-02T01"]);
        assert_eq!(PartitionSpec::List(vec!["eu".into(), "us".into()]).partitions().unwrap(), ["eu", "us"]);
        assert!(PartitionSpec::Daily { from: "2024-03-02".into(), to: "2024-03-01".into() }
            .partitions()
            .unwrap_err()
            .contains("before"));
        assert!(PartitionSpec::Daily { from: "2024-13-02".into(), to: "2024-03-01".into() }
            .partitions()
            .unwrap_err()
            .contains("not a date"));
        assert!(PartitionSpec::Hourly { from: "2024-01-01T25".into(), to: "2024-01-02T01".into() }
            .partitions()
            .is_err());
    }
}
