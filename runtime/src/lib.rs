//! weir: a pipeline runtime that streams Apache Arrow record batches through sandboxed
//! WebAssembly components.
//!
//! A pipeline is a TOML file. [`config::Pipeline::load`] reads and validates it (every
//! error with file:line:col and a hint); [`engine::run`] runs it: sources are read in
//! batches, each step's transforms run as plugin instances in their own sandbox and thread,
//! and outputs are staged as Parquet and published only when every step succeeded.
//!
//! ```no_run
//! use std::path::Path;
//! use weir::{config::Pipeline, engine};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pipeline = Pipeline::load(Path::new("examples/orders/pipeline.toml"))?;
//! let summary = engine::run(&pipeline, &engine::RunOptions::default())?;
//! for step in &summary.steps {
//!     println!("{}: {} rows in, {} rows out", step.name, step.rows_read, step.rows_written);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The modules, in the order a batch meets them: [`config`] (the pipeline file), [`io`]
//! (built-in sources and the Parquet sink), [`plugin`] (the wasmtime host and sandbox),
//! [`engine`] (threads, channels, staging and publish).

pub mod config;
pub mod cpu_clock;
pub mod engine;
pub mod io;
pub mod lineage;
pub mod malloc_tuning;
pub mod metrics;
pub mod plugin;
pub mod quality;
pub mod serve;
pub mod state;
pub mod store;

use std::fmt;
use std::path::PathBuf;

/// Where a plugin failed, for messages.
#[derive(Debug, Clone)]
pub struct PluginFailure {
    pub pipeline: String,
    pub step: String,
    pub plugin: String,
    /// 1-based batch number within the step, when a batch was being processed.
    pub batch: Option<u64>,
    pub cause: String,
    /// The host stopped the plugin.
    pub kill: Option<Box<Kill>>,
}

/// The host stopped a plugin.
#[derive(Debug, Clone)]
pub struct Kill {
    /// `deadline`, `memory` or `output_budget` (see [`plugin::CallError::kill`]).
    pub reason: &'static str,
    /// The plugin's name in the pipeline file.
    pub plugin: String,
}

impl fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pipeline `{}`, step `{}`, plugin `{}`", self.pipeline, self.step, self.plugin)?;
        if let Some(b) = self.batch {
            write!(f, ", batch {b}")?;
        }
        write!(f, ": {}", self.cause)
    }
}

/// Who has to act on an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The pipeline file, a plugin or the input data must be fixed.
    User,
    /// Something outside weir failed (I/O, a missing file system, a source down); retrying
    /// may help.
    External,
    /// A bug in weir.
    Internal,
}

/// Everything a run can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("{}:{line}: step `{step}`, plugin `{plugin}` rejected its config: {message}", file.display())]
    PluginConfig { file: PathBuf, line: usize, step: String, plugin: String, message: String },
    #[error("plugin `{plugin}` cannot be used: {message}")]
    PluginLoad { plugin: String, message: String },
    #[error("{0}")]
    Plugin(PluginFailure),
    #[error("secret `{name}`: {message}")]
    Secret { name: String, message: String },
    #[error("{0}")]
    Io(io::Error),
    #[error("step `{step}` finished but could not be published: {message}")]
    Publish { step: String, message: String },
    #[error("{0}")]
    Store(#[from] store::Error),
    #[error("step `{step}`: publish broke off after {made} of {total} switches: {message}\nthe run had decided to publish: `weir recover` (or the next `weir run`) completes it from its staged output once the cause is fixed")]
    PublishInterrupted { step: String, made: usize, total: usize, message: String },
    #[error("run #{id} of this pipeline and partition is still running (pid {pid} on {host}); pass --wait to run after it, or stop it first")]
    AlreadyRunning { id: i64, pid: u32, host: String },
    #[error("backfill: {0}")]
    Backfill(String),
    #[error("resume: {0}")]
    Resume(String),
    #[error("lineage: {0}")]
    Lineage(String),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("step `{step}`: {message}")]
    Check { step: String, message: String },
    /// A source's columns changed in a way its `schema_change` does not take.
    #[error("source `{source_name}`: {message}")]
    SchemaChanged { source_name: String, message: String },
    #[error("step `{step}`: its output cannot be published: {message}")]
    Output { step: String, message: String },
    #[error("step `{step}` failed its quality gate, so nothing was published:\n{message}")]
    CheckFailed { step: String, message: String },
    /// The run was asked to stop (`PATCH /runs/{id}` of `weir serve`) and stopped at a
    /// batch boundary before it decided to publish: nothing was published.
    #[error("cancelled ({0}); nothing was published")]
    Cancelled(String),
    #[error("internal error (a bug in weir, please report it): {0}")]
    Internal(String),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e {
            // an extractor is a plugin like any other: its failures (and kills) say so
            io::Error::Plugin(f) => Error::Plugin(*f),
            e => Error::Io(e),
        }
    }
}

