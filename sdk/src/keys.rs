//! Row keys and single values, for plugins that group or deduplicate rows.

use std::cmp::Ordering;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow_schema::{DataType, TimeUnit};

use crate::error::{Error, Result};

/// One value of a column, in a form that compares and hashes.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Null,
    Bool(bool),
    /// Every integer type, dates (days) and timestamps (in their unit).
    Int(i64),
    Float(f64),
    Str(String),
}

impl Scalar {
    /// Total order: nulls first, then by value (NaN last among floats).
    pub fn total_cmp(&self, other: &Scalar) -> Ordering {
        use Scalar::*;
        match (self, other) {
            (Null, Null) => Ordering::Equal,
            (Null, _) => Ordering::Less,
            (_, Null) => Ordering::Greater,
            (Bool(a), Bool(b)) => a.cmp(b),
            (Int(a), Int(b)) => a.cmp(b),
            (Float(a), Float(b)) => a.total_cmp(b),
            (Int(a), Float(b)) => (*a as f64).total_cmp(b),
            (Float(a), Int(b)) => a.total_cmp(&(*b as f64)),
            (Str(a), Str(b)) => a.cmp(b),
            (a, b) => format!("{a:?}").cmp(&format!("{b:?}")),
        }
    }

    /// As a float, for sums and averages.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Int(i) => Some(*i as f64),
            Scalar::Float(f) => Some(*f),
            _ => None,
        }
    }
}

/// Whether [`scalar_at`] and [`to_array`] support `dtype`.
pub fn supported(dtype: &DataType) -> bool {
    matches!(
        dtype,
        DataType::Boolean
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::Float32
            | DataType::Float64
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Date32
            | DataType::Timestamp(_, _)
    )
}

/// The value at `row` of `array`. Unsupported types are an error naming the type.
pub fn scalar_at(array: &dyn Array, row: usize) -> Result<Scalar> {
    if array.is_null(row) {
        return Ok(Scalar::Null);
    }
    Ok(match array.data_type() {
        DataType::Boolean => Scalar::Bool(array.as_boolean().value(row)),
        DataType::Int8 => Scalar::Int(array.as_primitive::<Int8Type>().value(row) as i64),
        DataType::Int16 => Scalar::Int(array.as_primitive::<Int16Type>().value(row) as i64),
        DataType::Int32 => Scalar::Int(array.as_primitive::<Int32Type>().value(row) as i64),
        DataType::Int64 => Scalar::Int(array.as_primitive::<Int64Type>().value(row)),
        DataType::UInt8 => Scalar::Int(array.as_primitive::<UInt8Type>().value(row) as i64),
        DataType::UInt16 => Scalar::Int(array.as_primitive::<UInt16Type>().value(row) as i64),
        DataType::UInt32 => Scalar::Int(array.as_primitive::<UInt32Type>().value(row) as i64),
        DataType::Float32 => Scalar::Float(array.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => Scalar::Float(array.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => Scalar::Str(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Scalar::Str(array.as_string::<i64>().value(row).to_string()),
        DataType::Date32 => Scalar::Int(array.as_primitive::<Date32Type>().value(row) as i64),
        DataType::Timestamp(TimeUnit::Second, _) => Scalar::Int(array.as_primitive::<TimestampSecondType>().value(row)),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            Scalar::Int(array.as_primitive::<TimestampMillisecondType>().value(row))
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            Scalar::Int(array.as_primitive::<TimestampMicrosecondType>().value(row))
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            Scalar::Int(array.as_primitive::<TimestampNanosecondType>().value(row))
        }
        other => return Err(Error::config(format!("columns of type {other} are not supported here"))),
    })
}

/// Build an array of `dtype` from scalars (the inverse of [`scalar_at`]).
pub fn to_array(dtype: &DataType, values: &[Scalar]) -> Result<ArrayRef> {
    fn int(s: &Scalar) -> Option<i64> {
        match s {
            Scalar::Int(i) => Some(*i),
            Scalar::Float(f) => Some(*f as i64),
            _ => None,
        }
    }
    let ints = || values.iter().map(int);
    let array: ArrayRef = match dtype {
        DataType::Boolean => Arc::new(BooleanArray::from_iter(values.iter().map(|s| match s {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }))),
        DataType::Int64 => Arc::new(Int64Array::from_iter(ints())),
        DataType::Int32 => Arc::new(arrow_array::Int32Array::from_iter(ints().map(|v| v.map(|v| v as i32)))),
        DataType::Int16 => Arc::new(arrow_array::Int16Array::from_iter(ints().map(|v| v.map(|v| v as i16)))),
        DataType::Int8 => Arc::new(arrow_array::Int8Array::from_iter(ints().map(|v| v.map(|v| v as i8)))),
        DataType::UInt8 => Arc::new(arrow_array::UInt8Array::from_iter(ints().map(|v| v.map(|v| v as u8)))),
        DataType::UInt16 => Arc::new(arrow_array::UInt16Array::from_iter(ints().map(|v| v.map(|v| v as u16)))),
        DataType::UInt32 => Arc::new(arrow_array::UInt32Array::from_iter(ints().map(|v| v.map(|v| v as u32)))),
        DataType::Date32 => Arc::new(arrow_array::Date32Array::from_iter(ints().map(|v| v.map(|v| v as i32)))),
        DataType::Timestamp(unit, tz) => {
            let a = Int64Array::from_iter(ints());
            let data = a.into_data().into_builder().data_type(DataType::Timestamp(*unit, tz.clone()));
            arrow_array::make_array(data.build()?)
        }
        DataType::Float64 | DataType::Float32 => {
            let a = Float64Array::from_iter(values.iter().map(|s| s.as_f64()));
            if dtype == &DataType::Float32 {
                Arc::new(arrow_array::Float32Array::from_iter(a.iter().map(|v| v.map(|v| v as f32))))
            } else {
                Arc::new(a)
            }
        }
        DataType::Utf8 | DataType::LargeUtf8 => {
            let a = StringArray::from_iter(values.iter().map(|s| match s {
                Scalar::Str(v) => Some(v.as_str()),
                _ => None,
            }));
            if dtype == &DataType::LargeUtf8 {
                Arc::new(arrow_array::LargeStringArray::from_iter(a.iter()))
            } else {
                Arc::new(a)
            }
        }
        other => return Err(Error::config(format!("columns of type {other} are not supported here"))),
    };
    Ok(array)
}

/// Encodes the values of several key columns of one row into bytes that are equal exactly
/// when the keys are equal (nulls equal nulls), for hash maps keyed by row.
pub fn encode_key(columns: &[&ArrayRef], row: usize, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    for col in columns {
        encode_scalar(&scalar_at(col.as_ref(), row)?, out);
    }
    Ok(())
}

/// The bytes [`encode_key`] gives for a row whose key values are `values`.
pub fn encode_scalars(values: &[Scalar], out: &mut Vec<u8>) {
    out.clear();
    for v in values {
        encode_scalar(v, out);
    }
}

fn encode_scalar(v: &Scalar, out: &mut Vec<u8>) {
    match v {
        Scalar::Null => out.push(0),
        Scalar::Bool(b) => out.extend_from_slice(&[1, *b as u8]),
        Scalar::Int(i) => {
            out.push(2);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Scalar::Float(f) => {
            out.push(3);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Scalar::Str(s) => {
            out.push(4);
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}
