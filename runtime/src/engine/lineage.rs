//! The OpenLineage events of a run, its steps and a backfill (see [`crate::lineage`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{Staged, StepSummary};
use crate::config::{Pipeline, Step};
use crate::lineage::{self as ol, Emitter, Event};
use crate::plugin::LoadedPlugin;
use crate::{Error, Result};

/// Where a pipeline's events go: `WEIR_OPENLINEAGE_URL` (with `WEIR_OPENLINEAGE_NAMESPACE`)
/// over the pipeline file's `[lineage]`; none when neither says.
pub fn emitter(pipeline: &Pipeline, log: &super::LogFn) -> Result<Option<Arc<Emitter>>> {
    let base = pipeline.file.parent().map(PathBuf::from).unwrap_or_default();
    let config = match std::env::var("WEIR_OPENLINEAGE_URL") {
        Ok(url) if !url.trim().is_empty() => {
            let transport = ol::Config::transport_from_url(url.trim(), &base)
                .map_err(|m| Error::Lineage(format!("WEIR_OPENLINEAGE_URL: {m}")))?;
            let mut c = pipeline.lineage.clone().unwrap_or(ol::Config {
                transport: transport.clone(),
                namespace: "weir".into(),
                timeout: std::time::Duration::from_secs(2),
                retries: 2,
            });
            c.transport = transport;
            Some(c)
        }
        _ => pipeline.lineage.clone(),
    };
    let config = config.map(|mut c| {
        if let Ok(ns) = std::env::var("WEIR_OPENLINEAGE_NAMESPACE") {
            if !ns.trim().is_empty() {
                c.namespace = ns.trim().to_string();
            }
        }
        c
    });
    Ok(config.map(|c| Arc::new(Emitter::new(c, log.clone()))))
}

/// The run id of a backfill, as its partition runs name it in their `parent` facet.
pub fn backfill_run_id(pipeline: &Pipeline, backfill: i64) -> String {
    ol::run_uuid(&format!("{}:{}:backfill:{backfill}", pipeline.state_path.display(), pipeline.name))
}

pub fn backfill_job(pipeline: &Pipeline) -> String {
    format!("{}.backfill", pipeline.name)
}

/// A backfill's START: registered as in progress, so a signal sends its ABORT. Returns the
/// key [`backfill_end`] takes.
pub fn backfill_start(emitter: &Arc<Emitter>, pipeline: &Pipeline, backfill: i64) -> u64 {
    backfill_event(emitter, pipeline, backfill, "START", None);
    let mut run_facets = Map::new();
    run_facets.insert("processing_engine".into(), ol::processing_engine());
    ol::begin_active(ol::Active {
        emitter: emitter.clone(),
        run_id: backfill_run_id(pipeline, backfill),
        job: backfill_job(pipeline),
        run_facets,
        job_type: "BACKFILL",
        step: None,
    })
}

/// A backfill's COMPLETE or FAIL.
pub fn backfill_end(emitter: &Emitter, pipeline: &Pipeline, backfill: i64, key: u64, error: Option<&str>) {
    ol::end_active(key);
    let event = if error.is_some() { "FAIL" } else { "COMPLETE" };
    backfill_event(emitter, pipeline, backfill, event, error);
}

/// A backfill's own START or end event.
fn backfill_event(emitter: &Emitter, pipeline: &Pipeline, backfill: i64, event_type: &str, error: Option<&str>) {
    let mut run_facets = Map::new();
    run_facets.insert("processing_engine".into(), ol::processing_engine());
    if let Some(e) = error {
        run_facets.insert("errorMessage".into(), ol::error_message(e));
    }
    let mut job_facets = Map::new();
    job_facets.insert("jobType".into(), ol::job_type("BACKFILL"));
    let run_id = backfill_run_id(pipeline, backfill);
    let job = backfill_job(pipeline);
    emitter.emit(
        &Event {
            event_type,
            run_id: &run_id,
            namespace: emitter.namespace(),
            job: &job,
            run_facets,
            job_facets,
            inputs: vec![],
            outputs: vec![],
        }
        .to_json(),
    );
}

/// One run's events.
pub struct RunLineage {
    emitter: Arc<Emitter>,
    run_id: String,
    job: String,
    /// The run's own facets: engine, nominal time, parent backfill, plugins.
    facets: Map<String, Value>,
    /// Per step: its run id, once started.
    steps: HashMap<String, String>,
    inputs: Vec<Value>,
    outputs: Vec<Value>,
    /// Its entry among the runs an ABORT would stop.
    active: u64,
}

