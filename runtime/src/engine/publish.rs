//! Publishing staged output with one atomic switch per dataset or partition.
//!
//! ```text
//!   staging (complete, fsync'd)      target (what readers see)
//!        .x.weir-staging-7/   <══ renameat2(RENAME_EXCHANGE) ══>   x/
//!   afterwards the staging path holds the old data, which is then removed
//! ```
//!
//! A reader opening `x/...` sees either the old directory or the new one, never a mix and
//! never nothing. A run without `--partition` switches each dataset whole; a run with
//! `--partition` on a partitioned output switches each partition directory it wrote. If the
//! process dies after a switch but before the old data is removed, the old data sits at the
//! run's staging path, which crash recovery removes.
//!
//! On a filesystem without `RENAME_EXCHANGE` the switch falls back to two renames (the old
//! directory moved aside, then the new one in) and says so in the log.
//!
//! A run publishes all or nothing, across every dataset it writes:
//!
//! ```text
//!   every check passed
//!     -> plan: one PlannedSwitch per dataset, partition and quarantine directory,
//!        each with the staged directory's token (its inode) and the target's
//!     -> the run store records the decision               <- the commit point
//!     -> switch 1, record it; switch 2, record it; ...
//!     -> the run store records SUCCESS
//! ```
//!
//! A crash before the decision leaves every dataset as it was and the staging is removed.
//! A crash after it is rolled forward by whoever recovers the run ([`complete_switch`]):
//! the exchange carries the staged directory's inode to the target, so a switch made but
//! not yet recorded is recognised by its token and not made twice; a target that a later
//! run replaced since the decision is left alone (the switch is superseded).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{debug_pause, Level, Staged};
use crate::config::{Output, Pipeline};
use crate::io::sync_dir;
use crate::store::{PlannedSwitch, PublishEntry, RunStore};

/// What one switch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    Created,
    Replaced,
    /// Not made: a later run had replaced the target since the decision.
    Superseded,
    /// A Delta commit: the table version it made.
    Committed(u64),
}

impl Switch {
    /// As the run store records it (`weir runs show`).
    pub fn action(self) -> String {
        match self {
            Switch::Created => "created".into(),
            Switch::Replaced => "replaced".into(),
            Switch::Superseded => "superseded".into(),
            Switch::Committed(v) => format!("committed table version {v}"),
        }
    }
}

/// Atomically exchange two paths (both must exist).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both paths are valid NUL-terminated strings for the duration of the call.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Where the two-rename fallback keeps the replaced data until it is removed: beside the
/// staged directory, so recovery finds it from the staged path alone.
fn aside_path(staged: &Path) -> PathBuf {
    let mut name = staged.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".weir-old");
    staged.with_file_name(name)
}

/// A directory's identity, its inode, which a rename or exchange keeps.
pub fn dir_token(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir).ok().filter(|m| m.is_dir())?;
    Some(m.ino().to_string())
}

/// Whether two tokens name the same directory (an older `device:inode` token compares by
/// its inode).
fn same_dir(a: Option<&str>, b: &str) -> bool {
    let inode = |t: &str| t.rsplit(':').next().unwrap_or(t).to_string();
    a.is_some_and(|a| inode(a) == inode(b))
}

