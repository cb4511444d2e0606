//! weir-bench: the benchmark harness.
//!
//! `weir-bench run --rows 10000000` generates a seeded `events` table (Parquet, zstd), runs
//! four transform workloads (W1 PII mask, W2 filter + cast, W3 dedup, W4 group-by) and five
//! ingest workloads (I1 CSV, I2 JSON lines, I3 gzip CSV, I4 nested JSON lines, I5 gzip JSON
//! lines, each to Parquet) with every runner
//! (weir with its Wasm plugins, native arrow-rs, DuckDB, Polars, pandas), checks that every
//! runner's output has the same order-insensitive checksum as the native one before its time
//! counts, and prints a table (median wall time, rows/s, peak RSS, ratios). `--check-only`
//! runs each once on small data and only compares outputs (the test suite does this).

use std::cell::Cell;
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arrow_array::builder::{BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use clap::{Parser, Subcommand};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use sha2::{Digest, Sha256};
use weir::config::Codec;
use weir::cpu_clock::CpuTime;

mod ingest;
mod per_record;
#[cfg(feature = "stores")]
mod stores;

/// The HMAC key every runner uses for W1.
const KEY: &[u8] = b"bench-key";
/// Transform workloads (W), then ingest workloads (I, see ingest.rs).
const WORKLOADS: [&str; 9] = ["W1", "W2", "W3", "W4", "I1", "I2", "I3", "I4", "I5"];
const BATCH: usize = 64 * 1024;

#[derive(Parser)]
#[command(name = "weir-bench", about = "weir's benchmark harness: weir vs native vs DuckDB, Polars, pandas")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write the seeded events table.
    Generate {
        #[arg(long, default_value_t = 10_000_000)]
        rows: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Run one workload natively (arrow-rs, one thread): the floor for weir's design.
    Native {
        #[arg(long)]
        workload: String,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = Codec::Zstd(1), value_parser = parse_codec)]
        compression: Codec,
        /// Write the CPU seconds of each phase (read + decode Parquet, the workload's logic,
        /// write Parquet) here as JSON.
        #[arg(long)]
        timings: Option<PathBuf>,
    },
    /// Run W1 or W2 through the per-record Wasm transform (one component call per row).
    PerRecord {
        #[arg(long)]
        workload: String,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// The component [default: dist/bench/record.wasm].
        #[arg(long)]
        plugin: Option<PathBuf>,
        #[arg(long, default_value_t = Codec::Zstd(1), value_parser = parse_codec)]
        compression: Codec,
    },
    /// Print the order-insensitive checksum of a Parquet file or dataset directory.
    Checksum { path: PathBuf },
    /// weir's keyed state against fjall and redb, past a memory budget (`--features stores`).
    #[cfg(feature = "stores")]
    Stores {
        /// weir (spilling at the budget), weir-memory (no budget), fjall or redb.
        #[arg(long)]
        store: String,
        /// set (which keys are new) or sum (a sum per key, read back at the end).
        #[arg(long)]
        workload: String,
        #[arg(long, default_value_t = 10_000_000)]
        rows: usize,
        #[arg(long, default_value_t = 8_000_000)]
        keys: u64,
        #[arg(long, default_value_t = 64)]
        budget_mb: usize,
        #[arg(long, default_value = "target/bench/stores")]
        dir: PathBuf,
    },
    /// Plugin start-up: compile (empty cache) vs load from the cache, per first-party plugin,
    /// timed through `weir plugin inspect` (median of 5). Appends to --report if given.
    Startup {
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Run the workloads with every runner and report.
    Run {
        /// Rows of the events table, one scale or several comma-separated (the targets are
        /// judged at 10M and 40M: `--rows 10000000,40000000`); a table per scale.
        #[arg(long, value_delimiter = ',', default_values_t = [10_000_000usize])]
        rows: Vec<usize>,
        /// Timed repetitions per runner (the median counts).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Workloads, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = WORKLOADS.map(String::from))]
        workloads: Vec<String>,
        /// Runners, comma-separated: weir, native, per-record (W1 and W2 only), duckdb,
        /// duckdb-sha256, polars, pandas.
        #[arg(long, value_delimiter = ',', default_values_t = ["weir", "native", "per-record", "duckdb", "duckdb-sha256", "polars", "pandas"].map(String::from))]
        runners: Vec<String>,
        /// Where data and outputs go.
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Run each runner once and only compare outputs (no report).
        #[arg(long)]
        check_only: bool,
        /// Write the markdown report here (and JSON beside it).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Output compression of every runner: zstd(N), snappy or none. The targets are
        /// judged at zstd(1), weir's default; other codecs show how much of a ratio is the
        /// codec's (the input stays zstd).
        #[arg(long, default_value_t = Codec::Zstd(1), value_parser = parse_codec)]
        compression: Codec,
    },
}

/// How every runner compresses its output: weir's own `output.compression`, parsed as the
/// pipeline file's is (with the harness's shorter message).
fn parse_codec(text: &str) -> std::result::Result<Codec, String> {
    Codec::parse(text)
        .map_err(|_| format!("unknown compression `{text}`: use zstd(N) with N from 1 to 22, snappy or none"))
}

