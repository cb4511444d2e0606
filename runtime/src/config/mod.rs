//! Pipeline files: TOML in, a validated [`Pipeline`] out.
//!
//! Parsing is strict (unknown keys are errors) and every error carries the file, line and
//! column it is about, plus a hint. Validation collects every problem it can find in one
//! pass, so `weir validate` reports them all at once.

use crate::plugin::Limits;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow_schema::DataType;
use serde::Deserialize;
use toml::Spanned;

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

/// Everything wrong with a pipeline file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    pipeline: Spanned<RawMeta>,
    #[serde(default)]
    secrets: BTreeMap<String, Spanned<RawSecret>>,
    #[serde(default)]
    sources: BTreeMap<String, Spanned<RawSource>>,
    #[serde(default)]
    plugins: BTreeMap<String, Spanned<RawPlugin>>,
    #[serde(default)]
    steps: BTreeMap<String, Spanned<RawStep>>,
    lineage: Option<Spanned<RawLineage>>,
    metrics: Option<Spanned<RawMetrics>>,
}

/// `[metrics]`: where a batch run pushes its Prometheus metrics.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    pushgateway: Spanned<String>,
    timeout_ms: Option<u64>,
}

/// `[lineage]`: where OpenLineage events go.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLineage {
    url: Spanned<String>,
    namespace: Option<String>,
    timeout_ms: Option<u64>,
    retries: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    name: Spanned<String>,
    description: Option<String>,
    batch_size: Option<Spanned<usize>>,
    channel_capacity: Option<Spanned<usize>>,
    state: Option<String>,
    checkpoint_every: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    env: Option<String>,
    file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    /// Absent for an extractor plugin (`plugin = "NAME"`).
    #[serde(default = "plugin_format")]
    format: Format,
    /// An extractor plugin reads this source, with its `config` table.
    plugin: Option<Spanned<String>>,
    config: Option<Spanned<toml::Table>>,
    /// Files (every format but postgres).
    path: Option<Spanned<String>>,
    /// `path = "s3://..."`: how to reach the bucket.
    storage: Option<Spanned<RawStorage>>,
    /// postgres: where the connection URL is (`{ env = "PG_URL" }` or `{ file = "..." }`).
    url: Option<Spanned<RawSecret>>,
    /// postgres: a table (`schema.table`) or a query.
    table: Option<Spanned<String>>,
    query: Option<Spanned<String>>,
    /// postgres: a condition, with `$start` and `$end` bound to the partition's window.
    #[serde(rename = "where")]
    where_: Option<Spanned<String>>,
    #[serde(default)]
    schema: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    on_error: OnError,
    delimiter: Option<Spanned<String>>,
    #[serde(default = "yes")]
    header: bool,
    infer_rows: Option<usize>,
    null_values: Option<Spanned<Vec<String>>>,
    quote: Option<Spanned<String>>,
    escape: Option<Spanned<String>>,
    skip_rows: Option<Spanned<u64>>,
    encoding: Option<Spanned<String>>,
    max_record_mb: Option<Spanned<u64>>,
    retry: Option<Spanned<Retry>>,
    columns: Option<Vec<String>>,
    /// What a run does when the source's schema differs from the last one adopted.
    #[serde(default)]
    schema_change: SchemaChange,
    /// Read from the last committed watermark (less `overlap`) up to the run's start.
    incremental: Option<Spanned<RawIncremental>>,
    /// Schema contracts: columns cast to a type as they are read (a retyped column mapped
    /// back), and columns that may go missing (read as nulls of their adopted type).
    #[serde(default)]
    cast: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    fill_missing: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIncremental {
    column: Option<String>,
    /// File sources: by the files' modification time.
    #[serde(default)]
    modified: bool,
    overlap: Option<String>,
}

/// `incremental` on a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incremental {
    /// The column whose values only grow as rows change (`updated_at`); none for a file
    /// source, which reads the files modified since (`modified = true`).
    pub column: Option<String>,
    /// How far before the committed watermark a run starts reading again, for rows
    /// committed late; the rows read twice are removed by the step's merge key.
    pub overlap: Duration,
}

/// `10m`, `1h`, `30s`, `2d`, `500ms` or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{text}` is not a duration like 10m, 1h or 30s"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{text}`: the unit is one of ms, s, m, h, d")),
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

/// `schema_change` on a source: what a run does when the source's columns differ from the
/// schema the last runs adopted (recorded in the run store, `weir schema` shows them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemaChange {
    /// Not set: the new schema is taken as it is, recorded, and the differences logged.
    #[default]
    Record,
    /// New columns flow into the outputs and become part of the schema later runs expect;
    /// a removed column or a changed type stops the run.
    Evolve,
    /// New columns are dropped (with a warning); a removed column or a changed type stops
    /// the run.
    Freeze,
    /// Any difference stops the run, naming it.
    Fail,
}

fn plugin_format() -> Format {
    Format::Plugin
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    path: Spanned<String>,
    /// Origins it may send HTTP requests to (`https://host`, `http://host:port`, `:*`).
    #[serde(default)]
    allowed_hosts: Vec<Spanned<String>>,
    /// Read-only folders it may read, under `/files/NAME`.
    #[serde(default)]
    files: Vec<Spanned<RawFileGrant>>,
    /// Headers the host adds to its granted requests, from secrets.
    #[serde(default)]
    headers: BTreeMap<String, Spanned<RawHeader>>,
    sha256: Option<Spanned<String>>,
    memory_mb: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
    max_output_rows: Option<Spanned<u64>>,
    max_output_mb: Option<Spanned<u64>>,
    max_log_kb: Option<Spanned<u64>>,
    state_mb: Option<Spanned<u64>>,
    #[serde(default)]
    secrets: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileGrant {
    path: String,
    read_only: Option<bool>,
    /// Its folder name under `/files` (default: the folder's own name).
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    secret: String,
    /// The value, with `{}` where the secret goes (default `{}`).
    template: Option<String>,
    /// Only to this origin (default: every origin in `allowed_hosts`).
    origin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    input: Spanned<String>,
    #[serde(default)]
    transforms: Vec<Spanned<RawTransform>>,
    output: Option<RawOutput>,
    retry: Option<Spanned<Retry>>,
    #[serde(default)]
    checks: Vec<Spanned<RawCheck>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    check: String,
    name: Option<String>,
    column: Option<String>,
    columns: Option<Vec<String>>,
    severity: Option<String>,
    tolerance: Option<f64>,
    values: Option<Vec<toml::Value>>,
    min: Option<f64>,
    max: Option<f64>,
    pattern: Option<String>,
    max_change: Option<f64>,
    max_age: Option<String>,
    to: Option<RawRelTarget>,
    metric: Option<String>,
    runs: Option<usize>,
    z: Option<f64>,
    plugin: Option<String>,
    config: Option<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelTarget {
    step: Option<String>,
    path: Option<String>,
    column: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransform {
    plugin: Spanned<String>,
    #[serde(default)]
    config: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    path: Spanned<String>,
    #[serde(default)]
    format: OutputFormat,
    partition_by: Option<Spanned<String>>,
    row_group_size: Option<usize>,
    compression: Option<Spanned<String>>,
    copy_columns: Option<bool>,
    #[serde(default)]
    mode: OutputMode,
    #[serde(default)]
    key: Vec<String>,
    delete_when: Option<Spanned<RawDeleteWhen>>,
    sequence_by: Option<Spanned<String>>,
    storage: Option<Spanned<RawStorage>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    allow_http: Option<bool>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeleteWhen {
    column: String,
    value: String,
}

/// How a run's rows meet the published dataset (`output.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    /// The run's rows replace the dataset (or, with `--partition`, the partitions written).
    #[default]
    Overwrite,
    /// The run's rows replace the partitions they fall in; the other partitions stay
    /// (`partition_by` needed).
    OverwritePartitions,
    /// The run's rows are added to what is published.
    Append,
    /// Upsert by `key`: a row replaces the published row with the same key (the run's last
    /// one wins); a row matching `delete_when` removes it.
    Merge,
}

// ---------------------------------------------------------------------------------------
// The validated pipeline.

/// Input file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
    /// Debezium change events, as JSON lines (one row per event, with `_op` and `_lsn`).
    Debezium,
    Parquet,
    Avro,
    /// A PostgreSQL table or query (not files).
    Postgres,
    /// An extractor plugin (`plugin = "NAME"`, no `format`).
    Plugin,
}

impl Format {
    /// The format's name in a pipeline file, which is also its files' extension.
    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
            Format::Debezium => "debezium",
            Format::Parquet => "parquet",
            Format::Avro => "avro",
            Format::Postgres => "postgres",
            Format::Plugin => "plugin",
        }
    }
}

/// Output formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// A folder of Parquet files, switched into place.
    #[default]
    Parquet,
    /// A Delta Lake table: Parquet files and a transaction log; each run is one commit.
    Delta,
}

/// What a source does with a row it cannot read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop the run with an error naming file, line and column (the default).
    #[default]
    Fail,
    /// Skip the row, count it in the summary, and log where it was.
    Skip,
}

/// How a step or source retries transient failures (I/O errors, input not there yet).
/// Invalid input, plugin errors and config errors are never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Attempts in all, the first included (1 = no retry).
    pub attempts: u32,
    /// Wait before the second attempt; doubles each time.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// The longest wait.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// Randomise each wait between half and all of it, so many runs do not retry in step.
    #[serde(default = "yes")]
    pub jitter: bool,
}

fn default_backoff() -> u64 {
    500
}

fn default_max_backoff() -> u64 {
    30_000
}

impl Retry {
    /// No retry.
    pub const NONE: Retry = Retry { attempts: 1, backoff_ms: 0, max_backoff_ms: 0, jitter: false };