impl RunLineage {
    /// The run's START event.
    pub fn start(
        emitter: Arc<Emitter>,
        pipeline: &Pipeline,
        partition: Option<&str>,
        backfill: Option<i64>,
        run: i64,
        loaded: &HashMap<String, LoadedPlugin>,
    ) -> RunLineage {
        let started = ol::now();
        let run_id = ol::run_uuid(&format!("{}:{}:{run}:{started}", pipeline.state_path.display(), pipeline.name));
        let mut facets = Map::new();
        facets.insert("processing_engine".into(), ol::processing_engine());
        if let Some(t) = partition.and_then(ol::nominal_time) {
            facets.insert("nominalTime".into(), t);
        }
        if let Some(b) = backfill {
            facets.insert(
                "parent".into(),
                ol::parent(&backfill_run_id(pipeline, b), emitter.namespace(), &backfill_job(pipeline)),
            );
        }
        let mut digests: Vec<(String, String)> =
            loaded.iter().map(|(name, p)| (name.clone(), p.info.sha256.clone())).collect();
        digests.sort();
        facets.insert("weir_plugins".into(), ol::plugins(&digests));
        let active = ol::begin_active(ol::Active {
            emitter: emitter.clone(),
            run_id: run_id.clone(),
            job: pipeline.name.clone(),
            run_facets: facets.clone(),
            job_type: "PIPELINE",
            step: None,
        });
        let r = RunLineage {
            emitter,
            run_id,
            job: pipeline.name.clone(),
            facets,
            steps: HashMap::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            active,
        };
        r.send("START", &r.run_id, &r.job, r.facets.clone(), "PIPELINE", vec![], vec![]);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        event_type: &str,
        run_id: &str,
        job: &str,
        run_facets: Map<String, Value>,
        job_type: &str,
        inputs: Vec<Value>,
        outputs: Vec<Value>,
    ) {
        let mut job_facets = Map::new();
        job_facets.insert("jobType".into(), ol::job_type(job_type));
        let event = Event {
            event_type,
            run_id,
            namespace: self.emitter.namespace(),
            job,
            run_facets,
            job_facets,
            inputs,
            outputs,
        };
        self.emitter.emit(&event.to_json());
    }

    fn step_facets(&self, extra: Option<(&str, Value)>) -> Map<String, Value> {
        let mut f = Map::new();
        f.insert("parent".into(), ol::parent(&self.run_id, self.emitter.namespace(), &self.job));
        f.insert("processing_engine".into(), ol::processing_engine());
        if let Some(t) = self.facets.get("nominalTime") {
            f.insert("nominalTime".into(), t.clone());
        }
        if let Some((k, v)) = extra {
            f.insert(k.into(), v);
        }
        f
    }

    /// A step's START: a child run of the pipeline run.
    pub fn step_start(&mut self, pipeline: &Pipeline, step: &Step, partition: Option<&str>) {
        let run_id = ol::run_uuid(&format!("{}:step:{}", self.run_id, step.name));
        let inputs = vec![input_dataset(pipeline, step, partition)];
        self.send("START", &run_id, &self.step_job(step), self.step_facets(None), "STEP", inputs, vec![]);
        let running = (run_id.clone(), self.step_job(step), self.step_facets(None));
        ol::update_active(self.active, |a| a.step = Some(running));
        self.steps.insert(step.name.clone(), run_id);
    }

    fn step_job(&self, step: &Step) -> String {
        format!("{}.{}", self.job, step.name)
    }

    /// A step's COMPLETE, with what it read and wrote.
    pub fn step_complete(
        &mut self,
        pipeline: &Pipeline,
        step: &Step,
        partition: Option<&str>,
        summary: &StepSummary,
        staged: &Staged,
    ) {
        let Some(run_id) = self.steps.get(&step.name).cloned() else { return };
        ol::update_active(self.active, |a| a.step = None);
        let mut input = input_dataset(pipeline, step, partition);
        let (k, v) = ol::statistics(false, summary.rows_read, None, Some(summary.files as u64));
        input["inputFacets"] = json!({ k: v });
        let mut outputs = Vec::new();
        if let Some(out) = &step.output {
            let mut o = ol::output_dataset(out);
            let mut facets = Map::new();
            facets.insert("schema".into(), ol::schema(&staged.schema));
            if !summary.checks.is_empty() {
                facets.insert("dataQualityAssertions".into(), ol::assertions(&summary.checks));
            }
            o["facets"] = Value::Object(facets);
            let (k, v) =
                ol::statistics(true, summary.rows_written, Some(summary.bytes_written), Some(summary.files_written));
            o["outputFacets"] = json!({ k: v });
            outputs.push(o);
        }
        self.send(
            "COMPLETE",
            &run_id,
            &self.step_job(step),
            self.step_facets(None),
            "STEP",
            vec![input.clone()],
            outputs.clone(),
        );
        if !self.inputs.iter().any(|i| i["name"] == input["name"]) && pipeline.sources.contains_key(&step.input) {
            self.inputs.push(input);
        }
        self.outputs.extend(outputs);
    }

