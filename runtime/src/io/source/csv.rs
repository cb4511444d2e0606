//! CSV files: header, declared or inferred types, `null_values`, `on_error`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::files::{
    finish_batch, open_text, record_too_long, text_builders, Blocks, Capped, Decoded, Ordered, ReadSpec, RecordBudget,
    TextInput, BLOCK_BYTES, INFER_BYTES, MAX_COLUMNS,
};
use super::{corrupt_input, Skipped};
use crate::config::{OnError, Source};
use crate::io::text::{infer_type, parse_text, Cell, ColumnBuilder};
use crate::io::{Error, Result};

/// A CSV file in its dialect, past its `skip_rows` lines.
/// Its [`RecordBudget`] is renewed after each record the caller reads.
fn csv_reader(path: &Path, spec: &ReadSpec) -> Result<(csv::Reader<TextInput>, RecordBudget)> {
    let (capped, budget) = Capped::new(open_text(path, spec.encoding)?, spec.max_record);
    let mut input: TextInput = Box::new(capped);
    if spec.skip_rows > 0 {
        let mut lines = BufReader::new(input);
        let mut line = Vec::new();
        for n in 0..spec.skip_rows {
            line.clear();
            let read = lines.read_until(b'\n', &mut line).map_err(|e| match corrupt_input(&e) {
                Some(message) => Error::Input { file: path.to_path_buf(), line: n + 1, column: None, message },
                None => Error::io(path, e),
            })?;
            budget.renew();
            if read == 0 {
                return Err(Error::Input {
                    file: path.to_path_buf(),
                    line: n,
                    column: None,
                    message: format!("the file ends before the {} lines skip_rows skips", spec.skip_rows),
                });
            }
        }
        input = Box::new(lines);
    }
    let reader = csv::ReaderBuilder::new()
        .delimiter(spec.delimiter)
        .quote(spec.quote)
        .escape(spec.escape)
        .has_headers(spec.header)
        .flexible(true)
        .from_reader(input);
    Ok((reader, budget))
}

/// Whether a CSV error is a record longer than `max_record_mb` (never skipped).
fn too_long(e: &csv::Error) -> bool {
    matches!(e.kind(), csv::ErrorKind::Io(io) if record_too_long(io))
}

fn csv_header(path: &Path, reader: &mut csv::Reader<TextInput>, spec: &ReadSpec) -> Result<Vec<String>> {
    let rec = reader.byte_headers().map_err(|e| csv_error(path, e, spec.skip_rows))?.clone();
    if rec.len() > MAX_COLUMNS {
        return Err(Error::Input {
            file: path.to_path_buf(),
            line: spec.skip_rows + 1,
            column: None,
            message: format!("{} columns; weir reads at most {MAX_COLUMNS}", rec.len()),
        });
    }
    let mut names = Vec::new();
    for (i, f) in rec.iter().enumerate() {
        if !spec.header {
            names.push(format!("column_{}", i + 1));
            continue;
        }
        let name = std::str::from_utf8(f).map_err(|_| Error::Input {
            file: path.to_path_buf(),
            line: spec.skip_rows + 1,
            column: Some(format!("#{}", i + 1)),
            message: "the header is not valid UTF-8 (for Latin-1 or Windows-1252 text, set encoding = \"latin1\")"
                .into(),
        })?;
        names.push(name.trim().to_string());
    }
    Ok(names)
}

/// `e` as an input error at its line in the file (`skipped` lines come before what the
/// CSV reader counts).
fn csv_error(path: &Path, e: csv::Error, skipped: u64) -> Error {
    let line = e.position().map(|p| p.line() + skipped).unwrap_or(0);
    match e.into_kind() {
        csv::ErrorKind::Io(io) => match corrupt_input(&io) {
            Some(message) => Error::Input { file: path.to_path_buf(), line, column: None, message },
            None => Error::io(path, io),
        },
        other => Error::Input { file: path.to_path_buf(), line, column: None, message: format!("{other:?}") },
    }
}

