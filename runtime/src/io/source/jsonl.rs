//! JSON lines files: one object per line, declared or inferred types, `on_error`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::files::{
    finish_batch, open_text, text_builders, Blocks, Capped, Decoded, FileBatches, Ordered, ReadSpec, RecordBudget,
    BLOCK_BYTES, INFER_BYTES, MAX_COLUMNS,
};
use super::{corrupt_input, Skipped};
use crate::config::{OnError, Source};
use crate::io::text::{
    infer_type, nested_from_value, nested_message, parse_json, scalar_cell, Cell, ColumnBuilder, NestedBuilder, Scalar,
};
use crate::io::{Error, Result};

/// The columns of a JSON-lines source: declared, or inferred from the first lines.
pub(super) fn schema(files: &[PathBuf], source: &Source, spec: &ReadSpec) -> Result<SchemaRef> {
    if !source.schema.is_empty() {
        let fields: Vec<Field> = source.schema.iter().map(|(n, t)| Field::new(n, t.clone(), true)).collect();
        return Ok(Arc::new(Schema::new(fields)));
    }
    let path = &files[0];
    let (file, budget) = Capped::new(open_text(path, spec.encoding)?, spec.max_record);
    let mut order: Vec<String> = Vec::new();
    let mut known: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut sampled = 0;
    let mut samples: HashMap<String, Vec<String>> = HashMap::new();
    let mut kinds: HashMap<String, DataType> = HashMap::new();
    let mut input = BufReader::new(file);
    let mut line = String::new();
    for n in 1..=source.infer_rows as u64 {
        line.clear();
        let read = match input.read_line(&mut line) {
            Ok(read) => read,
            // a line that is not UTF-8 tells nothing; reading for real reports it
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                budget.renew();
                continue;
            }
            Err(e) => {
                return Err(match corrupt_input(&e) {
                    Some(message) => Error::Input { file: path.clone(), line: n, column: None, message },
                    None => Error::io(path, e),
                })
            }
        };
        budget.renew();
        if read == 0 || sampled > INFER_BYTES {
            break;
        }
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        for (k, v) in map {
            if !known.contains(&k) {
                if known.len() == MAX_COLUMNS {
                    return Err(Error::Input {
                        file: path.clone(),
                        line: n,
                        column: None,
                        message: format!(
                            "more than {MAX_COLUMNS} distinct keys in the lines read to infer the columns; declare `schema`"
                        ),
                    });
                }
                known.insert(k.clone());
                order.push(k.clone());
            }
            match v {
                serde_json::Value::String(s) => {
                    sampled += s.len();
                    samples.entry(k).or_default().push(s)
                }
                serde_json::Value::Number(n) => {
                    let t = if n.is_i64() { DataType::Int64 } else { DataType::Float64 };
                    let e = kinds.entry(k).or_insert(t.clone());
                    if *e != t {
                        *e = DataType::Float64;
                    }
                }
                serde_json::Value::Bool(_) => {
                    kinds.entry(k).or_insert(DataType::Boolean);
                }
                _ => {}
            }
        }
    }
    let fields: Vec<Field> = order
        .iter()
        .map(|k| {
            let t = match (kinds.get(k), samples.get(k)) {
                (Some(t), None) => t.clone(),
                (None, Some(s)) => infer_type(s.iter().map(String::as_str)),
                _ => DataType::Utf8,
            };
            Field::new(k, t, true)
        })
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

pub(super) struct JsonlFile {
    lines: Lines,
    dec: LineDecoder,
    batch_size: usize,
    batch_bytes: usize,
}

/// A file's lines, one at a time, numbered, each held to `max_record_mb`.
struct Lines {
    path: PathBuf,
    input: BufReader<Capped>,
    /// Renewed after each line: a line may not be longer than `max_record_mb`.
    budget: RecordBudget,
    /// The current line's text (reused from line to line).
    text: String,
    line: u64,
}

/// Lines into rows: the schema's shape, the row's cells and the columns being built.
struct LineDecoder {
    path: PathBuf,
    schema: SchemaRef,
    shape: RowShape,
    cells: Vec<SlotResult>,
    builders: Vec<ColumnBuilder>,
    on_error: OnError,
    /// A Debezium source: each line is an event, read as the row it carries.
    envelope: Option<super::debezium::Envelope>,
}

