//! Column rewrites: a transform that replaces some columns row for row (mask, cast in place)
//! and leaves the rest alone says which columns in its declared output schema, under the
//! schema-level metadata key [`METADATA_KEY`] (a JSON array of column names). The host then
//! sends it only those columns and puts the others back itself, so columns the plugin never
//! touches never cross the sandbox boundary: on a wide table, the boundary costs what the
//! rewritten columns weigh, not what the row weighs.
//!
//! The declaration binds the plugin: its output schema is the input schema with exactly the
//! named fields replaced (same names, same positions; type and nullability may change), each
//! call returns one row per input row, and `finish` returns no rows. The host checks all of
//! it and fails the step when the plugin breaks it.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};

/// The schema-level metadata key of a rewrite declaration.
pub const METADATA_KEY: &str = "weir.rewrites";

/// A checked rewrite declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    /// Positions of the rewritten columns in the input (and the output), ascending.
    pub columns: Vec<usize>,
    /// The input schema projected to those columns: what the plugin receives.
    pub input: SchemaRef,
    /// The output schema projected to those columns: what the plugin returns.
    pub output: SchemaRef,
}

impl Rewrite {
    /// Check that `output` is `input` with exactly the fields named in `names` replaced.
    pub fn new(input: &Schema, output: &Schema, names: &[String]) -> Result<Rewrite, String> {
        let columns = declared_columns(input, names)?;
        if output.fields().len() != input.fields().len() {
            return Err(format!(
                "its output has {} columns and its input {}; a rewrite keeps every column in place",
                output.fields().len(),
                input.fields().len()
            ));
        }
        for (i, (a, b)) in input.fields().iter().zip(output.fields()).enumerate() {
            if a.name() != b.name() {
                return Err(format!("output column {} is `{}` where the input has `{}`", i + 1, b.name(), a.name()));
            }
            if !columns.contains(&i) && (a.data_type() != b.data_type() || a.is_nullable() != b.is_nullable()) {
                return Err(format!("column `{}` changes but is not among the rewritten columns", a.name()));
            }
        }
        Ok(Rewrite {
            input: Arc::new(input.project(&columns).map_err(|e| e.to_string())?),
            output: Arc::new(output.project(&columns).map_err(|e| e.to_string())?),
            columns,
        })
    }

    /// Split a declared output schema into the schema without the declaration and the
    /// declared names (none when the plugin declares no rewrite).
    pub fn from_metadata(declared: &Schema) -> Result<(SchemaRef, Option<Vec<String>>), String> {
        split_declaration(declared, METADATA_KEY)
    }

    /// `output` with a declaration of `names` in its metadata, as `init` returns it.
    pub fn declare(output: &Schema, names: &[String]) -> Schema {
        add_declaration(output, METADATA_KEY, names)
    }

    /// The part of `batch` the plugin receives (no copy).
    pub fn project(&self, batch: &RecordBatch) -> Result<RecordBatch, String> {
        batch.project(&self.columns).map_err(|e| e.to_string())
    }

    /// `batch` with the rewritten columns taken from `rewritten`, under `output` (the whole
    /// declared output schema, which also checks declared non-null columns). `rewritten` must
    /// hold one row per row of `batch`.
    pub fn merge(
        &self,
        batch: &RecordBatch,
        rewritten: &RecordBatch,
        output: &SchemaRef,
    ) -> Result<RecordBatch, String> {
        if rewritten.num_rows() != batch.num_rows() {
            return Err(format!(
                "it returned {} rows for a batch of {}; a rewrite returns one row per input row",
                rewritten.num_rows(),
                batch.num_rows()
            ));
        }
        if rewritten.num_columns() != self.columns.len() {
            return Err(format!(
                "it returned {} columns; it declared {} rewritten",
                rewritten.num_columns(),
                self.columns.len()
            ));
        }
        let mut columns = batch.columns().to_vec();
        for (&i, column) in self.columns.iter().zip(rewritten.columns()) {
            columns[i] = column.clone();
        }
        RecordBatch::try_new(output.clone(), columns).map_err(|e| e.to_string())
    }
}

/// Positions of the declared column `names` in `input`, ascending; each must be a column of
/// it, named once.
pub(crate) fn declared_columns(input: &Schema, names: &[String]) -> Result<Vec<usize>, String> {
    if names.is_empty() {
        return Err("it names no columns".into());
    }
    let mut columns = Vec::with_capacity(names.len());
    for name in names {
        let i = input.index_of(name).map_err(|_| format!("it names `{name}`, which is not a column of the input"))?;
        if columns.contains(&i) {
            return Err(format!("it names `{name}` twice"));
        }
        columns.push(i);
    }
    columns.sort_unstable();
    Ok(columns)
}