    /// The wait after failed attempt `n` (1-based), before jitter.
    pub fn backoff(&self, n: u32) -> Duration {
        let ms = self.backoff_ms.saturating_mul(1u64 << (n.saturating_sub(1)).min(20));
        Duration::from_millis(ms.min(self.max_backoff_ms))
    }
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub format: Format,
    /// Path, directory or glob, relative paths resolved against the pipeline file; may hold
    /// `{partition}`. For a source on object storage, the same pattern in its local copy.
    pub path: String,
    /// Files on S3-compatible storage (`path = "s3://bucket/pattern"`): the bucket (as
    /// `s3://bucket/`), the key pattern, and the folder they are copied to before a run.
    pub remote: Option<RemoteFiles>,
    /// Declared column types by name (CSV and JSON lines); empty means infer.
    pub schema: Vec<(String, DataType)>,
    pub on_error: OnError,
    pub delimiter: u8,
    pub header: bool,
    pub infer_rows: usize,
    /// CSV: field texts read as null besides the empty field (`NULL`, `\N`, `NA`).
    pub null_values: Vec<String>,
    /// CSV: the quote character (default `"`; a doubled quote inside quotes is one quote).
    pub quote: u8,
    /// CSV: the character that escapes the next one inside quotes (e.g. `\`), if any.
    pub escape: Option<u8>,
    /// CSV: lines before the header (or the first row), skipped unread.
    pub skip_rows: u64,
    /// CSV and JSON lines: the text's encoding, as a WHATWG label known to `encoding_rs`
    /// (`latin1` is Windows-1252); `None` for UTF-8.
    pub encoding: Option<String>,
    /// CSV and JSON lines: the longest record (line) read, in MiB; a longer one (a file
    /// without line ends, an unclosed quote) is refused instead of filling memory.
    pub max_record_mb: u64,
    pub retry: Retry,
    /// Only these columns, in this order (Parquet reads only them).
    pub columns: Option<Vec<String>>,
    /// `format = "postgres"`: the database and what to read.
    pub postgres: Option<Postgres>,
    /// `plugin = "NAME"`: the extractor plugin that reads the source.
    pub extractor: Option<ExtractorRef>,
    pub schema_change: SchemaChange,
    pub incremental: Option<Incremental>,
    /// Columns cast to these types as they are read (`cast`).
    pub cast: Vec<(String, DataType)>,
    /// Columns read as nulls when the source no longer has them (`fill_missing`).
    pub fill_missing: Vec<String>,
}

impl Source {
    /// Whether the source reads files (not a database or an extractor plugin).
    pub fn reads_files(&self) -> bool {
        self.postgres.is_none() && self.extractor.is_none()
    }
}

/// A source read by an extractor plugin.
#[derive(Debug, Clone)]
pub struct ExtractorRef {
    pub plugin: String,
    /// The `config` table as JSON text, as the plugin receives it.
    pub config_json: String,
    pub line: usize,
}

/// A header the host adds to a plugin's granted requests.
#[derive(Debug, Clone)]
pub struct HeaderGrant {
    pub name: String,
    /// The `[secrets]` entry whose value goes into the template.
    pub secret: String,
    /// The value, `{}` standing for the secret.
    pub template: String,
    pub origin: Option<crate::plugin::grants::Origin>,
}

/// A PostgreSQL source.
#[derive(Debug, Clone)]
pub struct Postgres {
    /// The connection URL, kept as a secret (never in the pipeline file).
    pub url: SecretRef,
    /// The statement run in the run's snapshot: `$1` and `$2` are the window's bounds when
    /// `window` is set.
    pub sql: String,
    /// The `where` condition uses `$start`/`$end`: a run needs a partition.
    pub window: bool,
    /// What `$1`, `$2` are bound to, in order: `start` and/or `end` of the window.
    pub binds: Vec<&'static str>,
    /// The table read, if a table (for lineage and messages).
    pub table: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Plugin {
    pub name: String,
    pub path: PathBuf,
    pub sha256: Option<String>,
    pub memory_bytes: u64,
    pub timeout: Duration,
    /// Rows one call may return (`max_output_rows`).
    pub output_rows: u64,
    /// Arrow IPC bytes one call may return (`max_output_mb`).
    pub output_bytes: u64,
    /// Log bytes (log lines, stdout, stderr) forwarded per run (`max_log_kb`).
    pub log_bytes: usize,
    /// Keyed state the host keeps for an instance in memory (`state_mb`); tables spill
    /// past it.
    pub state_bytes: u64,
    pub secrets: Vec<String>,
    /// Origins it may send HTTP requests to.
    pub allowed_hosts: Vec<crate::plugin::grants::Origin>,
    /// Read-only folders, and the path the plugin sees each at.
    pub files: Vec<crate::plugin::grants::FileGrant>,
    pub headers: Vec<HeaderGrant>,
    pub line: usize,
}

impl Plugin {
    /// The limits an instance of this plugin runs under.
    pub fn limits(&self) -> crate::plugin::Limits {
        crate::plugin::Limits {
            memory_bytes: self.memory_bytes,
            timeout: self.timeout,
            output_rows: self.output_rows,
            output_bytes: self.output_bytes,
            log_bytes: self.log_bytes,
            state_bytes: self.state_bytes,
            ..crate::plugin::Limits::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct TransformRef {
    pub plugin: String,
    /// The `config` table as JSON text, as the plugin receives it.
    pub config_json: String,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Output {
    pub path: PathBuf,
    pub partition_by: Option<String>,
    pub row_group_size: usize,
    pub compression: Codec,
    /// Copy the columns no plugin touches from the input's Parquet pages instead of
    /// decoding and encoding them again (`copy_columns`, default true).
    pub copy_columns: bool,
    pub format: OutputFormat,
    pub mode: OutputMode,
    /// `merge`: the columns that identify a row.
    pub key: Vec<String>,
    /// `merge`: a row whose `column` reads as `value` deletes its key.
    pub delete_when: Option<(String, String)>,
    /// `merge`: the column that orders a key's rows (a change event's log position): the
    /// highest wins, within the run and against published rows and remembered deletes.
    pub sequence_by: Option<String>,
    /// A Delta table on S3-compatible storage (`path = "s3://bucket/prefix"`); `path` is
    /// then a local folder for the run's staging and the quarantine.
    pub remote: Option<Remote>,
}

/// A source's files on S3-compatible storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFiles {
    /// The bucket (`url` is `s3://bucket/`) and how to reach it.
    pub store: Remote,
    /// The key pattern (a key, a prefix ending in `/`, or a glob; may hold `{partition}`).
    pub pattern: String,
    /// Where the matching objects are copied (`.weir/remote-cache/BUCKET` beside the
    /// pipeline file), keys as paths.
    pub cache: PathBuf,
}

/// A table on S3-compatible object storage and how to reach it. Credentials are named
/// secrets (or the AWS environment variables); nothing secret is held here.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Remote {
    /// `s3://bucket/prefix/` (with a trailing slash).
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style requests (`http://host/bucket/key`, as MinIO and moto expect) or, when
    /// false, virtual-hosted ones; unset: the environment's `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`
    /// (path style by default).
    pub path_style: Option<bool>,
    /// Plain http to the endpoint (a local test server); unset: `AWS_ALLOW_HTTP`.
    pub allow_http: Option<bool>,
    pub access_key_id: Option<SecretRef>,
    pub secret_access_key: Option<SecretRef>,
}

/// How output Parquet pages are compressed (`output.compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub enum Codec {
    /// zstd at a level from 1 (fastest) to 22.
    Zstd(i32),
    Snappy,
    None,
}

impl Default for Codec {
    /// zstd level 1: on the benchmark's tables it writes 40% faster than level 3 for files
    /// 2% larger (and is the default level of parquet-rs and Arrow C++).
    fn default() -> Self {
        Codec::Zstd(1)
    }
}

impl Codec {
    /// Parse `zstd`, `zstd(N)` (N in 1..=22), `snappy` or `none`.
    pub fn parse(text: &str) -> std::result::Result<Codec, String> {
        let t = text.trim().to_ascii_lowercase();
        let bad = || {
            format!("unknown compression `{text}`: use \"zstd\" (level 1), \"zstd(N)\" with N from 1 to 22, \"snappy\" or \"none\"")
        };
        match t.as_str() {
            "zstd" => Ok(Codec::Zstd(1)),
            "snappy" => Ok(Codec::Snappy),
            "none" | "uncompressed" => Ok(Codec::None),
            _ => {
                let level = t.strip_prefix("zstd(").and_then(|r| r.strip_suffix(')')).ok_or_else(bad)?;
                match level.trim().parse::<i32>() {
                    Ok(n) if (1..=22).contains(&n) => Ok(Codec::Zstd(n)),
                    _ => Err(bad()),
                }
            }
        }
    }

