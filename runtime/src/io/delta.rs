//! Delta Lake tables as outputs (`output.format = "delta"`), through `delta_kernel`.
//!
//! weir writes a step's Parquet files itself (its own sink, staged like any output), and a
//! Delta commit makes them visible. The commit is the run's publish:
//!
//! ```text
//!   staged files (invisible: nothing references them)
//!     -> the run decides to publish                        (run store)
//!     -> each staged file hard-linked into the table      (still invisible)
//!     -> one commit: remove (what the mode replaces) + add (the run's files)
//!        + txn(app id = weir/PIPELINE/STEP[/PARTITION], version = run id)
//!     -> the run store records the switch (the table version)
//! ```
//!
//! A crash anywhere before the commit leaves the table as it was (linked files that no
//! version references are what `weir table vacuum` removes). A crash after the commit and
//! before the run store recorded it is settled by recovery: the table's transaction
//! version for the app id is the run's, so the commit is recognised and not made twice.
//! A concurrent writer's commit makes ours conflict: the removes are computed again on the
//! new version and the commit retried, so two overwrites of one partition never both show.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use delta_kernel::committer::FileSystemCommitter;
use delta_kernel::engine::arrow_conversion::TryFromArrow;
use delta_kernel::engine::arrow_data::ArrowEngineData;
use delta_kernel::schema::{StructField, StructType};
use delta_kernel::transaction::create_table::create_table;
use delta_kernel::transaction::data_layout::DataLayout;
use delta_kernel::transaction::{CommitResult, UpdateTableOperation};
use delta_kernel::{FilteredEngineData, Snapshot, SnapshotRef};
use delta_kernel_default_engine::executor::tokio::TokioBackgroundExecutor;
use delta_kernel_default_engine::DefaultEngine;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::remote::{block_on, object_path, s3_store};
use super::sink::{unescape_partition, NULL_PARTITION};
use crate::config::Remote;

/// Where a merge's commit rewrites table files in the staging (see [`Hooks::merge`]).
pub const REWRITTEN: &str = "_weir_rewritten";

type Res<T> = Result<T, String>;

/// How many times a commit that lost a race to another writer is computed again.
const COMMIT_ATTEMPTS: usize = 10;

/// How a run's files meet the table (`output.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Replace the whole table.
    Overwrite,
    /// Replace the partitions the run wrote; the others stay.
    OverwritePartitions,
    /// Add the run's files.
    Append,
    /// Upsert by key: the run's staging holds its rows reduced by key; the commit rewrites
    /// the table files holding the run's keys and removes them.
    Merge,
}

/// Everything a commit needs, decided before the run store records the decision; recovery
/// commits from it alone (it travels as the switch's token).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CommitSpec {
    /// The transaction's application id: `weir/PIPELINE/STEP`, and `/PARTITION` in a
    /// partition run.
    pub app_id: String,
    /// The run id: the transaction version.
    pub version: i64,
    pub mode: Mode,
    pub partition_by: Option<String>,
    /// The step's output schema (Arrow JSON), the table's schema when the run creates it.
    pub schema: String,
    /// Recorded in the commit's `operationParameters`.
    pub pipeline: String,
    pub step: String,
    pub run_partition: Option<String>,
    /// A table on object storage (the switch's target is then its local staging folder).
    #[serde(default)]
    pub remote: Option<Remote>,
    /// A merge's key, and how rewritten files are written.
    #[serde(default)]
    pub key: Vec<String>,
    /// A merge's `sequence_by` column: its deletes are remembered in the table (see
    /// [`TOMBSTONES`]).
    #[serde(default)]
    pub sequence_by: Option<String>,
    #[serde(default)]
    pub row_group_size: usize,
    #[serde(default)]
    pub compression: crate::config::Codec,
}

/// What a merge's commit changes besides adding the run's files (see [`Hooks::merge`]).
#[derive(Debug, Default)]
pub struct MergeFold {
    /// The table files (paths as the log has them) the commit removes: rewritten without
    /// the run's keys.
    pub removes: HashSet<String>,
    /// Staged files (relative to the staging) the commit does not add: rewritten without
    /// the run's rows that a newer table row or remembered delete outdates.
    pub skip: HashSet<PathBuf>,
    /// The remembered deletes after the commit, when the run changed them (a staged file).
    pub tombstones: Option<PathBuf>,
    /// The table rows the run replaced or deleted.
    pub replaced: u64,
    /// The run's rows dropped as outdated.
    pub outdated: u64,
    /// Table files passed over: their statistics show they hold none of the run's keys; of
    /// how many.
    pub pruned: u64,
    pub files: u64,
}

/// Folds a merge into the version being committed over: its files and its remembered
/// deletes (a path in the table, if any). See [`Hooks`].
pub type MergeHook<'a> = dyn Fn(&[TableFile], Option<&str>) -> Res<MergeFold> + 'a;

/// Where a merge with `sequence_by` keeps the deletes it applied (key and sequence, Arrow
/// IPC) in the table: `_weir_tombstones/TAG-rRUN.arrow`, where TAG is the hash of
/// `weir/PIPELINE/STEP`. Each merge that changes them writes a new file, and the same
/// commit records its run in a `txn` action for the app id `weir-tombstones/TAG`: the
/// current file is the one that action names, so it switches atomically with the data.
/// Readers skip the folder (it starts with `_`), and so do vacuums of other engines.
pub const TOMBSTONES: &str = "_weir_tombstones";

/// The app id that names a step's current remembered deletes, and their folder's tag.
fn tombstone_app(pipeline: &str, step: &str) -> (String, String) {
    let tag = super::remote::writer_tag(&format!("weir/{pipeline}/{step}"));
    (format!("weir-tombstones/{tag}"), tag)
}

/// The path in the table of a step's remembered deletes as run `run` left them.
fn tombstone_path(tag: &str, run: i64) -> String {
    format!("{TOMBSTONES}/{tag}-r{run}.arrow")
}

/// What the commit calls back into the engine for.
pub struct Hooks<'a> {
    /// At `delta-linked` (the files are in the table, not yet committed), for crash tests.
    pub pause: &'a dyn Fn(&str),
    /// A merge: rewrite the files of the version being committed over that hold the run's
    /// keys (under the staging's `_weir_rewritten`, laid out as the table), and with
    /// `sequence_by` drop the run's outdated rows and remember its deletes; see
    /// [`MergeFold`].
    pub merge: Option<&'a MergeHook<'a>>,
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The table version the run's commit made.
    pub version: u64,
    pub added: usize,
    pub removed: usize,
    /// Whether this call made it (false: it had been made already).
    pub now: bool,
    /// A merge's table rows replaced or deleted, its rows dropped as outdated, and the table
    /// files it passed over by their statistics (of how many).
    pub replaced: u64,
    pub outdated: u64,
    pub pruned: (u64, u64),
}

/// A table's engine and location: a local folder, or a prefix on S3-compatible storage.
pub struct Table {
    /// For messages: the folder, or the s3:// URL.
    name: String,
    /// A local table's folder.
    local: Option<PathBuf>,
    remote: Option<Remote>,
    url: url::Url,
    engine: DefaultEngine<TokioBackgroundExecutor>,
}

