//! Run a plugin natively in an ordinary `cargo test`, through the same code path the
//! component uses (config parsing, IPC encoding both ways, output-schema checks).
//!
//! ```
//! # use std::sync::Arc;
//! # use weir_sdk::prelude::*;
//! # #[derive(Deserialize)] #[serde(crate = "weir_sdk::serde", deny_unknown_fields)] struct Config {}
//! # struct Id(SchemaRef);
//! # impl Transform for Id {
//! #     type Config = Config;
//! #     fn new(_: Config, s: &SchemaRef, _: &Context) -> Result<Self> { Ok(Id(s.clone())) }
//! #     fn output_schema(&self) -> SchemaRef { self.0.clone() }
//! #     fn process(&mut self, b: RecordBatch) -> Result<RecordBatch> { Ok(b) }
//! # }
//! use weir_sdk::testing::Harness;
//! let input = RecordBatch::try_from_iter([
//!     ("email", Arc::new(StringArray::from(vec!["a@x.io"])) as ArrayRef),
//! ]).unwrap();
//! let mut h = Harness::<Id>::new("", &input.schema()).unwrap();
//! let out = h.run(&[input.clone()]).unwrap();
//! assert_eq!(out, input);
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use crate::keyed::Combine;
use crate::keys::{encode_key, scalar_at, supported, to_array, Scalar};

use crate::error::{Error, Result};
use crate::host::Level;
use crate::rewrite::Rewrite;
use crate::row_filter::RowFilter;
use crate::runner::{RawTransform, Typed};
use crate::{ipc, Context, Transform};

/// Marks a harness checkpoint that carries keyed states.
const HARNESS_CHECKPOINT: u64 = u64::from_le_bytes(*b"WEIRHNS1");

#[derive(Default)]
pub(crate) struct NativeHost {
    pub secrets: HashMap<String, Vec<u8>>,
    pub logs: Vec<(Level, String)>,
    pub counters: HashMap<String, i64>,
    /// Keyed states (`crate::keyed`), by handle.
    pub states: Vec<ModelState>,
    /// The harness whose call is running: the states it opens are its own.
    pub owner: u64,
    next_owner: u64,
    /// Copies of states taken by [`Harness::snapshot`].
    saved: Vec<Vec<ModelState>>,
    /// The running `finish` asked to be called again.
    pub more_output: bool,
}

thread_local! {
    pub(crate) static NATIVE_HOST: RefCell<NativeHost> = RefCell::new(NativeHost::default());
}

/// Grant a secret to plugins run on this thread (as the pipeline's `secrets = [...]` would).
pub fn grant_secret(name: &str, key: &[u8]) {
    NATIVE_HOST.with(|h| h.borrow_mut().secrets.insert(name.to_string(), key.to_vec()));
}

/// Log lines the plugins on this thread wrote so far.
pub fn logs() -> Vec<(Level, String)> {
    NATIVE_HOST.with(|h| h.borrow().logs.clone())
}

/// Counter values the plugins on this thread added so far.
pub fn counter(name: &str) -> i64 {
    NATIVE_HOST.with(|h| h.borrow().counters.get(name).copied().unwrap_or(0))
}

/// One plugin instance, run natively.
pub struct Harness<T: Transform> {
    /// Which states in the thread's host are this instance's.
    id: u64,
    raw: Typed<T>,
    output: SchemaRef,
    /// The instance's column rewrite, if it declared one: batches cross as the host sends
    /// them (only the rewritten columns) and are put back together as the host does.
    rewrite: Option<Rewrite>,
    /// The instance's row filter, if it declared one: the filter's columns cross, a mask
    /// comes back and the rows are dropped as the host drops them.
    filter: Option<RowFilter>,
    _t: PhantomData<T>,
}

