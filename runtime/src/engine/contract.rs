//! Schema contracts: every schema a source is read with is recorded in the run store with
//! the run that first saw it, and compared with the schema the last runs adopted. The
//! source's `schema_change` decides what a difference does (see [`SchemaChange`]).

use std::collections::HashMap;

use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};
use tracing::Level;

use super::step::StepCtx;
use super::{Error, Result};
use crate::config::{SchemaChange, Source as SourceConfig};
use crate::io::source::{CopyColumn, Position, Skipped, Source};
use crate::store::{SchemaColumn, SchemaVersion};

/// The columns of a schema as the store keeps them.
pub(crate) fn columns(schema: &Schema) -> Vec<SchemaColumn> {
    schema
        .fields()
        .iter()
        .map(|f| SchemaColumn {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            nullable: f.is_nullable(),
        })
        .collect()
}

fn fingerprint(columns: &[SchemaColumn]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for c in columns {
        h.update(format!("{}\0{}\0{}\0", c.name, c.data_type, c.nullable).as_bytes());
    }
    crate::plugin::hex(&h.finalize())[..16].to_string()
}

/// What changed from `old` to `new`: columns added, removed, and retyped (name, old, new).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Diff {
    pub added: Vec<SchemaColumn>,
    pub removed: Vec<SchemaColumn>,
    pub retyped: Vec<(String, String, String)>,
}

