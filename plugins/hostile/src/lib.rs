//! `hostile`: a plugin that misbehaves on purpose, for weir's sandbox tests.
//!
//! `mode` picks the attack; every mode passes batches through unchanged when its attack
//! fails to do harm, except where noted. Never use it in a real pipeline.
//!
//! | mode          | what it does in `process`                                     |
//! |---------------|----------------------------------------------------------------|
//! | `loop`        | spins forever (the host's deadline must stop it)               |
//! | `memory`      | allocates until the memory cap stops it                        |
//! | `panic`       | panics (a trap)                                                |
//! | `read_file`   | reads `path` (default `/etc/passwd`); errs saying what happened |
//! | `write_file`  | writes to `path`; returns an error saying what happened        |
//! | `socket`      | connects to 127.0.0.1:22; returns an error saying what happened|
//! | `env`         | reads the HOME variable; returns an error if it can            |
//! | `garbage`     | returns bytes that are not Arrow IPC                           |
//! | `schema_lie`  | declares the input schema, returns a batch with an extra column|
//! | `shout`       | writes 4 MiB to stdout                                         |
//! | `slow`        | sleeps `sleep_ms` per batch (a well-behaved slow plugin)        |
//! | `rewrite_rows`| declares it rewrites the first column, returns one row too few |
//! | `rewrite_unknown` | declares it rewrites a column the input does not have (init) |
//! | `filter_rows` | declares a row filter on the first column, returns one mask value too few |
//! | `filter_type` | declares a row filter on the first column, returns the column, not a mask |
//! | `filter_schema` | declares a row filter but an output schema with a column dropped (init) |
//! | `log_flood`   | logs 200,000 lines of 1 KiB per batch through the `log` import  |
//! | `counter_flood` | adds 100,000 distinct counter names per batch                 |
//! | `amplify`     | declares one Null column; returns 4,294,967,295 rows per batch   |
//! | `dup_columns` | declares an output schema with column `x` twice (init)          |
//! | `case_columns`| declares columns `x` and `X` (init)                             |
//! | `weir_column` | declares a column `_weir_run_id` (init)                         |
//! | `union_column`| declares a column of a Union type, which Parquet cannot hold (init) |
//! | `state_abuse` | misuses the host's keyed state (bad names, too many states, wrong batches, a set merged into a table's call, a scan before the end, snapshot parts outside a snapshot); passes the batch on only if the host refused every misuse |
//! | `endless_finish` | in `finish`, asks to be called again forever, one row a call |
//! | `snapshot_flood` | in `snapshot`, sends 1 MiB parts until the host refuses one, then returns as if all went well |

use std::io::Write;
use std::sync::Arc;

use weir_sdk::arrow_array::{ArrayRef, BooleanArray, Int64Array, RecordBatch};
use weir_sdk::arrow_schema::{DataType, Field, Schema};
use weir_sdk::rewrite::Rewrite;
use weir_sdk::row_filter::RowFilter;
use weir_sdk::serde::Deserialize;
use weir_sdk::{ipc, runner::parse_config, Context, Error, RawTransform, Result};

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
struct Config {
    mode: String,
    #[serde(default)]
    sleep_ms: u64,
    /// `read_file`, `write_file`: the file tried.
    path: Option<String>,
}

pub struct Hostile {
    mode: String,
    sleep_ms: u64,
    path: String,
    schema: Vec<u8>,
}

