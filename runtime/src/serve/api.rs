//! The endpoints, their request and answer types, and the OpenAPI document made from them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{join_id, parse_id, paths, ApiError, App};
use crate::config::Pipeline;
use crate::engine::{Level, RunOptions, RunSummary};
use crate::quality::{CheckResult, Severity};
use crate::store::{BackfillRecord, CheckFilter, RunFilter, RunRecord, Status, StoredCheck};

type Reply = Result<(u16, Value), ApiError>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(ErrorBody { error: self.message, status: self.status })).into_response();
        if self.status == 401 {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<crate::store::Error> for ApiError {
    fn from(e: crate::store::Error) -> ApiError {
        ApiError::new(500, e.to_string())
    }
}

/// Run the request's work off the async workers (the store and the engine block); a panic
/// in it answers 500 and the server goes on.
async fn call(f: impl FnOnce() -> Reply + Send + 'static) -> Response {
    let reply = tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::new(500, format!("the request failed inside weir (a bug): {e}"))));
    match reply {
        Ok((status, body)) => (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), Json(body)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn json<T: Serialize>(status: u16, v: &T) -> Reply {
    serde_json::to_value(v).map(|v| (status, v)).map_err(|e| ApiError::new(500, e.to_string()))
}

/// A JSON request body (an empty body is the type's default), with errors that name the
/// field.
fn body<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let at = if at == "." { String::new() } else { format!(" at `{at}`") };
        ApiError::new(400, format!("bad request body{at}: {}", e.inner()))
    })
}

fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| ApiError::new(400, format!("bad query: {}", e.body_text())))
}

pub(super) fn digest(token: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(token).into()
}

/// Bearer tokens, compared as digests in constant time.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/health" | "/openapi.json");
    if app.tokens.is_empty() {
        // loopback without tokens: a web page the operator's browser shows must not drive
        // the API (a request with a JSON body needs a CORS preflight; a rebound name is
        // not a loopback Host)
        let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        if !matches!(name, "localhost" | "127.0.0.1" | "::1") {
            return ApiError::new(403, format!("Host `{host}`: without tokens the API answers loopback names only"))
                .into_response();
        }
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"));
        if matches!(*req.method(), axum::http::Method::POST | axum::http::Method::PATCH) && !json {
            return ApiError::new(415, "send the body as JSON, with Content-Type: application/json").into_response();
        }
        return next.run(req).await;
    }
    if open {
        return next.run(req).await;
    }
    // the scheme's name is case-insensitive (RFC 7235)
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| digest(t.trim().as_bytes()));
    let ok = given.is_some_and(|d| {
        app.tokens
            .iter()
            .fold(false, |found, k| found | (k.iter().zip(d.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0))
    });
    if !ok {
        return ApiError::new(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)").into_response();
    }
    next.run(req).await
}

pub(super) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/pipelines", get(list_pipelines).post(register_pipeline))
        .route("/pipelines/{name}", get(get_pipeline))
        .route("/pipelines/{name}/runs", post(trigger_run))
        .route("/pipelines/{name}/backfills", post(create_backfill))
        .route("/runs", get(list_runs))
        .route("/runs/{id}", get(get_run).patch(cancel_run))
        .route("/runs/{id}/quality-checks", post(post_quality_check))
        .route("/backfills", get(list_backfills))
        .route("/backfills/{id}", get(get_backfill).patch(cancel_backfill))
        .route("/backfills/{id}/resume", post(resume_backfill))
        .route("/checks", get(list_checks))
        .route("/lineage", get(lineage))
        .fallback(|| async { ApiError::new(404, "no such endpoint; GET /openapi.json lists them") })
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth))
        .with_state(app)
}

// ---------------------------------------------------------------------------------------
// Types

/// An error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
    /// The HTTP status, repeated.
    pub status: u16,
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub pipelines: usize,
    /// Run slots in use.
    pub runs_active: usize,
}

/// A registered pipeline.
#[derive(Serialize, ToSchema)]
pub struct PipelineView {
    pub name: String,
    /// The pipeline file.
    pub file: String,
    /// The run store its runs are recorded in.
    pub state: String,
    pub sources: Vec<String>,
    pub steps: Vec<StepView>,
    /// Every output is partitioned (backfills are possible).
    pub partitioned: bool,
}

#[derive(Serialize, ToSchema)]
pub struct StepView {
    pub name: String,
    /// A source or an earlier step.
    pub input: String,
    pub output: Option<String>,
    pub partition_by: Option<String>,
}

impl PipelineView {
    pub(super) fn of(file: &Path, p: &Pipeline) -> PipelineView {
        PipelineView {
            name: p.name.clone(),
            file: file.display().to_string(),
            state: p.state_path.display().to_string(),
            sources: p.sources.keys().cloned().collect(),
            steps: p
                .steps
                .iter()
                .map(|s| StepView {
                    name: s.name.clone(),
                    input: s.input.clone(),
                    output: s.output.as_ref().map(|o| o.path.display().to_string()),
                    partition_by: s.output.as_ref().and_then(|o| o.partition_by.clone()),
                })
                .collect(),
            partitioned: p.steps.iter().filter_map(|s| s.output.as_ref()).all(|o| o.partition_by.is_some()),
        }
    }
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterPipeline {
    /// The pipeline file, under a root (relative paths against the first root).
    pub path: String,
}

/// Start a run.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRun {
    /// The run's partition (`{partition}` in source paths), as `weir run --partition`.
    pub partition: Option<String>,
    /// Run even if an identical run already published.
    #[serde(default)]
    pub force: bool,
    /// Continue the newest crashed run of the partition from its checkpoints.
    #[serde(default)]
    pub resume: bool,
}

