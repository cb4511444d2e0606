//! Built-in sources: CSV, JSON lines and Parquet files, from a file, a directory or a glob.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
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

use super::encode::{CopiedGroup, SharedFile};
use crate::cpu_clock::CpuTime;

use super::text::{infer_type, parse_json, parse_text, Cell, ColumnBuilder};
use super::{Error, Result};
use crate::config::{Format, OnError, Source};

/// A row a source skipped (with `on_error = "skip"`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub file: PathBuf,
    pub line: u64,
    pub message: String,
}

/// Batches from a source, in file order.
pub struct SourceReader {
    schema: SchemaRef,
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<FileReader>,
    spec: ReadSpec,
    /// Rows skipped so far.
    pub skipped: Vec<Skipped>,
    pub skipped_count: u64,
    /// `columns = [...]` on a CSV or JSON-lines source: indices kept from each batch.
    project: Option<Vec<usize>>,
}

#[derive(Clone)]
struct ReadSpec {
    format: Format,
    batch_size: usize,
    on_error: OnError,
    delimiter: u8,
    header: bool,
    /// CSV: field texts read as null besides the empty field.
    null_values: Arc<Vec<String>>,
    /// Types of hive partition columns (`key=value` directories); others are strings.
    hive_types: HashMap<String, DataType>,
    root: Option<PathBuf>,
    /// Parquet: read only these columns.
    projection: Option<Vec<String>>,
    /// Parquet: columns to copy from the files' pages instead of decoding them.
    copy: Option<Arc<CopySpec>>,
    /// CPU nanoseconds of the threads that decode part of a Parquet file's columns.
    helper_cpu: Arc<AtomicU64>,
}

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
struct CopySpec {
    columns: Vec<CopyColumn>,
    /// The output's codec: pages compressed otherwise are decoded and written again.
    codec: Compression,
    /// What the batches carry in place of a copied column, `batch_size` rows long.
    placeholders: Vec<(usize, ArrayRef)>,
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

enum FileReader {
    Csv(CsvFile),
    Jsonl(JsonlFile),
    Parquet(ParquetFile),
}

/// Expand a source path (file, directory or glob; `{partition}` substituted, or matching
/// every partition when the run has none) into a sorted list of files.
pub fn expand_paths(pattern: &str, partition: Option<&str>, format: Format) -> Result<Vec<PathBuf>> {
    let pattern = pattern.replace("{partition}", partition.unwrap_or("*"));
    let ext = match format {
        Format::Csv => "csv",
        Format::Jsonl => "jsonl",
        Format::Parquet => "parquet",
    };
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
        Some((base, c)) if ext != "parquet" && COMPRESSED.contains(&c) => base,
        _ => name,
    };
    base.rsplit_once('.').is_some_and(|(_, e)| e == ext)
}

/// A compressed input's codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextCodec {
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

    fn name(self) -> &'static str {
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
pub(crate) struct CorruptInput(String);

impl std::fmt::Display for CorruptInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CorruptInput {}

/// What a decoder said, if it was about the data.
pub(crate) fn corrupt_input(e: &std::io::Error) -> Option<String> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<CorruptInput>()).map(|c| c.0.clone())
}

/// Reads a compressed input, its decoder's data errors tagged as [`CorruptInput`].
struct Decoded {
    inner: Box<dyn Read + Send>,
    codec: TextCodec,
}

impl Read for Decoded {
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

/// Open a text input (CSV, JSON lines): plain, or gzip, zstd or bzip2 decompressed as it
/// is read, never whole in memory; the codec is told by the file's first bytes.
fn open_text(path: &Path) -> Result<Box<dyn Read + Send>> {
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
    file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    let Some(codec) = TextCodec::sniff(&head[..got]) else { return Ok(Box::new(file)) };
    let buffered = BufReader::with_capacity(256 << 10, file);
    let inner: Box<dyn Read + Send> = match codec {
        TextCodec::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        TextCodec::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(|e| Error::io(path, e))?)
        }
        TextCodec::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(buffered)),
    };
    Ok(Box::new(Decoded { inner, codec }))
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