impl RawTransform for Hostile {
    fn init(config: &str, input_schema: &[u8], _ctx: Context) -> Result<(Self, Vec<u8>)> {
        let c: Config = parse_config(config)?;
        let declared = match c.mode.as_str() {
            "rewrite_rows" | "rewrite_unknown" => {
                let input = ipc::decode_schema(input_schema)?;
                let name = match c.mode.as_str() {
                    "rewrite_rows" => input.fields().first().map(|f| f.name().clone()).unwrap_or_default(),
                    _ => "nope".to_string(),
                };
                ipc::encode_schema(&Rewrite::declare(&input, &[name]))?
            }
            "filter_rows" | "filter_type" | "filter_schema" => {
                let input = ipc::decode_schema(input_schema)?;
                let first = input.fields().first().map(|f| f.name().clone()).unwrap_or_default();
                let output = match c.mode.as_str() {
                    "filter_schema" => Schema::new(input.fields().iter().skip(1).cloned().collect::<Vec<_>>()),
                    _ => input.as_ref().clone(),
                };
                ipc::encode_schema(&RowFilter::declare(&output, &[first]))?
            }
            "amplify" => ipc::encode_schema(&Schema::new(vec![Field::new("x", DataType::Null, true)]))?,
            "dup_columns" | "case_columns" | "weir_column" => {
                let (a, b) = match c.mode.as_str() {
                    "dup_columns" => ("x", "x"),
                    "case_columns" => ("x", "X"),
                    _ => ("x", "_weir_run_id"),
                };
                ipc::encode_schema(&Schema::new(vec![
                    Field::new(a, DataType::Int64, true),
                    Field::new(b, DataType::Int64, true),
                ]))?
            }
            "union_column" => {
                let fields = weir_sdk::arrow_schema::UnionFields::try_new(
                    vec![0, 1],
                    vec![Field::new("i", DataType::Int64, true), Field::new("s", DataType::Utf8, true)],
                )?;
                ipc::encode_schema(&Schema::new(vec![Field::new(
                    "u",
                    DataType::Union(fields, weir_sdk::arrow_schema::UnionMode::Dense),
                    false,
                )]))?
            }
            _ => input_schema.to_vec(),
        };
        let path = c.path.unwrap_or_else(|| "/etc/passwd".into());
        Ok((Hostile { mode: c.mode, sleep_ms: c.sleep_ms, path, schema: input_schema.to_vec() }, declared))
    }

    fn process(&mut self, batch: &[u8]) -> Result<Vec<u8>> {
        match self.mode.as_str() {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![7u8; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "panic" => panic!("hostile plugin panics on purpose"),
            "read_file" => match std::fs::read_to_string(&self.path) {
                Ok(s) if self.path == "/etc/passwd" => {
                    Err(Error::internal(format!("SANDBOX ESCAPE: read {} bytes of /etc/passwd", s.len())))
                }
                Ok(s) => Err(Error::internal(format!("read {} bytes of {}: {:?}", s.len(), self.path, s.trim()))),
                Err(e) => Err(Error::internal(format!("could not read {}: {e}", self.path))),
            },
            "write_file" => match std::fs::write(&self.path, b"written by a plugin") {
                Ok(()) => Err(Error::internal(format!("SANDBOX ESCAPE: wrote {}", self.path))),
                Err(e) => Err(Error::internal(format!("could not write {}: {e}", self.path))),
            },
            "socket" => match std::net::TcpStream::connect("127.0.0.1:22") {
                Ok(_) => Err(Error::internal("SANDBOX ESCAPE: connected to 127.0.0.1:22")),
                Err(e) => Err(Error::internal(format!("could not connect to 127.0.0.1:22: {e}"))),
            },
            "env" => match std::env::var("HOME") {
                Ok(v) => Err(Error::internal(format!("SANDBOX ESCAPE: HOME={v}"))),
                Err(_) => Ok(batch.to_vec()),
            },
            "garbage" => Ok(b"this is not an arrow ipc stream \x00\x01\x02\xff".repeat(10)),
            "schema_lie" => {
                let (schema, batches) = ipc::decode(batch)?;
                let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
                fields.push(Field::new("surprise", DataType::Int64, false));
                let schema = Arc::new(Schema::new(fields));
                let mut out = Vec::new();
                for b in batches {
                    let mut cols = b.columns().to_vec();
                    cols.push(Arc::new(Int64Array::from(vec![42; b.num_rows()])) as ArrayRef);
                    out.push(RecordBatch::try_new(schema.clone(), cols)?);
                }
                Ok(ipc::encode(&schema, &out)?)
            }
            "shout" => {
                let line = [b'!'; 1024];
                let mut out = std::io::stdout();
                for _ in 0..4096 {
                    if out.write_all(&line).is_err() {
                        break;
                    }
                }
                Ok(batch.to_vec())
            }
            "rewrite_rows" => {
                let (schema, batches) = ipc::decode(batch)?;
                let short: Vec<RecordBatch> =
                    batches.iter().map(|b| b.slice(0, b.num_rows().saturating_sub(1))).collect();
                Ok(ipc::encode(&schema, &short)?)
            }
            "filter_rows" => {
                let (_, batches) = ipc::decode(batch)?;
                let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                let mask = BooleanArray::from(vec![true; rows.saturating_sub(1)]);
                let schema = RowFilter::mask_schema();
                Ok(ipc::encode(&schema, &[RecordBatch::try_new(schema.clone(), vec![Arc::new(mask) as ArrayRef])?])?)
            }
            // the filter's column itself, as if it were a mask
            "filter_type" => Ok(batch.to_vec()),
            "log_flood" => {
                let line = "x".repeat(1024);
                for _ in 0..200_000 {
                    weir_sdk::host::log(weir_sdk::host::Level::Info, &line);
                }
                Ok(batch.to_vec())
            }
            "counter_flood" => {
                for i in 0..100_000 {
                    weir_sdk::host::counter_add(&format!("c{i}"), 1);
                }
                Ok(batch.to_vec())
            }
            "amplify" => {
                let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Null, true)]));
                let column = Arc::new(weir_sdk::arrow_array::NullArray::new(u32::MAX as usize)) as ArrayRef;
                Ok(ipc::encode(&schema, &[RecordBatch::try_new(schema.clone(), vec![column])?])?)
            }
            "state_abuse" => state_abuse(batch),
            "endless_finish" | "snapshot_flood" => Ok(batch.to_vec()),
            "slow" => {
                std::thread::sleep(std::time::Duration::from_millis(self.sleep_ms));
                Ok(batch.to_vec())
            }
            other => Err(Error::config(format!("mode: unknown mode `{other}`"))),
        }
    }

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>> {
        if self.mode == "snapshot_flood" {
            let part = vec![7u8; 1 << 20];
            while weir_sdk::keyed::raw_snapshot_write(&part).is_ok() {}
            return Ok(Some(Vec::new()));
        }
        Ok(None)
    }

    fn finish(&mut self) -> Result<Vec<u8>> {
        let schema = ipc::decode_schema(&self.schema)?;
        if self.mode == "endless_finish" {
            weir_sdk::keyed::more_output();
            let one: Vec<ArrayRef> =
                schema.fields().iter().map(|f| weir_sdk::arrow_array::new_null_array(f.data_type(), 1)).collect();
            return Ok(ipc::encode(&schema, &[RecordBatch::try_new(schema.clone(), one)?])?);
        }
        Ok(ipc::encode(&schema, &[])?)
    }
}