impl Error {
    /// Whether retrying the step may help: external failures (I/O, input not there yet),
    /// decided by [`Error::kind`] alone, except those a retry cannot change (another run
    /// holds the partition; a publish that broke off after its decision is completed by
    /// recovery, not by running the step again).
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::External
            && !matches!(self, Error::AlreadyRunning { .. } | Error::PublishInterrupted { .. })
    }

    /// Classify: does the user fix it, might a retry help, or is it a bug? Decided here, in
    /// one place, from where the error was raised.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_)
            | Error::Backfill(_)
            | Error::Resume(_)
            | Error::Lineage(_)
            | Error::Metrics(_)
            | Error::Check { .. }
            | Error::SchemaChanged { .. }
            | Error::Output { .. }
            | Error::CheckFailed { .. }
            | Error::PluginConfig { .. }
            | Error::PluginLoad { .. }
            | Error::Plugin(_)
            | Error::Secret { .. }
            | Error::Cancelled(_) => ErrorKind::User,
            // malformed data is the user's to fix; input that is not there yet may arrive
            Error::Io(io::Error::Input { .. } | io::Error::SourceInvalid { .. }) => ErrorKind::User,
            Error::Io(io::Error::Internal(_)) | Error::Internal(_) => ErrorKind::Internal,
            Error::Io(io::Error::Plugin(_)) => ErrorKind::User,
            Error::Io(
                io::Error::NoInput { .. } | io::Error::Io { .. } | io::Error::Write { .. } | io::Error::Source { .. },
            )
            | Error::Publish { .. }
            | Error::PublishInterrupted { .. }
            | Error::Store(_)
            | Error::AlreadyRunning { .. } => ErrorKind::External,
        }
    }
}

/// The differences between two recorded source schemas, for a person:
/// `+ email (Utf8); - name (Utf8); amount Int64 -> Float64`.
pub fn schema_diff(old: &[store::SchemaColumn], new: &[store::SchemaColumn]) -> String {
    let d = engine::schema_diff(old, new);
    if d.is_empty() {
        "(same columns)".into()
    } else {
        d
    }
}

/// `Result` with the weir [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_classification_decides_retries() {
        let input = io::Error::Input { file: "a.csv".into(), line: 3, column: None, message: "bad".into() };
        let cases: Vec<(Error, ErrorKind, bool)> = vec![
            (Error::Io(io::Error::NoInput { pattern: "in/*.csv".into() }), ErrorKind::External, true),
            (
                Error::Io(io::Error::Write { path: "out".into(), message: "disk full".into() }),
                ErrorKind::External,
                true,
            ),
            (Error::Io(input), ErrorKind::User, false),
            (
                Error::Output { step: "s".into(), message: "partition_by column `day` is missing".into() },
                ErrorKind::User,
                false,
            ),
            (Error::AlreadyRunning { id: 1, pid: 2, host: "h".into() }, ErrorKind::External, false),
            (
                Error::PublishInterrupted { step: "s".into(), made: 1, total: 3, message: "x".into() },
                ErrorKind::External,
                false,
            ),
            (Error::Internal("bug".into()), ErrorKind::Internal, false),
        ];
        for (e, kind, transient) in cases {
            assert_eq!((e.kind(), e.is_transient()), (kind, transient), "{e}");
        }
    }
}
