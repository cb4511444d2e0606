//! Sources: where a step's batches come from.
//!
//! The engine sees a source only through the [`Source`] trait: it opens one for a run
//! ([`open`]), asks for its schema, pulls batches, and at batch boundaries asks for its
//! [`Position`], which a checkpoint stores as it is and a resumed run hands back to
//! [`Source::seek`]. Before the run, [`fingerprint`] says whether the input changed since the
//! last successful run (an identical run is skipped).
//!
//! ## Adding a source
//!
//! - A new kind of system (a database, an extractor plugin): write a module with a type that
//!   implements [`Source`], add its configuration to `config::Format` (or a new source
//!   table) and one arm in [`open`] and in [`fingerprint`]. Its position is whatever it needs
//!   to continue (a cursor, a last key, an offset), serialised as JSON; its high watermark, if
//!   it has one, is reported by [`Source::high_watermark`]. The engine does not change.
//! - A new file format: a module like [`csv`] with a schema function and a per-file reader
//!   implementing `files::FileBatches`, and one arm in `files::open_file` / `files::schema_of`.
//!   Listing, globbing, `{partition}`, compression, positions and skipped-row bookkeeping
//!   are shared by [`FileSource`].
//!
//! The column-copy optimisation (Parquet pages copied to a Parquet output without decoding)
//! is an optional capability: [`Source::copy_columns`] and [`Source::take_copied`] default
//! to "not offered", and only the Parquet reader offers it.

mod avro;
mod csv;
mod debezium;
mod extractor;
mod files;
mod jsonl;
mod parquet;
mod postgres;
mod zstd_frames;

use std::path::PathBuf;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

pub use self::debezium::{LSN as DEBEZIUM_LSN, OP as DEBEZIUM_OP};
pub use self::extractor::{ExtractorSetup, ExtractorSource};
pub(crate) use self::files::corrupt_input;
pub use self::files::{expand_paths, FileSource};
pub use self::parquet::{placeholder, CopyColumn};
pub use self::postgres::Increment;
use super::encode::CopiedGroup;
use super::Result;
use crate::config;

/// Where a source continues from, as it wrote it: opaque to the engine and the run store.
pub type Position = serde_json::Value;

/// A row a source skipped (with `on_error = "skip"`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub file: PathBuf,
    pub line: u64,
    pub message: String,
}

impl Skipped {
    /// A row skipped for `message`, about `column` when one is named.
    pub(crate) fn row(file: &std::path::Path, line: u64, column: Option<String>, message: String) -> Self {
        let message = match column {
            Some(c) => format!("column `{c}`: {message}"),
            None => message,
        };
        Skipped { file: file.to_path_buf(), line, message }
    }
}

/// A source opened for one run: a schema, then batches in a repeatable order.
pub trait Source: Send {
    /// The schema of every batch.
    fn schema(&self) -> SchemaRef;

    /// The next batch, or `None` at the end. After an error the source yields nothing more.
    fn next_batch(&mut self) -> Option<Result<RecordBatch>>;

    /// Where the next batch starts. Called between batches; a checkpoint stores it.
    fn position(&self) -> Position;

    /// Continue from a position [`Source::position`] returned (in an earlier process).
    fn seek(&mut self, at: &Position) -> Result<()>;

    /// Whether a checkpoint may be taken now (a source may hold a unit, such as a Parquet
    /// row group whose pages are copied, that must not be split).
    fn at_boundary(&self) -> bool {
        true
    }

    /// Rows skipped so far (`on_error = "skip"`), and the first few with their place.
    fn skipped(&self) -> (u64, &[Skipped]);

    /// How many inputs (files, tables, pages) the run reads, for its summary.
    fn inputs(&self) -> usize;

    /// The highest watermark value read so far, for incremental sources.
    fn high_watermark(&self) -> Option<String> {
        None
    }

    /// An extractor plugin's name and the counters it (and the host, for its requests)
    /// kept, added to the step's counters when the source is done.
    fn plugin_counters(&self) -> Option<(String, std::collections::HashMap<String, i64>)> {
        None
    }

    /// CPU seconds spent decoding on threads of the source's own.
    fn helper_cpu_secs(&self) -> f64 {
        0.0
    }

