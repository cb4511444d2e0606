//! Sources made of files: a path, directory or glob expanded into a sorted file list, read
//! file after file by a per-format reader (CSV, JSON lines, Parquet). Positions are
//! (file index, records of it consumed).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use parquet::basic::Compression;

use super::parquet::{CopyColumn, CopySpec};
use super::{Position, Skipped, Source};
use crate::config::{Format, OnError};
use crate::io::encode::CopiedGroup;
use crate::io::text::ColumnBuilder;
use crate::io::{Error, Result};

/// Rows skipped whose place is kept for the summary; the rest are counted.
const SKIPPED_KEPT: usize = 20;

/// Batches from the files of a source, in file order.
pub struct FileSource {
    schema: SchemaRef,
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<Box<dyn FileBatches>>,
    spec: ReadSpec,
    /// Rows skipped so far: the first ones with their place, and the count of the others.
    skipped: Vec<Skipped>,
    skipped_count: u64,
    /// `columns = [...]` on a CSV or JSON-lines source: indices kept from each batch.
    project: Option<Vec<usize>>,
    /// An incremental read: the newest modification time of the files it reads.
    watermark: Option<String>,
    /// The file after the current one, already being read on a thread of its own.
    ahead: Option<(usize, Box<dyn FileBatches>)>,
}

/// The most columns a CSV header or the inferred keys of JSON lines may have: a hostile
/// file of millions of tiny columns is refused, not turned into millions of builders.
pub(super) const MAX_COLUMNS: usize = 10_000;

/// The most text type inference keeps as samples (it stops sampling beyond, and infers from
/// what it has): the first `infer_rows` rows of a file with huge values stay cheap.
pub(super) const INFER_BYTES: usize = 64 << 20;

/// Text a batch of a sequential JSON-lines reader (Debezium) holds at most (a batch ends
/// early past it; the blocks of the parallel readers are smaller still, [`BLOCK_BYTES`]):
/// with records of at most `max_record_mb` (1 GiB), a string column's text in one batch
/// stays under the 2 GiB its 32-bit offsets can address.
pub(super) const BATCH_TEXT_BYTES: usize = 256 << 20;

/// How a source's files are read: the configuration every per-file reader shares.
#[derive(Clone)]
pub(super) struct ReadSpec {
    pub format: Format,
    pub batch_size: usize,
    pub on_error: OnError,
    pub delimiter: u8,
    pub header: bool,
    /// CSV: field texts read as null besides the empty field.
    pub null_values: Arc<Vec<String>>,
    /// CSV: quote and escape characters, and lines to skip before the header.
    pub quote: u8,
    pub escape: Option<u8>,
    pub skip_rows: u64,
    /// CSV and JSON lines: the text's encoding when it is not UTF-8.
    pub encoding: Option<&'static encoding_rs::Encoding>,
    /// CSV and JSON lines: the longest record (line), in bytes.
    pub max_record: u64,
    /// CSV and JSON lines: the text a batch holds at most ([`BATCH_TEXT_BYTES`]; blocks
    /// decoded on workers hold the lesser of this and [`BLOCK_BYTES`]).
    pub batch_bytes: usize,
    /// Types of hive partition columns (`key=value` directories); others are strings.
    pub hive_types: HashMap<String, DataType>,
    pub root: Option<PathBuf>,
    /// Parquet: read only these columns.
    pub projection: Option<Vec<String>>,
    /// Parquet: columns to copy from the files' pages instead of decoding them.
    pub copy: Option<Arc<CopySpec>>,
    /// CPU nanoseconds of the threads that decode part of a Parquet file's columns.
    pub helper_cpu: Arc<AtomicU64>,
}

impl ReadSpec {
    fn new(format: Format, batch_size: usize) -> ReadSpec {
        ReadSpec {
            format,
            batch_size,
            on_error: OnError::Fail,
            delimiter: b',',
            header: true,
            null_values: Arc::default(),
            quote: b'"',
            escape: None,
            skip_rows: 0,
            encoding: None,
            max_record: crate::config::DEFAULT_MAX_RECORD_MB << 20,
            batch_bytes: BATCH_TEXT_BYTES,
            hive_types: HashMap::new(),
            root: None,
            projection: None,
            copy: None,
            helper_cpu: Arc::default(),
        }
    }
}

/// One file's batches, as a format reads them.
pub(super) trait FileBatches: Send {
    /// The next batch of the file; skipped rows are added to `skipped`.
    fn next_batch(&mut self, skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>>;
    /// Records of the file consumed so far (good, bad and skipped): what a position holds.
    fn consumed(&self) -> u64;
    /// Parquet with copied columns: the row group the last batch started.
    fn take_copied(&mut self) -> Option<CopiedGroup> {
        None
    }
    /// Parquet with copied columns: false inside a row group.
    fn at_row_group_end(&self) -> bool {
        true
    }
}

/// One column builder per field of a text format's batches.
pub(super) fn text_builders(path: &Path, schema: &SchemaRef, batch_size: usize) -> Result<Vec<ColumnBuilder>> {
    // room for a batch of up to 8192 rows, less for a wide schema (a decoder per thread
    // holds a set; they grow as needed)
    let rows = batch_size.min(8192).min((1 << 20) / schema.fields().len().max(1)).max(1);
    schema
        .fields()
        .iter()
        .map(|f| ColumnBuilder::new(f.data_type(), rows))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|m| Error::Input { file: path.to_path_buf(), line: 0, column: None, message: m })
}

/// The rows the builders hold, as a batch (the builders start over).
pub(super) fn finish_batch(path: &Path, schema: &SchemaRef, builders: &mut [ColumnBuilder]) -> Result<RecordBatch> {
    // every column is finished (and so emptied), failed or not
    let columns: Vec<_> = builders.iter_mut().map(|b| b.finish()).collect();
    let columns = columns.into_iter().collect::<std::result::Result<Vec<ArrayRef>, _>>();
    let columns =
        columns.map_err(|message| Error::Input { file: path.to_path_buf(), line: 0, column: None, message })?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| Error::Internal(e.to_string()))
}