/// `declared` without the metadata entry `key`, and the column names it held (a JSON array).
pub(crate) fn split_declaration(declared: &Schema, key: &str) -> Result<(SchemaRef, Option<Vec<String>>), String> {
    let Some(text) = declared.metadata().get(key) else {
        return Ok((Arc::new(declared.clone()), None));
    };
    let names: Vec<String> = serde_json::from_str(text)
        .map_err(|e| format!("its `{key}` metadata is not a JSON array of column names: {e}"))?;
    let mut metadata = declared.metadata().clone();
    metadata.remove(key);
    Ok((Arc::new(Schema::new_with_metadata(declared.fields().clone(), metadata)), Some(names)))
}

/// `output` with `names` declared under the metadata entry `key`.
pub(crate) fn add_declaration(output: &Schema, key: &str, names: &[String]) -> Schema {
    let mut metadata = output.metadata().clone();
    metadata.insert(key.to_string(), serde_json::to_string(names).unwrap_or_else(|_| "[]".to_string()));
    Schema::new_with_metadata(output.fields().clone(), metadata)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, Int64Array, StringArray};
    use arrow_schema::{DataType, Field};

    fn input() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("email", DataType::Utf8, true),
            Field::new("n", DataType::Utf8, true),
        ])
    }

    fn output() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("email", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ])
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_declaration_round_trips_through_metadata_and_projects_in_input_order() {
        let declared = Rewrite::declare(&output(), &names(&["n", "email"]));
        let (plain, got) = Rewrite::from_metadata(&declared).unwrap();
        assert_eq!(*plain, output());
        let rw = Rewrite::new(&input(), &plain, &got.unwrap()).unwrap();
        assert_eq!(rw.columns, vec![1, 2]);
        assert_eq!(rw.input.field(0).name(), "email");
        assert_eq!(rw.output.field(1).data_type(), &DataType::Int64);
        assert_eq!(Rewrite::from_metadata(&output()).unwrap().1, None);
    }

    #[test]
    fn declarations_that_do_not_match_the_schemas_are_refused() {
        let bad = |out: &Schema, n: &[&str]| Rewrite::new(&input(), out, &names(n)).unwrap_err();
        assert!(bad(&output(), &[]).contains("names no columns"));
        assert!(bad(&output(), &["nope"]).contains("`nope`, which is not a column"));
        assert!(bad(&output(), &["n", "n"]).contains("twice"));
        // `n` changes type but only `email` is declared
        assert!(bad(&output(), &["email"]).contains("`n` changes"));
        let fewer = Schema::new(vec![Field::new("id", DataType::Int64, false)]);
        assert!(bad(&fewer, &["id"]).contains("keeps every column"));
        let renamed = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("mail", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]);
        assert!(bad(&renamed, &["n"]).contains("is `mail` where the input has `email`"));
        let garbage = Rewrite::declare(&input(), &names(&["n"]));
        let mut metadata = garbage.metadata().clone();
        metadata.insert(METADATA_KEY.to_string(), "{".to_string());
        let garbage = Schema::new_with_metadata(garbage.fields().clone(), metadata);
        assert!(Rewrite::from_metadata(&garbage).unwrap_err().contains("not a JSON array"));
    }

    #[test]
    fn merge_puts_rewritten_columns_in_place_and_checks_rows() {
        let rw = Rewrite::new(&input(), &output(), &names(&["n"])).unwrap();
        let batch = RecordBatch::try_new(
            Arc::new(input()),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef,
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(StringArray::from(vec!["7", "8"])),
            ],
        )
        .unwrap();
        assert_eq!(rw.project(&batch).unwrap().schema(), rw.input);
        let n =
            RecordBatch::try_new(rw.output.clone(), vec![Arc::new(Int64Array::from(vec![7, 8])) as ArrayRef]).unwrap();
        let merged = rw.merge(&batch, &n, &Arc::new(output())).unwrap();
        assert_eq!(merged.column(0), batch.column(0));
        assert_eq!(merged.column(1), batch.column(1));
        assert_eq!(merged.column(2), n.column(0));
        let short = n.slice(0, 1);
        assert!(rw.merge(&batch, &short, &Arc::new(output())).unwrap_err().contains("1 rows for a batch of 2"));
    }
}
