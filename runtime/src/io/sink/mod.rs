//! Sinks: where a step's output is staged during a run.
//!
//! A step's output goes through one protocol, whatever it is written to:
//!
//! ```text
//!   open (staging nobody reads)  ->  write batches  ->  checkpoint (durable; a position)
//!     ->  finish (all durable)   ->  checks audit it  ->  commit (publish)  |  abort
//! ```
//!
//! The write half is the [`Sink`] trait: the engine writes batches, asks for a checkpoint
//! at the source's batch boundaries (the [`SinkPosition`] it returns is stored with the
//! source's position, and handed back to [`Sink::resume`] by a resumed run) and finishes.
//! The commit half (the run's decision, then one switch per dataset or partition, rolled
//! forward after a crash) is `engine::publish`, through its `Publisher` trait.
//!
//! ## Adding a sink
//!
//! A module with a type implementing [`Sink`], its configuration in `config::Output`, one
//! arm in [`open`], and a `Publisher` for its commit when it is not a local directory
//! switched into place. The quarantine dataset is a sink like any other.
//!
//! The column-copy optimisation is an optional capability: a sink that can take a Parquet
//! input's pages as they are says which columns in [`Sink::copy_targets`]; others return
//! none and are never sent a copied group.

mod parquet;

use std::path::Path;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

pub use self::parquet::{
    check_output_schema, escape_partition, unescape_partition, ParquetSink, MAX_PARTITIONS, NULL_PARTITION,
};

/// Parquet writer settings: a codec, row groups of `row_group_size` rows.
pub fn properties(codec: crate::config::Codec, row_group_size: usize) -> ::parquet::file::properties::WriterProperties {
    self::parquet::properties(codec, row_group_size)
}

/// The writer settings of an output's Parquet files.
pub fn writer_properties(out: &Output) -> ::parquet::file::properties::WriterProperties {
    self::parquet::properties(out.compression, out.row_group_size)
}
pub use super::encode::CopiedGroup;
use super::Result;
use crate::config::Output;

/// How far a sink's output is durable, as it wrote it: opaque to the engine and the store.
pub type SinkPosition = serde_json::Value;

/// A step's output being staged.
pub trait Sink: Send {
    /// Write one batch (of the schema the sink was opened with).
    fn write(&mut self, batch: &RecordBatch) -> Result<()>;

    /// Make everything written so far durable; what a resumed run continues from.
    fn checkpoint(&mut self) -> Result<SinkPosition>;

    /// Continue a staging area from a checkpoint, discarding what was written after it.
    fn resume(&mut self, at: &SinkPosition, rows_written: u64) -> Result<()>;

    /// Make everything durable and close; returns the partitions written (empty for an
    /// unpartitioned output).
    fn finish(self: Box<Self>) -> Result<Vec<String>>;

    /// A reader of the CPU seconds the sink's own threads have spent so far.
    fn encode_cpu(&self) -> Box<dyn Fn() -> f64 + Send> {
        Box::new(|| 0.0)
    }

    /// Per output field, the Parquet column an input's pages must match to be copied as
    /// they are; none for fields (or sinks) that cannot take copied pages.
    fn copy_targets(&self) -> Vec<Option<::parquet::schema::types::ColumnDescPtr>> {
        Vec::new()
    }

    /// The next `group.rows` rows written copy some columns from an input's pages.
    fn copy_next(&mut self, _group: CopiedGroup) -> Result<()> {
        Err(super::Error::Internal("this sink cannot copy column chunks".into()))
    }
}

/// Open a step's output for a run, staged under `staging` (created; must not exist). A
/// step without an output of its own is staged all the same, for the steps that read it.
pub fn open(output: Option<&Output>, staging: &Path, schema: SchemaRef) -> Result<Box<dyn Sink>> {
    let sink = ParquetSink::new(
        staging,
        schema,
        output.and_then(|o| o.partition_by.as_deref()),
        output.map(|o| o.row_group_size).unwrap_or(1 << 20),
        output.map(|o| o.compression).unwrap_or_default(),
    )?;
    Ok(Box::new(sink))
}

/// One Parquet file written with the sink's encoder (columns encoded on all cores) and its
/// settings, for the files a merge rewrites.
pub struct FileWriter {
    inner: super::encode::ParallelWriter,
    path: std::path::PathBuf,
}

impl FileWriter {
    pub fn create(path: &Path, schema: SchemaRef, out: &Output) -> Result<FileWriter> {
        FileWriter::with_properties(path, schema, writer_properties(out))
    }

    pub fn with_properties(
        path: &Path,
        schema: SchemaRef,
        props: ::parquet::file::properties::WriterProperties,
    ) -> Result<FileWriter> {
        let werr = |e: ::parquet::errors::ParquetError| super::Error::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let file = std::fs::File::create(path).map_err(|e| super::Error::io(path, e))?;
        let cpu = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let inner = super::encode::ParallelWriter::try_new(file, schema, props, true, cpu).map_err(werr)?;
        Ok(FileWriter { inner, path: path.to_path_buf() })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let path = self.path.clone();
        self.inner.write(batch).map_err(|e| super::Error::Write { path, message: e.to_string() })
    }

    /// Finish the file and make it durable.
    pub fn finish(self) -> Result<()> {
        let path = self.path;
        let f =
            self.inner.into_inner().map_err(|e| super::Error::Write { path: path.clone(), message: e.to_string() })?;
        f.sync_all().map_err(|e| super::Error::io(&path, e))
    }
}

/// Open the quarantine dataset of a step: rows a check set aside, with their reasons.
pub fn open_quarantine(staging: &Path, schema: SchemaRef) -> Result<Box<dyn Sink>> {
    Ok(Box::new(ParquetSink::new(staging, schema, None, 1 << 20, Default::default())?))
}

/// Every Parquet file under `dir`, relative to it, skipping hidden and `_` names.
pub fn parquet_files(dir: &Path) -> std::result::Result<Vec<std::path::PathBuf>, String> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries =
            std::fs::read_dir(dir.join(&rel)).map_err(|e| format!("cannot list {}: {e}", dir.join(&rel).display()))?;
        for e in entries {
            let e = e.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            let t = e.file_type().map_err(|e| e.to_string())?;
            if t.is_dir() {
                stack.push(rel.join(&name));
            } else if t.is_file() && name.ends_with(".parquet") {
                out.push(rel.join(&name));
            }
        }
    }
    out.sort();
    Ok(out)
}
