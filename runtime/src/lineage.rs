//! OpenLineage run events (spec 2-0-2): what a run read and wrote, for a lineage catalog.
//!
//! A pipeline run is a job (`<pipeline>`); each of its steps is a child job
//! (`<pipeline>.<step>`, with a `parent` facet naming the pipeline run); a backfill is the
//! parent of its partition runs (`<pipeline>.backfill`). Each run emits START, then
//! COMPLETE or FAIL, or ABORT when SIGINT or SIGTERM stops it ([`abort_active`], called
//! by the binary's signal thread). A run killed with SIGKILL leaves its START without an end. Datasets on the local disk are named as
//! OpenLineage's naming conventions say for files: namespace `file`, name the absolute path.
//!
//! Events go to a `file` (JSON lines, appended) or to an `http` endpoint (POSTed, with a
//! timeout and retries). A lineage backend that is down never fails a run: the failure is
//! logged once, and the run's later events are dropped (counted), so the run is slowed by
//! at most one event's timeouts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SPEC: &str = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";
const PRODUCER: &str = concat!("https://github.com/weir-dev/weir/tree/v", env!("CARGO_PKG_VERSION"));
/// The schema of weir's own facet (the plugins a run used, by digest).
pub const PLUGINS_FACET_SCHEMA: &str = "https://weir.dev/spec/facets/1-0-0/WeirPluginsRunFacet.json";

/// Where events go.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// JSON lines appended to a file.
    File(PathBuf),
    /// POSTed to an OpenLineage HTTP endpoint (`http://host:port/api/v1/lineage`).
    Http(String),
}

/// The pipeline file's `[lineage]` table (or `WEIR_OPENLINEAGE_URL`).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub transport: Transport,
    /// The jobs' namespace (default `weir`).
    pub namespace: String,
    /// Per HTTP attempt.
    pub timeout: Duration,
    /// HTTP attempts after the first.
    pub retries: u32,
}

impl Config {
    /// `file://PATH`, a path, or `http://...`, as `WEIR_OPENLINEAGE_URL` or `url` give it.
    pub fn transport_from_url(url: &str, base: &Path) -> Result<Transport, String> {
        if let Some(path) = url.strip_prefix("file://") {
            return Ok(Transport::File(base.join(path)));
        }
        if url.starts_with("http://") {
            return Ok(Transport::Http(url.to_string()));
        }
        if url.starts_with("https://") {
            return Err(format!(
                "`{url}`: this weir sends lineage over http only (no TLS is built in); use an http:// endpoint on a trusted network, or a file://"
            ));
        }
        Err(format!("`{url}` is neither file://PATH nor http://HOST/...: say where lineage events go"))
    }
}

/// Sends events; shared by a run and its steps.
pub struct Emitter {
    config: Config,
    agent: Option<ureq::Agent>,
    down: AtomicBool,
    dropped: AtomicU64,
    file: Mutex<()>,
    log: crate::engine::LogFn,
}

/// What an ABORT needs of a run in progress: see [`abort_active`].
pub struct Active {
    pub emitter: std::sync::Arc<Emitter>,
    pub run_id: String,
    pub job: String,
    pub run_facets: serde_json::Map<String, Value>,
    /// PIPELINE, or BACKFILL.
    pub job_type: &'static str,
    /// The step running now: its run id, job and facets.
    pub step: Option<(String, String, serde_json::Map<String, Value>)>,
}

static ACTIVE: Mutex<Vec<(u64, Active)>> = Mutex::new(Vec::new());
static NEXT_ACTIVE: AtomicU64 = AtomicU64::new(0);

/// Register a run in progress; returns its key for [`update_active`] and [`end_active`].
pub fn begin_active(a: Active) -> u64 {
    let key = NEXT_ACTIVE.fetch_add(1, Ordering::Relaxed);
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).push((key, a));
    key
}

pub fn update_active(key: u64, f: impl FnOnce(&mut Active)) {
    if let Some((_, a)) = ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).iter_mut().find(|(k, _)| *k == key) {
        f(a);
    }
}

pub fn end_active(key: u64) {
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).retain(|(k, _)| *k != key);
}