fn main() -> Result<()> {
    // the native and per-record runners get the same heap settings as weir
    weir::malloc_tuning::tune();
    match Cli::parse().command {
        Cmd::Generate { rows, out, seed } => generate(rows, &out, seed),
        Cmd::Native { workload, input, output, compression, timings } => {
            let phases = native(&workload, &input, &output, compression)?;
            if let Some(path) = timings {
                std::fs::write(&path, phases.to_string()).with_context(|| format!("write {}", path.display()))?;
            }
            Ok(())
        }
        Cmd::PerRecord { workload, input, output, plugin, compression } => {
            let plugin = plugin.unwrap_or_else(|| workspace_root().join("dist/bench/record.wasm"));
            per_record::run(&workload, &plugin, &input, &output, KEY, compression)
        }
        #[cfg(feature = "stores")]
        Cmd::Stores { store, workload, rows, keys, budget_mb, dir } => {
            stores::run(&store, &workload, rows, keys, budget_mb, &dir)
        }
        Cmd::Checksum { path } => {
            let (rows, sum) = checksum(&path)?;
            println!("{rows} {sum:016x}");
            Ok(())
        }
        Cmd::Startup { report } => {
            if let Some(p) = &report {
                report_dir(p)?;
            }
            startup(report.as_deref())
        }
        Cmd::Run { rows, repeat, workloads, runners, dir, check_only, report, compression } => {
            // (before the runs: a report that cannot be written must not cost a long run)
            if let Some(p) = &report {
                report_dir(p)?;
            }
            let opts = RunOpts { repeat, workloads, runners, dir, check_only, compression };
            let mut all = Vec::new();
            let mut failed = 0;
            for r in &rows {
                let (results, f) = run(*r, &opts)?;
                all.extend(results);
                failed += f;
            }
            if !check_only {
                let md = render(&rows, &all, compression);
                println!("{md}");
                if let Some(path) = report {
                    std::fs::write(&path, &md).with_context(|| format!("write {}", path.display()))?;
                    let json = path.with_extension("json");
                    std::fs::write(&json, serde_json::to_string_pretty(&all)?)
                        .with_context(|| format!("write {}", json.display()))?;
                }
            }
            if failed > 0 {
                bail!("{failed} runner outputs differ from the native output");
            }
            Ok(())
        }
    }
}

// ------------------------------------------------------------------------------------------
// Data

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Int64, false),
        Field::new("user_id", DataType::Int64, false),
        Field::new("email", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("country", DataType::Utf8, false),
        Field::new("category", DataType::Int32, false),
        Field::new("amount", DataType::Float64, false),
        Field::new("ts", DataType::Utf8, false),
        Field::new("flag", DataType::Boolean, false),
    ]))
}

/// Writer settings of the generator and the native runner: weir's output defaults (zstd
/// level 1 unless told otherwise, row groups of 1Mi rows). The peers are told the same codec.
fn props(codec: Codec) -> WriterProperties {
    WriterProperties::builder().set_compression(codec.parquet()).set_max_row_group_row_count(Some(1 << 20)).build()
}

fn generate(rows: usize, out: &Path, seed: u64) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension("tmp");
    let schema = events_schema();
    let mut w = ArrowWriter::try_new(File::create(&tmp)?, schema.clone(), Some(props(Codec::Zstd(1))))?;
    let mut rng = Rng(seed);
    let users = (rows / 10).clamp(1, 1_000_000) as u64;
    let mut i = 0usize;
    while i < rows {
        let n = BATCH.min(rows - i);
        let (mut ev, mut us, mut em, mut na, mut co) = (
            Int64Builder::new(),
            Int64Builder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        let (mut ca, mut am, mut ts, mut fl) =
            (Int32Builder::new(), Float64Builder::new(), StringBuilder::new(), BooleanBuilder::new());
        for k in 0..n {
            let row = (i + k) as u64;
            // about 10% of event ids repeat an earlier one
            let id = if row > 0 && rng.next().is_multiple_of(10) { rng.next() % row } else { row };
            let user = rng.next() % users;
            ev.append_value(id as i64);
            us.append_value(user as i64);
            em.append_value(format!("user{user}.{}@example.com", rng.next() % 1000));
            na.append_value(format!("Name {}", rng.next() % 10_000));
            co.append_value(format!("C{:03}", rng.next() % 200));
            ca.append_value((rng.next() % 50) as i32);
            am.append_value((rng.next() % 100_000) as f64 / 100.0);
            let secs = 1_704_067_200 + (rng.next() % (365 * 86_400)) as i64;
            let t = weir::store::format_time(secs * 1000);
            ts.append_value(format!("{}T{}", &t[..10], &t[11..19]));
            fl.append_value(rng.next() & 1 == 1);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(ev.finish()),
            Arc::new(us.finish()),
            Arc::new(em.finish()),
            Arc::new(na.finish()),
            Arc::new(co.finish()),
            Arc::new(ca.finish()),
            Arc::new(am.finish()),
            Arc::new(ts.finish()),
            Arc::new(fl.finish()),
        ];
        w.write(&RecordBatch::try_new(schema.clone(), cols)?)?;
        i += n;
    }
    w.close()?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

fn read_batches(path: &Path) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    read_columns(path, None)
}

/// Read only `columns` (all when none), as a user of arrow-rs would.
fn read_columns(path: &Path, columns: Option<&[&str]>) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f)?.with_batch_size(BATCH);
    let builder = match columns {
        None => builder,
        Some(cols) => {
            let roots: Vec<usize> = builder
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| cols.contains(&f.name().as_str()))
                .map(|(i, _)| i)
                .collect();
            let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), roots);
            builder.with_projection(mask)
        }
    };
    Ok(builder.build()?.map(|b| b.map_err(Into::into)))
}

/// The columns W2 reads (the six it keeps) and W4 reads.
const W2_COLUMNS: [&str; 6] = ["event_id", "user_id", "country", "category", "amount", "ts"];
const W4_COLUMNS: [&str; 2] = ["user_id", "amount"];

// ------------------------------------------------------------------------------------------
// Native runners: the same logic in plain arrow-rs

const W2_COUNTRIES: usize = 100; // C000..C099: half of them