/// A kernel error as a message: without the backtrace the kernel attaches when
/// RUST_BACKTRACE is set, and at most 2000 characters (it may quote what it read).
fn kernel(what: &str) -> impl Fn(delta_kernel::KernelError) -> String + '_ {
    move |e| {
        let mut text = e.without_backtrace().to_string();
        if text.len() > 2000 {
            let cut = (0..=2000).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            text.truncate(cut);
            text.push_str(" ...");
        }
        format!("{what}: {text}")
    }
}

impl Table {
    /// The table at a local directory (it need not exist yet).
    pub fn local(path: &Path) -> Res<Table> {
        let abs = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let url =
            url::Url::from_directory_path(&abs).map_err(|()| format!("{} is not a valid table path", abs.display()))?;
        let store = Arc::new(delta_kernel::object_store::local::LocalFileSystem::new());
        let engine = delta_kernel_default_engine::DefaultEngineBuilder::new(store).build();
        Ok(Table { name: abs.display().to_string(), local: Some(abs), remote: None, url, engine })
    }

    /// The table at `remote` if given, else at the local folder `path`.
    pub fn open(path: &Path, remote: Option<&Remote>) -> Res<Table> {
        let Some(r) = remote else { return Table::local(path) };
        let url = url::Url::parse(&r.url).map_err(|e| format!("{}: {e}", r.url))?;
        let engine = delta_kernel_default_engine::DefaultEngineBuilder::new(s3_store(r)?).build();
        Ok(Table { name: r.url.clone(), local: None, remote: Some(r.clone()), url, engine })
    }

    /// The folder or URL, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where a table on object storage is, and how it is reached.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// Whether a Delta log is there.
    pub fn exists(&self) -> Res<bool> {
        match (&self.local, &self.remote) {
            (Some(p), _) => Ok(p.join("_delta_log").is_dir()),
            (None, Some(r)) => {
                let store = s3_store(r)?;
                let prefix = object_path(&self.url, "_delta_log/")?;
                let found = block_on(Box::pin(async move {
                    use futures::StreamExt;
                    let mut list = store.list(Some(&prefix));
                    match list.next().await {
                        None => Ok(false),
                        Some(Ok(_)) => Ok(true),
                        Some(Err(e)) => Err(e.to_string()),
                    }
                }))?;
                found.map_err(|e| format!("cannot list {}: {e}", self.name))
            }
            (None, None) => Ok(false),
        }
    }

    /// The latest version (none: no table yet).
    pub fn snapshot(&self) -> Res<Option<SnapshotRef>> {
        if !self.exists()? {
            return Ok(None);
        }
        Snapshot::builder_for(self.url.as_str())
            .build(&self.engine)
            .map(Some)
            .map_err(kernel(&format!("cannot read the Delta table at {}", self.name)))
    }

    /// The last transaction version the table recorded for `app_id`.
    pub fn app_version(&self, snap: &Snapshot, app_id: &str) -> Res<Option<i64>> {
        snap.get_app_id_version(app_id, &self.engine).map_err(kernel("cannot read the table's transactions"))
    }

    /// The files of the latest version, with their partition values.
    pub fn files(&self, snap: &SnapshotRef) -> Res<Vec<TableFile>> {
        self.files_ranged(snap, None)
    }

    /// The files of the latest version, each with the minimum and maximum of the data column
    /// `column` when its statistics hold them (see [`TableFile::range`]).
    pub fn files_ranged(&self, snap: &SnapshotRef, column: Option<&str>) -> Res<Vec<TableFile>> {
        let mut out = Vec::new();
        for sm in self.scan_with(snap, column)? {
            let (mut files, selected) = visit(&sm)?;
            if let Some(col) = column {
                let batch = sm.scan_files.data().any_ref().downcast_ref::<ArrowEngineData>().map(|d| d.record_batch());
                if let Some((mins, maxs)) = batch.and_then(|b| stats_bounds(b, col)) {
                    for (f, &row) in files.iter_mut().zip(&selected) {
                        f.range = bound_pair(&mins, &maxs, row);
                    }
                }
            }
            out.extend(files);
        }
        Ok(out)
    }

    fn scan(&self, snap: &SnapshotRef) -> Res<Vec<delta_kernel::scan::ScanMetadata>> {
        self.scan_with(snap, None)
    }