impl SourceReader {
    /// Open a configured source for one run.
    pub fn open(source: &Source, partition: Option<&str>, batch_size: usize) -> Result<SourceReader> {
        let files = expand_paths(&source.path, partition, source.format)?;
        // A Parquet directory is a dataset: its `key=value` folders become string columns.
        let dir = PathBuf::from(source.path.replace("{partition}", partition.unwrap_or("*")));
        let root = (source.format == Format::Parquet && dir.is_dir()).then_some(dir);
        let spec = ReadSpec {
            format: source.format,
            batch_size,
            on_error: source.on_error,
            delimiter: source.delimiter,
            header: source.header,
            null_values: Arc::new(source.null_values.clone()),
            hive_types: HashMap::new(),
            root,
            projection: None,
            copy: None,
            helper_cpu: Arc::default(),
        };
        let mut spec = spec;
        let schema = match source.format {
            Format::Csv => csv_schema(&files, source)?,
            Format::Jsonl => jsonl_schema(&files, source)?,
            Format::Parquet => parquet_schema(&files[0], &spec)?,
        };
        // `columns`: Parquet reads only those; CSV and JSON lines parse all, then keep those.
        let Some(cols) = &source.columns else { return Ok(SourceReader::new(schema, files, spec, None)) };
        let mut indices = Vec::new();
        for c in cols {
            indices.push(schema.index_of(c).map_err(|_| Error::Input {
                file: files[0].clone(),
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
            return Ok(SourceReader::new(schema, files, spec, Some(indices)));
        }
        spec.projection = Some(cols.clone());
        let projected = Arc::new(schema.project(&indices).map_err(|e| Error::Internal(e.to_string()))?);
        Ok(SourceReader::new(projected, files, spec, None))
    }

    fn new(schema: SchemaRef, files: Vec<PathBuf>, spec: ReadSpec, project: Option<Vec<usize>>) -> SourceReader {
        SourceReader {
            schema,
            files,
            next_file: 0,
            current: None,
            spec,
            skipped: Vec::new(),
            skipped_count: 0,
            project,
        }
    }

    /// Read a Parquet dataset directory (hive partitions become columns of the given
    /// types). Used for a step reading an earlier step's output.
    pub fn open_dataset(
        root: &Path,
        schema: SchemaRef,
        partition_column: Option<&str>,
        batch_size: usize,
    ) -> Result<SourceReader> {
        let mut files = Vec::new();
        if root.is_dir() {
            collect_dir(root, "parquet", &mut files)?;
        }
        files.sort();
        let mut hive_types = HashMap::new();
        if let Some(col) = partition_column {
            if let Ok(f) = schema.field_with_name(col) {
                hive_types.insert(col.to_string(), f.data_type().clone());
            }
        }
        let spec = ReadSpec {
            format: Format::Parquet,
            batch_size,
            on_error: OnError::Fail,
            delimiter: b',',
            header: true,
            null_values: Arc::default(),
            hive_types,
            root: Some(root.to_path_buf()),
            projection: None,
            copy: None,
            helper_cpu: Arc::default(),
        };
        Ok(SourceReader::new(schema, files, spec, None))
    }

    /// The schema of the batches this reader yields (after `columns`).
    pub fn schema(&self) -> SchemaRef {
        match &self.project {
            Some(p) => Arc::new(self.schema.project(p).unwrap_or_else(|_| self.schema.as_ref().clone())),
            None => self.schema.clone(),
        }
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Whether this reader decodes Parquet files (whose pages columns can be copied from).
    pub fn is_parquet(&self) -> bool {
        self.spec.format == Format::Parquet && self.project.is_none()
    }

    /// Copy `columns` from the files' pages instead of decoding them, in files where each
    /// of them is the same Parquet column as the output's and compressed with `codec`. The
    /// batches of such a file carry placeholders in those columns and come in whole row
    /// groups, each announced by [`SourceReader::take_copied`]. Files that do not qualify
    /// are read as usual. Returns the positions of the columns it will copy (not those whose
    /// type has no placeholder).
    pub fn copy_columns(&mut self, columns: Vec<CopyColumn>, codec: Compression) -> Vec<usize> {
        let mut placeholders = Vec::new();
        let mut kept = Vec::new();
        for c in columns {
            if let Some(p) = placeholder(self.schema.field(c.position), self.spec.batch_size) {
                placeholders.push((c.position, p));
                kept.push(c);
            }
        }
        let positions = kept.iter().map(|c| c.position).collect();
        self.spec.copy = (!kept.is_empty()).then(|| Arc::new(CopySpec { columns: kept, codec, placeholders }));
        positions
    }

    /// The row group whose batches start with the batch [`Iterator::next`] just returned,
    /// when it copies columns.
    pub fn take_copied(&mut self) -> Option<CopiedGroup> {
        match self.current.as_mut() {
            Some(FileReader::Parquet(f)) => f.copy.as_mut().and_then(|c| c.pending.take()),
            _ => None,
        }
    }

    /// False inside a row group that copies columns: a checkpoint must not split it.
    pub fn at_row_group_end(&self) -> bool {
        match &self.current {
            Some(FileReader::Parquet(f)) => f.copy.as_ref().is_none_or(|c| c.left == 0),
            _ => true,
        }
    }

    /// CPU seconds spent so far decoding on threads other than the caller's (a large Parquet
    /// file's columns are decoded in two halves, one on a thread of its own).
    pub fn helper_cpu_secs(&self) -> f64 {
        self.spec.helper_cpu.load(Ordering::Relaxed) as f64 / 1e9
    }

    fn open_next(&mut self) -> Result<bool> {
        self.open_at(0)
    }

    fn open_at(&mut self, offset: u64) -> Result<bool> {
        if self.next_file >= self.files.len() {
            return Ok(false);
        }
        let path = self.files[self.next_file].clone();
        self.next_file += 1;
        self.current = Some(match self.spec.format {
            Format::Csv => {
                let mut f = CsvFile::open(&path, &self.schema, &self.spec)?;
                f.skip(offset)?;
                FileReader::Csv(f)
            }
            Format::Jsonl => {
                let mut f = JsonlFile::open(&path, &self.schema, &self.spec)?;
                f.skip(offset)?;
                FileReader::Jsonl(f)
            }
            Format::Parquet => FileReader::Parquet(ParquetFile::open(&path, &self.schema, &self.spec, offset)?),
        });
        Ok(true)
    }

    /// Where the next record comes from: (file index, records of it consumed). Taken at a
    /// batch boundary, it is what a checkpoint records.
    pub fn position(&self) -> (usize, u64) {
        match &self.current {
            Some(FileReader::Csv(f)) => (self.next_file - 1, f.consumed),
            Some(FileReader::Jsonl(f)) => (self.next_file - 1, f.line),
            Some(FileReader::Parquet(f)) => (self.next_file - 1, f.consumed),
            None => (self.next_file, 0),
        }
    }

    /// Continue from a position [`SourceReader::position`] returned.
    pub fn seek(&mut self, file: usize, rows: u64) -> Result<()> {
        self.current = None;
        self.next_file = file.min(self.files.len());
        if rows > 0 {
            self.open_at(rows)?;
        }
        Ok(())
    }
}

impl Iterator for SourceReader {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                match self.open_next() {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                }
            }
            let result = match self.current.as_mut() {
                Some(FileReader::Csv(r)) => r.next_batch(&mut self.skipped),
                Some(FileReader::Jsonl(r)) => r.next_batch(&mut self.skipped),
                Some(FileReader::Parquet(r)) => r.next_batch(),
                None => Ok(None),
            };
            // keep the first few skip locations for the summary; count them all
            if self.skipped.len() > 20 {
                self.skipped_count += (self.skipped.len() - 20) as u64;
                self.skipped.truncate(20);
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
                    self.next_file = self.files.len();
                    return Some(Err(e));
                }
            }
        }
    }
}

