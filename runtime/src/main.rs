//! The `weir` command line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use tracing_subscriber::filter::{LevelFilter, Targets};
use weir::config::Pipeline;
use weir::engine::{self, Level, Progress, RunOptions, RunSummary};
use weir::plugin::PluginEngine;

const EXIT_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;
const EXIT_WARNINGS: u8 = 3;

/// weir runs data pipelines whose transforms are sandboxed WebAssembly plugins.
///
/// A pipeline is one TOML file: sources (CSV, JSON lines, Parquet, Avro files; PostgreSQL tables), plugins (.wasm
/// components), and steps that read a source or an earlier step, apply plugins in order,
/// and write a Parquet dataset. Outputs are staged and published only when every step
/// succeeds.
///
/// Exit codes: 0 success; 1 the run failed (plugin, data, I/O, or a blocking quality
/// check); 2 the pipeline file or the command line is invalid; 3 success with warnings (a
/// `warn` check failed, or rows were quarantined beyond a check's tolerance).
///
/// Lineage: with `[lineage]` in the pipeline file or WEIR_OPENLINEAGE_URL set
/// (`file://events.jsonl` or `http://host:5000/api/v1/lineage`; WEIR_OPENLINEAGE_NAMESPACE
/// names the jobs' namespace), runs, steps and backfills emit OpenLineage events.
#[derive(Parser)]
#[command(
    name = "weir",
    version,
    propagate_version = true,
    after_help = "Start with: weir validate examples/orders/pipeline.toml && weir run examples/orders/pipeline.toml"
)]
struct Cli {
    /// Log level: error, warn, info, debug or trace [default: $WEIR_LOG, else info; warn
    /// with `run --quiet`]. Plugins' log lines keep their own levels (stdout as info,
    /// stderr as warn) and have their own target: `info,weir::plugin=warn` logs weir at info
    /// and plugins at warn, `weir::plugin=off` silences plugins (weir's notes about them
    /// stay).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log lines as `text` (the message alone) or `json` (one object a line: timestamp,
    /// level, message), on stderr.
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// SIGINT and SIGTERM stop weir as before (the run store's lease and `--resume` recover
/// the run), but first the runs in progress send their OpenLineage ABORT. The signals are
/// blocked in every thread and taken by one thread with `sigwait`, so nothing runs inside
/// a signal handler; that thread then restores the default action and re-raises.
fn abort_lineage_on_signal() {
    // SAFETY: plain libc calls on a signal set owned here, before any other thread starts
    // (threads spawned later inherit the mask).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&set, &mut sig) != 0 {
                return;
            }
            let name = if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
            weir::lineage::abort_active(name);
            libc::signal(sig, libc::SIG_DFL);
            let mut one: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut one);
            libc::sigaddset(&mut one, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
            libc::raise(sig);
        });
    }
}

/// The progress bar on screen, which log lines are written around.
static PROGRESS: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// stderr, with the progress bar (if any) hidden while a log line is written.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf)).map(|_| buf.len()),
            None => std::io::stderr().write_all(buf).map(|_| buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// What `--log-level` / `WEIR_LOG` select: a level (`info`), target directives
/// (`weir::plugin=warn`), or both (`info,weir::plugin=off`). Without a bare level, `default`
/// applies to everything the directives do not name.
fn log_filter(spec: &str, default: Level) -> Result<Targets, String> {
    let mut has_level = false;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            None => {
                part.parse::<Level>().map_err(|_| {
                    format!("unknown log level `{part}`; use error, warn, info, debug or trace, or TARGET=LEVEL")
                })?;
                has_level = true;
            }
            Some((target, level)) => {
                if target.trim().is_empty() || level.trim().parse::<LevelFilter>().is_err() {
                    return Err(format!(
                        "bad log directive `{part}`: write TARGET=LEVEL (e.g. weir::plugin=warn; LEVEL may be off)"
                    ));
                }
            }
        }
    }
    // empty parts are dropped: tracing reads an empty directive as `error` for everything
    let mut parts: Vec<String> = spec.split(',').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect();
    if !has_level {
        parts.insert(0, default.to_string());
    }
    // the libraries weir drives log their own steps (the Delta kernel: every snapshot and
    // commit at info, and each failure again at error with a backtrace, which weir reports
    // itself): the kernel is silent and object_store warns, unless a directive names them
    for (quiet, level) in [("delta_kernel", "off"), ("delta_kernel_default_engine", "off"), ("object_store", "warn")] {
        if !parts.iter().any(|p| p.starts_with(quiet)) {
            parts.push(format!("{quiet}={level}"));
        }
    }
    let spec = parts.join(",");
    spec.parse::<Targets>().map_err(|e| format!("bad log directives `{spec}`: {e}"))
}

/// Send log lines through `tracing`, filtered by `filter`, as text or JSON.
fn init_logging(filter: Targets, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let builder =
        tracing_subscriber::fmt().with_max_level(LevelFilter::TRACE).with_writer(|| LogWriter).with_ansi(false);
    let _ = match format {
        LogFormat::Text => builder.without_time().with_level(false).with_target(false).finish().with(filter).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .finish()
            .with(filter)
            .try_init(),
    };
}

/// The `tracing` event for a log line, under a target known at compile time.
macro_rules! event_at {
    ($target:literal, $level:expr, $line:expr) => {
        match $level {
            Level::ERROR => tracing::error!(target: $target, "{}", $line),
            Level::WARN => tracing::warn!(target: $target, "{}", $line),
            Level::INFO => tracing::info!(target: $target, "{}", $line),
            Level::DEBUG => tracing::debug!(target: $target, "{}", $line),
            _ => tracing::trace!(target: $target, "{}", $line),
        }
    };
}

/// One of weir's own log lines (target `weir`).
fn log_line(level: Level, line: &str) {
    event_at!("weir", level, line)
}