    /// A scan of the latest version's files; with `column`, their statistics of it typed
    /// (`stats_parsed`).
    fn scan_with(&self, snap: &SnapshotRef, column: Option<&str>) -> Res<Vec<delta_kernel::scan::ScanMetadata>> {
        let mut builder = snap.clone().scan_builder();
        if let Some(col) = column {
            builder = builder.with_stats(delta_kernel::scan::StatsOptions::struct_columns(vec![
                delta_kernel::expressions::ColumnName::new([col]),
            ]));
        }
        let scan = builder.build().map_err(kernel("cannot scan the table"))?;
        scan.scan_metadata(&self.engine)
            .map_err(kernel("cannot list the table's files"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(kernel("cannot list the table's files"))
    }
}

/// A data file of a table version.
#[derive(Debug, Clone)]
pub struct TableFile {
    pub path: String,
    pub size: i64,
    pub rows: Option<i64>,
    pub partition_values: HashMap<String, String>,
    /// Rows of it are deleted by a deletion vector (written by another writer).
    pub deletion_vector: bool,
    /// The smallest and largest value of a column in it (one-element arrays), from its
    /// statistics; none when they are missing or may be truncated (long strings).
    pub range: Option<(ArrayRef, ArrayRef)>,
}

/// The `minValues` and `maxValues` of `column` in a scan's typed statistics, when present.
fn stats_bounds(batch: &RecordBatch, column: &str) -> Option<(ArrayRef, ArrayRef)> {
    let parsed = batch.column_by_name("stats_parsed")?.as_any().downcast_ref::<StructArray>()?;
    let leaf = |side: &str| -> Option<ArrayRef> {
        let values = parsed.column_by_name(side)?.as_any().downcast_ref::<StructArray>()?;
        let leaf = values.column_by_name(column)?;
        // a row whose statistics (or their side) are null has no bound, whatever the leaf holds
        let nulls = arrow_buffer::NullBuffer::union(parsed.nulls(), values.nulls());
        let nulls = arrow_buffer::NullBuffer::union(nulls.as_ref(), leaf.nulls());
        Some(arrow_array::make_array(leaf.to_data().into_builder().nulls(nulls).build().ok()?))
    };
    Some((leaf("minValues")?, leaf("maxValues")?))
}

/// Writers cut string statistics at this many characters: a shorter maximum is exact.
const STRING_STATS_CHARS: usize = 32;

/// A file's bounds at `row` of the statistics: both known and exact.
fn bound_pair(mins: &ArrayRef, maxs: &ArrayRef, row: usize) -> Option<(ArrayRef, ArrayRef)> {
    if row >= mins.len() || row >= maxs.len() || mins.is_null(row) || maxs.is_null(row) {
        return None;
    }
    let max = maxs.slice(row, 1);
    // only types whose statistics are exact: timestamps are kept to milliseconds by some
    // writers, floating point has NaN, long strings are cut
    let exact = match max.data_type() {
        DataType::Utf8 => {
            max.as_any().downcast_ref::<StringArray>().is_some_and(|s| s.value(0).chars().count() < STRING_STATS_CHARS)
        }
        t => {
            t.is_integer()
                || matches!(t, DataType::Date32 | DataType::Date64 | DataType::Decimal128(..) | DataType::Boolean)
        }
    };
    exact.then(|| (mins.slice(row, 1), max))
}

/// The files a scan's metadata selects, in the order of its selected rows.
fn visit(sm: &delta_kernel::scan::ScanMetadata) -> Res<(Vec<TableFile>, Vec<usize>)> {
    fn each(files: &mut Vec<TableFile>, f: delta_kernel::scan::state::ScanFile) {
        files.push(TableFile {
            path: f.path,
            size: f.size,
            rows: f.stats.map(|s| s.num_records as i64),
            deletion_vector: f.dv_info.has_vector(),
            partition_values: f.partition_values,
            range: None,
        });
    }
    let files = sm.visit_scan_files(Vec::new(), each).map_err(kernel("cannot list the table's files"))?;
    let selected: Vec<usize> =
        sm.scan_files.selection_vector().iter().enumerate().filter(|(_, s)| **s).map(|(i, _)| i).collect();
    // a selection vector shorter than the data selects the rows past its end
    let rows = sm.scan_files.data().len();
    let mut selected = selected;
    selected.extend(sm.scan_files.selection_vector().len()..rows);
    if selected.len() != files.len() {
        return Err(format!(
            "internal error (a bug in weir, please report it): {} files visited for {} selected",
            files.len(),
            selected.len()
        ));
    }
    Ok((files, selected))
}

/// Whether a column of `dt` can be stored in a Delta table as weir writes it; the reason if
/// not. Partition columns are held to the types whose text form Delta and weir agree on.
pub fn check_schema(schema: &Schema, partition_by: Option<&str>) -> Res<()> {
    for f in schema.fields() {
        let dt = plain(f.data_type());
        let bad = match &dt {
            DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => Some(
                "Delta has no unsigned integers: cast it to a signed type (the cast plugin, or `cast` on the source)",
            ),
            DataType::Timestamp(u, _) if *u != arrow_schema::TimeUnit::Microsecond => {
                Some("Delta timestamps are in microseconds: cast it to timestamp[us] or timestamp[us, UTC]")
            }
            DataType::Float16
            | DataType::Time32(_)
            | DataType::Time64(_)
            | DataType::Duration(_)
            | DataType::Interval(_) => Some("Delta cannot hold this type"),
            _ => None,
        };
        if let Some(why) = bad {
            return Err(format!("column `{}` has type {}: {why}", f.name(), f.data_type()));
        }
        if StructType::try_from_arrow(&Schema::new(vec![Field::new(f.name(), dt.clone(), true)])).is_err() {
            return Err(format!("column `{}` has type {}, which Delta cannot hold", f.name(), f.data_type()));
        }
    }
    if let Some(p) = partition_by {
        if let Ok(f) = schema.field_with_name(p) {
            let ok = matches!(
                plain(f.data_type()),
                DataType::Utf8
                    | DataType::LargeUtf8
                    | DataType::Utf8View
                    | DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::Date32
                    | DataType::Boolean
            );
            if !ok {
                return Err(format!(
                    "partition_by column `{p}` has type {}; a Delta table is partitioned by a string, integer, date or boolean column",
                    f.data_type()
                ));
            }
        }
    }
    Ok(())
}

/// A dictionary column as its values; view types as their plain forms.
fn plain(dt: &DataType) -> DataType {
    match dt {
        DataType::Dictionary(_, v) => plain(v),
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        other => other.clone(),
    }
}

/// The Delta schema of a step's output.
pub fn delta_schema(schema: &Schema) -> Res<StructType> {
    let fields: Vec<Field> =
        schema.fields().iter().map(|f| Field::new(f.name(), plain(f.data_type()), f.is_nullable())).collect();
    StructType::try_from_arrow(&Schema::new(fields)).map_err(|e| format!("the output's schema has no Delta form: {e}"))
}

/// A staged file and where it goes in the table.
pub(crate) struct Placed {
    pub(crate) staged: PathBuf,
    /// Relative to the staging (a merge may skip it, see [`MergeFold::skip`]).
    pub(crate) rel_staged: PathBuf,
    /// Relative to the table root, not encoded.
    pub(crate) rel: String,
    pub(crate) partition: Option<Option<String>>,
}

/// Every staged Parquet file (sorted) and its place in the table: the partition directory is
/// kept, the name carries the run and the app id's hash so that two runs never collide and
/// placing again after a crash finds the same names.
fn place(staged: &Path, spec: &CommitSpec) -> Res<Vec<Placed>> {
    let tag = super::remote::writer_tag(&spec.app_id);
    let mut out = Vec::new();
    let rewritten = staged.join(REWRITTEN);
    let mut files: Vec<(PathBuf, PathBuf)> =
        super::sink::parquet_files(staged)?.into_iter().map(|rel| (staged.to_path_buf(), rel)).collect();
    if rewritten.is_dir() {
        files.extend(super::sink::parquet_files(&rewritten)?.into_iter().map(|rel| (rewritten.clone(), rel)));
    }
    for (base, rel) in files {
        let rel_s = rel.to_string_lossy().replace('\\', "/");
        let (dir, name) = match rel_s.rsplit_once('/') {
            Some((d, n)) => (Some(d.to_string()), n.to_string()),
            None => (None, rel_s.clone()),
        };
        let partition = match (&spec.partition_by, &dir) {
            (Some(col), Some(d)) => {
                let v = d
                    .strip_prefix(&format!("{col}="))
                    .ok_or_else(|| format!("staged file {rel_s} is not in a `{col}=` partition directory"))?;
                Some(if v == NULL_PARTITION { None } else { Some(unescape_partition(v)) })
            }
            (Some(col), None) => return Err(format!("staged file {rel_s} is not in a `{col}=` partition directory")),
            (None, _) => None,
        };
        let stem = name.strip_suffix(".parquet").unwrap_or(&name);
        let file = format!("{stem}-r{}-{tag}.parquet", spec.version);
        let rel = match &dir {
            Some(d) => format!("{d}/{file}"),
            None => file,
        };
        let rel_staged = if base == staged { PathBuf::from(&rel_s) } else { PathBuf::new() };
        out.push(Placed { staged: base.join(&rel_s), rel_staged, rel, partition });
    }
    Ok(out)
}

/// What `add.path` keeps as it is: letters, digits, `-_.~`, `=` (partition folders) and
/// the `/` between segments; everything else is percent-encoded (RFC 2396).
const PATH_KEEPS: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'=').remove(b'/');

/// Percent-encode a relative path for `add.path`.
fn encode_path(rel: &str) -> String {
    percent_encoding::utf8_percent_encode(rel, PATH_KEEPS).to_string()
}

/// Link the staged files into the table (idempotent: a file already there stays).
fn link_into(table: &Path, files: &[(PathBuf, String)]) -> Res<()> {
    for (staged, rel) in files {
        let to = table.join(rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        match std::fs::hard_link(staged, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && same_file(staged, &to) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // an earlier attempt's file (a merge rewrites anew): no version references it
                std::fs::remove_file(&to).map_err(|e| format!("cannot replace {}: {e}", to.display()))?;
                std::fs::hard_link(staged, &to)
                    .map_err(|e| format!("cannot link {} to {}: {e}", staged.display(), to.display()))?;
            }
            Err(e) => {
                return Err(format!("cannot link {} to {}: {e}", staged.display(), to.display()));
            }
        }
    }
    // the links' folders (partitions, the remembered deletes') and the table's, so that a
    // commit made after this never names a file a power loss took back
    let mut dirs: BTreeSet<PathBuf> =
        files.iter().filter_map(|(_, rel)| table.join(rel).parent().map(Path::to_path_buf)).collect();
    dirs.insert(table.to_path_buf());
    dirs.iter().for_each(|d| super::sync_dir(d));
    Ok(())
}

/// Download the file `path` (as the log has it) of a remote table to `to`, streamed.
pub fn download(r: &Remote, path: &str, to: &Path) -> Res<()> {
    super::remote::download(r, &decode_path(path), to)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The add-file rows of the placed files: path, partition values, size, time and the
/// statistics read off each file's footer (row count, null counts, minimum and maximum of
/// each flat column).
fn add_files(placed: &[Placed], partition_by: Option<&String>, schema: &Schema) -> Res<RecordBatch> {
    let mut paths = Vec::new();
    let mut sizes = Vec::new();
    let mut times = Vec::new();
    let mut pv = arrow_array::builder::MapBuilder::new(
        Some(arrow_array::builder::MapFieldNames {
            entry: "key_value".into(),
            key: "key".into(),
            value: "value".into(),
        }),
        arrow_array::builder::StringBuilder::new(),
        arrow_array::builder::StringBuilder::new(),
    );
    let data_fields: Vec<&Field> =
        schema.fields().iter().map(|f| f.as_ref()).filter(|f| Some(f.name()) != partition_by).collect();
    let stat_fields: Vec<&Field> = data_fields
        .iter()
        .copied()
        .filter(|f| {
            let dt = plain(f.data_type());
            !dt.is_nested() && !matches!(dt, DataType::Binary | DataType::LargeBinary | DataType::Null)
        })
        .take(32)
        .collect();
    let mut rows = Vec::new();
    let mut nulls: Vec<Vec<Option<i64>>> = vec![Vec::new(); stat_fields.len()];
    let mut mins: Vec<Vec<ArrayRef>> = vec![Vec::new(); stat_fields.len()];
    let mut maxs: Vec<Vec<ArrayRef>> = vec![Vec::new(); stat_fields.len()];
    for p in placed {
        // the staged file: the same bytes as the table's (a link, or what was uploaded)
        let path = &p.staged;
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let meta = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
        let reader = SerializedFileReader::new(file).map_err(|e| format!("{}: {e}", path.display()))?;
        let md = reader.metadata();
        paths.push(encode_path(&p.rel));
        sizes.push(meta.len() as i64);
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        times.push(mtime);
        if let (Some(col), Some(v)) = (partition_by, &p.partition) {
            pv.keys().append_value(col);
            match v {
                Some(v) => pv.values().append_value(v),
                None => pv.values().append_null(),
            }
        }
        pv.append(true).map_err(|e| e.to_string())?;
        let file_rows = md.file_metadata().num_rows();
        rows.push(file_rows);
        let arrow_schema = parquet::arrow::parquet_to_arrow_schema(md.file_metadata().schema_descr(), None)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        for (i, f) in stat_fields.iter().enumerate() {
            let conv = StatisticsConverter::try_new(f.name(), &arrow_schema, md.file_metadata().schema_descr()).ok();
            let groups = md.row_groups();
            let (n, lo, hi) = match conv {
                Some(c) => {
                    let n = c
                        .row_group_null_counts(groups.iter())
                        .ok()
                        .and_then(|a| (a.null_count() == 0).then(|| a.values().iter().map(|v| *v as i64).sum::<i64>()));
                    let lo = c.row_group_mins(groups.iter()).ok();
                    let hi = c.row_group_maxes(groups.iter()).ok();
                    (n, lo, hi)
                }
                None => (None, None, None),
            };
            nulls[i].push(n);
            let dt = plain(f.data_type());
            mins[i].push(extreme(lo, &dt, false)?);
            maxs[i].push(extreme(hi, &dt, true)?);
        }
    }
    let n = placed.len();
    let mut null_fields = Vec::new();
    let mut null_cols: Vec<ArrayRef> = Vec::new();
    let mut min_fields = Vec::new();
    let (mut min_cols, mut max_cols): (Vec<ArrayRef>, Vec<ArrayRef>) = (Vec::new(), Vec::new());
    for (i, f) in stat_fields.iter().enumerate() {
        null_fields.push(Field::new(f.name(), DataType::Int64, true));
        null_cols.push(Arc::new(Int64Array::from(nulls[i].clone())));
        let dt = plain(f.data_type());
        min_fields.push(Field::new(f.name(), dt.clone(), true));
        let concat = |parts: &[ArrayRef]| -> Res<ArrayRef> {
            if parts.is_empty() {
                return Ok(arrow_array::new_null_array(&dt, 0));
            }
            let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
            arrow_select::concat::concat(&refs).map_err(|e| e.to_string())
        };
        min_cols.push(concat(&mins[i])?);
        max_cols.push(concat(&maxs[i])?);
    }
    let strukt = |fields: Vec<Field>, cols: Vec<ArrayRef>| -> Res<ArrayRef> {
        if fields.is_empty() {
            return Ok(Arc::new(StructArray::new_empty_fields(n, None)));
        }
        Ok(Arc::new(StructArray::try_new(Fields::from(fields), cols, None).map_err(|e| e.to_string())?))
    };
    let null_count = strukt(null_fields, null_cols)?;
    let min_values = strukt(min_fields.clone(), min_cols)?;
    let max_values = strukt(min_fields, max_cols)?;
    let stats_fields = Fields::from(vec![
        Field::new("numRecords", DataType::Int64, true),
        Field::new("nullCount", null_count.data_type().clone(), true),
        Field::new("minValues", min_values.data_type().clone(), true),
        Field::new("maxValues", max_values.data_type().clone(), true),
        Field::new("tightBounds", DataType::Boolean, true),
    ]);
    let stats = StructArray::try_new(
        stats_fields,
        vec![
            Arc::new(Int64Array::from(rows)),
            null_count,
            min_values,
            max_values,
            Arc::new(BooleanArray::from(vec![true; n])),
        ],
        None,
    )
    .map_err(|e| e.to_string())?;
    let partitions = pv.finish();
    let batch_schema = Schema::new(vec![
        Field::new("path", DataType::Utf8, false),
        Field::new("partitionValues", partitions.data_type().clone(), false),
        Field::new("size", DataType::Int64, false),
        Field::new("modificationTime", DataType::Int64, false),
        Field::new("stats", stats.data_type().clone(), true),
    ]);
    RecordBatch::try_new(
        Arc::new(batch_schema),
        vec![
            Arc::new(StringArray::from(paths)),
            Arc::new(partitions),
            Arc::new(Int64Array::from(sizes)),
            Arc::new(Int64Array::from(times)),
            Arc::new(stats),
        ],
    )
    .map_err(|e| format!("internal error (a bug in weir, please report it): the add-file rows: {e}"))
}

/// The smallest (or largest) non-null value of a file's per-row-group minimums (maximums),
/// as a one-row array of `dt`; null when any row group has no statistic.
fn extreme(values: Option<ArrayRef>, dt: &DataType, largest: bool) -> Res<ArrayRef> {
    let none = || arrow_array::new_null_array(dt, 1);
    let Some(values) = values else { return Ok(none()) };
    if values.is_empty() || values.null_count() > 0 {
        return Ok(none());
    }
    let values = if values.data_type() != dt {
        match arrow_cast::cast(&values, dt) {
            Ok(v) => v,
            Err(_) => return Ok(none()),
        }
    } else {
        values
    };
    let conv = arrow_row::RowConverter::new(vec![arrow_row::SortField::new(dt.clone())]).map_err(|e| e.to_string())?;
    let rows = conv.convert_columns(std::slice::from_ref(&values)).map_err(|e| e.to_string())?;
    let mut best = 0;
    for i in 1..rows.num_rows() {
        let better = if largest { rows.row(i) > rows.row(best) } else { rows.row(i) < rows.row(best) };
        if better {
            best = i;
        }
    }
    Ok(values.slice(best, 1))
}

/// Commit a run's staged files to the table: create it if there is none, skip if the table
/// already holds this run's commit (its transaction version for the app id), else commit
/// the adds with the removes the mode calls for, retrying on a concurrent writer's commit.
/// A merge rewrites the files holding the run's keys on the version it commits over, again
/// on each attempt.
pub fn commit(staged: &Path, table_path: &Path, spec: &CommitSpec, hooks: &Hooks<'_>) -> Res<Committed> {
    let table = Table::open(table_path, spec.remote.as_ref())?;
    let schema: Schema =
        serde_json::from_str(&spec.schema).map_err(|e| format!("internal error: the decided schema: {e}"))?;
    for attempt in 1..=COMMIT_ATTEMPTS {
        let snap = table.snapshot()?;
        if let Some(snap) = &snap {
            if let Some(v) = table.app_version(snap, &spec.app_id)? {
                if v >= spec.version {
                    return Ok(Committed {
                        version: snap.version(),
                        added: 0,
                        removed: 0,
                        now: false,
                        replaced: 0,
                        outdated: 0,
                        pruned: (0, 0),
                    });
                }
            }
        }
        // (after the check: a commit made and settled has no staging left)
        let tombstones = spec.sequence_by.as_ref().map(|_| tombstone_app(&spec.pipeline, &spec.step));
        let fold = match spec.mode {
            Mode::Merge => {
                let rewrite =
                    hooks.merge.ok_or("internal error (a bug in weir, please report it): a merge without its hook")?;
                // each file's range of the key's first column lets the merge pass over files
                // that cannot hold the run's keys
                let first = spec.key.first().map(String::as_str);
                let (files, current) = match (&snap, &tombstones) {
                    (Some(snap), Some((app, _))) => (table.files_ranged(snap, first)?, table.app_version(snap, app)?),
                    (Some(snap), None) => (table.files_ranged(snap, first)?, None),
                    (None, _) => (Vec::new(), None),
                };
                let current_path = match (&tombstones, current) {
                    (Some((_, tag)), Some(run)) => Some(tombstone_path(tag, run)),
                    _ => None,
                };
                Some((rewrite(&files, current_path.as_deref())?, current))
            }
            _ => None,
        };
        let (fold, current_tombstones) = match fold {
            Some((f, c)) => (Some(f), c),
            None => (None, None),
        };
        let skip = fold.as_ref().map(|f| &f.skip);
        let placed: Vec<Placed> =
            place(staged, spec)?.into_iter().filter(|p| skip.is_none_or(|s| !s.contains(&p.rel_staged))).collect();
        let written: HashSet<Option<String>> = placed.iter().filter_map(|p| p.partition.clone()).collect();
        let mut files: Vec<(PathBuf, String)> = placed.iter().map(|p| (p.staged.clone(), p.rel.clone())).collect();
        // the remembered deletes go in with the data; the commit's txn names them current.
        // Unchanged, the txn is recorded again for the current file: a table with
        // `delta.setTransactionRetentionDuration` forgets txns not renewed
        let tombstones_txn = match (fold.as_ref().and_then(|f| f.tombstones.clone()), &tombstones, current_tombstones) {
            (Some(file), Some((app, tag)), _) => {
                files.push((file, tombstone_path(tag, spec.version)));
                Some((app.clone(), spec.version))
            }
            (None, Some((app, _)), Some(run)) => Some((app.clone(), run)),
            _ => None,
        };
        match (&table.local, &table.remote) {
            (Some(dir), _) => link_into(dir, &files)?,
            (None, Some(r)) => super::remote::upload(r, &files)?,
            (None, None) => return Err("internal error (a bug in weir, please report it): a table nowhere".into()),
        }
        (hooks.pause)("delta-linked");
        let adds = add_files(&placed, spec.partition_by.as_ref(), &schema)?;
        let added = adds.num_rows();
        let params = operation_parameters(spec);
        let result = match &snap {
            None => {
                let mut layout = DataLayout::None;
                if let Some(p) = &spec.partition_by {
                    layout = DataLayout::partitioned([p.as_str()]);
                }
                let builder = create_table(table.url.as_str(), Arc::new(delta_schema(&schema)?), engine_info(), true)
                    .with_data_layout(layout)
                    .with_transaction_id(spec.app_id.clone(), spec.version)
                    .with_operation_parameters(params);
                let builder = match &tombstones_txn {
                    Some((app, run)) => builder.with_transaction_id(app.clone(), *run),
                    None => builder,
                };
                // another writer may create the table first: then this commit is retried
                // as an update of its version
                let created = builder.build(&table.engine, Box::new(FileSystemCommitter::new())).and_then(|mut txn| {
                    txn.add_files(Box::new(ArrowEngineData::new(adds)));
                    txn.commit(&table.engine)
                });
                match created {
                    Ok(CommitResult::Committed(c)) => Ok((c.commit_version(), 0)),
                    Ok(_) => Err(()),
                    Err(_) if table.exists().unwrap_or(false) => Err(()),
                    Err(e) => return Err(kernel("cannot create the Delta table")(e)),
                }
            }
            Some(snap) => {
                let evolved = new_columns(snap, &schema)?;
                let op = match spec.mode {
                    Mode::Merge => UpdateTableOperation::Merge,
                    Mode::Append | Mode::Overwrite | Mode::OverwritePartitions => UpdateTableOperation::Write,
                };
                let mut builder = snap
                    .clone()
                    .update_table(op, engine_info(), true)
                    .with_transaction_id(spec.app_id.clone(), spec.version)
                    .with_operation_parameters(params);
                for f in evolved {
                    builder = builder.add_column(f);
                }
                if let Some((app, run)) = &tombstones_txn {
                    builder = builder.with_transaction_id(app.clone(), *run);
                }
                let mut txn = builder
                    .build(&table.engine, Box::new(FileSystemCommitter::new()))
                    .map_err(kernel("cannot start a commit to the Delta table"))?;
                let mut removed = 0;
                if spec.mode != Mode::Append {
                    for sm in table.scan(snap)? {
                        let (files, selected) = visit(&sm)?;
                        let (data, sel) = sm.scan_files.into_parts();
                        let mut keep = vec![false; data.len()];
                        for (f, row) in files.iter().zip(selected) {
                            let replace = match (spec.mode, &spec.partition_by, &fold) {
                                (Mode::Merge, _, Some(m)) => m.removes.contains(&f.path),
                                (Mode::OverwritePartitions, Some(col), _) => {
                                    written.contains(&f.partition_values.get(col).cloned())
                                }
                                _ => true,
                            };
                            if replace && sel.get(row).copied().unwrap_or(true) {
                                keep[row] = true;
                                removed += 1;
                            }
                        }
                        let filtered =
                            FilteredEngineData::try_new(data, keep).map_err(kernel("cannot remove files"))?;
                        txn.remove_files(filtered);
                    }
                }
                txn.add_files(Box::new(ArrowEngineData::new(adds)));
                match txn.commit(&table.engine).map_err(kernel("cannot commit to the Delta table"))? {
                    CommitResult::Committed(c) => Ok((c.commit_version(), removed)),
                    CommitResult::Conflicted(_) | CommitResult::Retryable(_) => Err(()),
                }
            }
        };
        match result {
            Ok((version, removed)) => {
                let (replaced, outdated, pruned) =
                    fold.as_ref().map_or((0, 0, (0, 0)), |f| (f.replaced, f.outdated, (f.pruned, f.files)));
                return Ok(Committed { version, added, removed, now: true, replaced, outdated, pruned });
            }
            Err(()) if attempt < COMMIT_ATTEMPTS => continue,
            Err(()) => {}
        }
    }
    Err(format!(
        "another writer committed to {} {COMMIT_ATTEMPTS} times while this run tried to; nothing of this run was committed, rerun it",
        table.name
    ))
}

fn engine_info() -> String {
    format!("weir {}", env!("CARGO_PKG_VERSION"))
}

fn operation_parameters(spec: &CommitSpec) -> Vec<(String, Option<String>)> {
    vec![
        (
            "mode".into(),
            Some(serde_json::to_value(spec.mode).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()),
        ),
        ("weir.pipeline".into(), Some(spec.pipeline.clone())),
        ("weir.step".into(), Some(spec.step.clone())),
        ("weir.run".into(), Some(spec.version.to_string())),
        ("weir.partition".into(), spec.run_partition.clone()),
    ]
}

/// The output's columns the table lacks (added, nullable, in the run's commit); a column
/// the table has with another type fails, naming it.
fn new_columns(snap: &Snapshot, schema: &Schema) -> Res<Vec<StructField>> {
    let table_schema = snap.schema();
    let ours = delta_schema(schema)?;
    let mut added = Vec::new();
    for f in ours.fields() {
        match table_schema.field(f.name()) {
            Some(t) if t.data_type() == f.data_type() => {}
            Some(t) => {
                return Err(format!(
                    "column `{}` is {} in the Delta table and {} in the step's output; map it with `cast` on the source, or write a new table",
                    f.name(),
                    t.data_type(),
                    f.data_type()
                ))
            }
            None => added.push(StructField::nullable(f.name().clone(), f.data_type().clone())),
        }
    }
    Ok(added)
}

/// One version of a table's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub timestamp_ms: Option<i64>,
    pub operation: Option<String>,
    /// The weir run that made it, if weir did.
    pub run: Option<i64>,
    pub pipeline: Option<String>,
    pub step: Option<String>,
    pub added: usize,
    pub removed: usize,
}

/// The versions of a table, newest first, read from its log's commit files (those the log
/// still holds).
pub fn history(table: &Table) -> Res<Vec<HistoryEntry>> {
    let mut out = Vec::new();
    for (v, text) in table.commit_files()? {
        let mut h = HistoryEntry {
            version: v,
            timestamp_ms: None,
            operation: None,
            run: None,
            pipeline: None,
            step: None,
            added: 0,
            removed: 0,
        };
        for line in text.lines() {
            let Ok(action) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if let Some(ci) = action.get("commitInfo") {
                h.timestamp_ms = ci.get("timestamp").and_then(|t| t.as_i64());
                h.operation = ci.get("operation").and_then(|t| t.as_str()).map(String::from);
                let p = ci.get("operationParameters");
                let param = |k: &str| p.and_then(|p| p.get(k)).and_then(|v| v.as_str()).map(String::from);
                h.run = param("weir.run").and_then(|r| r.parse().ok());
                h.pipeline = param("weir.pipeline");
                h.step = param("weir.step");
            }
            h.added += usize::from(action.get("add").is_some());
            h.removed += usize::from(action.get("remove").is_some());
        }
        out.push(h);
    }
    if out.is_empty() {
        return Err(format!("{} is not a Delta table (no commits in _delta_log)", table.name));
    }
    out.sort_by_key(|h| std::cmp::Reverse(h.version));
    Ok(out)
}

/// When an object was last written.
pub(crate) fn object_time(m: &delta_kernel::object_store::ObjectMeta) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(m.last_modified.timestamp_millis().max(0) as u64)
}