#[derive(Serialize, ToSchema)]
pub struct TriggerAnswer {
    /// The run's id (`PIPELINE.N`); none when an identical run had already published.
    pub id: Option<String>,
    /// RUNNING, or UP_TO_DATE.
    pub status: String,
    pub partition: Option<String>,
    /// The earlier run this one was identical to (UP_TO_DATE).
    pub identical_to: Option<String>,
}

/// Rows of one step of a run.
#[derive(Serialize, ToSchema)]
pub struct StepRowsView {
    pub step: String,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_skipped: u64,
    pub rows_quarantined: u64,
}

#[derive(Serialize, ToSchema)]
pub struct AttemptView {
    pub step: String,
    pub attempt: u32,
    pub error: Option<String>,
    pub at: String,
}

#[derive(Serialize, ToSchema)]
pub struct PublishedView {
    pub step: String,
    pub path: String,
    pub partition: Option<String>,
    /// created or replaced.
    pub action: String,
}

/// A quality check result (weir's own or an external one).
#[derive(Serialize, ToSchema)]
pub struct CheckView {
    pub run: String,
    pub pipeline: String,
    pub partition: Option<String>,
    pub step: String,
    pub check: String,
    /// block, warn or quarantine.
    pub severity: String,
    pub passed: bool,
    pub observed: String,
    pub threshold: String,
    pub failing_rows: u64,
    pub sample: Vec<String>,
}

impl CheckView {
    fn of(c: &StoredCheck) -> CheckView {
        let r = &c.result;
        CheckView {
            run: join_id(&c.pipeline, c.run_id),
            pipeline: c.pipeline.clone(),
            partition: c.partition.clone(),
            step: r.step.clone(),
            check: r.check.clone(),
            severity: r.severity.as_str().to_string(),
            passed: r.passed,
            observed: r.observed.clone(),
            threshold: r.threshold.clone(),
            failing_rows: r.failing_rows,
            sample: r.sample.clone(),
        }
    }
}

/// A run: what `weir runs show` shows.
#[derive(Serialize, ToSchema)]
pub struct RunView {
    /// `PIPELINE.N`.
    pub id: String,
    /// N: the run's number in its pipeline's run store.
    pub number: i64,
    pub pipeline: String,
    pub partition: Option<String>,
    /// RUNNING, SUCCESS, FAILED or CANCELLED.
    pub status: String,
    pub attempt: u32,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Wall seconds, once finished.
    pub seconds: Option<f64>,
    pub error: Option<String>,
    pub note: Option<String>,
    /// The backfill it belongs to (`PIPELINE.N`).
    pub backfill: Option<String>,
    pub pid: u32,
    pub host: String,
    /// Plugin name -> sha256.
    pub plugins: BTreeMap<String, String>,
    pub steps: Vec<StepRowsView>,
    pub attempts: Vec<AttemptView>,
    pub published: Vec<PublishedView>,
    /// Check results (in `GET /runs/{id}`; not in lists).
    pub checks: Option<Vec<CheckView>>,
    /// This server runs it and `PATCH` can cancel it.
    pub cancellable: bool,
}

