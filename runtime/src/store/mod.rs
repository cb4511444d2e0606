//! The run store: what ran, when, with what, and what it published.
//!
//! The embedded default is one SQLite file per pipeline state directory
//! (`<pipeline dir>/.weir/state.db`). Everything goes through [`RunStore`], so a PostgreSQL
//! store for many workers on many machines can follow without touching the engine.
//!
//! A run's life:
//!
//! ```text
//! begin_run ──> RUNNING (lease: heartbeat every few seconds, pid and host recorded)
//!                  │  every check passed:
//!                  │  record_decision: the switches to make, rows per step   one transaction
//!                  │  publish: record_switch after each switch (audit entry + switch done)
//!                  ├──> finish_run(SUCCESS, rows per step)   one transaction
//!                  ├──> finish_run(FAILED, error)
//!                  └──> (process killed) ──> recover_stale:
//!                         no decision: FAILED "crashed", staging removed
//!                         decided:     claimed by the recovering process, which completes
//!                                      the remaining switches from the staged data, then
//!                                      complete_recovered: SUCCESS with a note
//! ```
//!
//! The decision is the commit point: once it is recorded, the run's staged outputs are
//! published, by the run itself or by whoever recovers it, and never thrown away. A run
//! whose publish failed after its decision (an I/O error) is recorded FAILED with its
//! decision kept, and the next recovery completes it before any other run may publish.

mod sqlite;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use sqlite::SqliteStore;

/// Run states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Running,
    Success,
    Failed,
    /// A backfill in which some partitions failed.
    Partial,
    /// A run stopped on request before it decided to publish (nothing was published).
    Cancelled,
    /// A backfill whose process died (or stopped renewing its lease) while it ran; shown,
    /// never stored: `weir backfill --resume` continues it.
    Interrupted,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Running => "RUNNING",
            Status::Success => "SUCCESS",
            Status::Failed => "FAILED",
            Status::Partial => "PARTIAL",
            Status::Cancelled => "CANCELLED",
            Status::Interrupted => "INTERRUPTED",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s.to_ascii_uppercase().as_str() {
            "RUNNING" => Status::Running,
            "SUCCESS" => Status::Success,
            "FAILED" => Status::Failed,
            "PARTIAL" => Status::Partial,
            "CANCELLED" => Status::Cancelled,
            "INTERRUPTED" => Status::Interrupted,
            _ => return None,
        })
    }
}

/// What the store must know when a run starts.
#[derive(Debug, Clone, Default)]
pub struct NewRun {
    pub pipeline: String,
    pub partition: Option<String>,
    pub config_sha256: String,
    /// Plugin name -> sha256 of its component.
    pub plugins: BTreeMap<String, String>,
    /// Hash of config, plugins, partition and input files (names, sizes, modification
    /// times): equal fingerprints mean an identical run.
    pub fingerprint: String,
    /// Where the run stages its outputs (removed if it crashes); `{run}` is the run id.
    pub staging: Vec<PathBuf>,
    /// The backfill this run belongs to.
    pub backfill_id: Option<i64>,
}

/// Rows per step, as recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepRows {
    pub step: String,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_skipped: u64,
    pub rows_quarantined: u64,
}

/// One publish action, written to the audit log as it happens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PublishEntry {
    pub step: String,
    pub path: PathBuf,
    /// The partition directory (`order_date=2024-01-03`), or none for a whole dataset.
    pub partition: Option<String>,
    /// `created` or `replaced`.
    pub action: String,
}

/// A watermark a run moves when it decides to publish.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatermarkUpdate {
    pub source: String,
    /// Where the run's read started (the committed watermark, less the overlap); none for
    /// a first or full read.
    pub start: Option<String>,
    /// The new watermark.
    pub end: String,
}

/// A committed watermark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Watermark {
    pub source: String,
    pub value: String,
    /// The run that committed it (0: set by hand).
    pub run_id: i64,
    pub updated_ms: i64,
}