impl LineDecoder {
    fn new(path: &Path, schema: &SchemaRef, spec: &ReadSpec) -> Result<Self> {
        Ok(LineDecoder {
            path: path.to_path_buf(),
            schema: schema.clone(),
            shape: RowShape::new(schema),
            cells: Vec::new(),
            builders: text_builders(path, schema, spec.batch_size)?,
            on_error: spec.on_error,
            envelope: (spec.format == crate::config::Format::Debezium).then(|| super::debezium::Envelope::new(schema)),
        })
    }

    /// Line `line` is not UTF-8: skipped, or the error.
    fn invalid(&self, line: u64, skipped: &mut Vec<Skipped>) -> Result<()> {
        let message = "invalid UTF-8".to_string();
        if self.on_error == OnError::Skip {
            skipped.push(Skipped { file: self.path.clone(), line, message });
            return Ok(());
        }
        Err(Error::Input { file: self.path.clone(), line, column: None, message })
    }

    /// Line `line` (`raw`, its end included or not) into the columns; returns whether it
    /// made a row (a blank line, a Kafka tombstone or a skipped line makes none).
    fn line(&mut self, line: u64, raw: &str, skipped: &mut Vec<Skipped>) -> Result<bool> {
        if raw.trim().is_empty() {
            return Ok(false);
        }
        // the line without its end (as `lines()` gives it), so JSON errors count columns in it
        let text = raw.strip_suffix('\n').unwrap_or(raw);
        let text = text.strip_suffix('\r').unwrap_or(text);
        let row;
        let (text, decoded) = match &self.envelope {
            None => (text, decode_line(text, &mut self.shape, &mut self.cells, &mut self.builders)),
            Some(env) => match env.row(text) {
                Ok(None) => return Ok(false),
                Ok(Some(r)) => {
                    row = r;
                    (row.as_str(), decode_line(&row, &mut self.shape, &mut self.cells, &mut self.builders))
                }
                Err(m) => (text, Err(LineError::Line(m))),
            },
        };
        match decoded {
            Ok(()) => {
                for (b, c) in self.builders.iter_mut().zip(self.cells.drain(..)) {
                    match c {
                        Ok(Slot::Text(from, to)) => b.push_str(&text[from..to]),
                        Ok(Slot::Cell(c)) => b.push(c),
                        Ok(Slot::Pushed) => {}
                        Err(_) => b.push(Cell::Null),
                    }
                }
                Ok(true)
            }
            Err(e) => {
                let (column, message) = match e {
                    LineError::Line(m) => (None, m),
                    LineError::Column(i, m) => (Some(self.schema.field(i).name().clone()), m),
                };
                if self.on_error != OnError::Skip {
                    return Err(Error::Input { file: self.path.clone(), line, column, message });
                }
                skipped.push(Skipped::row(&self.path, line, column, message));
                Ok(false)
            }
        }
    }

    fn finish(&mut self) -> Result<RecordBatch> {
        finish_batch(&self.path, &self.schema, &mut self.builders)
    }
}