/// A file's reader, positioned after `offset` records.
fn open_file(path: &Path, schema: &SchemaRef, spec: &ReadSpec, offset: u64) -> Result<Box<dyn FileBatches>> {
    Ok(match spec.format {
        Format::Csv => Box::new(super::csv::open_parallel(path, schema, spec, offset)?),
        Format::Jsonl => Box::new(super::jsonl::open_parallel(path, schema, spec, offset)?),
        Format::Debezium => Box::new(super::jsonl::JsonlFile::open(path, schema, spec, offset)?),
        Format::Parquet => Box::new(super::parquet::ParquetFile::open(path, schema, spec, offset)?),
        Format::Avro => Box::new(super::avro::AvroFile::open(path, schema, spec, offset)?),
        Format::Postgres | Format::Plugin => {
            return Err(Error::Internal("a postgres or plugin source opened as files".into()))
        }
    })
}

/// Text a block of a file holds at most when its records are decoded on worker threads
/// (fewer than `batch_size` records when they are long).
pub(super) const BLOCK_BYTES: usize = 4 << 20;

/// Threads decoding a CSV or JSON-lines file's blocks: `WEIR_READ_THREADS` (1 to 64), else
/// the machine's cores, at least 2 and at most 8 (beyond, the Parquet encoding and the
/// reading thread are what a run waits for).
pub(super) fn decode_workers() -> usize {
    static WORKERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WORKERS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
        match std::env::var("WEIR_READ_THREADS") {
            Err(_) => cores,
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=64).contains(&n) => n,
                _ => {
                    tracing::warn!("WEIR_READ_THREADS={v:?} is not a number from 1 to 64: using {cores}");
                    cores
                }
            },
        }
    })
}

/// A block of a file decoded: its batch (none without rows), its skipped rows and the
/// position after it.
pub(super) struct Decoded {
    pub batch: Option<RecordBatch>,
    pub skipped: Vec<Skipped>,
    pub end: u64,
}

type Done = std::sync::mpsc::SyncSender<Result<Decoded>>;

/// A file's records decoded on worker threads: one thread reads blocks of whole records
/// (and checks each one's length and encoding, as a single-threaded reader would), the
/// workers turn blocks into batches, and the batches come out in the file's order with
/// their skipped rows and the position they end at. The first error in the file's order is
/// the one returned; every record keeps its own line number.
pub(super) struct Ordered {
    results: std::sync::mpsc::Receiver<std::sync::mpsc::Receiver<Result<Decoded>>>,
    consumed: u64,
    done: bool,
}

/// The reading thread's side of an [`Ordered`]: blocks to the workers, their places kept.
/// Dropped before the file's end or failure was delivered (the thread panicked), it puts
/// an error in the next place: a reader that died is never read as the end of the file.
pub(super) struct Blocks<B> {
    work: std::sync::mpsc::SyncSender<(B, Done)>,
    results: std::sync::mpsc::SyncSender<std::sync::mpsc::Receiver<Result<Decoded>>>,
    ended: bool,
}

impl<B> Drop for Blocks<B> {
    fn drop(&mut self) {
        if !self.ended {
            self.fail(Error::Internal("a file's reading thread stopped before the file's end".into()));
        }
    }
}

impl<B> Blocks<B> {
    /// The next block; false when the reader is gone (the work with it).
    fn send(&self, block: B) -> bool {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        self.results.send(result).is_ok() && self.work.send((block, done)).is_ok()
    }

    /// Reading failed after the blocks sent so far.
    fn fail(&self, e: Error) {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let _ = done.send(Err(e));
        let _ = self.results.send(result);
    }

    /// A block read (`None` when it holds nothing) and what ended it: a failure, the end of
    /// the file, or neither; whether reading goes on.
    pub fn deliver(&mut self, block: Option<B>, failed: Option<Error>, eof: bool) -> bool {
        if block.is_some_and(|b| !self.send(b)) {
            // the reader is gone: nobody to tell
            self.ended = true;
            return false;
        }
        if let Some(e) = failed {
            self.fail(e);
            self.ended = true;
            return false;
        }
        self.ended = eof;
        !eof
    }
}

impl Ordered {
    /// Start `read` on a thread of its own, sending blocks, and one worker per decoder
    /// (each decodes a block into a batch; after an error it must start the next block
    /// clean). `consumed` is the position the file starts at. The workers' CPU time counts
    /// as reading.
    pub fn spawn<B, W>(
        path: &Path,
        consumed: u64,
        spec: &ReadSpec,
        mut decoder: impl FnMut() -> Result<W>,
        read: impl FnOnce(Blocks<B>) + Send + 'static,
    ) -> Result<Ordered>
    where
        B: Send + 'static,
        W: FnMut(&B) -> Result<Decoded> + Send + 'static,
    {
        use std::sync::mpsc::sync_channel;
        let (work, work_rx) = sync_channel::<(B, Done)>(1);
        let work_rx = Arc::new(std::sync::Mutex::new(work_rx));
        let workers = decode_workers();
        let (results, results_rx) = sync_channel(workers + 1);
        let spawn_error = |e: std::io::Error| Error::io(path, e);
        for n in 0..workers {
            let mut decode = decoder()?;
            let work_rx = work_rx.clone();
            let cpu = spec.helper_cpu.clone();
            std::thread::Builder::new()
                .name(format!("weir-decode {n}"))
                .spawn(move || loop {
                    let next = match work_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((block, done)) = next else { return };
                    let start = crate::cpu_clock::CpuTime::now();
                    let decoded = decode(&block);
                    cpu.fetch_add((start.elapsed_secs() * 1e9) as u64, Ordering::Relaxed);
                    let _ = done.send(decoded);
                })
                .map_err(spawn_error)?;
        }
        std::thread::Builder::new()
            .name("weir-read-blocks".into())
            .spawn(move || read(Blocks { work, results, ended: false }))
            .map_err(spawn_error)?;
        Ok(Ordered { results: results_rx, consumed, done: false })
    }
}

