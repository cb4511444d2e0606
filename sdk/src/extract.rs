//! Extractors as plugins: an [`Extractor`] reads from an outside system (an API, a landing
//! folder) one batch per call. The host checkpoints the position each batch ends at and
//! hands it back to [`Extractor::open`] when a run resumes; the watermark it reports (the
//! highest value of an incremental column seen) is what the next run starts from.
//!
//! What an extractor may reach is granted per plugin in the pipeline file, nothing by
//! default: `allowed_hosts` for outgoing HTTP (`wasi:http`), `files` for read-only folders
//! (seen under `/files/NAME`), and `headers` the host adds to granted requests (credentials
//! the plugin never sees).
//!
//! ```
//! use weir_sdk::prelude::*;
//! use weir_sdk::arrow_array::Int64Array;
//! use weir_sdk::extract::{Extracted, Extractor};
//! use std::sync::Arc;
//!
//! #[derive(Deserialize)]
//! #[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
//! struct Config { count: i64 }
//!
//! /// Counts to `count`, ten numbers per batch.
//! struct Count { next: i64, count: i64, schema: SchemaRef }
//!
//! impl Extractor for Count {
//!     type Config = Config;
//!     fn open(c: Config, _ctx: &Context, position: Option<&[u8]>, _watermark: Option<&str>) -> Result<Self> {
//!         let next = match position {
//!             Some(p) => std::str::from_utf8(p).ok().and_then(|s| s.parse().ok())
//!                 .ok_or_else(|| Error::internal("bad position"))?,
//!             None => 0,
//!         };
//!         let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
//!         Ok(Count { next, count: c.count, schema })
//!     }
//!     fn schema(&self) -> SchemaRef { self.schema.clone() }
//!     fn next(&mut self) -> Result<Option<Extracted>> {
//!         if self.next >= self.count { return Ok(None); }
//!         let end = (self.next + 10).min(self.count);
//!         let batch = RecordBatch::try_new(self.schema.clone(),
//!             vec![Arc::new(Int64Array::from_iter_values(self.next..end))])?;
//!         self.next = end;
//!         Ok(Some(Extracted { batch, position: end.to_string().into_bytes(), watermark: None }))
//!     }
//! }
//! weir_sdk::export_extractor!(Count);
//! # fn main() {}
//! ```

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::error::{Error, Result};
use crate::{ipc, Context};

/// One batch and where the extractor stands after it.
#[derive(Debug, Clone)]
pub struct Extracted {
    pub batch: RecordBatch,
    /// Opaque to the host: what [`Extractor::open`] needs to continue after this batch.
    pub position: Vec<u8>,
    /// The highest value of the incremental column seen so far, if the source has one.
    pub watermark: Option<String>,
}

pub trait Extractor: Sized + 'static {
    /// The source's `config` table from the pipeline file.
    type Config: serde::de::DeserializeOwned;

    /// Start reading: from `position` (the last checkpoint's, when a run resumes) and
    /// above `watermark` (the last committed one, for incremental reads).
    fn open(config: Self::Config, ctx: &Context, position: Option<&[u8]>, watermark: Option<&str>) -> Result<Self>;

    /// The schema of every batch.
    fn schema(&self) -> SchemaRef;

    /// The next batch, or `None` at the end.
    fn next(&mut self) -> Result<Option<Extracted>>;
}

/// Runs an extractor over IPC bytes (shared by the component glue and native tests).
pub struct ExtractorRunner<T: Extractor> {
    inner: T,
}

impl<T: Extractor> ExtractorRunner<T> {
    /// Open; returns the runner and its schema as IPC bytes.
    pub fn open(
        config: &str,
        ctx: Context,
        position: Option<&[u8]>,
        watermark: Option<&str>,
    ) -> Result<(Self, Vec<u8>)> {
        let config: T::Config = crate::runner::parse_config(config)?;
        let inner = T::open(config, &ctx, position, watermark)?;
        let schema = ipc::encode_schema(&inner.schema())?;
        Ok((ExtractorRunner { inner }, schema))
    }

    /// The next batch as IPC bytes, with its position and watermark.
    pub fn next_encoded(&mut self) -> Result<Option<Encoded>> {
        let Some(e) = self.inner.next()? else { return Ok(None) };
        let schema = self.inner.schema();
        if e.batch.schema().fields() != schema.fields() {
            return Err(Error::internal("a batch does not have the schema the extractor declared"));
        }
        let ipc = ipc::encode(&schema, std::slice::from_ref(&e.batch))?;
        Ok(Some(Encoded { ipc, position: e.position, watermark: e.watermark }))
    }
}

/// [`Extracted`] as it crosses to the host.
pub struct Encoded {
    pub ipc: Vec<u8>,
    pub position: Vec<u8>,
    pub watermark: Option<String>,
}
