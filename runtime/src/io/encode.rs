//! A Parquet file writer that encodes the columns of a row group on several threads.
//!
//! Encoding (dictionary attempts, statistics, compression) is most of the cost of writing
//! Parquet, and it is independent per column. Each column's writer still takes its batches
//! in order, one thread at a time: a column is "checked out" by a worker, which encodes every
//! slice queued for it and puts it back. Workers pick the column with the longest queue, so a
//! heavy column (a 64-character hash) and the light ones spread over the threads without a
//! fixed assignment. The feeding thread blocks when too much is queued, so memory stays
//! bounded by a few batches per column whatever the file size.
//!
//! Flat columns of 32/64-bit numbers and strings are dictionary-encoded by our own encoder
//! ([`DictColumn`]), which looks values up several times faster than the crate's writer
//! and writes the same layout; the other columns use the crate's column writers.
//!
//! A column whose dictionary overflowed in a row group (ids, hashes, timestamps: nearly
//! every value distinct) is written without one in the row groups after it: each attempt
//! would hash and store about a megabyte of values only to give up and write them plain.
//!
//! A row group can also take some of its columns as they are from a row group of an input
//! Parquet file ([`CopiedGroup`]): their compressed pages are copied into the file, with
//! their statistics and page index, and never decoded or encoded. The batches of such a row
//! group carry placeholders in those columns, which the writer never looks at.

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufWriter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_writer::{
    compute_leaves, ArrowColumnChunk, ArrowColumnWriter, ArrowLeafColumn, ArrowRowGroupWriterFactory,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Encoding, PageType};
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

use super::dict::{DictColumn, DictKind};
use crate::cpu_clock::CpuTime;

type Result<T> = std::result::Result<T, ParquetError>;

/// Slices queued per column before the feeding thread waits.
const QUEUED_PER_COLUMN: usize = 4;

/// Encoding threads for a file: the machine's cores (at least one, at most one per column).
fn encode_threads(columns: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    cores.min(columns).max(1)
}

/// An open file read at explicit offsets (`pread`), never through a shared cursor, so the
/// reader decoding some of its columns and the writer copying others can use it at once.
#[derive(Clone, Debug)]
pub struct SharedFile(pub Arc<File>);

/// Bytes a write to the output file gathers, at most.
const WRITE_BUFFER: usize = 1 << 20;
/// Bytes a copied chunk is read in (the last read of a chunk reads up to this much past its
/// end).
const COPY_READ: usize = 256 << 10;

impl SharedFile {
    /// The file read sequentially in large reads, for copying a column chunk (the Parquet
    /// writer copies through an 8 KiB buffer: a system call each, unbuffered).
    pub fn buffered(&self) -> BufferedFile {
        BufferedFile(self.clone())
    }
}

/// A [`SharedFile`] whose sequential readers read ahead in large blocks.
pub struct BufferedFile(SharedFile);

impl parquet::file::reader::Length for BufferedFile {
    fn len(&self) -> u64 {
        self.0.len()
    }
}

impl parquet::file::reader::ChunkReader for BufferedFile {
    type T = std::io::BufReader<ReadAt>;

    fn get_read(&self, start: u64) -> Result<Self::T> {
        Ok(std::io::BufReader::with_capacity(COPY_READ, self.0.get_read(start)?))
    }

    fn get_bytes(&self, start: u64, length: usize) -> Result<bytes::Bytes> {
        self.0.get_bytes(start, length)
    }
}

/// A sequential reader of a [`SharedFile`] from an offset.
pub struct ReadAt {
    file: Arc<File>,
    pos: u64,
}

