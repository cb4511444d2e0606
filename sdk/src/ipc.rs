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