/// A data file as the table's storage lists it.
struct Listed {
    /// Relative to the table root, not encoded.
    rel: String,
    size: u64,
    modified: std::time::SystemTime,
}

impl Table {
    /// The table at a local folder, or at an `s3://` URL reached through the AWS environment.
    pub fn at(location: &str) -> Res<Table> {
        if location.starts_with("s3://") {
            let url = format!("{}/", location.trim_end_matches('/'));
            let r = Remote {
                url,
                endpoint: None,
                region: None,
                path_style: None,
                allow_http: None,
                access_key_id: None,
                secret_access_key: None,
            };
            return Table::open(Path::new(location), Some(&r));
        }
        Table::local(Path::new(location))
    }

    /// The log's JSON commit files: (version, text).
    fn commit_files(&self) -> Res<Vec<(u64, String)>> {
        let mut out = Vec::new();
        match (&self.local, &self.remote) {
            (Some(root), _) => {
                let log = root.join("_delta_log");
                let entries =
                    std::fs::read_dir(&log).map_err(|e| format!("{} is not a Delta table: {e}", self.name))?;
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let Some(v) = name.strip_suffix(".json").and_then(|s| s.parse::<u64>().ok()) else { continue };
                    out.push((v, std::fs::read_to_string(e.path()).map_err(|e| format!("{name}: {e}"))?));
                }
            }
            (None, Some(r)) => {
                let mut commits = Vec::new();
                for m in super::remote::list(r, "_delta_log/")? {
                    let Some(file) = m.location.filename().map(String::from) else { continue };
                    if let Some(v) = file.strip_suffix(".json").and_then(|s| s.parse::<u64>().ok()) {
                        commits.push((v, m.location));
                    }
                }
                // one runtime for every read: the client's connections belong to it
                let store = s3_store(r)?;
                let name = self.name.clone();
                out = block_on(Box::pin(async move {
                    use delta_kernel::object_store::ObjectStoreExt;
                    let mut out = Vec::new();
                    for (v, at) in commits {
                        let read =
                            |e: delta_kernel::object_store::Error| format!("cannot read {name}_delta_log/{v}: {e}");
                        let bytes = store.get(&at).await.map_err(read)?.bytes().await.map_err(read)?;
                        out.push((v, String::from_utf8_lossy(&bytes).into_owned()));
                    }
                    Ok::<_, String>(out)
                }))??;
            }
            (None, None) => {}
        }
        Ok(out)
    }

    /// Every Parquet data file under the table (not `_` or `.` names), and the files of
    /// remembered deletes (see [`TOMBSTONES`]).
    fn data_files(&self) -> Res<Vec<Listed>> {
        match (&self.local, &self.remote) {
            (Some(root), _) => {
                let mut out = Vec::new();
                let mut rels = super::sink::parquet_files(root)?;
                if let Ok(entries) = std::fs::read_dir(root.join(TOMBSTONES)) {
                    rels.extend(entries.flatten().map(|e| Path::new(TOMBSTONES).join(e.file_name())));
                }
                for rel in rels {
                    let Ok(meta) = std::fs::metadata(root.join(&rel)) else { continue };
                    out.push(Listed {
                        rel: rel.to_string_lossy().replace('\\', "/"),
                        size: meta.len(),
                        modified: meta.modified().unwrap_or(std::time::SystemTime::now()),
                    });
                }
                Ok(out)
            }
            (None, Some(r)) => {
                let base = object_path(&self.url, "")?.as_ref().to_string();
                let mut out = Vec::new();
                for m in super::remote::list(r, "")? {
                    let key = m.location.as_ref();
                    let rel = key.strip_prefix(&base).unwrap_or(key).trim_start_matches('/').to_string();
                    let hidden = rel.split('/').any(|seg| seg.starts_with('_') || seg.starts_with('.'));
                    let tombstones = rel.starts_with(&format!("{TOMBSTONES}/")) && rel.ends_with(".arrow");
                    if !tombstones && (hidden || !rel.ends_with(".parquet")) {
                        continue;
                    }
                    out.push(Listed { rel, size: m.size, modified: object_time(&m) });
                }
                Ok(out)
            }
            (None, None) => Ok(Vec::new()),
        }
    }

    fn delete(&self, rel: &str) -> Res<()> {
        match (&self.local, &self.remote) {
            (Some(root), _) => {
                let p = root.join(rel);
                std::fs::remove_file(&p).map_err(|e| format!("cannot remove {}: {e}", p.display()))
            }
            (None, Some(r)) => {
                let store = s3_store(r)?;
                let at = object_path(&self.url, rel)?;
                let name = format!("{}{rel}", self.name);
                block_on(Box::pin(async move {
                    use delta_kernel::object_store::ObjectStoreExt;
                    store.delete(&at).await.map_err(|e| format!("cannot remove {name}: {e}"))
                }))?
            }
            (None, None) => Ok(()),
        }
    }
}