/// Adds the CPU time each `next` of `batches` takes (reading and decoding Parquet) to `spent`.
fn timed<'a, T>(mut batches: impl Iterator<Item = T> + 'a, spent: &'a Cell<f64>) -> impl Iterator<Item = T> + 'a {
    std::iter::from_fn(move || {
        let t = CpuTime::now();
        let next = batches.next();
        spent.set(spent.get() + t.elapsed_secs());
        next
    })
}

/// Runs one workload natively; returns the CPU seconds of its phases (one thread, so each
/// phase's CPU time is its whole cost): reading and decoding Parquet, the workload's logic,
/// encoding and writing Parquet.
fn native(workload: &str, input: &Path, output: &Path, compression: Codec) -> Result<serde_json::Value> {
    let started = CpuTime::now();
    let (read, written) = (Cell::new(0.0), Cell::new(0.0));
    let mut writer: Option<ArrowWriter<File>> = None;
    let mut write = |b: RecordBatch| -> Result<()> {
        let t = CpuTime::now();
        if writer.is_none() {
            writer = Some(ArrowWriter::try_new(File::create(output)?, b.schema(), Some(props(compression)))?);
        }
        writer.as_mut().expect("created").write(&b)?;
        written.set(written.get() + t.elapsed_secs());
        Ok(())
    };
    // the workloads below read through these, which add their decoding time to `read`
    let read_batches = |input: &Path| read_batches(input).map(|b| timed(b, &read));
    let read_columns = |input: &Path, columns: Option<&[&str]>| read_columns(input, columns).map(|b| timed(b, &read));
    match workload {
        w if ingest::is_ingest(w) => {
            for b in timed(ingest::read(w, input)?, &read) {
                write(b?)?;
            }
        }
        "W1" => {
            for b in read_batches(input)? {
                let b = b?;
                let email = b.column(2).as_string::<i32>();
                let offsets: Vec<u32> = email.value_offsets().iter().map(|o| *o as u32).collect();
                let hex = weir_sdk::hashing::hash_strings(Some(KEY), &offsets, email.value_data())
                    .map_err(anyhow::Error::msg)?;
                let n = email.len();
                let hashed: arrow_array::StringArray =
                    (0..n).map(|i| Some(std::str::from_utf8(&hex[i * 64..(i + 1) * 64]).unwrap_or(""))).collect();
                let mut cols = b.columns().to_vec();
                cols[2] = Arc::new(hashed);
                cols[3] = arrow_array::new_null_array(&DataType::Utf8, n);
                write(RecordBatch::try_new(b.schema(), cols)?)?;
            }
        }
        "W2" => {
            let keep: HashSet<String> = (0..W2_COUNTRIES).map(|c| format!("C{c:03}")).collect();
            let schema = w2_schema();
            for b in read_columns(input, Some(&W2_COLUMNS))? {
                let b = b?;
                let col = |n: &str| b.schema().index_of(n).map(|i| b.column(i).clone());
                let amount = col("amount")?;
                let amount = amount.as_primitive::<Float64Type>();
                let country = col("country")?;
                let country = country.as_string::<i32>();
                let mask: BooleanArray = (0..b.num_rows())
                    .map(|r| Some(amount.value(r) > 400.0 && keep.contains(country.value(r))))
                    .collect();
                let f = arrow_select::filter::filter_record_batch(&b, &mask)?;
                let fc = |n: &str| f.schema().index_of(n).map(|i| f.column(i).clone());
                let cols: Vec<ArrayRef> = vec![
                    fc("event_id")?,
                    fc("user_id")?,
                    fc("country")?,
                    arrow_cast::cast(&fc("category")?, &DataType::Int64)?,
                    fc("amount")?,
                    // the cast plugin's parser (fixed-width forms first), so the ratio measures the sandbox
                    weir_sdk::temporal::cast_column(
                        fc("ts")?.as_ref(),
                        &DataType::Timestamp(TimeUnit::Microsecond, None),
                        &Default::default(),
                    )?,
                ];
                write(RecordBatch::try_new(schema.clone(), cols)?)?;
            }
        }
        "W3" => {
            // the same key set as the dedup plugin, so the ratio measures the sandbox only
            let mut seen = weir_sdk::intset::IntSet::new();
            for b in read_batches(input)? {
                let b = b?;
                let ids = b.column(0).as_primitive::<Int64Type>();
                let mask: BooleanArray = ids.values().iter().map(|id| Some(seen.insert(*id))).collect();
                write(arrow_select::filter::filter_record_batch(&b, &mask)?)?;
            }
        }
        "W4" => {
            // the same group table as the aggregate plugin
            let mut index = weir_sdk::intset::IntMap::new();
            let (mut keys, mut sums, mut counts, mut gids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for b in read_columns(input, Some(&W4_COLUMNS))? {
                let b = b?;
                let users = b.column(0).as_primitive::<Int64Type>();
                let amounts = b.column(1).as_primitive::<Float64Type>();
                gids.clear();
                index.get_or_insert_all(users.values(), keys.len() as u32, &mut gids, |u| {
                    keys.push(u);
                    sums.push(0.0);
                    counts.push(0i64);
                });
                for (&g, a) in gids.iter().zip(amounts.values().iter()) {
                    let g = g as usize;
                    sums[g] += a;
                    counts[g] += 1;
                }
            }
            let avg: Vec<f64> = sums.iter().zip(&counts).map(|(s, c)| s / *c as f64).collect();
            let schema = Arc::new(Schema::new(vec![
                Field::new("user_id", DataType::Int64, false),
                Field::new("amount_sum", DataType::Float64, true),
                Field::new("n", DataType::Int64, false),
                Field::new("amount_avg", DataType::Float64, true),
            ]));
            write(RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(Int64Array::from(keys)),
                    Arc::new(Float64Array::from(sums)),
                    Arc::new(Int64Array::from(counts)),
                    Arc::new(Float64Array::from(avg)),
                ],
            )?)?;
        }
        other => bail!("unknown workload {other}"),
    }
    if let Some(w) = writer {
        let t = CpuTime::now();
        w.close()?;
        written.set(written.get() + t.elapsed_secs());
    }
    let total = started.elapsed_secs();
    let (read, write) = (read.get(), written.get());
    Ok(serde_json::json!({"read": read, "compute": (total - read - write).max(0.0), "write": write}))
}

