//! Keyed state kept by the host, outside the plugin's memory: sets of keys and tables of
//! rows combined by key, as large as the data (the host spills them to disk) and
//! checkpointed by the host, so a plugin keeps none of it in its snapshot.
//!
//! ```
//! use std::sync::Arc;
//! use weir_sdk::keyed::{Combine, KeyedState};
//! use weir_sdk::arrow_array::Int64Array;
//! use weir_sdk::prelude::*;
//!
//! let batch = RecordBatch::try_from_iter([
//!     ("id", Arc::new(Int64Array::from(vec![1, 2, 1])) as ArrayRef),
//!     ("amount", Arc::new(Int64Array::from(vec![10, 20, 5])) as ArrayRef),
//! ])
//! .unwrap();
//! // a set: which rows carry a key not seen before
//! let seen = KeyedState::set("seen", &["id"], &batch.schema()).unwrap();
//! assert_eq!(seen.insert_new(&batch).unwrap(), [true, true, false]);
//! // a table: one row per key, values combined, read back in first-seen order
//! let totals = KeyedState::table("totals", &["id"], &[("amount", Combine::Sum)], None, &batch.schema()).unwrap();
//! totals.merge(&batch).unwrap();
//! let out = totals.scan(1000).unwrap().unwrap();
//! assert_eq!(out.column(1).as_primitive::<weir_sdk::arrow_array::types::Int64Type>().values(), &[15, 20]);
//! ```
//!
//! Natively (in `cargo test`), the state lives in the [`crate::testing`] host of the
//! thread, with the same semantics as the runtime's.

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::error::{Error, Result};
use crate::ipc;

/// How a value column combines the row held for a key with a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The first row's value (nulls included).
    First,
    /// The last row's value; with an order column, the greatest-ordered row's (ties go to
    /// the later row, nulls order first).
    Last,
    /// The sum of an int64 (wrapping) or float64 column's non-null values; null while all
    /// were null.
    Sum,
    /// The least non-null value.
    Min,
    /// The greatest non-null value.
    Max,
}

/// A handle on a state the host keeps (see the module documentation).
#[derive(Debug, Clone)]
pub struct KeyedState {
    handle: u32,
    schema: SchemaRef,
}

impl KeyedState {
    /// A set of keys over batches of `schema`.
    pub fn set(name: &str, key: &[&str], schema: &SchemaRef) -> Result<KeyedState> {
        KeyedState::table(name, key, &[], None, schema)
    }

    /// A table: `key` columns and value columns combined as each says; `order_by` orders
    /// the `last` values.
    pub fn table(
        name: &str,
        key: &[&str],
        values: &[(&str, Combine)],
        order_by: Option<&str>,
        schema: &SchemaRef,
    ) -> Result<KeyedState> {
        let schema_ipc = ipc::encode_schema(schema)?;
        let handle = imp::open(name, key, values, order_by, &schema_ipc).map_err(Error::internal)?;
        Ok(KeyedState { handle, schema: schema.clone() })
    }

    /// Sets: add every row's key; `true` for each row whose key was new (the first of
    /// equal keys within the batch).
    pub fn insert_new(&self, batch: &RecordBatch) -> Result<Vec<bool>> {
        let bytes = ipc::encode(&self.schema, std::slice::from_ref(batch))?;
        let mask = imp::insert_new(self.handle, &bytes).map_err(Error::internal)?;
        if mask.len() != batch.num_rows() {
            return Err(Error::internal(format!(
                "the host answered {} rows for a batch of {}",
                mask.len(),
                batch.num_rows()
            )));
        }
        Ok(mask.into_iter().map(|b| b != 0).collect())
    }

    /// Tables: merge every row in order.
    pub fn merge(&self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let bytes = ipc::encode(&self.schema, std::slice::from_ref(batch))?;
        imp::merge(self.handle, &bytes).map_err(Error::internal)
    }

    /// After the last merge: the next at most `max_rows` keys with their values (key
    /// columns, then value columns in order; sums as int64 or float64), in the order the
    /// keys first came; `None` when all were returned.
    pub fn scan(&self, max_rows: u32) -> Result<Option<RecordBatch>> {
        match imp::scan(self.handle, max_rows).map_err(Error::internal)? {
            None => Ok(None),
            Some(bytes) => {
                let (schema, batches) = ipc::decode(&bytes)?;
                Ok(Some(arrow_select::concat::concat_batches(&schema, &batches)?))
            }
        }
    }
}

/// `insert_new` with IPC bytes as they are, for the hostile test plugin (a misbehaving
/// plugin can hand the host any bytes).
#[doc(hidden)]
pub fn raw_insert_new(state: &KeyedState, ipc: &[u8]) -> Result<Vec<u8>> {
    imp::insert_new(state.handle, ipc).map_err(Error::internal)
}

/// The `snapshot-write` import as it is, for the hostile test plugin (the SDK's glue sends
/// a plugin's snapshot through it in parts).
#[doc(hidden)]
pub fn raw_snapshot_write(part: &[u8]) -> Result<()> {
    imp::snapshot_write(part).map_err(Error::internal)
}

