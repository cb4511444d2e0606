//! The ingest workloads: the events table as it lands in a raw zone, read into Parquet with
//! nothing else done. I1 is CSV, I2 JSON lines, I3 gzip-compressed CSV, I4 nested JSON lines
//! (the user's fields in a `user` object, and a `tags` array), I5 gzip-compressed JSON lines.
//! The inputs are
//! written once per scale from the events Parquet file with arrow-rs's own CSV and JSON
//! writers; the native runner reads them back with arrow-rs's own readers.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::RecordBatch;

/// The ingest workloads, after the transform workloads.
pub const WORKLOADS: [&str; 5] = ["I1", "I2", "I3", "I4", "I5"];

pub fn is_ingest(workload: &str) -> bool {
    WORKLOADS.contains(&workload)
}

/// The input file of an ingest workload, next to the events Parquet file it is made from.
pub fn input_path(workload: &str, parquet: &Path) -> PathBuf {
    let ext = match workload {
        "I1" => "csv",
        "I2" => "jsonl",
        "I4" => "nested.jsonl",
        "I5" => "jsonl.gz",
        _ => "csv.gz",
    };
    parquet.with_extension(ext)
}

/// Write the ingest input of `workload` from the events Parquet file unless it exists.
pub fn prepare(workload: &str, parquet: &Path) -> Result<PathBuf> {
    let path = input_path(workload, parquet);
    if path.exists() {
        return Ok(path);
    }
    eprintln!("weir-bench: writing {} from {}", path.display(), parquet.display());
    let tmp = path.with_extension("tmp");
    let file = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    match workload {
        "I1" => write_csv(parquet, file)?,
        "I2" => {
            let mut w = arrow_json::LineDelimitedWriter::new(file);
            for b in super::read_batches(parquet)? {
                w.write(&b?)?;
            }
            w.finish()?;
            w.into_inner().flush()?;
        }
        "I5" => {
            let mut w = arrow_json::LineDelimitedWriter::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::default(),
            ));
            for b in super::read_batches(parquet)? {
                w.write(&b?)?;
            }
            w.finish()?;
            w.into_inner().finish()?.flush()?;
        }
        "I3" => {
            let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
            write_csv(parquet, gz)?;
        }
        "I4" => {
            let mut w = arrow_json::LineDelimitedWriter::new(file);
            for b in super::read_batches(parquet)? {
                w.write(&nest(&b?)?)?;
            }
            w.finish()?;
            w.into_inner().flush()?;
        }
        other => bail!("unknown ingest workload {other}"),
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn write_csv<W: Write + Finish>(parquet: &Path, out: W) -> Result<()> {
    let mut w = arrow_csv::WriterBuilder::new().with_header(true).build(out);
    for b in super::read_batches(parquet)? {
        w.write(&b?)?;
    }
    w.into_inner().finish_writing()
}

/// Flushing or finishing the stream a CSV input is written to.
trait Finish {
    fn finish_writing(self) -> Result<()>;
}

impl Finish for BufWriter<File> {
    fn finish_writing(mut self) -> Result<()> {
        Ok(self.flush()?)
    }
}

impl Finish for flate2::write::GzEncoder<BufWriter<File>> {
    fn finish_writing(self) -> Result<()> {
        Ok(self.finish()?.flush()?)
    }
}

/// The nested events schema of I4: `user` {id, email, name}, and `tags` [country] or
/// [country, "c" + category] (when the flag is set).
pub fn nested_schema() -> arrow_schema::SchemaRef {
    use arrow_schema::{DataType, Field, Fields, Schema};
    let user = Fields::from(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("email", DataType::Utf8, true),
        Field::new("name", DataType::Utf8, true),
    ]);
    std::sync::Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Int64, true),
        Field::new("user", DataType::Struct(user), true),
        Field::new("tags", DataType::List(std::sync::Arc::new(Field::new("item", DataType::Utf8, true))), true),
        Field::new("amount", DataType::Float64, true),
        Field::new("ts", DataType::Utf8, true),
    ]))
}

/// An events batch in the nested shape.
fn nest(b: &RecordBatch) -> Result<RecordBatch> {
    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int32Type;
    use arrow_array::{ArrayRef, StructArray};
    let schema = nested_schema();
    let col = |name: &str| -> Result<ArrayRef> { Ok(b.column(b.schema().index_of(name)?).clone()) };
    let arrow_schema::DataType::Struct(user_fields) = schema.field(1).data_type() else { bail!("user is a struct") };
    let user = StructArray::try_new(user_fields.clone(), vec![col("user_id")?, col("email")?, col("name")?], None)?;
    let (country, category, flag) = (col("country")?, col("category")?, col("flag")?);
    let (country, category, flag) =
        (country.as_string::<i32>(), category.as_primitive::<Int32Type>(), flag.as_boolean());
    let mut tags = ListBuilder::new(StringBuilder::new());
    for r in 0..b.num_rows() {
        tags.values().append_value(country.value(r));
        if flag.value(r) {
            tags.values().append_value(format!("c{}", category.value(r)));
        }
        tags.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        col("event_id")?,
        std::sync::Arc::new(user),
        std::sync::Arc::new(tags.finish()),
        col("amount")?,
        col("ts")?,
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// The native runner's reader for an ingest input: arrow-rs's CSV or JSON reader, with the
/// events schema declared (as every runner is told it).
pub fn read(workload: &str, input: &Path) -> Result<Box<dyn Iterator<Item = Result<RecordBatch>>>> {
    let schema = if workload == "I4" { nested_schema() } else { super::events_schema() };
    let open = || File::open(input).with_context(|| format!("open {}", input.display()));
    let batches: Box<dyn Iterator<Item = std::result::Result<RecordBatch, arrow_schema::ArrowError>>> = match workload {
        "I1" => Box::new(
            arrow_csv::ReaderBuilder::new(schema).with_header(true).with_batch_size(super::BATCH).build(open()?)?,
        ),
        "I2" | "I4" => Box::new(
            arrow_json::ReaderBuilder::new(schema)
                .with_batch_size(super::BATCH)
                .build(BufReader::with_capacity(1 << 20, open()?))?,
        ),
        "I5" => Box::new(arrow_json::ReaderBuilder::new(schema).with_batch_size(super::BATCH).build(
            BufReader::with_capacity(
                1 << 20,
                flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, open()?)),
            ),
        )?),
        "I3" => Box::new(
            arrow_csv::ReaderBuilder::new(schema)
                .with_header(true)
                .with_batch_size(super::BATCH)
                .build(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, open()?)))?,
        ),
        other => bail!("unknown ingest workload {other}"),
    };
    Ok(Box::new(batches.map(|b| b.map_err(Into::into))))
}

/// The `[sources.events]` table of weir's pipeline for an ingest workload: the format and
/// the declared columns (the events schema in weir's type names).
pub fn weir_source(workload: &str, input: &Path) -> String {
    if workload == "I4" {
        return format!(
            r#"format = "jsonl"
path = "{}"
schema = {{ event_id = "int64", user = "struct<id: int64, email: string, name: string>", tags = "list<string>", amount = "float64", ts = "string" }}"#,
            input.display()
        );
    }
    let format = if matches!(workload, "I2" | "I5") { "jsonl" } else { "csv" };
    format!(
        r#"format = "{format}"
path = "{}"
schema = {{ event_id = "int64", user_id = "int64", email = "string", name = "string", country = "string", category = "int32", amount = "float64", ts = "string", flag = "bool" }}"#,
        input.display()
    )
}
