//! Small helpers most transforms need.

use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use crate::error::{Error, Result};

/// Find `name` in `schema` and check its type is one of `types` (any type when empty).
/// The error lists the available columns, for the pipeline author.
pub fn require_column(schema: &SchemaRef, name: &str, types: &[DataType]) -> Result<usize> {
    let index = schema.index_of(name).map_err(|_| {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        Error::config(format!("column `{name}` is not in the input; the input has: {}", names.join(", ")))
    })?;
    let actual = schema.field(index).data_type();
    if !types.is_empty() && !types.contains(actual) {
        let wanted: Vec<String> = types.iter().map(|t| t.to_string()).collect();
        return Err(Error::config(format!("column `{name}` is {actual}; this plugin needs {}", wanted.join(" or "))));
    }
    Ok(index)
}

/// A copy of `batch` with column `index` replaced by `array` (its field keeps the name;
/// type and nullability follow the new array).
pub fn replace_column(batch: &RecordBatch, index: usize, array: ArrayRef) -> Result<RecordBatch> {
    let schema = batch.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = batch.columns().to_vec();
    let old = &fields[index];
    fields[index] = Field::new(old.name(), array.data_type().clone(), old.is_nullable() || array.null_count() > 0);
    columns[index] = array;
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}

/// Rebuild `batch` under `schema` (same columns, possibly different nullability flags).
pub fn with_schema(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema() == *schema {
        return Ok(batch);
    }
    Ok(RecordBatch::try_new(schema.clone(), batch.columns().to_vec())?)
}

/// `name: type` pairs of a schema, for messages.
/// Whether two schemas have the same column names and types, in the same order
/// (nullability and metadata aside): what a batch must share with the schema it is checked
/// against.
pub fn same_shape(a: &Schema, b: &Schema) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields().iter().zip(b.fields()).all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}

pub fn schema_text(schema: &Schema) -> String {
    schema.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
}

/// The type names pipeline files and plugin configs use, and the Arrow type each means:
/// `string`/`utf8`, `int32`, `int64`, `float64`/`double`, `bool`/`boolean`, `date`
/// (days), `timestamp` (microseconds, no zone), `timestamp_tz` (microseconds, UTC).
pub fn parse_type_name(name: &str) -> Option<DataType> {
    use arrow_schema::TimeUnit;
    Some(match name.trim().to_ascii_lowercase().as_str() {
        "string" | "utf8" | "str" | "text" => DataType::Utf8,
        "int32" | "int" | "integer" => DataType::Int32,
        "int64" | "long" | "bigint" => DataType::Int64,
        "float64" | "double" | "float" => DataType::Float64,
        "float32" => DataType::Float32,
        "bool" | "boolean" => DataType::Boolean,
        "date" | "date32" => DataType::Date32,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "timestamp_tz" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        other => {
            // timestamp_tz(America/New_York): instants shown, cast to dates and partitioned
            // in that zone (an IANA name or a fixed offset such as +02:00)
            const OPEN: &str = "timestamp_tz(";
            if !other.starts_with(OPEN) || !other.ends_with(')') {
                return None;
            }
            // zone names are case-sensitive: take it from the name as written (ASCII
            // lowercasing kept every byte where it was)
            let original = name.trim();
            let zone = original[OPEN.len()..original.len() - 1].trim();
            zone.parse::<arrow_array::timezone::Tz>().ok()?;
            DataType::Timestamp(TimeUnit::Microsecond, Some(zone.into()))
        }
    })
}

/// The names [`parse_type_name`] accepts, for error messages.
pub const TYPE_NAMES: &str =
    "string, int32, int64, float64, float32, bool, date, timestamp, timestamp_tz (UTC), timestamp_tz(ZONE) (an IANA zone such as America/New_York, or an offset such as +02:00)";
