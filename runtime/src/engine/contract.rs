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
    let source = cast(config, source)?;
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
    let mut diff = Diff::of(&adopted.columns, &cols);
    // columns the pipeline says may go missing come back as nulls of their adopted type
    let filled: Vec<SchemaColumn> =
        diff.removed.iter().filter(|c| config.fill_missing.contains(&c.name)).cloned().collect();
    diff.removed.retain(|c| !config.fill_missing.contains(&c.name));
    let source = if filled.is_empty() {
        source
    } else {
        let mut target = cols.clone();
        target.extend(filled.iter().cloned());
        ctx.log(
            Level::WARN,
            &format!(
                "weir: source `{}` no longer has {}: read as nulls (fill_missing)",
                config.name,
                filled.iter().map(|c| format!("`{}`", c.name)).collect::<Vec<_>>().join(", ")
            ),
        );
        Box::new(Mapped::new(source, &target)?) as Box<dyn Source>
    };
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
            "a removed column or a changed type is not taken in by evolve or freeze: map it with `cast = { COLUMN = \"TYPE\" }` or `fill_missing = [\"COLUMN\"]` on the source, or fix the source",
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
            let kept: Vec<SchemaColumn> =
                adopted.columns.iter().filter(|c| source.schema().index_of(&c.name).is_ok()).cloned().collect();
            Ok(Box::new(Mapped::new(source, &kept)?))
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

/// The source's columns as `cast` says, before anything compares or reads them.
fn cast(config: &SourceConfig, source: Box<dyn Source>) -> Result<Box<dyn Source>> {
    if config.cast.is_empty() {
        return Ok(source);
    }
    let schema = source.schema();
    let mut target = columns(&schema);
    for (name, ty) in &config.cast {
        let Some(c) = target.iter_mut().find(|c| &c.name == name) else {
            return Err(Error::SchemaChanged {
                source_name: config.name.clone(),
                message: format!(
                    "`cast` names `{name}`, which it does not have (its columns: {})",
                    weir_sdk::util::schema_text(&schema)
                ),
            });
        };
        c.data_type = ty.to_string();
        c.nullable = true;
    }
    let types: HashMap<&str, &arrow_schema::DataType> = config.cast.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut mapped = Mapped::with_types(source, &target, &types)?;
    mapped.source_name = config.name.clone();
    Ok(Box::new(mapped))
}

/// A column of a mapped source: taken (and maybe cast) from the source, or all nulls.
enum Take {
    Column(usize, Option<arrow_schema::DataType>),
    Nulls(arrow_schema::DataType),
}

/// A source read as another schema: columns dropped, reordered, cast, or filled with nulls.
struct Mapped {
    inner: Box<dyn Source>,
    source_name: String,
    take: Vec<Take>,
    schema: SchemaRef,
}

impl Mapped {
    /// `target`'s columns from the source by name; one it lacks is all nulls of the type
    /// recorded for it (Arrow's name of it).
    fn new(inner: Box<dyn Source>, target: &[SchemaColumn]) -> Result<Mapped> {
        Self::with_types(inner, target, &HashMap::new())
    }

    fn with_types(
        inner: Box<dyn Source>,
        target: &[SchemaColumn],
        cast_to: &HashMap<&str, &arrow_schema::DataType>,
    ) -> Result<Mapped> {
        let full = inner.schema();
        let mut take = Vec::new();
        let mut fields = Vec::new();
        for c in target {
            match full.index_of(&c.name) {
                Ok(i) => {
                    let f = full.field(i);
                    match cast_to.get(c.name.as_str()) {
                        Some(t) if f.data_type() != *t => {
                            fields.push(arrow_schema::Field::new(&c.name, (*t).clone(), true));
                            take.push(Take::Column(i, Some((*t).clone())));
                        }
                        _ => {
                            fields.push(f.as_ref().clone());
                            take.push(Take::Column(i, None));
                        }
                    }
                }
                Err(_) => {
                    let t: arrow_schema::DataType = c
                        .data_type
                        .parse()
                        .map_err(|e| Error::Internal(format!("the recorded type of `{}`: {e}", c.name)))?;
                    fields.push(arrow_schema::Field::new(&c.name, t.clone(), true));
                    take.push(Take::Nulls(t));
                }
            }
        }
        Ok(Mapped {
            inner,
            source_name: String::new(),
            take,
            schema: std::sync::Arc::new(arrow_schema::Schema::new(fields)),
        })
    }

    fn map(&self, b: RecordBatch) -> crate::io::Result<RecordBatch> {
        let mut cols = Vec::with_capacity(self.take.len());
        for t in &self.take {
            cols.push(match t {
                Take::Column(i, None) => b.column(*i).clone(),
                Take::Column(i, Some(to)) => {
                    let opts = arrow_cast::CastOptions { safe: false, ..Default::default() };
                    arrow_cast::cast_with_options(b.column(*i), to, &opts).map_err(|e| {
                        crate::io::Error::SourceInvalid {
                            source_name: self.source_name.clone(),
                            message: format!("`cast` of column `{}`: {e}", self.schema.field(cols.len()).name()),
                        }
                    })?
                }
                Take::Nulls(to) => arrow_array::new_null_array(to, b.num_rows()),
            });
        }
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
        RecordBatch::try_new_with_options(self.schema.clone(), cols, &options)
            .map_err(|e| crate::io::Error::Internal(e.to_string()))
    }
}

impl Source for Mapped {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn next_batch(&mut self) -> Option<crate::io::Result<RecordBatch>> {
        let b = self.inner.next_batch()?;
        Some(b.and_then(|b| self.map(b)))
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
