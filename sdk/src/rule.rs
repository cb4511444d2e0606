//! Custom quality checks as plugins: a [`QualityRule`] sees every batch of a step's output,
//! says which rows fail and why, and gives a verdict at the end. The pipeline declares it as
//! a check (`check = "plugin"`) with a severity, like the built-in checks.
//!
//! ```
//! use weir_sdk::prelude::*;
//! use weir_sdk::rule::{BatchVerdict, QualityRule, Verdict};
//!
//! #[derive(Deserialize)]
//! #[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
//! struct Config { column: String }
//!
//! /// Fails rows whose text is empty.
//! struct NotEmpty { index: usize, failed: u64 }
//!
//! impl QualityRule for NotEmpty {
//!     type Config = Config;
//!     fn new(config: Config, input: &SchemaRef, _ctx: &Context) -> Result<Self> {
//!         Ok(NotEmpty { index: require_column(input, &config.column, &[DataType::Utf8])?, failed: 0 })
//!     }
//!     fn check(&mut self, batch: &RecordBatch) -> Result<BatchVerdict> {
//!         let col = batch.column(self.index).as_string::<i32>();
//!         let mut v = BatchVerdict::default();
//!         for (row, value) in col.iter().enumerate() {
//!             if value == Some("") {
//!                 v.fail(row, "empty text");
//!             }
//!         }
//!         self.failed += v.failed_rows.len() as u64;
//!         Ok(v)
//!     }
//!     fn finish(&mut self) -> Result<Verdict> {
//!         Ok(Verdict::from_failures(self.failed))
//!     }
//! }
//! weir_sdk::export_quality_rule!(NotEmpty);
//! # fn main() {}
//! ```

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::error::{Error, Result};
use crate::{ipc, Context};

/// The rule's judgement of one batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchVerdict {
    /// Indices (within the batch) of the failing rows.
    pub failed_rows: Vec<u32>,
    /// One reason per failing row (or a single reason for all, or none).
    pub reasons: Vec<String>,
    /// Named numbers, kept with the check's results.
    pub metrics: Vec<(String, f64)>,
}

impl BatchVerdict {
    /// Mark `row` failing, with a reason.
    pub fn fail(&mut self, row: usize, reason: impl Into<String>) {
        self.failed_rows.push(row as u32);
        self.reasons.push(reason.into());
    }
}

/// The rule's judgement of the whole partition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    pub passed: bool,
    pub observed: Option<String>,
    pub message: String,
    pub metrics: Vec<(String, f64)>,
}

impl Verdict {
    /// Passed when no row failed (the host applies the check's tolerance to failing rows).
    pub fn from_failures(failed: u64) -> Verdict {
        Verdict {
            passed: true,
            observed: Some(format!("{failed} failing rows")),
            message: String::new(),
            metrics: vec![("failing_rows".into(), failed as f64)],
        }
    }
}

/// A custom quality check.
pub trait QualityRule: Sized + 'static {
    /// The check's `config` table.
    type Config: serde::de::DeserializeOwned;
    /// Check the config against the step's output schema.
    fn new(config: Self::Config, input: &SchemaRef, ctx: &Context) -> Result<Self>;
    /// Judge one batch.
    fn check(&mut self, batch: &RecordBatch) -> Result<BatchVerdict>;
    /// Judge the whole partition.
    fn finish(&mut self) -> Result<Verdict>;
}

/// Runs a rule over IPC bytes (shared by the component glue and the native harness).
pub struct RuleRunner<T: QualityRule> {
    inner: T,
}

impl<T: QualityRule> RuleRunner<T> {
    pub fn init(config: &str, input_schema: &[u8], ctx: Context) -> Result<Self> {
        let config: T::Config = crate::runner::parse_config(config)?;
        let schema = ipc::decode_schema(input_schema)
            .map_err(|e| Error::internal(format!("bad input schema from host: {e}")))?;
        Ok(RuleRunner { inner: T::new(config, &schema, &ctx)? })
    }

    /// One IPC stream (usually one batch); row indices count across its batches.
    pub fn check(&mut self, bytes: &[u8]) -> Result<BatchVerdict> {
        let (_, batches) = ipc::decode_trusted(bytes).map_err(|e| Error::InvalidInput {
            row: None,
            column: None,
            message: format!("not a valid Arrow IPC stream: {e}"),
        })?;
        let mut out = BatchVerdict::default();
        let mut offset = 0u32;
        for b in batches {
            let v = self.inner.check(&b)?;
            out.failed_rows.extend(v.failed_rows.iter().map(|r| r + offset));
            out.reasons.extend(v.reasons);
            out.metrics.extend(v.metrics);
            offset += b.num_rows() as u32;
        }
        Ok(out)
    }

    pub fn finish(&mut self) -> Result<Verdict> {
        self.inner.finish()
    }
}

/// Run a rule natively in `cargo test`.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_natively<T: QualityRule>(
    config_toml: &str,
    batches: &[RecordBatch],
) -> Result<(Vec<BatchVerdict>, Verdict)> {
    let value: toml::Table =
        toml::from_str(config_toml).map_err(|e| Error::config(format!("config is not TOML: {e}")))?;
    let json = crate::config::toml_to_json(&toml::Value::Table(value)).to_string();
    let schema = batches.first().map(|b| b.schema()).ok_or_else(|| Error::internal("no batches"))?;
    let mut r = RuleRunner::<T>::init(&json, &ipc::encode_schema(&schema)?, Context::default())?;
    let mut verdicts = Vec::new();
    for b in batches {
        verdicts.push(r.check(&ipc::encode(&schema, std::slice::from_ref(b))?)?);
    }
    Ok((verdicts, r.finish()?))
}