impl RunView {
    fn of(r: &RunRecord, app: &App, checks: Option<Vec<CheckView>>) -> RunView {
        let id = join_id(&r.pipeline, r.id);
        // a run that has decided to publish completes whatever is asked
        let cancellable = r.status == Status::Running
            && r.decision.is_none()
            && app.active.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&id);
        RunView {
            number: r.id,
            pipeline: r.pipeline.clone(),
            partition: r.partition.clone(),
            status: r.status.as_str().to_string(),
            attempt: r.attempt,
            started_at: crate::lineage::rfc3339(r.started_at_ms),
            finished_at: r.finished_at_ms.map(crate::lineage::rfc3339),
            seconds: r.finished_at_ms.map(|f| (f - r.started_at_ms) as f64 / 1000.0),
            error: r.error.clone(),
            note: r.note.clone(),
            backfill: r.backfill_id.map(|b| join_id(&r.pipeline, b)),
            pid: r.pid,
            host: r.host.clone(),
            plugins: r.plugins.clone(),
            steps: r
                .steps
                .iter()
                .map(|s| StepRowsView {
                    step: s.step.clone(),
                    rows_read: s.rows_read,
                    rows_written: s.rows_written,
                    rows_skipped: s.rows_skipped,
                    rows_quarantined: s.rows_quarantined,
                })
                .collect(),
            attempts: r
                .attempts
                .iter()
                .map(|a| AttemptView {
                    step: a.step.clone(),
                    attempt: a.attempt,
                    error: a.error.clone(),
                    at: crate::lineage::rfc3339(a.at_ms),
                })
                .collect(),
            published: r
                .published
                .iter()
                .map(|p| PublishedView {
                    step: p.step.clone(),
                    path: p.path.display().to_string(),
                    partition: p.partition.clone(),
                    action: p.action.clone(),
                })
                .collect(),
            checks,
            cancellable,
            id,
        }
    }
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRun {
    /// Must be CANCELLED.
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct CancelAnswer {
    pub id: String,
    /// CANCELLING: the run stops at its next batch boundary (a run that has already
    /// decided to publish completes).
    pub status: String,
}

/// A check an orchestrator ran outside weir, recorded with the run.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalCheck {
    /// The check's name.
    pub check: String,
    pub passed: bool,
    /// What it checked [default: external].
    pub step: Option<String>,
    /// block (a failure stops what depends on the run) or warn [default: block].
    pub severity: Option<String>,
    pub observed: Option<String>,
    pub threshold: Option<String>,
    #[serde(default)]
    pub failing_rows: u64,
    /// A few failing values (at most 5 kept).
    #[serde(default)]
    pub sample: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct CheckAnswer {
    /// Whether what depends on the run may go ahead: the run succeeded and no blocking
    /// check of it (weir's or an external one) failed.
    pub proceed: bool,
    pub reason: String,
    pub run_status: String,
    pub recorded: CheckView,
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBackfill {
    /// First partition (YYYY-MM-DD, or YYYY-MM-DDTHH with every = hour).
    pub from: Option<String>,
    /// Last partition, included.
    pub to: Option<String>,
    /// day or hour [default: day].
    pub every: Option<String>,
    /// Explicit partitions instead of a range.
    #[serde(default)]
    pub partitions: Vec<String>,
    /// Partitions at a time [default: 1].
    pub parallel: Option<usize>,
    #[serde(default)]
    pub force: bool,
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeBackfill {
    /// Run only the partitions that failed.
    #[serde(default)]
    pub only_failed: bool,
    pub parallel: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct BackfillAnswer {
    pub id: String,
    pub status: String,
    pub partitions: usize,
}

#[derive(Serialize, ToSchema)]
pub struct BackfillPartitionView {
    pub partition: String,
    /// PENDING, RUNNING, SUCCESS or FAILED.
    pub status: String,
    pub run: Option<String>,
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct BackfillView {
    pub id: String,
    pub pipeline: String,
    pub spec: String,
    pub parallel: u32,
    /// RUNNING, SUCCESS, PARTIAL or INTERRUPTED.
    pub status: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub interrupted: Option<String>,
    pub partitions: Vec<BackfillPartitionView>,
}

impl BackfillView {
    fn of(b: &BackfillRecord) -> BackfillView {
        BackfillView {
            id: join_id(&b.pipeline, b.id),
            pipeline: b.pipeline.clone(),
            spec: b.spec.clone(),
            parallel: b.parallel,
            status: b.status.as_str().to_string(),
            created_at: crate::lineage::rfc3339(b.created_at_ms),
            finished_at: b.finished_at_ms.map(crate::lineage::rfc3339),
            interrupted: b.interrupted.clone(),
            partitions: b
                .partitions
                .iter()
                .map(|p| BackfillPartitionView {
                    partition: p.partition.clone(),
                    status: p.status.clone(),
                    run: p.run_id.map(|r| join_id(&b.pipeline, r)),
                    error: p.error.clone(),
                })
                .collect(),
        }
    }
}

/// A dataset as OpenLineage names it.
#[derive(Serialize, ToSchema)]
pub struct DatasetRef {
    pub namespace: String,
    pub name: String,
}

/// One run that wrote the dataset.
#[derive(Serialize, ToSchema)]
pub struct LineageWrite {
    pub run: String,
    pub pipeline: String,
    pub step: String,
    pub partition: Option<String>,
    pub finished_at: Option<String>,
    /// The partition directories it replaced or created (none: the whole dataset).
    pub partitions: Vec<String>,
    /// What the step read.
    pub inputs: Vec<DatasetRef>,
}

#[derive(Serialize, ToSchema)]
pub struct LineageView {
    pub dataset: DatasetRef,
    /// Newest first.
    pub writes: Vec<LineageWrite>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// RUNNING, SUCCESS, FAILED or CANCELLED.
    pub status: Option<String>,
    pub pipeline: Option<String>,
    /// At most this many [default: 20, at most 1000].
    pub limit: Option<usize>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChecksQuery {
    pub pipeline: Option<String>,
    /// One run's results (`PIPELINE.N`).
    pub run: Option<String>,
    /// Only failed checks.
    pub failed: Option<bool>,
    /// At most this many [default: 100, at most 10000].
    pub limit: Option<usize>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BackfillsQuery {
    pub pipeline: Option<String>,
    /// At most this many [default: 20, at most 1000].
    pub limit: Option<usize>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LineageQuery {
    /// The dataset's path (an output directory), under a root.
    pub dataset: String,
}

// ---------------------------------------------------------------------------------------
// Handlers

#[utoipa::path(get, path = "/health", tag = "server", security(()),
    responses((status = 200, description = "The server is up", body = Health)))]
async fn health(State(app): State<Arc<App>>) -> Response {
    let h = Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        pipelines: app.pipelines.read().unwrap_or_else(|e| e.into_inner()).len(),
        runs_active: app.busy.load(Ordering::Acquire),
    };
    Json(h).into_response()
}

#[utoipa::path(get, path = "/openapi.json", tag = "server", security(()),
    responses((status = 200, description = "This document (OpenAPI 3.1)")))]
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

/// The OpenAPI document of the API.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "Prometheus text format: the last run of each pipeline and partition this server ran, last success times, active runs", content_type = "text/plain")))]
async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics_text()).into_response()
}

#[utoipa::path(get, path = "/pipelines", tag = "pipelines",
    responses((status = 200, description = "Registered pipelines", body = [PipelineView])))]
async fn list_pipelines(State(app): State<Arc<App>>) -> Response {
    call(move || {
        let map = app.pipelines.read().unwrap_or_else(|e| e.into_inner());
        let views: Vec<PipelineView> = map.values().map(|s| PipelineView::of(&s.file, &s.pipeline)).collect();
        json(200, &views)
    })
    .await
}

#[utoipa::path(post, path = "/pipelines", tag = "pipelines", request_body = RegisterPipeline,
    responses(
        (status = 201, description = "Registered (or refreshed)", body = PipelineView),
        (status = 403, description = "The file, or a path it uses, is outside the roots", body = ErrorBody),
        (status = 404, description = "No such file", body = ErrorBody),
        (status = 409, description = "Another file has the name", body = ErrorBody),
        (status = 422, description = "Not a valid pipeline (the diagnostics say where)", body = ErrorBody)))]