impl FileBatches for Ordered {
    fn next_batch(&mut self, skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        while !self.done {
            // the reader ends the results after the last block
            let Ok(next) = self.results.recv() else {
                self.done = true;
                break;
            };
            match next.recv() {
                Ok(Ok(d)) => {
                    skipped.extend(d.skipped);
                    self.consumed = d.end;
                    if d.batch.is_some() {
                        return Ok(d.batch);
                    }
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(Error::Internal("a decoding worker stopped before its block".into()));
                }
            }
        }
        Ok(None)
    }

    fn consumed(&self) -> u64 {
        self.consumed
    }
}

/// A file read on a thread of its own while the one before it is still being consumed, so
/// that the files of a source overlap: a CSV or Avro file decodes on one thread, and a
/// JSON-lines file's workers fill while the previous file's drain. At most `AHEAD` batches
/// wait; the thread ends at the file's end, at its first error, or when the reader is
/// dropped. Its CPU time counts as reading.
struct FileAhead {
    batches: std::sync::mpsc::Receiver<Result<AheadBatch>>,
    consumed: u64,
    done: bool,
}

/// A batch read ahead (none at the file's end), the rows it skipped and where it ends.
struct AheadBatch {
    batch: Option<RecordBatch>,
    skipped: Vec<Skipped>,
    consumed: u64,
}

impl FileAhead {
    const AHEAD: usize = 2;

    fn spawn(path: PathBuf, schema: SchemaRef, spec: ReadSpec) -> Result<FileAhead> {
        let (tx, batches) = std::sync::mpsc::sync_channel(Self::AHEAD);
        let shown = path.clone();
        let work = move || {
            let start = crate::cpu_clock::CpuTime::now();
            let mut file = match open_file(&path, &schema, &spec, 0) {
                Ok(file) => Some(file),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    None
                }
            };
            let mut counted = start;
            while let Some(f) = file.as_mut() {
                let mut skipped = Vec::new();
                let next = f.next_batch(&mut skipped);
                let now = crate::cpu_clock::CpuTime::now();
                spec.helper_cpu.fetch_add((now.secs_since(counted) * 1e9) as u64, Ordering::Relaxed);
                counted = now;
                let more = matches!(next, Ok(Some(_)));
                let next = next.map(|batch| AheadBatch { batch, skipped, consumed: f.consumed() });
                // a send fails only when the reader is gone: then so is the work
                if tx.send(next).is_err() || !more {
                    break;
                }
            }
        };
        std::thread::Builder::new().name("weir-file-ahead".into()).spawn(work).map_err(|e| Error::io(&shown, e))?;
        Ok(FileAhead { batches, consumed: 0, done: false })
    }
}

impl FileBatches for FileAhead {
    fn next_batch(&mut self, skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        if self.done {
            return Ok(None);
        }
        match self.batches.recv() {
            Ok(Ok(ahead)) => {
                skipped.extend(ahead.skipped);
                self.consumed = ahead.consumed;
                self.done = ahead.batch.is_none();
                Ok(ahead.batch)
            }
            Ok(Err(e)) => {
                self.done = true;
                Err(e)
            }
            // the thread ended without saying how: never read that as the end of the file
            Err(_) => {
                self.done = true;
                Err(Error::Internal("a file's reading thread stopped before the file's end".into()))
            }
        }
    }

    fn consumed(&self) -> u64 {
        self.consumed
    }
}

/// The schema of a source's files (declared, inferred or read from the first file).
fn schema_of(files: &[PathBuf], source: &crate::config::Source, spec: &ReadSpec) -> Result<SchemaRef> {
    match source.format {
        Format::Csv => super::csv::schema(files, source, spec),
        Format::Jsonl => super::jsonl::schema(files, source, spec),
        Format::Debezium => super::debezium::schema(source),
        Format::Parquet => super::parquet::schema(&files[0], spec),
        Format::Avro => super::avro::schema(files, spec),
        Format::Postgres | Format::Plugin => Err(Error::Internal("a postgres or plugin source read as files".into())),
    }
}

/// Every input file's name, size and modification time, hashed.
pub(super) fn fingerprint(source: &crate::config::Source, partition: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    match expand_paths(&source.path, partition, source.format) {
        Ok(files) => {
            for f in files {
                let meta = std::fs::metadata(&f);
                let (len, mtime) = meta
                    .map(|m| {
                        let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                        (m.len(), mtime.map(|d| d.as_nanos()).unwrap_or(0))
                    })
                    .unwrap_or((0, 0));
                h.update(format!("file {} {len} {mtime}\0", f.display()).as_bytes());
            }
        }
        Err(e) => h.update(format!("source {} error {e}\0", source.name).as_bytes()),
    }
    crate::plugin::hex(&h.finalize())
}

/// Expand a source path (file, directory or glob; `{partition}` substituted, or matching
/// every partition when the run has none) into a sorted list of files.
pub fn expand_paths(pattern: &str, partition: Option<&str>, format: Format) -> Result<Vec<PathBuf>> {
    let pattern = pattern.replace("{partition}", partition.unwrap_or("*"));
    let ext = format.name();
    let mut files = Vec::new();
    if pattern.contains(['*', '?', '[']) {
        let paths = glob::glob(&pattern).map_err(|e| Error::Input {
            file: PathBuf::from(&pattern),
            line: 0,
            column: None,
            message: format!("bad glob pattern: {e}"),
        })?;
        for p in paths.flatten() {
            if p.is_file() {
                files.push(p);
            } else if p.is_dir() {
                collect_dir(&p, ext, &mut files)?;
            }
        }
    } else {
        let p = PathBuf::from(&pattern);
        if p.is_dir() {
            collect_dir(&p, ext, &mut files)?;
        } else if p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::NoInput { pattern });
    }
    Ok(files)
}