/// The `snapshot-read` import as it is, for the hostile test plugin.
#[doc(hidden)]
pub fn raw_snapshot_read(max_bytes: u32) -> Vec<u8> {
    imp::snapshot_read(max_bytes)
}

/// Call during [`crate::Transform::finish`] to be called again once this call's output
/// is through: a large result (a scan of a big table) then leaves in parts, each call
/// under the plugin's deadline and output caps. A call that asks for more must return rows.
pub fn more_output() {
    imp::more_output()
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::Combine;
    use crate::__bindings::weir::plugin::state as st;

    pub fn open(
        name: &str,
        key: &[&str],
        values: &[(&str, Combine)],
        order_by: Option<&str>,
        schema: &[u8],
    ) -> Result<u32, String> {
        let spec = st::Spec {
            name: name.to_string(),
            key: key.iter().map(|k| k.to_string()).collect(),
            values: values
                .iter()
                .map(|(c, m)| st::ValueColumn {
                    name: c.to_string(),
                    combine: match m {
                        Combine::First => st::Combine::First,
                        Combine::Last => st::Combine::Last,
                        Combine::Sum => st::Combine::Sum,
                        Combine::Min => st::Combine::Min,
                        Combine::Max => st::Combine::Max,
                    },
                })
                .collect(),
            order_by: order_by.map(str::to_string),
        };
        st::open(&spec, schema)
    }

    pub fn insert_new(handle: u32, batch: &[u8]) -> Result<Vec<u8>, String> {
        st::insert_new(handle, batch)
    }

    pub fn merge(handle: u32, batch: &[u8]) -> Result<(), String> {
        st::merge(handle, batch)
    }

    pub fn scan(handle: u32, max_rows: u32) -> Result<Option<Vec<u8>>, String> {
        st::scan(handle, max_rows)
    }

    pub fn more_output() {
        st::more_output()
    }

    pub fn snapshot_write(part: &[u8]) -> Result<(), String> {
        st::snapshot_write(part)
    }

    pub fn snapshot_read(max_bytes: u32) -> Vec<u8> {
        st::snapshot_read(max_bytes)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::Combine;
    use crate::testing::{ModelState, NATIVE_HOST};

    pub fn open(
        name: &str,
        key: &[&str],
        values: &[(&str, Combine)],
        order_by: Option<&str>,
        schema: &[u8],
    ) -> Result<u32, String> {
        let schema = crate::ipc::decode_schema(schema).map_err(|e| e.to_string())?;
        let state = ModelState::open(name, key, values, order_by, &schema)?;
        NATIVE_HOST.with(|h| {
            let mut h = h.borrow_mut();
            let owner = h.owner;
            // a state restored before the plugin opened it is reopened, as on a resumed run
            if let Some(i) = h.states.iter().position(|s| s.owner == owner && s.name == name && s.reopen) {
                h.states[i].reopen = false;
                return Ok(i as u32);
            }
            h.states.push(state);
            Ok((h.states.len() - 1) as u32)
        })
    }

    fn with<T>(
        handle: u32,
        bytes: &[u8],
        f: impl FnOnce(&mut ModelState, &arrow_array::RecordBatch) -> Result<T, String>,
    ) -> Result<T, String> {
        let (schema, batches) = crate::ipc::decode(bytes).map_err(|e| e.to_string())?;
        let batch = arrow_select::concat::concat_batches(&schema, &batches).map_err(|e| e.to_string())?;
        NATIVE_HOST.with(|h| {
            let mut h = h.borrow_mut();
            let state = h.states.get_mut(handle as usize).ok_or("no such state")?;
            f(state, &batch)
        })
    }

    pub fn insert_new(handle: u32, batch: &[u8]) -> Result<Vec<u8>, String> {
        with(handle, batch, |s, b| s.insert_new(b).map(|m| m.into_iter().map(u8::from).collect()))
    }

    pub fn merge(handle: u32, batch: &[u8]) -> Result<(), String> {
        with(handle, batch, |s, b| s.merge(b))
    }

    pub fn more_output() {
        NATIVE_HOST.with(|h| h.borrow_mut().more_output = true);
    }

    pub fn scan(handle: u32, max_rows: u32) -> Result<Option<Vec<u8>>, String> {
        NATIVE_HOST.with(|h| {
            let mut h = h.borrow_mut();
            let state = h.states.get_mut(handle as usize).ok_or("no such state")?;
            match state.scan(max_rows as usize)? {
                Some(b) => crate::ipc::encode(&b.schema(), &[b]).map(Some).map_err(|e| e.to_string()),
                None => Ok(None),
            }
        })
    }

    /// The native harness hands snapshots over whole.
    pub fn snapshot_write(_part: &[u8]) -> Result<(), String> {
        Err("snapshot-write is the Wasm host's; the native harness takes snapshots whole".into())
    }

    pub fn snapshot_read(_max_bytes: u32) -> Vec<u8> {
        Vec::new()
    }
}