async fn register_pipeline(State(app): State<Arc<App>>, bytes: Bytes) -> Response {
    call(move || {
        let req: RegisterPipeline = body(&bytes)?;
        if req.path.trim().is_empty() {
            return Err(ApiError::new(400, "give the pipeline file: {\"path\": \"orders/pipeline.toml\"}"));
        }
        let view = app.register(Path::new(&req.path))?;
        app.save_registry().map_err(|e| ApiError::new(500, format!("registered, but not remembered: {e}")))?;
        (app.log)(Level::INFO, &format!("weir serve: registered pipeline `{}` ({})", view.name, view.file));
        json(201, &view)
    })
    .await
}

#[utoipa::path(get, path = "/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path, description = "The pipeline's name")),
    responses((status = 200, description = "The pipeline", body = PipelineView),
        (status = 404, description = "Not registered", body = ErrorBody)))]
async fn get_pipeline(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> Response {
    call(move || {
        let map = app.pipelines.read().unwrap_or_else(|e| e.into_inner());
        let s = map.get(&name).ok_or_else(|| super::no_pipeline(&name))?;
        json(200, &PipelineView::of(&s.file, &s.pipeline))
    })
    .await
}

/// How a run started by the API began.
enum Begin {
    Started(i64),
    Ended(Result<RunSummary, ApiError>),
}

/// The answer for a run that failed before it was recorded.
fn early_error(e: &crate::Error) -> ApiError {
    let status = match e {
        crate::Error::AlreadyRunning { .. } => 409,
        crate::Error::Store(crate::store::Error::Busy { .. } | crate::store::Error::Unfinished { .. }) => 409,
        e => match e.kind() {
            crate::ErrorKind::User => 422,
            crate::ErrorKind::External => 503,
            crate::ErrorKind::Internal => 500,
        },
    };
    ApiError::new(status, e.to_string())
}

impl App {
    /// How the server runs a pipeline: its log lines prefixed, its end shown in /metrics.
    fn run_options(self: &Arc<App>, pipeline: &str, partition: Option<&str>) -> RunOptions {
        let prefix = match partition {
            Some(p) => format!("[{pipeline} {p}] "),
            None => format!("[{pipeline}] "),
        };
        let prefixed = |inner: &crate::engine::LogFn| -> crate::engine::LogFn {
            let (prefix, inner) = (prefix.clone(), inner.clone());
            Arc::new(move |level, l: &str| inner(level, &format!("{prefix}{l}")))
        };
        let (app, name) = (self.clone(), pipeline.to_string());
        let ended: crate::engine::EndedFn = Arc::new(move |partition, outcome, secs| {
            app.expose(&name, partition, outcome, secs);
        });
        RunOptions {
            partition: partition.map(String::from),
            cache_dir: self.cache_dir.clone(),
            log: prefixed(&self.log),
            plugin_log: prefixed(&self.plugin_log),
            ended: Some(ended),
            ..RunOptions::default()
        }
    }
}

#[utoipa::path(post, path = "/pipelines/{name}/runs", tag = "runs", request_body = TriggerRun,
    params(("name" = String, Path, description = "The pipeline's name")),
    responses(
        (status = 202, description = "Started: its id, at once", body = TriggerAnswer),
        (status = 200, description = "An identical run had already published: nothing to do", body = TriggerAnswer),
        (status = 400, description = "Bad body or partition", body = ErrorBody),
        (status = 404, description = "No such pipeline", body = ErrorBody),
        (status = 409, description = "A run of the partition is live (here or from the CLI)", body = ErrorBody),
        (status = 422, description = "The pipeline, a plugin or a secret is not usable", body = ErrorBody),
        (status = 429, description = "The server runs as many runs as it may", body = ErrorBody)))]
async fn trigger_run(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>, bytes: Bytes) -> Response {
    call(move || {
        let req: TriggerRun = body(&bytes)?;
        if let Some(p) = &req.partition {
            paths::check_partition(p)?;
        }
        let (pipeline, _) = app.reload(&name)?;
        paths::check_inputs(&app.roots, &pipeline, req.partition.as_deref())?;
        let slots = app.take_slots(1)?.hand_over(&app);
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel::<Begin>(2);
        let run_key: Arc<Mutex<Option<String>>> = Arc::default();
        let started = {
            let (app, tx, cancel, key, name) = (app.clone(), tx.clone(), cancel.clone(), run_key.clone(), name.clone());
            Arc::new(move |id: i64| {
                let k = join_id(&name, id);
                app.active.lock().unwrap_or_else(|e| e.into_inner()).insert(k.clone(), cancel.clone());
                *key.lock().unwrap_or_else(|e| e.into_inner()) = Some(k);
                let _ = tx.try_send(Begin::Started(id));
            })
        };
        let mut options = app.run_options(&name, req.partition.as_deref());
        options.force = req.force;
        options.resume = req.resume;
        options.cancel = Some(cancel);
        options.started = Some(started);
        let thread_app = app.clone();
        std::thread::Builder::new()
            .name(format!("run {name}"))
            .spawn(move || {
                let _slots = slots;
                let app = thread_app;
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| crate::engine::run(&pipeline, &options)))
                        .unwrap_or_else(|_| Err(crate::Error::Internal("the run panicked".into())));
                if let Some(k) = run_key.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    app.active.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
                    let how = match &outcome {
                        Ok(s) => s.status.clone(),
                        Err(e) => format!("ended: {e}"),
                    };
                    (options.log)(Level::INFO, &format!("weir serve: run {k} {how}"));
                }
                let _ = tx.try_send(Begin::Ended(outcome.map_err(|e| early_error(&e))));
            })
            .map_err(|e| ApiError::new(503, format!("cannot start a run thread: {e}")))?;
        match rx.recv() {
            Ok(Begin::Started(id)) => json(
                202,
                &TriggerAnswer {
                    id: Some(join_id(&name, id)),
                    status: "RUNNING".into(),
                    partition: req.partition,
                    identical_to: None,
                },
            ),
            Ok(Begin::Ended(Ok(s))) => json(
                200,
                &TriggerAnswer {
                    id: s.run_id.map(|r| join_id(&name, r)),
                    status: s.status,
                    partition: req.partition,
                    identical_to: s.identical_to.map(|r| join_id(&name, r)),
                },
            ),
            Ok(Begin::Ended(Err(e))) => Err(e),
            Err(_) => Err(ApiError::new(500, "the run ended without saying how")),
        }
    })
    .await
}

