//! Arrow IPC stream encoding, as used on both sides of the plugin boundary.

use std::io::Cursor;

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{ArrowError, Schema, SchemaRef};

/// Encode a schema and zero or more batches as one IPC stream.
pub fn encode(schema: &Schema, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let capacity = batches.iter().map(|b| b.get_array_memory_size()).sum::<usize>() + 1024;
    let mut writer = StreamWriter::try_new(Vec::with_capacity(capacity), schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    writer.into_inner()
}

/// Encode a schema alone (a stream with no batches).
pub fn encode_schema(schema: &Schema) -> Result<Vec<u8>, ArrowError> {
    encode(schema, &[])
}

/// Decode an IPC stream into its schema and batches. Every buffer is validated.
pub fn decode(bytes: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>), ArrowError> {
    let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// Decode a stream that holds only a schema.
pub fn decode_schema(bytes: &[u8]) -> Result<SchemaRef, ArrowError> {
    Ok(decode(bytes)?.0)
}

/// Decode bytes the weir host produced, skipping buffer validation (UTF-8, offsets).
///
/// Only for the guest side: the host encodes arrays it has already validated, and a plugin
/// is at the host's mercy in any case, so checking again costs time for nothing (string
/// validation without SIMD is the largest cost of crossing the boundary). The host itself
/// always decodes plugin output with [`decode`], which validates everything.
pub fn decode_trusted(bytes: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>), ArrowError> {
    let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
    // SAFETY: the bytes were written by `encode` from arrays that passed validation when
    // they were built or read; see the function documentation for the trust argument.
    let reader = unsafe { reader.with_skip_validation(true) };
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}
