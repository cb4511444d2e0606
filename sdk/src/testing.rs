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

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::error::{Error, Result};
use crate::host::Level;
use crate::rewrite::Rewrite;
use crate::row_filter::RowFilter;
use crate::runner::{RawTransform, Typed};
use crate::{ipc, Context, Transform};

#[derive(Default)]
pub(crate) struct NativeHost {
    pub secrets: HashMap<String, Vec<u8>>,
    pub logs: Vec<(Level, String)>,
    pub counters: HashMap<String, i64>,
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
        Ok(Harness { raw, output, rewrite, filter, _t: PhantomData })
    }

    /// The output schema the instance declared.
    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// One batch through `process`, across an IPC round trip.
    pub fn process(&mut self, batch: &RecordBatch) -> Result<Vec<RecordBatch>> {
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

    /// End of input.
    pub fn finish(&mut self) -> Result<Vec<RecordBatch>> {
        let out = self.raw.finish()?;
        Ok(ipc::decode(&out)?.1)
    }

    /// The instance's checkpoint state (what the host would save).
    pub fn snapshot(&self) -> Result<Option<Vec<u8>>> {
        self.raw.snapshot()
    }

    /// Restore a state from [`Harness::snapshot`] (as the host does on resume).
    pub fn restore(&mut self, state: &[u8]) -> Result<()> {
        self.raw.restore(state)
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