/// Make a decided switch whose outcome is unknown (its run crashed around it): if the
/// target already is the staged directory (same token) it was made, and the replaced data
/// left at the staged path is removed; if the staged directory is still there and the
/// target is still what the run decided to replace (`target_token`; none: no target), it
/// is switched now; if a later run replaced the target since, it is superseded and the
/// staged output removed. Returns the switch and whether this call made it.
pub fn complete_switch(
    staged: &Path,
    target: &Path,
    token: &str,
    target_token: Option<&str>,
    log: &dyn Fn(Level, &str),
) -> Result<(Switch, bool), String> {
    let made = if target_token.is_some() { Switch::Replaced } else { Switch::Created };
    if same_dir(dir_token(target).as_deref(), token) {
        for leftover in [staged.to_path_buf(), aside_path(staged)] {
            if leftover.exists() {
                std::fs::remove_dir_all(&leftover)
                    .map_err(|e| format!("switched, but cannot remove the old copy at {}: {e}", leftover.display()))?;
            }
        }
        return Ok((made, false));
    }
    if same_dir(dir_token(staged).as_deref(), token) {
        // a crash inside the two-rename fallback may have left the target moved aside
        let aside = aside_path(staged);
        if !target.exists() && aside.exists() {
            std::fs::rename(&aside, target)
                .map_err(|e| format!("cannot move {} back to {}: {e}", aside.display(), target.display()))?;
        }
        let now = dir_token(target);
        let as_decided = match target_token {
            Some(t) => same_dir(now.as_deref(), t),
            None => now.is_none(),
        };
        if !as_decided {
            std::fs::remove_dir_all(staged)
                .map_err(|e| format!("cannot remove the superseded output {}: {e}", staged.display()))?;
            return Ok((Switch::Superseded, false));
        }
        return switch_dir(staged, target, log).map(|s| (s, true));
    }
    Err(format!(
        "neither {} nor {} is the staged output this run decided to publish (directory {token}); \
         was one of them moved or removed by hand?",
        target.display(),
        staged.display()
    ))
}

/// Put the complete directory `new` at `target`, atomically. `new` is gone afterwards.
pub fn switch_dir(new: &Path, target: &Path, log: &dyn Fn(Level, &str)) -> Result<Switch, String> {
    let parent = target.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    sync_dir(new);
    if !target.exists() {
        std::fs::rename(new, target)
            .map_err(|e| format!("cannot move {} to {}: {e}", new.display(), target.display()))?;
        sync_dir(&parent);
        return Ok(Switch::Created);
    }
    match exchange(new, target) {
        Ok(()) => {
            sync_dir(&parent);
            // `new` now holds the previous data
            std::fs::remove_dir_all(new)
                .map_err(|e| format!("published, but cannot remove the old copy at {}: {e}", new.display()))?;
        }
        Err(e) => {
            log(
                super::Level::WARN,
                &format!(
                "weir: warning: atomic exchange unavailable on this filesystem ({e}); publishing {} with two renames",
                target.display()
            ),
            );
            let old = aside_path(new);
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(target, &old).map_err(|e| format!("cannot move {} aside: {e}", target.display()))?;
            if let Err(e) = std::fs::rename(new, target) {
                let _ = std::fs::rename(&old, target);
                return Err(format!("cannot move {} to {}: {e}", new.display(), target.display()));
            }
            sync_dir(&parent);
            let _ = std::fs::remove_dir_all(&old);
        }
    }
    Ok(Switch::Replaced)
}

/// The commit half of the sink protocol: how a step's staged output becomes what readers
/// see, and how a decided commit interrupted by a crash is completed. The engine records the
/// plan as the run's decision, then makes each switch and records it; recovery completes a
/// decided plan with [`Publisher::complete`]. A sink that commits otherwise (a table
/// format's transaction log, an object store) brings its own publisher, chosen by the
/// switches' `kind`.
pub(super) trait Publisher: Sync {
    /// The switches that publish one step's staged output, in the order they are made.
    fn plan(&self, staged: &Staged, run: &RunRef<'_>) -> Result<Vec<PlannedSwitch>, String>;

    /// Make one switch.
    fn switch(&self, sw: &PlannedSwitch, log: &dyn Fn(Level, &str)) -> Result<Switch, String>;

    /// Whether a planned switch has been made (whoever made it).
    fn made(&self, sw: &PlannedSwitch) -> bool;

    /// Settle a decided switch after a crash: made already, made now (`true`), or
    /// superseded by a later run.
    fn complete(&self, sw: &PlannedSwitch, log: &dyn Fn(Level, &str)) -> Result<(Switch, bool), String>;
}

/// The run a plan is made for.
pub(super) struct RunRef<'a> {
    pub id: i64,
    pub pipeline: &'a str,
    /// The run's `--partition`.
    pub partition: Option<&'a str>,
}

