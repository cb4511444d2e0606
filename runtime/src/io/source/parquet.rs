//! Parquet files and datasets (hive `key=value` directories become columns), decoded in
//! two halves on two threads when large, or with some columns' pages copied as they are to
//! a Parquet output (the column-copy optimisation).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::basic::Compression;
use parquet::file::metadata::PageIndexPolicy;
use parquet::schema::types::ColumnDescPtr;

use super::files::{FileBatches, ReadSpec};
use super::Skipped;
use crate::cpu_clock::CpuTime;
use crate::io::encode::{CopiedGroup, SharedFile};
use crate::io::sink::{unescape_partition, NULL_PARTITION};
use crate::io::{Error, Result};

/// A column a step copies as it is from the input's Parquet pages to its output.
#[derive(Clone, Debug)]
pub struct CopyColumn {
    /// Its position in the reader's schema.
    pub position: usize,
    /// The Parquet column the output writes it as: an input file's column must be the same
    /// for its pages to be copied.
    pub descr: ColumnDescPtr,
}

#[derive(Debug)]
pub(super) struct CopySpec {
    columns: Vec<CopyColumn>,
    /// The output's codec: pages compressed otherwise are decoded and written again.
    codec: Compression,
    /// What the batches carry in place of a copied column, `batch_size` rows long.
    placeholders: Vec<(usize, ArrayRef)>,
}

impl CopySpec {
    /// The copy of those of `columns` whose type has a placeholder (none if no column
    /// qualifies), and their positions.
    pub(super) fn new(
        schema: &SchemaRef,
        columns: Vec<CopyColumn>,
        codec: Compression,
        batch_size: usize,
    ) -> (Option<CopySpec>, Vec<usize>) {
        let mut placeholders = Vec::new();
        let mut kept = Vec::new();
        for c in columns {
            if let Some(p) = placeholder(schema.field(c.position), batch_size) {
                placeholders.push((c.position, p));
                kept.push(c);
            }
        }
        let positions = kept.iter().map(|c| c.position).collect();
        ((!kept.is_empty()).then_some(CopySpec { columns: kept, codec, placeholders }), positions)
    }
}

/// A value-less stand-in for a column the writer copies instead of encoding: nulls when the
/// field allows them, else zeroes (empty strings, false). `None` for a type whose zeroes
/// are not valid values (such a column is read as usual).
pub fn placeholder(field: &Field, rows: usize) -> Option<ArrayRef> {
    let nulls = arrow_array::new_null_array(field.data_type(), rows);
    if field.is_nullable() {
        return Some(nulls);
    }
    match field.data_type() {
        t if t.is_primitive() || matches!(t, DataType::Boolean | DataType::Utf8 | DataType::Binary) => {
            let data = nulls.to_data().into_builder().nulls(None).build().ok()?;
            Some(arrow_array::make_array(data))
        }
        _ => None,
    }
}