/// What `vacuum` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Vacuumed {
    /// Data files the latest version does not reference, removed (or, dry, to be).
    pub removed: Vec<String>,
    pub bytes: u64,
    /// Unreferenced files kept because they are younger than the retention.
    pub kept_young: usize,
}

/// Remove the data files of a local table that its latest version does not reference: the
/// files of replaced versions once their removal is older than `retention`, and files linked
/// by a run that crashed before its commit once they are. Time travel to a version whose
/// files are removed stops working: the retention is how far back readers may travel.
pub fn vacuum(table: &Table, retention: std::time::Duration, dry_run: bool) -> Res<Vacuumed> {
    let Some(snap) = table.snapshot()? else {
        return Err(format!("{} is not a Delta table (no _delta_log)", table.name));
    };
    // the latest version's files stay; a file a commit removed ages from its removal
    let mut referenced: HashSet<String> = table.files(&snap)?.into_iter().map(|f| decode_path(&f.path)).collect();
    let mut files = table.data_files()?;
    // so do the remembered deletes each step's latest merge named; older ones age from
    // their writing
    let tags: HashSet<&str> = files
        .iter()
        .filter_map(|f| f.rel.strip_prefix(&format!("{TOMBSTONES}/")).and_then(|n| n.split_once("-r")).map(|(t, _)| t))
        .collect();
    for tag in tags {
        if let Some(run) = table.app_version(&snap, &format!("weir-tombstones/{tag}"))? {
            referenced.insert(tombstone_path(tag, run));
        }
    }
    let mut removed_at: HashMap<String, i64> = HashMap::new();
    for (_, text) in table.commit_files()? {
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let Some(r) = v.get("remove") else { continue };
            if let (Some(p), Some(t)) =
                (r.get("path").and_then(|p| p.as_str()), r.get("deletionTimestamp").and_then(|t| t.as_i64()))
            {
                let at = removed_at.entry(decode_path(p)).or_insert(t);
                *at = (*at).max(t);
            }
        }
    }
    let now = std::time::SystemTime::now();
    let mut out = Vacuumed::default();
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    for f in files {
        if referenced.contains(&f.rel) {
            continue;
        }
        // never referenced (a run that died before its commit): its own age
        let since = match removed_at.get(&f.rel) {
            Some(ms) => std::time::UNIX_EPOCH + std::time::Duration::from_millis((*ms).max(0) as u64),
            None => f.modified,
        };
        if now.duration_since(since).unwrap_or_default() < retention {
            out.kept_young += 1;
            continue;
        }
        if !dry_run {
            table.delete(&f.rel)?;
        }
        out.bytes += f.size;
        out.removed.push(f.rel);
    }
    Ok(out)
}