    /// A step's FAIL; `checks`, the step's check results when its quality gate failed it,
    /// go with the output it would have written.
    /// A step's FAIL (ABORT when it was `cancelled` on request).
    pub fn step_fail(&mut self, step: &Step, error: &str, cancelled: bool, checks: &[crate::quality::CheckResult]) {
        let Some(run_id) = self.steps.get(&step.name).cloned() else { return };
        ol::update_active(self.active, |a| a.step = None);
        let facets = self.step_facets(Some(("errorMessage", ol::error_message(error))));
        let mut outputs = Vec::new();
        if let (Some(out), false) = (&step.output, checks.is_empty()) {
            let mut o = ol::output_dataset(out);
            o["facets"] = json!({ "dataQualityAssertions": ol::assertions(checks) });
            outputs.push(o);
        }
        // a step stopped on request is aborted, as the run is
        let event = if cancelled { "ABORT" } else { "FAIL" };
        self.send(event, &run_id, &self.step_job(step), facets, "STEP", vec![], outputs);
    }

    /// The run was stopped on request (`reason`): ABORT for it.
    pub fn abort(self, reason: &str) {
        ol::end_active(self.active);
        let mut facets = self.facets.clone();
        facets.insert("errorMessage".into(), ol::error_message(&format!("cancelled: {reason}")));
        self.send("ABORT", &self.run_id, &self.job, facets, "PIPELINE", vec![], vec![]);
    }

    /// The run's COMPLETE or FAIL, with the sources it read and the datasets it wrote.
    pub fn end(self, error: Option<&str>) {
        ol::end_active(self.active);
        let mut facets = self.facets.clone();
        let event_type = match error {
            Some(e) => {
                facets.insert("errorMessage".into(), ol::error_message(e));
                "FAIL"
            }
            None => "COMPLETE",
        };
        let (inputs, outputs) = match error {
            None => (self.inputs.clone(), self.outputs.clone()),
            Some(_) => (vec![], vec![]),
        };
        self.send(event_type, &self.run_id, &self.job, facets, "PIPELINE", inputs, outputs);
    }
}

/// A step's input: its source's files, or the dataset an earlier step wrote.
pub(crate) fn input_dataset(pipeline: &Pipeline, step: &Step, partition: Option<&str>) -> Value {
    if let Some(source) = pipeline.sources.get(&step.input) {
        if let Some(pg) = &source.postgres {
            return postgres_dataset(pg);
        }
        if let Some(x) = &source.extractor {
            // what the plugin reads is its own business: named by plugin and source
            return json!({ "namespace": format!("weir-extractor://{}", x.plugin), "name": source.name });
        }
        let path = match partition {
            Some(p) => source.path.replace("{partition}", p),
            None => source.path.clone(),
        };
        // the config resolved it against the pipeline file already
        return ol::file_dataset(std::path::Path::new(&path));
    }
    match pipeline.step(&step.input).and_then(|s| s.output.as_ref()) {
        Some(out) => ol::output_dataset(out),
        None => json!({ "namespace": "weir", "name": format!("{}.{}", pipeline.name, step.input) }),
    }
}

/// A PostgreSQL table as OpenLineage names it: namespace `postgres://HOST:PORT`, name
/// `DATABASE.SCHEMA.TABLE` (a query: `DATABASE.query`). The URL is parsed by the driver and
/// only its host, port and database are used: credentials go nowhere, and a URL that does
/// not parse names no host at all.
fn postgres_dataset(pg: &crate::config::Postgres) -> Value {
    let config: Option<postgres::Config> =
        pg.url.resolve().ok().and_then(|u| String::from_utf8(u).ok()).and_then(|u| u.parse().ok());
    let (host, port, db) = match &config {
        Some(c) => {
            let host = match c.get_hosts().first() {
                Some(postgres::config::Host::Tcp(h)) => h.clone(),
                #[cfg(unix)]
                Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => "localhost".to_string(),
            };
            let user = c.get_user().unwrap_or("postgres");
            (host, c.get_ports().first().copied().unwrap_or(5432), c.get_dbname().unwrap_or(user).to_string())
        }
        None => ("unknown".to_string(), 5432, "unknown".to_string()),
    };
    let table = match &pg.table {
        Some(t) if t.contains('.') => t.clone(),
        Some(t) => format!("public.{t}"),
        None => "query".to_string(),
    };
    json!({ "namespace": format!("postgres://{host}:{port}"), "name": format!("{db}.{table}") })
}
