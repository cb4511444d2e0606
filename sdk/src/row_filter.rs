//! Row filters: a transform that only keeps or drops rows, deciding from a few columns, says
//! which columns in its declared output schema, under the schema-level metadata key
//! [`METADATA_KEY`] (a JSON array of column names). The host then sends it only those
//! columns; the plugin answers with one boolean per row (a batch of one Boolean column, the
//! mask) and the host drops the rows itself, in native code. The rows' other columns never
//! cross the sandbox boundary and the kept rows are not copied back out of it.
//!
//! The declaration binds the plugin: its output schema is its input schema (same fields,
//! same order, same types), each call returns one mask value per input row (true keeps the
//! row; false and null drop it), and `finish` returns no rows. The host checks all of it
//! and fails the step when the plugin breaks it.

use std::sync::Arc;

use arrow_array::{Array, BooleanArray, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

/// The schema-level metadata key of a row filter declaration.
pub const METADATA_KEY: &str = "weir.filter";

/// The name of the mask column the SDK returns (the host checks only its type).
pub const MASK_COLUMN: &str = "keep";

/// A checked row filter declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct RowFilter {
    /// Positions of the columns the filter reads, in the input, ascending.
    pub columns: Vec<usize>,
    /// The input schema projected to those columns: what the plugin receives.
    pub input: SchemaRef,
}

impl RowFilter {
    /// Check that `output` is `input` and that `names` are columns of it.
    pub fn new(input: &Schema, output: &Schema, names: &[String]) -> Result<RowFilter, String> {
        let columns = crate::rewrite::declared_columns(input, names)?;
        let same = output.fields().len() == input.fields().len()
            && input.fields().iter().zip(output.fields()).all(|(a, b)| {
                a.name() == b.name() && a.data_type() == b.data_type() && a.is_nullable() == b.is_nullable()
            });
        if !same {
            return Err(format!(
                "its output schema [{}] is not its input schema [{}]; a filter keeps every column as it is",
                crate::util::schema_text(output),
                crate::util::schema_text(input)
            ));
        }
        Ok(RowFilter { input: Arc::new(input.project(&columns).map_err(|e| e.to_string())?), columns })
    }

    /// Split a declared output schema into the schema without the declaration and the
    /// declared names (none when the plugin declares no row filter).
    pub fn from_metadata(declared: &Schema) -> Result<(SchemaRef, Option<Vec<String>>), String> {
        crate::rewrite::split_declaration(declared, METADATA_KEY)
    }

    /// `output` with a declaration of `names` in its metadata, as `init` returns it.
    pub fn declare(output: &Schema, names: &[String]) -> Schema {
        crate::rewrite::add_declaration(output, METADATA_KEY, names)
    }