impl Lines {
    /// The file from line `offset` on.
    fn open(path: &Path, spec: &ReadSpec, offset: u64) -> Result<Self> {
        let (file, budget) = Capped::new(open_text(path, spec.encoding)?, spec.max_record);
        let mut lines = Lines {
            path: path.to_path_buf(),
            input: BufReader::with_capacity(256 * 1024, file),
            budget,
            text: String::new(),
            line: 0,
        };
        lines.skip(offset)?;
        Ok(lines)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        while self.line < n {
            match self.next_line() {
                None => break,
                Some(Err(e)) if e.kind() != std::io::ErrorKind::InvalidData => return Err(self.read_error(e)),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The next line into `self.text` (None at the end of the file).
    fn next_line(&mut self) -> Option<std::io::Result<()>> {
        self.text.clear();
        match self.input.read_line(&mut self.text) {
            Ok(0) => None,
            Ok(_) => {
                self.line += 1;
                self.budget.renew();
                Some(Ok(()))
            }
            Err(e) => {
                // the line's bytes were consumed: an invalid line still counts
                self.line += 1;
                Some(Err(e))
            }
        }
    }

    fn read_error(&self, e: std::io::Error) -> Error {
        match corrupt_input(&e) {
            Some(message) => Error::Input { file: self.path.clone(), line: self.line, column: None, message },
            None => Error::io(&self.path, e),
        }
    }
}

impl JsonlFile {
    pub(super) fn open(path: &Path, schema: &SchemaRef, spec: &ReadSpec, offset: u64) -> Result<Self> {
        let lines = Lines::open(path, spec, offset)?;
        let dec = LineDecoder::new(path, schema, spec)?;
        Ok(JsonlFile { lines, dec, batch_size: spec.batch_size, batch_bytes: spec.batch_bytes })
    }

    fn read_batch(&mut self, skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        let (mut rows, mut eof, mut bytes) = (0, false, 0);
        let lines = &mut self.lines;
        while rows < self.batch_size && bytes < self.batch_bytes {
            let Some(read) = lines.next_line() else {
                eof = true;
                break;
            };
            match read {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    self.dec.invalid(lines.line, skipped)?;
                    continue;
                }
                Err(e) => return Err(lines.read_error(e)),
            }
            bytes += lines.text.len();
            if self.dec.line(lines.line, &lines.text, skipped)? {
                rows += 1;
            }
        }
        if rows == 0 && eof {
            return Ok(None);
        }
        self.dec.finish().map(Some)
    }
}

// ---------------------------------------------------------------------------------------
// A file's lines decoded on worker threads ([`Ordered`]): blocks of whole lines, each line
// with its number in the file; a block's position is the line it ends at.

/// A block's line: its text in the block, or a line that is not UTF-8.
enum BlockLine {
    Text(usize, usize),
    Invalid,
}

/// Whole lines of a file, numbered.
struct Block {
    text: String,
    lines: Vec<(u64, BlockLine)>,
    /// The line the block ends at: what a position after it holds.
    end: u64,
}

/// A JSON-lines file decoded in blocks of lines on worker threads ([`Ordered`]).
pub(super) fn open_parallel(path: &Path, schema: &SchemaRef, spec: &ReadSpec, offset: u64) -> Result<Ordered> {
    let file = Lines::open(path, spec, offset)?;
    let consumed = file.line;
    let (batch_size, block_bytes) = (spec.batch_size, spec.batch_bytes.min(BLOCK_BYTES));
    let decoder = || {
        let mut dec = LineDecoder::new(path, schema, spec)?;
        Ok(move |block: &Block| {
            let decoded = decode_block(&mut dec, block);
            if decoded.is_err() {
                // the columns hold part of the failed block: start the next one clean
                let _ = dec.finish();
            }
            decoded
        })
    };
    Ordered::spawn(path, consumed, spec, decoder, move |blocks| read_blocks(file, batch_size, block_bytes, blocks))
}

/// The reader thread: blocks of lines to the workers, in order; a read error takes the
/// place of the block it fell in.
fn read_blocks(mut file: Lines, batch_size: usize, block_bytes: usize, mut blocks: Blocks<Block>) {
    loop {
        let mut block = Block { text: String::new(), lines: Vec::new(), end: file.line };
        let mut failed = None;
        let mut eof = false;
        while block.lines.len() < batch_size && block.text.len() < block_bytes {
            match file.next_line() {
                None => {
                    eof = true;
                    break;
                }
                Some(Ok(())) => {
                    let start = block.text.len();
                    block.text.push_str(&file.text);
                    block.lines.push((file.line, BlockLine::Text(start, block.text.len())));
                }
                Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    block.lines.push((file.line, BlockLine::Invalid));
                }
                Some(Err(e)) => {
                    failed = Some(file.read_error(e));
                    break;
                }
            }
        }
        // a line that failed to read was counted: a position after this block is before it
        block.end = if failed.is_some() { file.line.saturating_sub(1) } else { file.line };
        if !blocks.deliver((!block.lines.is_empty()).then_some(block), failed, eof) {
            return;
        }
    }
}

fn decode_block(dec: &mut LineDecoder, block: &Block) -> Result<Decoded> {
    let mut skipped = Vec::new();
    let mut rows = 0;
    for (line, l) in &block.lines {
        match l {
            BlockLine::Invalid => dec.invalid(*line, &mut skipped)?,
            BlockLine::Text(from, to) => {
                let text = block.text.get(*from..*to).unwrap_or_default();
                if dec.line(*line, text, &mut skipped)? {
                    rows += 1;
                }
            }
        }
    }
    let batch = if rows > 0 { Some(dec.finish()?) } else { None };
    Ok(Decoded { batch, skipped, end: block.end })
}

// ---------------------------------------------------------------------------------------
// One line straight into cells: the object is walked once by serde, keys are looked up in
// the schema's index and values converted as they are met, so no `serde_json::Value` (a map
// with an owned key and value per field) is built per line. The result is the one
// `parse_json` gives for the same line (a differential test below checks it).

use serde::de::{DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The schema's columns by name, for the line decoder, and the order the last line's keys
/// came in: lines of a file usually share it, so a key is first compared with the name its
/// position had last time and looked up in the index only when that fails.
pub(super) struct RowShape {
    index: HashMap<String, usize>,
    names: Vec<String>,
    types: Vec<DataType>,
    last_order: Vec<Option<usize>>,
    /// The struct and list columns (built as their values are read).
    nested: Vec<usize>,
}

impl RowShape {
    pub(super) fn new(schema: &Schema) -> Self {
        RowShape {
            index: schema.fields().iter().enumerate().map(|(i, f)| (f.name().clone(), i)).collect(),
            names: schema.fields().iter().map(|f| f.name().clone()).collect(),
            types: schema.fields().iter().map(|f| f.data_type().clone()).collect(),
            last_order: Vec::new(),
            nested: (schema.fields().iter().enumerate())
                .filter_map(|(i, f)| f.data_type().is_nested().then_some(i))
                .collect(),
        }
    }
}

/// A decoded value: a cell, or a string column's text as a byte range of the line (the
/// text needed no unescaping, so it is copied once, into the column, not into a `String`).
#[derive(Debug, PartialEq)]
pub(super) enum Slot {
    Cell(Cell),
    Text(usize, usize),
    /// A struct or list value, already in its column.
    Pushed,
}

/// Why a line is not a row: bad JSON or not an object (no column), or a column's value.
#[derive(Debug, PartialEq)]
pub(super) enum LineError {
    Line(String),
    Column(usize, String),
}

type SlotResult = Result<Slot, String>;

/// Decode one line into `slots` (one per column, in schema order; missing keys are null, a
/// repeated key keeps its last value, as with a parsed map). Struct and list values go
/// straight into their `builders` (their slots say so); a line that fails leaves them as
/// they were. The caller appends the other slots of a line that decoded.
pub(super) fn decode_line(
    text: &str,
    shape: &mut RowShape,
    slots: &mut Vec<SlotResult>,
    builders: &mut [ColumnBuilder],
) -> Result<(), LineError> {
    fn nested(b: &mut ColumnBuilder) -> Option<&mut NestedBuilder> {
        match b {
            ColumnBuilder::Nested(b) => Some(b),
            _ => None,
        }
    }
    // every nested column holds the rows so far when a line starts
    let rows = shape.nested.first().and_then(|&i| builders.get_mut(i)).and_then(nested).map(|b| b.len());
    let decoded = decode_into(text, shape, slots, builders);
    if let (Err(_), Some(rows)) = (&decoded, rows) {
        for &i in &shape.nested {
            if let Some(b) = builders.get_mut(i).and_then(nested) {
                b.truncate(rows);
            }
        }
    }
    decoded
}

fn decode_into(
    text: &str,
    shape: &mut RowShape,
    slots: &mut Vec<SlotResult>,
    builders: &mut [ColumnBuilder],
) -> Result<(), LineError> {
    slots.clear();
    slots.resize_with(shape.types.len(), || Ok(Slot::Cell(Cell::Null)));
    if !text.trim_start().starts_with('{') {
        return Err(LineError::Line(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => "each line must be a JSON object".into(),
            Err(e) => format!("not valid JSON: {e}"),
        }));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(RowVisitor { shape, slots, builders, base: text.as_ptr() as usize })
        .and_then(|()| de.end())
        .map_err(|e| LineError::Line(format!("not valid JSON: {e}")))?;
    match slots.iter().position(Result::is_err) {
        Some(i) => {
            let e = std::mem::replace(&mut slots[i], Ok(Slot::Cell(Cell::Null)));
            Err(LineError::Column(i, e.err().unwrap_or_default()))
        }
        None => Ok(()),
    }
}

struct RowVisitor<'a> {
    shape: &'a mut RowShape,
    slots: &'a mut Vec<SlotResult>,
    builders: &'a mut [ColumnBuilder],
    /// Where the line starts in memory, to turn borrowed text into a range of it.
    base: usize,
}

impl<'de> Visitor<'de> for RowVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let shape = self.shape;
        let mut position = 0;
        loop {
            // the column this position named in the previous line, else the index
            let guess = shape.last_order.get(position).copied().flatten();
            let (index, names) = (&shape.index, &shape.names);
            let find = |key: &str| match guess {
                Some(g) if names[g] == key => Some(g),
                _ => index.get(key).copied(),
            };
            let Some(column) = map.next_key_seed(KeySeed(find))? else { break };
            match shape.last_order.get_mut(position) {
                Some(slot) => *slot = column,
                None => shape.last_order.push(column),
            }
            position += 1;
            let Some(i) = column else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            match self.builders.get_mut(i) {
                // a struct or list goes straight into its column
                Some(ColumnBuilder::Nested(b)) => {
                    if matches!(self.slots[i], Ok(Slot::Pushed)) {
                        // a repeated key: its last value counts
                        b.truncate(b.len().saturating_sub(1));
                    }
                    let fit = map.next_value_seed(NestedInto(b))?;
                    self.slots[i] = fit.map(|()| Slot::Pushed).map_err(nested_message);
                }
                _ => self.slots[i] = map.next_value_seed(CellSeed { dtype: &shape.types[i], base: self.base })?,
            }
        }
        Ok(())
    }
}