/// Local directories switched into place with `renameat2(RENAME_EXCHANGE)`: the Parquet
/// dataset (whole, or partition by partition in a `--partition` run or with
/// `mode = "overwrite_partitions"`) and its quarantine.
pub(super) struct LocalDirs;

/// Delta tables: one commit per step (see [`crate::io::delta`]); the quarantine stays a
/// local directory.
pub(super) struct DeltaTables;

/// The publisher of switches of `kind` (`dataset`, `partition` and `quarantine`: local
/// directories; `delta`: a table commit), as recovery finds them in a decision.
pub(super) fn publisher(kind: &str) -> &'static dyn Publisher {
    match kind {
        "delta" => &DeltaTables,
        "s3-parquet" => &S3Folders,
        _ => &LocalDirs,
    }
}

/// The publisher of a step's output.
fn publisher_for(output: &Output) -> &'static dyn Publisher {
    match (output.format, &output.remote) {
        (crate::config::OutputFormat::Delta, _) => &DeltaTables,
        (crate::config::OutputFormat::Parquet, Some(_)) => &S3Folders,
        (crate::config::OutputFormat::Parquet, None) => &LocalDirs,
    }
}

/// Parquet folders on object storage: the run's files uploaded under a prefix of their
/// own, then one conditional replacement of the dataset's pointer (see
/// [`crate::io::s3_dataset`]).
pub(super) struct S3Folders;

fn s3_spec(sw: &PlannedSwitch) -> Result<crate::io::s3_dataset::PublishSpec, String> {
    serde_json::from_str(&sw.token)
        .map_err(|e| format!("the decided publish of step `{}` cannot be read: {e}", sw.step))
}

impl Publisher for S3Folders {
    fn plan(&self, s: &Staged, run: &RunRef<'_>) -> Result<Vec<PlannedSwitch>, String> {
        use crate::io::delta::Mode;
        use crate::io::s3_dataset::PublishSpec;
        let Some(out) = &s.output else { return Ok(Vec::new()) };
        let Some(remote) = &out.remote else { return Err("internal error: an s3 folder without its URL".into()) };
        let mode = match publish_mode(out, run) {
            Mode::Merge => return Err("merge into a Parquet folder on object storage is not supported".into()),
            mode => mode,
        };
        let writer = writer_id(run, &s.step);
        let spec =
            PublishSpec { remote: remote.clone(), writer, run: run.id, mode, partition_by: out.partition_by.clone() };
        let existing = crate::io::s3_dataset::pointer(remote)?;
        if let Some(v) = existing.as_ref().and_then(|p| p.published.get(&spec.writer)).filter(|v| **v >= run.id) {
            return Err(format!(
                "{} already holds run #{v} of this step, and this is run #{}: it was written by runs of another run store; \
                 use the store that wrote it, or write elsewhere",
                remote.url, run.id
            ));
        }
        let token = serde_json::to_string(&spec).map_err(|e| format!("internal error: {e}"))?;
        commit_switches(s, out, run, "s3-parquet", existing.is_some(), token)
    }

    fn switch(&self, sw: &PlannedSwitch, log: &dyn Fn(Level, &str)) -> Result<Switch, String> {
        let spec = s3_spec(sw)?;
        debug_pause("s3-uploading", log);
        crate::io::s3_dataset::publish(&sw.staged, &spec)?;
        Ok(if sw.replaces { Switch::Replaced } else { Switch::Created })
    }

    fn made(&self, sw: &PlannedSwitch) -> bool {
        s3_spec(sw).and_then(|spec| crate::io::s3_dataset::made(&spec)).unwrap_or(false)
    }

    fn complete(&self, sw: &PlannedSwitch, _log: &dyn Fn(Level, &str)) -> Result<(Switch, bool), String> {
        let spec = s3_spec(sw)?;
        let now = crate::io::s3_dataset::publish(&sw.staged, &spec)?;
        Ok((if sw.replaces { Switch::Replaced } else { Switch::Created }, now))
    }
}