fn limit(v: Option<usize>, default: usize, max: usize) -> usize {
    v.unwrap_or(default).clamp(1, max)
}

fn parse_status(s: Option<&str>) -> Result<Option<Status>, ApiError> {
    s.map(|s| {
        Status::parse(s).ok_or_else(|| {
            ApiError::new(400, format!("status `{s}`: use RUNNING, SUCCESS, FAILED, CANCELLED or PARTIAL"))
        })
    })
    .transpose()
}

#[utoipa::path(get, path = "/runs", tag = "runs", params(RunsQuery),
    responses((status = 200, description = "Runs, newest first", body = [RunView]),
        (status = 400, description = "Bad query", body = ErrorBody)))]
async fn list_runs(
    State(app): State<Arc<App>>,
    q: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    call(move || {
        let q = query(q)?;
        let status = parse_status(q.status.as_deref())?;
        let limit = limit(q.limit, 20, 1000);
        let mut runs: Vec<RunRecord> = Vec::new();
        for (name, _, store) in app.all_served() {
            if q.pipeline.as_ref().is_some_and(|p| *p != name) {
                continue;
            }
            runs.extend(store.runs(&RunFilter { pipeline: Some(name), status, limit })?);
        }
        if let Some(p) = &q.pipeline {
            app.served(p)?;
        }
        runs.sort_by(|a, b| b.started_at_ms.cmp(&a.started_at_ms).then(b.id.cmp(&a.id)));
        runs.truncate(limit);
        let views: Vec<RunView> = runs.iter().map(|r| RunView::of(r, &app, None)).collect();
        json(200, &views)
    })
    .await
}

impl App {
    fn find_run(&self, id: &str) -> Result<(RunRecord, Arc<dyn crate::store::RunStore>), ApiError> {
        let (name, n) = parse_id(id)?;
        let (_, store) = self.served(name)?;
        let run =
            store.run(n)?.filter(|r| r.pipeline == name).ok_or_else(|| ApiError::new(404, format!("no run {id}")))?;
        Ok((run, store))
    }
}

fn checks_of(store: &dyn crate::store::RunStore, run_id: i64) -> Result<Vec<CheckView>, ApiError> {
    let filter = CheckFilter { run_id: Some(run_id), limit: 10_000, ..Default::default() };
    Ok(store.check_results(&filter)?.iter().map(CheckView::of).collect())
}

#[utoipa::path(get, path = "/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "PIPELINE.N")),
    responses((status = 200, description = "The run, with its checks", body = RunView),
        (status = 404, description = "No such run", body = ErrorBody)))]
async fn get_run(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> Response {
    call(move || {
        let (run, store) = app.find_run(&id)?;
        let checks = checks_of(store.as_ref(), run.id)?;
        json(200, &RunView::of(&run, &app, Some(checks)))
    })
    .await
}

#[utoipa::path(patch, path = "/runs/{id}", tag = "runs", request_body = CancelRun,
    params(("id" = String, Path, description = "PIPELINE.N")),
    responses((status = 202, description = "Cancelling", body = CancelAnswer),
        (status = 400, description = "The body is not {\"status\": \"CANCELLED\"}", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run has ended, or another process runs it", body = ErrorBody)))]
async fn cancel_run(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>, bytes: Bytes) -> Response {
    call(move || {
        let req: CancelRun = body(&bytes)?;
        if !req.status.eq_ignore_ascii_case("CANCELLED") {
            return Err(ApiError::new(400, "PATCH /runs/{id} takes {\"status\": \"CANCELLED\"}"));
        }
        let (run, _) = app.find_run(&id)?;
        if let Some(b) = run.backfill_id {
            if run.status == Status::Running {
                let b = join_id(&run.pipeline, b);
                return Err(ApiError::new(
                    409,
                    format!("run {id} is a partition of backfill {b}: PATCH /backfills/{b} cancels the backfill"),
                ));
            }
        }
        if let Some(flag) = app.active.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            flag.store(true, Ordering::Relaxed);
            (app.log)(Level::INFO, &format!("weir serve: run {id}: cancel requested"));
            // it may have ended meanwhile: say what it is now
            let (now, _) = app.find_run(&id)?;
            let status = if now.status == Status::Running { "CANCELLING".to_string() } else { now.status.as_str().into() };
            return json(202, &CancelAnswer { id, status });
        }
        let ours = run.pid == std::process::id() && run.host == crate::store::host_name();
        Err(match run.status {
            Status::Running if ours => ApiError::new(
                409,
                format!("run {id} is starting or ending in this server; ask again in a moment"),
            ),
            Status::Running => ApiError::new(
                409,
                format!(
                    "run {id} is run by pid {} on {}, not by this server: stop that process (its lease then recovers the run)",
                    run.pid, run.host
                ),
            ),
            s => ApiError::new(409, format!("run {id} has already ended: {}", s.as_str())),
        })
    })
    .await
}

#[utoipa::path(post, path = "/runs/{id}/quality-checks", tag = "checks", request_body = ExternalCheck,
    params(("id" = String, Path, description = "PIPELINE.N")),
    responses((status = 200, description = "Recorded; may what depends on the run proceed?", body = CheckAnswer),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody)))]
