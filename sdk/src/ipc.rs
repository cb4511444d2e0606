//! Arrow IPC stream encoding, as used on both sides of the plugin boundary.

use std::io::Cursor;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::{StreamDecoder, StreamReader};
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{ArrowError, Schema, SchemaRef};

/// Encode a schema and zero or more batches as one IPC stream.
pub fn encode(schema: &Schema, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    encode_into(Vec::new(), schema, batches)
}

/// [`encode`] into `buf`, which is cleared first: a caller encoding batch after batch hands
/// the previous stream's buffer back and so reuses its memory (no fresh pages to fault in and
/// zero for every batch).
pub fn encode_into(mut buf: Vec<u8>, schema: &Schema, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    buf.clear();
    buf.reserve(batches.iter().map(|b| b.get_array_memory_size()).sum::<usize>() + 1024);
    let mut writer = StreamWriter::try_new(buf, schema)?;
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

/// Decode an IPC stream handed over whole: the arrays point into `bytes` rather than into
/// copies of it. Every buffer is validated. Bytes after the end-of-stream marker are an error.
pub fn decode_owned(bytes: Vec<u8>) -> Result<(SchemaRef, Vec<RecordBatch>), ArrowError> {
    let mut decoder = StreamDecoder::new();
    // (a buffer not aligned for its type is copied to one that is, by the decoder)
    let mut buffer = Buffer::from_vec(bytes);
    let mut batches = Vec::new();
    while let Some(batch) = decoder.decode(&mut buffer)? {
        batches.push(batch);
    }
    decoder.finish()?;
    let schema = decoder.schema().ok_or_else(|| ArrowError::IpcError("the stream holds no schema".into()))?;
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
/// always decodes plugin output with [`decode_owned`], which validates everything.
///
/// (This copies each batch's body out of `bytes`; [`decode_owned`]'s decoder would not, but
/// it validates record batches whatever it is told, which costs more than the copy.)
pub fn decode_trusted(bytes: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>), ArrowError> {
    let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
    // SAFETY: the bytes were written by `encode` from arrays that passed validation when
    // they were built or read; see the function documentation for the trust argument.
    let reader = unsafe { reader.with_skip_validation(true) };
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, Int64Array, StringArray};
    use std::sync::Arc;

    fn batch(start: i64) -> RecordBatch {
        RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from(vec![Some(start), None, Some(start + 2)])) as ArrayRef),
            ("s", Arc::new(StringArray::from(vec![Some("a"), Some("ünï"), None])) as ArrayRef),
        ])
        .unwrap()
    }

    #[test]
    fn decode_owned_gives_back_what_was_encoded_and_points_into_the_bytes() {
        let batches = [batch(0), batch(10)];
        let bytes = encode(&batches[0].schema(), &batches).unwrap();
        let range = bytes.as_ptr_range();
        let (schema, got) = decode_owned(bytes).unwrap();
        assert_eq!(schema, batches[0].schema());
        assert_eq!(got, batches);
        let ids = got[1].column(0).to_data();
        assert!(range.contains(&ids.buffers()[0].as_ptr()), "the ids were copied");
        let (schema, none) = decode_owned(encode_schema(&schema).unwrap()).unwrap();
        assert_eq!((schema.fields().len(), none.len()), (2, 0));
    }

    #[test]
    fn decode_owned_refuses_bad_streams() {
        let good = encode(&batch(0).schema(), &[batch(0)]).unwrap();
        // cut short, trailing bytes, nothing at all
        assert!(decode_owned(good[..good.len() - 9].to_vec()).is_err());
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"xx");
        assert!(decode_owned(trailing).is_err());
        assert!(decode_owned(Vec::new()).is_err());
        // a string that is not UTF-8: validated, unlike decode_trusted
        let mut bad = good.clone();
        let needle: &[u8] = &"ünï".as_bytes()[..3];
        let at = bad.windows(3).position(|w| w == needle).unwrap();
        bad[at] = 0xff;
        assert!(decode_owned(bad.clone()).is_err());
        assert!(decode_trusted(&bad).is_ok());
    }
}
