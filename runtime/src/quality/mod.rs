//! Quality gates: checks declared on a step's output, run before publish.
//!
//! Row-level checks (`not_null`, `accepted_values`, `range`, `regex`, `unique`,
//! `relationships`) look at every batch on its way to the staging writer: with severity
//! `quarantine` the failing rows leave the output for the quarantine dataset (with run,
//! partition, check and reason); with `block` or `warn` they are counted. Dataset-level
//! checks (`row_count`, `volume`, `freshness`, `anomaly`) run when the step's input ends.
//! Every check then has a result: passed or not, observed value, threshold, failing rows
//! and a capped sample. A failed `block` check fails the run before anything is published.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow_cast::display::ArrayFormatter;
use arrow_schema::{DataType, Field, Schema, SchemaRef};

/// What happens when a check fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The partition is not published; the run fails naming the check.
    Block,
    /// Recorded and shown; the run succeeds (exit code 3).
    Warn,
    /// Row-level only: failing rows go to the quarantine dataset; the rest publish.
    Quarantine,
}

impl Severity {
    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Block => "block",
            Severity::Warn => "warn",
            Severity::Quarantine => "quarantine",
        }
    }
}

/// The metric an `anomaly` check watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Metric {
    RowCount,
    NullRate(String),
    Mean(String),
}

/// Where `relationships` looks values up.
#[derive(Debug, Clone, PartialEq)]
pub enum RelTarget {
    /// Another step's output in the same run (it must come earlier).
    Step(String),
    /// A published Parquet dataset (a file or directory).
    Path(std::path::PathBuf),
}

/// The kinds of check.
#[derive(Debug, Clone)]
pub enum Kind {
    NotNull {
        column: String,
    },
    AcceptedValues {
        column: String,
        values: HashSet<String>,
    },
    Range {
        column: String,
        min: Option<f64>,
        max: Option<f64>,
    },
    Regex {
        column: String,
        pattern: regex::Regex,
    },
    Unique {
        columns: Vec<String>,
    },
    Relationships {
        column: String,
        target: RelTarget,
        target_column: String,
    },
    RowCount {
        min: Option<u64>,
        max: Option<u64>,
    },
    Volume {
        max_change: f64,
    },
    Freshness {
        column: String,
        max_age_secs: i64,
    },
    Anomaly {
        metric: Metric,
        runs: usize,
        z: f64,
    },
    /// A quality-rule plugin (`check = "plugin"`): per-row verdicts and a final verdict.
    Plugin {
        plugin: String,
        config_json: String,
    },
}

impl Kind {
    pub fn is_row_level(&self) -> bool {
        matches!(
            self,
            Kind::NotNull { .. }
                | Kind::AcceptedValues { .. }
                | Kind::Range { .. }
                | Kind::Regex { .. }
                | Kind::Unique { .. }
                | Kind::Relationships { .. }
                | Kind::Plugin { .. }
        )
    }

    /// The columns the check reads.
    pub fn columns(&self) -> Vec<&str> {
        match self {
            Kind::NotNull { column }
            | Kind::AcceptedValues { column, .. }
            | Kind::Range { column, .. }
            | Kind::Regex { column, .. }
            | Kind::Relationships { column, .. }
            | Kind::Freshness { column, .. } => vec![column.as_str()],
            Kind::Unique { columns } => columns.iter().map(String::as_str).collect(),
            Kind::Anomaly { metric: Metric::NullRate(c) | Metric::Mean(c), .. } => vec![c.as_str()],
            _ => vec![],
        }
    }
}