/// A line a plugin wrote (target `weir::plugin`).
fn plugin_log_line(level: Level, line: &str) {
    event_at!("weir::plugin", level, line)
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline once and publish its outputs.
    ///
    /// Every step's output is written to a staging directory beside the dataset and
    /// published (moved into place) only when all steps succeeded; a failed run leaves the
    /// published data as it was. Progress is shown on a terminal; one summary line is
    /// printed at the end.
    #[command(
        after_help = "Examples:\n  weir run examples/orders/pipeline.toml\n  weir run pipeline.toml --partition 2024-01-03   # {partition} in source paths\n  weir run pipeline.toml --json | jq .steps"
    )]
    Run(RunArgs),
    /// Run history: status, times, rows per step, plugins and their digests.
    ///
    /// `weir runs` lists runs, newest first; `weir runs show ID` shows one in full, with
    /// what it published. The store is found from --state, $WEIR_STATE, the pipeline file
    /// given with --pipeline, or ./.weir/state.db.
    #[command(
        after_help = "Examples:\n  weir runs --pipeline examples/orders/pipeline.toml\n  weir runs --pipeline examples/orders/pipeline.toml --status FAILED --json\n  weir runs --pipeline examples/orders/pipeline.toml show 12"
    )]
    Runs(RunsArgs),
    /// Run a pipeline once per partition over a range: planned and persisted first, N at a
    /// time, resumable.
    ///
    /// Every output must be partitioned (partition_by) and a source path must use
    /// {partition}. Progress shows partitions done / failed / left. Exit codes as for
    /// `weir run`: 1 (and the backfill PARTIAL) when any partition failed, 3 when every
    /// partition succeeded but some with warnings (each listed), 0 otherwise.
    #[command(
        after_help = "Examples:\n  weir backfill pipeline.toml --from 2024-01-01 --to 2024-03-31 --parallel 2\n  weir backfill pipeline.toml --from 2024-01-01T00 --to 2024-01-01T23 --every hour\n  weir backfill pipeline.toml --partitions eu,us,apac\n  weir backfill pipeline.toml --resume 3                 # partitions not yet successful\n  weir backfill pipeline.toml --resume 3 --only-failed   # just the failed ones"
    )]
    Backfill(BackfillArgs),
    /// Backfills and their partitions.
    Backfills {
        /// A pipeline file (its store and name), or a pipeline name (with --state).
        #[arg(long)]
        pipeline: Option<String>,
        /// Print JSON (with every partition).
        #[arg(long)]
        json: bool,
        /// The run store file.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Quality check results: passed or not, observed value, threshold, failing rows and a
    /// sample, per run, partition, step and check.
    #[command(
        after_help = "Examples:\n  weir checks --pipeline examples/orders/pipeline.toml\n  weir checks --pipeline examples/orders/pipeline.toml --failed --json\n  weir checks --pipeline examples/orders/pipeline.toml --run 12"
    )]
    Checks {
        /// A pipeline file (its store and name), or a pipeline name (with --state).
        #[arg(long)]
        pipeline: Option<String>,
        /// Only this run's results.
        #[arg(long)]
        run: Option<i64>,
        /// Only failed checks.
        #[arg(long)]
        failed: bool,
        /// At most this many results.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The run store file.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// The schemas a source was read with: each version, the run that first saw it, what
    /// the run did with it (taken in, frozen out, stopped), and the differences.
    ///
    /// A run compares the source's columns with the newest schema adopted by an earlier
    /// run; the source's `schema_change` (evolve, freeze, fail; default: take it and log
    /// the change) decides what a difference does.
    #[command(after_help = "Examples:\n  weir schema pipeline.toml orders\n  weir schema pipeline.toml orders --json")]
    Schema {
        /// The pipeline file.
        pipeline: PathBuf,
        /// The source's name (`[sources.NAME]`).
        source: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The run store [default: the pipeline's].
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// The committed watermarks of a pipeline's incremental sources; set or reset one.
    ///
    /// A run of an incremental source reads from its committed watermark, less the
    /// source's overlap, up to the time the run starts; the new watermark is committed in
    /// the same store transaction as the run's decision to publish, never before. Setting
    /// or resetting one by hand is recorded in the audit log (shown here).
    #[command(
        after_help = "Examples:\n  weir watermarks pipeline.toml\n  weir watermarks pipeline.toml set orders 2024-01-01T00:00:00Z   # read again from there\n  weir watermarks pipeline.toml reset orders                       # the next run reads everything\n  weir run pipeline.toml --full-refresh                           # read everything once, commit anew"
    )]
    Watermarks {
        /// The pipeline file.
        pipeline: PathBuf,
        /// `set SOURCE VALUE` or `reset SOURCE`; nothing lists them.
        #[arg(value_parser = ["set", "reset"])]
        action: Option<String>,
        /// The incremental source.
        source: Option<String>,
        /// `set`: the new watermark (an RFC 3339 time for a PostgreSQL source).
        value: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The run store [default: the pipeline's].
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Delta tables weir writes (`output.format = "delta"`): history, vacuum, optimize.
    ///
    /// `history` lists the table's versions, newest first, with the weir run that made each
    /// (pipeline, step, run id) and the files it added and removed. `vacuum` removes data
    /// files the latest version does not reference (files of replaced versions once their
    /// removal is older than the retention, and files a run linked before it crashed short of
    /// its commit); time travel to a version whose files were removed stops working.
    /// `optimize` compacts the small files of each partition (or of `--partition`) into one,
    /// as one version that changes no data.
    #[command(
        after_help = "Examples:\n  weir table history out/orders\n  weir table vacuum out/orders --retention 168h --dry-run\n  weir table vacuum out/orders --retention 0s\n  weir table optimize out/orders --partition day=2024-01-03\n  AWS_ENDPOINT_URL=http://127.0.0.1:9000 weir table optimize s3://lake/orders"
    )]
    Table {
        #[arg(value_parser = ["history", "vacuum", "optimize"])]
        action: String,
        /// The table's folder, or `s3://bucket/prefix` (reached through AWS_ENDPOINT_URL,
        /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP; optimize
        /// copies the files it compacts to a temporary folder and uploads the result).
        path: PathBuf,
        /// optimize: only this partition (`country=NL`, or the value).
        #[arg(long)]
        partition: Option<String>,
        /// optimize: files under this size are compacted, one file per partition.
        #[arg(long, default_value_t = 128)]
        target_mb: u64,
        /// optimize: the compacted files' compression (zstd, zstd(N), snappy, none).
        #[arg(long, default_value = "zstd")]
        compression: String,
        /// vacuum: keep unreferenced files younger than this (`7d`, `168h`, `30m`, `0s`).
        #[arg(long, default_value = "7d")]
        retention: String,
        /// vacuum: list what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Find runs of a pipeline that died (killed, machine lost) and settle them.
    ///
    /// A run that died before deciding to publish is marked FAILED and its staging removed:
    /// the datasets are as they were. A run that died after deciding (every check had
    /// passed, its switches were recorded) is completed: its remaining switches are made
    /// from its staged output and it is recorded SUCCESS with a note, so every dataset ends
    /// up from that one run. `weir run` does this itself before it starts.
    Recover {
        /// The pipeline file.
        pipeline: PathBuf,
        /// The run store [default: the pipeline's].
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Check a pipeline file without running it.
    ///
    /// Reports unknown keys, wrong types, unknown sources/steps/plugins, cycles, missing or
    /// mis-pinned plugin files, each with file:line:col and a hint; then loads every
    /// plugin to check it is a weir component of a supported contract version.
    #[command(after_help = "Example:\n  weir validate examples/orders/pipeline.toml")]
    Validate {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Where compiled plugins are cached.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Work with plugin files.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Serve the HTTP API: trigger and watch runs, backfills and checks; Prometheus /metrics.
    ///
    /// Runs started through the API are the CLI's runs (same run stores, leases and
    /// exclusion). Every path a registered pipeline uses must lie under a --root. Without
    /// tokens the server listens on loopback only. The OpenAPI document is at /openapi.json;
    /// run ids are PIPELINE.N. Stale runs are recovered when the server starts.
    #[command(
        after_help = "Examples:\n  weir serve examples/orders/pipeline.toml\n  weir serve --root /srv/pipelines --listen 0.0.0.0:8080 --token-file /etc/weir/tokens\n  curl -s -XPOST localhost:8080/pipelines/orders/runs -d '{\"partition\": \"2024-01-03\"}'\n  curl -s 'localhost:8080/runs?status=FAILED&limit=20'\n  weir serve --openapi > openapi.json   # print the document and exit"
    )]
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Pipeline files to register at start (more can be registered with POST /pipelines).
    pipelines: Vec<PathBuf>,
    /// Address to listen on (port 0: any free port; the address is logged).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// A directory registered pipelines, their inputs, outputs, plugins and run stores
    /// must lie under (repeatable) [default: the current directory].
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// A file of bearer tokens, one a line (`#` comments). WEIR_SERVE_TOKEN adds one.
    /// Without any, only loopback addresses are allowed.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Runs at once (a backfill counts its parallelism); more are refused with 429.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_runs: u16,
    /// Where registered pipelines are remembered [default: ROOT/.weir/serve-pipelines.json
    /// of the first root].
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Where compiled plugins are cached [default: $WEIR_CACHE_DIR, else ~/.cache/weir].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    openapi: bool,
}

fn cmd_serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.openapi {
        println!("{}", weir::serve::openapi_json());
        return Ok(ExitCode::SUCCESS);
    }
    let mut tokens = Vec::new();
    if let Some(file) = &args.token_file {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        tokens.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
        anyhow::ensure!(!tokens.is_empty(), "{} holds no token", file.display());
    }
    if let Ok(t) = std::env::var("WEIR_SERVE_TOKEN") {
        if !t.trim().is_empty() {
            tokens.push(t.trim().to_string());
        }
    }
    anyhow::ensure!(tokens.iter().all(|t| t.len() >= 16), "bearer tokens must be at least 16 characters");
    let roots = if args.roots.is_empty() { vec![std::env::current_dir()?] } else { args.roots };
    let registry = match args.registry {
        Some(r) => r,
        None => std::fs::canonicalize(&roots[0])
            .with_context(|| format!("root {}", roots[0].display()))?
            .join(".weir/serve-pipelines.json"),
    };
    let pipelines = args.pipelines.iter().map(std::path::absolute).collect::<Result<Vec<_>, _>>()?;
    let config = weir::serve::Config {
        listen: args.listen,
        roots,
        pipelines,
        registry,
        tokens,
        protected: args.token_file.iter().cloned().collect(),
        max_runs: usize::from(args.max_runs),
        cache_dir: args.cache_dir.or_else(PluginEngine::default_cache_dir),
        log: Arc::new(log_line),
        plugin_log: Arc::new(plugin_log_line),
    };
    weir::serve::serve(config, |addr| {
        // the one line on stdout: scripts started with port 0 read the address here
        println!("listening on http://{addr}");
        let _ = std::io::stdout().flush();
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct BackfillArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// First partition: a date (YYYY-MM-DD), or an hour (YYYY-MM-DDTHH) with --every hour.
    #[arg(long, requires = "to")]
    from: Option<String>,
    /// Last partition, included.
    #[arg(long, requires = "from")]
    to: Option<String>,
    /// Partition size for --from/--to: day or hour.
    #[arg(long, default_value = "day")]
    every: String,
    /// Explicit partitions instead of a range, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["from", "to"])]
    partitions: Vec<String>,
    /// Partitions run at the same time.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Resume backfill ID: run its partitions that are not yet successful.
    #[arg(long, conflicts_with_all = ["from", "to", "partitions"])]
    resume: Option<i64>,
    /// With --resume (or alone: the newest backfill), run only the partitions that failed.
    #[arg(long)]
    only_failed: bool,
    /// Run partitions again even if identical runs already published them.
    #[arg(long)]
    force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Where compiled plugins are cached.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The run store [default: the pipeline's].
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = false)]
struct RunsArgs {
    #[command(subcommand)]
    show: Option<RunsCommand>,
    /// A pipeline file (its store and name), or a pipeline name (with --state).
    #[arg(long, global = true)]
    pipeline: Option<String>,
    /// Only runs with this status: RUNNING, SUCCESS, FAILED, CANCELLED (stopped through `weir
    /// serve`), PARTIAL.
    #[arg(long)]
    status: Option<String>,
    /// At most this many runs.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    /// The run store file.
    #[arg(long, global = true)]
    state: Option<PathBuf>,
}

#[derive(Subcommand)]
enum RunsCommand {
    /// One run in full.
    Show {
        /// The run id (first column of `weir runs`).
        id: i64,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Show a plugin's world, contract version, digest, imports and exports.
    ///
    /// The sha256 shown is what a pipeline pins with `sha256 = "..."`.
    #[command(after_help = "Example:\n  weir plugin inspect dist/plugins/mask.wasm")]
    Inspect {
        /// A .wasm component.
        file: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// Where compiled plugins are cached.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Show the compiled-plugin cache: where it is, its entries, its size and limit.
    ///
    /// Each plugin version weir loads is compiled once and kept here. The cache keeps to a
    /// size limit (2048 MB; set WEIR_CACHE_MAX_MB to change it): when a new plugin is
    /// compiled, the entries used longest ago are removed until it fits. `--clear` removes
    /// every compiled entry (the next run of each plugin compiles it again).
    #[command(
        after_help = "Examples:\n  weir plugin cache\n  WEIR_CACHE_MAX_MB=500 weir plugin cache --json\n  weir plugin cache --clear"
    )]
    Cache {
        /// Remove every compiled plugin from the cache.
        #[arg(long)]
        clear: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// The cache directory [default: $WEIR_CACHE_DIR, else ~/.cache/weir].
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // `weir ... | head` should end quietly, as other Unix tools do, not panic on EPIPE.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    weir::malloc_tuning::tune();
    let cli = Cli::parse();
    let quiet = matches!(&cli.command, Command::Run(a) if a.quiet);
    let default = if quiet { Level::WARN } else { Level::INFO };
    let spec = cli.log_level.clone().or_else(|| std::env::var("WEIR_LOG").ok().filter(|v| !v.is_empty()));
    match log_filter(spec.as_deref().unwrap_or(""), default) {
        Ok(filter) => init_logging(filter, cli.log_format),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    }
    if matches!(&cli.command, Command::Run(_) | Command::Backfill(_) | Command::Serve(_)) {
        abort_lineage_on_signal();
    }
    match cli.command {
        Command::Run(args) => cmd_run(args),
        Command::Runs(args) => report(cmd_runs(args)),
        Command::Checks { pipeline, run, failed, limit, json, state } => {
            report(cmd_checks(pipeline, run, failed, limit, json, state))
        }
        Command::Backfill(args) => report(cmd_backfill(args)),
        Command::Backfills { pipeline, json, state } => report(cmd_backfills(pipeline, json, state)),
        Command::Recover { pipeline, state } => report(cmd_recover(pipeline, state)),
        Command::Schema { pipeline, source, json, state } => report(cmd_schema(pipeline, source, json, state)),
        Command::Table { action, path, partition, target_mb, compression, retention, dry_run, json } => report(
            cmd_table(&action, &path, (partition.as_deref(), target_mb, &compression), &retention, dry_run, json),
        ),
        Command::Watermarks { pipeline, action, source, value, json, state } => {
            report(cmd_watermarks(pipeline, action, source, value, json, state))
        }
        Command::Validate { pipeline, json, cache_dir } => report(cmd_validate(pipeline, json, cache_dir)),
        Command::Plugin(PluginCommand::Inspect { file, json, cache_dir }) => report(cmd_inspect(file, json, cache_dir)),
        Command::Plugin(PluginCommand::Cache { clear, json, cache_dir }) => report(cmd_cache(clear, json, cache_dir)),
        Command::Serve(args) => report(cmd_serve(args)),
    }
}

fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// The pipeline file.
    #[arg(value_name = "PIPELINE")]
    path: PathBuf,
    /// The run's partition: replaces `{partition}` in source paths; with a partitioned
    /// output only the partitions this run wrote are replaced. Without it, `{partition}`
    /// matches every partition and outputs are replaced whole.
    #[arg(long, short)]
    partition: Option<String>,
    /// Print the run summary as JSON on stdout (logs stay on stderr).
    #[arg(long)]
    json: bool,
    /// Where compiled plugins are cached [default: $WEIR_CACHE_DIR, else ~/.cache/weir].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Do not show progress, even on a terminal.
    #[arg(long)]
    no_progress: bool,
    /// Only print errors and the summary.
    #[arg(long, short)]
    quiet: bool,
    /// Run even if an identical run (same input files, config and plugins) already
    /// published; by default such a rerun is recognised and does nothing.
    #[arg(long)]
    force: bool,
    /// The run store [default: `[pipeline] state`, else .weir/state.db beside the file].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Continue the newest crashed run of this partition from its last checkpoint instead
    /// of starting over (the output equals an uninterrupted run's).
    #[arg(long)]
    resume: bool,
    /// Incremental sources read everything, ignoring their committed watermarks; the run
    /// then commits new ones (as every incremental run does when it publishes).
    #[arg(long)]
    full_refresh: bool,
    /// If a run of the same pipeline and partition is live, wait for it to end (then run,
    /// or find its output up to date) instead of refusing. Runs of other partitions never
    /// wait for each other.
    #[arg(long)]
    wait: bool,
    /// After the summary, print where each step's time went: reading, each plugin's
    /// boundary (IPC encode, copy in, guest decode / compute / encode, copy out, output
    /// validation), checks and writing. Always part of `--json`.
    #[arg(long)]
    timings: bool,
}

fn cmd_run(args: RunArgs) -> ExitCode {
    let RunArgs {
        path,
        partition,
        json,
        cache_dir,
        no_progress,
        quiet,
        force,
        state,
        resume,
        full_refresh,
        wait,
        timings,
    } = args;
    let pipeline = match Pipeline::load(&path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: invalid pipeline\n{e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let tty = std::io::stderr().is_terminal();
    let show_progress = tty && !no_progress && !json && !quiet;
    let log: engine::LogFn = Arc::new(log_line);
    let progress: Option<engine::ProgressFn> = if show_progress {
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("  {spinner} {msg}") {
            bar.set_style(style);
        }
        *PROGRESS.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
        Some(Arc::new(move |p: &Progress| {
            bar.set_message(format!(
                "{}: {} rows read, {} written ({:.1} s)",
                p.step,
                thousands(p.rows_read),
                thousands(p.rows_written),
                p.elapsed.as_secs_f64()
            ));
        }))
    } else {
        None
    };
    let options = RunOptions {
        partition,
        cache_dir: cache_dir.or_else(PluginEngine::default_cache_dir),
        log,
        plugin_log: Arc::new(plugin_log_line),
        progress,
        state,
        force,
        backfill_id: None,
        resume,
        full_refresh,
        wait,
        cancel: None,
        started: None,
        ended: None,
    };
    let result = engine::run(&pipeline, &options);
    if let Some(bar) = PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).take() {
        bar.finish_and_clear();
    }
    match result {
        Ok(summary) => {
            let warned: Vec<&weir::quality::CheckResult> =
                summary.steps.iter().flat_map(|st| st.checks.iter()).filter(|c| !c.passed).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
            } else {
                println!("{}", summary_line(&summary));
                if timings {
                    print!("{}", timings_table(&summary));
                }
                for c in &warned {
                    println!(
                        "  warning: check `{}` on `{}` ({}): {}; allowed {}",
                        c.check,
                        c.step,
                        c.severity.as_str(),
                        c.observed,
                        c.threshold
                    );
                }
            }
            if warned.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_WARNINGS)
            }
        }
        Err(e) => {
            if json {
                let v = serde_json::json!({
                    "pipeline": pipeline.name,
                    "status": "FAILED",
                    "error": e.to_string(),
                    "kind": e.kind(),
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            let kind = match e.kind() {
                weir::ErrorKind::User => "",
                weir::ErrorKind::External => " (external: retrying may help)",
                weir::ErrorKind::Internal => "",
            };
            eprintln!("error: run failed{kind}: {e}");
            if !matches!(e, weir::Error::PublishInterrupted { .. }) {
                eprintln!("nothing was published by this run");
            }
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `weir run --timings`: busy seconds per stage of each step.
fn timings_table(s: &RunSummary) -> String {
    let mut out = String::new();
    for st in &s.steps {
        let t = &st.timings;
        out.push_str(&format!(
            "time split of step `{}` ({:.2} s wall; CPU seconds per stage, stages run in parallel):\n",
            st.name, st.seconds
        ));
        out.push_str(&format!("  {:<22} {:>8.3}\n", "read + decode input", t.read));
        for p in &t.plugins {
            let c = &p.calls;
            out.push_str(&format!(
                "  plugin {:<15} {:>8.3}  = host encode {:.3} · copy in {:.3} · guest decode {:.3} · compute {:.3} · guest encode {:.3}{} · copy out {:.3} · validate {:.3}  ({} calls, {:.1} MB in, {:.1} MB out)\n",
                p.plugin,
                c.host_encode + c.copy_in + c.guest_decode + c.guest_compute + c.guest_encode + c.guest_unsplit + c.copy_out + c.host_decode,
                c.host_encode,
                c.copy_in,
                c.guest_decode,
                c.guest_compute,
                c.guest_encode,
                if c.guest_unsplit > 0.0 { format!(" · guest (unsplit) {:.3}", c.guest_unsplit) } else { String::new() },
                c.copy_out,
                c.host_decode,
                c.calls,
                c.bytes_in as f64 / 1e6,
                c.bytes_out as f64 / 1e6,
            ));
        }
        if t.checks > 0.0 {
            out.push_str(&format!("  {:<22} {:>8.3}\n", "row checks", t.checks));
        }
        out.push_str(&format!("  {:<22} {:>8.3}\n", "encode + write output", t.write));
    }
    out
}

fn summary_line(s: &RunSummary) -> String {
    let mut parts = Vec::new();
    for st in &s.steps {
        let mut p = format!("{} {} → {} rows", st.name, thousands(st.rows_read), thousands(st.rows_written));
        if st.rows_skipped > 0 {
            p.push_str(&format!(" ({} bad input rows skipped)", thousands(st.rows_skipped)));
        }
        if st.rows_quarantined > 0 {
            p.push_str(&format!(" ({} quarantined)", thousands(st.rows_quarantined)));
        }
        if !st.checks.is_empty() {
            let failed = st.checks.iter().filter(|c| !c.passed).count();
            p.push_str(&format!(" [{}/{} checks passed]", st.checks.len() - failed, st.checks.len()));
        }
        if !st.partitions.is_empty() {
            p.push_str(&format!(" in {} partitions", st.partitions.len()));
        }
        parts.push(p);
    }
    let partition = s.partition.as_ref().map(|p| format!(" partition {p}")).unwrap_or_default();
    if let Some(earlier) = s.identical_to {
        return format!(
            "up to date {}{partition}: identical to run #{earlier}, nothing to do (--force runs it again)",
            s.pipeline
        );
    }
    let id = s.run_id.map(|i| format!(" (run #{i})")).unwrap_or_default();
    let id = match s.resumed_from {
        Some(old) => format!("{id} resumed run #{old}"),
        None => id,
    };
    format!("ok {}{partition}{id}: {} · {:.2} s", s.pipeline, parts.join(" · "), s.seconds)
}

fn cmd_validate(path: PathBuf, json: bool, cache_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let pipeline = match Pipeline::load(&path) {
        Ok(p) => p,
        Err(e) => {
            if json {
                let errs: Vec<_> = e
                    .0
                    .iter()
                    .map(|d| serde_json::json!({"file": d.file, "line": d.line, "column": d.column, "message": d.message, "hint": d.hint}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"valid": false, "errors": errs}))?);
            } else {
                eprintln!("{e}");
                eprintln!("{}: {} problem{}", path.display(), e.0.len(), if e.0.len() == 1 { "" } else { "s" });
            }
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let engine =
        PluginEngine::new(cache_dir.or_else(PluginEngine::default_cache_dir)).context("starting the plugin engine")?;
    let mut problems = Vec::new();
    let mut plugins = Vec::new();
    for (name, p) in &pipeline.plugins {
        match engine.load(&p.path, p.sha256.as_deref()) {
            Ok(lp) => {
                let at = format!("{}:{}: plugin `{name}`", path.display(), p.line);
                // what a run would refuse at load: an import without its grant, a world used
                // as another
                let grants = weir::plugin::Grants {
                    plugin: name.clone(),
                    allowed_hosts: p.allowed_hosts.clone(),
                    ..Default::default()
                };
                if let Err(m) = grants.check_imports(&lp.info.imports) {
                    problems.push(format!("{at}: {m}"));
                }
                let world = lp.info.world.as_deref().unwrap_or("unknown");
                let as_source =
                    pipeline.sources.values().any(|s| s.extractor.as_ref().is_some_and(|x| &x.plugin == name));
                let as_transform = pipeline.steps.iter().any(|s| s.transforms.iter().any(|t| &t.plugin == name));
                if as_source && world != "extractor" {
                    problems.push(format!("{at}: its world is `{world}`, but a source uses it as an extractor"));
                }
                if as_transform && world != "transform" {
                    problems.push(format!("{at}: its world is `{world}`, but a step uses it as a transform"));
                }
                plugins.push(serde_json::json!({"name": name, "world": lp.info.world, "contract_version": lp.info.contract_version, "sha256": lp.info.sha256}))
            }
            Err(e) => problems.push(format!("{}:{}: plugin `{name}`: {e}", path.display(), p.line)),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"valid": problems.is_empty(), "errors": problems, "plugins": plugins, "steps": pipeline.steps.iter().map(|s| &s.name).collect::<Vec<_>>()})
            )?
        );
    } else if problems.is_empty() {
        println!(
            "ok {}: {} sources, {} plugins, {} steps ({})",
            pipeline.name,
            pipeline.sources.len(),
            pipeline.plugins.len(),
            pipeline.steps.len(),
            pipeline.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(" → ")
        );
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
    }
    Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_INVALID) })
}