impl SourceReader {
    /// Rows skipped in all (the first 20 are kept in `skipped` with their place).
    pub fn total_skipped(&self) -> u64 {
        self.skipped_count + self.skipped.len() as u64
    }
}

// ---------------------------------------------------------------------------------------
// CSV

/// A text input as read: plain or decompressed.
type TextInput = Box<dyn Read + Send>;

fn csv_reader(path: &Path, delimiter: u8, header: bool) -> Result<csv::Reader<TextInput>> {
    let input = open_text(path)?;
    Ok(csv::ReaderBuilder::new().delimiter(delimiter).has_headers(header).flexible(true).from_reader(input))
}

fn csv_header(path: &Path, reader: &mut csv::Reader<TextInput>, header: bool) -> Result<Vec<String>> {
    let rec = reader.byte_headers().map_err(|e| csv_error(path, e))?.clone();
    let mut names = Vec::new();
    for (i, f) in rec.iter().enumerate() {
        if !header {
            names.push(format!("column_{}", i + 1));
            continue;
        }
        let name = std::str::from_utf8(f).map_err(|_| Error::Input {
            file: path.to_path_buf(),
            line: 1,
            column: Some(format!("#{}", i + 1)),
            message: "the header is not valid UTF-8".into(),
        })?;
        names.push(name.trim().to_string());
    }
    Ok(names)
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map(|p| p.line()).unwrap_or(0);
    match e.into_kind() {
        csv::ErrorKind::Io(io) => match corrupt_input(&io) {
            Some(message) => Error::Input { file: path.to_path_buf(), line, column: None, message },
            None => Error::io(path, io),
        },
        other => Error::Input { file: path.to_path_buf(), line, column: None, message: format!("{other:?}") },
    }
}

