//! Avro object container files: each file's embedded schema mapped to Arrow by arrow-rs's
//! own reader (`arrow-avro`), logical types included (dates, timestamps, decimals, UUIDs);
//! optional fields (`["null", T]`) become nullable columns, records structs, arrays lists.
//! Blocks compressed with deflate, snappy or bzip2 are read; a file of another codec is
//! named as such.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_avro::reader::{Reader, ReaderBuilder};
use arrow_schema::{ArrowError, SchemaRef};

use super::files::{FileBatches, ReadSpec};
use super::Skipped;
use crate::io::{Error, Result};

type AvroReader = Reader<BufReader<File>>;

fn open_reader(path: &Path, batch_size: usize) -> Result<AvroReader> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    // A container file ends with its sync marker (after the header, or after its last
    // block). The reader takes a file cut short inside a block for its end, silently: such
    // a file is refused here, before a row of it is read.
    let mut tail = [0u8; 16];
    let whole = file
        .seek(SeekFrom::End(-16))
        .and_then(|_| file.read_exact(&mut tail))
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .is_ok();
    let reader = ReaderBuilder::new()
        .with_batch_size(batch_size)
        .build(BufReader::with_capacity(256 << 10, file))
        .map_err(|e| match e {
            ArrowError::IoError(_, io) if super::corrupt_input(&io).is_none() && !is_eof(&io) => Error::io(path, io),
            other => not_avro(path, other),
        })?;
    if !whole || tail != reader.avro_header().sync() {
        return Err(not_avro(
            path,
            ArrowError::ParseError("it does not end with its sync marker: truncated or damaged".into()),
        ));
    }
    Ok(reader)
}

fn is_eof(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::UnexpectedEof
}

/// A file that is not a readable Avro container: the data's fault, named.
fn not_avro(path: &Path, e: ArrowError) -> Error {
    let message = match e {
        ArrowError::ParseError(m) | ArrowError::InvalidArgumentError(m) | ArrowError::SchemaError(m) => m,
        ArrowError::IoError(m, _) => m,
        other => other.to_string(),
    };
    Error::Input {
        file: path.to_path_buf(),
        line: 0,
        column: None,
        message: format!("not a readable Avro object container file: {message}"),
    }
}

/// The source's columns: the first file's schema, as Arrow.
pub(super) fn schema(files: &[PathBuf], spec: &ReadSpec) -> Result<SchemaRef> {
    Ok(open_reader(&files[0], spec.batch_size)?.schema())
}

pub(super) struct AvroFile {
    path: PathBuf,
    reader: AvroReader,
    /// Records read so far: the position checkpoints record.
    consumed: u64,
    /// Resuming inside a batch: the rest of it, handed out first.
    pending: Option<RecordBatch>,
}

impl AvroFile {
    pub(super) fn open(path: &Path, schema: &SchemaRef, spec: &ReadSpec, offset: u64) -> Result<Self> {
        let reader = open_reader(path, spec.batch_size)?;
        if reader.schema().fields() != schema.fields() {
            return Err(Error::Input {
                file: path.to_path_buf(),
                line: 0,
                column: None,
                message: format!(
                    "its schema differs from the source's first file (the files of one source must share their columns): {} instead of {}",
                    weir_sdk::util::schema_text(&reader.schema()),
                    weir_sdk::util::schema_text(schema)
                ),
            });
        }
        let mut file = AvroFile { path: path.to_path_buf(), reader, consumed: 0, pending: None };
        // resuming: the records before `offset` were read by the crashed run
        while file.consumed < offset {
            let Some(batch) = file.read()? else { break };
            let (rows, left) = (batch.num_rows() as u64, offset - file.consumed);
            if rows > left {
                file.pending = Some(batch.slice(left as usize, (rows - left) as usize));
                file.consumed = offset;
            } else {
                file.consumed += rows;
            }
        }
        Ok(file)
    }

    fn read(&mut self) -> Result<Option<RecordBatch>> {
        match self.reader.next() {
            None => Ok(None),
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(ArrowError::IoError(_, io))) if super::corrupt_input(&io).is_none() && !is_eof(&io) => {
                Err(Error::io(&self.path, io))
            }
            Some(Err(e)) => Err(not_avro(&self.path, e)),
        }
    }
}