/// What `optimize` did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Optimized {
    /// The table version of the compaction (none: nothing to compact).
    pub version: Option<u64>,
    /// Per compacted partition (`col=value`, or empty for an unpartitioned table): files
    /// read, files written.
    pub partitions: Vec<(String, usize, usize)>,
    pub rows: u64,
}

/// Compact the small files (under `target_mb`) of each partition of a local table (or of
/// one, `partition` as `col=value` or the value) into one file per partition, committed as
/// one `OPTIMIZE` version that changes no data (`dataChange = false`): readers and time
/// travel see the same rows. Files of columns added later are read with those columns null.
pub fn optimize(table: &Table, partition: Option<&str>, target_mb: u64, codec: crate::config::Codec) -> Res<Optimized> {
    // a table on object storage: its files are read from copies and the compacted ones
    // written beside them, in a folder of this process's, then uploaded before the commit
    let work = match &table.local {
        Some(_) => None,
        None => Some(Scratch(std::env::temp_dir().join(format!("weir-optimize-{}", std::process::id())))),
    };
    optimize_in(table, work.as_ref().map(|w| w.0.as_path()), partition, target_mb, codec)
}

/// A folder removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn optimize_in(
    table: &Table,
    work: Option<&Path>,
    partition: Option<&str>,
    target_mb: u64,
    codec: crate::config::Codec,
) -> Res<Optimized> {
    use delta_kernel::engine::arrow_conversion::TryIntoArrow;
    // where the table's files are read from and the compacted ones written
    let root = match (&table.local, work) {
        (Some(dir), _) => dir.clone(),
        (None, Some(w)) => w.join("out"),
        (None, None) => return Err("internal error (a bug in weir, please report it): a table nowhere".into()),
    };
    let Some(snap) = table.snapshot()? else {
        return Err(format!("{} is not a Delta table (no _delta_log)", table.name));
    };
    let full: Schema = snap.schema().as_ref().try_into_arrow().map_err(|e| format!("the table's schema: {e}"))?;
    let partition_by = snap.table_configuration().logical_partition_columns().first().cloned();
    let limit = (target_mb.max(1) << 20) as i64;
    let mut groups: BTreeMap<Option<String>, Vec<TableFile>> = BTreeMap::new();
    for f in table.files(&snap)? {
        if f.size >= limit || f.deletion_vector {
            continue;
        }
        let value = partition_by.as_ref().and_then(|c| f.partition_values.get(c).cloned());
        groups.entry(value).or_default().push(f);
    }
    if let (Some(p), Some(col)) = (partition, &partition_by) {
        let want = p.strip_prefix(&format!("{col}=")).unwrap_or(p);
        groups.retain(|v, _| v.as_deref() == Some(want));
    }
    groups.retain(|_, files| files.len() > 1);
    let mut done = Optimized::default();
    if groups.is_empty() {
        return Ok(done);
    }
    let data_fields: Vec<Field> =
        full.fields().iter().filter(|f| Some(f.name()) != partition_by.as_ref()).map(|f| f.as_ref().clone()).collect();
    let data_schema = Arc::new(Schema::new(data_fields));
    let version = snap.version();
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let tag = super::remote::writer_tag(&format!("optimize/{}/{started}", std::process::id()));
    let mut placed = Vec::new();
    let mut removes = HashSet::new();
    for (n, (value, files)) in groups.iter().enumerate() {
        let dir = match (&partition_by, value) {
            (Some(col), Some(v)) => format!("{col}={}", super::sink::escape_partition(v)),
            (Some(col), None) => format!("{col}={NULL_PARTITION}"),
            (None, _) => String::new(),
        };
        // unique to this compaction: two of one version never write one name
        let rel = if dir.is_empty() {
            format!("part-opt-v{version}-{n:05}-{tag}.parquet")
        } else {
            format!("{dir}/part-opt-v{version}-{n:05}-{tag}.parquet")
        };
        let to = root.join(&rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let props = super::sink::properties(codec, 1 << 20);
        let mut w =
            super::sink::FileWriter::with_properties(&to, data_schema.clone(), props).map_err(|e| e.to_string())?;
        for f in files {
            let path = match (&table.remote, work) {
                (Some(r), Some(w)) => {
                    let copy = w.join("in").join(decode_path(&f.path));
                    download(r, &f.path, &copy)?;
                    copy
                }
                _ => root.join(decode_path(&f.path)),
            };
            let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.with_batch_size(64 * 1024).build())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for batch in reader {
                let batch = batch.map_err(|e| format!("{}: {e}", path.display()))?;
                // the table's columns in its order; a column the file predates reads as null
                let cols: Vec<ArrayRef> = data_schema
                    .fields()
                    .iter()
                    .map(|field| match batch.column_by_name(field.name()) {
                        Some(c) if c.data_type() == field.data_type() => Ok(c.clone()),
                        Some(c) => {
                            arrow_cast::cast(c, field.data_type()).map_err(|e| format!("{}: {e}", path.display()))
                        }
                        None => Ok(arrow_array::new_null_array(field.data_type(), batch.num_rows())),
                    })
                    .collect::<Res<_>>()?;
                let batch = RecordBatch::try_new(data_schema.clone(), cols).map_err(|e| e.to_string())?;
                done.rows += batch.num_rows() as u64;
                w.write(&batch).map_err(|e| e.to_string())?;
            }
            removes.insert(f.path.clone());
            if work.is_some() {
                let _ = std::fs::remove_file(&path);
            }
        }
        w.finish().map_err(|e| e.to_string())?;
        done.partitions.push((dir, files.len(), 1));
        placed.push(Placed {
            staged: to,
            rel_staged: PathBuf::new(),
            rel,
            partition: partition_by.as_ref().map(|_| value.clone()),
        });
    }
    let adds = add_files(&placed, partition_by.as_ref(), &full)?;
    if let Some(r) = &table.remote {
        let files: Vec<(PathBuf, String)> = placed.iter().map(|p| (p.staged.clone(), p.rel.clone())).collect();
        super::remote::upload(r, &files)?;
    }
    let mut txn = snap
        .clone()
        .update_table(UpdateTableOperation::Optimize, engine_info(), false)
        .build(&table.engine, Box::new(FileSystemCommitter::new()))
        .map_err(kernel("cannot start the compaction's commit"))?;
    for sm in table.scan(&snap)? {
        let (files, selected) = visit(&sm)?;
        let (data, sel) = sm.scan_files.into_parts();
        let mut pick = vec![false; data.len()];
        for (f, row) in files.iter().zip(selected) {
            if removes.contains(&f.path) && sel.get(row).copied().unwrap_or(true) {
                pick[row] = true;
            }
        }
        txn.remove_files(FilteredEngineData::try_new(data, pick).map_err(kernel("cannot remove files"))?);
    }
    txn.add_files(Box::new(ArrowEngineData::new(adds)));
    match txn.commit(&table.engine).map_err(kernel("cannot commit the compaction"))? {
        CommitResult::Committed(c) => {
            done.version = Some(c.commit_version());
            Ok(done)
        }
        _ => Err(format!(
            "another writer committed to {} while it was compacted; nothing was committed (the compacted files are left for vacuum): run it again",
            table.name
        )),
    }
}