/// A watermark set or reset by hand.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WatermarkChange {
    pub source: String,
    pub old: Option<String>,
    pub new: Option<String>,
    pub action: String,
    pub by: String,
    pub at_ms: i64,
}

/// A column of a recorded source schema.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SchemaColumn {
    pub name: String,
    /// The Arrow type, as Arrow names it (`Int64`, `Utf8`, `Timestamp(µs, "UTC")`, ...).
    #[serde(rename = "type")]
    pub data_type: String,
    pub nullable: bool,
}

/// A source schema as a run saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SchemaVersion {
    pub fingerprint: String,
    pub columns: Vec<SchemaColumn>,
    /// `initial` (the first seen), `evolved` (new columns taken in), `changed` (taken as it
    /// is: no `schema_change` policy), `frozen` (new columns dropped), `failed` (the run
    /// stopped). The schema later runs compare with is the newest initial, evolved or
    /// changed one.
    pub action: String,
    pub run_id: i64,
    pub seen_ms: i64,
}

impl SchemaVersion {
    /// Whether later runs compare with this schema.
    pub fn adopted(&self) -> bool {
        matches!(self.action.as_str(), "initial" | "evolved" | "changed")
    }
}

/// A run as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub pipeline: String,
    pub partition: Option<String>,
    pub status: Status,
    pub attempt: u32,
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub heartbeat_at_ms: i64,
    pub pid: u32,
    pub host: String,
    pub error: Option<String>,
    pub config_sha256: String,
    pub plugins: BTreeMap<String, String>,
    pub fingerprint: String,
    pub steps: Vec<StepRows>,
    pub staging: Vec<PathBuf>,
    pub published: Vec<PublishEntry>,
    /// Every attempt of every step, failed ones with their error.
    pub attempts: Vec<Attempt>,
    pub backfill_id: Option<i64>,
    /// The commit decision, once every check has passed: the switches to make.
    pub decision: Option<Decision>,
    /// How the run ended when that needs saying (`completed by recovery ...`).
    pub note: Option<String>,
    /// The identity of the process that runs it (see [`process_start`]).
    pub proc_start: Option<String>,
    /// Where an incremental read started and the watermark it committed.
    pub watermark_start: Option<String>,
    pub watermark_end: Option<String>,
}

/// A run's decision to publish: every switch it will make, recorded before the first one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub at_ms: i64,
    pub switches: Vec<PlannedSwitch>,
}

impl Decision {
    /// The switches not made yet.
    pub fn pending(&self) -> usize {
        self.switches.iter().filter(|s| s.done_at_ms.is_none()).count()
    }
}

/// One atomic switch a run has decided to make: staged data that becomes what readers see.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlannedSwitch {
    pub step: String,
    /// `dataset` (a whole dataset), `partition` (one partition directory) or `quarantine`
    /// (the step's quarantined rows for the run's partition).
    pub kind: String,
    /// Where the run staged it.
    pub staged: PathBuf,
    /// What readers see once it is switched.
    pub target: PathBuf,
    /// The partition directory (`day=mon`), for a `partition` switch.
    pub partition: Option<String>,
    /// Whether the target existed when the run decided (the switch replaces it).
    pub replaces: bool,
    /// How a made switch is recognised, whoever looks: for a directory its inode, which the
    /// atomic exchange carries to the target (the device number is left out: it can change
    /// across a remount or reboot; staged output and target share one filesystem).
    pub token: String,
    /// The target's own identity when the run decided (none: it did not exist). A target
    /// that is neither this nor the staged output was replaced by a later run since.
    pub target_token: Option<String>,
    /// When the switch was made and recorded (none: not yet).
    pub done_at_ms: Option<i64>,
}

/// A backfill: a persisted plan of partitions and how far it got.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackfillRecord {
    pub id: i64,
    pub pipeline: String,
    /// How the partitions were chosen (`2024-01-01..2024-03-31 daily`, a list, ...).
    pub spec: String,
    pub parallel: u32,
    pub status: Status,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    /// The process running it (the latest one, after a resume) and its lease.
    pub pid: Option<u32>,
    pub host: Option<String>,
    pub heartbeat_at_ms: Option<i64>,
    /// Why it shows as INTERRUPTED: its process is gone or its lease expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    pub partitions: Vec<BackfillPartition>,
}