impl FileBatches for AvroFile {
    fn next_batch(&mut self, _skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        if let Some(rest) = self.pending.take() {
            self.consumed += rest.num_rows() as u64;
            return Ok(Some(rest));
        }
        let batch = self.read()?;
        if let Some(b) = &batch {
            self.consumed += b.num_rows() as u64;
        }
        Ok(batch)
    }

    fn consumed(&self) -> u64 {
        self.consumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::source::{FileSource, Source};
    use arrow_array::{Array, ArrayRef, Int64Array, StringArray};
    use arrow_avro::writer::AvroWriter;
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;

    fn write(path: &Path, ids: std::ops::Range<i64>, with_name: bool) {
        let mut fields = vec![Field::new("id", DataType::Int64, false)];
        let mut cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_iter_values(ids.clone()))];
        if with_name {
            fields.push(Field::new("name", DataType::Utf8, true));
            cols.push(Arc::new(StringArray::from_iter(ids.map(|i| (i % 3 != 0).then(|| format!("n{i}"))))));
        }
        let schema = Schema::new(fields);
        let batch = RecordBatch::try_new(Arc::new(schema.clone()), cols).unwrap();
        let mut w = AvroWriter::new(Vec::new(), schema).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        std::fs::write(path, w.into_inner()).unwrap();
    }

    fn source(dir: &Path, path: &str, batch_size: usize) -> Result<FileSource> {
        let toml = format!(
            "[pipeline]\nname = \"a\"\n[sources.in]\nformat = \"avro\"\npath = \"{path}\"\n[steps.s]\ninput = \"in\"\noutput = {{ path = \"out\" }}\n"
        );
        std::fs::write(dir.join("p.toml"), toml).unwrap();
        let pipeline = crate::config::Pipeline::load(&dir.join("p.toml")).unwrap();
        FileSource::open(&pipeline.sources["in"], None, batch_size)
    }

    fn ids(src: &mut FileSource) -> Vec<i64> {
        let mut out = Vec::new();
        while let Some(b) = src.next_batch() {
            let b = b.unwrap();
            out.extend(b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().iter().copied());
        }
        out
    }

    #[test]
    fn files_are_read_in_order_and_a_position_resumes_inside_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.avro"), 0..2500, true);
        write(&dir.path().join("b.avro"), 2500..3000, true);
        let mut all = source(dir.path(), "*.avro", 1000).unwrap();
        assert_eq!(all.schema().field(1).data_type(), &DataType::Utf8);
        assert!(all.schema().field(1).is_nullable() && !all.schema().field(0).is_nullable());
        assert_eq!(ids(&mut all), (0..3000).collect::<Vec<_>>());
        // a position taken after two batches, handed to a source of another batch size
        let mut first = source(dir.path(), "*.avro", 1000).unwrap();
        first.next_batch().unwrap().unwrap();
        first.next_batch().unwrap().unwrap();
        let pos = first.position();
        let mut resumed = source(dir.path(), "*.avro", 700).unwrap();
        resumed.seek(&pos).unwrap();
        assert_eq!(ids(&mut resumed), (2000..3000).collect::<Vec<_>>());
        let mut odd = source(dir.path(), "*.avro", 1000).unwrap();
        odd.seek(&serde_json::json!({"file": 0, "rows": 1500})).unwrap();
        assert_eq!(ids(&mut odd)[..3], [1500, 1501, 1502]);
    }

    #[test]
    fn damaged_and_mismatched_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.avro"), 0..100, true);
        write(&dir.path().join("b.avro"), 0..100, false);
        let mut src = source(dir.path(), "*.avro", 1000).unwrap();
        let err = std::iter::from_fn(|| src.next_batch()).find_map(|b| b.err()).unwrap().to_string();
        assert!(err.contains("b.avro") && err.contains("schema differs"), "{err}");
        std::fs::write(dir.path().join("c.avro"), b"not avro at all").unwrap();
        let err = source(dir.path(), "c.avro", 1000).err().unwrap().to_string();
        assert!(err.contains("c.avro") && err.contains("not a readable Avro object container file"), "{err}");
        // cut short inside its data block
        let whole = std::fs::read(dir.path().join("a.avro")).unwrap();
        std::fs::write(dir.path().join("d.avro"), &whole[..whole.len() - 40]).unwrap();
        let err = source(dir.path(), "d.avro", 1000).err().unwrap();
        assert!(matches!(err, Error::Input { .. }), "a truncated file is the data's fault: {err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
