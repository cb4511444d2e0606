//! Built-in sources and sinks.

pub mod delta;
mod dict;
mod encode;
mod remote;
pub mod s3_dataset;
pub mod sink;
pub mod source;
pub mod text;

use std::path::{Path, PathBuf};

/// What can go wrong reading input or writing output.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed row or file: the user fixes the data (or sets `on_error = "skip"`).
    #[error("{}:{line}{}: {message}", file.display(), column.as_ref().map(|c| format!(": column `{c}`")).unwrap_or_default())]
    Input { file: PathBuf, line: u64, column: Option<String>, message: String },
    #[error("no input files match {pattern}")]
    NoInput { pattern: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    /// A source system failed or refused (a database down, a query PostgreSQL rejects, a
    /// value weir cannot map).
    #[error("source `{source_name}`: {message}")]
    Source { source_name: String, message: String },
    /// What a source was asked for cannot be read as asked (a type weir does not map, a
    /// query the database refuses, a value out of its column's range): the pipeline or the
    /// data must change.
    #[error("source `{source_name}`: {message}")]
    SourceInvalid { source_name: String, message: String },
    /// An extractor plugin failed, or the host stopped it.
    #[error("{0}")]
    Plugin(Box<crate::PluginFailure>),
    #[error("internal error (a bug in weir, please report it): {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A fixed pseudo-random sequence from `seed` (xorshift64) for the randomized tests: the
/// same values every run, no generator crate.
#[cfg(test)]
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Make a folder's entries (files created, renamed or linked into it) durable; best effort:
/// a file system that cannot sync folders has nothing more to give.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