    /// The Parquet writer's setting for this codec.
    pub fn parquet(self) -> parquet::basic::Compression {
        use parquet::basic::{Compression, ZstdLevel};
        match self {
            Codec::Zstd(level) => Compression::ZSTD(ZstdLevel::try_new(level).unwrap_or_default()),
            Codec::Snappy => Compression::SNAPPY,
            Codec::None => Compression::UNCOMPRESSED,
        }
    }
}

/// As `output.compression` is written (`zstd(1)`, `snappy`, `none`); [`Codec::parse`] reads it back.
impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::Zstd(level) => write!(f, "zstd({level})"),
            Codec::Snappy => f.write_str("snappy"),
            Codec::None => f.write_str("none"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    /// A source name or an earlier step's name.
    pub input: String,
    pub transforms: Vec<TransformRef>,
    pub output: Option<Output>,
    pub line: usize,
    /// The step's `retry`, else its source's, else none.
    pub retry: Retry,
    /// Quality checks on the step's output, run before publish.
    pub checks: Vec<crate::quality::Check>,
}

/// A validated pipeline. Steps are in an order where every step comes after its input.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub name: String,
    pub batch_size: usize,
    pub channel_capacity: usize,
    pub secrets: BTreeMap<String, SecretRef>,
    pub sources: BTreeMap<String, Source>,
    pub plugins: BTreeMap<String, Plugin>,
    pub steps: Vec<Step>,
    /// sha256 of the file's bytes, for run records.
    pub config_sha256: String,
    /// The run store file (`[pipeline] state`, default `.weir/state.db` beside the file).
    pub state_path: PathBuf,
    /// Checkpoint every this many source batches (0: never).
    pub checkpoint_every: u64,
    /// Where OpenLineage events go (`[lineage]`; `WEIR_OPENLINEAGE_URL` overrides).
    pub lineage: Option<crate::lineage::Config>,
    /// Where a run pushes its metrics (`[metrics]`; `WEIR_PUSHGATEWAY_URL` overrides).
    pub metrics: Option<crate::metrics::Config>,
}

pub const DEFAULT_BATCH_SIZE: usize = 64 * 1024;
/// Source batches between two checkpoints (64 batches: 4M rows at the default batch size).
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 64;

impl Pipeline {
    /// Read and validate a pipeline file.
    pub fn load(path: &Path) -> Result<Pipeline, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read the pipeline file: {e}"),
                hint: None,
            }])
        })?;
        Pipeline::parse(path, &text)
    }

    /// Validate pipeline text; `path` names it in messages and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Pipeline, ConfigErrors> {
        let ctx = Ctx { file: path, text };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| ctx.line_col(s.start)).unwrap_or((0, 0));
            let message = e.message().trim().to_string();
            let hint = hint_for_parse_error(&message);
            ConfigErrors(vec![Diagnostic { file: path.to_path_buf(), line, column, message, hint }])
        })?;
        let mut errors = Vec::new();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };

        let meta = raw.pipeline.get_ref();
        if meta.name.get_ref().trim().is_empty() {
            errors.push(ctx.at(
                meta.name.span().start,
                "pipeline.name is empty",
                Some("give the pipeline a name, e.g. name = \"orders\""),
            ));
        }
        let _ = &meta.description;
        let batch_size = match &meta.batch_size {
            Some(b) if *b.get_ref() == 0 || *b.get_ref() > 16 << 20 => {
                errors.push(ctx.at(b.span().start, "pipeline.batch_size must be between 1 and 16777216 rows", None));
                DEFAULT_BATCH_SIZE
            }
            Some(b) => *b.get_ref(),
            None => DEFAULT_BATCH_SIZE,
        };
        let channel_capacity = match &meta.channel_capacity {
            Some(c) if *c.get_ref() == 0 || *c.get_ref() > 1024 => {
                errors.push(ctx.at(
                    c.span().start,
                    "pipeline.channel_capacity must be between 1 and 1024 batches",
                    None,
                ));
                4
            }
            Some(c) => *c.get_ref(),
            None => 4,
        };

        // secrets
        let secrets = parse_secrets(&ctx, &base, &raw, &mut errors);

        let mut check_retry = |r: &Option<Spanned<Retry>>, what: &str| -> Retry {
            match r {
                None => Retry::NONE,
                Some(r) if r.get_ref().attempts == 0 || r.get_ref().attempts > 100 => {
                    errors.push(ctx.at(
                        r.span().start,
                        &format!("{what}.retry.attempts must be between 1 and 100"),
                        None,
                    ));
                    Retry::NONE
                }
                Some(r) => *r.get_ref(),
            }
        };
        let mut source_retry = BTreeMap::new();
        for (name, s) in &raw.sources {
            source_retry.insert(name.clone(), check_retry(&s.get_ref().retry, &format!("sources.{name}")));
        }
        let mut step_retry = BTreeMap::new();
        for (name, s) in &raw.steps {
            if s.get_ref().retry.is_some() {
                step_retry.insert(name.clone(), check_retry(&s.get_ref().retry, &format!("steps.{name}")));
            }
        }

        // sources
        let sources = parse_sources(&ctx, &base, &raw, &source_retry, &secrets, &mut errors);
        let plugins = parse_plugins(&ctx, &base, &raw, &secrets, &mut errors);
        let steps = parse_steps(&ctx, &base, &raw, &sources, (&step_retry, &source_retry), &secrets, &mut errors);

        check_outputs(path, &sources, &steps, &mut errors);
        let metrics = raw.metrics.as_ref().and_then(|m| {
            let m = m.get_ref();
            let url = m.pushgateway.get_ref();
            crate::metrics::Config::check_url(url)
                .map_err(|e| {
                    errors.push(ctx.at(m.pushgateway.span().start, &format!("metrics.pushgateway: {e}"), None))
                })
                .ok()?;
            let timeout = std::time::Duration::from_millis(m.timeout_ms.unwrap_or(2000).clamp(10, 60_000));
            Some(crate::metrics::Config { pushgateway: url.clone(), timeout })
        });
        let lineage = raw.lineage.as_ref().and_then(|l| {
            let l = l.get_ref();
            let transport = crate::lineage::Config::transport_from_url(l.url.get_ref(), &base)
                .map_err(|m| errors.push(ctx.at(l.url.span().start, &format!("lineage.url: {m}"), None)))
                .ok()?;
            Some(crate::lineage::Config {
                transport,
                namespace: l.namespace.clone().unwrap_or_else(|| "weir".into()),
                timeout: std::time::Duration::from_millis(l.timeout_ms.unwrap_or(2000).clamp(10, 60_000)),
                retries: l.retries.unwrap_or(2).min(10),
            })
        });

        let steps = match order_steps(steps) {
            Ok(s) => s,
            Err((cycle, line)) => {
                errors.push(Diagnostic {
                    file: path.to_path_buf(),
                    line,
                    column: 1,
                    message: format!("steps form a cycle: {}", cycle.join(" -> ")),
                    hint: Some("a step may read a source or an earlier step, never itself through others".into()),
                });
                Vec::new()
            }
        };

        if !errors.is_empty() {
            errors.sort_by_key(|d| (d.line, d.column));
            return Err(ConfigErrors(errors));
        }
        use sha2::Digest;
        Ok(Pipeline {
            file: path.to_path_buf(),
            name: meta.name.get_ref().clone(),
            batch_size,
            channel_capacity,
            secrets,
            sources,
            plugins,
            steps,
            config_sha256: crate::plugin::hex(&sha2::Sha256::digest(text.as_bytes())),
            state_path: base.join(meta.state.as_deref().unwrap_or(".weir/state.db")),
            checkpoint_every: meta.checkpoint_every.unwrap_or(DEFAULT_CHECKPOINT_EVERY),
            lineage,
            metrics,
        })
    }

    /// The step named `name`.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }
}

impl SecretRef {
    /// Read the secret's bytes (a file's trailing newline is not part of the key).
    pub fn resolve(&self) -> Result<Vec<u8>, String> {
        match self {
            SecretRef::Env(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(v.into_bytes()),
                _ => Err(format!("environment variable {var} is not set (or empty)")),
            },
            SecretRef::File(path) => {
                let mut bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                if bytes.is_empty() {
                    return Err(format!("{} is empty", path.display()));
                }
                Ok(bytes)
            }
        }
    }
}

/// The first key of a check table that its kind does not take, with the keys it does take
/// (none for an unknown kind: [`parse_check`] names that).
fn misplaced_check_key(c: &RawCheck) -> Option<(&'static str, String)> {
    let own: &[&str] = match c.check.as_str() {
        "not_null" => &["column"],
        "accepted_values" => &["column", "values"],
        "range" => &["column", "min", "max"],
        "regex" => &["column", "pattern"],
        "unique" => &["column", "columns"],
        "relationships" => &["column", "to"],
        "row_count" => &["min", "max"],
        "volume" => &["max_change"],
        "freshness" => &["column", "max_age"],
        "anomaly" => &["metric", "column", "runs", "z"],
        "plugin" => &["plugin", "config"],
        _ => return None,
    };
    let set = [
        ("column", c.column.is_some()),
        ("columns", c.columns.is_some()),
        ("values", c.values.is_some()),
        ("min", c.min.is_some()),
        ("max", c.max.is_some()),
        ("pattern", c.pattern.is_some()),
        ("max_change", c.max_change.is_some()),
        ("max_age", c.max_age.is_some()),
        ("to", c.to.is_some()),
        ("metric", c.metric.is_some()),
        ("runs", c.runs.is_some()),
        ("z", c.z.is_some()),
        ("plugin", c.plugin.is_some()),
        ("config", c.config.is_some()),
    ];
    let key = set.iter().find(|(k, present)| *present && !own.contains(k))?.0;
    let takes: Vec<&str> = own.iter().copied().chain(["severity", "tolerance", "name"]).collect();
    Some((key, takes.join(", ")))
}

/// Where `key = ...` stands in the table at `span` of `text` (a key, not a value that spells
/// it). The span of an `[[array.of.tables]]` entry covers its header: its keys follow, up to
/// the next header.
fn find_key(text: &str, span: std::ops::Range<usize>, key: &str) -> Option<usize> {
    let end = text.get(span.end..)?.find("\n[").map(|i| span.end + i).unwrap_or(text.len());
    let span = span.start..end.max(span.end);
    let slice = text.get(span.clone())?;
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    slice
        .match_indices(key)
        .map(|(i, _)| i)
        .find(|&i| {
            let before_ok = slice[..i].chars().next_back().is_none_or(|c| !is_ident(c) && c != '"' && c != '\'');
            let after = &slice[i + key.len()..];
            before_ok && after.trim_start_matches([' ', '\t']).starts_with('=')
        })
        .map(|i| span.start + i)
}