/// `key=value` directory segments between the dataset root and the file.
fn hive_values(root: Option<&Path>, file: &Path) -> Vec<(String, String)> {
    let Some(root) = root else { return Vec::new() };
    let Ok(rel) = file.strip_prefix(root) else {
        return Vec::new();
    };
    rel.parent()
        .map(|p| {
            p.components()
                .filter_map(|c| c.as_os_str().to_str())
                .filter_map(|s| s.split_once('='))
                .map(|(k, v)| (k.to_string(), unescape_partition(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// A Parquet file's columns, with its hive directories' columns after them.
pub(super) fn schema(file: &Path, spec: &ReadSpec) -> Result<SchemaRef> {
    let f = File::open(file).map_err(|e| Error::io(file, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| Error::Input {
        file: file.to_path_buf(),
        line: 0,
        column: None,
        message: format!("not a readable Parquet file: {e}"),
    })?;
    let mut fields: Vec<Field> = builder.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    for (k, _) in hive_values(spec.root.as_deref(), file) {
        let t = spec.hive_types.get(&k).cloned().unwrap_or(DataType::Utf8);
        fields.push(Field::new(k, t, true));
    }
    Ok(Arc::new(Schema::new(fields)))
}

pub(super) struct ParquetFile {
    path: PathBuf,
    /// The file's reader; when copying, the current row group's (none between them).
    reader: Option<ParquetRecordBatchReader>,
    schema: SchemaRef,
    /// Constant columns from the file's hive directories: (position in schema, value).
    hive: Vec<(usize, String)>,
    consumed: u64,
    copy: Option<FileCopy>,
    /// The other half of the columns, decoded on a thread of its own.
    helper: Option<HalfReader>,
}

/// Batches of some of a file's columns, decoded on a thread of its own: the same rows, batch
/// for batch, as the reader of the other columns on the calling thread.
struct HalfReader {
    batches: Option<Receiver<std::result::Result<RecordBatch, arrow_schema::ArrowError>>>,
    thread: Option<JoinHandle<()>>,
}

impl HalfReader {
    /// Batches decoded ahead, at most: enough to keep the thread busy, little memory.
    const AHEAD: usize = 2;

    fn spawn(reader: ParquetRecordBatchReader, cpu: Arc<AtomicU64>) -> Option<HalfReader> {
        let (tx, rx) = sync_channel(Self::AHEAD);
        let work = move || {
            let start = CpuTime::now();
            let mut reader = reader;
            loop {
                // a decoder panic on a damaged file is that file's error, not a lost thread
                let batch = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.next())) {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(_) => Err(arrow_schema::ArrowError::ParquetError("the decoder failed on damaged data".into())),
                };
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    break; // the file was dropped, or this half cannot go on
                }
            }
            cpu.fetch_add((start.elapsed_secs() * 1e9) as u64, Ordering::Relaxed);
        };
        let thread = std::thread::Builder::new().name("weir-read-half".into()).spawn(work).ok()?;
        Some(HalfReader { batches: Some(rx), thread: Some(thread) })
    }

    /// The next batch; none at the end (or when the thread died, which the row check
    /// catches).
    fn next(&mut self) -> Option<std::result::Result<RecordBatch, arrow_schema::ArrowError>> {
        self.batches.as_ref()?.recv().ok()
    }
}

impl Drop for HalfReader {
    fn drop(&mut self) {
        // the thread stops at its next send
        self.batches = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The projected root columns of a file in two halves of about equal decoded size (the
/// metadata's uncompressed sizes), when the file has enough rows after `offset` for a
/// second decoding thread to pay off.
fn split_roots(
    meta: &parquet::file::metadata::ParquetMetaData,
    roots: &[usize],
    batch_size: usize,
    offset: u64,
) -> Option<(Vec<usize>, Vec<usize>)> {
    let rows = meta.file_metadata().num_rows().max(0) as u64;
    if roots.len() < 2 || rows.saturating_sub(offset) < 4 * batch_size as u64 {
        return None;
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return None;
    }
    let descr = meta.file_metadata().schema_descr();
    let mut sizes: Vec<(usize, i64)> = roots.iter().map(|&r| (r, 0)).collect();
    for g in meta.row_groups() {
        for (leaf, c) in g.columns().iter().enumerate() {
            let root = descr.get_column_root_idx(leaf);
            if let Some(s) = sizes.iter_mut().find(|(r, _)| *r == root) {
                s.1 = s.1.saturating_add(c.uncompressed_size().max(0));
            }
        }
    }
    // largest first, each to the lighter half
    sizes.sort_by_key(|(r, size)| (std::cmp::Reverse(*size), *r));
    let (mut a, mut b) = ((Vec::new(), 0i64), (Vec::new(), 0i64));
    for (root, size) in sizes {
        let half = if a.1 <= b.1 { &mut a } else { &mut b };
        half.0.push(root);
        half.1 = half.1.saturating_add(size);
    }
    a.0.sort_unstable();
    b.0.sort_unstable();
    Some((a.0, b.0))
}

/// A file read row group by row group, some of its columns copied rather than decoded.
struct FileCopy {
    spec: Arc<CopySpec>,
    file: SharedFile,
    file_len: u64,
    path: Arc<PathBuf>,
    meta: ArrowReaderMetadata,
    /// The columns decoded (every column but the copied ones).
    mask: ProjectionMask,
    /// (position in the batches, leaf column in the file) of the copied columns.
    columns: Vec<(usize, usize)>,
    batch_size: usize,
    next_group: usize,
    /// Rows of the current row group not read yet.
    left: usize,
    /// The current row group, until the engine takes it.
    pending: Option<CopiedGroup>,
}

impl FileCopy {
    /// Copying for this file, when every copied column is the output's Parquet column and
    /// compressed with its codec, and `offset` (a resumed run) falls between row groups.
    fn open(path: &Path, spec: &ReadSpec, schema: &SchemaRef, offset: u64) -> Result<Option<FileCopy>> {
        let Some(copy) = spec.copy.clone() else { return Ok(None) };
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional);
        let Ok(meta) = ArrowReaderMetadata::load(&f, options) else { return Ok(None) };
        let parquet = meta.metadata();
        let descr = parquet.file_metadata().schema_descr();
        let mut columns = Vec::new();
        for c in &copy.columns {
            let name = schema.field(c.position).name();
            // (a column not in the file, such as a hive partition value, is not copied)
            let Some(leaf) = (0..descr.num_columns()).find(|&l| descr.column(l).path().parts() == [name.clone()])
            else {
                continue;
            };
            if *descr.column(leaf) != *c.descr {
                return Ok(None);
            }
            let same_codec = parquet
                .row_groups()
                .iter()
                .all(|g| std::mem::discriminant(&g.column(leaf).compression()) == std::mem::discriminant(&copy.codec));
            if !same_codec {
                return Ok(None);
            }
            columns.push((c.position, leaf));
        }
        if columns.is_empty() {
            return Ok(None);
        }
        let mut next_group = parquet.num_row_groups();
        let mut start = 0u64;
        for (i, g) in parquet.row_groups().iter().enumerate() {
            if start == offset {
                next_group = i;
                break;
            }
            start += g.num_rows().max(0) as u64;
        }
        if next_group == parquet.num_row_groups() && start != offset {
            return Ok(None);
        }
        let copied: Vec<&String> = columns.iter().map(|(p, _)| schema.field(*p).name()).collect();
        let roots: Vec<usize> = (0..descr.root_schema().get_fields().len())
            .filter(|&r| {
                let name = descr.root_schema().get_fields()[r].name().to_string();
                !copied.contains(&&name) && spec.projection.as_ref().is_none_or(|p| p.contains(&name))
            })
            .collect();
        let mask = ProjectionMask::roots(descr, roots);
        Ok(Some(FileCopy {
            spec: copy,
            file: SharedFile(Arc::new(f)),
            file_len,
            path: Arc::new(path.to_path_buf()),
            meta,
            mask,
            columns,
            batch_size: spec.batch_size,
            next_group,
            left: 0,
            pending: None,
        }))
    }

    /// A reader of the next non-empty row group (and its announcement), or none at the end.
    fn next_group(&mut self) -> parquet::errors::Result<Option<ParquetRecordBatchReader>> {
        let groups = self.meta.metadata().row_groups();
        while self.next_group < groups.len() {
            let g = self.next_group;
            self.next_group += 1;
            let rows = usize::try_from(groups[g].num_rows()).unwrap_or(0);
            if rows == 0 {
                continue;
            }
            let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(self.file.clone(), self.meta.clone())
                .with_projection(self.mask.clone())
                .with_row_groups(vec![g])
                .with_batch_size(self.batch_size)
                .build()?;
            self.left = rows;
            self.pending = Some(CopiedGroup {
                file: self.file.clone(),
                file_len: self.file_len,
                path: self.path.clone(),
                metadata: self.meta.metadata().clone(),
                row_group: g,
                rows,
                columns: self.columns.clone(),
            });
            return Ok(Some(reader));
        }
        Ok(None)
    }
}

impl ParquetFile {
    pub(super) fn open(path: &Path, schema: &SchemaRef, spec: &ReadSpec, offset: u64) -> Result<Self> {
        let bad = |message: String| Error::Input { file: path.to_path_buf(), line: 0, column: None, message };
        let hive: Vec<(usize, String)> = hive_values(spec.root.as_deref(), path)
            .into_iter()
            .filter_map(|(k, v)| schema.index_of(&k).ok().map(|i| (i, v)))
            .collect();
        if let Some(copy) = FileCopy::open(path, spec, schema, offset)? {
            return Ok(ParquetFile {
                path: path.to_path_buf(),
                reader: None,
                schema: schema.clone(),
                hive,
                consumed: offset,
                copy: Some(copy),
                helper: None,
            });
        }
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = ArrowReaderMetadata::load(&f, ArrowReaderOptions::new())
            .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
        // read at offsets, so that two threads can decode columns of it at once
        let file = SharedFile(Arc::new(f));
        let file_fields = meta.schema().fields().len();
        let roots: Vec<usize> = meta
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| spec.projection.as_ref().is_none_or(|cols| cols.contains(f.name())))
            .map(|(i, _)| i)
            .collect();
        if spec.projection.is_none() && file_fields + hive.len() != schema.fields().len() {
            return Err(bad(format!(
                "has columns [{}], which differ from the first file's [{}]",
                weir_sdk::util::schema_text(meta.schema()),
                weir_sdk::util::schema_text(schema)
            )));
        }
        let reader_of = |roots: Vec<usize>| {
            let mask = ProjectionMask::roots(meta.metadata().file_metadata().schema_descr(), roots);
            ParquetRecordBatchReaderBuilder::new_with_metadata(file.clone(), meta.clone())
                .with_projection(mask)
                .with_batch_size(spec.batch_size)
                .with_offset(offset as usize)
                .build()
                .map_err(|e| bad(e.to_string()))
        };
        let (reader, helper) = match split_roots(meta.metadata(), &roots, spec.batch_size, offset) {
            Some((mine, theirs)) => match HalfReader::spawn(reader_of(theirs)?, spec.helper_cpu.clone()) {
                Some(helper) => (reader_of(mine)?, Some(helper)),
                None => (reader_of(roots)?, None),
            },
            None => (reader_of(roots)?, None),
        };
        Ok(ParquetFile {
            path: path.to_path_buf(),
            reader: Some(reader),
            schema: schema.clone(),
            hive,
            consumed: offset,
            copy: None,
            helper,
        })
    }

    fn read_batch(&mut self) -> Result<Option<RecordBatch>> {
        let corrupt = |path: &Path, e: &dyn std::fmt::Display| Error::Input {
            file: path.to_path_buf(),
            line: 0,
            column: None,
            message: format!("corrupt Parquet data: {e}"),
        };
        let batch = loop {
            if self.reader.is_none() {
                let Some(copy) = self.copy.as_mut() else { return Ok(None) };
                match copy.next_group() {
                    Ok(Some(r)) => self.reader = Some(r),
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(corrupt(&self.path, &e)),
                }
            }
            let next = self.reader.as_mut().and_then(|r| r.next());
            match next {
                None if self.copy.is_some() => {
                    self.reader = None;
                    let left = self.copy.as_ref().map_or(0, |c| c.left);
                    if left > 0 {
                        return Err(corrupt(&self.path, &format!("a row group ended {left} rows short of its length")));
                    }
                }
                None => {
                    if let Some(Ok(b)) = self.helper.as_mut().and_then(HalfReader::next) {
                        let more = format!("some columns hold {} rows more than others", b.num_rows());
                        return Err(corrupt(&self.path, &more));
                    }
                    return Ok(None);
                }
                Some(Err(e)) => return Err(corrupt(&self.path, &e)),
                Some(Ok(b)) => break b,
            }
        };
        let batch = match self.helper.as_mut() {
            None => batch,
            Some(helper) => match helper.next() {
                Some(Ok(other)) if other.num_rows() == batch.num_rows() => {
                    let (mut fields, mut columns) = (batch.schema().fields().to_vec(), batch.columns().to_vec());
                    fields.extend(other.schema().fields().iter().cloned());
                    columns.extend(other.columns().iter().cloned());
                    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| corrupt(&self.path, &e))?
                }
                Some(Ok(other)) => {
                    let rows = format!(
                        "a batch of {} rows in some columns has {} in others",
                        batch.num_rows(),
                        other.num_rows()
                    );
                    return Err(corrupt(&self.path, &rows));
                }
                Some(Err(e)) => return Err(corrupt(&self.path, &e)),
                None => return Err(corrupt(&self.path, &"some columns end before others")),
            },
        };
        if let Some(copy) = self.copy.as_mut() {
            copy.left = copy
                .left
                .checked_sub(batch.num_rows())
                .ok_or_else(|| corrupt(&self.path, &"a row group holds more rows than its metadata says"))?;
        }
        self.consumed += batch.num_rows() as u64;
        let batch_schema = batch.schema();
        let copied = |i: usize| {
            let c = self.copy.as_ref()?;
            c.columns.iter().any(|(p, _)| *p == i).then(|| c.spec.placeholders.iter().find(|(p, _)| *p == i))?
        };
        let mut ordered: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for (i, f) in self.schema.fields().iter().enumerate() {
            if let Some((_, v)) = self.hive.iter().find(|(h, _)| *h == i) {
                let col = if v == NULL_PARTITION {
                    arrow_array::new_null_array(f.data_type(), batch.num_rows())
                } else {
                    let strings: ArrayRef = Arc::new(StringArray::from(vec![Some(v.as_str()); batch.num_rows()]));
                    arrow_cast::cast(&strings, f.data_type()).map_err(|e| Error::Internal(e.to_string()))?
                };
                ordered.push(col);
            } else if let Some((_, p)) = copied(i) {
                ordered.push(if p.len() >= batch.num_rows() {
                    p.slice(0, batch.num_rows())
                } else {
                    placeholder(f, batch.num_rows()).ok_or_else(|| Error::Internal("no placeholder".into()))?
                });
            } else {
                let idx = batch_schema.index_of(f.name()).map_err(|_| Error::Input {
                    file: self.path.clone(),
                    line: 0,
                    column: Some(f.name().clone()),
                    message: "column missing from this file".into(),
                })?;
                ordered.push(batch.column(idx).clone());
            }
        }
        let out = RecordBatch::try_new(self.schema.clone(), ordered).map_err(|e| Error::Input {
            file: self.path.clone(),
            line: 0,
            column: None,
            message: format!("does not match the dataset schema: {e}"),
        })?;
        Ok(Some(out))
    }
}

impl FileBatches for ParquetFile {
    fn next_batch(&mut self, _skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        self.read_batch()
    }

    fn consumed(&self) -> u64 {
        self.consumed
    }

    fn take_copied(&mut self) -> Option<CopiedGroup> {
        self.copy.as_mut().and_then(|c| c.pending.take())
    }

    fn at_row_group_end(&self) -> bool {
        self.copy.as_ref().is_none_or(|c| c.left == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::source::{FileSource, Source};
    use arrow_array::{Float64Array, Int64Array};

    fn batch(rows: usize) -> RecordBatch {
        let ids: Vec<i64> = (0..rows as i64).collect();
        let notes: Vec<String> = (0..rows).map(|i| format!("note {i} {}", "x".repeat(i % 40))).collect();
        let amounts: Vec<Option<f64>> = (0..rows).map(|i| (i % 7 != 0).then_some(i as f64 / 4.0)).collect();
        let codes: Vec<Option<&str>> = (0..rows).map(|i| (i % 5 != 0).then_some(["DE", "FR", "US"][i % 3])).collect();
        RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from(ids)) as ArrayRef),
            ("note", Arc::new(StringArray::from(notes))),
            ("amount", Arc::new(Float64Array::from(amounts))),
            ("code", Arc::new(StringArray::from(codes))),
        ])
        .unwrap()
    }

    fn write(dir: &Path, b: &RecordBatch) {
        let f = File::create(dir.join("part-0.parquet")).unwrap();
        let props =
            parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(700)).build();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, b.schema(), Some(props)).unwrap();
        w.write(b).unwrap();
        w.close().unwrap();
    }

    /// A large file's columns are decoded in two halves, one on a thread of its own: the
    /// batches are the file's rows, whole and in order, from the start and from an offset
    /// (a resumed run), across row groups.
    #[test]
    fn a_file_decoded_in_two_halves_reads_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let all = batch(2000);
        write(dir.path(), &all);
        for start in [0u64, 1234] {
            let mut reader = FileSource::open_dataset(dir.path(), all.schema(), None, 100).unwrap();
            if start > 0 {
                reader.seek(&serde_json::json!({"file": 0, "rows": start})).unwrap();
            }
            let batches: Vec<RecordBatch> = std::iter::from_fn(|| reader.next_batch()).map(|b| b.unwrap()).collect();
            assert!(batches.iter().all(|b| b.num_rows() <= 100 && b.schema() == all.schema()));
            let got = arrow_select::concat::concat_batches(&all.schema(), &batches).unwrap();
            let want = all.slice(start as usize, all.num_rows() - start as usize);
            assert_eq!(got, want, "from row {start}");
            if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
                assert!(reader.helper_cpu_secs() > 0.0, "the second half was decoded on its own thread");
            }
        }
    }

    /// A file too small to split, or with one column, is read on the calling thread alone.
    #[test]
    fn small_or_narrow_files_are_not_split() {
        let dir = tempfile::tempdir().unwrap();
        let small = batch(300);
        write(dir.path(), &small);
        let mut reader = FileSource::open_dataset(dir.path(), small.schema(), None, 100).unwrap();
        let rows: usize = std::iter::from_fn(|| reader.next_batch()).map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 300);
        assert_eq!(reader.helper_cpu_secs(), 0.0);
        let meta =
            ArrowReaderMetadata::load(&File::open(dir.path().join("part-0.parquet")).unwrap(), Default::default())
                .unwrap();
        assert_eq!(split_roots(meta.metadata(), &[0], 10, 0), None);
        let halves = split_roots(meta.metadata(), &[0, 1, 2, 3], 10, 0);
        if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
            // the notes are the largest column: alone in one half
            assert_eq!(halves, Some((vec![1], vec![0, 2, 3])));
        }
        assert_eq!(split_roots(meta.metadata(), &[0, 1, 2, 3], 10, 290), None, "too few rows left");
    }
}
