//! Where a run stages its output before publishing: a hidden folder beside each dataset
//! (`.orders.weir-staging-<run>`), one beside it for quarantined rows, and a guard that
//! removes what an undecided run staged, however it ends.

use std::path::{Path, PathBuf};

use crate::config::{Pipeline, Step};
use crate::store::PlannedSwitch;

/// Removes what a run staged, and the output folders it had to create, when dropped. On
/// success the staging directories have been moved away by publish, so only leftovers go.
#[derive(Default)]
pub(super) struct StagingGuard {
    staging: Vec<PathBuf>,
    created_parents: Vec<PathBuf>,
}

impl StagingGuard {
    /// The run decided to publish `plan`: what it staged for it is no longer this guard's
    /// to remove (if the publish breaks off, recovery completes it from there), and the
    /// folders it created hold, or will hold, published data.
    pub(super) fn decided(&mut self, plan: &[PlannedSwitch]) {
        self.staging.retain(|d| !plan.iter().any(|sw| sw.staged.starts_with(d)));
        self.created_parents.clear();
    }

    pub(super) fn add(&mut self, staging: &Path) {
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

/// Where a step's quarantined rows are staged.
pub(super) fn quarantine_staging(staging: &Path) -> PathBuf {
    let name = staging.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    staging.with_file_name(format!("{name}-quarantine"))
}

/// Where a step's plugins keep their keyed state (spilled runs, checkpointed logs): beside
/// its staging, never published, removed when the step is complete.
pub(super) fn state_staging(staging: &Path) -> PathBuf {
    let name = staging.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    staging.with_file_name(format!("{name}-state"))
}

/// The quarantine dataset beside a step's output: `<output>_quarantine/partition=<P>/`.
pub fn quarantine_target(output: &Path, partition: Option<&str>) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let p = crate::io::sink::escape_partition(partition.unwrap_or("__all__"));
    output.with_file_name(format!("{name}_quarantine")).join(format!("partition={p}"))
}

/// Where a step stages its output in run `run_id` (`{run}` for the pattern a run records).
/// The pipeline's name is part of it: runs of two pipelines (each with its own run ids)
/// writing one Delta table stage beside it at once.
pub(super) fn staging_dir(pipeline: &Pipeline, step: &Step, run_id: &str) -> PathBuf {
    match &step.output {
        Some(o) => {
            let name =
                o.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| step.name.clone());
            o.path.with_file_name(format!(".{name}.weir-staging-{}-{run_id}", pipeline.name))
        }
        None => pipeline.file.parent().unwrap_or(Path::new(".")).join(format!(".weir-staging-{}-{run_id}", step.name)),
    }
}