impl<T: Transform> Harness<T> {
    /// Build an instance from a config written as in the pipeline file (the body of the
    /// step's `config` table, in TOML) for input of `schema`.
    pub fn new(config_toml: &str, schema: &SchemaRef) -> Result<Self> {
        let value: toml::Table =
            toml::from_str(config_toml).map_err(|e| Error::config(format!("harness config is not TOML: {e}")))?;
        let json = crate::config::toml_to_json(&toml::Value::Table(value)).to_string();
        let ctx = Context {
            pipeline: "test".into(),
            step: "test".into(),
            plugin: std::any::type_name::<T>().into(),
            partition: None,
        };
        let id = NATIVE_HOST.with(|h| {
            let mut h = h.borrow_mut();
            h.next_owner += 1;
            h.owner = h.next_owner;
            h.owner
        });
        let (raw, schema_bytes) = Typed::<T>::init(&json, &ipc::encode_schema(schema)?, ctx)?;
        let (output, names) =
            Rewrite::from_metadata(ipc::decode_schema(&schema_bytes)?.as_ref()).map_err(Error::internal)?;
        let rewrite = match names {
            Some(names) => Some(Rewrite::new(schema, &output, &names).map_err(Error::internal)?),
            None => None,
        };
        let (output, names) = RowFilter::from_metadata(&output).map_err(Error::internal)?;
        let filter = match names {
            Some(names) => Some(RowFilter::new(schema, &output, &names).map_err(Error::internal)?),
            None => None,
        };
        Ok(Harness { id, raw, output, rewrite, filter, _t: PhantomData })
    }

    /// The output schema the instance declared.
    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// One batch through `process`, across an IPC round trip.
    pub fn process(&mut self, batch: &RecordBatch) -> Result<Vec<RecordBatch>> {
        self.enter();
        if let Some(filter) = &self.filter {
            let part = filter.project(batch).map_err(Error::internal)?;
            let bytes = ipc::encode(&part.schema(), std::slice::from_ref(&part))?;
            let (_, masks) = ipc::decode_owned(self.raw.process(&bytes)?)?;
            let kept = filter.apply(batch, &masks, &self.output).map_err(Error::internal)?;
            return Ok(if kept.num_rows() > 0 { vec![kept] } else { vec![] });
        }
        let Some(rewrite) = &self.rewrite else {
            let bytes = ipc::encode(&batch.schema(), std::slice::from_ref(batch))?;
            let out = self.raw.process(&bytes)?;
            return Ok(ipc::decode_owned(out)?.1);
        };
        let part = rewrite.project(batch).map_err(Error::internal)?;
        let bytes = ipc::encode(&part.schema(), std::slice::from_ref(&part))?;
        let (_, out) = ipc::decode_owned(self.raw.process(&bytes)?)?;
        let out = arrow_select::concat::concat_batches(&rewrite.output, &out)?;
        if batch.num_rows() == 0 {
            return Ok(vec![]);
        }
        Ok(vec![rewrite.merge(batch, &out, &self.output).map_err(Error::internal)?])
    }

    /// End of input: `finish`, called again as long as it asks to be (as the host does).
    pub fn finish(&mut self) -> Result<Vec<RecordBatch>> {
        self.enter();
        let mut batches = Vec::new();
        loop {
            NATIVE_HOST.with(|h| h.borrow_mut().more_output = false);
            let out = ipc::decode(&self.raw.finish()?)?.1;
            let more = NATIVE_HOST.with(|h| h.borrow().more_output);
            if more && out.iter().all(|b| b.num_rows() == 0) {
                return Err(Error::internal("finish asked to be called again but returned no rows"));
            }
            batches.extend(out);
            if !more {
                return Ok(batches);
            }
        }
    }

    fn enter(&self) {
        NATIVE_HOST.with(|h| h.borrow_mut().owner = self.id);
    }

    /// The instance's checkpoint (what the host would save): the plugin's own snapshot
    /// and a copy of the keyed states it opened.
    pub fn snapshot(&mut self) -> Result<Option<Vec<u8>>> {
        self.enter();
        let own = self.raw.snapshot()?;
        let saved = NATIVE_HOST.with(|h| {
            let mut h = h.borrow_mut();
            let mine: Vec<ModelState> = h.states.iter().filter(|s| s.owner == self.id).cloned().collect();
            if mine.is_empty() {
                return None;
            }
            h.saved.push(mine);
            Some(h.saved.len() as u64 - 1)
        });
        let Some(saved) = saved else { return Ok(own) };
        let mut w = crate::state::Writer::default();
        w.u64(HARNESS_CHECKPOINT);
        w.u64(saved);
        w.u64(u64::from(own.is_some()));
        w.bytes(own.as_deref().unwrap_or_default());
        Ok(Some(w.finish()))
    }