async fn post_quality_check(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>, bytes: Bytes) -> Response {
    call(move || {
        let req: ExternalCheck = body(&bytes)?;
        let text = |what: &str, v: &str, max: usize| -> Result<(), ApiError> {
            if v.chars().count() > max {
                return Err(ApiError::new(400, format!("`{what}` is longer than {max} characters")));
            }
            Ok(())
        };
        if req.check.trim().is_empty() {
            return Err(ApiError::new(400, "`check` (the check's name) is required"));
        }
        text("check", &req.check, 200)?;
        let step = req.step.clone().unwrap_or_else(|| "external".into());
        text("step", &step, 200)?;
        let severity = match req.severity.as_deref().unwrap_or("block") {
            "block" => Severity::Block,
            "warn" => Severity::Warn,
            other => return Err(ApiError::new(400, format!("severity `{other}`: use block or warn"))),
        };
        let observed = req.observed.clone().unwrap_or_else(|| if req.passed { "passed" } else { "failed" }.into());
        let threshold = req.threshold.clone().unwrap_or_default();
        text("observed", &observed, 1000)?;
        text("threshold", &threshold, 1000)?;
        let sample: Vec<String> = req.sample.iter().take(5).map(|s| s.chars().take(200).collect()).collect();
        let (run, store) = app.find_run(&id)?;
        let result = CheckResult {
            step,
            check: req.check.clone(),
            severity,
            passed: req.passed,
            observed,
            threshold,
            failing_rows: req.failing_rows,
            sample,
            metrics: BTreeMap::new(),
        };
        store.record_checks(run.id, run.partition.as_deref(), std::slice::from_ref(&result))?;
        // each check's latest result counts (recorded in order): a check posted again
        // after a fix decides anew
        let mut latest: BTreeMap<(String, String), CheckView> = BTreeMap::new();
        for c in checks_of(store.as_ref(), run.id)? {
            latest.insert((c.step.clone(), c.check.clone()), c);
        }
        let blocking: Vec<String> = latest
            .values()
            .filter(|c| !c.passed && c.severity == "block")
            .map(|c| format!("`{}` on `{}`", c.check, c.step))
            .collect();
        let (proceed, reason) = if run.status != Status::Success {
            (false, format!("run {id} is {}, not SUCCESS", run.status.as_str()))
        } else if !blocking.is_empty() {
            (false, format!("blocking check(s) failed: {}", blocking.join(", ")))
        } else {
            (true, "the run succeeded and no blocking check failed".into())
        };
        let recorded = CheckView::of(&StoredCheck {
            run_id: run.id,
            pipeline: run.pipeline.clone(),
            partition: run.partition.clone(),
            result,
        });
        json(200, &CheckAnswer { proceed, reason, run_status: run.status.as_str().into(), recorded })
    })
    .await
}

#[utoipa::path(get, path = "/checks", tag = "checks", params(ChecksQuery),
    responses((status = 200, description = "Check results, newest run first", body = [CheckView]),
        (status = 400, description = "Bad query", body = ErrorBody)))]
async fn list_checks(
    State(app): State<Arc<App>>,
    q: Result<Query<ChecksQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    call(move || {
        let q = query(q)?;
        let limit = limit(q.limit, 100, 10_000);
        let failed_only = q.failed.unwrap_or(false);
        let mut out: Vec<(i64, CheckView)> = Vec::new();
        if let Some(run) = &q.run {
            let (r, store) = app.find_run(run)?;
            let filter = CheckFilter { run_id: Some(r.id), failed_only, limit, ..Default::default() };
            out.extend(store.check_results(&filter)?.iter().map(|c| (r.started_at_ms, CheckView::of(c))));
        } else {
            if let Some(p) = &q.pipeline {
                app.served(p)?;
            }
            for (name, _, store) in app.all_served() {
                if q.pipeline.as_ref().is_some_and(|p| *p != name) {
                    continue;
                }
                let filter = CheckFilter { pipeline: Some(name), failed_only, limit, ..Default::default() };
                out.extend(store.check_results(&filter)?.iter().map(|c| (c.run_id, CheckView::of(c))));
            }
            out.sort_by_key(|c| std::cmp::Reverse(c.0));
        }
        let views: Vec<CheckView> = out.into_iter().take(limit).map(|(_, v)| v).collect();
        json(200, &views)
    })
    .await
}

#[utoipa::path(post, path = "/pipelines/{name}/backfills", tag = "backfills", request_body = CreateBackfill,
    params(("name" = String, Path, description = "The pipeline's name")),
    responses((status = 202, description = "Planned, persisted and started", body = BackfillAnswer),
        (status = 400, description = "Bad body or partitions", body = ErrorBody),
        (status = 404, description = "No such pipeline", body = ErrorBody),
        (status = 422, description = "The pipeline cannot be backfilled", body = ErrorBody),
        (status = 429, description = "Not enough free run slots for its parallelism", body = ErrorBody)))]