/// How a run's rows meet a table or a folder on object storage: a `--partition` run of a
/// partitioned output replaces the partitions it wrote.
fn publish_mode(out: &Output, run: &RunRef<'_>) -> crate::io::delta::Mode {
    use crate::config::OutputMode;
    use crate::io::delta::Mode;
    match out.mode {
        OutputMode::Overwrite if out.partition_by.is_some() && run.partition.is_some() => Mode::OverwritePartitions,
        OutputMode::Overwrite => Mode::Overwrite,
        OutputMode::OverwritePartitions => Mode::OverwritePartitions,
        OutputMode::Append => Mode::Append,
        OutputMode::Merge => Mode::Merge,
    }
}

/// Who publishes, as a table's transactions or a folder's pointer record it:
/// `weir/PIPELINE/STEP`, and `/PARTITION` in a partition run.
fn writer_id(run: &RunRef<'_>, step: &str) -> String {
    match run.partition {
        Some(p) => format!("weir/{}/{step}/{p}", run.pipeline),
        None => format!("weir/{}/{step}", run.pipeline),
    }
}

/// The switches of an output published by one commit of its own (a Delta commit, a
/// pointer's replacement) decided as `token`, then its quarantine's.
fn commit_switches(
    s: &Staged,
    out: &Output,
    run: &RunRef<'_>,
    kind: &str,
    replaces: bool,
    token: String,
) -> Result<Vec<PlannedSwitch>, String> {
    let mut plan = vec![PlannedSwitch {
        step: s.step.clone(),
        kind: kind.into(),
        replaces,
        staged: s.staging.clone(),
        target: out.path.clone(),
        partition: run.partition.map(String::from),
        token,
        target_token: None,
        done_at_ms: None,
    }];
    plan.extend(quarantine_switch(s, out, run.partition)?);
    Ok(plan)
}

/// The quarantine switch of a step that quarantined rows.
fn quarantine_switch(s: &Staged, out: &Output, partition: Option<&str>) -> Result<Option<PlannedSwitch>, String> {
    let Some(q) = &s.quarantine else { return Ok(None) };
    let to = super::staging::quarantine_target(&out.path, partition);
    let token = dir_token(q).ok_or_else(|| format!("its staged quarantine {} is missing", q.display()))?;
    let target_token = dir_token(&to);
    Ok(Some(PlannedSwitch {
        step: s.step.clone(),
        kind: "quarantine".into(),
        replaces: target_token.is_some(),
        staged: q.clone(),
        target: to,
        partition: None,
        token,
        target_token,
        done_at_ms: None,
    }))
}

impl Publisher for DeltaTables {
    fn plan(&self, s: &Staged, run: &RunRef<'_>) -> Result<Vec<PlannedSwitch>, String> {
        use crate::io::delta::{CommitSpec, Table};
        let Some(out) = &s.output else { return Ok(Vec::new()) };
        let mode = publish_mode(out, run);
        let app_id = writer_id(run, &s.step);
        let table = Table::open(&out.path, out.remote.as_ref())?;
        let mut replaces = false;
        if let Some(snap) = table.snapshot()? {
            replaces = true;
            if let Some(v) = table.app_version(&snap, &app_id)? {
                if v >= run.id {
                    return Err(format!(
                        "the Delta table {} already holds a commit of run #{v} of this step, and this is run #{}: \
                         the table was written by runs of another run store; use the store that wrote it (--state), or write a new table",
                        table.name(),
                        run.id
                    ));
                }
            }
        }
        let spec = CommitSpec {
            app_id,
            version: run.id,
            mode,
            partition_by: out.partition_by.clone(),
            schema: crate::io::delta::arrow_schema_json(&s.schema)?,
            pipeline: run.pipeline.to_string(),
            step: s.step.clone(),
            run_partition: run.partition.map(String::from),
            remote: out.remote.clone(),
            key: out.key.clone(),
            sequence_by: out.sequence_by.clone(),
            row_group_size: out.row_group_size,
            compression: out.compression,
        };
        let token = serde_json::to_string(&spec).map_err(|e| format!("internal error: {e}"))?;
        commit_switches(s, out, run, "delta", replaces, token)
    }