/// One partition of a backfill.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackfillPartition {
    pub partition: String,
    /// PENDING, RUNNING, SUCCESS or FAILED.
    pub status: String,
    pub run_id: Option<i64>,
    pub error: Option<String>,
}

/// Where a step of a run had got to: written at batch boundaries, and once more (complete)
/// when the step finished. `weir run --resume` continues from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub step: String,
    /// The step finished: its staging is complete.
    pub complete: bool,
    /// Where the source continues, as the source wrote it (files: file index and records
    /// of it consumed). Null in a complete step's checkpoint, and in one written by a weir
    /// from before sources wrote their own positions (such a run is not resumed).
    #[serde(default)]
    pub source: serde_json::Value,
    /// How far the sink's output is durable, as the sink wrote it.
    #[serde(default)]
    pub sink: serde_json::Value,
    pub batches: u64,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_skipped: u64,
    /// A complete step: the partitions its output staged.
    #[serde(default, alias = "files")]
    pub partitions: Vec<String>,
    /// The step's output schema, as an Arrow IPC stream.
    pub schema: Vec<u8>,
    /// Each plugin's snapshot, in transform order (none for stateless ones).
    #[serde(skip)]
    pub states: Vec<Option<Vec<u8>>>,
}

/// A check result as stored, with its run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredCheck {
    pub run_id: i64,
    pub pipeline: String,
    pub partition: Option<String>,
    #[serde(flatten)]
    pub result: crate::quality::CheckResult,
}

/// Filter for [`RunStore::check_results`].
#[derive(Debug, Clone, Default)]
pub struct CheckFilter {
    pub run_id: Option<i64>,
    pub pipeline: Option<String>,
    pub failed_only: bool,
    pub limit: usize,
}

/// One attempt of one step of a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attempt {
    pub step: String,
    pub attempt: u32,
    pub error: Option<String>,
    pub at_ms: i64,
}