    /// Restore a checkpoint from [`Harness::snapshot`] (as the host does on resume): the
    /// keyed states come back by name, then the plugin gets its own snapshot.
    pub fn restore(&mut self, state: &[u8]) -> Result<()> {
        self.enter();
        let mut r = crate::state::Reader::new(state);
        if r.u64().ok() != Some(HARNESS_CHECKPOINT) {
            return self.raw.restore(state);
        }
        let (saved, has_own, own) = (r.u64()?, r.u64()? == 1, r.bytes()?.to_vec());
        r.end()?;
        NATIVE_HOST.with(|h| -> Result<()> {
            let mut h = h.borrow_mut();
            let copies = h.saved.get(saved as usize).cloned().ok_or_else(|| Error::internal("no such checkpoint"))?;
            for mut copy in copies {
                copy.owner = self.id;
                match h.states.iter().position(|s| s.owner == self.id && s.name == copy.name) {
                    Some(i) => h.states[i] = copy,
                    None => {
                        copy.reopen = true;
                        h.states.push(copy);
                    }
                }
            }
            Ok(())
        })?;
        if has_own {
            self.raw.restore(&own)?;
        }
        Ok(())
    }

    /// Every batch, then `finish`; all output concatenated into one batch.
    pub fn run(&mut self, batches: &[RecordBatch]) -> Result<RecordBatch> {
        let mut out = Vec::new();
        for b in batches {
            out.extend(self.process(b)?);
        }
        out.extend(self.finish()?);
        Ok(arrow_select::concat::concat_batches(&self.output, &out)?)
    }
}

/// The keyed state of [`crate::keyed`] as the native harness keeps it: a plain map of
/// values, combined with [`Scalar`] comparisons. The runtime's state (arrow-row bytes,
/// spilled to disk) is tested against it.
#[derive(Debug, Clone)]
pub struct ModelState {
    pub(crate) owner: u64,
    pub(crate) name: String,
    /// Restored before the plugin opened it: its next `open` reopens it.
    pub(crate) reopen: bool,
    key: Vec<usize>,
    values: Vec<(usize, Combine)>,
    order_by: Option<usize>,
    schema: SchemaRef,
    index: HashMap<Vec<u8>, usize>,
    /// Per key, in first-seen order: key values, combined values, order value.
    entries: Vec<(Vec<Scalar>, Vec<Scalar>, Scalar)>,
    scanned: usize,
}

impl ModelState {
    /// Open a state as `weir:plugin/state`'s `open` does.
    pub fn open(
        name: &str,
        key: &[&str],
        values: &[(&str, Combine)],
        order_by: Option<&str>,
        schema: &SchemaRef,
    ) -> std::result::Result<ModelState, String> {
        let find =
            |c: &str| schema.index_of(c).map_err(|_| format!("state `{name}`: the batches have no column `{c}`"));
        if key.is_empty() {
            return Err(format!("state `{name}`: name at least one key column"));
        }
        let key = key.iter().map(|c| find(c)).collect::<std::result::Result<Vec<_>, _>>()?;
        for &k in &key {
            if !supported(schema.field(k).data_type()) {
                return Err(format!("state `{name}`: the test host cannot key on {}", schema.field(k).data_type()));
            }
        }
        let values = values.iter().map(|(c, m)| Ok((find(c)?, *m))).collect::<std::result::Result<Vec<_>, String>>()?;
        let order_by = order_by.map(find).transpose()?;
        let owner = NATIVE_HOST.with(|h| h.borrow().owner);
        Ok(ModelState {
            owner,
            name: name.to_string(),
            reopen: false,
            key,
            values,
            order_by,
            schema: schema.clone(),
            index: HashMap::new(),
            entries: Vec::new(),
            scanned: 0,
        })
    }

    fn key_of(&self, batch: &RecordBatch, row: usize) -> std::result::Result<(Vec<u8>, Vec<Scalar>), String> {
        let cols: Vec<&arrow_array::ArrayRef> = self.key.iter().map(|&k| batch.column(k)).collect();
        let mut bytes = Vec::new();
        encode_key(&cols, row, &mut bytes).map_err(|e| e.to_string())?;
        let values =
            cols.iter().map(|c| scalar_at(c.as_ref(), row)).collect::<Result<Vec<_>>>().map_err(|e| e.to_string())?;
        Ok((bytes, values))
    }