    fn switch(&self, sw: &PlannedSwitch, log: &dyn Fn(Level, &str)) -> Result<Switch, String> {
        let spec = delta_spec(sw)?;
        let c = delta_commit(sw, &spec, log)?;
        Ok(Switch::Committed(c.version))
    }

    fn made(&self, sw: &PlannedSwitch) -> bool {
        let Ok(spec) = delta_spec(sw) else { return false };
        let Ok(table) = crate::io::delta::Table::open(&sw.target, spec.remote.as_ref()) else { return false };
        match table.snapshot() {
            Ok(Some(snap)) => table.app_version(&snap, &spec.app_id).ok().flatten().is_some_and(|v| v >= spec.version),
            _ => false,
        }
    }

    fn complete(&self, sw: &PlannedSwitch, log: &dyn Fn(Level, &str)) -> Result<(Switch, bool), String> {
        let spec = delta_spec(sw)?;
        let c = delta_commit(sw, &spec, log)?;
        Ok((Switch::Committed(c.version), c.now))
    }
}

/// Commit a decided Delta switch; a merge rewrites the table's files through
/// [`super::merge`] with the output's settings as decided.
fn delta_commit(
    sw: &PlannedSwitch,
    spec: &crate::io::delta::CommitSpec,
    log: &dyn Fn(Level, &str),
) -> Result<crate::io::delta::Committed, String> {
    use crate::config::{OutputFormat, OutputMode};
    let out = Output {
        path: sw.target.clone(),
        partition_by: spec.partition_by.clone(),
        row_group_size: spec.row_group_size.max(1024),
        compression: spec.compression,
        copy_columns: false,
        format: OutputFormat::Delta,
        mode: OutputMode::Merge,
        key: spec.key.clone(),
        delete_when: None,
        sequence_by: spec.sequence_by.clone(),
        remote: spec.remote.clone(),
    };
    let schema: arrow_schema::SchemaRef = match spec.mode {
        crate::io::delta::Mode::Merge => std::sync::Arc::new(
            serde_json::from_str(&spec.schema).map_err(|e| format!("internal error: the decided schema: {e}"))?,
        ),
        _ => std::sync::Arc::new(arrow_schema::Schema::empty()),
    };
    let merge = |files: &[crate::io::delta::TableFile], tombstones: Option<&str>| {
        super::merge::fold_table_files(&sw.staged, &sw.target, files, tombstones, &out, &schema)
    };
    let pause = |p: &str| debug_pause(p, log);
    let hooks = crate::io::delta::Hooks {
        pause: &pause,
        merge: (spec.mode == crate::io::delta::Mode::Merge).then_some(&merge as &crate::io::delta::MergeHook<'_>),
    };
    let c = crate::io::delta::commit(&sw.staged, &sw.target, spec, &hooks)?;
    if spec.mode == crate::io::delta::Mode::Merge && c.now {
        log(
            Level::INFO,
            &format!(
                "weir: step `{}`: the merge replaced or deleted {} row(s) of the table ({} of its {} file(s) passed over by their statistics){}",
                sw.step,
                c.replaced,
                c.pruned.0,
                c.pruned.1,
                if c.outdated > 0 {
                    format!(
                        "; {} of the run's row(s) were older (sequence_by) than the table's and were dropped",
                        c.outdated
                    )
                } else {
                    String::new()
                }
            ),
        );
    }
    Ok(c)
}

fn delta_spec(sw: &PlannedSwitch) -> Result<crate::io::delta::CommitSpec, String> {
    serde_json::from_str(&sw.token)
        .map_err(|e| format!("the decided Delta commit of step `{}` cannot be read: {e}", sw.step))
}

impl Publisher for LocalDirs {
    fn plan(&self, s: &Staged, run: &RunRef<'_>) -> Result<Vec<PlannedSwitch>, String> {
        let partition = run.partition;
        let mut plan = Vec::new();
        let Some(out) = &s.output else { return Ok(plan) };
        let mut add = |kind: &str, from: PathBuf, to: PathBuf, partition: Option<String>| -> Result<(), String> {
            let token = dir_token(&from).ok_or_else(|| format!("its staged output {} is missing", from.display()))?;
            let target_token = dir_token(&to);
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
        let by_partition = partition.is_some() || out.mode == crate::config::OutputMode::OverwritePartitions;
        if out.partition_by.is_some() && by_partition {
            for p in &s.partitions {
                add("partition", s.staging.join(p), out.path.join(p), Some(p.clone()))?;
            }
        } else {
            add("dataset", s.staging.clone(), out.path.clone(), None)?;
        }
        plan.extend(quarantine_switch(s, out, partition)?);
        Ok(plan)
    }

    fn switch(&self, sw: &PlannedSwitch, log: &dyn Fn(Level, &str)) -> Result<Switch, String> {
        switch_dir(&sw.staged, &sw.target, log)
    }

    fn made(&self, sw: &PlannedSwitch) -> bool {
        dir_token(&sw.target).as_deref() == Some(sw.token.as_str())
    }

    fn complete(&self, sw: &PlannedSwitch, log: &dyn Fn(Level, &str)) -> Result<(Switch, bool), String> {
        complete_switch(&sw.staged, &sw.target, &sw.token, sw.target_token.as_deref(), log)
    }
}

/// Every switch that publishes what the run staged, in the order they are made: per step
/// (in pipeline order) its dataset or, in a partition run of a partitioned output, each
/// partition it wrote; then its quarantined rows.
pub(super) fn plan(
    pipeline: &Pipeline,
    run_id: i64,
    partition: Option<&str>,
    staged: &HashMap<String, Staged>,
) -> crate::Result<Vec<PlannedSwitch>> {
    let run = RunRef { id: run_id, pipeline: &pipeline.name, partition };
    let mut plan = Vec::new();
    for step in &pipeline.steps {
        let s = &staged[&step.name];
        let Some(out) = &s.output else { continue };
        let switches = publisher_for(out)
            .plan(s, &run)
            .map_err(|message| crate::Error::Publish { step: s.step.clone(), message })?;
        plan.extend(switches);
    }
    Ok(plan)
}

/// Make every switch of a decided plan, each recorded once made; the lease is renewed
/// before each, and a run whose lease was taken over stops.
pub(super) fn publish(
    store: &dyn RunStore,
    run_id: i64,
    plan: &[PlannedSwitch],
    log: &dyn Fn(Level, &str),
) -> crate::Result<()> {
    for (seq, sw) in plan.iter().enumerate() {
        let publisher = publisher(&sw.kind);
        let interrupted = |message: String| crate::Error::PublishInterrupted {
            step: sw.step.clone(),
            // a switch whose old copy could not be removed was made all the same
            made: seq + usize::from(publisher.made(sw)),
            total: plan.len(),
            message,
        };
        if !store.renew_lease(run_id)? {
            return Err(interrupted("the run was taken over by another process (its lease had expired)".into()));
        }
        let switch = publisher.switch(sw, log).map_err(interrupted)?;
        debug_pause("after-switch", log);
        let entry = PublishEntry {
            step: sw.step.clone(),
            path: sw.target.clone(),
            partition: sw.partition.clone(),
            action: switch.action(),
        };
        store.record_switch(run_id, seq, &entry)?;
        debug_pause("between-publishes", log);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_creates_then_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("ds");
        for (i, content) in ["v1", "v2", "v3"].iter().enumerate() {
            let new = dir.path().join(format!(".ds.staging-{i}"));
            std::fs::create_dir_all(&new).unwrap();
            std::fs::write(new.join("part.txt"), content).unwrap();
            let s = switch_dir(&new, &target, &|_, _| {}).unwrap();
            assert_eq!(s, if i == 0 { Switch::Created } else { Switch::Replaced });
            assert_eq!(std::fs::read_to_string(target.join("part.txt")).unwrap(), *content);
            assert!(!new.exists(), "the old copy is removed");
        }
        let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        names.sort();
        assert_eq!(names, ["ds"]);
    }

    #[test]
    fn a_switch_whose_outcome_is_unknown_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let (staged, target) = (dir.path().join(".ds.staging-1"), dir.path().join("ds"));
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("part.txt"), "old").unwrap();
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join("part.txt"), "new").unwrap();
        let token = dir_token(&staged).unwrap();
        let old = dir_token(&target);
        // not made yet: made now
        assert_eq!(
            complete_switch(&staged, &target, &token, old.as_deref(), &|_, _| {}).unwrap(),
            (Switch::Replaced, true)
        );
        assert_eq!(std::fs::read_to_string(target.join("part.txt")).unwrap(), "new");
        // made (and its old copy removed): recognised, nothing changes
        assert_eq!(
            complete_switch(&staged, &target, &token, old.as_deref(), &|_, _| {}).unwrap(),
            (Switch::Replaced, false)
        );
        assert_eq!(std::fs::read_to_string(target.join("part.txt")).unwrap(), "new");

        // made, but the crash came before the old copy was removed: the old copy goes
        let staged2 = dir.path().join(".ds.staging-2");
        std::fs::create_dir_all(&staged2).unwrap();
        std::fs::write(staged2.join("part.txt"), "newer").unwrap();
        let token2 = dir_token(&staged2).unwrap();
        let old2 = dir_token(&target);
        exchange(&staged2, &target).unwrap();
        assert_eq!(
            complete_switch(&staged2, &target, &token2, old2.as_deref(), &|_, _| {}).unwrap(),
            (Switch::Replaced, false)
        );
        assert_eq!(std::fs::read_to_string(target.join("part.txt")).unwrap(), "newer");
        assert!(!staged2.exists(), "the replaced data is removed");

        // a crash inside the two-rename fallback, between its renames: the target is put back
        // and then switched
        let staged3 = dir.path().join(".ds.staging-3");
        std::fs::create_dir_all(&staged3).unwrap();
        std::fs::write(staged3.join("part.txt"), "newest").unwrap();
        let token3 = dir_token(&staged3).unwrap();
        let old3 = dir_token(&target);
        std::fs::rename(&target, aside_path(&staged3)).unwrap();
        assert_eq!(
            complete_switch(&staged3, &target, &token3, old3.as_deref(), &|_, _| {}).unwrap(),
            (Switch::Replaced, true)
        );
        assert_eq!(std::fs::read_to_string(target.join("part.txt")).unwrap(), "newest");
        let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        names.sort();
        assert_eq!(names, ["ds"]);

        // a later run replaced the target after the decision: the old decision's switch is
        // superseded, never made over the newer data
        let (staged4, newer) = (dir.path().join(".ds.staging-4"), dir.path().join(".ds.staging-5"));
        for (d, text) in [(&staged4, "decided long ago"), (&newer, "newer")] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("part.txt"), text).unwrap();
        }
        let (token4, old4) = (dir_token(&staged4).unwrap(), dir_token(&target));
        switch_dir(&newer, &target, &|_, _| {}).unwrap();
        assert_eq!(
            complete_switch(&staged4, &target, &token4, old4.as_deref(), &|_, _| {}).unwrap(),
            (Switch::Superseded, false)
        );
        assert_eq!(std::fs::read_to_string(target.join("part.txt")).unwrap(), "newer");
        assert!(!staged4.exists(), "the superseded output is removed");

        // neither side is the staged output: refused, nothing touched
        let err = complete_switch(&staged3, &target, "1:1", old3.as_deref(), &|_, _| {}).unwrap_err();
        assert!(err.contains("moved or removed by hand"), "{err}");
        assert_eq!(std::fs::read_to_string(target.join("part.txt")).unwrap(), "newer");
    }
}
