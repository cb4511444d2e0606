//! JSON lines files: one object per line, declared or inferred types, `on_error`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::files::{finish_batch, open_text, text_builders, FileBatches, ReadSpec, TextInput};
use super::{corrupt_input, Skipped};
use crate::config::{OnError, Source};
use crate::io::text::{infer_type, parse_json, Cell, ColumnBuilder};
use crate::io::{Error, Result};

/// The columns of a JSON-lines source: declared, or inferred from the first lines.
pub(super) fn schema(files: &[PathBuf], source: &Source, spec: &ReadSpec) -> Result<SchemaRef> {
    if !source.schema.is_empty() {
        let fields: Vec<Field> = source.schema.iter().map(|(n, t)| Field::new(n, t.clone(), true)).collect();
        return Ok(Arc::new(Schema::new(fields)));
    }
    let path = &files[0];
    let file = open_text(path, spec.encoding)?;
    let mut order: Vec<String> = Vec::new();
    let mut samples: HashMap<String, Vec<String>> = HashMap::new();
    let mut kinds: HashMap<String, DataType> = HashMap::new();
    for line in BufReader::new(file).lines().take(source.infer_rows) {
        let line = line.map_err(|e| match corrupt_input(&e) {
            Some(message) => Error::Input { file: path.clone(), line: 0, column: None, message },
            None => Error::io(path, e),
        })?;
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        for (k, v) in map {
            if !order.contains(&k) {
                order.push(k.clone());
            }
            match v {
                serde_json::Value::String(s) => samples.entry(k).or_default().push(s),
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
    path: PathBuf,
    lines: std::io::Lines<BufReader<TextInput>>,
    line: u64,
    schema: SchemaRef,
    builders: Vec<ColumnBuilder>,
    batch_size: usize,
    on_error: OnError,
}

impl JsonlFile {
    pub(super) fn open(path: &Path, schema: &SchemaRef, spec: &ReadSpec, offset: u64) -> Result<Self> {
        let file = open_text(path, spec.encoding)?;
        let builders = text_builders(path, schema, spec.batch_size)?;
        let mut file = JsonlFile {
            path: path.to_path_buf(),
            lines: BufReader::new(file).lines(),
            line: 0,
            schema: schema.clone(),
            builders,
            batch_size: spec.batch_size,
            on_error: spec.on_error,
        };
        file.skip(offset)?;
        Ok(file)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        while self.line < n {
            if self.lines.next().is_none() {
                break;
            }
            self.line += 1;
        }
        Ok(())
    }

    fn parse_line(&self, text: &str) -> Result<Vec<Cell>> {
        let err = |column: Option<String>, message: String| Error::Input {
            file: self.path.clone(),
            line: self.line,
            column,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(None, format!("not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(err(None, "each line must be a JSON object".into()));
        };
        let mut cells = Vec::with_capacity(self.schema.fields().len());
        for f in self.schema.fields() {
            let v = map.get(f.name()).unwrap_or(&serde_json::Value::Null);
            cells.push(parse_json(v, f.data_type()).map_err(|m| err(Some(f.name().clone()), m))?);
        }
        Ok(cells)
    }

    fn read_batch(&mut self, skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        let mut rows = 0;
        let mut eof = false;
        while rows < self.batch_size {
            let Some(line) = self.lines.next() else {
                eof = true;
                break;
            };
            self.line += 1;
            let line = match line {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    let err = Error::Input {
                        file: self.path.clone(),
                        line: self.line,
                        column: None,
                        message: "invalid UTF-8".into(),
                    };
                    if self.on_error == OnError::Skip {
                        skipped.push(Skipped {
                            file: self.path.clone(),
                            line: self.line,
                            message: "invalid UTF-8".into(),
                        });
                        continue;
                    }
                    return Err(err);
                }
                Err(e) => {
                    return Err(match corrupt_input(&e) {
                        Some(message) => {
                            Error::Input { file: self.path.clone(), line: self.line, column: None, message }
                        }
                        None => Error::io(&self.path, e),
                    })
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            match self.parse_line(&line) {
                Ok(cells) => {
                    for (b, c) in self.builders.iter_mut().zip(cells) {
                        b.push(c);
                    }
                    rows += 1;
                }
                Err(Error::Input { message, column, .. }) if self.on_error == OnError::Skip => skipped.push(Skipped {
                    file: self.path.clone(),
                    line: self.line,
                    message: match column {
                        Some(c) => format!("column `{c}`: {message}"),
                        None => message,
                    },
                }),
                Err(e) => return Err(e),
            }
        }
        if rows == 0 && eof {
            return Ok(None);
        }
        finish_batch(&self.schema, &mut self.builders).map(Some)
    }
}

// ---------------------------------------------------------------------------------------

impl FileBatches for JsonlFile {
    fn next_batch(&mut self, skipped: &mut Vec<Skipped>) -> Result<Option<RecordBatch>> {
        self.read_batch(skipped)
    }

    fn consumed(&self) -> u64 {
        self.line
    }
}