    /// Sets: whether each row's key is new.
    pub fn insert_new(&mut self, batch: &RecordBatch) -> std::result::Result<Vec<bool>, String> {
        if !self.values.is_empty() {
            return Err(format!("state `{}`: insert-new is for sets", self.name));
        }
        (0..batch.num_rows())
            .map(|r| {
                let (bytes, key) = self.key_of(batch, r)?;
                let new = !self.index.contains_key(&bytes);
                if new {
                    self.index.insert(bytes, self.entries.len());
                    self.entries.push((key, Vec::new(), Scalar::Null));
                }
                Ok(new)
            })
            .collect()
    }

    /// Merge every row in order.
    pub fn merge(&mut self, batch: &RecordBatch) -> std::result::Result<(), String> {
        for r in 0..batch.num_rows() {
            let (bytes, key) = self.key_of(batch, r)?;
            let vals = self
                .values
                .iter()
                .map(|(c, _)| scalar_at(batch.column(*c).as_ref(), r))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| e.to_string())?;
            let order = match self.order_by {
                Some(c) => scalar_at(batch.column(c).as_ref(), r).map_err(|e| e.to_string())?,
                None => Scalar::Null,
            };
            let Some(&i) = self.index.get(&bytes) else {
                self.index.insert(bytes, self.entries.len());
                self.entries.push((key, vals, order));
                continue;
            };
            let (_, held, held_order) = &mut self.entries[i];
            let later_wins = order.total_cmp(held_order).is_ge();
            if later_wins {
                *held_order = order;
            }
            for ((_, m), (h, v)) in self.values.iter().zip(held.iter_mut().zip(vals)) {
                let replace = match (m, &*h, &v) {
                    (Combine::First, _, _) => false,
                    (Combine::Last, _, _) => later_wins,
                    (_, _, Scalar::Null) => false,
                    (_, Scalar::Null, _) => true,
                    (Combine::Sum, Scalar::Int(a), Scalar::Int(b)) => {
                        *h = Scalar::Int(a.wrapping_add(*b));
                        false
                    }
                    (Combine::Sum, a, b) => {
                        *h = Scalar::Float(a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0));
                        false
                    }
                    (Combine::Min, a, b) => b.total_cmp(a).is_lt(),
                    (Combine::Max, a, b) => b.total_cmp(a).is_gt(),
                };
                if replace {
                    *h = v;
                }
            }
        }
        Ok(())
    }

    /// The next at most `max_rows` keys with their values, in first-seen order.
    pub fn scan(&mut self, max_rows: usize) -> std::result::Result<Option<RecordBatch>, String> {
        if self.values.is_empty() {
            return Err(format!("state `{}`: a set is not scanned", self.name));
        }
        let rows = &self.entries[self.scanned..(self.scanned + max_rows.max(1)).min(self.entries.len())];
        if rows.is_empty() {
            return Ok(None);
        }
        self.scanned += rows.len();
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for (i, &k) in self.key.iter().enumerate() {
            let f = self.schema.field(k);
            let vals: Vec<Scalar> = rows.iter().map(|r| r.0[i].clone()).collect();
            columns.push(to_array(f.data_type(), &vals).map_err(|e| e.to_string())?);
            fields.push(Field::new(f.name(), f.data_type().clone(), true));
        }
        for (i, (c, m)) in self.values.iter().enumerate() {
            let f = self.schema.field(*c);
            let dt = match (m, f.data_type()) {
                (Combine::Sum, DataType::Int64) => DataType::Int64,
                (Combine::Sum, _) => DataType::Float64,
                (_, dt) => dt.clone(),
            };
            let vals: Vec<Scalar> = rows.iter().map(|r| r.1[i].clone()).collect();
            columns.push(to_array(&dt, &vals).map_err(|e| e.to_string())?);
            fields.push(Field::new(f.name(), dt, true));
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map(Some).map_err(|e| e.to_string())
    }
}