/// The process is being stopped (`reason`, e.g. "SIGTERM"): an ABORT for each run in
/// progress and its running step, so a lineage backend does not show them running forever.
pub fn abort_active(reason: &str) {
    let active = std::mem::take(&mut *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()));
    // newest first: a backfill's partition runs end before the backfill
    for (_, a) in active.into_iter().rev() {
        let abort = |run_id: &str, job: &str, facets: &serde_json::Map<String, Value>, job_type: &str| {
            let mut f = facets.clone();
            f.insert("errorMessage".into(), error_message(&format!("stopped by {reason}")));
            let mut job_facets = serde_json::Map::new();
            job_facets.insert("jobType".into(), self::job_type(job_type));
            let event = Event {
                event_type: "ABORT",
                run_id,
                namespace: a.emitter.namespace(),
                job,
                run_facets: f,
                job_facets,
                inputs: vec![],
                outputs: vec![],
            };
            a.emitter.emit(&event.to_json());
        };
        if let Some((id, job, facets)) = &a.step {
            abort(id, job, facets, "STEP");
        }
        abort(&a.run_id, &a.job, &a.run_facets, a.job_type);
    }
}

/// Backends found down in this process: a backfill's later partition runs skip them too,
/// so a backfill pays one event's timeouts, not one per partition.
static DOWN: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl Emitter {
    pub fn new(config: Config, log: crate::engine::LogFn) -> Emitter {
        let agent = matches!(config.transport, Transport::Http(_)).then(|| {
            let c =
                ureq::Agent::config_builder().timeout_global(Some(config.timeout)).http_status_as_error(false).build();
            ureq::Agent::new_with_config(c)
        });
        let known_down = match &config.transport {
            Transport::Http(url) => DOWN.lock().unwrap_or_else(|e| e.into_inner()).contains(url),
            Transport::File(_) => false,
        };
        Emitter {
            config,
            agent,
            down: AtomicBool::new(known_down),
            dropped: AtomicU64::new(0),
            file: Mutex::new(()),
            log,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// Events not delivered because the backend was down.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Send one event; never fails the caller.
    pub fn emit(&self, event: &Value) {
        if self.down.load(Ordering::Relaxed) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let text = event.to_string();
        let result = match &self.config.transport {
            Transport::File(path) => {
                let _one_writer = self.file.lock();
                append_line(path, &text).map_err(|e| format!("{}: {e}", path.display()))
            }
            Transport::Http(url) => self.post(url, &text),
        };
        if let Err(e) = result {
            self.down.store(true, Ordering::Relaxed);
            if let Transport::Http(url) = &self.config.transport {
                DOWN.lock().unwrap_or_else(|e| e.into_inner()).push(url.clone());
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
            (self.log)(
                tracing::Level::WARN,
                &format!("weir: warning: lineage events are not delivered ({e}); the run goes on without them"),
            );
        }
    }

    fn post(&self, url: &str, body: &str) -> Result<(), String> {
        let Some(agent) = &self.agent else { return Err("no HTTP client (a bug)".into()) };
        let mut last = String::new();
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100 << attempt.min(4)));
            }
            match agent.post(url).header("Content-Type", "application/json").send(body) {
                Ok(r) if r.status().is_success() => return Ok(()),
                // a client error will not pass on a retry
                Ok(r) if r.status().is_client_error() => return Err(format!("{url} answered {}", r.status())),
                Ok(r) => last = format!("{url} answered {}", r.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(format!("{last} (after {} attempts)", self.config.retries + 1))
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(format!("{line}\n").as_bytes())
}

/// A UUID (version 4 layout) derived from `seed`: stable for the same run, distinct
/// across runs (the seed holds the run store's path, the run id and its start time).
pub fn run_uuid(seed: &str) -> String {
    let d = Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    let h = crate::plugin::hex(&b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Now, as RFC 3339 in UTC with milliseconds.
pub fn now() -> String {
    rfc3339(crate::store::now_ms())
}

pub fn rfc3339(ms: i64) -> String {
    let (y, m, d, secs) = crate::store::utc_parts(ms);
    let millis = ms.rem_euclid(1000);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// A facet: its fields plus the producer and schema URL every facet carries.
pub fn facet(schema_url: &str, mut fields: Value) -> Value {
    if let Value::Object(m) = &mut fields {
        m.insert("_producer".into(), json!(PRODUCER));
        m.insert("_schemaURL".into(), json!(schema_url));
    }
    fields
}

fn std_facet(file: &str, version: &str, name: &str, fields: Value) -> Value {
    facet(&format!("https://openlineage.io/spec/facets/{version}/{file}.json#/$defs/{name}"), fields)
}

/// The `processing_engine` run facet: weir and its version.
pub fn processing_engine() -> Value {
    std_facet(
        "ProcessingEngineRunFacet",
        "1-1-1",
        "ProcessingEngineRunFacet",
        json!({ "version": env!("CARGO_PKG_VERSION"), "name": "weir" }),
    )
}

/// The `parent` run facet.
pub fn parent(run_id: &str, namespace: &str, job: &str) -> Value {
    std_facet(
        "ParentRunFacet",
        "1-2-0",
        "ParentRunFacet",
        json!({ "run": { "runId": run_id }, "job": { "namespace": namespace, "name": job } }),
    )
}

/// The `errorMessage` run facet.
pub fn error_message(message: &str) -> Value {
    std_facet(
        "ErrorMessageRunFacet",
        "1-0-1",
        "ErrorMessageRunFacet",
        json!({ "message": message, "programmingLanguage": "rust" }),
    )
}

/// The `nominalTime` run facet of a partition that is a date (`2024-05-01`) or a
/// timestamp; none for other partition names.
pub fn nominal_time(partition: &str) -> Option<Value> {
    let date = partition.get(..10)?;
    let b = date.as_bytes();
    let is_date = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !is_date {
        return None;
    }
    // all ASCII now, so these slices are on character boundaries
    let (month, day) = (date[5..7].parse::<u32>().ok()?, date[8..10].parse::<u32>().ok()?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(std_facet(
        "NominalTimeRunFacet",
        "1-0-1",
        "NominalTimeRunFacet",
        json!({ "nominalStartTime": format!("{date}T00:00:00Z") }),
    ))
}

/// The `jobType` job facet: weir runs batch jobs.
pub fn job_type(job_type: &str) -> Value {
    std_facet(
        "JobTypeJobFacet",
        "2-0-4",
        "JobTypeJobFacet",
        json!({ "processingType": "BATCH", "integration": "WEIR", "jobType": job_type }),
    )
}

/// weir's own run facet: the plugins a run used, with their sha256 digests.
pub fn plugins(digests: &[(String, String)]) -> Value {
    let list: Vec<Value> = digests.iter().map(|(name, sha)| json!({ "name": name, "sha256": sha })).collect();
    facet(&format!("{PLUGINS_FACET_SCHEMA}#/$defs/WeirPluginsRunFacet"), json!({ "plugins": list }))
}

/// A dataset on the local disk: namespace `file`, the absolute path as its name.
pub fn file_dataset(path: &Path) -> Value {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    json!({ "namespace": "file", "name": abs.to_string_lossy() })
}

/// A step's output as a dataset: a local folder (`file_dataset`), or a table on S3 named
/// as the OpenLineage conventions say (namespace `s3://BUCKET`, name the key prefix).
pub fn output_dataset(out: &crate::config::Output) -> Value {
    match &out.remote {
        Some(r) => {
            let rest = r.url.strip_prefix("s3://").unwrap_or(&r.url);
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            json!({ "namespace": format!("s3://{bucket}"), "name": key.trim_end_matches('/') })
        }
        None => file_dataset(&out.path),
    }
}

/// The `schema` dataset facet of an Arrow schema.
pub fn schema(schema: &arrow_schema::Schema) -> Value {
    let fields: Vec<Value> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| json!({ "name": f.name(), "type": f.data_type().to_string(), "ordinal_position": i + 1 }))
        .collect();
    std_facet("SchemaDatasetFacet", "1-2-0", "SchemaDatasetFacet", json!({ "fields": fields }))
}

/// Row, byte and file counts of an input or output dataset.
pub fn statistics(output: bool, rows: u64, bytes: Option<u64>, files: Option<u64>) -> (&'static str, Value) {
    let mut v = json!({ "rowCount": rows });
    if let Some(b) = bytes {
        v["size"] = json!(b);
    }
    if let Some(f) = files {
        v["fileCount"] = json!(f);
    }
    match output {
        true => (
            "outputStatistics",
            std_facet("OutputStatisticsOutputDatasetFacet", "1-0-2", "OutputStatisticsOutputDatasetFacet", v),
        ),
        false => (
            "inputStatistics",
            std_facet("InputStatisticsInputDatasetFacet", "1-0-0", "InputStatisticsInputDatasetFacet", v),
        ),
    }
}

/// The `dataQualityAssertions` dataset facet: one assertion per check.
pub fn assertions(checks: &[crate::quality::CheckResult]) -> Value {
    let list: Vec<Value> = checks
        .iter()
        .map(|c| json!({ "assertion": c.check, "success": c.passed, "severity": c.severity.as_str() }))
        .collect();
    std_facet(
        "DataQualityAssertionsDatasetFacet",
        "1-1-0",
        "DataQualityAssertionsDatasetFacet",
        json!({ "assertions": list }),
    )
}

/// One run event.
pub struct Event<'a> {
    pub event_type: &'a str,
    pub run_id: &'a str,
    pub namespace: &'a str,
    pub job: &'a str,
    pub run_facets: serde_json::Map<String, Value>,
    pub job_facets: serde_json::Map<String, Value>,
    pub inputs: Vec<Value>,
    pub outputs: Vec<Value>,
}

impl Event<'_> {
    pub fn to_json(&self) -> Value {
        json!({
            "eventType": self.event_type,
            "eventTime": now(),
            "producer": PRODUCER,
            "schemaURL": SPEC,
            "run": { "runId": self.run_id, "facets": self.run_facets },
            "job": { "namespace": self.namespace, "name": self.job, "facets": self.job_facets },
            "inputs": self.inputs,
            "outputs": self.outputs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_uuids_and_nominal_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339((951_782_400 + 86_399) * 1000 + 5), "2000-02-29T23:59:59.005Z");
        assert_eq!(rfc3339(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
        let u = run_uuid("a");
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4", "{u}");
        assert!("89ab".contains(&u[19..20]), "{u}");
        assert_ne!(run_uuid("a"), run_uuid("b"));
        assert_eq!(run_uuid("a"), run_uuid("a"));
        assert!(nominal_time("2024-05-01").is_some());
        assert!(nominal_time("2024-05-01T10").is_some());
        assert!(nominal_time("eu-west").is_none());
        assert!(nominal_time("2024-5-1").is_none());
        assert!(nominal_time("2024-13-45").is_none());
        assert!(nominal_time("2024-é-01x").is_none());
    }

    #[test]
    fn urls_say_where_events_go() {
        let base = Path::new("/p");
        assert_eq!(Config::transport_from_url("file://x.jsonl", base), Ok(Transport::File("/p/x.jsonl".into())));
        assert_eq!(Config::transport_from_url("file:///abs.jsonl", base), Ok(Transport::File("/abs.jsonl".into())));
        assert_eq!(
            Config::transport_from_url("http://127.0.0.1:5000/api/v1/lineage", base),
            Ok(Transport::Http("http://127.0.0.1:5000/api/v1/lineage".into()))
        );
        assert!(Config::transport_from_url("https://x", base).unwrap_err().contains("no TLS"));
        assert!(Config::transport_from_url("ftp://x", base).is_err());
    }

    #[test]
    fn a_backend_that_is_down_is_tried_once_and_then_skipped() {
        // a port nothing listens on: connection refused at once
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let warned = std::sync::Arc::new(AtomicU64::new(0));
        let w = warned.clone();
        let log: crate::engine::LogFn = std::sync::Arc::new(move |_, _| {
            w.fetch_add(1, Ordering::Relaxed);
        });
        let e = Emitter::new(
            Config {
                transport: Transport::Http(format!("http://127.0.0.1:{port}/api/v1/lineage")),
                namespace: "weir".into(),
                timeout: Duration::from_millis(500),
                retries: 1,
            },
            log,
        );
        for _ in 0..5 {
            e.emit(&json!({}));
        }
        assert_eq!(e.dropped(), 5);
        assert_eq!(warned.load(Ordering::Relaxed), 1, "one warning, not one per event");
    }
}