/// Undo `add.path`'s percent-encoding.
pub fn decode_path(p: &str) -> String {
    percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned()
}

/// The step's output schema as JSON, kept in the decision for the table it creates.
pub fn arrow_schema_json(schema: &SchemaRef) -> Res<String> {
    serde_json::to_string(schema.as_ref()).map_err(|e| format!("internal error: the output schema: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded_and_decoded() {
        let rel = "day=2024-01-05/a b%c/part-00000-r3-ab.parquet";
        let enc = encode_path(rel);
        assert_eq!(enc, "day=2024-01-05/a%20b%25c/part-00000-r3-ab.parquet");
        assert_eq!(decode_path(&enc), rel);
        assert_eq!(decode_path("caf%C3%A9"), "café");
    }

    #[test]
    fn unwritable_types_are_named() {
        let s = Schema::new(vec![Field::new("n", DataType::UInt32, true)]);
        let e = check_schema(&s, None).unwrap_err();
        assert!(e.contains("`n`") && e.contains("unsigned"), "{e}");
        let s = Schema::new(vec![Field::new("t", DataType::Float64, true)]);
        let e = check_schema(&s, Some("t")).unwrap_err();
        assert!(e.contains("partition_by column `t`"), "{e}");
        let s = Schema::new(vec![
            Field::new("d", DataType::Date32, true),
            Field::new("ts", DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("s", DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)), true),
        ]);
        check_schema(&s, Some("d")).unwrap();
    }
}
