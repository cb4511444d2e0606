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

/// A reader of the file, and the records its blocks declare.
fn open_reader(path: &Path, batch_size: usize) -> Result<(AvroReader, u64)> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = ReaderBuilder::new()
        .with_batch_size(batch_size)
        .build(BufReader::with_capacity(256 << 10, file.try_clone().map_err(|e| Error::io(path, e))?))
        .map_err(|e| match e {
            ArrowError::IoError(_, io) if super::corrupt_input(&io).is_none() && !is_eof(&io) => Error::io(path, io),
            other => not_avro(path, other),
        })?;
    // The reader takes a file cut short inside a block, or a block that claims more bytes
    // than the file has, for the end of the data, silently: the file's structure is walked
    // first (block headers and sync markers only, no decoding) and a damaged one refused
    // before a row of it is read; its record count is checked when the reader ends.
    let sync = reader.avro_header().sync();
    file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    let records = container::records(BufReader::with_capacity(64 << 10, file), &sync).map_err(|e| match e {
        container::Damage::Io(io) => Error::io(path, io),
        container::Damage::Structure(m) => not_avro(path, ArrowError::ParseError(m)),
    })?;
    Ok((reader, records))
}

/// The block structure of an object container file (header, then blocks of a record count,
/// a byte size, the bytes and the sync marker), walked without decoding a record.
mod container {
    use std::io::{BufRead, Read, Seek};

    pub(super) enum Damage {
        Io(std::io::Error),
        Structure(String),
    }

    fn damaged<T>(what: impl Into<String>) -> Result<T, Damage> {
        Err(Damage::Structure(what.into()))
    }

    /// A zig-zag varint long; `None` at a clean end of the input before its first byte.
    fn long(input: &mut impl BufRead) -> Result<Option<i64>, Damage> {
        let (mut value, mut shift) = (0u64, 0);
        loop {
            let mut byte = [0u8];
            match input.read(&mut byte) {
                Ok(0) if shift == 0 => return Ok(None),
                Ok(0) => return damaged("it ends inside a number: truncated"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Damage::Io(e)),
            }
            if shift > 63 {
                return damaged("a number longer than 10 bytes: damaged");
            }
            value |= u64::from(byte[0] & 0x7f) << shift;
            if byte[0] & 0x80 == 0 {
                return Ok(Some((value >> 1) as i64 ^ -((value & 1) as i64)));
            }
            shift += 7;
        }
    }

    /// Seek past `n` bytes that must be in the file (`len` bytes long).
    fn skip(input: &mut std::io::BufReader<std::fs::File>, len: u64, n: i64, what: &str) -> Result<(), Damage> {
        let n = u64::try_from(n).or_else(|_| damaged(format!("{what} has a negative size: damaged")))?;
        let at = input.stream_position().map_err(Damage::Io)?;
        if at.saturating_add(n) > len {
            return damaged(format!("{what} claims {n} bytes, more than the file has: truncated or damaged"));
        }
        input.seek_relative(n as i64).map_err(Damage::Io)
    }

    fn sync_marker(input: &mut impl BufRead, sync: &[u8; 16], after: &str) -> Result<(), Damage> {
        let mut got = [0u8; 16];
        match input.read_exact(&mut got) {
            Ok(()) if &got == sync => Ok(()),
            Ok(()) => damaged(format!("no sync marker after {after}: damaged")),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                damaged(format!("it ends before the sync marker after {after}: truncated"))
            }
            Err(e) => Err(Damage::Io(e)),
        }
    }

    /// The records the file's blocks declare, once its structure is found whole.
    pub(super) fn records(mut input: std::io::BufReader<std::fs::File>, sync: &[u8; 16]) -> Result<u64, Damage> {
        let len = input.get_ref().metadata().map_err(Damage::Io)?.len();
        let mut magic = [0u8; 4];
        input.read_exact(&mut magic).map_err(Damage::Io)?;
        // the header's metadata: a map of byte strings, in blocks ended by a zero count
        loop {
            let Some(count) = long(&mut input)? else { return damaged("it ends inside its header: truncated") };
            if count == 0 {
                break;
            }
            if count < 0 {
                // a negative count is followed by the block's byte size
                let size = long(&mut input)?.unwrap_or(-1);
                skip(&mut input, len, size, "a header block")?;
                continue;
            }
            for _ in 0..count.min(1 << 20) * 2 {
                let entry = long(&mut input)?.unwrap_or(-1);
                skip(&mut input, len, entry, "a header entry")?;
            }
        }
        sync_marker(&mut input, sync, "the header")?;
        let mut records = 0u64;
        let mut block = 0u64;
        while let Some(count) = long(&mut input)? {
            block += 1;
            let Ok(count) = u64::try_from(count) else {
                return damaged(format!("block {block} has a negative record count: damaged"));
            };
            let size = long(&mut input)?.unwrap_or(-1);
            skip(&mut input, len, size, &format!("block {block}"))?;
            sync_marker(&mut input, sync, &format!("block {block}"))?;
            records = records.saturating_add(count);
        }
        Ok(records)
    }
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
    Ok(open_reader(&files[0], spec.batch_size)?.0.schema())
}