/// Filter for [`RunStore::runs`].
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub pipeline: Option<String>,
    pub status: Option<Status>,
    pub limit: usize,
}

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("run store {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("run store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("run store holds unreadable data: {0}")]
    Corrupt(String),
    /// [`RunStore::begin_run`] found a live run of the same pipeline and partition.
    #[error("run #{id} of this pipeline and partition is still running (pid {pid} on {host})")]
    Busy { id: i64, pid: u32, host: String },
    /// [`RunStore::begin_run`] found a run of the pipeline whose decided publish broke off.
    #[error("run #{id} decided to publish but its publish broke off; `weir recover` completes it")]
    Unfinished { id: i64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The run store interface.
pub trait RunStore: Send + Sync {
    /// Record a new RUNNING run; returns its id. Atomic with the check that no other run
    /// of the same pipeline and partition is RUNNING: of any number of runs starting at
    /// once, one gets an id and the others [`Error::Busy`] naming it. (Dead runs must have
    /// been recovered first: a RUNNING record counts as live.)
    fn begin_run(&self, run: &NewRun) -> Result<i64>;
    /// Renew a running run's lease.
    fn heartbeat(&self, id: i64) -> Result<()>;
    /// Renew the lease of a run this process holds; false when it no longer holds it
    /// (another process completed or took over the run). Asked before each switch.
    fn renew_lease(&self, id: i64) -> Result<bool>;
    /// Record a run's decision to publish, before its first switch: the switches in the
    /// order they will be made, and the rows per step. One transaction.
    /// The decision also moves the run's watermarks, in the same transaction.
    fn record_decision(
        &self,
        id: i64,
        steps: &[StepRows],
        switches: &[PlannedSwitch],
        watermarks: &[WatermarkUpdate],
    ) -> Result<()>;
    /// The committed watermark of each incremental source of a pipeline.
    fn watermarks(&self, pipeline: &str) -> Result<Vec<Watermark>>;
    /// Set (or with `None` remove) a source's watermark by hand; recorded in the audit log.
    /// Returns the value it had.
    fn set_watermark(&self, pipeline: &str, source: &str, value: Option<&str>, by: &str) -> Result<Option<String>>;
    /// Every watermark set or reset by hand, oldest first.
    fn watermark_audit(&self, pipeline: &str) -> Result<Vec<WatermarkChange>>;
    /// Record that switch `seq` of the decision was made, with its audit entry (before the
    /// next switch happens). One transaction.
    fn record_switch(&self, id: i64, seq: usize, entry: &PublishEntry) -> Result<()>;
    /// Record one attempt of a step (`error` is none when it succeeded).
    fn record_attempt(&self, id: i64, step: &str, attempt: u32, error: Option<&str>) -> Result<()>;
    /// Close a run: status, rows and error together, in one transaction. Empty `steps`
    /// keep the rows recorded with the decision, if any.
    fn finish_run(&self, id: i64, status: Status, steps: &[StepRows], error: Option<&str>) -> Result<()>;
    /// Find RUNNING runs of `pipeline` whose process is gone (same host, pid dead) or whose
    /// lease expired, atomically (two recovering processes never both get one):
    /// - without a decision: mark them FAILED with a reason and return them (with their
    ///   staging paths, for the caller to remove);
    /// - with a decision and switches still to make (also FAILED runs whose publish broke
    ///   off): claim them for this process (RUNNING, its pid, a fresh lease) and return them
    ///   with their decision, for the caller to complete and then
    ///   [`complete_recovered`](RunStore::complete_recovered).
    fn recover_stale(&self, pipeline: Option<&str>, lease_ms: i64, by: &str) -> Result<Vec<RunRecord>>;
    /// Close a run whose decided publish was completed by recovery: SUCCESS with `note`.
    fn complete_recovered(&self, id: i64, note: &str) -> Result<()>;
    /// Runs, newest first.
    fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>>;
    /// One run.
    fn run(&self, id: i64) -> Result<Option<RunRecord>>;
    /// Save (replace) a step's checkpoint.
    fn save_checkpoint(&self, run_id: i64, checkpoint: &Checkpoint) -> Result<()>;
    /// Record a source schema a run saw, and what the run did with it (once per schema and
    /// action: the first run that saw it keeps it).
    fn record_schema(&self, pipeline: &str, source: &str, version: &SchemaVersion) -> Result<()>;
    /// Every schema recorded for a source, oldest first.
    fn schema_versions(&self, pipeline: &str, source: &str) -> Result<Vec<SchemaVersion>>;
    /// A run's checkpoints, one per step that made one.
    fn checkpoints(&self, run_id: i64) -> Result<Vec<Checkpoint>>;
    /// Record a step's check results for a run.
    fn record_checks(
        &self,
        run_id: i64,
        partition: Option<&str>,
        results: &[crate::quality::CheckResult],
    ) -> Result<()>;
    /// Check results, newest run first.
    fn check_results(&self, filter: &CheckFilter) -> Result<Vec<StoredCheck>>;
    /// Observed values of a check in the pipeline's successful runs, newest first.
    fn metric_history(&self, pipeline: &str, step: &str, check: &str, limit: usize) -> Result<Vec<String>>;
    /// Persist a backfill plan (all partitions PENDING) before any work starts.
    fn create_backfill(&self, pipeline: &str, spec: &str, parallel: u32, partitions: &[String]) -> Result<i64>;
    /// Update one partition of a backfill.
    fn set_backfill_partition(
        &self,
        id: i64,
        partition: &str,
        status: &str,
        run_id: Option<i64>,
        error: Option<&str>,
    ) -> Result<()>;
    /// Set a backfill's status (RUNNING, SUCCESS, PARTIAL).
    fn set_backfill_status(&self, id: i64, status: Status) -> Result<()>;
    /// Renew a running backfill's lease, as this process's (pid and host recorded).
    fn backfill_heartbeat(&self, id: i64) -> Result<()>;
    /// One backfill with its partitions.
    fn backfill(&self, id: i64) -> Result<Option<BackfillRecord>>;
    /// Backfills, newest first.
    fn backfills(&self, pipeline: Option<&str>, limit: usize) -> Result<Vec<BackfillRecord>>;
    /// The newest SUCCESS run of a pipeline for a partition.
    fn last_success(&self, pipeline: &str, partition: Option<&str>) -> Result<Option<RunRecord>>;
}

/// Open the run store at `location`, the one place a store is opened. Today a path to the
/// embedded SQLite file (created if missing); a `postgres://` URL will select the shared
/// store behind the same trait.
pub fn open(location: &std::path::Path) -> Result<std::sync::Arc<dyn RunStore>> {
    let text = location.to_string_lossy();
    if let Some((scheme, _)) = text.split_once("://") {
        return Err(Error::Open {
            path: location.to_path_buf(),
            message: format!("`{scheme}://` run stores are not supported yet; give the path of an SQLite file"),
        });
    }
    Ok(std::sync::Arc::new(SqliteStore::open(location)?))
}

/// How long a RUNNING run or backfill may go without a heartbeat before it counts as dead.
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// This machine's name, for run records.
pub fn host_name() -> String {
    // read once: every lease renewal names the host
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    })
    .clone()
}