/// Turn a check table into a [`crate::quality::Check`]; the error says what is missing.
fn parse_check(c: &RawCheck, base: &Path) -> Result<crate::quality::Check, (String, Option<String>)> {
    use crate::quality::{Check, Kind, Metric, RelTarget, Severity};
    let need = |field: &Option<String>, what: &str| -> Result<String, (String, Option<String>)> {
        field.clone().ok_or_else(|| (format!("`{}` needs `{what}`", c.check), None))
    };
    let kind = match c.check.as_str() {
        "not_null" => Kind::NotNull { column: need(&c.column, "column")? },
        "accepted_values" => {
            let values = c.values.as_ref().ok_or_else(|| ("`accepted_values` needs `values = [...]`".to_string(), None))?;
            let values = values
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            Kind::AcceptedValues { column: need(&c.column, "column")?, values }
        }
        "range" => {
            if c.min.is_none() && c.max.is_none() {
                return Err(("`range` needs `min`, `max` or both".into(), None));
            }
            Kind::Range { column: need(&c.column, "column")?, min: c.min, max: c.max }
        }
        "regex" => {
            let p = need(&c.pattern, "pattern")?;
            let pattern = regex::Regex::new(&p).map_err(|e| (format!("`pattern` is not a valid regex: {e}"), None))?;
            Kind::Regex { column: need(&c.column, "column")?, pattern }
        }
        "unique" => {
            let columns = match (&c.columns, &c.column) {
                (Some(cols), None) if !cols.is_empty() => cols.clone(),
                (None, Some(col)) => vec![col.clone()],
                _ => return Err(("`unique` needs `column` or `columns` (a composite key)".into(), None)),
            };
            Kind::Unique { columns }
        }
        "relationships" => {
            let to = c.to.as_ref().ok_or_else(|| {
                ("`relationships` needs `to`".to_string(), Some(r#"to = { step = "customers", column = "id" } or { path = "../dim/customers", column = "id" }"#.to_string()))
            })?;
            let target = match (&to.step, &to.path) {
                (Some(s), None) => RelTarget::Step(s.clone()),
                (None, Some(p)) => RelTarget::Path(base.join(p)),
                _ => return Err(("`to` names exactly one of `step` or `path`".into(), None)),
            };
            Kind::Relationships { column: need(&c.column, "column")?, target, target_column: to.column.clone() }
        }
        "row_count" => {
            if c.min.is_none() && c.max.is_none() {
                return Err(("`row_count` needs `min`, `max` or both".into(), None));
            }
            Kind::RowCount { min: c.min.map(|v| v.max(0.0) as u64), max: c.max.map(|v| v.max(0.0) as u64) }
        }
        "volume" => {
            let m = c.max_change.ok_or_else(|| ("`volume` needs `max_change` (0.5 = within ±50%)".to_string(), None))?;
            Kind::Volume { max_change: m }
        }
        "freshness" => {
            let age = need(&c.max_age, "max_age")?;
            let secs = crate::quality::parse_duration(&age)
                .ok_or_else(|| (format!("`max_age = {age:?}` is not a duration"), Some("use 90s, 45m, 36h or 2d".to_string())))?;
            Kind::Freshness { column: need(&c.column, "column")?, max_age_secs: secs }
        }
        "anomaly" => {
            let metric = match c.metric.as_deref().unwrap_or("row_count") {
                "row_count" => Metric::RowCount,
                "null_rate" => Metric::NullRate(need(&c.column, "column")?),
                "mean" => Metric::Mean(need(&c.column, "column")?),
                other => return Err((format!("unknown metric `{other}`"), Some("use row_count, null_rate or mean".into()))),
            };
            Kind::Anomaly { metric, runs: c.runs.unwrap_or(5).max(2), z: c.z.unwrap_or(3.0) }
        }
        "plugin" => {
            let plugin = c.plugin.clone().ok_or_else(|| {
                ("`plugin` checks need `plugin` (a quality-rule plugin declared in [plugins])".to_string(), None)
            })?;
            let config = weir_sdk::config::toml_to_json(&toml::Value::Table(c.config.clone().unwrap_or_default()));
            Kind::Plugin { plugin, config_json: config.to_string() }
        }
        other => {
            return Err((
                format!("unknown check `{other}`"),
                Some("use not_null, accepted_values, range, regex, unique, relationships, row_count, volume, freshness, anomaly or plugin".into()),
            ))
        }
    };
    let severity = match c.severity.as_deref().unwrap_or("block") {
        "block" => Severity::Block,
        "warn" => Severity::Warn,
        "quarantine" if kind.is_row_level() => Severity::Quarantine,
        "quarantine" => {
            return Err((
                format!("`{}` is a dataset-level check: it can block or warn, not quarantine rows", c.check),
                None,
            ))
        }
        other => return Err((format!("unknown severity `{other}`"), Some("use block, warn or quarantine".into()))),
    };
    let tolerance = c.tolerance.unwrap_or(0.0);
    if tolerance < 0.0 {
        return Err(("`tolerance` cannot be negative".into(), None));
    }
    let name = c.name.clone().unwrap_or_else(|| {
        let cols = kind.columns().join(", ");
        match &kind {
            Kind::Plugin { plugin, .. } => format!("plugin({plugin})"),
            Kind::Anomaly { metric, .. } => format!(
                "anomaly({})",
                match metric {
                    Metric::RowCount => "row_count".to_string(),
                    Metric::NullRate(c) => format!("null_rate {c}"),
                    Metric::Mean(c) => format!("mean {c}"),
                }
            ),
            _ if cols.is_empty() => c.check.clone(),
            _ => format!("{}({cols})", c.check),
        }
    });
    Ok(Check { name, kind, severity, tolerance, line: 0 })
}

/// `[secrets]`: each names an environment variable or a file, never the value.
fn parse_secrets(
    ctx: &Ctx<'_>,
    base: &Path,
    raw: &RawFile,
    errors: &mut Vec<Diagnostic>,
) -> BTreeMap<String, SecretRef> {
    let mut secrets = BTreeMap::new();
    for (name, s) in &raw.secrets {
        let at = s.span().start;
        match (&s.get_ref().env, &s.get_ref().file) {
            (Some(env), None) => {
                secrets.insert(name.clone(), SecretRef::Env(env.clone()));
            }
            (None, Some(file)) => {
                secrets.insert(name.clone(), SecretRef::File(base.join(file)));
            }
            _ => errors.push(ctx.at(
                at,
                &format!("secret `{name}` must name exactly one of `env` or `file`"),
                Some("secrets.mask_key = { env = \"WEIR_MASK_KEY\" } or { file = \"secrets/mask.key\" }; never the key itself"),
            )),
        }
    }
    secrets
}

/// `[sources.*]`.
fn parse_sources(
    ctx: &Ctx<'_>,
    base: &Path,
    raw: &RawFile,
    source_retry: &BTreeMap<String, Retry>,
    secrets: &BTreeMap<String, SecretRef>,
    errors: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Source> {
    let mut sources = BTreeMap::new();
    for (name, s) in &raw.sources {
        let r = s.get_ref();
        let mut schema = Vec::new();
        for (col, ty) in &r.schema {
            match column_type(ty.get_ref()) {
                Ok(t) if t.is_nested() && r.format != Format::Jsonl => errors.push(ctx.at(
                    ty.span().start,
                    &format!("sources.{name}.schema.{col}: struct and list columns are read from JSON lines only"),
                    Some("declare the column as `string` to keep its text"),
                )),
                Ok(t) => schema.push((col.clone(), t)),
                Err(e) => errors.push(ctx.at(
                    ty.span().start,
                    &format!("sources.{name}.schema.{col}: {e}"),
                    Some(&format!(
                        "use one of {}, or list<TYPE> and struct<NAME: TYPE, ...> for JSON lines",
                        weir_sdk::util::TYPE_NAMES
                    )),
                )),
            }
        }
        if matches!(r.format, Format::Parquet | Format::Avro) && !schema.is_empty() {
            errors.push(ctx.at(
                s.span().start,
                &format!("sources.{name}: {} files carry their own schema; remove `schema`", r.format.name()),
                None,
            ));
        }
        let mut one_char = |key: &str, value: &Option<Spanned<String>>, default: u8| match value {
            None => default,
            Some(d) if d.get_ref().len() == 1 => d.get_ref().as_bytes()[0],
            Some(d) => {
                errors.push(ctx.at(d.span().start, &format!("sources.{name}.{key} must be one ASCII character"), None));
                default
            }
        };
        let delimiter = one_char("delimiter", &r.delimiter, b',');
        let quote = one_char("quote", &r.quote, b'"');
        let escape = r.escape.is_some().then(|| one_char("escape", &r.escape, b'\\'));
        let encoding = r.encoding.as_ref().and_then(|e| match encoding_rs::Encoding::for_label(e.get_ref().trim().as_bytes()) {
            Some(enc) if enc == encoding_rs::UTF_8 => None,
            Some(enc) => Some(enc.name().to_string()),
            None => {
                errors.push(ctx.at(
                    e.span().start,
                    &format!("sources.{name}.encoding: unknown encoding `{}`", e.get_ref()),
                    Some("use utf-8 (the default), latin1 (read as windows-1252), or another WHATWG label such as iso-8859-15, utf-16le or shift_jis"),
                ));
                None
            }
        });
        if r.format != Format::Csv {
            for (key, span) in [
                ("delimiter", r.delimiter.as_ref().map(|v| v.span())),
                ("quote", r.quote.as_ref().map(|v| v.span())),
                ("escape", r.escape.as_ref().map(|v| v.span())),
                ("skip_rows", r.skip_rows.as_ref().map(|v| v.span())),
            ] {
                if let Some(span) = span {
                    errors.push(ctx.at(span.start, &format!("sources.{name}.{key} applies to csv sources only"), None));
                }
            }
        }
        let max_record_mb = match &r.max_record_mb {
            None => DEFAULT_MAX_RECORD_MB,
            Some(m) if matches!(r.format, Format::Parquet | Format::Avro) => {
                errors.push(ctx.at(
                    m.span().start,
                    &format!("sources.{name}.max_record_mb applies to csv and jsonl sources only"),
                    None,
                ));
                DEFAULT_MAX_RECORD_MB
            }
            // a batch's text stays under the 2 GiB a string column addresses (see BATCH_TEXT_BYTES)
            Some(m) if !(1..=1024).contains(m.get_ref()) => {
                errors.push(ctx.at(m.span().start, &format!("sources.{name}.max_record_mb must be 1..1024"), None));
                DEFAULT_MAX_RECORD_MB
            }
            Some(m) => *m.get_ref(),
        };
        if let Some(e) = r.encoding.as_ref().filter(|_| matches!(r.format, Format::Parquet | Format::Avro)) {
            errors.push(ctx.at(
                e.span().start,
                &format!("sources.{name}.encoding applies to csv and jsonl sources only"),
                Some("Parquet and Avro strings are UTF-8 by definition"),
            ));
        }
        let postgres = parse_postgres(ctx, base, name, s.span().start, r, errors);
        let extractor = parse_extractor(ctx, raw, name, s.span().start, r, errors);
        let raw_path = match (&r.path, r.format) {
            (Some(p), Format::Plugin) => {
                errors.push(ctx.at(
                    p.span().start,
                    &format!(
                        "sources.{name}.path: an extractor plugin reads the source; what it reads goes in `config`"
                    ),
                    Some("grant it folders with `files` on its [plugins.NAME] table"),
                ));
                String::new()
            }
            (None, Format::Plugin) => String::new(),
            (Some(p), Format::Postgres) => {
                errors.push(ctx.at(
                    p.span().start,
                    &format!("sources.{name}.path: a postgres source reads a table or query, not files"),
                    Some("give `table` or `query`, and `url`"),
                ));
                String::new()
            }
            (None, Format::Postgres) => String::new(),
            (Some(p), _) => {
                if p.get_ref().trim().is_empty() {
                    errors.push(ctx.at(p.span().start, &format!("sources.{name}.path is empty"), None));
                }
                p.get_ref().clone()
            }
            (None, f) => {
                errors.push(ctx.at(
                    s.span().start,
                    &format!("sources.{name} has no `path`"),
                    Some(&format!("a {} source reads files: path = \"data/*.{}\"", f.name(), f.name())),
                ));
                String::new()
            }
        };
        if let Some(n) = r.null_values.as_ref().filter(|_| r.format != Format::Csv) {
            errors.push(ctx.at(
                n.span().start,
                &format!("sources.{name}.null_values applies to csv sources only"),
                Some("JSON lines have null; Parquet has nulls of its own"),
            ));
        }
        let remote = parse_remote_files(ctx, base, name, r, &raw_path, secrets, errors);
        let path = if let Some(rf) = &remote {
            rf.cache.join(&rf.pattern).to_string_lossy().into_owned()
        } else if raw_path.is_empty() || Path::new(&raw_path).is_absolute() {
            raw_path
        } else {
            base.join(&raw_path).to_string_lossy().into_owned()
        };
        let incremental = r.incremental.as_ref().and_then(|inc| {
            let at = inc.span().start;
            let i = inc.get_ref();
            let files = !matches!(r.format, Format::Postgres | Format::Plugin);
            match (&i.column, i.modified, files) {
                (None, true, true) => {}
                (Some(c), false, false) if !c.trim().is_empty() => {}
                (_, _, true) => {
                    errors.push(ctx.at(
                        at,
                        &format!("sources.{name}.incremental: a file source is incremental by modification time"),
                        Some("incremental = { modified = true, overlap = \"1m\" }: each run reads the files modified since the last"),
                    ));
                    return None;
                }
                _ => {
                    errors.push(ctx.at(
                        at,
                        &format!("sources.{name}.incremental needs the `column` that grows as rows change"),
                        Some("incremental = { column = \"updated_at\", overlap = \"10m\" }"),
                    ));
                    return None;
                }
            }
            let overlap = match i.overlap.as_deref().map(parse_duration) {
                None => Duration::ZERO,
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    errors.push(ctx.at(at, &format!("sources.{name}.incremental.overlap: {e}"), None));
                    return None;
                }
            };
            Some(Incremental { column: i.column.clone(), overlap })
        });
        if r.format == Format::Plugin && !r.schema.is_empty() {
            errors.push(ctx.at(
                s.span().start,
                &format!("sources.{name}.schema: an extractor plugin declares its own schema"),
                Some("give the columns in its `config`, as the plugin documents"),
            ));
        }
        sources.insert(
            name.clone(),
            Source {
                name: name.clone(),
                format: r.format,
                path,
                remote,
                schema,
                on_error: r.on_error,
                delimiter,
                header: r.header,
                infer_rows: r.infer_rows.unwrap_or(1000).max(1),
                null_values: r.null_values.as_ref().map(|n| n.get_ref().clone()).unwrap_or_default(),
                quote,
                escape,
                skip_rows: r.skip_rows.as_ref().map_or(0, |n| *n.get_ref()),
                encoding,
                max_record_mb,
                retry: source_retry.get(name).copied().unwrap_or(Retry::NONE),
                columns: r.columns.clone(),
                postgres,
                extractor,
                schema_change: r.schema_change,
                incremental,
                cast: r
                    .cast
                    .iter()
                    .filter_map(|(col, ty)| match column_type(ty.get_ref()) {
                        Ok(t) if !t.is_nested() => Some((col.clone(), t)),
                        _ => {
                            errors.push(ctx.at(
                                ty.span().start,
                                &format!("sources.{name}.cast.{col}: `{}` is not a flat column type", ty.get_ref()),
                                Some(&format!("one of {}", weir_sdk::util::TYPE_NAMES)),
                            ));
                            None
                        }
                    })
                    .collect(),
                fill_missing: r.fill_missing.clone(),
            },
        );
    }
    sources
}

/// Where `$` stands in SQL text outside its '...' and "..." literals.
fn parameters(text: &str) -> Vec<usize> {
    let mut quote: Option<char> = None;
    let mut found = Vec::new();
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '$') => found.push(i),
            _ => {}
        }
    }
    found
}