async fn create_backfill(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>, bytes: Bytes) -> Response {
    use crate::engine::backfill::{self, PartitionSpec};
    call(move || {
        let req: CreateBackfill = body(&bytes)?;
        let spec = if !req.partitions.is_empty() {
            if req.from.is_some() || req.to.is_some() {
                return Err(ApiError::new(400, "give `partitions` or `from` and `to`, not both"));
            }
            PartitionSpec::List(req.partitions.clone())
        } else {
            let (Some(from), Some(to)) = (req.from.clone(), req.to.clone()) else {
                return Err(ApiError::new(400, "say which partitions: `from` and `to`, or `partitions`"));
            };
            match req.every.as_deref().unwrap_or("day") {
                "day" | "daily" => PartitionSpec::Daily { from, to },
                "hour" | "hourly" => PartitionSpec::Hourly { from, to },
                other => return Err(ApiError::new(400, format!("every `{other}`: use day or hour"))),
            }
        };
        let partitions = spec.partitions().map_err(|e| ApiError::new(400, e))?;
        for p in &partitions {
            paths::check_partition(p)?;
        }
        if partitions.len() > 10_000 {
            return Err(ApiError::new(400, format!("{} partitions: at most 10000 in one backfill", partitions.len())));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = partitions.iter().find(|p| !seen.insert(p.as_str())) {
            return Err(ApiError::new(400, format!("partition `{dup}` is listed twice")));
        }
        let parallel = req.parallel.unwrap_or(1);
        if parallel == 0 || parallel > app.max_runs {
            return Err(ApiError::new(400, format!("parallel must be 1 to {} (--max-runs)", app.max_runs)));
        }
        let parallel = parallel.min(partitions.len().max(1));
        let (pipeline, _) = app.reload(&name)?;
        let slots = app.take_slots(parallel)?.hand_over(&app);
        let mut options = app.run_options(&name, None);
        options.force = req.force;
        let planned = backfill::create(&pipeline, &spec, parallel, &options).map_err(|e| early_error(&e))?;
        let id = join_id(&name, planned.id);
        spawn_backfill(
            &app,
            &id,
            slots,
            move |opts| backfill::run_planned(&pipeline, planned, parallel, opts),
            options,
        )?;
        json(202, &BackfillAnswer { id, status: "RUNNING".into(), partitions: partitions.len() })
    })
    .await
}

/// Run a backfill on its own thread; it holds its run slots until it ends.
fn spawn_backfill(
    app: &Arc<App>,
    id: &str,
    slots: super::OwnedSlots,
    work: impl FnOnce(&RunOptions) -> crate::Result<crate::engine::backfill::BackfillSummary> + Send + 'static,
    mut options: RunOptions,
) -> Result<(), ApiError> {
    let cancel = Arc::new(AtomicBool::new(false));
    options.cancel = Some(cancel.clone());
    let key = format!("backfill {id}");
    {
        // one executor per backfill in this server: a retried resume gets 409
        let mut active = app.active.lock().unwrap_or_else(|e| e.into_inner());
        if active.contains_key(&key) {
            return Err(ApiError::new(409, format!("backfill {id} is already running in this server")));
        }
        active.insert(key.clone(), cancel);
    }
    let (thread_app, thread_key, id) = (app.clone(), key.clone(), id.to_string());
    std::thread::Builder::new()
        .name(format!("backfill {id}"))
        .spawn(move || {
            let (app, key) = (thread_app, thread_key);
            let _slots = slots;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&options)));
            app.active.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            let how = match outcome {
                Ok(Ok(s)) => format!("{}: {} ran, {} failed", s.status.as_str(), s.ran, s.failed.len()),
                Ok(Err(e)) => format!("failed: {e}"),
                Err(_) => "failed: it panicked (a bug in weir)".into(),
            };
            (options.log)(Level::INFO, &format!("weir serve: backfill {id} {how}"));
        })
        .map(|_| ())
        .map_err(|e| {
            app.active.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            ApiError::new(503, format!("cannot start a backfill thread: {e}"))
        })
}

#[utoipa::path(get, path = "/backfills", tag = "backfills", params(BackfillsQuery),
    responses((status = 200, description = "Backfills, newest first", body = [BackfillView])))]
async fn list_backfills(
    State(app): State<Arc<App>>,
    q: Result<Query<BackfillsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    call(move || {
        let q = query(q)?;
        let limit = limit(q.limit, 20, 1000);
        if let Some(p) = &q.pipeline {
            app.served(p)?;
        }
        let mut all: Vec<BackfillRecord> = Vec::new();
        for (name, _, store) in app.all_served() {
            if q.pipeline.as_ref().is_some_and(|p| *p != name) {
                continue;
            }
            all.extend(store.backfills(Some(&name), limit)?);
        }
        all.sort_by_key(|b| std::cmp::Reverse(b.created_at_ms));
        let views: Vec<BackfillView> = all.iter().take(limit).map(BackfillView::of).collect();
        json(200, &views)
    })
    .await
}

impl App {
    fn find_backfill(&self, id: &str) -> Result<(BackfillRecord, Arc<Pipeline>), ApiError> {
        let (name, n) = parse_id(id)?;
        let (pipeline, store) = self.served(name)?;
        let b = store
            .backfill(n)?
            .filter(|b| b.pipeline == name)
            .ok_or_else(|| ApiError::new(404, format!("no backfill {id}")))?;
        Ok((b, pipeline))
    }
}

#[utoipa::path(get, path = "/backfills/{id}", tag = "backfills",
    params(("id" = String, Path, description = "PIPELINE.N")),
    responses((status = 200, description = "The backfill and its partitions", body = BackfillView),
        (status = 404, description = "No such backfill", body = ErrorBody)))]
async fn get_backfill(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> Response {
    call(move || json(200, &BackfillView::of(&app.find_backfill(&id)?.0))).await
}

#[utoipa::path(patch, path = "/backfills/{id}", tag = "backfills", request_body = CancelRun,
    params(("id" = String, Path, description = "PIPELINE.N")),
    responses((status = 202, description = "Cancelling: running partitions stop at a batch boundary, the others stay PENDING for a resume", body = CancelAnswer),
        (status = 400, description = "The body is not {\"status\": \"CANCELLED\"}", body = ErrorBody),
        (status = 404, description = "No such backfill", body = ErrorBody),
        (status = 409, description = "It has ended, or another process runs it", body = ErrorBody)))]