/// [`process_start`] of this process, read once.
pub fn own_process_start() -> Option<String> {
    static START: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    START.get_or_init(|| process_start(std::process::id())).clone()
}

/// Which process a pid is: this boot's id and the process's start time, so a pid reused by
/// another process (after a crash, or a reboot) is not taken for the run's. `None` where
/// `/proc` does not say.
pub fn process_start(pid: u32) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the fields after the command name (which may hold spaces and parentheses); the
    // start time is the 22nd field of the line, the 20th after the name
    let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?;
    Some(format!("{}:{start}", boot.trim()))
}

/// Whether the process that recorded `start` (see [`process_start`]) as `pid` still runs:
/// compared by identity where it was recorded, by pid alone otherwise.
pub fn process_alive(pid: u32, start: Option<&str>) -> bool {
    match start {
        Some(s) => process_start(pid).as_deref() == Some(s),
        None => pid_alive(pid),
    }
}

/// Runs this process is executing or completing: a RUNNING record with this process's
/// identity that is not among them was left behind (a failed completion, say). Keyed by the
/// store's file as well: `weir serve` runs pipelines of several stores, whose ids overlap.
static OWNED: std::sync::Mutex<Vec<(PathBuf, i64)>> = std::sync::Mutex::new(Vec::new());

fn owned() -> std::sync::MutexGuard<'static, Vec<(PathBuf, i64)>> {
    OWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process runs `id` of the store at `store` from now on.
pub fn own(store: &std::path::Path, id: i64) {
    let mut o = owned();
    if !o.iter().any(|(s, x)| *x == id && s == store) {
        o.push((store.to_path_buf(), id));
    }
}

/// This process no longer runs `id` of the store at `store`.
pub fn disown(store: &std::path::Path, id: i64) {
    owned().retain(|(s, x)| !(*x == id && s == store));
}

/// Whether this process runs `id` of the store at `store`.
pub fn owns(store: &std::path::Path, id: i64) -> bool {
    owned().iter().any(|(s, x)| *x == id && s == store)
}

/// Whether a process with this pid exists on this machine.
pub fn pid_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: kill with signal 0 only checks for existence and permission.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// `2024-01-15 10:20:30Z` for a Unix time in milliseconds (UTC).
pub fn format_time(ms: i64) -> String {
    let (y, m, d, secs) = utc_parts(ms);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// A Unix time in milliseconds as a UTC date (proleptic Gregorian, civil-from-days) and
/// the seconds into that day.
pub fn utc_parts(ms: i64) -> (i64, i64, i64, i64) {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d, rem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(1_705_314_030_000), "2024-01-15 10:20:30Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00Z");
    }

    #[test]
    fn this_process_is_alive() {
        assert!(pid_alive(std::process::id()));
    }
}