/// Every misuse of the keyed state must come back as an error; the batch passes on only
/// if each did (a misuse the host accepts is reported as an error naming it).
fn state_abuse(batch: &[u8]) -> Result<Vec<u8>> {
    use weir_sdk::keyed::{Combine, KeyedState};
    let (schema, batches) = ipc::decode(batch)?;
    let first = schema.field(0).name().clone();
    let mut accepted = Vec::new();
    for name in ["", "../../etc", "a/b", &"x".repeat(65)] {
        if KeyedState::set(name, &[&first], &schema).is_ok() {
            accepted.push(format!("state name {name:?}"));
        }
    }
    if KeyedState::set("s", &["no_such_column"], &schema).is_ok() {
        accepted.push("a key column that does not exist".into());
    }
    if KeyedState::table("t", &[&first], &[(&first, Combine::Min)], Some(&first), &schema).is_ok() {
        accepted.push("an order column without a `last` value".into());
    }
    // a second open of one name, and more states than allowed
    let set = KeyedState::set("s", &[&first], &schema)?;
    if KeyedState::set("s", &[&first], &schema).is_ok() {
        accepted.push("the same name twice".into());
    }
    let opened = (0..20).filter(|i| KeyedState::set(&format!("n{i}"), &[&first], &schema).is_ok()).count();
    if opened >= 16 {
        accepted.push(format!("{} states", opened + 1));
    }
    // a batch of another schema, and a set scanned
    let other = RecordBatch::try_from_iter([("zz", Arc::new(Int64Array::from(vec![1])) as ArrayRef)])?;
    let wrong = ipc::encode(&other.schema(), std::slice::from_ref(&other))?;
    if weir_sdk::keyed::raw_insert_new(&set, &wrong).is_ok() {
        accepted.push("a batch of another schema".into());
    }
    if set.scan(10).is_ok() {
        accepted.push("a scan of a set".into());
    }
    if let Some(b) = batches.first() {
        set.insert_new(b)?;
    }
    // snapshot parts outside a snapshot, and a snapshot to read outside a restore
    if weir_sdk::keyed::raw_snapshot_write(b"x").is_ok() {
        accepted.push("a snapshot part during process".into());
    }
    if !weir_sdk::keyed::raw_snapshot_read(1 << 20).is_empty() {
        accepted.push("a snapshot read during process".into());
    }
    if accepted.is_empty() {
        Ok(batch.to_vec())
    } else {
        Err(Error::internal(format!("the host accepted: {}", accepted.join("; "))))
    }
}

weir_sdk::export_raw_transform!(Hostile);