fn w2_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Int64, false),
        Field::new("user_id", DataType::Int64, false),
        Field::new("country", DataType::Utf8, false),
        Field::new("category", DataType::Int64, false),
        Field::new("amount", DataType::Float64, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
    ]))
}

// ------------------------------------------------------------------------------------------
// Checksums: equal row multisets give equal sums, whatever the order, file split or writer

fn cell(array: &dyn Array, row: usize) -> String {
    if array.is_null(row) {
        return "\u{2205}".into();
    }
    match array.data_type() {
        DataType::Float64 => float_cell(array.as_primitive::<Float64Type>().value(row)),
        DataType::Float32 => float_cell(array.as_primitive::<arrow_array::types::Float32Type>().value(row) as f64),
        DataType::Timestamp(_, _) => {
            let t = arrow_cast::cast(&array.slice(row, 1), &DataType::Timestamp(TimeUnit::Microsecond, None)).ok();
            t.map(|t| t.as_primitive::<arrow_array::types::TimestampMicrosecondType>().value(0).to_string())
                .unwrap_or_default()
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let s = arrow_cast::cast(&array.slice(row, 1), &DataType::Utf8).ok();
            s.map(|s| s.as_string::<i32>().value(0).to_string()).unwrap_or_default()
        }
        _ => arrow_cast::display::ArrayFormatter::try_new(array, &Default::default())
            .map(|f| f.value(row).to_string())
            .unwrap_or_default(),
    }
}

/// A float as 1e-4 units: first rounded to 1e-9 (dropping the noise of a different
/// summation order), then half away from zero, so engines that add in another order agree.
fn float_cell(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let nano = (v * 1e9).round() as i128;
    let q = (nano + nano.signum() * 50_000) / 100_000;
    q.to_string()
}

fn parquet_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
    } else if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let p = e.path();
            let hidden = e.file_name().to_string_lossy().starts_with('.');
            if p.is_dir() && !hidden {
                parquet_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
}

/// (rows, wrapping sum over rows of the first 8 bytes of sha256(row text)); columns in name
/// order, values normalised (floats to 4 decimals, timestamps to microseconds).
fn checksum(path: &Path) -> Result<(u64, u64)> {
    let mut files = Vec::new();
    parquet_files(path, &mut files);
    if files.is_empty() {
        bail!("no Parquet output at {}", path.display());
    }
    let (mut rows, mut sum) = (0u64, 0u64);
    for f in files {
        for b in read_batches(&f)? {
            let b = b?;
            let schema = b.schema();
            let mut order: Vec<usize> = (0..b.num_columns()).collect();
            order.sort_by(|x, y| schema.field(*x).name().cmp(schema.field(*y).name()));
            for r in 0..b.num_rows() {
                let mut h = Sha256::new();
                for &c in &order {
                    h.update(schema.field(c).name().as_bytes());
                    h.update(b"=");
                    h.update(cell(b.column(c).as_ref(), r).as_bytes());
                    h.update(b"\x1f");
                }
                let d = h.finalize();
                sum = sum.wrapping_add(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")));
                rows += 1;
            }
        }
    }
    Ok((rows, sum))
}

// ------------------------------------------------------------------------------------------
// The harness

fn weir_pipeline(
    workload: &str,
    input: &Path,
    output: &Path,
    plugins: &Path,
    key: &Path,
    compression: Codec,
) -> String {
    let transforms = match workload {
        "W1" => r#"[[steps.out.transforms]]
plugin = "mask"
config.columns = { email = { method = "hmac", secret = "key" }, name = { method = "null" } }"#
            .to_string(),
        "W2" => {
            let countries: Vec<String> = (0..W2_COUNTRIES).map(|c| format!("\"C{c:03}\"")).collect();
            format!(
                r#"[[steps.out.transforms]]
plugin = "filter"
config.where = [{{ column = "amount", op = ">", value = 400.0 }}, {{ column = "country", op = "in", values = [{}] }}]

[[steps.out.transforms]]
plugin = "cast"
config.columns = [
  {{ column = "event_id" }}, {{ column = "user_id" }}, {{ column = "country" }},
  {{ column = "category", type = "int64" }}, {{ column = "amount" }}, {{ column = "ts", type = "timestamp" }},
]"#,
                countries.join(", ")
            )
        }
        "W3" => "[[steps.out.transforms]]\nplugin = \"dedup\"\nconfig = { key = [\"event_id\"], keep = \"first\" }".into(),
        _ => r#"[[steps.out.transforms]]
plugin = "aggregate"
config.group_by = ["user_id"]
config.aggregates = [{ fn = "sum", column = "amount", as = "amount_sum" }, { fn = "count", as = "n" }, { fn = "avg", column = "amount", as = "amount_avg" }]"#
            .into(),
    };
    let p = |name: &str| plugins.join(format!("{name}.wasm")).display().to_string();
    let columns = match workload {
        "W2" => format!("columns = [{}]", W2_COLUMNS.map(|c| format!("\"{c}\"")).join(", ")),
        "W4" => format!("columns = [{}]", W4_COLUMNS.map(|c| format!("\"{c}\"")).join(", ")),
        _ => String::new(),
    };
    // ingest: the raw file with its columns declared, and no transform
    let (source, transforms) = if ingest::is_ingest(workload) {
        (ingest::weir_source(workload, input), String::new())
    } else {
        (format!("format = \"parquet\"\npath = \"{}\"\n{columns}", input.display()), transforms)
    };
    format!(
        r#"[pipeline]
name = "bench_{workload}"
checkpoint_every = 0
state = "state-{workload}.db"

[secrets]
key = {{ file = "{key}" }}

[sources.events]
{source}

[plugins.mask]
path = "{mask}"
secrets = ["key"]
[plugins.filter]
path = "{filter}"
[plugins.cast]
path = "{cast}"
[plugins.dedup]
path = "{dedup}"
memory_mb = 4096
[plugins.aggregate]
path = "{aggregate}"
memory_mb = 4096
timeout_ms = 600000

[steps.out]
input = "events"
output = {{ path = "{output}", compression = "{compression}" }}

{transforms}
"#,
        key = key.display(),
        output = output.display(),
        mask = p("mask"),
        filter = p("filter"),
        cast = p("cast"),
        dedup = p("dedup"),
        aggregate = p("aggregate"),
    )
}

struct Measure {
    seconds: f64,
    max_rss_kb: i64,
}

/// Run a command to completion; wall time and the child's peak RSS.
fn measure(cmd: &mut Command) -> Result<Measure> {
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on a child we spawned, with valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    std::mem::forget(child); // reaped by wait4
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && matches!(libc::WEXITSTATUS(status), 0 | 3)) {
        bail!("{cmd:?} failed (status {status})");
    }
    Ok(Measure { seconds, max_rss_kb: usage.ru_maxrss })
}