fn cmd_cache(clear: bool, json: bool, cache_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    use weir::plugin::cache;
    let dir = cache_dir
        .or_else(PluginEngine::default_cache_dir)
        .context("no cache directory: set WEIR_CACHE_DIR or HOME, or pass --cache-dir")?;
    let removed = if clear {
        Some(cache::clear(&dir).with_context(|| format!("clearing the plugin cache {}", dir.display()))?)
    } else {
        None
    };
    let entries = cache::entries(&dir).with_context(|| format!("reading the plugin cache {}", dir.display()))?;
    let (limit, problem) = cache::limit_bytes();
    if let Some(p) = problem {
        eprintln!("weir: warning: {p}");
    }
    let bytes: u64 = entries.iter().map(|e| e.bytes).sum();
    let mb = |b: u64| b as f64 / 1e6;
    if json {
        let list: Vec<serde_json::Value> = entries
            .iter()
            .rev()
            .map(|e| {
                let used = e.used.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                serde_json::json!({ "file": e.path, "bytes": e.bytes, "last_used_unix": used })
            })
            .collect();
        let out = serde_json::json!({
            "dir": dir,
            "entries": entries.len(),
            "bytes": bytes,
            "limit_bytes": limit,
            "removed": removed.map(|r| serde_json::json!({ "entries": r.entries, "bytes": r.bytes })),
            "compiled": list,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(r) = removed {
        println!("removed {} compiled plugin(s), {:.1} MB, from {}", r.entries, mb(r.bytes), dir.display());
    }
    println!("cache:     {}", dir.display());
    println!(
        "compiled:  {} plugin version(s), {:.1} MB (limit {} MB; {} sets it)",
        entries.len(),
        mb(bytes),
        limit >> 20,
        cache::LIMIT_ENV
    );
    if let Some(newest) = entries.last() {
        let ago = newest.used.elapsed().map_or(0, |d| d.as_secs());
        println!("last used: {} ({} ago)", newest.path.display(), human_age(ago));
    }
    Ok(ExitCode::SUCCESS)
}

/// `secs` as the largest whole unit: 42 s, 5 min, 3 h, 2 days.
fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

fn cmd_inspect(file: PathBuf, json: bool, cache_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let engine =
        PluginEngine::new(cache_dir.or_else(PluginEngine::default_cache_dir)).context("starting the plugin engine")?;
    let info = engine.time_start(&file).with_context(|| format!("inspecting {}", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("file:      {}", info.path.display());
        println!("sha256:    {}", info.sha256);
        println!("size:      {} bytes", thousands(info.size_bytes));
        println!("world:     {}", info.world.as_deref().unwrap_or("(not a weir plugin)"));
        println!(
            "contract:  weir:plugin@{} ({})",
            info.contract_version.as_deref().unwrap_or("?"),
            if info.compatible {
                format!("supported by this weir {}", env!("CARGO_PKG_VERSION"))
            } else {
                format!("NOT supported: this weir runs weir:plugin@{}.x", weir::plugin::SUPPORTED_CONTRACT)
            }
        );
        if let Some(t) = &info.start {
            let ms = |s: Option<f64>| s.map(|s| format!("{:.1} ms", s * 1e3)).unwrap_or_else(|| "-".into());
            let compile = match t.compile_secs {
                Some(s) => format!("compiled in {s:.2} s (kept in the compile cache)"),
                None => "compiled earlier (from the compile cache)".into(),
            };
            match &t.error {
                None => {
                    println!("start:     {compile}; load {}, instantiate {}", ms(t.load_secs), ms(t.instantiate_secs))
                }
                Some(e) => println!("start:     CANNOT START in weir's sandbox: {e}"),
            }
        }
        println!("imports:");
        for i in &info.imports {
            println!("  {i}");
        }
        println!("exports:");
        for e in &info.exports {
            println!("  {e}");
        }
    }
    let starts = info.start.as_ref().is_none_or(|t| t.error.is_none());
    Ok(if info.compatible && starts { ExitCode::SUCCESS } else { ExitCode::from(EXIT_FAILED) })
}

/// Find the run store for `weir runs`: --state, $WEIR_STATE, a pipeline file, ./.weir.
fn locate_store(state: Option<PathBuf>, pipeline: Option<&str>) -> anyhow::Result<(PathBuf, Option<String>)> {
    let mut name = pipeline.map(str::to_string);
    if let Some(p) = pipeline {
        let path = PathBuf::from(p);
        if path.is_file() {
            let loaded = Pipeline::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            name = Some(loaded.name.clone());
            if state.is_none() {
                return Ok((loaded.state_path, name));
            }
        }
    }
    let path = state
        .or_else(|| std::env::var_os("WEIR_STATE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".weir/state.db"));
    anyhow::ensure!(
        path.is_file(),
        "no run store at {} (pass --state FILE, or --pipeline PIPELINE.toml)",
        path.display()
    );
    Ok((path, name))
}

fn cmd_runs(args: RunsArgs) -> anyhow::Result<ExitCode> {
    use weir::store::{format_time, RunFilter, Status};
    let (path, pipeline) = locate_store(args.state, args.pipeline.as_deref())?;
    let store = weir::store::open(&path)?;
    if let Some(RunsCommand::Show { id }) = args.show {
        let run = store.run(id)?.ok_or_else(|| anyhow::anyhow!("no run #{id} in {}", path.display()))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&run)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "run #{}  {}  pipeline {}{}",
            run.id,
            run.status.as_str(),
            run.pipeline,
            run.partition.as_ref().map(|p| format!("  partition {p}")).unwrap_or_default()
        );
        let duration = run
            .finished_at_ms
            .map(|f| format!("{:.2} s", (f - run.started_at_ms) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "started   {}   finished {}   ({duration})",
            format_time(run.started_at_ms),
            run.finished_at_ms.map(format_time).unwrap_or_else(|| "-".into())
        );
        println!("attempt   {}   process {} on {}", run.attempt, run.pid, run.host);
        if let Some(e) = &run.error {
            println!("error     {e}");
        }
        if let Some(n) = &run.note {
            println!("note      {n}");
        }
        println!("config    sha256 {}", run.config_sha256);
        for (name, digest) in &run.plugins {
            println!("plugin    {name:<12} sha256 {digest}");
        }
        for s in &run.steps {
            println!(
                "step      {:<20} read {:>10}  written {:>10}  skipped {:>6}  quarantined {:>6}",
                s.step,
                thousands(s.rows_read),
                thousands(s.rows_written),
                thousands(s.rows_skipped),
                thousands(s.rows_quarantined)
            );
        }
        if let Some(end) = &run.watermark_end {
            println!("watermark {} -> {end}", run.watermark_start.as_deref().unwrap_or("(from the start)"));
        }
        for a in &run.attempts {
            match &a.error {
                None => println!("attempt   {:<20} #{} ok", a.step, a.attempt),
                Some(e) => println!("attempt   {:<20} #{} failed: {}", a.step, a.attempt, e.replace('\n', " ")),
            }
        }
        if let Some(d) = &run.decision {
            println!(
                "decided   {}   to make {} switch(es), {} still to make",
                format_time(d.at_ms),
                d.switches.len(),
                d.pending()
            );
            for sw in &d.switches {
                let state = if sw.done_at_ms.is_some() { "made   " } else { "pending" };
                println!("switch    {state} {:<10} {}", sw.kind, sw.target.display());
            }
        }
        for p in &run.published {
            println!("published {} {}", p.action, p.path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let status = match &args.status {
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            anyhow::anyhow!("unknown status `{s}`; use RUNNING, SUCCESS, FAILED, CANCELLED or PARTIAL")
        })?),
        None => None,
    };
    let runs = store.runs(&RunFilter { pipeline, status, limit: args.limit })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>5}  {:<8}  {:<16}  {:<12}  {:<21}  {:>9}  {:>12}  ERROR / NOTE",
        "ID", "STATUS", "PIPELINE", "PARTITION", "STARTED", "SECONDS", "ROWS OUT"
    );
    for r in &runs {
        let secs = r
            .finished_at_ms
            .map(|f| format!("{:.2}", (f - r.started_at_ms) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let rows: u64 = r.steps.iter().map(|s| s.rows_written).sum();
        let mut err = r.error.clone().or_else(|| r.note.clone()).unwrap_or_default().replace('\n', " ");
        if err.len() > 80 {
            let cut = (0..=80).rev().find(|i| err.is_char_boundary(*i)).unwrap_or(0);
            err.truncate(cut);
            err.push('…');
        }
        println!(
            "{:>5}  {:<8}  {:<16}  {:<12}  {:<21}  {:>9}  {:>12}  {err}",
            r.id,
            r.status.as_str(),
            r.pipeline,
            r.partition.as_deref().unwrap_or("-"),
            format_time(r.started_at_ms),
            secs,
            thousands(rows)
        );
    }
    if runs.is_empty() {
        println!("(no runs)");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_recover(path: PathBuf, state: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let pipeline = match Pipeline::load(&path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: invalid pipeline\n{e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let options = RunOptions { state, ..RunOptions::default() };
    let store = engine::open_store(&pipeline, &options)?;
    let dead = engine::recover(store.as_ref(), Some(&pipeline.name), "weir recover", &log_line, false)?;
    let completed = dead.iter().filter(|r| r.decision.is_some()).count();
    println!(
        "recovered {} run{} of {}: {completed} completed (had decided to publish), {} discarded",
        dead.len(),
        if dead.len() == 1 { "" } else { "s" },
        pipeline.name,
        dead.len() - completed
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_backfill(args: BackfillArgs) -> anyhow::Result<ExitCode> {
    use weir::engine::backfill::{self, PartitionSpec};
    let pipeline = match Pipeline::load(&args.pipeline) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: invalid pipeline\n{e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    anyhow::ensure!(args.parallel >= 1 && args.parallel <= 64, "--parallel must be between 1 and 64");
    let options = RunOptions {
        cache_dir: args.cache_dir.or_else(PluginEngine::default_cache_dir),
        state: args.state,
        force: args.force,
        log: Arc::new(log_line),
        plugin_log: Arc::new(plugin_log_line),
        ..RunOptions::default()
    };
    let parallel = args.parallel;
    let result = if let Some(id) = args.resume {
        backfill::resume(&pipeline, id, args.only_failed, Some(parallel), &options)
    } else if args.only_failed {
        let store = engine::open_store(&pipeline, &options)?;
        let newest = store.backfills(Some(&pipeline.name), 1)?;
        let b =
            newest.first().ok_or_else(|| anyhow::anyhow!("pipeline `{}` has no backfill to rerun", pipeline.name))?;
        backfill::resume(&pipeline, b.id, true, Some(parallel), &options)
    } else {
        let spec = if !args.partitions.is_empty() {
            PartitionSpec::List(args.partitions)
        } else {
            let (Some(from), Some(to)) = (args.from, args.to) else {
                eprintln!("error: say which partitions: --from and --to, --partitions, or --resume ID");
                return Ok(ExitCode::from(EXIT_INVALID));
            };
            match args.every.as_str() {
                "day" | "daily" => PartitionSpec::Daily { from, to },
                "hour" | "hourly" => PartitionSpec::Hourly { from, to },
                other => anyhow::bail!("--every {other}: use day or hour"),
            }
        };
        backfill::start(&pipeline, &spec, parallel, &options)
    };
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(if e.kind() == weir::ErrorKind::User { EXIT_INVALID } else { EXIT_FAILED }));
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "backfill #{} {}: {} partitions ran, {} succeeded, {} failed{}",
            summary.id,
            summary.status.as_str(),
            summary.ran,
            summary.succeeded,
            summary.failed.len(),
            if summary.already_done > 0 { format!(" ({} already done)", summary.already_done) } else { String::new() }
        );
        for (p, e) in &summary.failed {
            println!("  failed {p}: {e}");
        }
        for (p, warnings) in &summary.warned {
            for w in warnings {
                println!("  warning {p}: {w}");
            }
        }
        if !summary.failed.is_empty() {
            println!(
                "fix the cause, then: weir backfill {} --resume {} --only-failed",
                args.pipeline.display(),
                summary.id
            );
        }
    }
    // the same codes as `weir run`: 1 failed, 3 succeeded with warnings
    Ok(if !summary.failed.is_empty() || summary.status != weir::store::Status::Success {
        ExitCode::from(EXIT_FAILED)
    } else if !summary.warned.is_empty() {
        ExitCode::from(EXIT_WARNINGS)
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_backfills(pipeline: Option<String>, json: bool, state: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    use weir::store::format_time;
    let (path, name) = locate_store(state, pipeline.as_deref())?;
    let store = weir::store::open(&path)?;
    let list = store.backfills(name.as_deref(), 50)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>5}  {:<8}  {:<16}  {:<28}  {:<21}  {:>5}  {:>6}  {:>5}",
        "ID", "STATUS", "PIPELINE", "PLAN", "CREATED", "DONE", "FAILED", "LEFT"
    );
    for b in &list {
        let done = b.partitions.iter().filter(|p| p.status == "SUCCESS").count();
        let failed = b.partitions.iter().filter(|p| p.status == "FAILED").count();
        println!(
            "{:>5}  {:<8}  {:<16}  {:<28}  {:<21}  {:>5}  {:>6}  {:>5}",
            b.id,
            b.status.as_str(),
            b.pipeline,
            b.spec,
            format_time(b.created_at_ms),
            done,
            failed,
            b.partitions.len() - done - failed
        );
    }
    if list.is_empty() {
        println!("(no backfills)");
    }
    let file = pipeline.as_deref().filter(|p| p.ends_with(".toml")).unwrap_or("PIPELINE.toml");
    for b in list.iter().filter(|b| b.interrupted.is_some()) {
        println!(
            "backfill #{} was interrupted ({}); continue it with: weir backfill {file} --resume {}",
            b.id,
            b.interrupted.as_deref().unwrap_or_default(),
            b.id
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_watermarks(
    pipeline: PathBuf,
    action: Option<String>,
    source: Option<String>,
    value: Option<String>,
    json: bool,
    state: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let loaded = Pipeline::load(&pipeline).map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = state.unwrap_or_else(|| loaded.state_path.clone());
    let incremental: Vec<&String> =
        loaded.sources.values().filter(|s| s.incremental.is_some()).map(|s| &s.name).collect();
    if let Some(action) = action {
        let source = source.ok_or_else(|| anyhow::anyhow!("`weir watermarks PIPELINE {action}` needs a SOURCE"))?;
        let Some(src) = loaded.sources.get(&source).filter(|s| s.incremental.is_some()) else {
            anyhow::bail!("`{source}` is not an incremental source of `{}` (those: {incremental:?})", loaded.name);
        };
        let value = match (action.as_str(), value) {
            ("set", Some(v)) => {
                if src.postgres.is_some() && weir::io::source::parse_micros(&v).is_none() {
                    anyhow::bail!("`{v}` is not an RFC 3339 time (2024-01-01T00:00:00Z), which a PostgreSQL source's watermark is");
                }
                Some(v)
            }
            ("set", None) => anyhow::bail!("`set` needs a VALUE: weir watermarks PIPELINE set SOURCE VALUE"),
            (_, Some(_)) => anyhow::bail!("`reset` takes no VALUE"),
            (_, None) => None,
        };
        let store = weir::store::open(&path)?;
        let by =
            format!("weir watermarks by {}@{}", std::env::var("USER").unwrap_or_default(), weir::store::host_name());
        let old = store.set_watermark(&loaded.name, &source, value.as_deref(), &by)?;
        println!(
            "{source}: {} -> {}",
            old.as_deref().unwrap_or("(none)"),
            value.as_deref().unwrap_or("(none: the next run reads everything)")
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !path.is_file() {
        println!("no run store at {} yet: no watermarks", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let store = weir::store::open(&path)?;
    let marks = store.watermarks(&loaded.name)?;
    let audit = store.watermark_audit(&loaded.name)?;
    if json {
        println!("{}", serde_json::json!({ "watermarks": marks, "audit": audit }));
        return Ok(ExitCode::SUCCESS);
    }
    if incremental.is_empty() {
        println!("pipeline `{}` has no incremental source", loaded.name);
    }
    for name in &incremental {
        match marks.iter().find(|m| &&m.source == name) {
            Some(m) if m.run_id > 0 => {
                println!("{name}: {}  (run #{}, {})", m.value, m.run_id, weir::store::format_time(m.updated_ms))
            }
            Some(m) => println!("{name}: {}  (set by hand, {})", m.value, weir::store::format_time(m.updated_ms)),
            None => println!("{name}: (none: the next run reads everything)"),
        }
    }
    for a in &audit {
        println!(
            "  {} {}: {} -> {} by {}",
            weir::store::format_time(a.at_ms),
            a.source,
            a.old.as_deref().unwrap_or("(none)"),
            a.new.as_deref().unwrap_or("(none)"),
            a.by
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_table(
    action: &str,
    path: &std::path::Path,
    (partition, target_mb, compression): (Option<&str>, u64, &str),
    retention: &str,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use weir::io::delta;
    match action {
        "optimize" => {
            let codec = weir::config::Codec::parse(compression).map_err(|e| anyhow::anyhow!("--compression: {e}"))?;
            let table = delta::Table::at(&path.to_string_lossy()).map_err(anyhow::Error::msg)?;
            let o = delta::optimize(&table, partition, target_mb, codec).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&o)?);
                return Ok(ExitCode::SUCCESS);
            }
            match o.version {
                None => {
                    println!("{}: nothing to compact (no partition has two files under {target_mb} MB)", path.display())
                }
                Some(v) => {
                    for (p, read, written) in &o.partitions {
                        println!("  {}: {read} files -> {written}", if p.is_empty() { "(table)" } else { p });
                    }
                    println!(
                        "{}: version {v} compacts {} rows; the replaced files stay for time travel until vacuum",
                        path.display(),
                        o.rows
                    );
                }
            }
        }
        "history" => {
            let table = delta::Table::at(&path.to_string_lossy()).map_err(anyhow::Error::msg)?;
            let h = delta::history(&table).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{}: {} versions in the log, newest first", path.display(), h.len());
            for v in &h {
                let by = match (&v.pipeline, &v.step, v.run) {
                    (Some(p), Some(s), Some(r)) => format!("weir run #{r} of `{p}`, step `{s}`"),
                    _ => "not weir".into(),
                };
                println!(
                    "  v{:<5} {}  {:<8} +{} -{} files  {by}",
                    v.version,
                    v.timestamp_ms.map(weir::store::format_time).unwrap_or_else(|| "?".into()),
                    v.operation.as_deref().unwrap_or("?"),
                    v.added,
                    v.removed
                );
            }
        }
        _ => {
            let keep =
                weir::config::parse_duration(retention).map_err(|e| anyhow::anyhow!("--retention {retention}: {e}"))?;
            let location = path.to_string_lossy();
            let table = delta::Table::at(&location).map_err(anyhow::Error::msg)?;
            let folder = location.starts_with("s3://") && !table.exists().map_err(anyhow::Error::msg)?;
            let v = if folder {
                // a Parquet folder published through its pointer
                let r = table.remote().cloned().ok_or_else(|| anyhow::anyhow!("{location}: not on object storage"))?;
                weir::io::s3_dataset::vacuum(&r, keep, dry_run).map_err(anyhow::Error::msg)?
            } else {
                delta::vacuum(&table, keep, dry_run).map_err(anyhow::Error::msg)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            for f in &v.removed {
                println!("  {} {f}", if dry_run { "would remove" } else { "removed" });
            }
            println!(
                "{}: {} unreferenced files ({} bytes) {}; {} younger than {retention} kept",
                path.display(),
                v.removed.len(),
                v.bytes,
                if dry_run { "would be removed" } else { "removed" },
                v.kept_young
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_schema(pipeline: PathBuf, source: String, json: bool, state: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let loaded = Pipeline::load(&pipeline).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !loaded.sources.contains_key(&source) {
        let known: Vec<&String> = loaded.sources.keys().collect();
        anyhow::bail!("pipeline `{}` has no source `{source}` (its sources: {known:?})", loaded.name);
    }
    let path = state.unwrap_or_else(|| loaded.state_path.clone());
    anyhow::ensure!(path.is_file(), "no run store at {} (the pipeline has not run yet)", path.display());
    let store = weir::store::open(&path)?;
    let versions = store.schema_versions(&loaded.name, &source)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&versions)?);
        return Ok(ExitCode::SUCCESS);
    }
    if versions.is_empty() {
        println!("source `{source}` of `{}`: no schema recorded yet (no run has read it)", loaded.name);
        return Ok(ExitCode::SUCCESS);
    }
    println!("source `{source}` of `{}`: {} schema versions, oldest first", loaded.name, versions.len());
    let mut adopted: Option<&weir::store::SchemaVersion> = None;
    for (i, v) in versions.iter().enumerate() {
        println!(
            "\nv{}  run #{}  {}  {}  ({} columns, {})",
            i + 1,
            v.run_id,
            weir::store::format_time(v.seen_ms),
            v.action.to_uppercase(),
            v.columns.len(),
            v.fingerprint
        );
        match adopted {
            None => {
                for c in &v.columns {
                    println!("    {} {}{}", c.name, c.data_type, if c.nullable { "" } else { " not null" });
                }
            }
            Some(a) => println!("    {}", weir::schema_diff(&a.columns, &v.columns)),
        }
        if v.adopted() {
            adopted = Some(v);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_checks(
    pipeline: Option<String>,
    run: Option<i64>,
    failed: bool,
    limit: usize,
    json: bool,
    state: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    use weir::store::CheckFilter;
    let (path, name) = locate_store(state, pipeline.as_deref())?;
    let store = weir::store::open(&path)?;
    let results = store.check_results(&CheckFilter { run_id: run, pipeline: name, failed_only: failed, limit })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(ExitCode::SUCCESS);
    }
    // columns as wide as their longest value, so long step and check names stay aligned
    let width = |header: &str, values: &mut dyn Iterator<Item = usize>| values.fold(header.len(), usize::max);
    let wp = width("PARTITION", &mut results.iter().map(|c| c.partition.as_deref().unwrap_or("-").chars().count()));
    let ws = width("STEP", &mut results.iter().map(|c| c.result.step.chars().count()));
    let wc = width("CHECK", &mut results.iter().map(|c| c.result.check.chars().count()));
    println!(
        "{:>5}  {:<wp$}  {:<ws$}  {:<wc$}  {:<10}  {:<6}  {:>8}  OBSERVED",
        "RUN", "PARTITION", "STEP", "CHECK", "SEVERITY", "PASSED", "FAILING"
    );
    for c in &results {
        let r = &c.result;
        println!(
            "{:>5}  {:<wp$}  {:<ws$}  {:<wc$}  {:<10}  {:<6}  {:>8}  {} (allowed {})",
            c.run_id,
            c.partition.as_deref().unwrap_or("-"),
            r.step,
            r.check,
            r.severity.as_str(),
            if r.passed { "yes" } else { "NO" },
            thousands(r.failing_rows),
            r.observed,
            r.threshold
        );
        if !r.passed {
            for sample in &r.sample {
                println!("{:>7}e.g. {sample}", "");
            }
        }
    }
    if results.is_empty() {
        println!("(no check results)");
    }
    Ok(ExitCode::SUCCESS)
}
