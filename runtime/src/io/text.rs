//! Text to typed Arrow columns, shared by the CSV and JSON-lines sources.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Float32Builder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::types::{Date32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::ArrayRef;
use arrow_cast::parse::Parser;
use arrow_schema::{DataType, TimeUnit};

mod nested;
pub use nested::NestedBuilder;

/// One parsed cell, before it is appended (so a bad row can be skipped whole).
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// A struct or list column's value, decoded by its type.
    Nested(Box<Nested>),
}

/// Parse text as `dtype`. Empty text is null. The error says what was expected.
pub fn parse_text(text: &str, dtype: &DataType) -> Result<Cell, String> {
    if text.is_empty() {
        return Ok(Cell::Null);
    }
    let t = text.trim();
    let fail = |what: &str| Err(format!("cannot parse {text:?} as {what}"));
    match dtype {
        DataType::Utf8 => Ok(Cell::Str(text.to_string())),
        DataType::Int64 => Int64Type::parse(t).map(Cell::Int).map_or_else(|| fail("int64"), Ok),
        DataType::Int32 => Int32Type::parse(t).map(|v| Cell::Int(v as i64)).map_or_else(|| fail("int32"), Ok),
        DataType::Float64 | DataType::Float32 => {
            Float64Type::parse(t).map(Cell::Float).map_or_else(|| fail("a number"), Ok)
        }
        DataType::Boolean => match t.to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "1" => Ok(Cell::Bool(true)),
            "false" | "f" | "no" | "0" => Ok(Cell::Bool(false)),
            _ => fail("bool (true/false)"),
        },
        // a date with a time of day is a timestamp, not a date: refuse rather than truncate
        DataType::Date32 if t.contains(':') => fail("a date (YYYY-MM-DD)"),
        DataType::Date32 => {
            Date32Type::parse(t).map(|v| Cell::Int(v as i64)).map_or_else(|| fail("a date (YYYY-MM-DD)"), Ok)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => TimestampMicrosecondType::parse(t)
            .map(Cell::Int)
            .map_or_else(|| fail("a timestamp (YYYY-MM-DDTHH:MM:SS)"), Ok),
        other => Err(format!("type {other} is not supported for text input")),
    }
}

