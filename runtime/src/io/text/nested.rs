//! Struct and list columns built value by value, as a decoder meets the values, and cut
//! back to an earlier length when the line a value belonged to turns out bad (a later key
//! of the wrong type, bad JSON further on): a skipped line leaves nothing behind.

use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, Date32Array, Float32Array, Float64Array, Int32Array, Int64Array, ListArray, StringArray,
    StructArray, TimestampMicrosecondArray,
};
use arrow_buffer::{BooleanBuffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, FieldRef, Fields, TimeUnit};

use super::{Cell, Nested};

/// A struct or list column (or a leaf inside one) being built.
pub enum NestedBuilder {
    Leaf(Leaf),
    List {
        item_field: FieldRef,
        /// Where each value's items end in `item` (the first value starts at 0).
        ends: Vec<usize>,
        valid: Vec<bool>,
        item: Box<NestedBuilder>,
    },
    Struct {
        fields: Fields,
        valid: Vec<bool>,
        children: Vec<NestedBuilder>,
    },
}

/// A scalar inside a struct or list: its values by physical type and their validity.
pub struct Leaf {
    dtype: DataType,
    valid: Vec<bool>,
    values: Values,
}

enum Values {
    Int64(Vec<i64>),
    Int32(Vec<i32>),
    Float64(Vec<f64>),
    Float32(Vec<f32>),
    Bool(Vec<bool>),
    /// Text, and where each value ends in it.
    Str(Vec<u8>, Vec<usize>),
}

impl NestedBuilder {
    pub fn new(dtype: &DataType) -> Result<Self, String> {
        Ok(match dtype {
            DataType::List(item) => NestedBuilder::List {
                item_field: item.clone(),
                ends: Vec::new(),
                valid: Vec::new(),
                item: Box::new(NestedBuilder::new(item.data_type())?),
            },
            DataType::Struct(fields) => NestedBuilder::Struct {
                fields: fields.clone(),
                valid: Vec::new(),
                children: fields.iter().map(|f| NestedBuilder::new(f.data_type())).collect::<Result<_, _>>()?,
            },
            t => {
                let values = match t {
                    DataType::Int64 | DataType::Timestamp(TimeUnit::Microsecond, _) => Values::Int64(Vec::new()),
                    DataType::Int32 | DataType::Date32 => Values::Int32(Vec::new()),
                    DataType::Float64 => Values::Float64(Vec::new()),
                    DataType::Float32 => Values::Float32(Vec::new()),
                    DataType::Boolean => Values::Bool(Vec::new()),
                    DataType::Utf8 => Values::Str(Vec::new(), Vec::new()),
                    other => return Err(format!("type {other} is not supported for text input")),
                };
                NestedBuilder::Leaf(Leaf { dtype: t.clone(), valid: Vec::new(), values })
            }
        })
    }