    /// Offer to copy `columns` from the input's pages instead of decoding them (the
    /// batches then carry placeholders in them). Returns the positions it will copy.
    fn copy_columns(&mut self, _columns: Vec<CopyColumn>, _codec: ::parquet::basic::Compression) -> Vec<usize> {
        Vec::new()
    }

    /// The copied unit whose batches start with the batch just returned.
    fn take_copied(&mut self) -> Option<CopiedGroup> {
        None
    }
}

/// A watermark time as text: `2026-12-03T18:30:00.123456Z`.
pub fn format_micros(us: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(us) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        None => us.to_string(),
    }
}

/// A watermark text that is an RFC 3339 time, in microseconds since 1970.
pub fn parse_micros(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text.trim()).ok().map(|t| t.timestamp_micros())
}

/// Open a configured source for one run (of `partition`, if any); an incremental
/// PostgreSQL source reads `increment`. Extractor plugin sources are opened with
/// [`ExtractorSource::open`], which needs the loaded plugin.
pub fn open(
    source: &config::Source,
    partition: Option<&str>,
    batch_size: usize,
    increment: Option<Increment>,
) -> Result<Box<dyn Source>> {
    if let Some(pg) = &source.postgres {
        return Ok(Box::new(postgres::PgSource::open(source, pg, partition, batch_size, increment)?));
    }
    sync_remote(source, partition)?;
    Ok(Box::new(FileSource::open(source, partition, batch_size, increment)?))
}

/// What decides a source's content for a run, hashed into the run's fingerprint: an
/// identical fingerprint means an identical input.
pub fn fingerprint(source: &config::Source, partition: Option<&str>) -> String {
    if let Some(x) = &source.extractor {
        // stable, so a crashed run resumes from the plugin's own position; every run reads
        // all the same ([`always_reads`])
        return format!("extractor plugin {}", x.plugin);
    }
    if source.postgres.is_some() {
        // a database says nothing cheap about whether its rows changed: every run reads, and
        // a crashed run is not resumed mid-read (a later snapshot may hold other rows)
        static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return format!("postgres read at {} #{n} in {}", crate::store::now_ms(), std::process::id());
    }
    // a bucket that cannot be listed now fails the run when it opens the source
    let _ = sync_remote(source, partition);
    files::fingerprint(source, partition)
}

/// A source on object storage: its matching objects copied to the local folder it reads.
fn sync_remote(source: &config::Source, partition: Option<&str>) -> Result<()> {
    let Some(remote) = &source.remote else { return Ok(()) };
    crate::io::s3_dataset::sync_source(remote, partition)
        .map(|_| ())
        .map_err(|message| super::Error::Source { source_name: source.name.clone(), message })
}

/// Whether a run always reads the source again, whatever the last run read (a database,
/// an API): a pipeline with one is never "up to date".
pub fn always_reads(source: &config::Source) -> bool {
    source.postgres.is_some() || source.extractor.is_some()
}

/// Whether a source reads a different input for each partition (for files: its path has
/// `{partition}`), so that a backfill's partitions do not all read the same data.
pub fn reads_partition(source: &config::Source) -> bool {
    match (&source.postgres, &source.extractor) {
        (Some(pg), _) => pg.window,
        // the plugin sees the partition in its context; a config that names it reads by it
        (None, Some(x)) => x.config_json.contains("{partition}"),
        (None, None) => source.path.contains("{partition}"),
    }
}

/// Open a Parquet dataset directory written by an earlier step (its hive partition column,
/// if any, gets the given type back).
pub fn open_dataset(
    root: &std::path::Path,
    schema: SchemaRef,
    partition_column: Option<&str>,
    batch_size: usize,
) -> Result<Box<dyn Source>> {
    Ok(Box::new(FileSource::open_dataset(root, schema, partition_column, batch_size)?))
}

/// Open Parquet files at a path (file, directory or glob) with their own schema.
pub fn open_parquet(path: &std::path::Path, batch_size: usize) -> Result<Box<dyn Source>> {
    Ok(Box::new(FileSource::open_parquet(path, batch_size)?))
}