/// A JSON scalar as a decoder meets it, before any `serde_json::Value` is built.
#[derive(Clone, Copy)]
pub enum Scalar<'a> {
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX`.
    Big(u64),
    Float(f64),
    Str(&'a str),
}

impl Scalar<'_> {
    pub fn value(self) -> serde_json::Value {
        match self {
            Scalar::Bool(b) => b.into(),
            Scalar::Int(i) => i.into(),
            Scalar::Big(u) => u.into(),
            Scalar::Float(f) => f.into(),
            Scalar::Str(s) => s.into(),
        }
    }
}

/// A scalar in a column of `dtype`: what [`parse_json`] makes of it, without building the
/// JSON value on the common paths.
pub fn scalar_cell(v: Scalar<'_>, dtype: &DataType) -> Result<Cell, String> {
    match (v, dtype) {
        (Scalar::Bool(b), DataType::Boolean) => Ok(Cell::Bool(b)),
        (Scalar::Int(i), DataType::Int64) => Ok(Cell::Int(i)),
        (Scalar::Int(i), DataType::Int32) if i32::try_from(i).is_ok() => Ok(Cell::Int(i)),
        (Scalar::Int(i), DataType::Float64 | DataType::Float32) => Ok(Cell::Float(i as f64)),
        (Scalar::Float(f), DataType::Float64 | DataType::Float32) => Ok(Cell::Float(f)),
        (Scalar::Str(s), DataType::Utf8) => Ok(Cell::Str(s.to_owned())),
        (Scalar::Str(s), t) if !t.is_nested() => parse_text(s, t),
        (v, t) => parse_json(&v.value(), t),
    }
}

/// Convert a JSON value to a cell of `dtype`.
pub fn parse_json(value: &serde_json::Value, dtype: &DataType) -> Result<Cell, String> {
    use serde_json::Value as J;
    match (value, dtype) {
        (J::Null, _) => Ok(Cell::Null),
        (v, t @ (DataType::List(_) | DataType::Struct(_))) => {
            nested_from_value(v, t).map(|n| Cell::Nested(Box::new(n))).map_err(nested_message)
        }
        (J::String(s), DataType::Utf8) => Ok(Cell::Str(s.clone())),
        (J::String(s), _) => parse_text(s, dtype),
        (J::Bool(b), DataType::Boolean) => Ok(Cell::Bool(*b)),
        (J::Number(n), DataType::Int64 | DataType::Int32) => match n.as_i64() {
            Some(i) if dtype == &DataType::Int64 || i32::try_from(i).is_ok() => Ok(Cell::Int(i)),
            _ => Err(format!("{n} is not a valid {dtype}")),
        },
        (J::Number(n), DataType::Float64 | DataType::Float32) => {
            n.as_f64().map(Cell::Float).ok_or_else(|| format!("{n} is not a number"))
        }
        (J::Number(n), DataType::Utf8) => Ok(Cell::Str(n.to_string())),
        (J::Bool(b), DataType::Utf8) => Ok(Cell::Str(b.to_string())),
        // an object or array in a string column is kept as its JSON text
        (v @ (J::Array(_) | J::Object(_)), DataType::Utf8) => Ok(Cell::Str(v.to_string())),
        (v, t) => Err(format!("JSON value {v} cannot be read as {t}")),
    }
}

/// A struct or list column's value, decoded by its declared type: a struct's fields by
/// position (in the type's order), a list's items, and leaf cells. Built straight from the
/// JSON text by the JSON-lines reader, or from a parsed value by [`nested_from_value`].
#[derive(Debug, Clone, PartialEq)]
pub enum Nested {
    Null,
    Leaf(Cell),
    List(Vec<Nested>),
    Struct(Vec<Nested>),
}

/// A path error (`[2].qty: ...`, or `: ...` for the value itself) as the message of the
/// column's error: `at [2].qty: ...`, or the bare message.
pub fn nested_message(e: String) -> String {
    match e.strip_prefix(": ") {
        Some(m) => m.to_string(),
        None => format!("at {e}"),
    }
}

/// `value` read as a struct or list type all the way down: leaves as [`parse_json`] reads
/// them, keys a struct does not name ignored, missing ones null. The error names the path to
/// the first value that does not fit (fields in the type's order, items in order).
pub fn nested_from_value(value: &serde_json::Value, dtype: &DataType) -> Result<Nested, String> {
    use serde_json::Value as J;
    match (value, dtype) {
        (J::Null, _) => Ok(Nested::Null),
        (J::Array(items), DataType::List(item)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| nested_from_value(v, item.data_type()).map_err(|e| format!("[{i}]{e}")))
            .collect::<Result<_, _>>()
            .map(Nested::List),
        (J::Object(map), DataType::Struct(fields)) => fields
            .iter()
            .map(|f| {
                let v = map.get(f.name()).unwrap_or(&J::Null);
                nested_from_value(v, f.data_type()).map_err(|e| format!(".{}{e}", f.name()))
            })
            .collect::<Result<_, _>>()
            .map(Nested::Struct),
        (v, t @ (DataType::List(_) | DataType::Struct(_))) => Err(format!(": JSON value {v} cannot be read as {t}")),
        (v, t) => parse_json(v, t).map(Nested::Leaf).map_err(|e| format!(": {e}")),
    }
}

/// Guess the narrowest type for sample texts: int64, float64, bool, date, timestamp, else
/// string. Empty samples do not vote; a column with no values is a string.
pub fn infer_type<'a>(samples: impl Iterator<Item = &'a str>) -> DataType {
    let candidates = [
        DataType::Int64,
        DataType::Float64,
        DataType::Boolean,
        DataType::Date32,
        DataType::Timestamp(TimeUnit::Microsecond, None),
    ];
    let mut alive = [true; 5];
    let mut any = false;
    for s in samples {
        if s.is_empty() {
            continue;
        }
        any = true;
        for (i, c) in candidates.iter().enumerate() {
            if alive[i] && parse_text(s, c).is_err() {
                alive[i] = false;
            }
        }
    }
    if !any {
        return DataType::Utf8;
    }
    candidates.iter().zip(alive).find(|(_, a)| *a).map(|(c, _)| c.clone()).unwrap_or(DataType::Utf8)
}

/// A growing column of one of the supported types.
pub enum ColumnBuilder {
    /// Text, and whether a value was refused for passing 2 GiB of text in the batch.
    Utf8(StringBuilder, bool),
    Int64(Int64Builder),
    Int32(Int32Builder),
    Float64(Float64Builder),
    Float32(Float32Builder),
    Bool(BooleanBuilder),
    Date32(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder, Option<Arc<str>>),
    /// A struct or list column (JSON lines), built value by value.
    Nested(NestedBuilder),
}

impl ColumnBuilder {
    pub fn new(dtype: &DataType, capacity: usize) -> Result<Self, String> {
        Ok(match dtype {
            DataType::Utf8 => ColumnBuilder::Utf8(StringBuilder::with_capacity(capacity, capacity * 16), false),
            DataType::Int64 => ColumnBuilder::Int64(Int64Builder::with_capacity(capacity)),
            DataType::Int32 => ColumnBuilder::Int32(Int32Builder::with_capacity(capacity)),
            DataType::Float64 => ColumnBuilder::Float64(Float64Builder::with_capacity(capacity)),
            DataType::Float32 => ColumnBuilder::Float32(Float32Builder::with_capacity(capacity)),
            DataType::Boolean => ColumnBuilder::Bool(BooleanBuilder::with_capacity(capacity)),
            DataType::Date32 => ColumnBuilder::Date32(Date32Builder::with_capacity(capacity)),
            DataType::Timestamp(TimeUnit::Microsecond, tz) => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity), tz.clone())
            }
            t @ (DataType::List(_) | DataType::Struct(_)) => ColumnBuilder::Nested(NestedBuilder::new(t)?),
            other => return Err(format!("type {other} is not supported for text input")),
        })
    }

    /// Append a cell parsed for this column's type.
    pub fn push(&mut self, cell: Cell) {
        match (self, cell) {
            (b @ ColumnBuilder::Utf8(..), Cell::Str(s)) => b.push_str(&s),
            (ColumnBuilder::Int64(b), Cell::Int(v)) => b.append_value(v),
            (ColumnBuilder::Int32(b), Cell::Int(v)) => b.append_value(v as i32),
            (ColumnBuilder::Float64(b), Cell::Float(v)) => b.append_value(v),
            (ColumnBuilder::Float32(b), Cell::Float(v)) => b.append_value(v as f32),
            (ColumnBuilder::Bool(b), Cell::Bool(v)) => b.append_value(v),
            (ColumnBuilder::Date32(b), Cell::Int(v)) => b.append_value(v as i32),
            (ColumnBuilder::Timestamp(b, _), Cell::Int(v)) => b.append_value(v),
            (ColumnBuilder::Nested(b), Cell::Nested(v)) => b.push_tree(&v),
            (b, _) => b.push_null(),
        }
    }

    /// Append text to a string column (any other column gets a null: callers check types).
    pub fn push_str(&mut self, text: &str) {
        match self {
            ColumnBuilder::Utf8(b, overflowed) => {
                // past its 32-bit offsets arrow would panic: refuse, and fail the batch
                if b.values_slice().len() + text.len() > i32::MAX as usize {
                    *overflowed = true;
                    b.append_null();
                } else {
                    b.append_value(text);
                }
            }
            b => b.push_null(),
        }
    }

    fn push_null(&mut self) {
        match self {
            ColumnBuilder::Utf8(b, _) => b.append_null(),
            ColumnBuilder::Int64(b) => b.append_null(),
            ColumnBuilder::Int32(b) => b.append_null(),
            ColumnBuilder::Float64(b) => b.append_null(),
            ColumnBuilder::Float32(b) => b.append_null(),
            ColumnBuilder::Bool(b) => b.append_null(),
            ColumnBuilder::Date32(b) => b.append_null(),
            ColumnBuilder::Timestamp(b, _) => b.append_null(),
            ColumnBuilder::Nested(b) => b.push_null(),
        }
    }

    /// The column so far; the builder starts empty again. Fails only when a nested column
    /// outgrows 32-bit offsets in one batch.
    pub fn finish(&mut self) -> Result<ArrayRef, String> {
        Ok(match self {
            ColumnBuilder::Utf8(b, overflowed) => {
                let array = b.finish();
                if std::mem::take(overflowed) {
                    return Err("a string column's text in one batch went past 2 GiB; lower pipeline.batch_size".into());
                }
                Arc::new(array)
            }
            ColumnBuilder::Int64(b) => Arc::new(b.finish()),
            ColumnBuilder::Int32(b) => Arc::new(b.finish()),
            ColumnBuilder::Float64(b) => Arc::new(b.finish()),
            ColumnBuilder::Float32(b) => Arc::new(b.finish()),
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Date32(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b, tz) => Arc::new(b.finish().with_timezone_opt(tz.clone())),
            ColumnBuilder::Nested(b) => b.finish()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_column_past_2_gib_in_a_batch_fails_the_batch_not_the_process() {
        let mut b = ColumnBuilder::new(&DataType::Utf8, 4).unwrap();
        let big = "x".repeat(1 << 30);
        b.push_str(&big);
        b.push_str(&big);
        assert!(b.finish().unwrap_err().contains("2 GiB"));
        // the builder starts over
        b.push_str("ok");
        assert_eq!(b.finish().unwrap().len(), 1);
    }

    #[test]
    fn parses_and_infers() {
        assert_eq!(parse_text("42", &DataType::Int64), Ok(Cell::Int(42)));
        assert_eq!(parse_text("", &DataType::Int64), Ok(Cell::Null));
        assert!(parse_text("4x2", &DataType::Int64).unwrap_err().contains("\"4x2\""));
        assert_eq!(parse_text("2024-01-02", &DataType::Date32), Ok(Cell::Int(19724)));
        assert_eq!(infer_type(["1", "2", ""].into_iter()), DataType::Int64);
        assert_eq!(infer_type(["1", "2.5"].into_iter()), DataType::Float64);
        assert_eq!(infer_type(["2024-01-01", "2024-01-02"].into_iter()), DataType::Date32);
        assert_eq!(infer_type(["2024-01-01T10:00:00"].into_iter()), DataType::Timestamp(TimeUnit::Microsecond, None));
        assert_eq!(infer_type(["a", "1"].into_iter()), DataType::Utf8);
        assert_eq!(infer_type(["", ""].into_iter()), DataType::Utf8);
    }
}