/// A key, as the position `find` gives it (None: not a column or field), never copied.
struct KeySeed<F>(F);

impl<'de, F: FnOnce(&str) -> Option<usize>> DeserializeSeed<'de> for KeySeed<F> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, F: FnOnce(&str) -> Option<usize>> Visitor<'de> for KeySeed<F> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> std::result::Result<Option<usize>, E> {
        Ok((self.0)(key))
    }
}

/// A value, converted to its column's type; a value of the wrong kind is the cell's error
/// (not a JSON error: the rest of the line is still read, so bad JSON later wins, as it does
/// when the whole line is parsed first).
struct CellSeed<'a> {
    dtype: &'a DataType,
    base: usize,
}

impl CellSeed<'_> {
    fn scalar(&self, v: Scalar<'_>) -> SlotResult {
        scalar_cell(v, self.dtype).map(Slot::Cell)
    }

    /// An object or array in a scalar column (a string column keeps its JSON text).
    fn mismatch(&self, value: serde_json::Value) -> SlotResult {
        parse_json(&value, self.dtype).map(Slot::Cell)
    }
}

impl<'de> DeserializeSeed<'de> for CellSeed<'_> {
    type Value = SlotResult;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<SlotResult, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CellSeed<'_> {
    type Value = SlotResult;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> std::result::Result<SlotResult, E> {
        Ok(Ok(Slot::Cell(Cell::Null)))
    }

    fn visit_bool<E>(self, b: bool) -> std::result::Result<SlotResult, E> {
        Ok(self.scalar(Scalar::Bool(b)))
    }

    fn visit_i64<E>(self, i: i64) -> std::result::Result<SlotResult, E> {
        Ok(self.scalar(Scalar::Int(i)))
    }

    fn visit_u64<E>(self, u: u64) -> std::result::Result<SlotResult, E> {
        Ok(self.scalar(i64::try_from(u).map_or(Scalar::Big(u), Scalar::Int)))
    }

    fn visit_f64<E>(self, f: f64) -> std::result::Result<SlotResult, E> {
        Ok(self.scalar(Scalar::Float(f)))
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> std::result::Result<SlotResult, E> {
        match self.dtype {
            // the text as it is in the line (no escapes in it)
            DataType::Utf8 => {
                let start = (s.as_ptr() as usize).wrapping_sub(self.base);
                Ok(Ok(Slot::Text(start, start + s.len())))
            }
            _ => self.visit_str(s),
        }
    }

    fn visit_str<E>(self, s: &str) -> std::result::Result<SlotResult, E> {
        Ok(self.scalar(Scalar::Str(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> std::result::Result<SlotResult, A::Error> {
        let value = serde::Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        Ok(self.mismatch(value))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<SlotResult, A::Error> {
        let value = serde::Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(self.mismatch(value))
    }
}

/// A struct or list column's value decoded straight into its builder by the declared type:
/// fields by position, leaves appended as they are met, no tree or `serde_json::Value` in
/// between. `Ok` appends exactly one value; an error (the path to the first part that does
/// not fit, as [`nested_from_value`] names it for the same value) appends none. The rest of
/// the value is still read after an error, so bad JSON later in the line wins, as it does
/// when the line is parsed first.
struct NestedInto<'a>(&'a mut NestedBuilder);

type Fit = Result<(), String>;

impl NestedInto<'_> {
    /// A value of another kind than the type's, judged as a parsed value is (a string leaf
    /// keeps an object's or array's JSON text).
    fn judged(self, value: serde_json::Value) -> Fit {
        nested_from_value(&value, &self.0.data_type()).map(|tree| self.0.push_tree(&tree))
    }

    /// A scalar: a leaf of a scalar type, or a value of the wrong kind for a struct or list.
    fn scalar(self, v: Scalar<'_>) -> Fit {
        match self.0 {
            NestedBuilder::Leaf(leaf) => match (v, leaf.dtype()) {
                (Scalar::Str(s), DataType::Utf8) => {
                    leaf.push_str(s);
                    Ok(())
                }
                (v, t) => scalar_cell(v, t).map(|c| leaf.push(&c)).map_err(|e| format!(": {e}")),
            },
            _ => self.judged(v.value()),
        }
    }
}

impl<'de> DeserializeSeed<'de> for NestedInto<'_> {
    type Value = Fit;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Fit, D::Error> {
        d.deserialize_any(self)
    }
}

/// Which of a struct's fields a value has given so far.
struct Seen {
    bits: u64,
    more: Vec<bool>,
}

impl Seen {
    fn new(fields: usize) -> Self {
        Seen { bits: 0, more: if fields > 64 { vec![false; fields] } else { Vec::new() } }
    }

    /// Mark field `i` seen (or not); returns whether it was.
    fn set(&mut self, i: usize, seen: bool) -> bool {
        if let Some(s) = self.more.get_mut(i) {
            return std::mem::replace(s, seen);
        }
        let was = self.bits & (1 << i) != 0;
        if seen {
            self.bits |= 1 << i;
        } else {
            self.bits &= !(1 << i);
        }
        was
    }
}

impl<'de> Visitor<'de> for NestedInto<'_> {
    type Value = Fit;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> std::result::Result<Fit, E> {
        self.0.push_null();
        Ok(Ok(()))
    }

    fn visit_bool<E>(self, b: bool) -> std::result::Result<Fit, E> {
        Ok(self.scalar(Scalar::Bool(b)))
    }

    fn visit_i64<E>(self, i: i64) -> std::result::Result<Fit, E> {
        Ok(self.scalar(Scalar::Int(i)))
    }

    fn visit_u64<E>(self, u: u64) -> std::result::Result<Fit, E> {
        Ok(self.scalar(i64::try_from(u).map_or(Scalar::Big(u), Scalar::Int)))
    }

    fn visit_f64<E>(self, f: f64) -> std::result::Result<Fit, E> {
        Ok(self.scalar(Scalar::Float(f)))
    }

    fn visit_str<E>(self, s: &str) -> std::result::Result<Fit, E> {
        Ok(self.scalar(Scalar::Str(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Fit, A::Error> {
        let NestedBuilder::List { ends, valid, item, .. } = self.0 else {
            let value = serde::Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
            return Ok(self.judged(value));
        };
        let (mark, mut first_error, mut at) = (item.len(), None, 0usize);
        while let Some(fit) = seq.next_element_seed(NestedInto(item.as_mut()))? {
            if let (Err(e), None) = (fit, &first_error) {
                first_error = Some(format!("[{at}]{e}"));
            }
            at += 1;
        }
        Ok(match first_error {
            Some(e) => {
                item.truncate(mark);
                Err(e)
            }
            None => {
                ends.push(item.len());
                valid.push(true);
                Ok(())
            }
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Fit, A::Error> {
        let NestedBuilder::Struct { fields, valid, children } = self.0 else {
            let value = serde::Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
            return Ok(self.judged(value));
        };
        let mark = valid.len();
        let mut seen = Seen::new(fields.len());
        // each field's error, by position (made on the first one: values that fit need none)
        let mut errors: Vec<Option<String>> = Vec::new();
        while let Some(field) = map.next_key_seed(KeySeed(|key: &str| fields.iter().position(|f| f.name() == key)))? {
            let Some(i) = field else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            // a repeated key: its last value counts, as in a parsed map
            if seen.set(i, false) {
                children[i].truncate(mark);
            }
            match map.next_value_seed(NestedInto(&mut children[i]))? {
                Ok(()) => {
                    seen.set(i, true);
                    if let Some(e) = errors.get_mut(i) {
                        *e = None;
                    }
                }
                Err(e) => {
                    errors.resize(fields.len(), None);
                    errors[i] = Some(e);
                }
            }
        }
        // the first field, in the type's order, that does not fit is the one named
        if let Some((f, e)) = fields.iter().zip(&errors).find_map(|(f, e)| Some(f).zip(e.as_ref())) {
            let e = format!(".{}{e}", f.name());
            children.iter_mut().for_each(|c| c.truncate(mark));
            return Ok(Err(e));
        }
        for (i, c) in children.iter_mut().enumerate() {
            if !seen.set(i, true) {
                c.push_null();
            }
        }
        valid.push(true);
        Ok(Ok(()))
    }
}

// ---------------------------------------------------------------------------------------

impl FileBatches for JsonlFile {
    fn next_batch(&mut self, skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        self.read_batch(skipped)
    }

    fn consumed(&self) -> u64 {
        self.lines.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::TimeUnit;

    /// What a line reads as when it is parsed whole into a `serde_json::Value` first.
    fn reference(text: &str, schema: &Schema) -> std::result::Result<Vec<Cell>, LineError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| LineError::Line(format!("not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(LineError::Line("each line must be a JSON object".into()));
        };
        let mut cells = Vec::new();
        for (i, f) in schema.fields().iter().enumerate() {
            let v = map.get(f.name()).unwrap_or(&serde_json::Value::Null);
            cells.push(parse_json(v, f.data_type()).map_err(|m| LineError::Column(i, m))?);
        }
        Ok(cells)
    }

    /// A line decoded into `builders` (the appending a reader does after a line decoded).
    fn decoded(text: &str, shape: &mut RowShape, builders: &mut [ColumnBuilder]) -> std::result::Result<(), LineError> {
        let mut slots = Vec::new();
        decode_line(text, shape, &mut slots, builders)?;
        for (b, slot) in builders.iter_mut().zip(slots) {
            match slot.unwrap() {
                Slot::Text(from, to) => b.push_str(&text[from..to]),
                Slot::Cell(c) => b.push(c),
                Slot::Pushed => {}
            }
        }
        Ok(())
    }

    fn batch(builders: &mut [ColumnBuilder]) -> Vec<arrow_data::ArrayData> {
        builders.iter_mut().map(|b| b.finish().unwrap().to_data()).collect()
    }

    #[test]
    fn lines_decode_as_a_parsed_value_does() {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("n", DataType::Int32, true),
            Field::new("x", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("b", DataType::Boolean, true),
            Field::new("d", DataType::Date32, true),
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("l", crate::config::column_type("list<int64>").unwrap(), true),
            Field::new(
                "st",
                crate::config::column_type("struct<a: int64, b: list<string>, c: struct<d: date>>").unwrap(),
                true,
            ),
        ]);
        let mut shape = RowShape::new(&schema);
        let keys = ["id", "n", "x", "s", "b", "d", "t", "l", "st", "other", "\\u0069d", "s\\n", ""];
        let values = [
            "1",
            "-7",
            "0",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775809",
            "2147483648",
            "1.5",
            "-0.0",
            "1e300",
            "1E-5",
            "12345678901234567890123",
            "true",
            "false",
            "null",
            "\"\"",
            "\"42\"",
            "\" 42 \"",
            "\"2.5\"",
            "\"yes\"",
            "\"2024-02-29\"",
            "\"2024-02-30\"",
            "\"2024-01-01T10:00:00\"",
            "\"2024-01-01 10:00:00.123456\"",
            "\"caf\\u00e9 \\\"q\\\"\"",
            "\"\\ud83d\\ude00\"",
            "[]",
            "[1,[2,{\"a\":null}]]",
            "{}",
            "{\"id\":1}",
            "\"\\u0000\"",
            "[1,2,null,\"3\"]",
            "[1,\"x\"]",
            "[1.5]",
            "[[1]]",
            "{\"a\":1,\"b\":[\"p\",null],\"c\":{\"d\":\"2024-01-01\"}}",
            "{\"a\":\"7\",\"zz\":[1],\"c\":null}",
            "{\"a\":[1]}",
            "{\"b\":[\"p\",{\"q\":1}]}",
            "{\"c\":{\"d\":\"2024-13-01\"}}",
            "{\"b\":\"notalist\"}",
            // repeated fields: the last value counts, fitting or not
            "{\"a\":1,\"a\":\"x\"}",
            "{\"a\":\"x\",\"a\":2,\"b\":[\"p\"],\"b\":null}",
            "{\"a\":\"x\",\"c\":{\"d\":\"bad\"},\"a\":3}",
            "{\"c\":{\"d\":\"2024-01-01\",\"d\":\"bad\"},\"c\":{\"d\":null}}",
            "{\"b\":[\"p\",\"q\"],\"b\":[\"r\",7,[]],\"a\":5}",
        ];
        let mut lines: Vec<String> = vec![
            "{}".into(),
            " { } ".into(),
            "[]".into(),
            "5".into(),
            "\"text\"".into(),
            "null".into(),
            "{\"id\":1} x".into(),
            "{\"id\":1,}".into(),
            "{\"id\":\"x\", \"s\": }".into(),
            "{\"id\":1,\"id\":\"no\"}".into(),
            "{\"id\":\"no\",\"id\":2}".into(),
            "{\"id\":1".into(),
            "{\"s\":\"bad escape \\q\"}".into(),
            "{\"s\":\"\\ud800\"}".into(),
            "{id:1}".into(),
            "{\"id\":01}".into(),
            "{\"x\":NaN}".into(),
            "{\"s\":".to_string() + &"[".repeat(200) + &"]".repeat(200) + "}",
        ];
        let mut next = crate::io::xorshift(0x5851_F42D_4C95_7F2D);
        for _ in 0..3000 {
            let fields = (next() % 6) as usize;
            let mut line = String::from("{");
            for f in 0..fields {
                if f > 0 {
                    line.push(',');
                }
                let key = keys[(next() % keys.len() as u64) as usize];
                let value = values[(next() % values.len() as u64) as usize];
                line.push_str(&format!("\"{key}\": {value}"));
            }
            line.push('}');
            // every tenth line is cut short or has a byte changed: invalid JSON, found after any type error
            if next().is_multiple_of(10) && line.len() > 2 {
                let at = 1 + (next() % (line.len() as u64 - 1)) as usize;
                if line.is_char_boundary(at) {
                    line.truncate(at);
                }
            }
            lines.push(line);
        }
        // the lines decoded straight into columns, and the lines that decode parsed first and
        // appended cell by cell (struct and list values as trees): the same rows, in batches
        // of every size (a failed line must leave no part of its nested values behind)
        let builders = || text_builders(Path::new("t"), &Arc::new(schema.clone()), 64).unwrap();
        let (mut got_columns, mut want_columns) = (builders(), builders());
        let (mut rows, mut batches) = (0, 0);
        for (n, line) in lines.iter().enumerate() {
            match (decoded(line, &mut shape, &mut got_columns), reference(line, &schema)) {
                // bad JSON under a key that is not a column is skipped, not parsed: serde words
                // some errors differently there, at the same place
                (Err(LineError::Line(a)), Err(LineError::Line(b))) => {
                    let at = |m: &str| m.rfind(" at line ").map(|i| m[i..].to_string());
                    assert_eq!(at(&a), at(&b), "{line}: {a} / {b}");
                }
                (Ok(()), Ok(cells)) => {
                    want_columns.iter_mut().zip(cells).for_each(|(b, c)| b.push(c));
                    rows += 1;
                }
                (got, want) => assert_eq!(got, want.map(|_| ()), "{line}"),
            }
            if n % 97 == 0 || n == lines.len() - 1 {
                assert_eq!(batch(&mut got_columns), batch(&mut want_columns), "batch ending at line {n}");
                batches += 1;
            }
        }
        assert!(rows > 500 && batches > 30, "{rows} rows in {batches} batches");
        // one difference, on purpose: a key that is not a column is skipped without a depth
        // limit (serde skips it with a counter, not recursion), so deep nesting there is fine
        let deep = "{\"id\":1,\"other\":".to_string() + &"[".repeat(100_000) + &"]".repeat(100_000) + "}";
        assert!(reference(&deep, &schema).is_err());
        decoded(&deep, &mut shape, &mut got_columns).unwrap();
        let ids = got_columns[0].finish().unwrap();
        assert_eq!(ids.as_any().downcast_ref::<arrow_array::Int64Array>().unwrap().values(), &[1]);
        // the random lines reached every outcome
        let outcomes = lines.iter().map(|l| match reference(l, &schema) {
            Ok(_) => 0,
            Err(LineError::Line(_)) => 1,
            Err(LineError::Column(..)) => 2,
        });
        let mut seen = [0; 3];
        outcomes.for_each(|o| seen[o] += 1);
        assert!(seen.iter().all(|&n| n > 100), "{seen:?}");
    }
}