/// `text` with the parameter `name` (outside literals, and not a longer name it begins,
/// such as `$endpoint`) written as `to`.
fn placeholder(text: &str, name: &str, to: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for i in parameters(text) {
        let Some(after) = text[i..].strip_prefix(name) else { continue };
        if after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        out.push_str(&text[last..i]);
        out.push_str(to);
        last = i + name.len();
    }
    out.push_str(&text[last..]);
    out
}

/// An extractor source's keys: `plugin` (declared under `[plugins]`) and its `config`.
fn parse_extractor(
    ctx: &Ctx<'_>,
    raw: &RawFile,
    name: &str,
    at: usize,
    r: &RawSource,
    errors: &mut Vec<Diagnostic>,
) -> Option<ExtractorRef> {
    if r.format != Format::Plugin {
        for (key, span) in
            [("plugin", r.plugin.as_ref().map(|v| v.span())), ("config", r.config.as_ref().map(|v| v.span()))]
        {
            if let Some(span) = span {
                errors.push(ctx.at(
                    span.start,
                    &format!("sources.{name}.{key} applies to extractor plugin sources only"),
                    Some("an extractor source has `plugin = \"NAME\"` and no `format`"),
                ));
            }
        }
        return None;
    }
    let Some(plugin) = &r.plugin else {
        errors.push(ctx.at(
            at,
            &format!("sources.{name} has neither a `format` nor a `plugin`"),
            Some("format = \"csv\" (or jsonl, parquet, avro, postgres) with its keys, or plugin = \"NAME\" for an extractor plugin"),
        ));
        return None;
    };
    if !raw.plugins.contains_key(plugin.get_ref()) {
        errors.push(ctx.at(
            plugin.span().start,
            &format!("source `{name}` uses plugin `{}`, which is not declared", plugin.get_ref()),
            Some(&format!("declare it: [plugins.{}] path = \"...wasm\"", plugin.get_ref())),
        ));
    }
    let config = r.config.as_ref().map(|c| c.get_ref().clone()).unwrap_or_default();
    Some(ExtractorRef {
        plugin: plugin.get_ref().clone(),
        config_json: weir_sdk::config::toml_to_json(&toml::Value::Table(config)).to_string(),
        line: ctx.line_col(plugin.span().start).0,
    })
}

/// A postgres source's keys: `url` (a secret), `table` or `query`, and `where`. Other
/// formats may not use them.
fn parse_postgres(
    ctx: &Ctx<'_>,
    base: &Path,
    name: &str,
    at: usize,
    r: &RawSource,
    errors: &mut Vec<Diagnostic>,
) -> Option<Postgres> {
    if r.format != Format::Postgres {
        for (key, span) in [
            ("url", r.url.as_ref().map(|v| v.span())),
            ("table", r.table.as_ref().map(|v| v.span())),
            ("query", r.query.as_ref().map(|v| v.span())),
            ("where", r.where_.as_ref().map(|v| v.span())),
        ] {
            if let Some(span) = span {
                errors.push(ctx.at(
                    span.start,
                    &format!("sources.{name}.{key} applies to postgres sources only"),
                    None,
                ));
            }
        }
        return None;
    }
    let url = match r.url.as_ref().map(|u| (u.span().start, u.get_ref())) {
        Some((_, RawSecret { env: Some(env), file: None })) => Some(SecretRef::Env(env.clone())),
        Some((_, RawSecret { env: None, file: Some(file) })) => Some(SecretRef::File(base.join(file))),
        Some((at, _)) => {
            errors.push(ctx.at(at, &format!("sources.{name}.url must name exactly one of `env` or `file`"), None));
            None
        }
        None => {
            errors.push(ctx.at(
                at,
                &format!("sources.{name} has no `url`"),
                Some(
                    "url = { env = \"PG_URL\" } (postgres://user:password@host:5432/db, kept out of the pipeline file)",
                ),
            ));
            None
        }
    };
    for (key, set) in [
        ("columns", r.columns.is_some()),
        ("encoding", r.encoding.is_some()),
        ("max_record_mb", r.max_record_mb.is_some()),
        ("infer_rows", r.infer_rows.is_some()),
    ] {
        if set {
            errors.push(ctx.at(
                at,
                &format!("sources.{name}.{key} applies to file sources only"),
                Some("a postgres source reads what its table or query selects: choose columns in a query"),
            ));
        }
    }
    if !r.schema.is_empty() {
        errors.push(ctx.at(
            at,
            &format!("sources.{name}: a postgres source takes the database's column types; remove `schema`"),
            Some("cast in a query instead: query = \"select id, amount::numeric(12,2) as amount from orders\""),
        ));
    }
    let cond = r.where_.as_ref().map(|w| w.get_ref().as_str());
    // `$start` is `$1`; `$end` is `$2`, or `$1` when it is alone
    let uses = |name: &str| cond.is_some_and(|c| placeholder(c, name, "\0") != c);
    let binds: Vec<&'static str> = [("start", uses("$start")), ("end", uses("$end"))]
        .into_iter()
        .filter_map(|(b, used)| used.then_some(b))
        .collect();
    let end_as = if binds == ["end"] { "$1" } else { "$2" };
    let cond = cond.map(|c| placeholder(&placeholder(c, "$start", "$1"), "$end", end_as));
    let params = cond.as_deref().map(parameters).unwrap_or_default();
    let window = params.iter().any(|&i| cond.as_deref().is_some_and(|c| c[i + 1..].starts_with(['1', '2'])));
    if let (Some(w), Some(c)) = (&r.where_, &cond) {
        if let Some(&i) = params.iter().find(|&&i| !c[i + 1..].starts_with(['1', '2'])) {
            errors.push(ctx.at(
                w.span().start,
                &format!(
                    "sources.{name}.where: `{}` is not a parameter weir binds",
                    &c[i..].split_whitespace().next().unwrap_or("$")
                ),
                Some("use $start and $end (the partition's window)"),
            ));
        }
    }
    let (sql, table) = match (&r.table, &r.query) {
        (Some(t), None) => {
            let ok = !t.get_ref().is_empty()
                && t.get_ref().split('.').all(|part| {
                    part.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
                });
            if !ok {
                errors.push(ctx.at(
                    t.span().start,
                    &format!("sources.{name}.table `{}` is not a table name (schema.table)", t.get_ref()),
                    Some("for anything else, write a `query`"),
                ));
            }
            let quoted: Vec<String> = t.get_ref().split('.').map(|p| format!("\"{p}\"")).collect();
            let mut sql = format!("SELECT * FROM {}", quoted.join("."));
            if let Some(c) = &cond {
                sql.push_str(&format!(" WHERE {c}"));
            }
            (sql, Some(t.get_ref().clone()))
        }
        (None, Some(q)) => {
            let q = q.get_ref().trim().trim_end_matches(';');
            let sql = match &cond {
                // on a line of its own: a trailing `--` comment in the query ends there
                Some(c) => format!("SELECT * FROM ({q}\n) AS weir_query WHERE {c}"),
                None => q.to_string(),
            };
            (sql, None)
        }
        _ => {
            errors.push(ctx.at(
                at,
                &format!("sources.{name}: a postgres source names exactly one of `table` or `query`"),
                Some("table = \"public.orders\", or query = \"select ... from ...\""),
            ));
            (String::new(), None)
        }
    };
    Some(Postgres { url: url?, sql, window, binds, table })
}