struct RunOpts {
    repeat: usize,
    workloads: Vec<String>,
    runners: Vec<String>,
    dir: PathBuf,
    check_only: bool,
    compression: Codec,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// Every runner on every workload at one scale: the results and how many outputs differed.
fn run(rows: usize, opts: &RunOpts) -> Result<(Vec<serde_json::Value>, usize)> {
    let RunOpts { repeat, workloads, runners, dir, check_only, compression } = opts;
    let (repeat, check_only, compression) = (*repeat, *check_only, *compression);
    let root = workspace_root();
    let dir = if dir.is_absolute() { dir.to_path_buf() } else { root.join(dir) };
    std::fs::create_dir_all(&dir)?;
    let input = dir.join(format!("events-{rows}.parquet"));
    if !input.exists() {
        eprintln!("weir-bench: generating {rows} rows -> {}", input.display());
        generate(rows, &input, 42)?;
    }
    let me = std::env::current_exe()?;
    let weir_bin = me
        .parent()
        .map(|p| p.join("weir"))
        .filter(|p| p.exists())
        .context("the weir binary next to weir-bench (cargo build --release -p weir)")?;
    let plugins = root.join("dist/plugins");
    let key = dir.join("key");
    std::fs::write(&key, KEY)?;
    let python = std::env::var("WEIR_PYTHON").unwrap_or_else(|_| "python3".into());
    let peers = root.join("bench/peers.py");
    let repeat = if check_only { 1 } else { repeat.max(1) };

    let mut results = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    for w in workloads {
        let mut expected: Option<(u64, u64)> = None;
        // native first: it is the reference checksum
        let mut order: Vec<&String> = runners.iter().filter(|r| *r == "native").collect();
        order.extend(runners.iter().filter(|r| *r != "native"));
        // per-record transforms are written for W1 and W2; ingest is weir, native, DuckDB
        // and Polars (pandas and DuckDB's sha256 variant add nothing there)
        order.retain(|r| *r != "per-record" || matches!(w.as_str(), "W1" | "W2"));
        if ingest::is_ingest(w) {
            order.retain(|r| !matches!(r.as_str(), "pandas" | "duckdb-sha256"));
        }
        let input = if ingest::is_ingest(w) { ingest::prepare(w, &input)? } else { input.clone() };
        // Rounds: every runner once per round, so a slow spell of this shared machine falls on
        // several runners' timings rather than on all of one runner's
        let mut times = vec![Vec::new(); order.len()];
        let mut rss = vec![0; order.len()];
        let mut split = serde_json::Value::Null;
        let mut native_split = serde_json::Value::Null;
        for round in 0..repeat {
            for (i, runner) in order.iter().enumerate() {
                let out = dir.join(format!("out-{w}-{runner}"));
                let _ = std::fs::remove_dir_all(&out);
                let _ = std::fs::remove_file(&out);
                let m = match runner.as_str() {
                    "native" => {
                        let phases = dir.join(format!("native-{w}.json"));
                        let m = measure(
                            Command::new(&me)
                                .args(["native", "--workload", w, "--input"])
                                .arg(&input)
                                .arg("--output")
                                .arg(out.with_extension("parquet"))
                                .arg(format!("--compression={compression}"))
                                .arg("--timings")
                                .arg(&phases),
                        )?;
                        // the CPU seconds of its phases, for the shared-work bound in the report
                        native_split = serde_json::from_str(&std::fs::read_to_string(&phases)?)
                            .with_context(|| format!("the native runner's timings {}", phases.display()))?;
                        m
                    }
                    "per-record" => measure(
                        Command::new(&me)
                            .args(["per-record", "--workload", w, "--input"])
                            .arg(&input)
                            .arg("--output")
                            .arg(out.with_extension("parquet"))
                            .arg("--plugin")
                            .arg(root.join("dist/bench/record.wasm"))
                            .arg(format!("--compression={compression}")),
                    )?,
                    "weir" => {
                        let toml = dir.join(format!("pipeline-{w}.toml"));
                        std::fs::write(&toml, weir_pipeline(w, &input, &out, &plugins, &key, compression))?;
                        let _ = std::fs::remove_file(dir.join(format!("state-{w}.db")));
                        // untimed: `validate` loads every plugin, so a plugin rebuilt since the
                        // last run is compiled into the cache here, not inside the timing
                        // (cold start is measured by `weir-bench startup`)
                        let warm = Command::new(&weir_bin)
                            .args(["validate"])
                            .arg(&toml)
                            .env("WEIR_CACHE_DIR", dir.join("cache"))
                            .output()?;
                        if !warm.status.success() {
                            bail!("weir validate {}: {}", toml.display(), String::from_utf8_lossy(&warm.stderr));
                        }
                        let summary = dir.join(format!("summary-{w}.json"));
                        let m = measure(
                            Command::new(&weir_bin)
                                .args(["run", "--quiet", "--force", "--json"])
                                .arg(&toml)
                                .env("WEIR_CACHE_DIR", dir.join("cache"))
                                .stdout(File::create(&summary)?),
                        )?;
                        // the time split of the run (CPU seconds per stage)
                        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)
                            .with_context(|| format!("weir's --json summary {}", summary.display()))?;
                        split = v["steps"][0]["timings"].clone();
                        m
                    }
                    peer => measure(
                        Command::new(&python)
                            .arg(&peers)
                            .args([peer, w])
                            .arg(&input)
                            .arg(out.with_extension("parquet"))
                            .arg(compression.to_string())
                            .env("POLARS_MAX_THREADS", "2"),
                    )?,
                };
                if repeat > 1 {
                    eprintln!("weir-bench: {w} round {}/{repeat} {runner:<14} {:>8.3} s", round + 1, m.seconds);
                }
                times[i].push(m.seconds);
                rss[i] = rss[i].max(m.max_rss_kb);
            }
        }
        for (i, runner) in order.iter().enumerate() {
            let out = dir.join(format!("out-{w}-{runner}"));
            let (times, rss) = (&times[i], rss[i]);
            let produced =
                if out.with_extension("parquet").exists() { out.with_extension("parquet") } else { out.clone() };
            let sum = checksum(&produced)?;
            let comparable = runner.as_str() != "duckdb-sha256"; // sha256 is not HMAC: the nearest built-in, not the same output
            let ok = match (&expected, comparable) {
                (None, _) => {
                    expected = Some(sum);
                    true
                }
                (Some(e), true) => *e == sum,
                (Some(_), false) => true,
            };
            if comparable {
                if ok {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
            // `times` stays in round order (the JSON shows drift across rounds); the median
            // comes from a sorted copy
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[sorted.len() / 2];
            eprintln!(
                "weir-bench: {w} {runner:<14} {median:>8.3} s  rss {:>6} MB  rows {}  {}",
                rss / 1024,
                sum.0,
                if !comparable {
                    "(not comparable)"
                } else if ok {
                    "checksum ok"
                } else {
                    "CHECKSUM MISMATCH"
                }
            );
            let timings = match runner.as_str() {
                "weir" => split.clone(),
                "native" => native_split.clone(),
                _ => serde_json::Value::Null,
            };
            results.push(serde_json::json!({"rows": rows, "workload": w, "runner": runner, "seconds": median, "all_seconds": times, "compression": compression.to_string(), "rows_per_s": rows as f64 / median, "max_rss_mb": rss / 1024, "output_rows": sum.0, "checksum": format!("{:016x}", sum.1), "checksum_ok": ok, "comparable": comparable, "timings": timings}));
        }
    }
    println!("bench: {rows} rows: {passed} passed, {failed} failed");
    Ok((results, failed))
}

fn startup(report: Option<&Path>) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let me = std::env::current_exe()?;
    let weir_bin =
        me.parent().map(|p| p.join("weir")).filter(|p| p.exists()).context("the weir binary next to weir-bench")?;
    let mut md = String::from(
        "\n## Plugin start-up\n\nMedian of 5. Compile: `weir plugin inspect` on an empty cache (process included). \
         Cached start: the same command again, whole process; and inside it, as `weir plugin inspect --json` \
         reports it, load (digest lookup, compiled code from the cache, contract check, pre-instantiation) \
         and instantiate (a fresh store and instance, as each step does).\n\n\
         | plugin | size MB | compile (empty cache) s | cached start, process ms | load ms | instantiate ms | load + instantiate ms |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut verdicts = Vec::new();
    for name in ["mask", "filter", "cast", "dedup", "aggregate"] {
        let wasm = root.join(format!("dist/plugins/{name}.wasm"));
        let size = std::fs::metadata(&wasm).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
        let (mut cold, mut warm, mut load, mut inst) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..5 {
            let cache = std::env::temp_dir().join(format!("weir-bench-startup-{}-{name}-{i}", std::process::id()));
            let _ = std::fs::remove_dir_all(&cache);
            let json_out = cache.with_extension("json");
            let inspect = |json: bool| -> Result<Command> {
                let mut c = Command::new(&weir_bin);
                c.args(["plugin", "inspect"]).arg(&wasm).env("WEIR_CACHE_DIR", &cache);
                if json {
                    c.arg("--json").stdout(File::create(&json_out)?);
                } else {
                    c.stdout(std::process::Stdio::null());
                }
                Ok(c)
            };
            cold.push(measure(&mut inspect(false)?)?.seconds);
            warm.push(measure(&mut inspect(false)?)?.seconds);
            measure(&mut inspect(true)?)?;
            let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_out)?)?;
            let ms = |key: &str| info["start"][key].as_f64().map(|s| s * 1e3).context("start timings in --json");
            load.push(ms("load_secs")?);
            inst.push(ms("instantiate_secs")?);
            let _ = std::fs::remove_dir_all(&cache);
            let _ = std::fs::remove_file(&json_out);
        }
        let both: Vec<f64> = load.iter().zip(&inst).map(|(l, i)| l + i).collect();
        verdicts.push(format!(
            "- {name}: cached start {:.1} ms (target <= 10 ms): {}\n",
            median(&mut both.clone()),
            verdict(median(&mut both.clone()) <= 10.0)
        ));
        md.push_str(&format!(
            "| {name} | {size:.1} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            median(&mut cold),
            median(&mut warm) * 1e3,
            median(&mut load),
            median(&mut inst),
            median(&mut both.clone()),
        ));
    }
    md.push_str("\nTarget: cached start (load + instantiate) <= 10 ms; compile once per plugin version (the cache key is the file's sha256 and the engine's settings).\n\n");
    md.push_str(&verdicts.concat());
    println!("{md}");
    if let Some(p) = report {
        let mut text = std::fs::read_to_string(p).unwrap_or_default();
        text.push_str(&md);
        std::fs::write(p, text).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

/// Create the folder a report goes to, naming it if that fails.
fn report_dir(report: &Path) -> Result<()> {
    match report.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create {} for the report {}", dir.display(), report.display())),
        None => Ok(()),
    }
}

/// Seconds of `runner` on `workload` at `rows`, if it ran.
/// One runner's result on one workload at one scale.
fn result<'a>(
    results: &'a [serde_json::Value],
    rows: usize,
    workload: &str,
    runner: &str,
) -> Option<&'a serde_json::Value> {
    results.iter().find(|x| x["rows"] == rows && x["workload"] == workload && x["runner"] == runner)
}

