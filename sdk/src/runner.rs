//! The bytes-level plugin interface and the adapter that turns a [`Transform`] into one.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::error::{Error, Result};
use crate::host::{phase, phases};
use crate::rewrite::Rewrite;
use crate::row_filter::RowFilter;
use crate::{ipc, Context, Transform};

/// A transform that handles Arrow IPC bytes itself. Most plugins implement [`Transform`]
/// instead; this is for those that must control the bytes (and for the host's own tests).
pub trait RawTransform: Sized + 'static {
    /// `config` is the plugin's config table as JSON; `input_schema` an IPC stream holding a
    /// schema. Returns the instance and the output schema as an IPC stream.
    fn init(config: &str, input_schema: &[u8], ctx: Context) -> Result<(Self, Vec<u8>)>;
    /// One IPC stream in, one IPC stream (zero or more batches) out.
    fn process(&mut self, batch: &[u8]) -> Result<Vec<u8>>;
    /// End of input.
    fn finish(&mut self) -> Result<Vec<u8>>;
    /// Checkpoint: the state kept across batches, if any.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Resume from a snapshot.
    fn restore(&mut self, _state: &[u8]) -> Result<()> {
        Err(Error::internal("this plugin keeps no state, so it has none to restore"))
    }
}

/// Adapts a [`Transform`] to [`RawTransform`]: decodes input, encodes output, and checks
/// that every batch matches the declared output schema.
pub struct Typed<T: Transform> {
    inner: T,
    /// What each returned batch must look like: the output schema, under a column rewrite
    /// its rewritten columns only, under a row filter the mask.
    output: SchemaRef,
    mode: Mode,
    /// What the batches in must look like (checked under a row filter).
    input: SchemaRef,
}

/// How batches cross: whole, only the rewritten columns, or a filter's columns in and a
/// mask out.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Whole,
    /// Rows in must equal rows out.
    Rewrite,
    /// One mask value per row in; the batches in hold only the filter's columns.
    Filter,
}

/// Parse a plugin's JSON config into its typed form; errors name the field path
/// (`columns.email.method: unknown variant ...`).
pub fn parse_config<C: serde::de::DeserializeOwned>(json: &str) -> Result<C> {
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // serde_json appends a position in the JSON text, which the user never wrote
        let inner = e.inner().to_string();
        let inner = match inner.rfind(" at line ") {
            Some(i) if inner[i..].contains(" column ") => inner[..i].to_string(),
            _ => inner,
        };
        if path == "." || path.is_empty() {
            Error::config(inner)
        } else {
            Error::config(format!("{path}: {inner}"))
        }
    })
}

impl<T: Transform> Typed<T> {
    fn conform(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let got = batch.schema();
        if !crate::util::same_shape(&got, &self.output) {
            return Err(Error::internal(format!(
                "the plugin returned a batch with schema [{}] but declared [{}]",
                crate::util::schema_text(&got),
                crate::util::schema_text(&self.output)
            )));
        }
        crate::util::with_schema(batch, &self.output)
    }

    fn encode(&self, batches: &[RecordBatch]) -> Result<Vec<u8>> {
        Ok(ipc::encode(&self.output, batches)?)
    }
}

impl<T: Transform> RawTransform for Typed<T> {
    fn init(config: &str, input_schema: &[u8], ctx: Context) -> Result<(Self, Vec<u8>)> {
        let config: T::Config = parse_config(config)?;
        let input = ipc::decode_schema(input_schema)
            .map_err(|e| Error::internal(format!("bad input schema from host: {e}")))?;
        let inner = T::new(config, &input, &ctx)?;
        let output = inner.output_schema();
        let inconsistent = |what: &str, e: String| Error::internal(format!("the plugin's {what} is inconsistent: {e}"));
        match (inner.rewrites(), inner.filter_columns()) {
            (None, None) => {
                let bytes = ipc::encode_schema(&output)?;
                Ok((Typed { inner, output, mode: Mode::Whole, input }, bytes))
            }
            (Some(names), None) => {
                let rewrite = Rewrite::new(&input, &output, &names).map_err(|e| inconsistent("column rewrite", e))?;
                let bytes = ipc::encode_schema(&Rewrite::declare(&output, &names))?;
                Ok((Typed { inner, output: rewrite.output, mode: Mode::Rewrite, input: rewrite.input }, bytes))
            }
            (None, Some(names)) => {
                let filter = RowFilter::new(&input, &output, &names).map_err(|e| inconsistent("row filter", e))?;
                let bytes = ipc::encode_schema(&RowFilter::declare(&output, &names))?;
                Ok((Typed { inner, output: RowFilter::mask_schema(), mode: Mode::Filter, input: filter.input }, bytes))
            }
            (Some(_), Some(_)) => Err(Error::internal("the plugin declares both a column rewrite and a row filter")),
        }
    }

    fn process(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        let (_, batches) = ipc::decode_trusted(bytes).map_err(|e| Error::InvalidInput {
            row: None,
            column: None,
            message: format!("input is not a valid Arrow IPC stream: {e}"),
        })?;
        phase(phases::DECODED);
        let mut out = Vec::with_capacity(batches.len());
        let mut offset = 0u64;
        for batch in batches {
            let rows = batch.num_rows() as u64;
            if self.mode == Mode::Filter {
                if !crate::util::same_shape(&batch.schema(), &self.input) {
                    return Err(Error::internal(format!(
                        "the host sent columns [{}] to a row filter that reads [{}]: it does not know \
                         `weir.filter` declarations; use a newer weir",
                        crate::util::schema_text(&batch.schema()),
                        crate::util::schema_text(&self.input)
                    )));
                }
                let mask = self.inner.keep(&batch).map_err(|e| e.offset_row(offset))?;
                if mask.len() as u64 != rows {
                    return Err(Error::internal(format!(
                        "the plugin filters rows but returned {} mask values for a batch of {rows}",
                        mask.len()
                    )));
                }
                if rows > 0 {
                    out.push(RecordBatch::try_new(self.output.clone(), vec![Arc::new(mask)])?);
                }
                offset += rows;
                continue;
            }
            let result = self.inner.process(batch).map_err(|e| e.offset_row(offset))?;
            if self.mode == Mode::Rewrite && result.num_rows() as u64 != rows {
                return Err(Error::internal(format!(
                    "the plugin rewrites columns but returned {} rows for a batch of {rows}",
                    result.num_rows()
                )));
            }
            if result.num_rows() > 0 {
                out.push(self.conform(result)?);
            }
            offset += rows;
        }
        phase(phases::COMPUTED);
        self.encode(&out)
    }

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>> {
        self.inner.snapshot()
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        self.inner.restore(state)
    }

    fn finish(&mut self) -> Result<Vec<u8>> {
        phase(phases::DECODED);
        let out = match self.inner.finish()? {
            Some(b) if b.num_rows() > 0 && self.mode == Mode::Rewrite => {
                return Err(Error::internal("the plugin rewrites columns row for row but emitted rows at the end"))
            }
            Some(b) if b.num_rows() > 0 && self.mode == Mode::Filter => {
                return Err(Error::internal("the plugin filters rows but emitted rows at the end"))
            }
            Some(b) if b.num_rows() > 0 => vec![self.conform(b)?],
            _ => vec![],
        };
        phase(phases::COMPUTED);
        self.encode(&out)
    }
}