    /// The schema of the mask a call returns.
    pub fn mask_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new(MASK_COLUMN, DataType::Boolean, true)]))
    }

    /// The part of `batch` the plugin receives (no copy).
    pub fn project(&self, batch: &RecordBatch) -> Result<RecordBatch, String> {
        batch.project(&self.columns).map_err(|e| e.to_string())
    }

    /// The rows of `batch` the masks keep, under `output` (the declared output schema).
    /// `masks` must hold one Boolean column and, together, one value per row of `batch`.
    pub fn apply(&self, batch: &RecordBatch, masks: &[RecordBatch], output: &SchemaRef) -> Result<RecordBatch, String> {
        let mut parts = Vec::with_capacity(masks.len());
        for m in masks {
            match m.columns() {
                [c] if c.data_type() == &DataType::Boolean => parts.push(c.clone()),
                _ => {
                    return Err(format!(
                        "it returned [{}] where a filter returns one Boolean column",
                        crate::util::schema_text(&m.schema())
                    ))
                }
            }
        }
        let rows: usize = parts.iter().map(|p| p.len()).sum();
        if rows != batch.num_rows() {
            return Err(format!(
                "it returned {rows} mask values for a batch of {} rows; a filter returns one per row",
                batch.num_rows()
            ));
        }
        let mask = match parts.as_slice() {
            [one] => one.clone(),
            _ => {
                let refs: Vec<&dyn Array> = parts.iter().map(|p| p.as_ref()).collect();
                arrow_select::concat::concat(&refs).map_err(|e| e.to_string())?
            }
        };
        let mask = mask.as_any().downcast_ref::<BooleanArray>().ok_or("the mask is not Boolean")?;
        let kept = arrow_select::filter::filter_record_batch(batch, mask).map_err(|e| e.to_string())?;
        RecordBatch::try_new(output.clone(), kept.columns().to_vec()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, Int64Array, StringArray};

    fn input() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("country", DataType::Utf8, true),
            Field::new("note", DataType::Utf8, true),
        ])
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn mask(values: Vec<Option<bool>>) -> RecordBatch {
        RecordBatch::try_new(RowFilter::mask_schema(), vec![Arc::new(BooleanArray::from(values)) as ArrayRef]).unwrap()
    }

    #[test]
    fn a_declaration_round_trips_and_projects_in_input_order() {
        let declared = RowFilter::declare(&input(), &names(&["note", "id"]));
        let (plain, got) = RowFilter::from_metadata(&declared).unwrap();
        assert_eq!(*plain, input());
        let f = RowFilter::new(&input(), &plain, &got.unwrap()).unwrap();
        assert_eq!(f.columns, vec![0, 2]);
        assert_eq!(f.input.field(1).name(), "note");
        assert_eq!(RowFilter::from_metadata(&input()).unwrap().1, None);
        // a rewrite declaration is not a filter declaration
        let rewrite = crate::rewrite::Rewrite::declare(&input(), &names(&["id"]));
        assert_eq!(RowFilter::from_metadata(&rewrite).unwrap().1, None);
    }

    #[test]
    fn declarations_that_do_not_match_the_schemas_are_refused() {
        let bad = |out: &Schema, n: &[&str]| RowFilter::new(&input(), out, &names(n)).unwrap_err();
        assert!(bad(&input(), &[]).contains("names no columns"));
        assert!(bad(&input(), &["nope"]).contains("`nope`, which is not a column"));
        assert!(bad(&input(), &["id", "id"]).contains("twice"));
        let fewer = Schema::new(vec![Field::new("id", DataType::Int64, false)]);
        assert!(bad(&fewer, &["id"]).contains("keeps every column as it is"));
        let retyped = Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("country", DataType::Utf8, true),
            Field::new("note", DataType::Utf8, true),
        ]);
        assert!(bad(&retyped, &["id"]).contains("is not its input schema"));
    }

    #[test]
    fn apply_keeps_true_rows_drops_false_and_null_and_checks_the_mask() {
        let f = RowFilter::new(&input(), &input(), &names(&["country"])).unwrap();
        let batch = RecordBatch::try_new(
            Arc::new(input()),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])) as ArrayRef,
                Arc::new(StringArray::from(vec!["DE", "FR", "DE", "US"])),
                Arc::new(StringArray::from(vec!["a", "b", "c", "d"])),
            ],
        )
        .unwrap();
        assert_eq!(f.project(&batch).unwrap().num_columns(), 1);
        let output = Arc::new(input());
        // a mask may come in several batches
        let masks = [mask(vec![Some(true), Some(false)]), mask(vec![None, Some(true)])];
        let kept = f.apply(&batch, &masks, &output).unwrap();
        assert_eq!(kept.column(0).as_ref(), &Int64Array::from(vec![1, 4]) as &dyn Array);
        assert_eq!(kept.column(2).as_ref(), &StringArray::from(vec!["a", "d"]) as &dyn Array);
        let short = f.apply(&batch, &[mask(vec![Some(true)])], &output).unwrap_err();
        assert!(short.contains("returned 1 mask values for a batch of 4 rows"), "{short}");
        let not_bool = f.apply(&batch, &[f.project(&batch).unwrap()], &output).unwrap_err();
        assert!(not_bool.contains("where a filter returns one Boolean column"), "{not_bool}");
        let none = f.apply(&batch, &[], &output).unwrap_err();
        assert!(none.contains("returned 0 mask values"), "{none}");
    }
}