/// Extensions of the compressed inputs read as they stream (gzip, zstd, bzip2); which codec
/// a file holds is told by its first bytes, so a misnamed file reads all the same.
const COMPRESSED: [&str; 5] = ["gz", "gzip", "zst", "zstd", "bz2"];

/// Whether a file name is `*.ext`, or `*.ext.gz` and the like for text formats.
fn has_ext(name: &str, ext: &str) -> bool {
    let base = match name.rsplit_once('.') {
        Some((base, c)) if matches!(ext, "csv" | "jsonl") && COMPRESSED.contains(&c) => base,
        _ => name,
    };
    base.rsplit_once('.').is_some_and(|(_, e)| e == ext)
}

/// A compressed input's codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TextCodec {
    Gzip,
    Zstd,
    Bzip2,
}

impl TextCodec {
    /// Told by a file's first bytes (magic numbers).
    fn sniff(head: &[u8]) -> Option<Self> {
        match head {
            [0x1f, 0x8b, ..] => Some(TextCodec::Gzip),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(TextCodec::Zstd),
            [b'B', b'Z', b'h', b'1'..=b'9', ..] => Some(TextCodec::Bzip2),
            _ => None,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            TextCodec::Gzip => "gzip",
            TextCodec::Zstd => "zstd",
            TextCodec::Bzip2 => "bzip2",
        }
    }
}

/// A decoder's complaint about its input: the file is corrupt or truncated (the user's to
/// fix, never retried), as opposed to the disk failing under it.
#[derive(Debug)]
pub(crate) struct CorruptInput(pub(crate) String);

impl std::fmt::Display for CorruptInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CorruptInput {}

/// What a decoder said, if it was about the data (a corrupt stream, or a record too long).
pub(crate) fn corrupt_input(e: &std::io::Error) -> Option<String> {
    let inner = e.get_ref()?;
    (inner.downcast_ref::<CorruptInput>().map(|c| c.0.clone()))
        .or_else(|| inner.downcast_ref::<RecordTooLong>().map(|r| r.to_string()))
}

/// Reads a compressed input, its decoder's data errors tagged as [`CorruptInput`].
pub(super) struct Decompressed {
    inner: Box<dyn Read + Send>,
    codec: TextCodec,
}

impl Decompressed {
    pub(super) fn new(inner: impl Read + Send + 'static, codec: TextCodec) -> Self {
        Decompressed { inner: Box::new(inner), codec }
    }
}

impl Read for Decompressed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::ErrorKind::*;
        self.inner.read(buf).map_err(|e| match e.kind() {
            InvalidInput | InvalidData | UnexpectedEof | Other => std::io::Error::other(CorruptInput(format!(
                "not a valid {} stream (corrupt or truncated): {e}",
                self.codec.name()
            ))),
            _ => e,
        })
    }
}

/// A record (a CSV record, a JSON line) longer than `max_record_mb`: the file has no line
/// ends where they should be, or an unclosed quote. Never skipped: what follows is not
/// records either.
#[derive(Debug)]
pub(crate) struct RecordTooLong(pub u64);

impl std::fmt::Display for RecordTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a record longer than {} MiB (a file without line ends, or an unclosed quote?); \
             raise the source's max_record_mb if its records are that long",
            self.0 >> 20
        )
    }
}

impl std::error::Error for RecordTooLong {}

/// Whether an I/O error is [`RecordTooLong`].
pub(crate) fn record_too_long(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<RecordTooLong>())
}

/// A text input that may be read at most `max` bytes past the start of the record in hand:
/// the reader calls [`RecordBudget::renew`] after each record, and a read beyond fails with
/// [`RecordTooLong`] rather than growing one record's buffer with the whole file.
pub(super) struct Capped {
    inner: TextInput,
    budget: RecordBudget,
}

/// The bytes a [`Capped`] input may still give before the next record ends.
#[derive(Clone)]
pub(super) struct RecordBudget {
    left: Arc<AtomicU64>,
    max: u64,
}

impl RecordBudget {
    /// A record ended: the next may be `max` bytes long (plus what its reader buffers ahead).
    pub fn renew(&self) {
        self.left.store(self.max + Capped::SLACK, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Capped {
    /// What a reader may have buffered past a record's end, allowed on top of `max`.
    const SLACK: u64 = 1 << 20;

    pub fn new(inner: TextInput, max: u64) -> (Capped, RecordBudget) {
        let budget = RecordBudget { left: Arc::new(AtomicU64::new(0)), max };
        budget.renew();
        (Capped { inner, budget: budget.clone() }, budget)
    }
}

impl Read for Capped {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let left = self.budget.left.load(Relaxed);
        if left == 0 {
            return Err(std::io::Error::other(RecordTooLong(self.budget.max)));
        }
        let room = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..room])?;
        self.budget.left.fetch_sub(n as u64, Relaxed);
        Ok(n)
    }
}

/// A text input as read: plain or decompressed.
pub(super) type TextInput = Box<dyn Read + Send>;

/// Open a text input (CSV, JSON lines) as UTF-8 text without a byte-order mark: plain, or
/// gzip, zstd or bzip2 decompressed as it is read, never whole in memory (the codec is told
/// by the file's first bytes), then transcoded from `encoding` if it is not UTF-8.
pub(super) fn open_text(path: &Path, encoding: Option<&'static encoding_rs::Encoding>) -> Result<TextInput> {
    let raw = open_raw(path, encoding.is_none())?;
    let mut text = encoding_rs_io::DecodeReaderBytesBuilder::new();
    Ok(match (encoding, raw) {
        // a plain UTF-8 file is read as it is, past its byte-order mark
        (None, Raw::Plain(file)) => Box::new(file),
        (None, Raw::Decoded(inner)) => Box::new(text.utf8_passthru(true).strip_bom(true).build(inner)),
        // a byte-order mark overrides the declared encoding, as browsers do
        (Some(enc), Raw::Plain(file)) => Box::new(text.encoding(Some(enc)).build(file)),
        (Some(enc), Raw::Decoded(inner)) => Box::new(text.encoding(Some(enc)).build(inner)),
    })
}