/// A declared check.
#[derive(Debug, Clone)]
pub struct Check {
    /// Shown in results: `not_null(order_id)` unless the file names it.
    pub name: String,
    pub kind: Kind,
    pub severity: Severity,
    /// Failing rows still acceptable: a fraction of the rows when below 1, else a count.
    pub tolerance: f64,
    pub line: usize,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckResult {
    pub step: String,
    pub check: String,
    pub severity: Severity,
    pub passed: bool,
    pub observed: String,
    pub threshold: String,
    pub failing_rows: u64,
    pub sample: Vec<String>,
    /// What a quality-rule plugin measured: its batches' metrics summed by name, then its
    /// final verdict's (which win for the names they repeat).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

const SAMPLE: usize = 5;
/// Distinct metric names kept per rule check (a plugin could send any number).
const MAX_RULE_METRICS: usize = 100;

/// History the dataset-level checks compare against.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Rows the step wrote in the previous successful run of the pipeline.
    pub previous_rows: Option<u64>,
    /// Observed values of each anomaly check in earlier successful runs, newest first.
    pub metrics: HashMap<String, Vec<f64>>,
    /// The run's logical time (end of the partition's day, or now), Unix seconds.
    pub logical_time: i64,
}

struct RowState {
    failing: u64,
    /// Up to [`SAMPLE`] distinct reasons, each with its count and first row numbers.
    sample: Vec<SampleReason>,
    /// `unique`: the keys seen, opened on the first batch.
    seen: Option<crate::state::KeyedState>,
}

/// The keys a `unique` check may hold in memory.
const UNIQUE_KEY_BYTES: usize = 4 << 30;

/// One distinct reason rows failed a check for.
struct SampleReason {
    why: String,
    count: u64,
    /// 1-based numbers of the first rows failing for it, counted as rows reach the checks
    /// in this run (quarantined rows included; a resumed run counts from its restart).
    rows: Vec<u64>,
}

impl SampleReason {
    /// `country is null (rows 1, 4, 7 and 2 more)`
    fn describe(&self) -> String {
        let list: Vec<String> = self.rows.iter().map(u64::to_string).collect();
        let more = self.count - self.rows.len() as u64;
        format!(
            "{} (row{} {}{})",
            self.why,
            if self.count == 1 { "" } else { "s" },
            list.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        )
    }
}

/// Row numbers kept per sampled reason.
const SAMPLE_ROWS: usize = 5;

/// Applies a step's checks to its output, batch by batch.
pub struct Checker {
    step: String,
    checks: Vec<Check>,
    states: Vec<RowState>,
    /// Relationship targets: check index -> values present there.
    targets: HashMap<usize, HashSet<String>>,
    /// Rows kept (that go on to the output).
    rows: u64,
    /// Rows checked so far, kept or not: numbers failing rows for the samples.
    rows_checked: u64,
    nulls: HashMap<String, u64>,
    sums: HashMap<String, (f64, u64)>,
    newest: HashMap<String, i64>,
    quarantine_schema: SchemaRef,
    run_id: i64,
    partition: String,
    /// Quality-rule plugin instances, by check index.
    rules: HashMap<usize, crate::plugin::RuleInstance>,
    /// A rule plugin that failed (trap, deadline, bad answer): its check fails with this.
    rule_errors: HashMap<usize, String>,
    /// What rule plugins measured, by check index.
    rule_metrics: HashMap<usize, BTreeMap<String, f64>>,
}

fn formatter(array: &dyn Array) -> Option<ArrayFormatter<'_>> {
    ArrayFormatter::try_new(array, &Default::default()).ok()
}

