//! The Parquet sink: zstd-compressed files, hive-style partition directories
//! (`order_date=2024-01-15/part-00000.parquet`), written to a staging directory that no
//! reader looks at, then published by renames.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, RecordBatch, UInt32Array};
use arrow_cast::display::ArrayFormatter;
use arrow_schema::{Schema, SchemaRef};
use parquet::file::properties::WriterProperties;

use super::{Sink, SinkPosition};
use crate::config::Codec;
use crate::io::encode::{CopiedGroup, ParallelWriter};
use crate::io::{Error, Result};

/// The directory name used for null partition values (as Hive does).
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";
/// More distinct partition values than this in one run is almost surely a mistake.
pub const MAX_PARTITIONS: usize = 10_000;

/// Escape a partition value for a directory name (`/`, `=`, `%` and control characters).
pub fn escape_partition(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c == '/' || c == '=' || c == '%' || c == '\\' || c.is_control() || (out.is_empty() && c == '.') {
            for b in c.to_string().bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// Undo [`escape_partition`].
pub fn unescape_partition(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() + 1 && v.is_char_boundary(i + 3) {
            if let Ok(b) = u8::from_str_radix(&v[i + 1..i + 3], 16) {
                if b != 0 {
                    out.push(b);
                }
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes one step's output into a staging directory.
pub struct ParquetSink {
    staging: PathBuf,
    /// (index of the partition column in the input, its name)
    partition: Option<(usize, String)>,
    file_schema: SchemaRef,
    props: WriterProperties,
    writers: BTreeMap<String, ParallelWriter>,
    pub rows_written: u64,
    /// Part number of the files being written (`part-00003.parquet`).
    part: u32,
    /// Complete files so far, relative to the staging directory.
    files: Vec<String>,
    /// CPU nanoseconds of the threads encoding this sink's files.
    encode_cpu: Arc<std::sync::atomic::AtomicU64>,
}

/// Whether a step's output of `schema` can be written faithfully by this sink, partitioned
/// by `partition_by`; the reason if not. Checked before any batch is read, so a plugin that
/// declares an unwritable schema fails at init, naming the column.
pub fn check_output_schema(schema: &Schema, partition_by: Option<&str>) -> std::result::Result<(), String> {
    use arrow_schema::DataType;
    // the Parquet schema converter panics on some types instead of returning an error
    fn unwritable(dt: &DataType) -> bool {
        match dt {
            DataType::Union(..) => true,
            DataType::List(f)
            | DataType::LargeList(f)
            | DataType::ListView(f)
            | DataType::LargeListView(f)
            | DataType::FixedSizeList(f, _)
            | DataType::Map(f, _)
            | DataType::RunEndEncoded(_, f) => unwritable(f.data_type()),
            DataType::Struct(fs) => fs.iter().any(|f| unwritable(f.data_type())),
            DataType::Dictionary(_, v) => unwritable(v),
            _ => false,
        }
    }
    for f in schema.fields() {
        if unwritable(f.data_type()) {
            return Err(format!("column `{}` has type {}, which Parquet cannot hold", f.name(), f.data_type()));
        }
    }
    let mut file_fields: Vec<_> = schema.fields().iter().cloned().collect();
    if let Some(col) = partition_by {
        let i = schema.index_of(col).map_err(|_| {
            format!(
                "partition_by column `{col}` is not in the step's output (columns: {})",
                weir_sdk::util::schema_text(schema)
            )
        })?;
        let dt = schema.field(i).data_type();
        let value_type = match dt {
            DataType::Dictionary(_, v) => v.as_ref(),
            other => other,
        };
        let names_a_directory = value_type.is_primitive()
            || matches!(value_type, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Boolean);
        if !names_a_directory {
            return Err(format!(
                "partition_by column `{col}` has type {dt}, which cannot name a partition directory; partition by a string, number, boolean, date or timestamp column"
            ));
        }
        file_fields.remove(i);
    }
    let file_schema = Schema::new(file_fields);
    match std::panic::catch_unwind(|| parquet::arrow::ArrowSchemaConverter::new().convert(&file_schema)) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("Parquet cannot hold it: {e}")),
        Err(_) => Err("Parquet cannot hold one of its column types".into()),
    }
}

impl ParquetSink {
    /// A sink for batches of `schema`, staged under `staging` (created, must not exist).
    pub fn new(
        staging: &Path,
        schema: SchemaRef,
        partition_by: Option<&str>,
        row_group_size: usize,
        codec: Codec,
    ) -> Result<Self> {
        let partition = match partition_by {
            Some(col) => {
                let i = schema.index_of(col).map_err(|_| Error::Write {
                    path: staging.to_path_buf(),
                    message: format!(
                        "partition_by column `{col}` is not in the step's output (columns: {})",
                        weir_sdk::util::schema_text(&schema)
                    ),
                })?;
                Some((i, col.to_string()))
            }
            None => None,
        };
        let file_schema = match &partition {
            Some((i, _)) => {
                let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
                fields.remove(*i);
                Arc::new(Schema::new(fields))
            }
            None => schema.clone(),
        };
        std::fs::create_dir_all(staging).map_err(|e| Error::io(staging, e))?;
        let props = properties(codec, row_group_size);
        Ok(ParquetSink {
            staging: staging.to_path_buf(),
            partition,
            file_schema,
            props,
            writers: BTreeMap::new(),
            rows_written: 0,
            part: 0,
            files: Vec::new(),
            encode_cpu: Default::default(),
        })
    }

    fn writer(&mut self, dir: &str) -> Result<&mut ParallelWriter> {
        if !self.writers.contains_key(dir) {
            if self.writers.len() >= MAX_PARTITIONS {
                return Err(Error::Write {
                    path: self.staging.clone(),
                    message: format!(
                        "more than {MAX_PARTITIONS} partitions in one run; is partition_by the right column?"
                    ),
                });
            }
            let dir_path = if dir.is_empty() { self.staging.clone() } else { self.staging.join(dir) };
            std::fs::create_dir_all(&dir_path).map_err(|e| Error::io(&dir_path, e))?;
            let path = dir_path.join(format!("part-{:05}.parquet", self.part));
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            // one file at a time gets encoding threads: a partitioned output may hold
            // thousands of files open
            let threaded = self.writers.is_empty();
            let w = ParallelWriter::try_new(
                file,
                self.file_schema.clone(),
                self.props.clone(),
                threaded,
                self.encode_cpu.clone(),
            )
            .map_err(|e| Error::Write { path: path.clone(), message: e.to_string() })?;
            self.writers.insert(dir.to_string(), w);
        }
        Ok(self.writers.get_mut(dir).expect("inserted above"))
    }

    /// Write one batch (split by partition value when the output is partitioned).
    fn write_batch(&mut self, batch: &RecordBatch) -> Result<()> {
        let staging = self.staging.clone();
        let werr = |e: parquet::errors::ParquetError| Error::Write { path: staging.clone(), message: e.to_string() };
        let Some((pcol, pname)) = self.partition.clone() else {
            self.writer("")?.write(batch).map_err(werr)?;
            self.rows_written += batch.num_rows() as u64;
            return Ok(());
        };
        let col = batch.column(pcol);
        let fmt =
            ArrayFormatter::try_new(col.as_ref(), &Default::default()).map_err(|e| Error::Internal(e.to_string()))?;
        let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for row in 0..batch.num_rows() {
            let value = if col.is_null(row) {
                NULL_PARTITION.to_string()
            } else {
                escape_partition(&fmt.value(row).to_string())
            };
            groups.entry(value).or_default().push(row as u32);
        }
        let mut columns: Vec<_> = batch.columns().to_vec();
        columns.remove(pcol);
        let without =
            RecordBatch::try_new(self.file_schema.clone(), columns).map_err(|e| Error::Internal(e.to_string()))?;
        for (value, rows) in groups {
            let part = if rows.len() == batch.num_rows() {
                without.clone()
            } else {
                let idx = UInt32Array::from(rows);
                arrow_select::take::take_record_batch(&without, &idx).map_err(|e| Error::Internal(e.to_string()))?
            };
            let dir = format!("{pname}={value}");
            self.writer(&dir)?.write(&part).map_err(werr)?;
            self.rows_written += part.num_rows() as u64;
        }
        Ok(())
    }

    /// Close the files being written (fsync'd) so they count as complete; later batches go to
    /// new part files. Called at checkpoints.
    fn rotate(&mut self) -> Result<()> {
        for (dir, w) in std::mem::take(&mut self.writers) {
            let name = format!("part-{:05}.parquet", self.part);
            let rel = if dir.is_empty() { name } else { format!("{dir}/{name}") };
            let file =
                w.into_inner().map_err(|e| Error::Write { path: self.staging.join(&rel), message: e.to_string() })?;
            file.sync_all().map_err(|e| Error::io(&self.staging.join(&rel), e))?;
            self.files.push(rel);
        }
        self.part += 1;
        Ok(())
    }
}

impl Sink for ParquetSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.write_batch(batch)
    }

    /// Close the files being written (fsync'd) so they count as complete; later batches go
    /// to new part files. The position is the complete files and the next part number.
    fn checkpoint(&mut self) -> Result<SinkPosition> {
        self.rotate()?;
        let progress = Progress { files: self.files.clone(), next_part: self.part };
        serde_json::to_value(progress).map_err(|e| Error::Internal(e.to_string()))
    }

    /// Continue a staging directory from a checkpoint: keep its files, delete anything
    /// written after them, and write new parts from its next part number on.
    fn resume(&mut self, at: &SinkPosition, rows_written: u64) -> Result<()> {
        let position: Progress = serde_json::from_value(at.clone())
            .map_err(|e| Error::Internal(format!("a Parquet sink cannot continue from {at}: {e}")))?;
        let (files, next_part) = (position.files, position.next_part);
        let mut present = Vec::new();
        collect_files(&self.staging, &self.staging, &mut present);
        for rel in present {
            if !files.contains(&rel) {
                let p = self.staging.join(&rel);
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        self.files = files;
        self.part = next_part;
        self.rows_written = rows_written;
        Ok(())
    }

    /// Close every file (fsync'd). Returns the partition directories holding data (empty for
    /// an unpartitioned output). An unpartitioned output with no rows still gets a file, so
    /// readers see the schema.
    fn finish(mut self: Box<Self>) -> Result<Vec<String>> {
        if self.partition.is_none() && self.writers.is_empty() && self.files.is_empty() {
            self.writer("")?;
        }
        self.rotate()?;
        let mut dirs: Vec<String> =
            self.files.iter().filter_map(|f| f.split_once('/').map(|(d, _)| d.to_string())).collect();
        dirs.sort();
        dirs.dedup();
        Ok(dirs)
    }

    /// CPU seconds the threads encoding this sink's files have used so far (they work
    /// beside the thread calling [`Sink::write`], which only queues batches).
    fn encode_cpu(&self) -> Box<dyn Fn() -> f64 + Send> {
        let cpu = self.encode_cpu.clone();
        Box::new(move || cpu.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9)
    }

    /// Per output field, the Parquet column it is written as when it is one flat column (the
    /// only kind whose chunks can be copied from an input file). None for a partitioned
    /// output, which cannot copy.
    fn copy_targets(&self) -> Vec<Option<parquet::schema::types::ColumnDescPtr>> {
        let fields = self.file_schema.fields().len();
        let descr = match parquet::arrow::ArrowSchemaConverter::new().convert(&self.file_schema) {
            Ok(d) if self.partition.is_none() => d,
            _ => return vec![None; fields],
        };
        let mut leaves: Vec<Vec<usize>> = vec![Vec::new(); fields];
        for leaf in 0..descr.num_columns() {
            if let Some(l) = leaves.get_mut(descr.get_column_root_idx(leaf)) {
                l.push(leaf);
            }
        }
        leaves
            .into_iter()
            .map(|l| match l[..] {
                [leaf] if descr.column(leaf).path().parts().len() == 1 => Some(descr.column(leaf)),
                _ => None,
            })
            .collect()
    }

    /// The next `group.rows` rows make a row group of their own that copies some columns as
    /// they are from an input file's row group (see [`CopiedGroup`]). Unpartitioned only.
    fn copy_next(&mut self, group: CopiedGroup) -> Result<()> {
        if self.partition.is_some() {
            return Err(Error::Internal("a partitioned output cannot copy column chunks".into()));
        }
        let staging = self.staging.clone();
        self.writer("")?.copy_next(group).map_err(|e| Error::Write { path: staging, message: e.to_string() })
    }
}

/// What a checkpoint records of a Parquet sink.
#[derive(serde::Serialize, serde::Deserialize)]
struct Progress {
    /// Complete files, relative to the staging directory.
    files: Vec<String>,
    /// The part number the next files get.
    next_part: u32,
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

/// The writer settings of an output's files.
pub fn properties(codec: crate::config::Codec, row_group_size: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(codec.parquet())
        .set_max_row_group_row_count(Some(row_group_size))
        .set_created_by(format!("weir {}", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_values_round_trip() {
        for v in ["2024-01-15", "a/b=c", "50%", ".hidden", "", "plain text"] {
            let e = escape_partition(v);
            assert!(!e.contains('/') && !e.starts_with('.') && !e.is_empty(), "{e}");
            assert_eq!(unescape_partition(&e), v);
        }
    }
}