async fn cancel_backfill(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>, bytes: Bytes) -> Response {
    call(move || {
        let req: CancelRun = body(&bytes)?;
        if !req.status.eq_ignore_ascii_case("CANCELLED") {
            return Err(ApiError::new(400, "PATCH /backfills/{id} takes {\"status\": \"CANCELLED\"}"));
        }
        let (b, _) = app.find_backfill(&id)?;
        if let Some(flag) = app.active.lock().unwrap_or_else(|e| e.into_inner()).get(&format!("backfill {id}")) {
            flag.store(true, Ordering::Relaxed);
            (app.log)(Level::INFO, &format!("weir serve: backfill {id}: cancel requested"));
            return json(202, &CancelAnswer { id, status: "CANCELLING".into() });
        }
        Err(match b.status {
            Status::Running => ApiError::new(
                409,
                format!(
                    "backfill {id} is run by pid {} on {}, not by this server: stop that process; POST /backfills/{id}/resume continues it",
                    b.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                    b.host.as_deref().unwrap_or("?")
                ),
            ),
            s => ApiError::new(409, format!("backfill {id} is not running: {}", s.as_str())),
        })
    })
    .await
}

#[utoipa::path(post, path = "/backfills/{id}/resume", tag = "backfills", request_body = ResumeBackfill,
    params(("id" = String, Path, description = "PIPELINE.N")),
    responses((status = 202, description = "Resumed: its partitions not yet successful run again", body = BackfillAnswer),
        (status = 404, description = "No such backfill", body = ErrorBody),
        (status = 409, description = "It is still running", body = ErrorBody),
        (status = 429, description = "Not enough free run slots", body = ErrorBody)))]
async fn resume_backfill(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>, bytes: Bytes) -> Response {
    call(move || {
        let req: ResumeBackfill = body(&bytes)?;
        let (b, _) = app.find_backfill(&id)?;
        if b.status == Status::Running {
            return Err(ApiError::new(409, format!("backfill {id} is still running")));
        }
        if req.parallel.is_some_and(|p| p == 0 || p > app.max_runs) {
            return Err(ApiError::new(400, format!("parallel must be 1 to {} (--max-runs)", app.max_runs)));
        }
        let todo = b
            .partitions
            .iter()
            .filter(|p| if req.only_failed { p.status == "FAILED" } else { p.status != "SUCCESS" })
            .count();
        if todo == 0 {
            return json(200, &BackfillAnswer { id, status: b.status.as_str().into(), partitions: 0 });
        }
        // the stored parallelism may be more than this server allows, or than is left
        let parallel = req.parallel.unwrap_or(b.parallel as usize).clamp(1, app.max_runs).min(todo);
        let (pipeline, _) = app.reload(&b.pipeline)?;
        crate::engine::backfill::check_backfillable(&pipeline).map_err(|e| early_error(&e))?;
        let slots = app.take_slots(parallel)?.hand_over(&app);
        let options = app.run_options(&b.pipeline, None);
        let (n, only_failed) = (b.id, req.only_failed);
        spawn_backfill(
            &app,
            &id,
            slots,
            move |opts| crate::engine::backfill::resume(&pipeline, n, only_failed, Some(parallel), opts),
            options,
        )?;
        json(202, &BackfillAnswer { id, status: "RUNNING".into(), partitions: todo })
    })
    .await
}

fn dataset_ref(v: &Value) -> DatasetRef {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    DatasetRef { namespace: s("namespace"), name: s("name") }
}

#[utoipa::path(get, path = "/lineage", tag = "lineage", params(LineageQuery),
    responses((status = 200, description = "The runs that wrote the dataset, from which inputs", body = LineageView),
        (status = 403, description = "The path is outside the roots", body = ErrorBody)))]
async fn lineage(
    State(app): State<Arc<App>>,
    q: Result<Query<LineageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    call(move || {
        let q = query(q)?;
        let asked = PathBuf::from(&q.dataset);
        if !paths::within(&app.roots, &asked) {
            return Err(ApiError::new(403, format!("{} is outside the server's roots", asked.display())));
        }
        let target = paths::real(&app.roots, &asked);
        let target = target.ok_or_else(|| ApiError::new(403, format!("{} cannot be judged", asked.display())))?;
        let mut writes: Vec<(i64, LineageWrite)> = Vec::new();
        for (name, pipeline, store) in app.all_served() {
            for step in &pipeline.steps {
                let Some(out) = &step.output else { continue };
                if paths::real(&app.roots, &out.path).as_ref() != Some(&target) {
                    continue;
                }
                let filter = RunFilter { pipeline: Some(name.clone()), status: Some(Status::Success), limit: 200 };
                for r in store.runs(&filter)? {
                    let entries: Vec<_> = r.published.iter().filter(|e| e.step == step.name).collect();
                    if entries.is_empty() {
                        continue;
                    }
                    let input = crate::engine::input_dataset(&pipeline, step, r.partition.as_deref());
                    writes.push((
                        r.finished_at_ms.unwrap_or(r.started_at_ms),
                        LineageWrite {
                            run: join_id(&name, r.id),
                            pipeline: name.clone(),
                            step: step.name.clone(),
                            partition: r.partition.clone(),
                            finished_at: r.finished_at_ms.map(crate::lineage::rfc3339),
                            partitions: entries.iter().filter_map(|e| e.partition.clone()).collect(),
                            inputs: vec![dataset_ref(&input)],
                        },
                    ));
                }
            }
        }
        writes.sort_by_key(|w| std::cmp::Reverse(w.0));
        let dataset = dataset_ref(&crate::lineage::file_dataset(&target));
        json(200, &LineageView { dataset, writes: writes.into_iter().map(|(_, w)| w).collect() })
    })
    .await
}

// ---------------------------------------------------------------------------------------
// The document

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "weir",
        description = "Trigger and watch weir pipeline runs, backfills and quality checks. Run and backfill ids are PIPELINE.N. With tokens configured, send Authorization: Bearer TOKEN."
    ),
    paths(
        health, openapi, metrics, list_pipelines, register_pipeline, get_pipeline, trigger_run, list_runs, get_run,
        cancel_run, post_quality_check, list_checks, create_backfill, list_backfills, get_backfill, cancel_backfill,
        resume_backfill,
        lineage
    ),
    modifiers(&Bearer),
    security(("bearer" = []))
)]
struct ApiDoc;