pub(super) struct AvroFile {
    path: PathBuf,
    reader: AvroReader,
    /// Records read so far: the position checkpoints record.
    consumed: u64,
    /// Records the file's blocks declare: the reader must give them all.
    declared: u64,
    /// Records the reader has given (`consumed` counts a resumed run's skipped ones too).
    decoded: u64,
    /// Resuming inside a batch: the rest of it, handed out first.
    pending: Option<RecordBatch>,
}

impl AvroFile {
    pub(super) fn open(path: &Path, schema: &SchemaRef, spec: &ReadSpec, offset: u64) -> Result<Self> {
        let (reader, declared) = open_reader(path, spec.batch_size)?;
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
        let mut file = AvroFile { path: path.to_path_buf(), reader, consumed: 0, declared, decoded: 0, pending: None };
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
            None if self.decoded != self.declared => Err(Error::Input {
                file: self.path.clone(),
                line: 0,
                column: None,
                message: format!(
                    "the reader ended after {} of the {} records the file's blocks declare: damaged",
                    self.decoded, self.declared
                ),
            }),
            None => Ok(None),
            Some(Ok(b)) => {
                self.decoded += b.num_rows() as u64;
                Ok(Some(b))
            }
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
        FileSource::open(&pipeline.sources["in"], None, batch_size, None)
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

    /// A zig-zag varint long, as Avro writes it.
    fn zz(n: i64) -> Vec<u8> {
        let mut v = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    #[test]
    fn hostile_block_headers_are_refused_before_a_row_is_read_never_allocated_or_taken_for_the_end() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("good.avro"), 0..10, false);
        let good = std::fs::read(dir.path().join("good.avro")).unwrap();
        let sync = good[good.len() - 16..].to_vec();
        let header_end = good.windows(16).position(|w| w == sync.as_slice()).unwrap() + 16;
        let (header, first_block) = (&good[..header_end], &good[header_end..]);
        // a record in the id-only schema: one long
        let record = zz(7);
        let block = |count: i64, size: i64, body: &[u8]| [zz(count), zz(size), body.to_vec(), sync.clone()].concat();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("huge-size", [header, &block(1, 1 << 40, &record)].concat(), "claims 1099511627776 bytes"),
            ("negative-count", [header, &block(-5, 1, &record)].concat(), "negative record count"),
            ("negative-size", [header, &block(1, -3, &record)].concat(), "negative size"),
            (
                "no-sync",
                [header, &zz(1), &zz(record.len() as i64), &record, &[0u8; 16]].concat(),
                "no sync marker after block 1",
            ),
            ("cut-in-sync", [header, first_block, &block(1, 1, &record)[..10]].concat(), "truncated"),
            ("bad-varint", [header, &[0xffu8; 12][..]].concat(), "longer than 10 bytes"),
            // more records declared than the block holds: the reader's end is checked too
            ("count-lies", [header, &block(3, record.len() as i64, &record)].concat(), "Avro"),
        ];
        for (name, bytes, says) in cases {
            let path = dir.path().join(format!("{name}.avro"));
            std::fs::write(&path, bytes).unwrap();
            let err = match source(dir.path(), &format!("{name}.avro"), 1000) {
                Err(e) => e,
                Ok(mut src) => std::iter::from_fn(|| src.next_batch()).find_map(|b| b.err()).expect(name),
            };
            assert!(matches!(err, Error::Input { .. }), "{name}: the data's fault: {err}");
            assert!(err.to_string().contains(says), "{name}: {err}");
        }
    }
}