impl std::io::Read for ReadAt {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl parquet::file::reader::Length for SharedFile {
    fn len(&self) -> u64 {
        self.0.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

impl parquet::file::reader::ChunkReader for SharedFile {
    type T = ReadAt;

    fn get_read(&self, start: u64) -> Result<ReadAt> {
        Ok(ReadAt { file: self.0.clone(), pos: start })
    }

    fn get_bytes(&self, start: u64, length: usize) -> Result<bytes::Bytes> {
        use parquet::file::reader::Length;
        use std::os::unix::fs::FileExt;
        // the range comes from the file's own footer: check it before allocating for it
        if start.checked_add(length as u64).is_none_or(|end| end > self.len()) {
            return Err(ParquetError::EOF(format!(
                "{length} bytes at {start} lie past the end of the file ({} bytes)",
                self.len()
            )));
        }
        let mut buf = vec![0; length];
        self.0.read_exact_at(&mut buf, start)?;
        Ok(buf.into())
    }
}

/// Columns of the next row group that come as they are from a row group of an input file.
#[derive(Clone, Debug)]
pub struct CopiedGroup {
    /// The input file, and its length (copied bytes must lie inside it).
    pub file: SharedFile,
    pub file_len: u64,
    pub path: Arc<std::path::PathBuf>,
    pub metadata: Arc<ParquetMetaData>,
    pub row_group: usize,
    /// Rows of the row group: exactly this many rows of batches follow.
    pub rows: usize,
    /// (position of the column in the batches, its leaf column in the input file).
    pub columns: Vec<(usize, usize)>,
}

/// The copied group of the row group being written: its input leaf per output leaf.
struct Copying {
    group: CopiedGroup,
    from: Vec<Option<usize>>,
}

/// Writes Arrow batches to one Parquet file, row group after row group.
pub struct ParallelWriter {
    /// (buffered: the Parquet writer writes copied chunks 8 KiB at a time)
    file: SerializedFileWriter<BufWriter<File>>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    row_group_size: usize,
    group: Option<RowGroup>,
    /// The row group before `group`, when it copies columns: every row fed, its threads
    /// finishing the encoding. It is appended to the file when the next one is full (or at
    /// the end), so that its slowest column holds up neither the feeding thread nor the next
    /// row group.
    finishing: Option<(RowGroup, Option<Copying>)>,
    groups_written: usize,
    /// Per leaf column: its dictionary overflowed in an earlier row group, so it is plain now.
    plain: Vec<bool>,
    /// Per leaf column: the values our dictionary encoder takes for it, if it takes it.
    dict: Vec<Option<DictKind>>,
    /// Per leaf column: distinct values in its last dictionary chunk (to size the next).
    dict_entries: Vec<usize>,
    /// Per field of the schema: its leaf columns (a nested field has several).
    leaves: Vec<std::ops::Range<usize>>,
    /// Set while the row group being written copies some columns from an input file.
    copying: Option<Copying>,
    threads: usize,
    /// CPU nanoseconds the encoding threads used (shared by a sink's files).
    cpu: Arc<AtomicU64>,
}

impl ParallelWriter {
    /// A writer for batches of `schema`; the file gets the Arrow schema in its metadata, as
    /// `ArrowWriter` writes it.
    /// `cpu` accumulates the CPU time of the encoding threads, in nanoseconds. Without
    /// `threaded`, columns are encoded on the thread calling [`ParallelWriter::write`] (for the
    /// many files of a partitioned output, which must not hold threads each).
    pub fn try_new(
        file: File,
        schema: SchemaRef,
        props: WriterProperties,
        threaded: bool,
        cpu: Arc<AtomicU64>,
    ) -> Result<Self> {
        let row_group_size = props.max_row_group_row_count().unwrap_or(1 << 20).max(1);
        let file = BufWriter::with_capacity(WRITE_BUFFER, file);
        let (file, factory) = ArrowWriter::try_new(file, schema.clone(), Some(props))?.into_serialized_writer()?;
        let descr = file.schema_descr();
        let columns = descr.num_columns();
        let mut leaves = vec![0..0; schema.fields().len()];
        for leaf in 0..columns {
            if let Some(r) = leaves.get_mut(descr.get_column_root_idx(leaf)) {
                *r = if r.start == r.end { leaf..leaf + 1 } else { r.start..leaf + 1 };
            }
        }
        let mut dict = vec![None; columns];
        for (field, range) in schema.fields().iter().zip(&leaves) {
            if range.len() == 1 {
                dict[range.start] =
                    DictKind::for_column(field.data_type(), &descr.column(range.start), file.properties());
            }
        }
        Ok(ParallelWriter {
            file,
            factory,
            schema,
            row_group_size,
            group: None,
            finishing: None,
            groups_written: 0,
            plain: vec![false; columns],
            dict,
            dict_entries: vec![0; columns],
            leaves,
            copying: None,
            threads: if threaded { encode_threads(columns) } else { 0 },
            cpu,
        })
    }

    /// The next `group.rows` rows written make one row group of their own, whose columns
    /// named in `group` are copied from the input file (the batches' values in those columns
    /// are placeholders and are ignored).
    pub fn copy_next(&mut self, group: CopiedGroup) -> Result<()> {
        self.flush()?;
        let mut from = vec![None; self.plain.len()];
        for &(field, input_leaf) in &group.columns {
            match self.leaves.get(field) {
                Some(r) if r.len() == 1 => from[r.start] = Some(input_leaf),
                _ => {
                    return Err(ParquetError::General(format!(
                        "column {field} cannot be copied: it is not one leaf column of the file"
                    )))
                }
            }
        }
        self.copying = Some(Copying { group, from });
        Ok(())
    }

    /// Queue a batch for encoding (split at row group boundaries).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_columns() != self.schema.fields().len() {
            return Err(ParquetError::General(format!(
                "a batch of {} columns for a file of {}",
                batch.num_columns(),
                self.schema.fields().len()
            )));
        }
        let mut rest = batch.clone();
        while rest.num_rows() > 0 {
            if self.group.is_none() {
                let ordinal = self.groups_written + usize::from(self.finishing.is_some());
                let writers = self.column_encoders(ordinal)?;
                self.group = Some(RowGroup::start(writers, self.threads, &self.cpu));
            }
            let group = self.group.as_mut().expect("started above");
            let size = match &self.copying {
                Some(c) => {
                    // a copied row group ends exactly where its input row group does
                    if group.rows + rest.num_rows() > c.group.rows {
                        return Err(ParquetError::General(format!(
                            "{} rows arrived for a row group copied from {} (row group {}) of {} rows",
                            group.rows + rest.num_rows(),
                            c.group.path.display(),
                            c.group.row_group,
                            c.group.rows
                        )));
                    }
                    c.group.rows
                }
                None => self.row_group_size,
            };
            let take = rest.num_rows().min(size - group.rows);
            let part = rest.slice(0, take);
            rest = rest.slice(take, rest.num_rows() - take);
            let mut leaves = Vec::with_capacity(group.columns);
            for ((field, column), range) in self.schema.fields().iter().zip(part.columns()).zip(&self.leaves) {
                if let Some(c) = &self.copying {
                    if c.from[range.clone()].iter().any(Option::is_some) {
                        continue;
                    }
                }
                if range.len() == 1 && group.dict[range.start] {
                    // (our encoder reads the values by the file's type: the batch must have it)
                    if column.data_type() != field.data_type() {
                        return Err(ParquetError::General(format!(
                            "column `{}`: a batch of {} for a file column of {}",
                            field.name(),
                            column.data_type(),
                            field.data_type()
                        )));
                    }
                    leaves.push((range.start, Leaf::Array(column.clone())));
                    continue;
                }
                let computed = compute_leaves(field, column)?;
                if computed.len() != range.len() {
                    return Err(ParquetError::General("the batch's columns do not match the file's schema".into()));
                }
                leaves.extend(range.clone().zip(computed.into_iter().map(Leaf::Arrow)));
            }
            group.feed(leaves, take)?;
            if group.rows >= size {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Finish the row group being encoded and append it to the file.
    fn flush(&mut self) -> Result<()> {
        let copying = self.copying.take();
        let group = self.group.take().filter(|g| g.rows > 0);
        let rows = group.as_ref().map_or(0, |g| g.rows);
        if let Some(c) = &copying {
            if rows != c.group.rows {
                return Err(ParquetError::General(format!(
                    "{} of {} rows arrived for a row group copied from {} (row group {})",
                    rows,
                    c.group.rows,
                    c.group.path.display(),
                    c.group.row_group
                )));
            }
        }
        let Some(group) = group else { return Ok(()) };
        self.append_finishing()?;
        group.close();
        // A row group that copies columns has few left to encode, often one heavy one, which
        // one thread encodes while the others idle: the next row group starts meanwhile
        // (W1: 1.83 -> 1.66 s). Otherwise the columns already spread over the threads, and a
        // second group's threads would only compete with the rest of the step.
        let overlap = copying.is_some() && self.threads > 0;
        self.finishing = Some((group, copying));
        if !overlap {
            self.append_finishing()?;
        }
        Ok(())
    }

    /// Wait for the finishing row group's encoding and append it to the file.
    fn append_finishing(&mut self) -> Result<()> {
        let Some((group, copying)) = self.finishing.take() else { return Ok(()) };
        let writers = group.finish()?;
        let mut row_group = self.file.next_row_group()?;
        let mut overflowed = false;
        for (leaf, (w, plain)) in writers.into_iter().zip(self.plain.iter_mut()).enumerate() {
            if let Some((c, input_leaf)) = copying.as_ref().and_then(|c| c.from[leaf].map(|i| (c, i))) {
                row_group.append_column(&c.group.file.buffered(), copied_chunk(&c.group, input_leaf)?)?;
                continue;
            }
            match w {
                Encoder::Arrow(w) => {
                    let chunk = w.close()?;
                    if !*plain && dictionary_overflowed(&chunk) {
                        *plain = true;
                        overflowed = true;
                    }
                    chunk.append_to_row_group(&mut row_group)?;
                }
                Encoder::Dict(d) => {
                    self.dict_entries[leaf] = d.entries();
                    if d.overflowed() {
                        *plain = true;
                        overflowed = true;
                    }
                    let (bytes, close) = d.close()?;
                    row_group.append_column(&bytes, close)?;
                }
            }
        }
        row_group.close()?;
        self.groups_written += 1;
        start_writeback(self.file.inner().get_ref());
        if overflowed {
            self.factory = self.plain_factory()?;
        }
        Ok(())
    }

    /// The encoders of row group `ordinal`: ours for the columns it takes (while they keep a
    /// dictionary), the crate's for the rest.
    fn column_encoders(&self, ordinal: usize) -> Result<Vec<Encoder>> {
        let descr = self.file.schema_descr();
        let props = self.file.properties();
        let writers = self.factory.create_column_writers(ordinal)?;
        writers
            .into_iter()
            .enumerate()
            .map(|(leaf, w)| match self.dict[leaf] {
                Some(kind) if !self.plain[leaf] => {
                    let entries = self.dict_entries[leaf];
                    Ok(Encoder::Dict(Box::new(DictColumn::new(descr.column(leaf), kind, props, entries)?)))
                }
                _ => Ok(Encoder::Arrow(Box::new(w))),
            })
            .collect()
    }

    /// Per leaf column: whether our dictionary encoder takes it in the next row group.
    #[cfg(test)]
    fn ours(&self) -> Vec<bool> {
        self.dict.iter().zip(&self.plain).map(|(kind, plain)| kind.is_some() && !plain).collect()
    }

    /// Column writers like the file's, without a dictionary for the columns marked plain.
    /// (The factory takes its settings from a file writer; one over `io::sink` with the same
    /// schema and the changed settings makes writers whose chunks the real file accepts.)
    fn plain_factory(&self) -> Result<ArrowRowGroupWriterFactory> {
        let descr = self.file.schema_descr();
        let mut props = self.file.properties().as_ref().clone().into_builder();
        for (column, _) in descr.columns().iter().zip(&self.plain).filter(|(_, plain)| **plain) {
            props = props.set_column_dictionary_enabled(column.path().clone(), false);
        }
        let shape = SerializedFileWriter::new(std::io::sink(), descr.root_schema_ptr(), Arc::new(props.build()))?;
        Ok(ArrowRowGroupWriterFactory::new(&shape, self.schema.clone()))
    }

    /// Write the last row group and the footer; returns the file.
    pub fn into_inner(mut self) -> Result<File> {
        self.flush()?;
        self.append_finishing()?;
        self.file.into_inner()?.into_inner().map_err(|e| ParquetError::External(Box::new(e.into_error())))
    }
}

/// The column chunk of `input_leaf` in the copied row group, with its statistics and page
/// index, ready to be spliced into the output. The input file is not trusted: the chunk must
/// lie inside it, hold one value per row (the copied columns are flat) and its page index
/// must point inside the chunk, or the index is left out.
fn copied_chunk(g: &CopiedGroup, input_leaf: usize) -> Result<ColumnCloseResult> {
    let bad = |what: String| {
        ParquetError::General(format!(
            "{}: row group {}, column {}: {what}",
            g.path.display(),
            g.row_group,
            input_leaf + 1
        ))
    };
    let rg = g.metadata.row_groups().get(g.row_group).ok_or_else(|| bad("no such row group".into()))?;
    let column = rg.columns().get(input_leaf).ok_or_else(|| bad("no such column".into()))?;
    let start = column.dictionary_page_offset().unwrap_or_else(|| column.data_page_offset());
    let len = column.compressed_size();
    let end = start.checked_add(len).unwrap_or(i64::MAX);
    if start < 4 || len <= 0 || end as u64 > g.file_len {
        return Err(bad(format!(
            "its pages ({start}..{end}) are not inside the file ({} bytes): the file's footer does not \
             match its data (a damaged or forged file); re-create it from its source",
            g.file_len
        )));
    }
    if column.num_values() != rg.num_rows() {
        return Err(bad(format!("{} values in a row group of {} rows", column.num_values(), rg.num_rows())));
    }
    let index = g.metadata.page_index();
    let offset_index = index.and_then(|i| i.offset_index(g.row_group, input_leaf)).filter(|o| {
        o.page_locations.iter().all(|p| {
            p.offset >= start && p.compressed_page_size > 0 && p.offset + i64::from(p.compressed_page_size) <= end
        })
    });
    let column_index = offset_index.and_then(|_| index.and_then(|i| i.column_index(g.row_group, input_leaf)));
    Ok(ColumnCloseResult {
        bytes_written: len as u64,
        rows_written: rg.num_rows() as u64,
        metadata: column.clone(),
        bloom_filter: None,
        column_index: column_index.cloned(),
        offset_index: offset_index.cloned(),
    })
}

/// Ask the kernel to start writing what the file has so far to disk, without waiting. The
/// file is synced before it is published; started early, that sync no longer waits for the
/// whole file to be written (on the W1 benchmark, 0.22 s of idle wall time at the end of a
/// run for a 500 MB output). Best effort: the sync before publishing is what makes the file
/// durable.
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range reads no memory; the descriptor is open for the call's
        // duration. Offset 0 and length 0 mean the whole file.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// A dictionary-encoded column chunk that had to fall back to plain data pages.
fn dictionary_overflowed(chunk: &ArrowColumnChunk) -> bool {
    let meta = &chunk.close().metadata;
    meta.dictionary_page_offset().is_some()
        && meta.page_encoding_stats().is_some_and(|pages| {
            pages.iter().any(|p| {
                matches!(p.page_type, PageType::DATA_PAGE | PageType::DATA_PAGE_V2)
                    && !matches!(p.encoding, Encoding::RLE_DICTIONARY | Encoding::PLAIN_DICTIONARY)
            })
        })
}

/// The column writers of one row group, shared with the threads encoding it.
struct RowGroup {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    columns: usize,
    rows: usize,
    /// Per leaf: our dictionary encoder takes its slices as Arrow arrays.
    dict: Vec<bool>,
}

struct Shared {
    state: Mutex<State>,
    /// Workers wait here for work.
    work: Condvar,
    /// The feeding thread waits here for room in the queues.
    room: Condvar,
}

struct State {
    columns: Vec<Column>,
    queued: usize,
    /// No more slices will come: workers leave once the queues are empty.
    closing: bool,
    /// The first encoding error; every thread stops.
    error: Option<ParquetError>,
}

struct Column {
    /// `None` while a worker encodes with it.
    writer: Option<Encoder>,
    queue: VecDeque<Leaf>,
}

/// The encoder of one leaf column in a row group.
enum Encoder {
    Arrow(Box<ArrowColumnWriter>),
    Dict(Box<DictColumn>),
}

/// A slice of one leaf column, as its encoder takes it.
enum Leaf {
    Arrow(ArrowLeafColumn),
    Array(ArrayRef),
}

impl Encoder {
    fn write(&mut self, leaf: &Leaf) -> Result<()> {
        match (self, leaf) {
            (Encoder::Arrow(w), Leaf::Arrow(l)) => w.write(l),
            (Encoder::Dict(d), Leaf::Array(a)) => d.write(a),
            _ => Err(ParquetError::General("a column slice prepared for another encoder".into())),
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RowGroup {
    fn start(writers: Vec<Encoder>, threads: usize, cpu: &Arc<AtomicU64>) -> RowGroup {
        let columns = writers.len();
        let dict = writers.iter().map(|w| matches!(w, Encoder::Dict(_))).collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                columns: writers.into_iter().map(|w| Column { writer: Some(w), queue: VecDeque::new() }).collect(),
                queued: 0,
                closing: false,
                error: None,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
        });
        // (a thread that cannot be started leaves its share to the others, or to the caller)
        let workers = (0..threads)
            .filter_map(|i| {
                let (shared, cpu) = (shared.clone(), cpu.clone());
                let work = move || {
                    let start = CpuTime::now();
                    encode(&shared);
                    cpu.fetch_add((start.elapsed_secs() * 1e9) as u64, Ordering::Relaxed);
                };
                std::thread::Builder::new().name(format!("weir-encode-{i}")).spawn(work).ok()
            })
            .collect::<Vec<_>>();
        RowGroup { shared, workers, columns, rows: 0, dict }
    }

    /// Queue slices of the columns given (by leaf index), waiting while the queues are full.
    /// Without encoding threads, encode them here.
    fn feed(&mut self, leaves: Vec<(usize, Leaf)>, rows: usize) -> Result<()> {
        let mut st = lock(&self.shared.state);
        if self.workers.is_empty() {
            for (i, leaf) in &leaves {
                st.columns[*i].writer.as_mut().expect("no worker holds it").write(leaf)?;
            }
            self.rows += rows;
            return Ok(());
        }
        while st.queued >= self.columns * QUEUED_PER_COLUMN && st.error.is_none() {
            st = self.shared.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        st.queued += leaves.len();
        for (i, leaf) in leaves {
            st.columns[i].queue.push_back(leaf);
        }
        drop(st);
        self.shared.work.notify_all();
        self.rows += rows;
        Ok(())
    }

    /// No more slices come: the workers leave once they have encoded what is queued.
    fn close(&self) {
        lock(&self.shared.state).closing = true;
        self.shared.work.notify_all();
    }

    /// Wait for every queued slice to be encoded; returns the column writers in order.
    fn finish(mut self) -> Result<Vec<Encoder>> {
        self.close();
        let mut panicked = false;
        for w in self.workers.drain(..) {
            panicked |= w.join().is_err();
        }
        let mut st = lock(&self.shared.state);
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        let writers: Option<Vec<_>> = st.columns.iter_mut().map(|c| c.writer.take()).collect();
        match writers {
            Some(w) if !panicked => Ok(w),
            _ => Err(ParquetError::General("a Parquet encoding thread failed".into())),
        }
    }
}

impl Drop for RowGroup {
    /// A row group given up on (an error elsewhere): stop the workers.
    fn drop(&mut self) {
        if self.workers.is_empty() {
            return;
        }
        {
            let mut st = lock(&self.shared.state);
            st.closing = true;
            st.columns.iter_mut().for_each(|c| c.queue.clear());
            st.queued = 0;
        }
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A worker: check out the column with the longest queue, encode its slices, put it back.
fn encode(shared: &Shared) {
    let mut st = lock(&shared.state);
    loop {
        if st.error.is_some() {
            return;
        }
        let next = st
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.writer.is_some() && !c.queue.is_empty())
            .max_by_key(|(_, c)| c.queue.len())
            .map(|(i, _)| i);
        let Some(i) = next else {
            if st.closing && st.queued == 0 {
                return;
            }
            st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let column = &mut st.columns[i];
        let mut writer = column.writer.take().expect("checked above");
        let slices: Vec<Leaf> = column.queue.drain(..).collect();
        st.queued -= slices.len();
        drop(st);
        shared.room.notify_all();
        // a panic inside the encoder must not leave the feeding thread waiting for room
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slices.iter().try_for_each(|s| writer.write(s))))
                .unwrap_or_else(|_| Err(ParquetError::General("the Parquet encoder panicked".into())));
        drop(slices);
        st = lock(&shared.state);
        st.columns[i].writer = Some(writer);
        if let Err(e) = result {
            st.error.get_or_insert(e);
            drop(st);
            shared.work.notify_all();
            shared.room.notify_all();
            return;
        }
        // the column is free again: another worker may be waiting for it
        shared.work.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::file::metadata::ParquetMetaDataReader;
    use parquet::file::page_index::column_index::ColumnIndexMetaData;
    use std::path::Path;

    fn batch(start: i64, n: usize) -> RecordBatch {
        let ids: Vec<i64> = (start..start + n as i64).collect();
        RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from(ids.clone())) as ArrayRef),
            (
                "hash",
                Arc::new(StringArray::from_iter(ids.iter().map(|i| (i % 7 != 0).then(|| format!("{i:064x}")))))
                    as ArrayRef,
            ),
            ("x", Arc::new(Float64Array::from_iter_values(ids.iter().map(|i| *i as f64 / 3.0))) as ArrayRef),
            ("kind", Arc::new(StringArray::from_iter_values(ids.iter().map(|i| format!("k{}", i % 5)))) as ArrayRef),
        ])
        .unwrap()
    }

    /// A writer of `schema` to `t.parquet` in `dir`.
    fn open(dir: &Path, schema: SchemaRef, props: WriterProperties, threaded: bool) -> ParallelWriter {
        let file = File::create(dir.join("t.parquet")).unwrap();
        ParallelWriter::try_new(file, schema, props, threaded, Default::default()).unwrap()
    }

    #[test]
    fn writes_the_same_rows_in_order_with_row_groups_of_the_set_size() {
        for threaded in [true, false] {
            let props = WriterProperties::builder().set_max_row_group_row_count(Some(1000)).build();
            same_rows_in_order(threaded, props);
        }
    }

    #[test]
    fn a_column_whose_dictionary_overflowed_is_plain_in_later_row_groups() {
        for threaded in [true, false] {
            // 4 KiB of dictionary: ids, hashes and floats (all distinct) overflow it in the
            // first row group; `kind` (5 values) never does
            let props = WriterProperties::builder()
                .set_max_row_group_row_count(Some(1000))
                .set_dictionary_page_size_limit(4096)
                .build();
            let meta = same_rows_in_order(threaded, props);
            let dictionary = |g: usize| -> Vec<bool> {
                meta.row_group(g).columns().iter().map(|c| c.dictionary_page_offset().is_some()).collect()
            };
            assert_eq!(dictionary(0), [true, true, true, true], "every column starts with a dictionary");
            for g in 1..meta.num_row_groups() {
                assert_eq!(dictionary(g), [false, false, false, true], "row group {g}");
                let kind = meta.row_group(g).column(3).page_encoding_stats_mask();
                assert!(kind.is_some_and(|m| m.is_only(Encoding::RLE_DICTIONARY)), "row group {g}: {kind:?}");
            }
        }
    }

    /// Writes batches of odd sizes and checks the file holds them in order, in row groups of
    /// 1000 rows; returns the file's metadata.
    fn same_rows_in_order(threaded: bool, props: WriterProperties) -> parquet::file::metadata::ParquetMetaData {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let mut w = open(dir.path(), batch(0, 1).schema(), props, threaded);
        let mut expected = Vec::new();
        let mut start = 0;
        for n in [1, 999, 1500, 0, 37, 2463] {
            let b = batch(start, n);
            w.write(&b).unwrap();
            expected.push(b);
            start += n as i64;
        }
        w.into_inner().unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        let sizes: Vec<i64> = reader.metadata().row_groups().iter().map(|g| g.num_rows()).collect();
        assert_eq!(sizes, [1000, 1000, 1000, 1000, 1000]);
        let got: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        let schema = expected[0].schema();
        assert_eq!(
            arrow_select::concat::concat_batches(&schema, &got).unwrap(),
            arrow_select::concat::concat_batches(&schema, &expected).unwrap()
        );
        ParquetMetaDataReader::new().parse_and_finish(&File::open(&path).unwrap()).unwrap()
    }

    /// Every kind of column our dictionary encoder takes: nulls, NaNs, both zeros, strings
    /// longer than the index keeps (multibyte ones among them, and one whose characters
    /// cannot be incremented), a column of nulls, values that only rise, pages of NaNs only.
    fn kinds(start: usize, n: usize) -> RecordBatch {
        use arrow_array::{Date32Array, Int32Array, TimestampMicrosecondArray};
        let rows = start..start + n;
        let long = ["x".repeat(100), "é".repeat(40), "\u{10FFFF}".repeat(20), "ab\u{7F}".repeat(30)];
        let words = ["", "a", "Zürich", "東京", "naïve café"];
        let word = |i: usize| match i % 17 {
            0 => None,
            1..=4 => Some(long[i % 17 - 1].clone()),
            _ => Some(format!("{}{}", words[i % 5], i % 23)),
        };
        let float = |i: usize| match i % 9 {
            0 => Some(f64::NAN),
            1 => Some(-0.0),
            2 => Some(0.0),
            3 => None,
            _ => Some((i % 1000) as f64 / 8.0 - 60.0),
        };
        RecordBatch::try_from_iter_with_nullable([
            (
                "i32",
                Arc::new(Int32Array::from_iter(
                    rows.clone().map(|i| (i % 11 != 0).then_some((i * 7 % 101) as i32 - 50)),
                )) as ArrayRef,
                true,
            ),
            ("date", Arc::new(Date32Array::from_iter_values(rows.clone().map(|i| (i % 400) as i32 + 18_000))), false),
            (
                "i64",
                Arc::new(Int64Array::from_iter_values(rows.clone().map(|i| (i as i64 * 7919) % 1000 - 500))),
                false,
            ),
            (
                "ts",
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.clone().map(|i| (i % 300) as i64 * 1_000_000))
                        .with_timezone("UTC"),
                ),
                false,
            ),
            ("f64", Arc::new(Float64Array::from_iter(rows.clone().map(float))), true),
            ("s", Arc::new(StringArray::from_iter(rows.clone().map(word))), true),
            ("nulls", Arc::new(Int64Array::from_iter(rows.clone().map(|_| None::<i64>))), true),
            ("up", Arc::new(Int64Array::from_iter_values(rows.clone().map(|i| i as i64))), false),
            (
                "nan_first",
                Arc::new(Float64Array::from_iter_values(
                    rows.clone().map(|i| if i < 2048 { f64::NAN } else { i as f64 }),
                )) as ArrayRef,
                false,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn our_dictionary_chunks_are_what_the_crates_writer_writes() {
        let schema = kinds(0, 1).schema();
        let descr = parquet::arrow::ArrowSchemaConverter::new().convert(&schema).unwrap();
        for (leaf, field) in schema.fields().iter().enumerate() {
            let kind = DictKind::for_column(field.data_type(), &descr.column(leaf), &WriterProperties::default());
            assert!(kind.is_some(), "{} goes to our encoder", field.name());
        }
        // (pages of 1024 rows and batches of whole pages, so both writers cut pages alike)
        let paged = || {
            WriterProperties::builder().set_data_page_row_count_limit(1024).set_max_row_group_row_count(Some(10_240))
        };
        for threaded in [true, false] {
            same_chunks_as_the_crate(threaded, paged().build(), 4, true);
            // dictionaries outgrowing 6000 bytes half way through a row group (`i64`, `up`,
            // `s`), which go on in plain pages (the crate's writer stops at the very value
            // that overflows, ours at the end of the 1024 values: pages are cut elsewhere)
            let props = paged().set_max_row_group_row_count(Some(40_960)).set_dictionary_page_size_limit(6000).build();
            let meta = same_chunks_as_the_crate(threaded, props, 1, false);
            let up = meta.row_group(0).column(7).page_encoding_stats().unwrap().clone();
            let encodings: Vec<Encoding> = up.iter().map(|p| p.encoding).collect();
            assert_eq!(encodings, [Encoding::PLAIN, Encoding::RLE_DICTIONARY, Encoding::PLAIN], "{up:?}");
        }
    }

    /// A file's metadata with its page index, encoding stats as a list.
    fn metadata(path: &Path) -> ParquetMetaData {
        ParquetMetaDataReader::new()
            .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required)
            .with_metadata_options(Some(
                parquet::file::metadata::ParquetMetaDataOptions::new().with_encoding_stats_as_mask(false),
            ))
            .parse_and_finish(&File::open(path).unwrap())
            .unwrap()
    }

    /// Write `kinds` with our writer and the crate's, in `groups` row groups: the same rows
    /// come back, with the same statistics and histograms, and (with `same_pages`) the same
    /// page index. Returns our metadata.
    fn same_chunks_as_the_crate(
        threaded: bool,
        props: WriterProperties,
        groups: usize,
        same_pages: bool,
    ) -> ParquetMetaData {
        let dir = tempfile::tempdir().unwrap();
        let schema = kinds(0, 1).schema();
        let ours = dir.path().join("t.parquet");
        let theirs = dir.path().join("crate.parquet");
        let mut w = open(dir.path(), schema.clone(), props.clone(), threaded);
        assert!(w.ours().iter().all(|o| *o), "our encoder takes every column: {:?}", w.ours());
        let mut reference = ArrowWriter::try_new(File::create(&theirs).unwrap(), schema.clone(), Some(props)).unwrap();
        let batches: Vec<RecordBatch> = (0..20).map(|i| kinds(i * 2048, 2048)).collect();
        for b in &batches {
            w.write(b).unwrap();
            reference.write(b).unwrap();
        }
        w.into_inner().unwrap();
        reference.close().unwrap();
        let expected = arrow_select::concat::concat_batches(&schema, &batches).unwrap();
        let read = |path: &Path| {
            let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap().build().unwrap();
            let got: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
            arrow_select::concat::concat_batches(&schema, &got).unwrap()
        };
        // (NaN is not equal to itself: compare the rows' encodings)
        let rows = |b: &RecordBatch| format!("{:?}", b.columns());
        assert_eq!(rows(&read(&ours)), rows(&expected));
        let (mine, crate_) = (metadata(&ours), metadata(&theirs));
        assert_eq!(mine.num_row_groups(), groups);
        assert_eq!(crate_.num_row_groups(), groups);
        for g in 0..groups {
            for (c, (a, b)) in mine.row_group(g).columns().iter().zip(crate_.row_group(g).columns()).enumerate() {
                let at = format!("row group {g}, column {c} ({})", schema.field(c).name());
                assert_eq!(format!("{:?}", a.statistics()), format!("{:?}", b.statistics()), "{at}");
                assert_eq!(a.num_values(), b.num_values(), "{at}");
                assert_eq!(a.encodings_mask(), b.encodings_mask(), "{at}");
                assert_eq!(a.definition_level_histogram(), b.definition_level_histogram(), "{at}");
                assert_eq!(a.unencoded_byte_array_data_bytes(), b.unencoded_byte_array_data_bytes(), "{at}");
                let (pa, pb) = (mine.page_index().unwrap(), crate_.page_index().unwrap());
                // `up` is its row number: each page's bounds are its first and last row
                if c == 7 {
                    let pages = &pa.offset_index(g, c).unwrap().page_locations;
                    let Some(ColumnIndexMetaData::INT64(index)) = pa.column_index(g, c) else {
                        panic!("{at}: no column index")
                    };
                    let rows = mine.row_group(g).num_rows();
                    let first = mine.row_groups()[..g].iter().map(|r| r.num_rows()).sum::<i64>();
                    for (i, p) in pages.iter().enumerate() {
                        let end = pages.get(i + 1).map_or(rows, |n| n.first_row_index);
                        let bounds = (index.min_value(i).copied(), index.max_value(i).copied());
                        assert_eq!(bounds, (Some(first + p.first_row_index), Some(first + end - 1)), "{at}, page {i}");
                    }
                }
                if !same_pages {
                    continue;
                }
                assert_eq!(a.page_encoding_stats(), b.page_encoding_stats(), "{at}");
                assert_eq!(
                    format!("{:?}", pa.column_index(g, c)),
                    format!("{:?}", pb.column_index(g, c)),
                    "{at}: column index"
                );
                let (oa, ob) = (pa.offset_index(g, c).unwrap(), pb.offset_index(g, c).unwrap());
                let first_rows = |o: &parquet::file::page_index::offset_index::OffsetIndexMetaData| -> Vec<i64> {
                    o.page_locations.iter().map(|p| p.first_row_index).collect()
                };
                assert_eq!(first_rows(oa), first_rows(ob), "{at}: pages");
                assert_eq!(oa.unencoded_byte_array_data_bytes, ob.unencoded_byte_array_data_bytes, "{at}");
            }
        }
        // the offset index finds every page: read a few rows of every other page through it
        let selection: Vec<parquet::arrow::arrow_reader::RowSelector> = (0..40)
            .flat_map(|_| {
                [
                    parquet::arrow::arrow_reader::RowSelector::skip(1000),
                    parquet::arrow::arrow_reader::RowSelector::select(24),
                ]
            })
            .collect();
        let options = parquet::arrow::arrow_reader::ArrowReaderOptions::new()
            .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required);
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(File::open(&ours).unwrap(), options)
            .unwrap()
            .with_row_selection(selection.clone().into())
            .build()
            .unwrap();
        let got: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        let picked: Vec<RecordBatch> = (0..40).map(|i| expected.slice(i * 1024 + 1000, 24)).collect();
        assert_eq!(
            rows(&arrow_select::concat::concat_batches(&schema, &got).unwrap()),
            rows(&arrow_select::concat::concat_batches(&schema, &picked).unwrap())
        );
        mine
    }

    /// One generated column: its type, and how its values and nulls are drawn.
    struct GenColumn {
        data_type: arrow_schema::DataType,
        nullable: bool,
        /// Nulls per 1000 rows.
        nulls: u64,
        /// 0 constant, 1 a few values, 2 many, 3 all distinct, 4 runs, 5 extremes.
        shape: u64,
    }

    impl GenColumn {
        /// The value key of row `r` (before the type's mapping).
        fn key(&self, r: usize, rand: u64) -> i64 {
            let r = r as i64;
            match self.shape {
                0 => 7,
                1 => (rand % 5) as i64 - 2,
                2 => (rand % 2000) as i64 - 1000,
                3 => r * 3 - 500,
                4 => r / (1 + (r % 37)) - 20,
                _ => [i64::MIN, -1, 0, 1, i64::MAX][(rand % 5) as usize],
            }
        }

        fn array(&self, rows: usize, next: &mut impl FnMut() -> u64) -> ArrayRef {
            use arrow_array::{Date32Array, Int32Array, TimestampMicrosecondArray};
            use arrow_schema::DataType;
            let mut valid = Vec::with_capacity(rows);
            let mut keys = Vec::with_capacity(rows);
            for r in 0..rows {
                let rand = next();
                valid.push(!(self.nullable && rand % 1000 < self.nulls));
                keys.push(self.key(r, rand >> 16));
            }
            fn opt<T>(valid: &[bool], i: usize, v: T) -> Option<T> {
                valid[i].then_some(v)
            }
            match &self.data_type {
                DataType::Int32 => {
                    Arc::new(Int32Array::from_iter(keys.iter().enumerate().map(|(i, k)| opt(&valid, i, *k as i32))))
                }
                DataType::Date32 => Arc::new(Date32Array::from_iter(
                    keys.iter().enumerate().map(|(i, k)| opt(&valid, i, (*k % 100_000) as i32)),
                )),
                DataType::Int64 => {
                    Arc::new(Int64Array::from_iter(keys.iter().enumerate().map(|(i, k)| opt(&valid, i, *k))))
                }
                DataType::Timestamp(_, _) => Arc::new(TimestampMicrosecondArray::from_iter(
                    keys.iter().enumerate().map(|(i, k)| opt(&valid, i, k.wrapping_mul(1_000_003))),
                )),
                DataType::Float64 => Arc::new(Float64Array::from_iter(keys.iter().enumerate().map(|(i, k)| {
                    let v = match k.rem_euclid(41) {
                        0 if self.shape == 5 => f64::NAN,
                        1 if self.shape == 5 => -0.0,
                        2 if self.shape == 5 => f64::INFINITY,
                        _ => *k as f64 * 0.37,
                    };
                    opt(&valid, i, v)
                }))),
                _ => Arc::new(StringArray::from_iter(keys.iter().enumerate().map(|(i, k)| {
                    let s = match k.rem_euclid(53) {
                        0 => String::new(),
                        1 => format!("{k:x}").repeat(12),
                        _ => format!("v{k}"),
                    };
                    opt(&valid, i, s)
                }))),
            }
        }
    }

    #[test]
    fn randomized_schemas_and_settings_write_what_the_crate_writes() {
        use arrow_schema::{DataType, Field, Schema, TimeUnit};
        // the same cases every run
        let mut next = super::super::xorshift(0x9E37_79B9_7F4A_7C15);
        let types = [
            DataType::Int32,
            DataType::Date32,
            DataType::Int64,
            DataType::Timestamp(TimeUnit::Microsecond, None),
            DataType::Float64,
            DataType::Utf8,
        ];
        for case in 0..120 {
            let dict_limit = [256usize, 4096, 1 << 20][(next() % 3) as usize];
            // whole pages per batch and per row group, pages of whole 1024-value mini
            // batches (the crate checks its page limit once per mini batch, we at the row)
            // and no dictionary overflow: both writers then cut the same pages, so their
            // page indexes must agree too
            let aligned = dict_limit == 1 << 20 && next().is_multiple_of(2);
            let page_rows = if aligned { [1024, 2048, 4096] } else { [64usize, 1000, 4096] }[(next() % 3) as usize];
            let batch_rows: Vec<usize> = (0..1 + next() % 6)
                .map(|_| if aligned { page_rows * (1 + next() % 4) as usize } else { 1 + (next() % 5000) as usize })
                .collect();
            let rows: usize = batch_rows.iter().sum();
            let group = if aligned { page_rows * (1 + next() % 8) as usize } else { 500 + (next() % 20_000) as usize };
            let columns: Vec<GenColumn> = (0..1 + next() % 6)
                .map(|_| {
                    let nullable = !next().is_multiple_of(3);
                    GenColumn {
                        data_type: types[(next() % types.len() as u64) as usize].clone(),
                        nullable,
                        nulls: if nullable { [0, 100, 500, 990, 1000][(next() % 5) as usize] } else { 0 },
                        shape: next() % 6,
                    }
                })
                .collect();
            let schema = Arc::new(Schema::new(
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| Field::new(format!("c{i}"), c.data_type.clone(), c.nullable))
                    .collect::<Vec<_>>(),
            ));
            let arrays: Vec<ArrayRef> = columns.iter().map(|c| c.array(rows, &mut next)).collect();
            let all = RecordBatch::try_new(schema.clone(), arrays).unwrap();
            let mut at = 0;
            let batches: Vec<RecordBatch> = batch_rows
                .iter()
                .map(|n| {
                    at += n;
                    all.slice(at - n, *n)
                })
                .collect();
            let props = WriterProperties::builder()
                .set_data_page_row_count_limit(page_rows)
                .set_dictionary_page_size_limit(dict_limit)
                .set_max_row_group_row_count(Some(group))
                .build();
            let at = format!(
                "case {case}: {rows} rows in {batch_rows:?}, pages of {page_rows}, dictionary {dict_limit} B, \
                 groups of {group}, columns {:?}",
                columns.iter().map(|c| (&c.data_type, c.nulls, c.shape)).collect::<Vec<_>>()
            );

            let dir = tempfile::tempdir().unwrap();
            let theirs = dir.path().join("crate.parquet");
            let mut w = open(dir.path(), schema.clone(), props.clone(), next().is_multiple_of(2));
            assert!(w.ours().iter().all(|o| *o), "{at}: our encoder takes every column");
            let mut reference =
                ArrowWriter::try_new(File::create(&theirs).unwrap(), schema.clone(), Some(props)).unwrap();
            for b in &batches {
                w.write(b).unwrap();
                reference.write(b).unwrap();
            }
            w.into_inner().unwrap();
            reference.close().unwrap();

            // the same values come back, row for row (NaN is not equal to itself: compare
            // the rows' debug text)
            let read = |path: &Path| {
                let r = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap().build().unwrap();
                let got: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
                format!("{:?}", arrow_select::concat::concat_batches(&schema, &got).unwrap().columns())
            };
            let expected = format!("{:?}", all.columns());
            assert_eq!(read(&dir.path().join("t.parquet")), expected, "{at}: our file");
            assert_eq!(read(&theirs), expected, "{at}: the crate's file");

            let (mine, crate_) = (metadata(&dir.path().join("t.parquet")), metadata(&theirs));
            assert_eq!(mine.num_row_groups(), crate_.num_row_groups(), "{at}");
            for g in 0..mine.num_row_groups() {
                for (c, (a, b)) in mine.row_group(g).columns().iter().zip(crate_.row_group(g).columns()).enumerate() {
                    let at = format!("{at}; row group {g}, column {c}");
                    assert_eq!(format!("{:?}", a.statistics()), format!("{:?}", b.statistics()), "{at}");
                    assert_eq!(a.num_values(), b.num_values(), "{at}");
                    assert_eq!(a.definition_level_histogram(), b.definition_level_histogram(), "{at}");
                    assert_eq!(a.unencoded_byte_array_data_bytes(), b.unencoded_byte_array_data_bytes(), "{at}");
                    if !aligned {
                        continue;
                    }
                    assert_eq!(a.page_encoding_stats(), b.page_encoding_stats(), "{at}");
                    let (pa, pb) = (mine.page_index().unwrap(), crate_.page_index().unwrap());
                    assert_eq!(
                        format!("{:?}", pa.column_index(g, c)),
                        format!("{:?}", pb.column_index(g, c)),
                        "{at}: column index"
                    );
                    let first_rows = |o: &parquet::file::page_index::offset_index::OffsetIndexMetaData| -> Vec<i64> {
                        o.page_locations.iter().map(|p| p.first_row_index).collect()
                    };
                    let (oa, ob) = (pa.offset_index(g, c).unwrap(), pb.offset_index(g, c).unwrap());
                    assert_eq!(first_rows(oa), first_rows(ob), "{at}: pages");
                }
            }
        }
    }

    #[test]
    fn an_encoding_error_on_a_worker_comes_back_as_an_error() {
        for threaded in [true, false] {
            encoding_error(threaded);
        }
    }

    fn encoding_error(threaded: bool) {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
            "id",
            arrow_schema::DataType::Int64,
            false,
        )]));
        let mut w = open(dir.path(), schema, WriterProperties::default(), threaded);
        // a batch whose own schema allows the null the file's schema forbids
        let b =
            RecordBatch::try_from_iter([("id", Arc::new(Int64Array::from(vec![Some(1), None])) as ArrayRef)]).unwrap();
        let result = w.write(&b).and_then(|_| w.into_inner().map(|_| ()));
        let e = result.expect_err("the null must be refused");
        assert!(e.to_string().to_lowercase().contains("null"), "{e}");
    }

    #[test]
    fn a_batch_with_missing_columns_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = open(dir.path(), batch(0, 1).schema(), Default::default(), true);
        let short = batch(0, 3).project(&[0, 1]).unwrap();
        assert!(w.write(&short).is_err());
    }

    /// The file at `path`, shared, with its metadata and page index.
    fn shared(path: &Path) -> (SharedFile, Arc<ParquetMetaData>) {
        let f = File::open(path).unwrap();
        let meta = ParquetMetaDataReader::new()
            .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Optional)
            .parse_and_finish(&f)
            .unwrap();
        (SharedFile(Arc::new(f)), Arc::new(meta))
    }

    fn copied(file: &SharedFile, meta: &Arc<ParquetMetaData>, row_group: usize) -> CopiedGroup {
        CopiedGroup {
            file: file.clone(),
            file_len: file.0.metadata().unwrap().len(),
            path: Arc::new("t.parquet".into()),
            metadata: meta.clone(),
            row_group,
            rows: meta.row_group(row_group).num_rows() as usize,
            columns: vec![(1, 1)],
        }
    }

    /// `batch(start, n)` with a placeholder (nulls) where the copied `hash` column goes.
    fn without_hash(start: i64, n: usize) -> RecordBatch {
        let b = batch(start, n);
        let mut columns = b.columns().to_vec();
        columns[1] = arrow_array::new_null_array(&arrow_schema::DataType::Utf8, n);
        RecordBatch::try_new(b.schema(), columns).unwrap()
    }

    /// An input of 2500 rows in row groups of 1000 rows (`t.parquet` in `dir`).
    fn input(dir: &Path) -> (SharedFile, Arc<ParquetMetaData>) {
        let props = WriterProperties::builder().set_max_row_group_row_count(Some(1000)).build();
        let mut w = open(dir, batch(0, 1).schema(), props, true);
        w.write(&batch(0, 2500)).unwrap();
        w.into_inner().unwrap();
        shared(&dir.join("t.parquet"))
    }

    fn read_all(path: &Path) -> RecordBatch {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
        let schema = reader.schema().clone();
        let got: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        arrow_select::concat::concat_batches(&schema, &got).unwrap()
    }

    #[test]
    fn a_copied_column_is_the_input_chunk_and_the_others_are_encoded() {
        for threaded in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (file, meta) = input(dir.path());
            let out = dir.path().join("copy.parquet");
            let mut w = ParallelWriter::try_new(
                File::create(&out).unwrap(),
                batch(0, 1).schema(),
                // the output's own row group size does not split a copied row group
                WriterProperties::builder().set_max_row_group_row_count(Some(300)).build(),
                threaded,
                Default::default(),
            )
            .unwrap();
            for g in 0..3 {
                let group = copied(&file, &meta, g);
                let (start, rows) = (g as i64 * 1000, group.rows);
                w.copy_next(group).unwrap();
                let b = without_hash(start, rows);
                w.write(&b.slice(0, rows / 3)).unwrap();
                w.write(&b.slice(rows / 3, rows - rows / 3)).unwrap();
            }
            // then rows of its own, in its own row group size
            w.write(&batch(2500, 400)).unwrap();
            w.into_inner().unwrap();
            let got = read_all(&out);
            let want = batch(0, 2900);
            assert_eq!(got.columns(), want.columns(), "threaded: {threaded}");
            let (_, out_meta) = shared(&out);
            let sizes: Vec<i64> = out_meta.row_groups().iter().map(|g| g.num_rows()).collect();
            assert_eq!(sizes, [1000, 1000, 500, 300, 100]);
            let bytes = |path: &Path, m: &ParquetMetaData, g: usize| {
                let c = m.row_group(g).column(1);
                let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset()) as usize;
                std::fs::read(path).unwrap()[start..start + c.compressed_size() as usize].to_vec()
            };
            for g in 0..3 {
                assert_eq!(bytes(&out, &out_meta, g), bytes(&dir.path().join("t.parquet"), &meta, g));
                assert_eq!(out_meta.row_group(g).column(1).statistics(), meta.row_group(g).column(1).statistics());
            }
        }
    }

    #[test]
    fn a_copied_row_group_gets_exactly_its_rows_from_inside_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let (file, meta) = input(dir.path());
        let writer = |name: &str| open(&dir.path().join(name), batch(0, 1).schema(), Default::default(), true);
        std::fs::create_dir_all(dir.path().join("few")).unwrap();
        std::fs::create_dir_all(dir.path().join("many")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();

        let mut w = writer("few");
        w.copy_next(copied(&file, &meta, 0)).unwrap();
        w.write(&without_hash(0, 999)).unwrap();
        let e = w.into_inner().expect_err("a row short");
        assert!(e.to_string().contains("999 of 1000 rows arrived"), "{e}");

        let mut w = writer("many");
        w.copy_next(copied(&file, &meta, 0)).unwrap();
        let e = w.write(&without_hash(0, 1001)).expect_err("a row too many");
        assert!(e.to_string().contains("1001 rows arrived for a row group copied from t.parquet"), "{e}");

        // a footer pointing past the end of the file (as a truncated or forged one may)
        let mut w = writer("outside");
        let mut group = copied(&file, &meta, 2);
        group.file_len = 100;
        w.copy_next(group).unwrap();
        // (the group is appended, and its copied chunks checked, after the next one or at
        // the end: the error comes from whichever call does it)
        let e = match w.write(&without_hash(2000, 500)) {
            Err(e) => e,
            Ok(()) => w.into_inner().expect_err("outside the file"),
        };
        assert!(e.to_string().contains("are not inside the file (100 bytes)"), "{e}");
    }
}