/// `[plugins.*]`: each file exists (and matches its pin).
fn parse_plugins(
    ctx: &Ctx<'_>,
    base: &Path,
    raw: &RawFile,
    secrets: &BTreeMap<String, SecretRef>,
    errors: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Plugin> {
    let mut plugins = BTreeMap::new();
    for (name, p) in &raw.plugins {
        let r = p.get_ref();
        let path = base.join(r.path.get_ref());
        if !path.is_file() {
            errors.push(ctx.at(
                r.path.span().start,
                &format!("plugin `{name}`: file {} does not exist", path.display()),
                Some(
                    "paths are relative to the pipeline file; build first-party plugins with scripts/build-plugins.sh",
                ),
            ));
        } else if let Some(pin) = &r.sha256 {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    use sha2::Digest;
                    let actual = crate::plugin::hex(&sha2::Sha256::digest(&bytes));
                    if !actual.eq_ignore_ascii_case(pin.get_ref().trim()) {
                        errors.push(ctx.at(
                            pin.span().start,
                            &format!(
                                "plugin `{name}`: sha256 pin does not match {} (the file's sha256 is {actual})",
                                path.display()
                            ),
                            Some("the plugin changed since it was pinned: review it, then update the pin"),
                        ));
                    }
                }
                Err(e) => errors.push(ctx.at(
                    r.path.span().start,
                    &format!("plugin `{name}`: cannot read {}: {e}", path.display()),
                    None,
                )),
            }
        }
        let memory_mb = r.memory_mb.as_ref().map(|m| *m.get_ref()).unwrap_or(256);
        if let Some(m) = &r.memory_mb {
            if *m.get_ref() < 16 || *m.get_ref() > 4096 {
                errors.push(ctx.at(
                    m.span().start,
                    &format!("plugins.{name}.memory_mb must be between 16 and 4096"),
                    None,
                ));
            }
        }
        let mut bounded = |key: &str, v: &Option<Spanned<u64>>, default: u64, min: u64, max: u64| -> u64 {
            match v {
                Some(v) if *v.get_ref() < min || *v.get_ref() > max => {
                    errors.push(ctx.at(
                        v.span().start,
                        &format!("plugins.{name}.{key} must be between {min} and {max}"),
                        None,
                    ));
                    default
                }
                Some(v) => *v.get_ref(),
                None => default,
            }
        };
        let output_rows =
            bounded("max_output_rows", &r.max_output_rows, Limits::DEFAULT_OUTPUT_ROWS, 1, u32::MAX as u64);
        let output_mb = bounded("max_output_mb", &r.max_output_mb, Limits::DEFAULT_OUTPUT_MB, 1, 4096);
        let log_kb = bounded("max_log_kb", &r.max_log_kb, Limits::DEFAULT_LOG_KB as u64, 0, 1 << 20);
        let state_mb = bounded("state_mb", &r.state_mb, Limits::DEFAULT_STATE_MB, 1, 1 << 20);
        let timeout_ms = r.timeout_ms.as_ref().map(|t| *t.get_ref()).unwrap_or(10_000);
        if let Some(t) = &r.timeout_ms {
            if *t.get_ref() == 0 || *t.get_ref() > 3_600_000 {
                errors.push(ctx.at(
                    t.span().start,
                    &format!("plugins.{name}.timeout_ms must be between 1 and 3600000"),
                    None,
                ));
            }
        }
        for s in &r.secrets {
            if !secrets.contains_key(s.get_ref()) && !raw.secrets.contains_key(s.get_ref()) {
                errors.push(ctx.at(
                    s.span().start,
                    &format!("plugin `{name}` is granted secret `{}`, which is not declared", s.get_ref()),
                    Some(&format!("declare it: [secrets] {} = {{ env = \"...\" }}", s.get_ref())),
                ));
            }
        }
        let (allowed_hosts, files, headers) = parse_grants(ctx, base, name, r, secrets, errors);
        plugins.insert(
            name.clone(),
            Plugin {
                name: name.clone(),
                path,
                sha256: r.sha256.as_ref().map(|s| s.get_ref().trim().to_lowercase()),
                memory_bytes: memory_mb << 20,
                timeout: Duration::from_millis(timeout_ms),
                output_rows,
                output_bytes: output_mb << 20,
                log_bytes: (log_kb as usize) << 10,
                state_bytes: state_mb << 20,
                secrets: r.secrets.iter().map(|s| s.get_ref().clone()).collect(),
                allowed_hosts,
                files,
                headers,
                line: ctx.line_col(p.span().start).0,
            },
        );
    }
    plugins
}