/// A text file's bytes: the file itself (positioned past a UTF-8 byte-order mark when
/// `skip_bom`), or a decompressing reader.
enum Raw {
    Plain(File),
    Decoded(TextInput),
}

fn open_raw(path: &Path, skip_bom: bool) -> Result<Raw> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]).map_err(|e| Error::io(path, e))? {
            0 => break,
            n => got += n,
        }
    }
    let bom = skip_bom && head[..got].starts_with(b"\xEF\xBB\xBF");
    file.seek(SeekFrom::Start(if bom { 3 } else { 0 })).map_err(|e| Error::io(path, e))?;
    let Some(codec) = TextCodec::sniff(&head[..got]) else { return Ok(Raw::Plain(file)) };
    // A zstd file of several frames is decompressed a frame per worker when enough threads
    // decode its text to outpace one decompressing thread (about 1 GB/s against 150-250
    // MB/s per decoding thread); with fewer, the extra threads only compete for the cores.
    if codec == TextCodec::Zstd && decode_workers() >= super::zstd_frames::MIN_DECODERS {
        if let Some(frames) = super::zstd_frames::frames(&mut file).map_err(|e| Error::io(path, e))? {
            let parallel = super::zstd_frames::ParallelFrames::spawn(file, frames).map_err(|e| Error::io(path, e))?;
            return Ok(Raw::Decoded(Box::new(parallel)));
        }
        file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    }
    let buffered = BufReader::with_capacity(256 << 10, file);
    let inner: Box<dyn Read + Send> = match codec {
        TextCodec::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        TextCodec::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(|e| Error::io(path, e))?)
        }
        TextCodec::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(buffered)),
    };
    let ahead = ReadAhead::spawn(Decompressed::new(inner, codec)).map_err(|e| Error::io(path, e))?;
    Ok(Raw::Decoded(Box::new(ahead)))
}

/// A decompressed chunk, or how the decompression ended.
pub(super) enum Chunk {
    Data(Vec<u8>),
    End,
    Failed(std::io::Error),
}