impl Checker {
    /// A checker for a step's output of `schema`; `targets` holds the values of each
    /// relationships check's target column (by check index).
    pub fn new(
        step: &str,
        checks: Vec<Check>,
        schema: &SchemaRef,
        targets: HashMap<usize, HashSet<String>>,
        run_id: i64,
        partition: Option<&str>,
    ) -> Result<Checker, String> {
        for c in &checks {
            for col in c.kind.columns() {
                let field = schema.field_with_name(col).map_err(|_| {
                    format!(
                        "check `{}` reads column `{col}`, which step `{step}` does not output (columns: {})",
                        c.name,
                        weir_sdk::util::schema_text(schema)
                    )
                })?;
                let ok = match &c.kind {
                    Kind::Range { .. } | Kind::Anomaly { metric: Metric::Mean(_), .. } => {
                        field.data_type().is_numeric()
                    }
                    Kind::Regex { .. } => field.data_type() == &DataType::Utf8,
                    Kind::Freshness { .. } => matches!(field.data_type(), DataType::Timestamp(_, _) | DataType::Date32),
                    _ => true,
                };
                if !ok {
                    return Err(format!("check `{}` cannot read column `{col}` of type {}", c.name, field.data_type()));
                }
            }
        }
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect();
        fields.push(Field::new("_weir_run_id", DataType::Int64, false));
        fields.push(Field::new("_weir_partition", DataType::Utf8, false));
        fields.push(Field::new("_weir_check", DataType::Utf8, false));
        fields.push(Field::new("_weir_reason", DataType::Utf8, false));
        let states = checks.iter().map(|_| RowState { failing: 0, sample: Vec::new(), seen: None }).collect();
        Ok(Checker {
            step: step.to_string(),
            checks,
            states,
            targets,
            rows: 0,
            rows_checked: 0,
            nulls: HashMap::new(),
            sums: HashMap::new(),
            newest: HashMap::new(),
            quarantine_schema: Arc::new(Schema::new(fields)),
            run_id,
            partition: partition.unwrap_or("__all__").to_string(),
            rules: HashMap::new(),
            rule_errors: HashMap::new(),
            rule_metrics: HashMap::new(),
        })
    }

    /// Hand over the initialised instances of the step's plugin checks (by check index).
    pub fn with_rules(mut self, rules: HashMap<usize, crate::plugin::RuleInstance>) -> Self {
        self.rules = rules;
        self
    }

    /// The schema of quarantined rows: the output's columns plus run, partition, check, reason.
    pub fn quarantine_schema(&self) -> SchemaRef {
        self.quarantine_schema.clone()
    }

    /// Whether any check quarantines rows.
    pub fn quarantines(&self) -> bool {
        self.checks.iter().any(|c| c.severity == Severity::Quarantine)
    }