fn csv_schema(files: &[PathBuf], source: &Source) -> Result<SchemaRef> {
    let path = &files[0];
    let mut reader = csv_reader(path, source.delimiter, source.header)?;
    let names = csv_header(path, &mut reader, source.header)?;
    let declared: HashMap<&str, &DataType> = source.schema.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if !declared.is_empty() {
        let missing: Vec<&str> =
            source.schema.iter().map(|(n, _)| n.as_str()).filter(|n| !names.iter().any(|h| h == n)).collect();
        let undeclared: Vec<&str> = names.iter().map(String::as_str).filter(|n| !declared.contains_key(n)).collect();
        if !missing.is_empty() || !undeclared.is_empty() {
            let mut msg = String::new();
            if !missing.is_empty() {
                msg.push_str(&format!("declared columns missing from the header: {}. ", missing.join(", ")));
            }
            if !undeclared.is_empty() {
                msg.push_str(&format!(
                    "header columns not declared in sources.{}.schema: {}",
                    source.name,
                    undeclared.join(", ")
                ));
            }
            return Err(Error::Input { file: path.clone(), line: 1, column: None, message: msg.trim().to_string() });
        }
        let fields: Vec<Field> = names.iter().map(|n| Field::new(n, declared[n.as_str()].clone(), true)).collect();
        return Ok(Arc::new(Schema::new(fields)));
    }
    // infer from the first rows of the first file
    let mut samples: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let mut rec = csv::StringRecord::new();
    for _ in 0..source.infer_rows {
        match reader.read_record(&mut rec) {
            Ok(true) => {
                for (i, v) in rec.iter().enumerate().take(names.len()) {
                    // a null marker says nothing about the column's type
                    let v = if source.null_values.iter().any(|n| n == v) { "" } else { v };
                    samples[i].push(v.to_string());
                }
            }
            Ok(false) => break,
            Err(_) => continue, // bad rows are reported when read for real
        }
    }
    let fields: Vec<Field> = names
        .iter()
        .zip(&samples)
        .map(|(n, s)| Field::new(n, infer_type(s.iter().map(String::as_str)), true))
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

struct CsvFile {
    path: PathBuf,
    reader: csv::Reader<TextInput>,
    /// For each schema column, its index in this file's records.
    positions: Vec<usize>,
    schema: SchemaRef,
    builders: Vec<ColumnBuilder>,
    batch_size: usize,
    on_error: OnError,
    record: csv::ByteRecord,
    width: usize,
    cells: Vec<Cell>,
    /// Records consumed (good, bad and skipped): the position checkpoints record.
    consumed: u64,
    /// Field texts read as null besides the empty field.
    null_values: Arc<Vec<String>>,
}

impl CsvFile {
    fn open(path: &Path, schema: &SchemaRef, spec: &ReadSpec) -> Result<Self> {
        let mut reader = csv_reader(path, spec.delimiter, spec.header)?;
        let names = csv_header(path, &mut reader, spec.header)?;
        let mut positions = Vec::new();
        for f in schema.fields() {
            let pos = names.iter().position(|n| n == f.name()).ok_or_else(|| Error::Input {
                file: path.to_path_buf(),
                line: 1,
                column: Some(f.name().clone()),
                message: format!(
                    "the header lacks column `{}` (the files of one source must share their columns)",
                    f.name()
                ),
            })?;
            positions.push(pos);
        }
        let builders = schema
            .fields()
            .iter()
            .map(|f| ColumnBuilder::new(f.data_type(), spec.batch_size.min(8192)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|m| Error::Input { file: path.to_path_buf(), line: 0, column: None, message: m })?;
        Ok(CsvFile {
            path: path.to_path_buf(),
            reader,
            positions,
            schema: schema.clone(),
            builders,
            batch_size: spec.batch_size,
            on_error: spec.on_error,
            record: csv::ByteRecord::new(),
            width: names.len(),
            cells: Vec::new(),
            consumed: 0,
            null_values: spec.null_values.clone(),
        })
    }

    fn next_batch(&mut self, skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        let mut rows = 0;
        let mut eof = false;
        while rows < self.batch_size {
            let read = self.reader.read_byte_record(&mut self.record);
            if !matches!(read, Ok(false)) {
                self.consumed += 1;
            }
            match read {
                Ok(false) => {
                    eof = true;
                    break;
                }
                Ok(true) => {}
                Err(e) => {
                    let err = csv_error(&self.path, e);
                    match (&err, self.on_error) {
                        (Error::Input { line, message, .. }, OnError::Skip) => {
                            skipped.push(Skipped { file: self.path.clone(), line: *line, message: message.clone() });
                            continue;
                        }
                        _ => return Err(err),
                    }
                }
            }
            let line = self.record.position().map(|p| p.line()).unwrap_or(0);
            match self.parse_row(line) {
                Ok(()) => {
                    for (b, c) in self.builders.iter_mut().zip(self.cells.drain(..)) {
                        b.push(c);
                    }
                    rows += 1;
                }
                Err(err) => match (self.on_error, &err) {
                    (OnError::Skip, Error::Input { message, column, .. }) => skipped.push(Skipped {
                        file: self.path.clone(),
                        line,
                        message: match column {
                            Some(c) => format!("column `{c}`: {message}"),
                            None => message.clone(),
                        },
                    }),
                    _ => return Err(err),
                },
            }
        }
        if rows == 0 && eof {
            return Ok(None);
        }
        let columns: Vec<ArrayRef> = self.builders.iter_mut().map(|b| b.finish()).collect();
        Ok(Some(RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| Error::Internal(e.to_string()))?))
    }

    /// Skip `n` records (resuming from a checkpoint).
    fn skip(&mut self, n: u64) -> Result<()> {
        while self.consumed < n {
            match self.reader.read_byte_record(&mut self.record) {
                Ok(false) => break,
                Ok(true) | Err(_) => self.consumed += 1,
            }
        }
        Ok(())
    }

    fn parse_row(&mut self, line: u64) -> Result<()> {
        self.cells.clear();
        if self.record.len() != self.width {
            return Err(Error::Input {
                file: self.path.clone(),
                line,
                column: None,
                message: format!("expected {} fields, found {}", self.width, self.record.len()),
            });
        }
        for (f, &pos) in self.schema.fields().iter().zip(&self.positions) {
            let raw = &self.record[pos];
            let text = std::str::from_utf8(raw).map_err(|e| Error::Input {
                file: self.path.clone(),
                line,
                column: Some(f.name().clone()),
                message: format!("invalid UTF-8 at byte {} of the field", e.valid_up_to()),
            })?;
            if self.null_values.iter().any(|n| n == text) {
                self.cells.push(Cell::Null);
                continue;
            }
            let cell = parse_text(text, f.data_type()).map_err(|message| Error::Input {
                file: self.path.clone(),
                line,
                column: Some(f.name().clone()),
                message,
            })?;
            self.cells.push(cell);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// JSON lines

fn jsonl_schema(files: &[PathBuf], source: &Source) -> Result<SchemaRef> {
    if !source.schema.is_empty() {
        let fields: Vec<Field> = source.schema.iter().map(|(n, t)| Field::new(n, t.clone(), true)).collect();
        return Ok(Arc::new(Schema::new(fields)));
    }
    let path = &files[0];
    let file = open_text(path)?;
    let mut order: Vec<String> = Vec::new();
    let mut samples: HashMap<String, Vec<String>> = HashMap::new();
    let mut kinds: HashMap<String, DataType> = HashMap::new();
    for line in BufReader::new(file).lines().take(source.infer_rows) {
        let line = line.map_err(|e| match corrupt_input(&e) {
            Some(message) => Error::Input { file: path.clone(), line: 0, column: None, message },
            None => Error::io(path, e),
        })?;
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        for (k, v) in map {
            if !order.contains(&k) {
                order.push(k.clone());
            }
            match v {
                serde_json::Value::String(s) => samples.entry(k).or_default().push(s),
                serde_json::Value::Number(n) => {
                    let t = if n.is_i64() { DataType::Int64 } else { DataType::Float64 };
                    let e = kinds.entry(k).or_insert(t.clone());
                    if *e != t {
                        *e = DataType::Float64;
                    }
                }
                serde_json::Value::Bool(_) => {
                    kinds.entry(k).or_insert(DataType::Boolean);
                }
                _ => {}
            }
        }
    }
    let fields: Vec<Field> = order
        .iter()
        .map(|k| {
            let t = match (kinds.get(k), samples.get(k)) {
                (Some(t), None) => t.clone(),
                (None, Some(s)) => infer_type(s.iter().map(String::as_str)),
                _ => DataType::Utf8,
            };
            Field::new(k, t, true)
        })
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

struct JsonlFile {
    path: PathBuf,
    lines: std::io::Lines<BufReader<TextInput>>,
    line: u64,
    schema: SchemaRef,
    builders: Vec<ColumnBuilder>,
    batch_size: usize,
    on_error: OnError,
}

impl JsonlFile {
    fn open(path: &Path, schema: &SchemaRef, spec: &ReadSpec) -> Result<Self> {
        let file = open_text(path)?;
        let builders = schema
            .fields()
            .iter()
            .map(|f| ColumnBuilder::new(f.data_type(), spec.batch_size.min(8192)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|m| Error::Input { file: path.to_path_buf(), line: 0, column: None, message: m })?;
        Ok(JsonlFile {
            path: path.to_path_buf(),
            lines: BufReader::new(file).lines(),
            line: 0,
            schema: schema.clone(),
            builders,
            batch_size: spec.batch_size,
            on_error: spec.on_error,
        })
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        while self.line < n {
            if self.lines.next().is_none() {
                break;
            }
            self.line += 1;
        }
        Ok(())
    }

    fn parse_line(&self, text: &str) -> Result<Vec<Cell>> {
        let err = |column: Option<String>, message: String| Error::Input {
            file: self.path.clone(),
            line: self.line,
            column,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(None, format!("not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(err(None, "each line must be a JSON object".into()));
        };
        let mut cells = Vec::with_capacity(self.schema.fields().len());
        for f in self.schema.fields() {
            let v = map.get(f.name()).unwrap_or(&serde_json::Value::Null);
            cells.push(parse_json(v, f.data_type()).map_err(|m| err(Some(f.name().clone()), m))?);
        }
        Ok(cells)
    }

    fn next_batch(&mut self, skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        let mut rows = 0;
        let mut eof = false;
        while rows < self.batch_size {
            let Some(line) = self.lines.next() else {
                eof = true;
                break;
            };
            self.line += 1;
            let line = match line {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    let err = Error::Input {
                        file: self.path.clone(),
                        line: self.line,
                        column: None,
                        message: "invalid UTF-8".into(),
                    };
                    if self.on_error == OnError::Skip {
                        skipped.push(Skipped {
                            file: self.path.clone(),
                            line: self.line,
                            message: "invalid UTF-8".into(),
                        });
                        continue;
                    }
                    return Err(err);
                }
                Err(e) => {
                    return Err(match corrupt_input(&e) {
                        Some(message) => {
                            Error::Input { file: self.path.clone(), line: self.line, column: None, message }
                        }
                        None => Error::io(&self.path, e),
                    })
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            match self.parse_line(&line) {
                Ok(cells) => {
                    for (b, c) in self.builders.iter_mut().zip(cells) {
                        b.push(c);
                    }
                    rows += 1;
                }
                Err(Error::Input { message, column, .. }) if self.on_error == OnError::Skip => skipped.push(Skipped {
                    file: self.path.clone(),
                    line: self.line,
                    message: match column {
                        Some(c) => format!("column `{c}`: {message}"),
                        None => message,
                    },
                }),
                Err(e) => return Err(e),
            }
        }
        if rows == 0 && eof {
            return Ok(None);
        }
        let columns: Vec<ArrayRef> = self.builders.iter_mut().map(|b| b.finish()).collect();
        Ok(Some(RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| Error::Internal(e.to_string()))?))
    }
}

// ---------------------------------------------------------------------------------------
// Parquet

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
                .map(|(k, v)| (k.to_string(), super::sink::unescape_partition(v)))
                .collect()
        })
        .unwrap_or_default()
}

fn parquet_schema(file: &Path, spec: &ReadSpec) -> Result<SchemaRef> {
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

struct ParquetFile {
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
    fn open(path: &Path, schema: &SchemaRef, spec: &ReadSpec, offset: u64) -> Result<Self> {
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

    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
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
                let col = if v == super::sink::NULL_PARTITION {
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

#[cfg(test)]
mod tests {
    use super::*;
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
            let mut reader = SourceReader::open_dataset(dir.path(), all.schema(), None, 100).unwrap();
            if start > 0 {
                reader.seek(0, start).unwrap();
            }
            let batches: Vec<RecordBatch> = reader.by_ref().map(|b| b.unwrap()).collect();
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
        let mut reader = SourceReader::open_dataset(dir.path(), small.schema(), None, 100).unwrap();
        let rows: usize = reader.by_ref().map(|b| b.unwrap().num_rows()).sum();
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