/// `inner`'s bytes to `chunks`, `ReadAhead::CHUNK` at a time, then its end or its failure;
/// it stops early when the receiver is gone.
pub(super) fn pump(mut inner: impl Read, chunks: &std::sync::mpsc::SyncSender<Chunk>) {
    loop {
        let mut buf = vec![0u8; ReadAhead::CHUNK];
        let mut filled = 0;
        let failed = loop {
            match inner.read(&mut buf[filled..]) {
                Ok(0) => break None,
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        break None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        let end = failed.is_some() || filled < ReadAhead::CHUNK;
        buf.truncate(filled);
        // a send fails only when the reader is gone: then so is the work
        if filled > 0 && chunks.send(Chunk::Data(buf)).is_err() {
            return;
        }
        if end {
            let _ = chunks.send(failed.map_or(Chunk::End, Chunk::Failed));
            return;
        }
    }
}

/// Decompression on a thread of its own, a few chunks ahead of the parser, so that the two
/// overlap rather than take turns (decompression is a third to a half of the cost of
/// reading a gzip CSV). At most `AHEAD` chunks of `CHUNK` bytes wait; the thread ends when
/// the input does or when the reader is dropped.
pub(super) struct ReadAhead {
    chunks: std::sync::mpsc::Receiver<Chunk>,
    current: Vec<u8>,
    at: usize,
    done: bool,
}

impl ReadAhead {
    pub(super) const CHUNK: usize = 256 << 10;
    pub(super) const AHEAD: usize = 4;

    fn spawn(inner: impl Read + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(Self::AHEAD);
        std::thread::Builder::new().name("weir-decompress".into()).spawn(move || pump(inner, &tx))?;
        Ok(ReadAhead { chunks: rx, current: Vec::new(), at: 0, done: false })
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.chunks.recv() {
                Ok(Chunk::Data(chunk)) => {
                    self.current = chunk;
                    self.at = 0;
                }
                Ok(Chunk::End) => self.done = true,
                Ok(Chunk::Failed(e)) => {
                    self.done = true;
                    return Err(e);
                }
                // the thread ended without saying how: never read that as the end of the data
                Err(_) => {
                    self.done = true;
                    return Err(std::io::Error::other("the decompression thread stopped unexpectedly"));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn collect_dir(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        if path.is_dir() {
            collect_dir(&path, ext, out)?;
        } else if has_ext(&name, ext) {
            out.push(path);
        }
    }
    Ok(())
}

impl FileSource {
    /// Open a configured source for one run.
    /// Open a configured file source; with `increment`, only the files modified in its
    /// window are read (the schema still comes from every file).
    pub fn open(
        source: &crate::config::Source,
        partition: Option<&str>,
        batch_size: usize,
        increment: Option<super::Increment>,
    ) -> Result<FileSource> {
        let mut source_files = expand_paths(&source.path, partition, source.format)?;
        let mut newest = None;
        let all_files = source_files.clone();
        if let Some(inc) = increment {
            let mut kept = Vec::new();
            for f in source_files {
                let modified = std::fs::metadata(&f)
                    .and_then(|m| m.modified())
                    .map_err(|e| Error::io(&f, e))?
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as i64)
                    .unwrap_or(0);
                // strictly after: the newest file a run read is not read again by the next
                if inc.lower.is_none_or(|l| modified > l) && modified < inc.upper {
                    newest = newest.max(Some(modified));
                    kept.push(f);
                }
            }
            source_files = kept;
        }
        let mut opened = FileSource::open_files(source, partition, batch_size, &all_files, source_files)?;
        opened.watermark = newest.map(super::format_micros);
        Ok(opened)
    }

    fn open_files(
        source: &crate::config::Source,
        partition: Option<&str>,
        batch_size: usize,
        all_files: &[PathBuf],
        files: Vec<PathBuf>,
    ) -> Result<FileSource> {
        // A Parquet directory is a dataset: its `key=value` folders become string columns.
        let dir = PathBuf::from(source.path.replace("{partition}", partition.unwrap_or("*")));
        let mut spec = ReadSpec {
            on_error: source.on_error,
            delimiter: source.delimiter,
            header: source.header,
            null_values: Arc::new(source.null_values.clone()),
            quote: source.quote,
            escape: source.escape,
            skip_rows: source.skip_rows,
            // checked when the pipeline was parsed
            encoding: source.encoding.as_deref().and_then(|l| encoding_rs::Encoding::for_label(l.as_bytes())),
            max_record: source.max_record_mb << 20,
            root: (source.format == Format::Parquet && dir.is_dir()).then_some(dir),
            ..ReadSpec::new(source.format, batch_size)
        };
        let schema = schema_of(all_files, source, &spec)?;
        // `columns`: Parquet reads only those; CSV and JSON lines parse all, then keep those.
        let Some(cols) = &source.columns else { return Ok(FileSource::new(schema, files, spec, None)) };
        let mut indices = Vec::new();
        for c in cols {
            indices.push(schema.index_of(c).map_err(|_| Error::Input {
                file: all_files[0].clone(),
                line: 0,
                column: Some(c.clone()),
                message: format!(
                    "sources.{}.columns names a column the input does not have (it has: {})",
                    source.name,
                    weir_sdk::util::schema_text(&schema)
                ),
            })?);
        }
        if source.format != Format::Parquet {
            return Ok(FileSource::new(schema, files, spec, Some(indices)));
        }
        spec.projection = Some(cols.clone());
        let projected = Arc::new(schema.project(&indices).map_err(|e| Error::Internal(e.to_string()))?);
        Ok(FileSource::new(projected, files, spec, None))
    }

    fn new(schema: SchemaRef, files: Vec<PathBuf>, spec: ReadSpec, project: Option<Vec<usize>>) -> FileSource {
        FileSource {
            schema,
            files,
            next_file: 0,
            current: None,
            spec,
            skipped: Vec::new(),
            skipped_count: 0,
            project,
            watermark: None,
            ahead: None,
        }
    }

    /// Read a Parquet dataset directory (hive partitions become columns of the given
    /// types). Used for a step reading an earlier step's output.
    pub fn open_dataset(
        root: &Path,
        schema: SchemaRef,
        partition_column: Option<&str>,
        batch_size: usize,
    ) -> Result<FileSource> {
        let mut files = Vec::new();
        if root.is_dir() {
            collect_dir(root, "parquet", &mut files)?;
        }
        files.sort();
        let mut spec = ReadSpec { root: Some(root.to_path_buf()), ..ReadSpec::new(Format::Parquet, batch_size) };
        if let Some(col) = partition_column {
            if let Ok(f) = schema.field_with_name(col) {
                spec.hive_types.insert(col.to_string(), f.data_type().clone());
            }
        }
        Ok(FileSource::new(schema, files, spec, None))
    }

    /// Read Parquet files at a path (a file, a dataset directory or a glob) with the schema
    /// of the first.
    pub fn open_parquet(path: &Path, batch_size: usize) -> Result<FileSource> {
        let pattern = path.to_string_lossy();
        let files = expand_paths(&pattern, None, Format::Parquet)?;
        let spec =
            ReadSpec { root: path.is_dir().then(|| path.to_path_buf()), ..ReadSpec::new(Format::Parquet, batch_size) };
        let schema = super::parquet::schema(&files[0], &spec)?;
        Ok(FileSource::new(schema, files, spec, None))
    }

    fn open_at(&mut self, offset: u64) -> Result<bool> {
        if self.next_file >= self.files.len() {
            return Ok(false);
        }
        let index = self.next_file;
        self.next_file += 1;
        self.current = Some(match self.ahead.take() {
            Some((i, file)) if i == index && offset == 0 => file,
            _ => open_file(&self.files[index], &self.schema, &self.spec, offset)?,
        });
        // the next file starts while this one is read (Parquet files decode in parallel
        // already, and their copied row groups follow the reader's state: not them)
        if self.spec.format != Format::Parquet && self.next_file < self.files.len() {
            let next = FileAhead::spawn(self.files[self.next_file].clone(), self.schema.clone(), self.spec.clone())?;
            self.ahead = Some((self.next_file, Box::new(next)));
        }
        Ok(true)
    }

    /// Where the next record comes from: (file index, records of it consumed).
    fn file_position(&self) -> (usize, u64) {
        match &self.current {
            Some(f) => (self.next_file - 1, f.consumed()),
            None => (self.next_file, 0),
        }
    }

    /// Continue at (file index, records of it consumed).
    fn seek_file(&mut self, file: usize, rows: u64) -> Result<()> {
        self.current = None;
        self.ahead = None;
        self.next_file = file.min(self.files.len());
        if rows > 0 {
            self.open_at(rows)?;
        }
        Ok(())
    }
}

impl Source for FileSource {
    /// The schema of the batches this reader yields (after `columns`).
    fn schema(&self) -> SchemaRef {
        match &self.project {
            Some(p) => Arc::new(self.schema.project(p).unwrap_or_else(|_| self.schema.as_ref().clone())),
            None => self.schema.clone(),
        }
    }

    fn next_batch(&mut self) -> Option<Result<RecordBatch>> {
        loop {
            if self.current.is_none() {
                match self.open_at(0) {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                }
            }
            let result = match self.current.as_mut() {
                Some(r) => r.next_batch(&mut self.skipped),
                None => Ok(None),
            };
            // keep the first few skip locations for the summary; count them all
            if self.skipped.len() > SKIPPED_KEPT {
                self.skipped_count += (self.skipped.len() - SKIPPED_KEPT) as u64;
                self.skipped.truncate(SKIPPED_KEPT);
            }
            match result {
                Ok(Some(batch)) if batch.num_rows() > 0 => {
                    return Some(match &self.project {
                        Some(p) => batch.project(p).map_err(|e| Error::Internal(e.to_string())),
                        None => Ok(batch),
                    })
                }
                Ok(Some(_)) => continue,
                Ok(None) => self.current = None,
                Err(e) => {
                    self.current = None;
                    self.ahead = None;
                    self.next_file = self.files.len();
                    return Some(Err(e));
                }
            }
        }
    }

    fn position(&self) -> Position {
        let (file, rows) = self.file_position();
        serde_json::json!({ "file": file, "rows": rows })
    }

    fn seek(&mut self, at: &Position) -> Result<()> {
        let field = |k: &str| at.get(k).and_then(serde_json::Value::as_u64);
        match (field("file"), field("rows")) {
            (Some(file), Some(rows)) => self.seek_file(file as usize, rows),
            _ => Err(Error::Internal(format!("a file source cannot continue from {at}"))),
        }
    }

    /// False inside a row group that copies columns: a checkpoint must not split it.
    fn at_boundary(&self) -> bool {
        self.current.as_ref().is_none_or(|f| f.at_row_group_end())
    }

    fn high_watermark(&self) -> Option<String> {
        self.watermark.clone()
    }

    fn skipped(&self) -> (u64, &[Skipped]) {
        (self.skipped_count + self.skipped.len() as u64, &self.skipped)
    }

    fn inputs(&self) -> usize {
        self.files.len()
    }

    /// CPU seconds spent so far decoding on threads other than the caller's (a large Parquet
    /// file's columns are decoded in two halves, one on a thread of its own).
    fn helper_cpu_secs(&self) -> f64 {
        self.spec.helper_cpu.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Copy `columns` from the files' pages instead of decoding them, in files where each
    /// of them is the same Parquet column as the output's and compressed with `codec`. The
    /// batches of such a file carry placeholders in those columns and come in whole row
    /// groups, each announced by [`Source::take_copied`]. Files that do not qualify are read
    /// as usual. Only Parquet sources read whole (no `columns`) offer it.
    fn copy_columns(&mut self, columns: Vec<CopyColumn>, codec: Compression) -> Vec<usize> {
        if self.spec.format != Format::Parquet || self.project.is_some() {
            return Vec::new();
        }
        let (spec, positions) = CopySpec::new(&self.schema, columns, codec, self.spec.batch_size);
        self.spec.copy = spec.map(Arc::new);
        positions
    }

    fn take_copied(&mut self) -> Option<CopiedGroup> {
        self.current.as_mut().and_then(|f| f.take_copied())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Gives `data` in reads of uneven sizes, then fails or panics if told to.
    struct Script {
        data: Vec<u8>,
        at: usize,
        then: &'static str,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.at == self.data.len() {
                return match self.then {
                    "fail" => Err(std::io::Error::other(CorruptInput("bad block".into()))),
                    "panic" => panic!("decoder bug"),
                    _ => Ok(0),
                };
            }
            let n = buf.len().min(self.data.len() - self.at).min(1 + self.at % 7919);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn read_all(then: &'static str, len: usize) -> (Vec<u8>, Option<std::io::Error>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        read_to_end_or_error(ReadAhead::spawn(Script { data, at: 0, then }).unwrap())
    }

    /// Everything `r` gives, in reads of an odd size, and the error it ends with, if any.
    pub(in crate::io::source) fn read_to_end_or_error(mut r: impl Read) -> (Vec<u8>, Option<std::io::Error>) {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 10_007];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return (out, None),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    fn text_spec(format: Format, batch_size: usize) -> ReadSpec {
        ReadSpec { batch_bytes: 1000, ..ReadSpec::new(format, batch_size) }
    }

    /// Every batch of `file`, by its number of rows.
    fn batch_rows(mut file: Box<dyn FileBatches>) -> Vec<usize> {
        let mut rows = Vec::new();
        while let Some(b) = file.next_batch(&mut Vec::new()).unwrap() {
            rows.push(b.num_rows());
        }
        rows
    }

    #[test]
    fn a_batch_of_text_ends_at_its_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("v", DataType::Utf8, true)]));
        let long = "x".repeat(99);
        let csv = dir.path().join("a.csv");
        std::fs::write(&csv, format!("v\n{}", format!("{long}\n").repeat(100))).unwrap();
        let jsonl = dir.path().join("a.jsonl");
        std::fs::write(&jsonl, format!("{{\"v\":\"{long}\"}}\n").repeat(100)).unwrap();
        // 100 records of about 100 bytes, a 1000-byte budget: batches of 9 to 11 rows
        // (fields alone, or whole lines), whatever batch_size says
        let spec = text_spec(Format::Csv, 8192);
        let csv_blocks = super::super::csv::open_parallel(&csv, &schema, &spec, 0).unwrap();
        let spec = text_spec(Format::Jsonl, 8192);
        let jsonl_blocks = super::super::jsonl::open_parallel(&jsonl, &schema, &spec, 0).unwrap();
        let jsonl_lines = super::super::jsonl::JsonlFile::open(&jsonl, &schema, &spec, 0).unwrap();
        let files: [Box<dyn FileBatches>; 3] = [Box::new(csv_blocks), Box::new(jsonl_blocks), Box::new(jsonl_lines)];
        for file in files {
            let rows = batch_rows(file);
            assert!(rows.iter().sum::<usize>() == 100 && rows.iter().all(|&r| r <= 11) && rows.len() >= 9, "{rows:?}");
        }
    }

    #[test]
    fn files_read_ahead_come_out_in_order_and_resume_where_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for f in 0..4 {
            let path = dir.path().join(format!("f{f}.csv"));
            let rows: String = (0..25).map(|r| format!("{}\n", f * 100 + r)).collect();
            // the third file has a bad row: skipped, reported in its place
            let rows = if f == 2 { rows.replace("210\n", "x\n") } else { rows };
            std::fs::write(&path, format!("id\n{rows}")).unwrap();
            files.push(path);
        }
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("id", DataType::Int64, true)]));
        let spec = ReadSpec { on_error: OnError::Skip, ..ReadSpec::new(Format::Csv, 10) };
        let ids = |b: RecordBatch| -> Vec<i64> {
            b.column(0).as_any().downcast_ref::<arrow_array::Int64Array>().unwrap().values().to_vec()
        };
        let mut all = FileSource::new(schema.clone(), files.clone(), spec.clone(), None);
        let (mut got, mut positions) = (Vec::new(), Vec::new());
        while let Some(b) = all.next_batch() {
            got.extend(ids(b.unwrap()));
            positions.push((all.position(), got.len()));
        }
        let want: Vec<i64> = (0..4).flat_map(|f| (0..25).map(move |r| f * 100 + r)).filter(|&i| i != 210).collect();
        assert_eq!(got, want);
        let (count, skipped) = all.skipped();
        assert_eq!((count, skipped[0].file.clone(), skipped[0].line), (1, files[2].clone(), 12));
        // from every position a fresh reader goes on with exactly the rows after it
        for (at, seen) in positions {
            let mut again = FileSource::new(schema.clone(), files.clone(), spec.clone(), None);
            again.seek(&at).unwrap();
            let mut rest = Vec::new();
            while let Some(b) = again.next_batch() {
                rest.extend(ids(b.unwrap()));
            }
            assert_eq!(rest, got[seen..], "from {at}");
        }
        // a file that fails while read ahead fails in its turn, after the files before it
        std::fs::write(&files[2], "id\n1\n").unwrap();
        std::fs::write(&files[3], b"id\n\xff\xfe\n").unwrap();
        let spec = ReadSpec { on_error: OnError::Fail, ..spec };
        let mut failing = FileSource::new(schema, files.clone(), spec, None);
        let mut rows = 0;
        let err = loop {
            match failing.next_batch() {
                Some(Ok(b)) => rows += b.num_rows(),
                Some(Err(e)) => break e.to_string(),
                None => panic!("no error"),
            }
        };
        assert!(rows == 51 && err.contains("f3.csv:2"), "{rows} {err}");
    }

    #[test]
    fn a_reading_thread_that_dies_is_an_error_not_the_end_of_the_file() {
        let spec = ReadSpec::new(Format::Csv, 10);
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("id", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(arrow_array::Int64Array::from(vec![1, 2]))]).unwrap();
        let decoder = || Ok(|b: &RecordBatch| Ok(Decoded { batch: Some(b.clone()), skipped: Vec::new(), end: 2 }));
        let mut file = Ordered::spawn(Path::new("f.csv"), 0, &spec, decoder, move |mut blocks: Blocks<RecordBatch>| {
            assert!(blocks.deliver(Some(batch), None, false));
            panic!("a bug in the reader");
        })
        .unwrap();
        assert_eq!(file.next_batch(&mut Vec::new()).unwrap().map(|b| b.num_rows()), Some(2));
        assert_eq!(file.consumed(), 2);
        let err = file.next_batch(&mut Vec::new()).unwrap_err().to_string();
        assert!(err.contains("stopped before the file's end"), "{err}");
    }

    #[test]
    fn a_cut_compressed_csv_fails_even_when_skipping_and_its_position_counts_only_rows_read() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let text: String = std::iter::once("id\n".to_string()).chain((0..200_000).map(|i| format!("{i}\n"))).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let path = dir.path().join("cut.csv.gz");
        std::fs::write(&path, &gz[..gz.len() * 2 / 3]).unwrap();
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("id", DataType::Int64, true)]));
        let spec = ReadSpec { on_error: OnError::Skip, ..ReadSpec::new(Format::Csv, 1000) };
        let mut source = FileSource::new(schema, vec![path], spec, None);
        let mut rows = 0;
        let err = loop {
            match source.next_batch() {
                Some(Ok(b)) => {
                    rows += b.num_rows() as u64;
                    // the position after a batch is the rows delivered so far, nothing more
                    assert_eq!(source.position()["rows"].as_u64(), Some(rows));
                }
                Some(Err(e)) => break e.to_string(),
                None => panic!("a cut file read as a whole one ({rows} rows)"),
            }
        };
        assert!(err.contains("not a valid gzip stream") && err.contains("cut.csv.gz:"), "{err}");
        assert_eq!(source.skipped().0, 0);
        assert!(rows > 1000 && rows < 200_000, "{rows}");
    }

    #[test]
    fn csv_records_of_another_width_are_refused_by_the_reader_without_copying_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commas.csv");
        let commas = ",".repeat(100_000);
        std::fs::write(&path, format!("a\n1\n{}2\n3\n", format!("{commas}\n").repeat(50))).unwrap();
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("a", DataType::Int64, true)]));
        let spec = ReadSpec { on_error: OnError::Skip, ..ReadSpec::new(Format::Csv, 8192) };
        let mut file = super::super::csv::open_parallel(&path, &schema, &spec, 0).unwrap();
        let (mut rows, mut skipped) = (0, Vec::new());
        while let Some(b) = file.next_batch(&mut skipped).unwrap() {
            rows += b.num_rows();
        }
        assert_eq!((rows, skipped.len()), (3, 50));
        assert_eq!(skipped[0].line, 3);
        assert!(skipped[0].message.contains("expected 1 fields, found 100001"), "{}", skipped[0].message);
    }

    #[test]
    fn read_ahead_gives_every_byte_then_the_end_or_the_error() {
        let want = |len: usize| -> Vec<u8> { (0..len).map(|i| (i * 31 % 251) as u8).collect() };
        for len in [0, 1, ReadAhead::CHUNK - 1, ReadAhead::CHUNK, ReadAhead::CHUNK * 5 + 3] {
            let (got, err) = read_all("end", len);
            assert!(err.is_none() && got == want(len), "{len}");
            // a decoder's error arrives after the bytes before it, still tagged as corrupt input
            let (got, err) = read_all("fail", len);
            assert_eq!(got, want(len));
            assert_eq!(corrupt_input(&err.unwrap()).as_deref(), Some("bad block"));
        }
        // a decoder that dies is an error, never a silently short file
        let (_, err) = read_all("panic", 1000);
        assert!(err.unwrap().to_string().contains("stopped unexpectedly"));
    }
}