    pub fn data_type(&self) -> DataType {
        match self {
            NestedBuilder::Leaf(l) => l.dtype.clone(),
            NestedBuilder::List { item_field, .. } => DataType::List(item_field.clone()),
            NestedBuilder::Struct { fields, .. } => DataType::Struct(fields.clone()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values so far.
    pub fn len(&self) -> usize {
        match self {
            NestedBuilder::Leaf(l) => l.valid.len(),
            NestedBuilder::List { valid, .. } | NestedBuilder::Struct { valid, .. } => valid.len(),
        }
    }

    /// Back to the first `len` values (nothing changes when there are no more).
    pub fn truncate(&mut self, len: usize) {
        match self {
            NestedBuilder::Leaf(l) => l.truncate(len),
            NestedBuilder::List { ends, valid, item, .. } => {
                if len < valid.len() {
                    item.truncate(if len == 0 { 0 } else { ends[len - 1] });
                    ends.truncate(len);
                    valid.truncate(len);
                } else {
                    // items of a value left unfinished
                    item.truncate(ends.last().copied().unwrap_or(0));
                }
            }
            NestedBuilder::Struct { valid, children, .. } => {
                valid.truncate(len);
                let len = valid.len();
                children.iter_mut().for_each(|c| c.truncate(len));
            }
        }
    }

    pub fn push_null(&mut self) {
        match self {
            NestedBuilder::Leaf(l) => l.push_null(),
            NestedBuilder::List { ends, valid, item, .. } => {
                ends.push(item.len());
                valid.push(false);
            }
            NestedBuilder::Struct { valid, children, .. } => {
                valid.push(false);
                children.iter_mut().for_each(NestedBuilder::push_null);
            }
        }
    }

    /// A decoded tree of this builder's type (a part of another shape is a null).
    pub fn push_tree(&mut self, value: &Nested) {
        match (self, value) {
            (NestedBuilder::Leaf(l), Nested::Leaf(c)) => l.push(c),
            (NestedBuilder::List { ends, valid, item, .. }, Nested::List(items)) => {
                items.iter().for_each(|v| item.push_tree(v));
                ends.push(item.len());
                valid.push(true);
            }
            (NestedBuilder::Struct { valid, children, .. }, Nested::Struct(parts)) => {
                for (i, c) in children.iter_mut().enumerate() {
                    c.push_tree(parts.get(i).unwrap_or(&Nested::Null));
                }
                valid.push(true);
            }
            (b, _) => b.push_null(),
        }
    }

    /// The values so far as an Arrow array; the builder starts empty again. Fails only when
    /// a list's items or a string leaf's text outgrow 32-bit offsets in one batch.
    pub fn finish(&mut self) -> Result<ArrayRef, String> {
        match self {
            NestedBuilder::Leaf(l) => l.finish(),
            NestedBuilder::List { item_field, ends, valid, item } => {
                // everything is taken before anything can fail: the builder starts empty again
                let (ends, valid, child) = (std::mem::take(ends), std::mem::take(valid), item.finish());
                let offsets = offsets(ends, "list items")?;
                let nulls = nulls(valid);
                ListArray::try_new(item_field.clone(), offsets, child?, nulls)
                    .map(|a| Arc::new(a) as ArrayRef)
                    .map_err(|e| e.to_string())
            }
            NestedBuilder::Struct { fields, valid, children } => {
                let len = valid.len();
                let valid = std::mem::take(valid);
                let columns: Vec<_> = children.iter_mut().map(NestedBuilder::finish).collect();
                let columns = columns.into_iter().collect::<Result<Vec<_>, _>>()?;
                StructArray::try_new_with_length(fields.clone(), columns, nulls(valid), len)
                    .map(|a| Arc::new(a) as ArrayRef)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

impl Leaf {
    pub fn dtype(&self) -> &DataType {
        &self.dtype
    }

    fn truncate(&mut self, len: usize) {
        self.valid.truncate(len);
        let len = self.valid.len();
        match &mut self.values {
            Values::Int64(v) => v.truncate(len),
            Values::Int32(v) => v.truncate(len),
            Values::Float64(v) => v.truncate(len),
            Values::Float32(v) => v.truncate(len),
            Values::Bool(v) => v.truncate(len),
            Values::Str(text, ends) => {
                ends.truncate(len);
                text.truncate(ends.last().copied().unwrap_or(0));
            }
        }
    }

    pub fn push_null(&mut self) {
        self.valid.push(false);
        match &mut self.values {
            Values::Int64(v) => v.push(0),
            Values::Int32(v) => v.push(0),
            Values::Float64(v) => v.push(0.0),
            Values::Float32(v) => v.push(0.0),
            Values::Bool(v) => v.push(false),
            Values::Str(text, ends) => ends.push(text.len()),
        }
    }

    /// Text for a string leaf (another leaf gets a null: callers check the type).
    pub fn push_str(&mut self, s: &str) {
        match &mut self.values {
            Values::Str(text, ends) => {
                text.extend_from_slice(s.as_bytes());
                ends.push(text.len());
                self.valid.push(true);
            }
            _ => self.push_null(),
        }
    }

    /// A cell parsed for this leaf's type (another kind of cell is a null).
    pub fn push(&mut self, cell: &Cell) {
        match (&mut self.values, cell) {
            (Values::Int64(v), Cell::Int(i)) => v.push(*i),
            (Values::Int32(v), Cell::Int(i)) => v.push(*i as i32),
            (Values::Float64(v), Cell::Float(f)) => v.push(*f),
            (Values::Float32(v), Cell::Float(f)) => v.push(*f as f32),
            (Values::Bool(v), Cell::Bool(b)) => v.push(*b),
            (Values::Str(..), Cell::Str(s)) => return self.push_str(s),
            _ => return self.push_null(),
        }
        self.valid.push(true);
    }

    fn finish(&mut self) -> Result<ArrayRef, String> {
        let nulls = nulls(std::mem::take(&mut self.valid));
        Ok(match (&mut self.values, &self.dtype) {
            (Values::Int64(v), DataType::Timestamp(_, tz)) => Arc::new(
                TimestampMicrosecondArray::new(ScalarBuffer::from(std::mem::take(v)), nulls)
                    .with_timezone_opt(tz.clone()),
            ),
            (Values::Int64(v), _) => Arc::new(Int64Array::new(ScalarBuffer::from(std::mem::take(v)), nulls)),
            (Values::Int32(v), DataType::Date32) => {
                Arc::new(Date32Array::new(ScalarBuffer::from(std::mem::take(v)), nulls))
            }
            (Values::Int32(v), _) => Arc::new(Int32Array::new(ScalarBuffer::from(std::mem::take(v)), nulls)),
            (Values::Float64(v), _) => Arc::new(Float64Array::new(ScalarBuffer::from(std::mem::take(v)), nulls)),
            (Values::Float32(v), _) => Arc::new(Float32Array::new(ScalarBuffer::from(std::mem::take(v)), nulls)),
            (Values::Bool(v), _) => Arc::new(BooleanArray::new(BooleanBuffer::from(std::mem::take(v)), nulls)),
            (Values::Str(text, ends), _) => {
                let (text, ends) = (std::mem::take(text), std::mem::take(ends));
                let array = StringArray::try_new(offsets(ends, "text")?, text.into(), nulls);
                Arc::new(array.map_err(|e| e.to_string())?)
            }
        })
    }
}

/// Value ends (the first value starting at 0) as 32-bit offsets.
fn offsets(ends: Vec<usize>, what: &str) -> Result<OffsetBuffer<i32>, String> {
    let mut offsets = Vec::with_capacity(ends.len() + 1);
    offsets.push(0i32);
    for end in ends {
        offsets.push(i32::try_from(end).map_err(|_| {
            format!("a nested column's {what} in one batch went past 2^31 entries; lower pipeline.batch_size")
        })?);
    }
    Ok(OffsetBuffer::new(ScalarBuffer::from(offsets)))
}

fn nulls(valid: Vec<bool>) -> Option<NullBuffer> {
    if valid.iter().all(|v| *v) {
        return None;
    }
    Some(NullBuffer::from(valid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;

    fn list_of_structs() -> DataType {
        crate::config::column_type("list<struct<a: int64, s: string, d: list<date>>>").unwrap()
    }

    #[test]
    fn truncating_takes_back_whole_values() {
        let t = list_of_structs();
        let tree = |a: i64, s: &str| {
            Nested::List(vec![
                Nested::Struct(vec![
                    Nested::Leaf(Cell::Int(a)),
                    Nested::Leaf(Cell::Str(s.into())),
                    Nested::List(vec![Nested::Leaf(Cell::Int(1)), Nested::Null]),
                ]),
                Nested::Null,
            ])
        };
        let mut b = NestedBuilder::new(&t).unwrap();
        let mut want = NestedBuilder::new(&t).unwrap();
        b.push_tree(&tree(1, "one"));
        want.push_tree(&tree(1, "one"));
        b.push_null();
        want.push_null();
        // a value pushed whole, then taken back; a value left half-built, then taken back
        b.push_tree(&tree(2, "two"));
        b.truncate(2);
        if let NestedBuilder::List { item, .. } = &mut b {
            item.push_tree(&Nested::Struct(vec![Nested::Leaf(Cell::Int(9))]));
        }
        b.truncate(2);
        b.push_tree(&tree(3, "three"));
        want.push_tree(&tree(3, "three"));
        assert_eq!(b.len(), 3);
        let (got, want) = (b.finish().unwrap(), want.finish().unwrap());
        assert_eq!(got.to_data(), want.to_data());
        assert_eq!(got.null_count(), 1);
        assert_eq!(b.len(), 0);
        // a fresh batch after finishing
        b.push_tree(&tree(4, "four"));
        assert_eq!(b.finish().unwrap().len(), 1);
    }

    #[test]
    fn leaves_of_every_type() {
        for t in ["int64", "int32", "float64", "float32", "bool", "date", "timestamp", "timestamp_tz(UTC)", "string"] {
            let t = crate::config::column_type(&format!("list<{t}>")).unwrap();
            let mut b = NestedBuilder::new(&t).unwrap();
            b.push_null();
            b.push_tree(&Nested::List(vec![Nested::Null]));
            let a = b.finish().unwrap();
            assert_eq!(a.data_type(), &t);
            assert_eq!(a.len(), 2);
        }
        assert!(NestedBuilder::new(&DataType::Binary).is_err());
    }
}