/// A plugin's grants: `allowed_hosts`, `files` and `headers`.
fn parse_grants(
    ctx: &Ctx<'_>,
    base: &Path,
    name: &str,
    r: &RawPlugin,
    secrets: &BTreeMap<String, SecretRef>,
    errors: &mut Vec<Diagnostic>,
) -> (Vec<crate::plugin::grants::Origin>, Vec<crate::plugin::grants::FileGrant>, Vec<HeaderGrant>) {
    use crate::plugin::grants::{FileGrant, Origin};
    let mut hosts = Vec::new();
    for h in &r.allowed_hosts {
        match Origin::parse(h.get_ref()) {
            Ok(o) => hosts.push(o),
            Err(e) => errors.push(ctx.at(
                h.span().start,
                &format!("plugins.{name}.allowed_hosts: {e}"),
                Some("allowed_hosts = [\"https://api.example.com\", \"http://127.0.0.1:*\"]"),
            )),
        }
    }
    let mut files: Vec<FileGrant> = Vec::new();
    for f in &r.files {
        let g = f.get_ref();
        let at = f.span().start;
        if g.read_only == Some(false) {
            errors.push(ctx.at(
                at,
                &format!("plugins.{name}.files: only read-only folders can be granted"),
                Some("set read_only = true (or leave it out); a plugin's output goes through weir, not to files"),
            ));
        }
        let host = base.join(&g.path);
        if !host.is_dir() {
            errors.push(ctx.at(at, &format!("plugins.{name}.files: {} is not a folder", host.display()), None));
            continue;
        }
        let dir_name = g.name.clone().or_else(|| {
            std::fs::canonicalize(&host).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        });
        let Some(dir_name) =
            dir_name.filter(|n| !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\\']) && n.len() <= 64)
        else {
            errors.push(ctx.at(
                at,
                &format!("plugins.{name}.files: give the folder a plain `name` (it is seen as /files/NAME)"),
                None,
            ));
            continue;
        };
        let guest = format!("/files/{dir_name}");
        if files.iter().any(|f| f.guest == guest) {
            errors.push(ctx.at(
                at,
                &format!("plugins.{name}.files: two folders would both be {guest}"),
                Some("give one a different `name`"),
            ));
            continue;
        }
        files.push(FileGrant { host, guest });
    }
    let mut headers = Vec::new();
    for (header, h) in &r.headers {
        let g = h.get_ref();
        let at = h.span().start;
        let fail = |m: String, hint: Option<&str>| ctx.at(at, &format!("plugins.{name}.headers.{header}: {m}"), hint);
        match http::HeaderName::from_bytes(header.as_bytes()) {
            Ok(n)
                if matches!(n.as_str(), "host" | "content-length" | "transfer-encoding" | "connection" | "upgrade") =>
            {
                errors.push(fail("the host sets this header itself".into(), None))
            }
            Ok(_) => {}
            Err(_) => errors.push(fail("not a valid header name".into(), None)),
        }
        if hosts.is_empty() && r.allowed_hosts.is_empty() {
            errors.push(fail(
                "headers go only to granted origins, and none are granted".into(),
                Some("add allowed_hosts = [\"https://...\"]"),
            ));
        }
        if !secrets.contains_key(&g.secret) {
            errors.push(fail(
                format!("secret `{}` is not declared", g.secret),
                Some(&format!("declare it: [secrets] {} = {{ env = \"...\" }}", g.secret)),
            ));
        }
        let template = g.template.clone().unwrap_or_else(|| "{}".into());
        if template.matches("{}").count() != 1 {
            errors.push(fail(
                "the template must hold `{}` exactly once, where the secret goes".into(),
                Some("template = \"Bearer {}\""),
            ));
        }
        let origin = match g.origin.as_deref().map(Origin::parse) {
            None => None,
            Some(Ok(o)) if hosts.contains(&o) => Some(o),
            Some(Ok(o)) => {
                errors.push(fail(format!("origin {o} is not in allowed_hosts"), None));
                None
            }
            Some(Err(e)) => {
                errors.push(fail(e, None));
                None
            }
        };
        headers.push(HeaderGrant { name: header.clone(), secret: g.secret.clone(), template, origin });
    }
    (hosts, files, headers)
}

/// Two steps writing one place would overwrite each other; publishing replaces an output
/// directory whole, so it may not hold a source's files or anything weir did not write.
fn check_outputs(path: &Path, sources: &BTreeMap<String, Source>, steps: &[Step], errors: &mut Vec<Diagnostic>) {
    let mut outputs: HashMap<PathBuf, &str> = HashMap::new();
    for s in steps {
        if let Some(o) = &s.output {
            let at = |message: String, hint: &str| Diagnostic {
                file: path.to_path_buf(),
                line: s.line,
                column: 1,
                message,
                hint: Some(hint.into()),
            };
            for src in sources.values() {
                let read = literal_prefix(Path::new(&src.path));
                if lexical(&read).starts_with(lexical(&o.path)) {
                    errors.push(at(
                        format!(
                            "steps.{}.output.path {} holds the files of sources.{}: publishing would replace them",
                            s.name,
                            o.path.display(),
                            src.name
                        ),
                        "write the output somewhere else",
                    ));
                }
            }
            let usable = match (o.format, &o.remote) {
                (_, Some(_)) => Ok(()),
                (OutputFormat::Parquet, None) => replaceable_output(&o.path),
                (OutputFormat::Delta, None) => delta_output(&o.path),
            };
            if let Err(what) = usable {
                errors.push(at(
                    format!("steps.{}.output.path {} {what}", s.name, o.path.display()),
                    "publishing replaces the whole directory: give the step a path of its own, or move what is there",
                ));
            }
            if let Some(other) = outputs.insert(o.path.clone(), &s.name) {
                errors.push(Diagnostic {
                    file: path.to_path_buf(),
                    line: s.line,
                    column: 1,
                    message: format!("steps `{other}` and `{}` both write {}", s.name, o.path.display()),
                    hint: Some("give each step its own output path".into()),
                });
            }
        }
    }
}

/// `[steps.*]`: inputs, transforms, outputs and checks, in file order.
fn parse_steps(
    ctx: &Ctx<'_>,
    base: &Path,
    raw: &RawFile,
    sources: &BTreeMap<String, Source>,
    (step_retry, source_retry): (&BTreeMap<String, Retry>, &BTreeMap<String, Retry>),
    secrets: &BTreeMap<String, SecretRef>,
    errors: &mut Vec<Diagnostic>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    if raw.steps.is_empty() {
        errors.push(ctx.at(
            raw.pipeline.span().start,
            "the pipeline has no steps",
            Some("add a [steps.<name>] table with an input and an output"),
        ));
    }
    for (name, s) in &raw.steps {
        let r = s.get_ref();
        let input = r.input.get_ref();
        if !sources.contains_key(input) && !raw.steps.contains_key(input) {
            let known: Vec<&String> = raw.sources.keys().chain(raw.steps.keys()).collect();
            errors.push(ctx.at(
                r.input.span().start,
                &format!("step `{name}` reads `{input}`, which is neither a source nor a step"),
                Some(&format!("known sources and steps: {}", join(&known))),
            ));
        }
        if sources.contains_key(input) && raw.steps.contains_key(input) {
            errors.push(ctx.at(
                r.input.span().start,
                &format!("`{input}` is both a source and a step; rename one"),
                None,
            ));
        }
        let mut transforms = Vec::new();
        for t in &r.transforms {
            let plugin = t.get_ref().plugin.get_ref();
            if !raw.plugins.contains_key(plugin) {
                let known: Vec<&String> = raw.plugins.keys().collect();
                errors.push(ctx.at(
                    t.get_ref().plugin.span().start,
                    &format!("step `{name}` uses plugin `{plugin}`, which is not declared"),
                    Some(&if known.is_empty() {
                        format!("declare it: [plugins.{plugin}] path = \"...wasm\"")
                    } else {
                        format!("declared plugins: {}", join(&known))
                    }),
                ));
            }
            let json = weir_sdk::config::toml_to_json(&toml::Value::Table(t.get_ref().config.clone()));
            transforms.push(TransformRef {
                plugin: plugin.clone(),
                config_json: json.to_string(),
                line: ctx.line_col(t.span().start).0,
            });
        }
        let output = r.output.as_ref().map(|o| {
            let _ = o.format;
            if let Some(p) = &o.partition_by {
                if p.get_ref().is_empty() {
                    errors.push(ctx.at(p.span().start, "partition_by is empty", None));
                }
            }
            let compression = match &o.compression {
                None => Codec::default(),
                Some(c) => Codec::parse(c.get_ref()).unwrap_or_else(|message| {
                    errors.push(ctx.at(c.span().start, &message, None));
                    Codec::default()
                }),
            };
            let at = o.path.span().start;
            let remote = parse_remote(ctx, base, name, o, secrets, errors);
            match o.mode {
                OutputMode::Merge if o.key.is_empty() => errors.push(ctx.at(
                    at,
                    &format!("steps.{name}.output: mode = \"merge\" needs a `key`"),
                    Some("key = [\"id\"]: the columns that identify a row"),
                )),
                OutputMode::Merge => {}
                _ if !o.key.is_empty() || o.delete_when.is_some() || o.sequence_by.is_some() => errors.push(ctx.at(
                    at,
                    &format!("steps.{name}.output: `key`, `delete_when` and `sequence_by` apply to mode = \"merge\" only"),
                    None,
                )),
                OutputMode::OverwritePartitions if o.partition_by.is_none() => errors.push(ctx.at(
                    at,
                    &format!("steps.{name}.output: mode = \"overwrite_partitions\" needs `partition_by`"),
                    Some("partition_by = \"day\": the run replaces the partitions its rows fall in"),
                )),
                _ => {}
            }

            if let (Some(p), true) = (&o.partition_by, o.key.iter().any(|k| o.partition_by.as_ref().is_some_and(|p| p.get_ref() == k))) {
                errors.push(ctx.at(
                    p.span().start,
                    &format!("steps.{name}.output: the partition column `{}` cannot be part of the merge key", p.get_ref()),
                    Some("a key identifies a row wherever it lives: a row whose partition changed moves, the old one is removed"),
                ));
            }
            Output {
                path: match &remote {
                    // the run's staging and the quarantine stay on this machine
                    Some((_, local)) => local.clone(),
                    None => base.join(o.path.get_ref()),
                },
                remote: remote.map(|(r, _)| r),
                partition_by: o.partition_by.as_ref().map(|p| p.get_ref().clone()),
                row_group_size: o.row_group_size.unwrap_or(1 << 20).max(1024),
                compression,
                copy_columns: o.copy_columns.unwrap_or(true),
                format: o.format,
                mode: o.mode,
                key: o.key.clone(),
                delete_when: o.delete_when.as_ref().map(|d| (d.get_ref().column.clone(), d.get_ref().value.clone())),
                sequence_by: o.sequence_by.as_ref().map(|c| c.get_ref().clone()),
            }
        });
        let retry = step_retry.get(name).or_else(|| source_retry.get(input)).copied().unwrap_or(Retry::NONE);
        let mut checks = Vec::new();
        for c in &r.checks {
            if let Some((key, allowed)) = misplaced_check_key(c.get_ref()) {
                let at = find_key(ctx.text, c.span(), key).unwrap_or(c.span().start);
                errors.push(ctx.at(
                    at,
                    &format!("steps.{name}.checks: `{key}` does not belong on a `{}` check", c.get_ref().check),
                    Some(&format!("a `{}` check takes {allowed}", c.get_ref().check)),
                ));
                continue;
            }
            match parse_check(c.get_ref(), base) {
                Ok(mut check) => {
                    check.line = ctx.line_col(c.span().start).0;
                    if let crate::quality::Kind::Relationships { target: crate::quality::RelTarget::Step(t), .. } =
                        &check.kind
                    {
                        if !raw.steps.contains_key(t) {
                            errors.push(ctx.at(
                                c.span().start,
                                &format!("check `{}` refers to step `{t}`, which does not exist", check.name),
                                None,
                            ));
                        }
                    }
                    if let crate::quality::Kind::Plugin { plugin, .. } = &check.kind {
                        if !raw.plugins.contains_key(plugin) {
                            errors.push(ctx.at(
                                c.span().start,
                                &format!("check `{}` uses plugin `{plugin}`, which is not declared", check.name),
                                Some(&format!("declare it: [plugins.{plugin}] path = \"...wasm\"")),
                            ));
                        }
                    }
                    if checks.iter().any(|x: &crate::quality::Check| x.name == check.name) {
                        errors.push(ctx.at(
                            c.span().start,
                            &format!("two checks of step `{name}` are named `{}`", check.name),
                            Some("give one a `name`"),
                        ));
                    }
                    checks.push(check);
                }
                Err((message, hint)) => {
                    errors.push(ctx.at(c.span().start, &format!("steps.{name}.checks: {message}"), hint.as_deref()))
                }
            }
        }
        steps.push(Step {
            name: name.clone(),
            input: input.clone(),
            transforms,
            output,
            line: ctx.line_col(s.span().start).0,
            retry,
            checks,
        });
    }
    steps
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        (line, column)
    }

    fn at(&self, offset: usize, message: &str, hint: Option<&str>) -> Diagnostic {
        let (line, column) = self.line_col(offset);
        Diagnostic {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.to_string(),
            hint: hint.map(str::to_string),
        }
    }
}

fn join(names: &[&String]) -> String {
    if names.is_empty() {
        "(none)".into()
    } else {
        names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    }
}

fn hint_for_parse_error(message: &str) -> Option<String> {
    if message.contains("unknown field") {
        Some("check the spelling; the README's pipeline reference lists every key".into())
    } else if message.contains("invalid type") {
        Some("check the value's type (quoted text, number, true/false, [list] or {table})".into())
    } else if message.contains("missing field") {
        Some("add the missing key".into())
    } else {
        None
    }
}