    /// Check one batch: returns the rows that go on to the output and the quarantined rows.
    pub fn apply(&mut self, batch: &RecordBatch) -> Result<(RecordBatch, Option<RecordBatch>), String> {
        let n = batch.num_rows();
        let schema = batch.schema();
        let mut keep = vec![true; n];
        let mut reasons: Vec<Option<(String, String)>> = vec![None; n];
        for ci in 0..self.checks.len() {
            if !self.checks[ci].kind.is_row_level() {
                continue;
            }
            let fails = self.failing_rows(ci, batch)?;
            let (severity, name) = (self.checks[ci].severity, self.checks[ci].name.clone());
            let state = &mut self.states[ci];
            for (row, why) in fails {
                state.failing += 1;
                let number = self.rows_checked + row as u64 + 1;
                let room = state.sample.len() < SAMPLE;
                match state.sample.iter_mut().find(|s| s.why == why) {
                    Some(s) => {
                        s.count += 1;
                        if s.rows.len() < SAMPLE_ROWS {
                            s.rows.push(number);
                        }
                    }
                    None if room => state.sample.push(SampleReason { why: why.clone(), count: 1, rows: vec![number] }),
                    None => {}
                }
                if severity == Severity::Quarantine && keep[row] {
                    keep[row] = false;
                    reasons[row] = Some((name.clone(), why));
                }
            }
        }
        self.rows_checked += n as u64;
        // metrics for the dataset-level checks, over the rows that stay
        let kept_rows = keep.iter().filter(|k| **k).count() as u64;
        self.rows += kept_rows;
        for check in &self.checks {
            for col in check.kind.columns() {
                let array = batch.column(schema.index_of(col).map_err(|e| e.to_string())?);
                match &check.kind {
                    Kind::Anomaly { metric: Metric::NullRate(_), .. } => {
                        let nulls = (0..n).filter(|&r| keep[r] && array.is_null(r)).count() as u64;
                        *self.nulls.entry(col.to_string()).or_insert(0) += nulls;
                    }
                    Kind::Anomaly { metric: Metric::Mean(_), .. } => {
                        let f = arrow_cast::cast(array, &DataType::Float64).map_err(|e| e.to_string())?;
                        let f = f.as_any().downcast_ref::<arrow_array::Float64Array>().ok_or("mean of a non-number")?;
                        let e = self.sums.entry(col.to_string()).or_insert((0.0, 0));
                        for r in (0..n).filter(|&r| keep[r] && f.is_valid(r)) {
                            e.0 += f.value(r);
                            e.1 += 1;
                        }
                    }
                    Kind::Freshness { .. } => {
                        let secs = to_epoch_seconds(array)?;
                        for (r, s) in secs.iter().enumerate() {
                            if let (true, Some(s)) = (keep[r], s) {
                                let e = self.newest.entry(col.to_string()).or_insert(i64::MIN);
                                *e = (*e).max(*s);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if kept_rows as usize == n {
            return Ok((batch.clone(), None));
        }
        let mask = BooleanArray::from(keep.clone());
        let good = arrow_select::filter::filter_record_batch(batch, &mask).map_err(|e| e.to_string())?;
        let bad_mask = BooleanArray::from(keep.iter().map(|k| !k).collect::<Vec<_>>());
        let bad = arrow_select::filter::filter_record_batch(batch, &bad_mask).map_err(|e| e.to_string())?;
        let m = bad.num_rows();
        let mut columns: Vec<ArrayRef> = bad.columns().to_vec();
        let (checks, whys): (Vec<String>, Vec<String>) = reasons.into_iter().flatten().unzip();
        columns.push(Arc::new(Int64Array::from(vec![self.run_id; m])));
        columns.push(Arc::new(StringArray::from(vec![self.partition.as_str(); m])));
        columns.push(Arc::new(StringArray::from(checks)));
        columns.push(Arc::new(StringArray::from(whys)));
        let quarantined = RecordBatch::try_new(self.quarantine_schema.clone(), columns).map_err(|e| e.to_string())?;
        Ok((good, Some(quarantined)))
    }

    /// (row, reason) of each row of `batch` that fails row-level check `ci`.
    fn failing_rows(&mut self, ci: usize, batch: &RecordBatch) -> Result<Vec<(usize, String)>, String> {
        let schema = batch.schema();
        let col = |name: &str| -> Result<&ArrayRef, String> {
            Ok(batch.column(schema.index_of(name).map_err(|e| e.to_string())?))
        };
        let n = batch.num_rows();
        let mut out = Vec::new();
        match &self.checks[ci].kind {
            Kind::NotNull { column } => {
                let a = col(column)?;
                for r in (0..n).filter(|&r| a.is_null(r)) {
                    out.push((r, format!("{column} is null")));
                }
            }
            Kind::AcceptedValues { column, values } => {
                let a = col(column)?;
                let f = formatter(a.as_ref()).ok_or("cannot format values")?;
                for r in (0..n).filter(|&r| a.is_valid(r)) {
                    let v = f.value(r).to_string();
                    if !values.contains(&v) {
                        out.push((r, format!("{column} = {v:?} is not an accepted value")));
                    }
                }
            }
            Kind::Range { column, min, max } => {
                let a = col(column)?;
                let f = arrow_cast::cast(a, &DataType::Float64).map_err(|e| e.to_string())?;
                let f = f.as_any().downcast_ref::<arrow_array::Float64Array>().ok_or("range of a non-number")?;
                for r in (0..n).filter(|&r| f.is_valid(r)) {
                    let v = f.value(r);
                    if min.is_some_and(|m| v < m) || max.is_some_and(|m| v > m) {
                        out.push((r, format!("{column} = {v} is outside [{}, {}]", fmt_bound(*min), fmt_bound(*max))));
                    }
                }
            }
            Kind::Regex { column, pattern } => {
                let a = col(column)?.as_any().downcast_ref::<StringArray>().ok_or("regex on a non-string")?.clone();
                for r in (0..n).filter(|&r| a.is_valid(r)) {
                    if !pattern.is_match(a.value(r)) {
                        out.push((r, format!("{column} = {:?} does not match /{}/", a.value(r), pattern.as_str())));
                    }
                }
            }
            Kind::Unique { columns } => {
                let arrays: Vec<ArrayRef> = columns.iter().map(|c| col(c).cloned()).collect::<Result<_, _>>()?;
                // as in SQL, a key with a null is not a duplicate
                let rows: Vec<u32> =
                    (0..n).filter(|&r| arrays.iter().all(|a| a.is_valid(r))).map(|r| r as u32).collect();
                let keys: Vec<ArrayRef> = if rows.len() == n {
                    arrays.clone()
                } else {
                    let idx = arrow_array::UInt32Array::from(rows.clone());
                    arrays
                        .iter()
                        .map(|a| arrow_select::take::take(a, &idx, None))
                        .collect::<Result<_, _>>()
                        .map_err(|e| e.to_string())?
                };
                let fields: Vec<Field> = columns
                    .iter()
                    .zip(&keys)
                    .enumerate()
                    .map(|(i, (c, a))| Field::new(format!("{i}:{c}"), a.data_type().clone(), true))
                    .collect();
                let keys = RecordBatch::try_new(Arc::new(Schema::new(fields)), keys).map_err(|e| e.to_string())?;
                let seen = match &mut self.states[ci].seen {
                    Some(s) => s,
                    slot => {
                        let names: Vec<String> = keys.schema().fields().iter().map(|f| f.name().clone()).collect();
                        let names: Vec<&str> = names.iter().map(String::as_str).collect();
                        let spec = crate::state::Spec::set(&format!("unique-{ci}"), &names);
                        slot.insert(
                            crate::state::KeyedState::open(spec, keys.schema(), None, None)
                                .map_err(|e| e.to_string())?,
                        )
                    }
                };
                let fresh = seen.insert_new(&keys, UNIQUE_KEY_BYTES).map_err(|e| match e {
                    crate::state::Error::Budget { .. } => {
                        format!("{e}; a unique check holds at most {} MiB of keys", UNIQUE_KEY_BYTES >> 20)
                    }
                    e => e.to_string(),
                })?;
                for (&r, new) in rows.iter().zip(fresh) {
                    if !new {
                        let r = r as usize;
                        let shown: Vec<String> = arrays
                            .iter()
                            .zip(columns)
                            .map(|(a, c)| {
                                format!(
                                    "{c}={}",
                                    formatter(a.as_ref()).map(|f| f.value(r).to_string()).unwrap_or_default()
                                )
                            })
                            .collect();
                        out.push((r, format!("duplicate {}", shown.join(", "))));
                    }
                }
            }
            Kind::Plugin { plugin, .. } => {
                if self.rule_errors.contains_key(&ci) {
                    return Ok(out);
                }
                let Some(rule) = self.rules.get_mut(&ci) else { return Ok(out) };
                match rule.check(batch) {
                    Ok(v) => {
                        let metrics = self.rule_metrics.entry(ci).or_default();
                        // (JSON has no NaN or infinity: such a value would lose them all)
                        for (name, value) in v.metrics.into_iter().filter(|(_, v)| v.is_finite()) {
                            if metrics.len() < MAX_RULE_METRICS || metrics.contains_key(&name) {
                                *metrics.entry(name).or_insert(0.0) += value;
                            }
                        }
                        for (i, row) in v.failed_rows.iter().enumerate() {
                            let why = v
                                .reasons
                                .get(i)
                                .or(v.reasons.first())
                                .cloned()
                                .unwrap_or_else(|| format!("rejected by {plugin}"));
                            out.push((*row as usize, why));
                        }
                    }
                    Err(e) => {
                        self.rule_errors.insert(ci, format!("the rule plugin `{plugin}` failed: {e}"));
                        self.rules.remove(&ci);
                    }
                }
            }
            Kind::Relationships { column, target, target_column } => {
                let a = col(column)?;
                let f = formatter(a.as_ref()).ok_or("cannot format values")?;
                let present = self.targets.get(&ci).ok_or("relationship target not loaded")?;
                let to = match target {
                    RelTarget::Step(s) => format!("{s}.{target_column}"),
                    RelTarget::Path(p) => format!("{}:{target_column}", p.display()),
                };
                for r in (0..n).filter(|&r| a.is_valid(r)) {
                    let v = f.value(r).to_string();
                    if !present.contains(&v) {
                        out.push((r, format!("{column} = {v:?} is not in {to}")));
                    }
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// End of input: every check's result.
    pub fn finish(&mut self, history: &History) -> Vec<CheckResult> {
        // plugin checks give their verdict first; a failure there fails the check
        let mut verdicts: HashMap<usize, crate::plugin::RuleVerdict> = HashMap::new();
        let indices: Vec<usize> = self.rules.keys().copied().collect();
        for ci in indices {
            if let Some(mut rule) = self.rules.remove(&ci) {
                match rule.finish() {
                    Ok(v) => {
                        verdicts.insert(ci, v);
                    }
                    Err(e) => {
                        let plugin = match &self.checks[ci].kind {
                            Kind::Plugin { plugin, .. } => plugin.clone(),
                            _ => String::new(),
                        };
                        self.rule_errors.insert(ci, format!("the rule plugin `{plugin}` failed at the end: {e}"));
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (ci, c) in self.checks.iter().enumerate() {
            let st = &self.states[ci];
            let total = self.rows + if c.severity == Severity::Quarantine { st.failing } else { 0 };
            let allowed =
                if c.tolerance < 1.0 { (c.tolerance * total as f64).floor() as u64 } else { c.tolerance as u64 };
            let mut r = CheckResult {
                step: self.step.clone(),
                check: c.name.clone(),
                severity: c.severity,
                passed: true,
                observed: String::new(),
                threshold: String::new(),
                failing_rows: 0,
                sample: Vec::new(),
                metrics: self.rule_metrics.remove(&ci).unwrap_or_default(),
            };
            if c.kind.is_row_level() {
                r.failing_rows = st.failing;
                r.sample = st.sample.iter().map(SampleReason::describe).collect();
                r.observed = format!("{} of {} rows fail", st.failing, total);
                r.threshold = format!("at most {allowed} (tolerance {})", c.tolerance);
                // quarantined rows are handled: the check fails (is reported) only past tolerance
                r.passed = st.failing <= allowed;
                if let Some(err) = self.rule_errors.get(&ci) {
                    r.passed = false;
                    r.observed = err.clone();
                } else if let Some(v) = verdicts.get(&ci) {
                    for (name, value) in v.metrics.iter().filter(|(_, v)| v.is_finite()) {
                        if r.metrics.len() < MAX_RULE_METRICS || r.metrics.contains_key(name) {
                            r.metrics.insert(name.clone(), *value);
                        }
                    }
                    r.passed &= v.passed;
                    let said = v.observed.clone().unwrap_or_else(|| v.message.clone());
                    if !said.is_empty() {
                        r.observed = format!("{}; the rule says: {said}", r.observed);
                    }
                }
                out.push(r);
                continue;
            }
            match &c.kind {
                Kind::RowCount { min, max } => {
                    r.observed = self.rows.to_string();
                    r.threshold = format!(
                        "between {} and {}",
                        min.map(|v| v.to_string()).unwrap_or("-".into()),
                        max.map(|v| v.to_string()).unwrap_or("-".into())
                    );
                    r.passed = min.is_none_or(|m| self.rows >= m) && max.is_none_or(|m| self.rows <= m);
                }
                Kind::Volume { max_change } => {
                    r.threshold = format!("within ±{:.0}% of the previous run", max_change * 100.0);
                    match history.previous_rows {
                        None => r.observed = format!("{} rows (no previous successful run)", self.rows),
                        Some(0) => {
                            r.observed = format!("{} rows (previous run wrote 0)", self.rows);
                            r.passed = self.rows == 0;
                        }
                        Some(p) => {
                            let change = (self.rows as f64 - p as f64) / p as f64;
                            r.observed = format!("{} rows, {:+.1}% vs {p}", self.rows, change * 100.0);
                            r.passed = change.abs() <= *max_change;
                        }
                    }
                }
                Kind::Freshness { column, max_age_secs } => {
                    r.threshold = format!("newest {column} at most {max_age_secs} s before the logical time");
                    match self.newest.get(column) {
                        None => {
                            r.observed = "no values".into();
                            r.passed = false;
                        }
                        Some(newest) => {
                            let age = history.logical_time - newest;
                            r.observed =
                                format!("newest is {age} s old ({})", crate::store::format_time(newest * 1000));
                            r.passed = age <= *max_age_secs;
                        }
                    }
                }
                Kind::Anomaly { metric, runs, z } => {
                    let x = match metric {
                        Metric::RowCount => self.rows as f64,
                        Metric::NullRate(col) => {
                            if self.rows == 0 {
                                0.0
                            } else {
                                *self.nulls.get(col).unwrap_or(&0) as f64 / self.rows as f64
                            }
                        }
                        Metric::Mean(col) => {
                            self.sums.get(col).map(|(s, n)| if *n == 0 { 0.0 } else { s / *n as f64 }).unwrap_or(0.0)
                        }
                    };
                    r.observed = format!("{x}");
                    let past: Vec<f64> = history
                        .metrics
                        .get(&c.name)
                        .map(|v| v.iter().take(*runs).copied().collect())
                        .unwrap_or_default();
                    if past.len() < *runs {
                        r.threshold = format!("|z| <= {z} once {runs} runs exist ({} so far)", past.len());
                    } else {
                        let mean = past.iter().sum::<f64>() / past.len() as f64;
                        let var = past.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / past.len() as f64;
                        let sd = var.sqrt();
                        let score = if sd == 0.0 {
                            if (x - mean).abs() < 1e-12 {
                                0.0
                            } else {
                                f64::INFINITY
                            }
                        } else {
                            (x - mean) / sd
                        };
                        r.threshold = format!("|z| <= {z} (mean {mean:.4}, sd {sd:.4} over {} runs)", past.len());
                        r.observed = format!("{x} (z = {score:.2})");
                        r.passed = score.abs() <= *z;
                    }
                }
                _ => {}
            }
            out.push(r);
        }
        out
    }

    /// The raw metric value of an anomaly check, for the history.
    pub fn metric_value(result: &CheckResult) -> Option<f64> {
        result.observed.split_whitespace().next()?.parse().ok()
    }
}

fn fmt_bound(b: Option<f64>) -> String {
    b.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Seconds since the epoch of a timestamp or date column. A zoned timestamp's values are
/// instants already: its zone only says how to show them (casting it to a naive timestamp
/// would give local wall-clock times instead).
fn to_epoch_seconds(array: &ArrayRef) -> Result<Vec<Option<i64>>, String> {
    let instants = match array.data_type() {
        DataType::Timestamp(unit, Some(_)) => {
            let data = array.to_data().into_builder().data_type(DataType::Timestamp(*unit, None));
            arrow_array::make_array(data.build().map_err(|e| e.to_string())?)
        }
        _ => array.clone(),
    };
    let t = arrow_cast::cast(&instants, &DataType::Timestamp(arrow_schema::TimeUnit::Second, None))
        .map_err(|e| e.to_string())?;
    let t = t.as_any().downcast_ref::<arrow_array::TimestampSecondArray>().ok_or("not a timestamp")?;
    Ok(t.iter().collect())
}

/// Parse `90s`, `45m`, `36h`, `2d` into seconds.
pub fn parse_duration(text: &str) -> Option<i64> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = num.parse().ok()?;
    Some(match unit.trim() {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