impl Diff {
    pub fn of(old: &[SchemaColumn], new: &[SchemaColumn]) -> Diff {
        let before: HashMap<&str, &SchemaColumn> = old.iter().map(|c| (c.name.as_str(), c)).collect();
        let after: HashMap<&str, &SchemaColumn> = new.iter().map(|c| (c.name.as_str(), c)).collect();
        Diff {
            added: new.iter().filter(|c| !before.contains_key(c.name.as_str())).cloned().collect(),
            removed: old.iter().filter(|c| !after.contains_key(c.name.as_str())).cloned().collect(),
            retyped: new
                .iter()
                .filter_map(|c| {
                    let o = before.get(c.name.as_str())?;
                    (o.data_type != c.data_type).then(|| (c.name.clone(), o.data_type.clone(), c.data_type.clone()))
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.retyped.is_empty()
    }

    /// `+ email (Utf8); - name (Utf8); amount Int64 -> Float64`
    pub fn text(&self) -> String {
        let mut parts: Vec<String> = self.added.iter().map(|c| format!("+ {} ({})", c.name, c.data_type)).collect();
        parts.extend(self.removed.iter().map(|c| format!("- {} ({})", c.name, c.data_type)));
        parts.extend(self.retyped.iter().map(|(n, a, b)| format!("{n} {a} -> {b}")));
        parts.join("; ")
    }
}

/// Check the opened source's schema against the adopted one, record it, and apply the
/// source's `schema_change`: the source as it is, the source without its new columns
/// (freeze), or an error naming the change.
pub(super) fn apply(ctx: &StepCtx<'_>, config: &SourceConfig, source: Box<dyn Source>) -> Result<Box<dyn Source>> {
    let store = ctx.store;
    let pipeline = &ctx.pipeline.name;
    let schema = source.schema();
    let cols = columns(&schema);
    let version = |action: &str| SchemaVersion {
        fingerprint: fingerprint(&cols),
        columns: cols.clone(),
        action: action.to_string(),
        run_id: ctx.run_id,
        seen_ms: crate::store::now_ms(),
    };
    let versions = store.schema_versions(pipeline, &config.name)?;
    let Some(adopted) = versions.iter().rev().find(|v| v.adopted()) else {
        store.record_schema(pipeline, &config.name, &version("initial"))?;
        return Ok(source);
    };
    let diff = Diff::of(&adopted.columns, &cols);
    if diff.is_empty() {
        return Ok(source);
    }
    let what = diff.text();
    let since = format!("since run #{} ({})", adopted.run_id, crate::store::format_time(adopted.seen_ms));
    let stop = |action: &str, why: &str| -> Result<Box<dyn Source>> {
        store.record_schema(pipeline, &config.name, &version(action))?;
        Err(Error::SchemaChanged {
            source_name: config.name.clone(),
            message: format!("its columns changed {since}: {what}; {why}"),
        })
    };
    let breaking = !diff.removed.is_empty() || !diff.retyped.is_empty();
    match config.schema_change {
        SchemaChange::Fail => stop(
            "failed",
            "schema_change = \"fail\" stops the run (`weir schema` shows the history; set schema_change = \"evolve\" to take new columns in)",
        ),
        SchemaChange::Evolve | SchemaChange::Freeze if breaking => stop(
            "failed",
            "a removed column or a changed type is not taken in by evolve or freeze: fix the source, or cast or rename the column in a transform",
        ),
        SchemaChange::Evolve => {
            store.record_schema(pipeline, &config.name, &version("evolved"))?;
            ctx.log(
                Level::INFO,
                &format!("weir: source `{}` evolved {since}: {what} (the new columns go into the outputs)", config.name),
            );
            Ok(source)
        }
        SchemaChange::Freeze => {
            store.record_schema(pipeline, &config.name, &version("frozen"))?;
            ctx.log(
                Level::WARN,
                &format!(
                    "weir: source `{}` has new columns {since}, dropped (schema_change = \"freeze\"): {what}",
                    config.name
                ),
            );
            Ok(Box::new(Frozen::new(source, &adopted.columns)?))
        }
        SchemaChange::Record => {
            store.record_schema(pipeline, &config.name, &version("changed"))?;
            ctx.log(
                Level::WARN,
                &format!(
                    "weir: source `{}` changed {since}: {what} (set schema_change = \"evolve\", \"freeze\" or \"fail\" to decide what a change does)",
                    config.name
                ),
            );
            Ok(source)
        }
    }
}

/// A source without the columns a frozen schema does not have, in the frozen order.
struct Frozen {
    inner: Box<dyn Source>,
    keep: Vec<usize>,
    schema: SchemaRef,
}

impl Frozen {
    fn new(inner: Box<dyn Source>, frozen: &[SchemaColumn]) -> Result<Frozen> {
        let full = inner.schema();
        let keep: Vec<usize> = frozen
            .iter()
            .map(|c| full.index_of(&c.name).map_err(|e| Error::Internal(format!("frozen column `{}`: {e}", c.name))))
            .collect::<Result<_>>()?;
        let schema = std::sync::Arc::new(full.project(&keep).map_err(|e| Error::Internal(e.to_string()))?);
        Ok(Frozen { inner, keep, schema })
    }
}

impl Source for Frozen {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn next_batch(&mut self) -> Option<crate::io::Result<RecordBatch>> {
        let keep = &self.keep;
        self.inner
            .next_batch()
            .map(|b| b.and_then(|b| b.project(keep).map_err(|e| crate::io::Error::Internal(e.to_string()))))
    }

    fn position(&self) -> Position {
        self.inner.position()
    }

    fn seek(&mut self, at: &Position) -> crate::io::Result<()> {
        self.inner.seek(at)
    }

    fn at_boundary(&self) -> bool {
        self.inner.at_boundary()
    }

    fn skipped(&self) -> (u64, &[Skipped]) {
        self.inner.skipped()
    }

    fn inputs(&self) -> usize {
        self.inner.inputs()
    }

    fn high_watermark(&self) -> Option<String> {
        self.inner.high_watermark()
    }

    fn plugin_counters(&self) -> Option<(String, HashMap<String, i64>)> {
        self.inner.plugin_counters()
    }

    fn helper_cpu_secs(&self) -> f64 {
        self.inner.helper_cpu_secs()
    }

    fn copy_columns(&mut self, _columns: Vec<CopyColumn>, _codec: ::parquet::basic::Compression) -> Vec<usize> {
        // positions would be the projected ones: not offered
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, t: &str) -> SchemaColumn {
        SchemaColumn { name: name.into(), data_type: t.into(), nullable: true }
    }

    #[test]
    fn diffs_name_added_removed_and_retyped_columns() {
        let old = [col("id", "Int64"), col("name", "Utf8"), col("amount", "Int64")];
        let new = [col("amount", "Float64"), col("id", "Int64"), col("email", "Utf8")];
        let d = Diff::of(&old, &new);
        assert_eq!(d.text(), "+ email (Utf8); - name (Utf8); amount Int64 -> Float64");
        assert!(Diff::of(&old, &[col("amount", "Int64"), col("name", "Utf8"), col("id", "Int64")]).is_empty());
        assert_ne!(fingerprint(&old), fingerprint(&new));
    }
}