fn secs(results: &[serde_json::Value], rows: usize, workload: &str, runner: &str) -> Option<f64> {
    result(results, rows, workload, runner)?["seconds"].as_f64()
}

fn rss(results: &[serde_json::Value], rows: usize, workload: &str, runner: &str) -> Option<f64> {
    result(results, rows, workload, runner)?["max_rss_mb"].as_f64()
}

/// Runners are limited to this many threads.
const THREADS: f64 = 2.0;

/// The native runner's CPU seconds (read, logic, write) of the last timed run.
fn native_phases(results: &[serde_json::Value], rows: usize, workload: &str) -> Option<(f64, f64, f64)> {
    let t = &result(results, rows, workload, "native")?["timings"];
    Some((t["read"].as_f64()?, t["compute"].as_f64()?, t["write"].as_f64()?))
}

/// Native's work spread over every thread a runner may use, with nothing lost: what weir
/// would take if it did exactly native's work (same reader, writer and logic) and the
/// sandbox and the hand-offs between its threads cost nothing.
fn ideal(results: &[serde_json::Value], rows: usize, workload: &str) -> Option<f64> {
    native_phases(results, rows, workload).map(|(r, c, w)| (r + c + w) / THREADS)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn render(scales: &[usize], results: &[serde_json::Value], compression: Codec) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mut md = String::new();
    for &rows in scales {
        md.push_str(&format!(
            "## {rows} rows\n\nMachine: {cores} cores, {cpu}. Median of the timed runs (runs taken in rounds: every runner once per round), with the fastest and slowest; every output's checksum equals native's unless marked. Every runner writes Parquet with {compression}.\n\n| workload | runner | seconds | min – max s | rows/s | peak RSS MB | vs native | output ok |\n|---|---|---:|---:|---:|---:|---:|---|\n"
        ));
        for r in results.iter().filter(|r| r["rows"] == rows) {
            let w = r["workload"].as_str().unwrap_or("");
            let s = r["seconds"].as_f64();
            let all: Vec<f64> =
                r["all_seconds"].as_array().map(|v| v.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
            let range = match (all.iter().copied().reduce(f64::min), all.iter().copied().reduce(f64::max)) {
                (Some(lo), Some(hi)) => format!("{lo:.2} – {hi:.2}"),
                _ => "–".into(),
            };
            md.push_str(&format!(
                "| {w} | {} | {:.3} | {range} | {:.0} | {} | {} | {} |\n",
                r["runner"].as_str().unwrap_or(""),
                s.unwrap_or(f64::NAN),
                r["rows_per_s"].as_f64().unwrap_or(0.0),
                r["max_rss_mb"],
                ratio(s, secs(results, rows, w, "native")),
                if r["comparable"] == false {
                    "n/a (sha256, not HMAC)"
                } else if r["checksum_ok"] == true {
                    "yes"
                } else {
                    "NO"
                }
            ));
        }
        md.push_str("\nRatios (wall time; below 1 means weir is faster; per-batch speed-up = per-record time / weir time):\n\n| workload | weir / native | weir / DuckDB | weir / Polars | weir / pandas | per-batch speed-up |\n|---|---:|---:|---:|---:|---:|\n");
        for w in WORKLOADS {
            let weir = secs(results, rows, w, "weir");
            if weir.is_none() {
                continue;
            }
            md.push_str(&format!(
                "| {w} | {} | {} | {} | {} | {} |\n",
                ratio(weir, secs(results, rows, w, "native")),
                ratio(weir, secs(results, rows, w, "duckdb")),
                ratio(weir, secs(results, rows, w, "polars")),
                ratio(weir, secs(results, rows, w, "pandas")),
                ratio(secs(results, rows, w, "per-record"), weir),
            ));
        }
        md.push_str("\nWhere weir's time went (`weir run --json`, CPU seconds per stage of the last timed run; stages run on their own threads, in parallel). Boundary = host IPC encode + copy in + guest IPC decode + guest IPC encode + copy out + host validation of the output.\n\n| workload | read + decode the input | host encode | copy in | guest decode | guest compute | guest encode | copy out | validate | write Parquet | boundary share of CPU |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in results.iter().filter(|r| r["rows"] == rows && r["runner"] == "weir") {
            let t = &r["timings"];
            let Some(plugins) = t["plugins"].as_array() else { continue };
            // (a fold from +0.0: an empty float sum is -0.0, shown as "-0.00" for ingest rows)
            let sum = |k: &str| plugins.iter().filter_map(|p| p[k].as_f64()).fold(0.0, |a, b| a + b);
            let (read, write) = (t["read"].as_f64().unwrap_or(0.0), t["write"].as_f64().unwrap_or(0.0));
            let boundary = sum("host_encode")
                + sum("copy_in")
                + sum("guest_decode")
                + sum("guest_encode")
                + sum("copy_out")
                + sum("host_decode");
            let total = read
                + write
                + boundary
                + sum("guest_compute")
                + sum("guest_unsplit")
                + t["checks"].as_f64().unwrap_or(0.0);
            md.push_str(&format!(
                "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1}% |\n",
                r["workload"].as_str().unwrap_or(""),
                read,
                sum("host_encode"),
                sum("copy_in"),
                sum("guest_decode"),
                sum("guest_compute") + sum("guest_unsplit"),
                sum("guest_encode"),
                sum("copy_out"),
                sum("host_decode"),
                write,
                100.0 * boundary / total.max(1e-9),
            ));
        }
        if WORKLOADS.iter().any(|w| native_phases(results, rows, w).is_some()) {
            md.push_str("\nThe native runner's time split (CPU seconds of its one thread, last timed run). Half of its total is what weir would take doing exactly native's work on its two threads with the sandbox free and no thread ever waiting: the reference the 10x targets below are set against.\n\n| workload | read + decode the input | workload logic | write Parquet | total | total / 2 |\n|---|---:|---:|---:|---:|---:|\n");
            for w in WORKLOADS {
                if let Some((r, c, wr)) = native_phases(results, rows, w) {
                    let total = r + c + wr;
                    md.push_str(&format!(
                        "| {w} | {r:.2} | {c:.2} | {wr:.2} | {total:.2} | {:.2} |\n",
                        total / THREADS
                    ));
                }
            }
        }
        md.push_str(&format!("\nTargets at {rows} rows (computed from the tables above):\n\n"));
        if compression != Codec::Zstd(1) {
            md.push_str(&format!(
                "(A diagnostic run: outputs written with {compression}. The targets are judged at zstd(1), weir's default.)\n\n"
            ));
        }
        let s = |w: &str, r: &str| secs(results, rows, w, r);
        let mut line = |text: String| md.push_str(&format!("- {text}\n"));
        for (w, limit) in [("W1", 1.2), ("W2", 1.15), ("W3", 1.5), ("W4", 1.5)] {
            if let (Some(a), Some(b)) = (s(w, "weir"), s(w, "native")) {
                line(format!("{w}: weir / native {:.2}x (target <= {limit}x): {}", a / b, verdict(a / b <= limit)));
            }
        }
        if let (Some(a), Some(b)) = (s("W1", "weir"), s("W1", "duckdb-sha256")) {
            line(format!("W1: weir {a:.2} s vs DuckDB built-in sha256 {b:.2} s (weir faster): {}", verdict(a < b)));
        }
        // what the same speed-up would be at native's work over both threads (see above)
        let at_ideal = |w: &str, other: f64| match ideal(results, rows, w) {
            Some(i) => format!(" (at native's work over two threads, {i:.2} s, it would be {:.1}x)", other / i),
            None => String::new(),
        };
        for udf in ["duckdb", "polars", "pandas"] {
            if let (Some(a), Some(b)) = (s("W1", "weir"), s("W1", udf)) {
                line(format!(
                    "W1: weir {:.1}x faster than the {udf} Python-UDF path (target >= 10x): {}{}",
                    b / a,
                    verdict(b / a >= 10.0),
                    at_ideal("W1", b)
                ));
            }
        }
        for w in ["W1", "W2"] {
            if let (Some(a), Some(b)) = (s(w, "weir"), s(w, "per-record")) {
                line(format!(
                    "{w}: per-batch weir {:.1}x faster than the per-record Wasm runner (target >= 10x): {}{}",
                    b / a,
                    verdict(b / a >= 10.0),
                    at_ideal(w, b)
                ));
            }
        }
        for w in ingest::WORKLOADS {
            if let (Some(a), Some(b)) = (s(w, "weir"), s(w, "duckdb")) {
                line(format!(
                    "{w}: weir {a:.2} s vs DuckDB {b:.2} s (target: at or under DuckDB): {}",
                    verdict(a <= b)
                ));
            }
        }
        for w in WORKLOADS {
            if let (Some(a), Some(b)) = (s(w, "weir"), s(w, "pandas")) {
                line(format!("{w}: weir {:.1}x faster than pandas (target >= 3x): {}", b / a, verdict(b / a >= 3.0)));
            }
        }
        for w in WORKLOADS {
            if let Some(m) = rss(results, rows, w, "weir") {
                line(format!("{w}: weir peak RSS {m:.0} MB (target < 1024 MB): {}", verdict(m < 1024.0)));
            }
        }
        md.push('\n');
    }
    if let (Some(&small), Some(&large)) = (scales.iter().min(), scales.iter().max()) {
        if large > small {
            md.push_str(&format!(
                "## Peak RSS, {small} vs {large} rows\n\nTarget: weir's peak RSS at the larger scale within 20% of the smaller one, and under 1 GiB.\n\n| workload | runner | RSS MB at {small} | RSS MB at {large} | growth | verdict |\n|---|---|---:|---:|---:|---|\n"
            ));
            for w in WORKLOADS {
                for runner in ["weir", "native"] {
                    if let (Some(a), Some(b)) = (rss(results, small, w, runner), rss(results, large, w, runner)) {
                        let v = if runner == "weir" { verdict(b <= a * 1.2 && b < 1024.0) } else { "" };
                        md.push_str(&format!("| {w} | {runner} | {a:.0} | {b:.0} | {:.2}x | {v} |\n", b / a));
                    }
                }
            }
            md.push('\n');
        }
    }
    md
}