/// The columns of a CSV source: its header with the declared types, or types inferred from
/// the first rows of the first file.
pub(super) fn schema(files: &[PathBuf], source: &Source, spec: &ReadSpec) -> Result<SchemaRef> {
    let path = &files[0];
    let (mut reader, budget) = csv_reader(path, spec)?;
    let names = csv_header(path, &mut reader, spec)?;
    budget.renew();
    let declared: HashMap<&str, &DataType> = source.schema.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if !declared.is_empty() {
        let missing: Vec<&str> =
            source.schema.iter().map(|(n, _)| n.as_str()).filter(|n| !names.iter().any(|h| h == n)).collect();
        let undeclared: Vec<&str> = names.iter().map(String::as_str).filter(|n| !declared.contains_key(n)).collect();
        if !missing.is_empty() || !undeclared.is_empty() {
            let mut msg = String::new();
            if !missing.is_empty() {
                msg.push_str(&format!("declared columns missing from the header: {}. ", missing.join(", ")));
            }
            if !undeclared.is_empty() {
                msg.push_str(&format!(
                    "header columns not declared in sources.{}.schema: {}",
                    source.name,
                    undeclared.join(", ")
                ));
            }
            return Err(Error::Input {
                file: path.clone(),
                line: spec.skip_rows + 1,
                column: None,
                message: msg.trim().to_string(),
            });
        }
        let fields: Vec<Field> = names.iter().map(|n| Field::new(n, declared[n.as_str()].clone(), true)).collect();
        return Ok(Arc::new(Schema::new(fields)));
    }
    // infer from the first rows of the first file
    let mut samples: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let mut rec = csv::StringRecord::new();
    let mut sampled = 0;
    for _ in 0..source.infer_rows {
        let read = reader.read_record(&mut rec);
        budget.renew();
        match read {
            Ok(true) => {
                for (i, v) in rec.iter().enumerate().take(names.len()) {
                    // a null marker says nothing about the column's type
                    let v = if source.null_values.iter().any(|n| n == v) { "" } else { v };
                    samples[i].push(v.to_string());
                    sampled += v.len();
                }
                if sampled > INFER_BYTES {
                    break;
                }
            }
            Ok(false) => break,
            Err(_) => continue, // bad rows are reported when read for real
        }
    }
    let fields: Vec<Field> = names
        .iter()
        .zip(&samples)
        .map(|(n, s)| Field::new(n, infer_type(s.iter().map(String::as_str)), true))
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

/// A CSV file's records, read one at a time past its header, each held to `max_record_mb`.
struct Records {
    path: PathBuf,
    reader: csv::Reader<TextInput>,
    /// Renewed after each record: a record may not be longer than `max_record_mb`.
    budget: RecordBudget,
    record: csv::ByteRecord,
    /// Records consumed (good, bad and skipped): the position checkpoints record.
    consumed: u64,
    /// Lines skipped before the reader's first (`skip_rows`): added to its line numbers.
    skipped_lines: u64,
    /// Fields of the header: a record of another width is bad.
    width: usize,
}

/// What reading the next record gave.
enum Next {
    /// A record in `record`, starting at this line.
    Record(u64),
    /// A record the CSV reader could not make out: its line and why (skippable).
    Bad(u64, String),
    /// A record longer than `max_record_mb`, or the input failing: never skipped.
    Fatal(Error),
    End,
}

impl Records {
    /// The next record. A record that was read (good or bad) counts as consumed; one that
    /// failed to read does not (a position after the records before it stays before it).
    fn next(&mut self) -> Next {
        // where the next record starts (the reader's line moves on inside a long one)
        let starts_at = self.reader.position().line() + self.skipped_lines;
        let read = self.reader.read_byte_record(&mut self.record);
        self.budget.renew();
        match read {
            Ok(false) => Next::End,
            Ok(true) => {
                self.consumed += 1;
                Next::Record(self.record.position().map(|p| p.line() + self.skipped_lines).unwrap_or(0))
            }
            Err(e) if too_long(&e) => {
                let message = e.to_string();
                Next::Fatal(Error::Input { file: self.path.clone(), line: starts_at, column: None, message })
            }
            // the input failing (a corrupt or cut compressed file, the disk): what follows
            // is not records either, so it is never skipped
            Err(e) if matches!(e.kind(), csv::ErrorKind::Io(_)) => {
                Next::Fatal(csv_error(&self.path, e, self.skipped_lines))
            }
            Err(e) => {
                self.consumed += 1;
                match csv_error(&self.path, e, self.skipped_lines) {
                    Error::Input { line, message, .. } => Next::Bad(line, message),
                    other => Next::Fatal(other),
                }
            }
        }
    }

    /// Skip `n` records (resuming from a checkpoint).
    fn skip(&mut self, n: u64) {
        while self.consumed < n {
            let read = self.reader.read_byte_record(&mut self.record);
            self.budget.renew();
            match read {
                Ok(false) => break,
                Ok(true) | Err(_) => self.consumed += 1,
            }
        }
    }
}

/// Whole records of a file, their fields' text end to end.
struct RecordBlock {
    text: Vec<u8>,
    /// Where each field ends in `text` (a record's fields follow the previous record's).
    ends: Vec<usize>,
    records: Vec<(u64, BlockRecord)>,
    /// Records consumed after the block: what a position after it holds.
    end: u64,
}

enum BlockRecord {
    /// A record of this many fields.
    Fields(usize),
    /// A record the CSV reader could not make out, and why.
    Bad(String),
}

/// Records into rows: the file's columns and the builders.
struct RowDecoder {
    path: PathBuf,
    /// For each schema column, its index in this file's records.
    positions: Vec<usize>,
    schema: SchemaRef,
    builders: Vec<ColumnBuilder>,
    on_error: OnError,
    width: usize,
    /// Field texts read as null besides the empty field.
    null_values: Arc<Vec<String>>,
}

/// A field's value: parsed, or a string column's text (appended without a copy in between).
enum Value<'a> {
    Cell(Cell),
    Text(&'a str),
}

/// A CSV file decoded in blocks of records on worker threads ([`Ordered`]); a block's
/// position is the number of records consumed after it.
pub(super) fn open_parallel(path: &Path, schema: &SchemaRef, spec: &ReadSpec, offset: u64) -> Result<Ordered> {
    let (mut reader, budget) = csv_reader(path, spec)?;
    let names = csv_header(path, &mut reader, spec)?;
    budget.renew();
    let mut positions = Vec::new();
    for f in schema.fields() {
        let pos = names.iter().position(|n| n == f.name()).ok_or_else(|| Error::Input {
            file: path.to_path_buf(),
            line: spec.skip_rows + 1,
            column: Some(f.name().clone()),
            message: format!(
                "the header lacks column `{}` (the files of one source must share their columns)",
                f.name()
            ),
        })?;
        positions.push(pos);
    }
    let mut records = Records {
        path: path.to_path_buf(),
        reader,
        budget,
        record: csv::ByteRecord::new(),
        consumed: 0,
        skipped_lines: spec.skip_rows,
        width: names.len(),
    };
    records.skip(offset);
    let decoder = || {
        let mut dec = RowDecoder {
            path: path.to_path_buf(),
            positions: positions.clone(),
            schema: schema.clone(),
            builders: text_builders(path, schema, spec.batch_size)?,
            on_error: spec.on_error,
            width: names.len(),
            null_values: spec.null_values.clone(),
        };
        Ok(move |block: &RecordBlock| {
            let decoded = dec.block(block);
            if decoded.is_err() {
                // the columns hold part of the failed block: start the next one clean
                let _ = finish_batch(&dec.path, &dec.schema, &mut dec.builders);
            }
            decoded
        })
    };
    let (batch_size, block_bytes) = (spec.batch_size, spec.batch_bytes.min(BLOCK_BYTES));
    let consumed = records.consumed;
    Ordered::spawn(path, consumed, spec, decoder, move |blocks| read_records(records, batch_size, block_bytes, blocks))
}

/// The reader thread: blocks of records to the workers, in order; a fatal error takes the
/// place of the block it fell in.
fn read_records(mut file: Records, batch_size: usize, block_bytes: usize, mut blocks: Blocks<RecordBlock>) {
    let field_bytes = std::mem::size_of::<usize>();
    loop {
        let mut block = RecordBlock { text: Vec::new(), ends: Vec::new(), records: Vec::new(), end: 0 };
        let (mut failed, mut eof) = (None, false);
        // the fields' places count too: a line of commas is all places and no text
        while block.records.len() < batch_size && block.text.len() + block.ends.len() * field_bytes < block_bytes {
            match file.next() {
                Next::End => {
                    eof = true;
                    break;
                }
                // a record of another width is refused here, its fields never copied
                Next::Record(line) if file.record.len() != file.width => {
                    let message = format!("expected {} fields, found {}", file.width, file.record.len());
                    block.records.push((line, BlockRecord::Bad(message)));
                }
                Next::Record(line) => {
                    for field in file.record.iter() {
                        block.text.extend_from_slice(field);
                        block.ends.push(block.text.len());
                    }
                    block.records.push((line, BlockRecord::Fields(file.record.len())));
                }
                Next::Bad(line, message) => block.records.push((line, BlockRecord::Bad(message))),
                Next::Fatal(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        block.end = file.consumed;
        if !blocks.deliver((!block.records.is_empty()).then_some(block), failed, eof) {
            return;
        }
    }
}

impl RowDecoder {
    fn block(&mut self, block: &RecordBlock) -> Result<Decoded> {
        let mut skipped = Vec::new();
        let (mut rows, mut field) = (0, 0);
        let mut values = Vec::with_capacity(self.positions.len());
        let mut fields: Vec<&[u8]> = Vec::with_capacity(self.width);
        for (line, record) in &block.records {
            let parsed = match record {
                BlockRecord::Bad(message) => {
                    Err(Error::Input { file: self.path.clone(), line: *line, column: None, message: message.clone() })
                }
                BlockRecord::Fields(n) => {
                    fields.clear();
                    for _ in 0..*n {
                        let start = if field == 0 { 0 } else { block.ends[field - 1] };
                        fields.push(block.text.get(start..block.ends[field]).unwrap_or_default());
                        field += 1;
                    }
                    self.parse_row(*line, &fields, &mut values)
                }
            };
            match parsed {
                Ok(()) => {
                    for (b, v) in self.builders.iter_mut().zip(values.drain(..)) {
                        match v {
                            Value::Cell(c) => b.push(c),
                            Value::Text(t) => b.push_str(t),
                        }
                    }
                    rows += 1;
                }
                Err(Error::Input { line, column, message, .. }) if self.on_error == OnError::Skip => {
                    skipped.push(Skipped::row(&self.path, line, column, message))
                }
                Err(e) => return Err(e),
            }
        }
        let batch = if rows > 0 { Some(finish_batch(&self.path, &self.schema, &mut self.builders)?) } else { None };
        Ok(Decoded { batch, skipped, end: block.end })
    }

    fn parse_row<'a>(&self, line: u64, record: &[&'a [u8]], values: &mut Vec<Value<'a>>) -> Result<()> {
        values.clear();
        for (f, &pos) in self.schema.fields().iter().zip(&self.positions) {
            // the reader refused records of another width
            let raw = record.get(pos).copied().unwrap_or_default();
            let text = std::str::from_utf8(raw).map_err(|e| Error::Input {
                file: self.path.clone(),
                line,
                column: Some(f.name().clone()),
                message: format!("invalid UTF-8 at byte {} of the field", e.valid_up_to()),
            })?;
            if self.null_values.iter().any(|n| n == text) {
                values.push(Value::Cell(Cell::Null));
                continue;
            }
            if f.data_type() == &DataType::Utf8 && !text.is_empty() {
                values.push(Value::Text(text));
                continue;
            }
            let cell = parse_text(text, f.data_type()).map_err(|message| Error::Input {
                file: self.path.clone(),
                line,
                column: Some(f.name().clone()),
                message,
            })?;
            values.push(Value::Cell(cell));
        }
        Ok(())
    }
}