/// Order steps so each comes after the step it reads; report a cycle with the line of one
/// of its steps.
fn order_steps(steps: Vec<Step>) -> Result<Vec<Step>, (Vec<String>, usize)> {
    let by_name: HashMap<&str, &Step> = steps.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut done: Vec<String> = Vec::new();
    for s in &steps {
        let mut chain: Vec<&str> = Vec::new();
        let mut cur = Some(s);
        while let Some(step) = cur {
            if done.iter().any(|d| d == &step.name) {
                break;
            }
            if let Some(pos) = chain.iter().position(|c| *c == step.name) {
                let mut cycle: Vec<String> = chain[pos..].iter().map(|c| c.to_string()).collect();
                cycle.push(step.name.clone());
                cycle.reverse();
                return Err((cycle, step.line));
            }
            chain.push(&step.name);
            cur = by_name.get(step.input.as_str()).copied();
        }
        for name in chain.into_iter().rev() {
            if !done.iter().any(|d| d == name) {
                done.push(name.to_string());
            }
        }
    }
    let mut map: HashMap<String, Step> = steps.into_iter().map(|s| (s.name.clone(), s)).collect();
    Ok(done.into_iter().filter_map(|n| map.remove(&n)).collect())
}

/// A source column's declared type: a type name (see [`weir_sdk::util::parse_type_name`]),
/// `list<TYPE>`, or `struct<NAME: TYPE, ...>`, nested as deep as needed (every part nullable).
pub fn column_type(text: &str) -> std::result::Result<DataType, String> {
    nested_type(text, 0)
}

/// The part of a source path before its first pattern (`*`, `?`, `[`, `{partition}`).
fn literal_prefix(path: &Path) -> PathBuf {
    path.components().take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[', '{'])).collect()
}

/// `path` without `.` components and with `..` applied where it can be (no file system).
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether publishing may replace what is at an output path: nothing, or a directory of
/// what weir writes there (Parquet files, `key=value` partition folders, hidden names).
/// A file, or a folder holding anything else (a typo naming a data folder), is refused
/// rather than swapped away and deleted. Only the top level is looked at.
fn replaceable_output(path: &Path) -> std::result::Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(m) => m,
    };
    if !meta.is_dir() {
        return Err("exists and is not a directory".into());
    }
    let Ok(entries) = std::fs::read_dir(path) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let ours = name.starts_with('.')
            || name.starts_with("_weir")
            || (is_dir && name.contains('='))
            || (!is_dir && name.ends_with(".parquet"));
        if !ours {
            return Err(format!("holds `{name}`, which is not part of a dataset weir wrote"));
        }
    }
    Ok(())
}

/// `path = "s3://bucket/prefix"`: the remote table and the local folder its runs stage in
/// (`.weir/remote/BUCKET/PREFIX` beside the pipeline file); `storage` says how to reach it.
fn parse_remote(
    ctx: &Ctx<'_>,
    base: &Path,
    step: &str,
    o: &RawOutput,
    secrets: &BTreeMap<String, SecretRef>,
    errors: &mut Vec<Diagnostic>,
) -> Option<(Remote, PathBuf)> {
    let at = o.path.span().start;
    let Some(rest) = o.path.get_ref().strip_prefix("s3://") else {
        if let Some(st) = &o.storage {
            errors.push(ctx.at(
                st.span().start,
                &format!("steps.{step}.output.storage applies to an s3:// path"),
                Some("path = \"s3://bucket/prefix\""),
            ));
        }
        return None;
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    let bad =
        |m: &str| ctx.at(at, &format!("steps.{step}.output.path: {m}"), Some("path = \"s3://bucket/prefix/table\""));
    if bucket.is_empty() || prefix.is_empty() || prefix.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
        errors.push(bad("an s3:// path names a bucket and a prefix for the table"));
        return None;
    }
    if o.format != OutputFormat::Delta && o.mode == OutputMode::Merge {
        errors.push(ctx.at(
            at,
            &format!("steps.{step}.output: mode = \"merge\" on a Parquet folder on object storage is not supported"),
            Some("merge into a Delta table there: format = \"delta\""),
        ));
        return None;
    }
    let url = format!("s3://{bucket}/{prefix}/");
    let remote = storage_remote(ctx, at, &format!("steps.{step}.output"), url, o.storage.as_ref(), secrets, errors);
    Some((remote, base.join(".weir/remote").join(bucket).join(prefix)))
}

/// How to reach `url`, from a `storage` table (its credentials are names in [secrets]).
fn storage_remote(
    ctx: &Ctx<'_>,
    at: usize,
    what: &str,
    url: String,
    storage: Option<&Spanned<RawStorage>>,
    secrets: &BTreeMap<String, SecretRef>,
    errors: &mut Vec<Diagnostic>,
) -> Remote {
    let mut secret = |name: &Option<String>, key: &str| -> Option<SecretRef> {
        let n = name.as_ref()?;
        match secrets.get(n) {
            Some(s) => Some(s.clone()),
            None => {
                errors.push(ctx.at(
                    at,
                    &format!("{what}.storage.{key}: no secret `{n}` in [secrets]"),
                    Some(&format!("[secrets] {n} = {{ env = \"...\" }} or {{ file = \"...\" }}")),
                ));
                None
            }
        }
    };
    let st = storage.map(|s| s.get_ref());
    Remote {
        url,
        endpoint: st.and_then(|s| s.endpoint.clone()),
        region: st.and_then(|s| s.region.clone()),
        path_style: st.and_then(|s| s.path_style),
        allow_http: st.and_then(|s| s.allow_http),
        access_key_id: st.and_then(|s| secret(&s.access_key_id, "access_key_id")),
        secret_access_key: st.and_then(|s| secret(&s.secret_access_key, "secret_access_key")),
    }
}

/// A file source at `s3://bucket/pattern`: the bucket, the key pattern and the local copy.
fn parse_remote_files(
    ctx: &Ctx<'_>,
    base: &Path,
    name: &str,
    r: &RawSource,
    raw_path: &str,
    secrets: &BTreeMap<String, SecretRef>,
    errors: &mut Vec<Diagnostic>,
) -> Option<RemoteFiles> {
    let at = r.path.as_ref().map(|p| p.span().start).unwrap_or(0);
    let Some(rest) = raw_path.strip_prefix("s3://") else {
        if let Some(st) = &r.storage {
            errors.push(ctx.at(st.span().start, &format!("sources.{name}.storage applies to an s3:// path"), None));
        }
        return None;
    };
    let (bucket, pattern) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || pattern.is_empty() || pattern.split('/').any(|p| p == "." || p == "..") {
        errors.push(ctx.at(
            at,
            &format!("sources.{name}.path: an s3:// path names a bucket and a key, prefix or pattern"),
            Some("path = \"s3://bucket/raw/orders_*.csv\""),
        ));
        return None;
    }
    let store = storage_remote(
        ctx,
        at,
        &format!("sources.{name}"),
        format!("s3://{bucket}/"),
        r.storage.as_ref(),
        secrets,
        errors,
    );
    Some(RemoteFiles { store, pattern: pattern.to_string(), cache: base.join(".weir/remote-cache").join(bucket) })
}

/// A Delta output's path: nothing yet, a Delta table, or a folder holding only what weir
/// writes (Parquet files, `key=value` folders: a first commit's files linked before its log).
fn delta_output(path: &Path) -> std::result::Result<(), String> {
    if path.join("_delta_log").is_dir() {
        return Ok(());
    }
    replaceable_output(path).map_err(|e| format!("is not a Delta table (no _delta_log) and {e}"))
}

impl Output {
    /// Whether the run's staging is completed with the published data before the switch
    /// (append and merge on a Parquet folder; a Delta table's commit adds and removes).
    pub fn folds_published(&self) -> bool {
        self.format == OutputFormat::Parquet
            && self.remote.is_none()
            && matches!(self.mode, OutputMode::Append | OutputMode::Merge)
    }

    /// A merge into a Delta table: the run's rows are reduced by key in the step; the
    /// table's files holding its keys are rewritten at the commit, on the version it commits
    /// over.
    pub fn merges_table(&self) -> bool {
        self.format == OutputFormat::Delta && self.mode == OutputMode::Merge
    }
}

/// The longest CSV record or JSON line read by default, in MiB.
pub const DEFAULT_MAX_RECORD_MB: u64 = 64;

/// Types nest at most this deep (the parser recurses once per level).
const MAX_TYPE_DEPTH: usize = 32;

fn nested_type(text: &str, depth: usize) -> std::result::Result<DataType, String> {
    use arrow_schema::{Field, Fields};
    let t = text.trim();
    if depth > MAX_TYPE_DEPTH {
        return Err(format!("types nest at most {MAX_TYPE_DEPTH} levels deep"));
    }
    let inner = |prefix: &str| {
        let lower = t.get(..prefix.len()).map(str::to_ascii_lowercase);
        (lower.as_deref() == Some(prefix) && t.ends_with('>')).then(|| &t[prefix.len()..t.len() - 1])
    };
    if let Some(item) = inner("list<") {
        return Ok(DataType::List(std::sync::Arc::new(Field::new("item", nested_type(item, depth + 1)?, true))));
    }
    if let Some(body) = inner("struct<") {
        let mut fields: Vec<Field> = Vec::new();
        for part in split_top_level(body) {
            let Some((name, ty)) = part.split_once(':') else {
                return Err(format!("`{}` in `{t}` is not NAME: TYPE", part.trim()));
            };
            let name = name.trim();
            if name.is_empty() || fields.iter().any(|f| f.name() == name) {
                return Err(format!("struct field names must be present and distinct in `{t}`"));
            }
            fields.push(Field::new(name, nested_type(ty, depth + 1)?, true));
        }
        if fields.is_empty() {
            return Err(format!("`{t}` has no fields"));
        }
        return Ok(DataType::Struct(Fields::from(fields)));
    }
    weir_sdk::util::parse_type_name(t).ok_or_else(|| format!("unknown type `{t}`"))
}

/// `a: int64, b: struct<c: string, d: list<int64>>` split at the commas outside `<>` and `()`.
fn split_top_level(body: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in body.char_indices() {
        match c {
            '<' | '(' => depth += 1,
            '>' | ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests;
