//! `format = "postgres"`: a table or query of a PostgreSQL database, read in one snapshot.
//!
//! A thread of the source's own connects, opens a read-only REPEATABLE READ transaction (one
//! snapshot for the source's whole read; another step or source takes its own), prepares the statement (its column types give the Arrow
//! schema) and reads the rows in PostgreSQL's binary format into Arrow builders, batch by
//! batch; one batch waits in a channel at most, so a table larger than memory streams.
//!
//! With nothing to bind, the rows come as one `COPY (statement) TO STDOUT (FORMAT
//! binary)` stream: the same binary values as a portal's rows, with less work per row on
//! both sides (no row objects, no round trip per fetch). A partition's window (`$start`,
//! `$end`) or an incremental read's bounds are bound as parameters, never spliced into the
//! SQL; COPY takes no parameters, so such a read binds the statement and fetches through a
//! portal, at most FETCH_ROWS rows per round trip.
//!
//! Types: smallint, integer, bigint, real, double precision, numeric with a declared scale
//! (decimal128), text, varchar, char, name, bool, date, timestamp, timestamptz, uuid (text),
//! json and jsonb (text), bytea, and one-dimensional arrays of these. Anything else fails
//! when the run starts, naming the column and its type, with the cast to write.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder, Int16Builder,
    Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, ListArray, RecordBatch};
use arrow_buffer::{NullBufferBuilder, OffsetBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use postgres::types::{FromSql, IsNull, Kind, ToSql, Type};

use super::{Position, Skipped, Source};
use crate::config;
use crate::io::{Error, Result};

/// Microseconds from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;

/// The source system failed (down, refusing, timing out): retrying may help.
fn source_error(name: &str, message: impl std::fmt::Display) -> Error {
    Error::Source { source_name: name.to_string(), message: message.to_string() }
}

/// The pipeline or the data must change (a type weir cannot map, a bad query, a value out
/// of its column's range): retrying cannot help.
fn invalid(name: &str, message: impl std::fmt::Display) -> Error {
    Error::SourceInvalid { source_name: name.to_string(), message: message.to_string() }
}

/// A driver error with what PostgreSQL said (its Display alone says only "db error"), and
/// whose it is to fix: SQL and permission errors (class 42), data errors (22) and
/// feature limits (0A) are the pipeline's; everything else the system's.
fn pg_error(name: &str, what: &str, e: &postgres::Error) -> Error {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("{what}: {} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(d) = db.detail() {
            m.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            m.push_str(&format!("; hint: {h}"));
        }
        let class = &db.code().code()[..2];
        return if matches!(class, "42" | "22" | "0A") { invalid(name, m) } else { source_error(name, m) };
    }
    let mut m = format!("{what}: {e}");
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        m.push_str(&format!(": {c}"));
        cause = c.source();
    }
    source_error(name, m)
}

/// Rows one fetch from the portal brings at most.
const FETCH_ROWS: usize = 1024;
/// About the bytes of values one fetch brings (fewer rows per fetch when rows are wide).
const FETCH_BYTES: usize = 8 << 20;
/// Fetches waiting for the decoder at most.
const FETCHES_AHEAD: usize = 2;
/// A batch is sent once its values reach this size: string and binary columns stay far
/// from Arrow's 2 GiB offsets, and memory from `batch_size` times a wide row.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// How long connecting may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One run's read of a postgres source.
pub struct PgSource {
    name: String,
    schema: SchemaRef,
    /// Batches, then `None` at the end: a reader that stops without it failed.
    rx: Receiver<Result<Option<RecordBatch>>>,
    rows: u64,
    done: bool,
    /// Stops the query on the server when the read is dropped before its end.
    cancel: Option<postgres::CancelToken>,
    /// An incremental read: the upper bound it reads to, the next watermark.
    upper: Option<i64>,
}

/// An incremental read's bounds, microseconds since 1970: from `lower` (none: from the
/// start) up to `upper`, which the run fixed when it started.
#[derive(Debug, Clone, Copy)]
pub struct Increment {
    pub lower: Option<i64>,
    pub upper: i64,
}

impl Drop for PgSource {
    fn drop(&mut self) {
        if !self.done {
            if let Some(c) = self.cancel.take() {
                // the reader may be waiting on the server: ask the server to stop the query
                let _ = std::thread::Builder::new().name("postgres cancel".into()).spawn(move || {
                    let _ = c.cancel_query(postgres::NoTls);
                });
            }
        }
    }
}

impl PgSource {
    pub fn open(
        source: &config::Source,
        pg: &config::Postgres,
        partition: Option<&str>,
        batch_size: usize,
        increment: Option<Increment>,
    ) -> Result<PgSource> {
        let name = source.name.clone();
        let url = pg.url.resolve().map_err(|m| invalid(&name, format!("url: {m}")))?;
        let url = String::from_utf8(url).map_err(|_| invalid(&name, "url: not UTF-8"))?;
        // the URL is parsed here and never shown: it may hold a password
        let mut config: postgres::Config =
            url.parse().map_err(|_| invalid(&name, "url: not a postgres:// URL (or key=value string)"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let window = match (pg.window, partition) {
            (false, _) => None,
            (true, Some(p)) => Some(window(p).ok_or_else(|| {
                invalid(
                    &name,
                    format!("partition `{p}` is not a day (YYYY-MM-DD) or an hour (YYYY-MM-DDTHH): `where` binds $start and $end from it"),
                )
            })?),
            (true, None) => {
                return Err(invalid(&name, "`where` uses $start/$end: run it with --partition (a day or an hour)"))
            }
        };
        let (schema_tx, schema_rx) = sync_channel::<Result<(SchemaRef, postgres::CancelToken)>>(1);
        let (tx, rx) = sync_channel::<Result<Option<RecordBatch>>>(1);
        let (mut sql, thread_name) = (pg.sql.clone(), name.clone());
        // the window's bounds in `$n` order, and whether it is an hour
        let mut window: Option<Window> = window.map(|(a, b)| Window {
            bounds: pg.binds.iter().map(|w| if *w == "start" { a } else { b }).collect(),
            hourly: b - a < 86_400_000_000,
        });
        if let (Some(inc), Some(column)) = (increment, source.incremental.as_ref().and_then(|i| i.column.as_ref())) {
            // the increment is bound like the window, after its parameters
            let w = window.get_or_insert(Window { bounds: Vec::new(), hourly: false });
            let column = format!("\"{}\"", column.replace('"', "\"\""));
            let mut cond = Vec::new();
            if let Some(lower) = inc.lower {
                w.bounds.push(lower);
                cond.push(format!("{column} >= ${}", w.bounds.len()));
            }
            w.bounds.push(inc.upper);
            cond.push(format!("{column} < ${}", w.bounds.len()));
            sql = format!("select * from ({sql}) as weir_increment where {}", cond.join(" and "));
        }
        let batch = batch_size.clamp(1, i32::MAX as usize) as i32;
        std::thread::Builder::new()
            .name(format!("postgres {name}"))
            .spawn(move || read(&thread_name, &config, &sql, window, batch, schema_tx, tx))
            .map_err(|e| source_error(&name, format!("cannot start its reader: {e}")))?;
        let (schema, cancel) = schema_rx
            .recv()
            .map_err(|_| Error::Internal(format!("the reader of source `{name}` stopped before the schema")))??;
        Ok(PgSource { name, schema, rx, rows: 0, done: false, cancel: Some(cancel), upper: increment.map(|i| i.upper) })
    }
}

impl Source for PgSource {
    fn high_watermark(&self) -> Option<String> {
        self.upper.map(super::format_micros)
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn next_batch(&mut self) -> Option<Result<RecordBatch>> {
        if self.done {
            return None;
        }
        match self.rx.recv() {
            Ok(Ok(Some(b))) => {
                self.rows += b.num_rows() as u64;
                Some(Ok(b))
            }
            Ok(Ok(None)) => {
                self.done = true;
                None
            }
            Ok(Err(e)) => {
                self.done = true;
                Some(Err(e))
            }
            // never taken for the end: rows would be missing without a word
            Err(_) => {
                self.done = true;
                Some(Err(Error::Internal(format!(
                    "the reader of source `{}` stopped before the end of its result",
                    self.name
                ))))
            }
        }
    }

    fn position(&self) -> Position {
        serde_json::json!({ "rows": self.rows })
    }

    fn seek(&mut self, _at: &Position) -> Result<()> {
        Err(invalid(&self.name, "a postgres read cannot continue another run's snapshot; run without --resume"))
    }

    /// Never: a later snapshot may hold other rows, so a run is not resumed mid-read.
    fn at_boundary(&self) -> bool {
        false
    }

    fn skipped(&self) -> (u64, &[Skipped]) {
        (0, &[])
    }

    fn inputs(&self) -> usize {
        1
    }
}

/// A partition's window in microseconds since 1970: a day, or an hour.
fn window(partition: &str) -> Option<(i64, i64)> {
    const DAY: i64 = 86_400_000_000;
    const HOUR: i64 = 3_600_000_000;
    let (date, hour) = match partition.split_once('T') {
        Some((d, h)) if h.len() == 2 => (d, Some(h.parse::<i64>().ok().filter(|h| (0..24).contains(h))?)),
        Some(_) => return None,
        None => (partition, None),
    };
    let days = crate::engine::backfill::days_of(date)?;
    Some(match hour {
        None => (days * DAY, (days + 1) * DAY),
        Some(h) => (days * DAY + h * HOUR, days * DAY + (h + 1) * HOUR),
    })
}

/// A partition's window as the statement binds it.
struct Window {
    /// The values of `$1`, `$2`..., microseconds since 1970.
    bounds: Vec<i64>,
    /// The partition is an hour (a date parameter cannot hold it).
    hourly: bool,
}

/// A window bound, bound as the parameter's own type (timestamp, timestamptz or date).
#[derive(Debug)]
struct Bound(i64);

impl ToSql for Bound {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        if *ty == Type::DATE {
            out.put_i32((self.0.div_euclid(86_400_000_000) as i32) - PG_EPOCH_DAYS);
        } else {
            out.put_i64(self.0 - PG_EPOCH_MICROS);
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIMESTAMP | Type::TIMESTAMPTZ | Type::DATE)
    }

    postgres::types::to_sql_checked!();
}

/// A value as PostgreSQL sent it (binary format), or null.
struct Raw<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw)))
    }
    fn from_sql_null(_: &Type) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// What the decoder gets from the reader.
enum Chunk {
    /// Rows of a portal fetch.
    Rows(Vec<postgres::Row>),
    /// Whole rows of `COPY ... (FORMAT binary)`: per row, its field count (big-endian i16),
    /// then per field its length (i32, -1 for null) and bytes.
    Copy(Vec<u8>),
}

/// The reader thread: the schema first, then batches until the end or a closed channel.
fn read(
    name: &str,
    config: &postgres::Config,
    sql: &str,
    window: Option<Window>,
    batch: i32,
    schema_tx: SyncSender<Result<(SchemaRef, postgres::CancelToken)>>,
    tx: SyncSender<Result<Option<RecordBatch>>>,
) {
    let mut client = match config.connect(postgres::NoTls) {
        Ok(c) => c,
        Err(e) => {
            let _ = schema_tx.send(Err(pg_error(name, "cannot connect", &e)));
            return;
        }
    };
    let cancel = client.cancel_token();
    // a COPY left before its end is cancelled: else closing the snapshot waits for the
    // server to send (and the client to discard) the rest of the result
    let cancel_copy = cancel.clone();
    let started = start(&mut client, name, sql, window);
    let (mut t, fetch, cols) = match started {
        Ok(x) => x,
        Err(e) => {
            let _ = schema_tx.send(Err(e));
            return;
        }
    };
    let schema: SchemaRef =
        Arc::new(Schema::new(cols.iter().map(|(n, c)| Field::new(n, c.data_type(), true)).collect::<Vec<_>>()));
    if schema_tx.send(Ok((schema.clone(), cancel))).is_err() {
        return;
    }
    // Fetching and decoding overlap: this thread reads the next rows while the decoder
    // turns the last ones into columns, so the server is not idle while weir decodes. At
    // most FETCHES_AHEAD chunks wait between them, each of about FETCH_BYTES.
    let ncols = cols.len();
    let (chunks_tx, chunks_rx) = sync_channel::<Chunk>(FETCHES_AHEAD);
    let decoder = {
        let batcher =
            Batcher { name: name.to_string(), cols, schema, batch: batch as usize, tx: tx.clone(), rows: 0, bytes: 0 };
        std::thread::Builder::new().name(format!("postgres {name} decode")).spawn(move || decode(chunks_rx, batcher))
    };
    let Ok(decoder) = decoder else {
        let _ = tx.send(Err(source_error(name, "cannot start its decoder".to_string())));
        return;
    };
    let fetched = match fetch {
        Fetch::Portal(portal) => fetch_portal(name, &mut t, &portal, &chunks_tx).map(|()| true),
        Fetch::Copy(statement) => {
            let read = fetch_copy(name, &mut t, &statement, ncols, &chunks_tx);
            if !matches!(read, Ok(true)) {
                let _ = cancel_copy.cancel_query(postgres::NoTls);
            }
            read
        }
    };
    drop(chunks_tx);
    if let Err(e) = fetched {
        // the decoder stops on the closed channel; its verdict no longer matters
        let _ = tx.send(Err(e));
        let _ = decoder.join();
        return;
    }
    // the end is said once the decoder sent every row, and the snapshot closed cleanly
    let decoded = decoder.join().unwrap_or(false);
    // read-only: nothing to keep
    let _ = t.commit();
    if decoded {
        let _ = tx.send(Ok(None));
    }
}

/// Fetch the portal's rows, at most FETCH_ROWS (and about FETCH_BYTES) per round trip. A
/// stopped decoder ends it early without an error of its own.
fn fetch_portal(
    name: &str,
    t: &mut postgres::Transaction<'_>,
    portal: &postgres::Portal,
    chunks: &SyncSender<Chunk>,
) -> std::result::Result<(), Error> {
    let mut want = FETCH_ROWS;
    loop {
        let rows = t.query_portal(portal, want as i32).map_err(|e| pg_error(name, "reading", &e))?;
        let end = rows.len() < want;
        if !rows.is_empty() {
            // wide rows: fewer per fetch, so what waits stays near FETCH_BYTES
            let row_bytes = row_bytes(&rows[..rows.len().min(16)]).max(1);
            want = (FETCH_BYTES / row_bytes).clamp(1, FETCH_ROWS);
            if chunks.send(Chunk::Rows(rows)).is_err() {
                return Ok(());
            }
        }
        if end {
            return Ok(());
        }
    }
}

/// The signature COPY's binary output starts with.
const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Stream `COPY (...) TO STDOUT (FORMAT binary)`, cut into chunks of whole rows of about
/// FETCH_BYTES (a row longer than that is a chunk of its own). The framing is checked
/// here: every row has `ncols` fields, and the output ends with its trailer. Returns
/// whether it read to the end (false: the decoder stopped).
fn fetch_copy(
    name: &str,
    t: &mut postgres::Transaction<'_>,
    statement: &postgres::Statement,
    ncols: usize,
    chunks: &SyncSender<Chunk>,
) -> std::result::Result<bool, Error> {
    use std::io::BufRead;
    let mut reader = t.copy_out(statement).map_err(|e| pg_error(name, "reading", &e))?;
    let io_error = |e: std::io::Error| match e.get_ref().and_then(|x| x.downcast_ref::<postgres::Error>()) {
        Some(pg) => pg_error(name, "reading", pg),
        None => source_error(name, format!("reading: {e}")),
    };
    let bad = |m: String| source_error(name, format!("COPY's binary output: {m}"));
    let mut buf: Vec<u8> = Vec::with_capacity(FETCH_BYTES + (64 << 10));
    let mut header = false;
    loop {
        let got = reader.fill_buf().map_err(io_error)?;
        let n = got.len();
        buf.extend_from_slice(got);
        reader.consume(n);
        if !header {
            if n == 0 && buf.len() < 19 {
                return Err(bad(format!("it ended after {} bytes, before its header", buf.len())));
            }
            if buf.len() >= 11 && buf.get(..11) != Some(&COPY_SIGNATURE[..]) {
                return Err(bad("it does not start with COPY's signature".into()));
            }
            if buf.len() < 19 {
                continue;
            }
            let ext = buf.get(15..19).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
            let end = ext.saturating_add(19);
            if buf.len() < end {
                if n == 0 {
                    return Err(bad("it ended inside its header".into()));
                }
                continue;
            }
            buf.drain(..end);
            header = true;
        }
        if buf.len() < FETCH_BYTES && n > 0 {
            continue;
        }
        let (end, trailer) = frame(&buf, ncols).map_err(bad)?;
        if n == 0 && !trailer {
            return Err(bad("it ended in the middle of a row".into()));
        }
        if end > 0 {
            let tail = buf.split_off(end);
            let full = std::mem::replace(&mut buf, Vec::with_capacity(FETCH_BYTES + (64 << 10)));
            buf.extend_from_slice(&tail);
            if chunks.send(Chunk::Copy(full)).is_err() {
                return Ok(false);
            }
        }
        if trailer {
            // read to the end (once: the stream is not asked again after it ended), so the
            // connection sees COPY's completion
            let mut more = n > 0;
            while more {
                let n = reader.fill_buf().map_err(io_error)?.len();
                reader.consume(n);
                more = n > 0;
            }
            return Ok(true);
        }
    }
}

/// Where the whole rows at the start of `buf` end, and whether COPY's trailer follows them.
fn frame(buf: &[u8], ncols: usize) -> std::result::Result<(usize, bool), String> {
    let be16 = |at: usize| buf.get(at..at + 2).map(|b| i16::from_be_bytes([b[0], b[1]]));
    let be32 = |at: usize| buf.get(at..at + 4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let mut at = 0;
    loop {
        let Some(fields) = be16(at) else { return Ok((at, false)) };
        if fields == -1 {
            return Ok((at, true));
        }
        if fields as usize != ncols || fields < 0 {
            return Err(format!("a row of {fields} fields; the statement has {ncols} columns"));
        }
        let mut p = at + 2;
        for _ in 0..ncols {
            let Some(len) = be32(p) else { return Ok((at, false)) };
            p += 4;
            if len >= 0 {
                p = p.saturating_add(len as usize);
                if p > buf.len() {
                    return Ok((at, false));
                }
            } else if len != -1 {
                return Err(format!("a field of length {len}"));
            }
        }
        if p > buf.len() {
            return Ok((at, false));
        }
        at = p;
    }
}

/// The bytes of values of these rows (a fetch's first few), per row.
fn row_bytes(rows: &[postgres::Row]) -> usize {
    let mut total = 0usize;
    for row in rows {
        for i in 0..row.len() {
            if let Ok(Raw(Some(v))) = row.try_get::<_, Raw<'_>>(i) {
                total += v.len();
            }
        }
    }
    total / rows.len().max(1)
}

/// Turns rows into batches: a batch is sent at `batch` rows or MAX_BATCH_BYTES of values,
/// whichever comes first (wide rows never pile up).
struct Batcher {
    name: String,
    cols: Vec<(String, Col)>,
    schema: SchemaRef,
    batch: usize,
    tx: SyncSender<Result<Option<RecordBatch>>>,
    rows: usize,
    bytes: usize,
}

impl Batcher {
    /// The next value of column `i`.
    fn value(&mut self, i: usize, raw: Option<&[u8]>) -> Result<()> {
        let (col_name, col) = self.cols.get_mut(i).ok_or_else(|| invalid(&self.name, "a row with too many fields"))?;
        self.bytes += raw.map_or(0, <[u8]>::len);
        col.append(raw).map_err(|m| invalid(&self.name, format!("column `{col_name}`: {m}")))
    }

    /// A row is complete; sends the batch when it is full. False once the batches' receiver
    /// is gone or a batch could not be made.
    fn row_done(&mut self) -> bool {
        self.rows += 1;
        self.rows < self.batch && self.bytes < MAX_BATCH_BYTES || self.flush()
    }

    fn flush(&mut self) -> bool {
        let arrays: Vec<ArrayRef> = self.cols.iter_mut().map(|(_, c)| c.finish()).collect();
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(self.rows));
        let built = RecordBatch::try_new_with_options(self.schema.clone(), arrays, &options)
            .map(Some)
            .map_err(|e| Error::Internal(e.to_string()));
        let failed = built.is_err();
        (self.rows, self.bytes) = (0, 0);
        self.tx.send(built).is_ok() && !failed
    }

    fn fail(&self, e: Error) -> bool {
        let _ = self.tx.send(Err(e));
        false
    }
}

/// The decoder thread: fetched rows into the columns, batch by batch. Returns whether
/// every row was decoded and sent.
fn decode(chunks: Receiver<Chunk>, mut b: Batcher) -> bool {
    let ncols = b.cols.len();
    for chunk in chunks {
        match chunk {
            Chunk::Rows(rows) => {
                for row in &rows {
                    for i in 0..ncols {
                        let value = match row.try_get::<_, Raw<'_>>(i) {
                            Ok(raw) => b.value(i, raw.0),
                            Err(e) => Err(pg_error(&b.name, "reading", &e)),
                        };
                        if let Err(e) = value {
                            return b.fail(e);
                        }
                    }
                    if !b.row_done() {
                        return false;
                    }
                }
            }
            Chunk::Copy(bytes) => {
                // whole rows, framed by the reader
                let mut at = 0;
                while at < bytes.len() {
                    at += 2;
                    for i in 0..ncols {
                        let len = bytes.get(at..at + 4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                        at += 4;
                        let raw = match len {
                            Some(-1) => None,
                            Some(n) if n >= 0 => {
                                let value = at.checked_add(n as usize).and_then(|end| bytes.get(at..end));
                                at = at.saturating_add(n as usize);
                                match value {
                                    Some(v) => Some(v),
                                    None => return b.fail(invalid(&b.name, "a truncated COPY row")),
                                }
                            }
                            _ => return b.fail(invalid(&b.name, "a truncated COPY row")),
                        };
                        if let Err(e) = b.value(i, raw) {
                            return b.fail(e);
                        }
                    }
                    if !b.row_done() {
                        return false;
                    }
                }
            }
        }
    }
    b.rows == 0 || b.flush()
}

/// What a read fetches its rows through.
enum Fetch {
    /// A portal of the statement with the window (or increment) bound, fetched in rounds.
    Portal(postgres::Portal),
    /// `COPY (statement) TO STDOUT (FORMAT binary)`, prepared: nothing to bind, one stream.
    Copy(postgres::Statement),
}

/// The read's snapshot, how it fetches and its columns.
type Started<'c> = (postgres::Transaction<'c>, Fetch, Vec<(String, Col)>);

/// Open the snapshot, prepare the statement, map its columns and bind the window.
fn start<'c>(client: &'c mut postgres::Client, name: &str, sql: &str, window: Option<Window>) -> Result<Started<'c>> {
    let err = |m: String| invalid(name, m);
    let mut t = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(|e| pg_error(name, "cannot start a snapshot", &e))?;
    let stmt = t.prepare(sql).map_err(|e| pg_error(name, &format!("the statement `{sql}`"), &e))?;
    let mut cols = Vec::new();
    for c in stmt.columns() {
        let col = Col::for_type(c.type_(), c.type_modifier())
            .map_err(|m| err(format!("column `{}` has type `{}`: {m}", c.name(), c.type_().name())))?;
        cols.push((c.name().to_string(), col));
    }
    let hourly = window.as_ref().is_some_and(|w| w.hourly);
    let bounds: Vec<Bound> = match (stmt.params().len(), window) {
        (0, None) => Vec::new(),
        (n, Some(w)) if n == w.bounds.len() => w.bounds.into_iter().map(Bound).collect(),
        // `$start` in a comment: every partition would read everything
        (0, Some(_)) => return Err(err("`where` names $start/$end, but the statement has no parameters".into())),
        (n, _) => return Err(err(format!("the statement takes {n} parameters; only $start and $end are bound"))),
    };
    for p in stmt.params().iter().take(bounds.len()) {
        if *p == Type::DATE && hourly {
            return Err(err("$start/$end are compared with a date, but the partition is an hour: compare them with a timestamp column".into()));
        }
        if !<Bound as ToSql>::accepts(p) {
            return Err(err(format!(
                "$start/$end are compared with a `{}`; compare them with a timestamp, timestamptz or date column",
                p.name()
            )));
        }
    }
    if bounds.is_empty() {
        // nothing to bind: one COPY stream (the same binary values, less per-row work than
        // a portal's rows); the statement's own text, on lines of its own so that a trailing
        // comment cannot swallow the closing parenthesis
        let text = sql.trim_end().trim_end_matches(';').trim_end();
        let copy = format!("COPY (\n{text}\n) TO STDOUT (FORMAT binary)");
        // a statement that prepares alone but not inside COPY (`...; -- note`) is read
        // through a portal: tried under a savepoint, so the failure leaves the snapshot usable
        let savepoint = |cmd: &str, t: &mut postgres::Transaction<'_>| {
            t.batch_execute(cmd).map_err(|e| pg_error(name, &format!("`{cmd}`"), &e))
        };
        savepoint("SAVEPOINT weir_copy", &mut t)?;
        if let Ok(prepared) = t.prepare(&copy) {
            savepoint("RELEASE SAVEPOINT weir_copy", &mut t)?;
            return Ok((t, Fetch::Copy(prepared), cols));
        }
        savepoint("ROLLBACK TO SAVEPOINT weir_copy", &mut t)?;
    }
    let params: Vec<&(dyn ToSql + Sync)> = bounds.iter().map(|b| b as &(dyn ToSql + Sync)).collect();
    let portal = t.bind(&stmt, &params).map_err(|e| pg_error(name, "binding the window", &e))?;
    Ok((t, Fetch::Portal(portal), cols))
}

/// One column's builder, by its PostgreSQL type.
enum Col {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Numeric {
        b: Decimal128Builder,
        precision: u8,
        scale: i8,
    },
    /// text-like; `skip` leading bytes (jsonb's version byte)
    Text {
        b: StringBuilder,
        skip: usize,
    },
    Uuid(StringBuilder),
    Bytes(BinaryBuilder),
    Date(Date32Builder),
    Ts {
        b: TimestampMicrosecondBuilder,
        tz: bool,
    },
    List {
        item: Box<Col>,
        offsets: Vec<i32>,
        nulls: NullBufferBuilder,
    },
}

fn be<const N: usize>(raw: &[u8]) -> std::result::Result<[u8; N], String> {
    raw.try_into().map_err(|_| format!("expected {N} bytes, got {}", raw.len()))
}

impl Col {
    fn for_type(ty: &Type, typmod: i32) -> std::result::Result<Col, String> {
        if let Kind::Array(elem) = ty.kind() {
            let item = Col::for_type(elem, typmod)?;
            if matches!(item, Col::List { .. }) {
                return Err("arrays of arrays are not read".into());
            }
            return Ok(Col::List { item: Box::new(item), offsets: vec![0], nulls: NullBufferBuilder::new(0) });
        }
        Ok(match *ty {
            Type::BOOL => Col::Bool(BooleanBuilder::new()),
            Type::INT2 => Col::I16(Int16Builder::new()),
            Type::INT4 => Col::I32(Int32Builder::new()),
            Type::INT8 => Col::I64(Int64Builder::new()),
            Type::FLOAT4 => Col::F32(Float32Builder::new()),
            Type::FLOAT8 => Col::F64(Float64Builder::new()),
            Type::NUMERIC => {
                // typmod: ((precision << 16) | scale) + 4; -1 when none was declared
                if typmod < 4 {
                    return Err(
                        "numeric without a declared precision and scale; cast it in a query, e.g. amount::numeric(18,2)"
                            .into(),
                    );
                }
                // the scale is an 11-bit signed number (PostgreSQL 15 allows -1000..1000)
                let (precision, scale) = (((typmod - 4) >> 16) & 0xffff, (((typmod - 4) & 0x7ff) ^ 0x400) - 0x400);
                if !(0..=precision).contains(&scale) {
                    return Err(format!("numeric({precision},{scale}) has a scale Arrow and Parquet cannot hold; cast it (e.g. ::numeric(38,2))"));
                }
                if precision > 38 {
                    return Err(format!(
                        "numeric({precision},{scale}) is wider than 38 digits; cast it (e.g. ::numeric(38,{scale}) or ::text)"
                    ));
                }
                let (precision, scale) = (precision as u8, scale as i8);
                let b =
                    Decimal128Builder::new().with_precision_and_scale(precision, scale).map_err(|e| e.to_string())?;
                Col::Numeric { b, precision, scale }
            }
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::JSON => {
                Col::Text { b: StringBuilder::new(), skip: 0 }
            }
            Type::JSONB => Col::Text { b: StringBuilder::new(), skip: 1 },
            Type::UUID => Col::Uuid(StringBuilder::new()),
            Type::BYTEA => Col::Bytes(BinaryBuilder::new()),
            Type::DATE => Col::Date(Date32Builder::new()),
            Type::TIMESTAMP => Col::Ts { b: TimestampMicrosecondBuilder::new(), tz: false },
            Type::TIMESTAMPTZ => Col::Ts { b: TimestampMicrosecondBuilder::new().with_timezone("UTC"), tz: true },
            _ => return Err("weir does not read it; cast it in a query (e.g. col::text)".into()),
        })
    }

    fn data_type(&self) -> DataType {
        match self {
            Col::Bool(_) => DataType::Boolean,
            Col::I16(_) => DataType::Int16,
            Col::I32(_) => DataType::Int32,
            Col::I64(_) => DataType::Int64,
            Col::F32(_) => DataType::Float32,
            Col::F64(_) => DataType::Float64,
            Col::Numeric { precision, scale, .. } => DataType::Decimal128(*precision, *scale),
            Col::Text { .. } | Col::Uuid(_) => DataType::Utf8,
            Col::Bytes(_) => DataType::Binary,
            Col::Date(_) => DataType::Date32,
            Col::Ts { tz, .. } => DataType::Timestamp(TimeUnit::Microsecond, tz.then(|| "UTC".into())),
            Col::List { item, .. } => DataType::List(Arc::new(Field::new("item", item.data_type(), true))),
        }
    }

    fn append(&mut self, raw: Option<&[u8]>) -> std::result::Result<(), String> {
        let Some(raw) = raw else {
            self.append_null();
            return Ok(());
        };
        match self {
            Col::Bool(b) => b.append_value(be::<1>(raw)?[0] != 0),
            Col::I16(b) => b.append_value(i16::from_be_bytes(be(raw)?)),
            Col::I32(b) => b.append_value(i32::from_be_bytes(be(raw)?)),
            Col::I64(b) => b.append_value(i64::from_be_bytes(be(raw)?)),
            Col::F32(b) => b.append_value(f32::from_be_bytes(be(raw)?)),
            Col::F64(b) => b.append_value(f64::from_be_bytes(be(raw)?)),
            Col::Numeric { b, precision, scale } => b.append_value(numeric(raw, *precision, *scale)?),
            Col::Text { b, skip } => {
                if *skip == 1 && raw.first() != Some(&1) {
                    return Err("a jsonb value of an unknown binary version".into());
                }
                let text = raw.get(*skip..).ok_or("a jsonb value without its version byte")?;
                b.append_value(
                    std::str::from_utf8(text)
                        .map_err(|_| "text that is not UTF-8 (set the database's encoding to UTF8)")?,
                )
            }
            Col::Uuid(b) => {
                let u = be::<16>(raw)?;
                let h: String = u.iter().map(|x| format!("{x:02x}")).collect();
                b.append_value(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
            }
            Col::Bytes(b) => b.append_value(raw),
            Col::Date(b) => {
                let d = i32::from_be_bytes(be(raw)?);
                if d == i32::MAX || d == i32::MIN {
                    return Err("an infinite date; map it in a query (e.g. nullif(d, 'infinity'))".into());
                }
                b.append_value(d.checked_add(PG_EPOCH_DAYS).ok_or("a date out of range")?)
            }
            Col::Ts { b, .. } => {
                let t = i64::from_be_bytes(be(raw)?);
                if t == i64::MAX || t == i64::MIN {
                    return Err("an infinite timestamp; map it in a query (e.g. nullif(t, 'infinity'))".into());
                }
                b.append_value(t.checked_add(PG_EPOCH_MICROS).ok_or("a timestamp out of range")?)
            }
            Col::List { item, offsets, nulls } => {
                let n = array(raw, item)?;
                let last = *offsets.last().unwrap_or(&0);
                offsets.push(last.checked_add(n).ok_or("more array elements than a batch holds")?);
                nulls.append_non_null();
            }
        }
        Ok(())
    }

    fn append_null(&mut self) {
        match self {
            Col::Bool(b) => b.append_null(),
            Col::I16(b) => b.append_null(),
            Col::I32(b) => b.append_null(),
            Col::I64(b) => b.append_null(),
            Col::F32(b) => b.append_null(),
            Col::F64(b) => b.append_null(),
            Col::Numeric { b, .. } => b.append_null(),
            Col::Text { b, .. } | Col::Uuid(b) => b.append_null(),
            Col::Bytes(b) => b.append_null(),
            Col::Date(b) => b.append_null(),
            Col::Ts { b, .. } => b.append_null(),
            Col::List { offsets, nulls, .. } => {
                offsets.push(*offsets.last().unwrap_or(&0));
                nulls.append_null();
            }
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Col::Bool(b) => Arc::new(b.finish()),
            Col::I16(b) => Arc::new(b.finish()),
            Col::I32(b) => Arc::new(b.finish()),
            Col::I64(b) => Arc::new(b.finish()),
            Col::F32(b) => Arc::new(b.finish()),
            Col::F64(b) => Arc::new(b.finish()),
            Col::Numeric { b, precision, scale } => {
                let a = b.finish();
                *b = Decimal128Builder::new().with_precision_and_scale(*precision, *scale).unwrap_or_default();
                Arc::new(a)
            }
            Col::Text { b, .. } | Col::Uuid(b) => Arc::new(b.finish()),
            Col::Bytes(b) => Arc::new(b.finish()),
            Col::Date(b) => Arc::new(b.finish()),
            Col::Ts { b, tz } => {
                let a = b.finish();
                if *tz {
                    *b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
                }
                Arc::new(a)
            }
            Col::List { item, offsets, nulls } => {
                let values = item.finish();
                let field = Arc::new(Field::new("item", values.data_type().clone(), true));
                let offs = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
                Arc::new(ListArray::new(field, offs, values, nulls.finish()))
            }
        }
    }
}

/// A binary `numeric` as an integer of `scale` decimal places, within `precision` digits;
/// more places than the scale, NaN and infinities are errors. Digit by digit, so the zero
/// padding of the last base-10000 group never overflows.
fn numeric(raw: &[u8], precision: u8, scale: i8) -> std::result::Result<i128, String> {
    let word = |i: usize| raw.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).ok_or("a truncated numeric");
    let (ndigits, weight, sign) = (word(0)? as usize, word(2)? as i16, word(4)?);
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Err("NaN has no decimal value; map it in a query".into()),
        _ => return Err("an infinite numeric has no decimal value; map it in a query".into()),
    }
    let wide = || format!("a value wider than numeric({precision},{scale})");
    let mut acc: i128 = 0;
    for i in 0..ndigits {
        let d = i128::from(word(8 + 2 * i)?);
        if d >= 10_000 {
            return Err("a numeric digit out of range".into());
        }
        // this digit's place, in units of 10^-scale
        let e = 4 * (i64::from(weight) - i as i64) + i64::from(scale);
        let part = if e >= 0 {
            let mul = 10i128.checked_pow(u32::try_from(e).map_err(|_| wide())?).ok_or_else(wide)?;
            d.checked_mul(mul).ok_or_else(wide)?
        } else {
            let div = 10i128.checked_pow(u32::try_from(-e).unwrap_or(u32::MAX)).unwrap_or(i128::MAX);
            if d % div != 0 {
                return Err(format!("a value with more than {scale} decimal places"));
            }
            d / div
        };
        acc = acc.checked_add(part).ok_or_else(wide)?;
    }
    if acc >= 10i128.pow(u32::from(precision)) {
        return Err(wide());
    }
    Ok(if sign == 0x4000 { -acc } else { acc })
}

/// A one-dimensional binary array into `item`; returns its element count.
fn array(raw: &[u8], item: &mut Col) -> std::result::Result<i32, String> {
    let int =
        |i: usize| raw.get(i..i + 4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok_or("a truncated array");
    let ndim = int(0)?;
    if ndim == 0 {
        return Ok(0);
    }
    if ndim != 1 {
        return Err(format!("a {ndim}-dimensional array; only one dimension is read"));
    }
    let len = int(12)?;
    let mut at = 20usize;
    for _ in 0..len {
        let n = int(at)?;
        at += 4;
        if n < 0 {
            item.append_null();
        } else {
            let end = at.checked_add(n as usize).filter(|e| *e <= raw.len()).ok_or("a truncated array element")?;
            item.append(Some(&raw[at..end]))?;
            at = end;
        }
    }
    Ok(len.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;

    fn numeric_bytes(ndigits: &[u16], weight: i16, sign: u16, dscale: u16) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [ndigits.len() as u16, weight as u16, sign, dscale] {
            v.extend_from_slice(&w.to_be_bytes());
        }
        for d in ndigits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    /// COPY's binary rows of (bigint, text) for `rows`.
    fn copy_rows(rows: &[(i64, Option<&str>)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (id, text) in rows {
            v.extend_from_slice(&2i16.to_be_bytes());
            v.extend_from_slice(&8i32.to_be_bytes());
            v.extend_from_slice(&id.to_be_bytes());
            match text {
                Some(t) => {
                    v.extend_from_slice(&(t.len() as i32).to_be_bytes());
                    v.extend_from_slice(t.as_bytes());
                }
                None => v.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        v
    }

    #[test]
    fn copy_rows_are_framed_whole_at_every_cut() {
        let rows = [(1, Some("a")), (2, None), (3, Some("three"))];
        let body = copy_rows(&rows);
        let ends: Vec<usize> = (1..=rows.len()).map(|n| copy_rows(&rows[..n]).len()).collect();
        let mut full = body.clone();
        full.extend_from_slice(&(-1i16).to_be_bytes());
        for cut in 0..=full.len() {
            let (end, trailer) = frame(&full[..cut], 2).unwrap();
            // the last whole row before the cut, never part of one
            let want = ends.iter().copied().filter(|e| *e <= cut).max().unwrap_or(0);
            assert_eq!(end, want, "cut at {cut}");
            assert_eq!(trailer, cut >= body.len() + 2, "cut at {cut}");
        }
        assert!(frame(&full, 3).unwrap_err().contains("2 fields"), "a row of another width is refused");
        let mut bad = copy_rows(&rows[..1]);
        bad[14..18].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(frame(&bad, 2).unwrap_err().contains("length -5"), "a negative length other than -1 is refused");
    }

    #[test]
    fn copy_chunks_decode_as_their_rows() {
        let schema =
            Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true), Field::new("t", DataType::Utf8, true)]));
        let cols = vec![
            ("id".to_string(), Col::for_type(&Type::INT8, -1).unwrap()),
            ("t".to_string(), Col::for_type(&Type::TEXT, -1).unwrap()),
        ];
        let (tx, rx) = sync_channel(8);
        let b = Batcher { name: "s".into(), cols, schema, batch: 2, tx, rows: 0, bytes: 0 };
        let (chunks_tx, chunks_rx) = sync_channel(8);
        chunks_tx.send(Chunk::Copy(copy_rows(&[(1, Some("a")), (2, None), (3, Some("three"))]))).unwrap();
        // a chunk cut inside a row (the reader never sends one) fails instead of panicking
        chunks_tx.send(Chunk::Copy(copy_rows(&[(4, Some("four"))])[..9].to_vec())).unwrap();
        drop(chunks_tx);
        assert!(!decode(chunks_rx, b));
        let mut got = Vec::new();
        let mut failed = false;
        for r in rx {
            match r {
                Ok(Some(batch)) => {
                    let ids = batch.column(0).as_any().downcast_ref::<arrow_array::Int64Array>().unwrap();
                    let ts = batch.column(1).as_any().downcast_ref::<arrow_array::StringArray>().unwrap();
                    for i in 0..batch.num_rows() {
                        got.push((ids.value(i), ts.is_valid(i).then(|| ts.value(i).to_string())));
                    }
                }
                Ok(None) => {}
                Err(e) => failed = e.to_string().contains("truncated"),
            }
        }
        assert_eq!(got, vec![(1, Some("a".into())), (2, None)], "the first full batch went out");
        assert!(failed, "the truncated row is named");
    }

    #[test]
    fn numerics_windows_and_arrays_decode() {
        // 1234.5678 = [1234, 5678], weight 0
        assert_eq!(numeric(&numeric_bytes(&[1234, 5678], 0, 0, 4), 12, 4).unwrap(), 12_345_678);
        assert_eq!(numeric(&numeric_bytes(&[1234, 5678], 0, 0x4000, 4), 12, 6).unwrap(), -1_234_567_800);
        // 120000 = [12], weight 1
        assert_eq!(numeric(&numeric_bytes(&[12], 1, 0, 0), 12, 2).unwrap(), 12_000_000);
        // 0.05 = [500], weight -1
        assert_eq!(numeric(&numeric_bytes(&[500], -1, 0, 2), 12, 2).unwrap(), 5);
        assert!(numeric(&numeric_bytes(&[500], -1, 0, 2), 12, 1).unwrap_err().contains("decimal places"));
        assert_eq!(numeric(&numeric_bytes(&[], 0, 0, 0), 38, 37).unwrap(), 0, "zero at a high scale");
        assert!(numeric(&numeric_bytes(&[], 0, 0xC000, 0), 12, 2).is_err());
        assert!(numeric(&[0, 1], 12, 2).is_err(), "truncated");
        // 36 integer digits and .5 (padded to .5000) in numeric(38,2): no overflow
        let mut digits = vec![9999u16; 9];
        digits.push(5000);
        let v = numeric(&numeric_bytes(&digits, 8, 0, 1), 38, 2).unwrap();
        assert_eq!(v, 99_999_999_999_999_999_999_999_999_999_999_999_950);
        assert!(
            numeric(&numeric_bytes(&[1, 0], 1, 0, 0), 4, 0).unwrap_err().contains("wider"),
            "10000 in numeric(4,0)"
        );
        assert!(numeric(&numeric_bytes(&[10_000], 0, 0, 0), 12, 0).is_err(), "a digit out of range");
        assert_eq!(window("2024-01-03").unwrap(), (1_704_240_000_000_000, 1_704_326_400_000_000));
        assert_eq!(window("2024-01-03T04").unwrap().1 - window("2024-01-03T04").unwrap().0, 3_600_000_000);
        assert!(window("2024-01-03T24").is_none() && window("nope").is_none());
        // int4[] {1, NULL, 3}
        let mut raw = Vec::new();
        for x in [1i32, 1, 23, 3, 1] {
            raw.extend_from_slice(&x.to_be_bytes());
        }
        for v in [Some(1i32), None, Some(3)] {
            match v {
                Some(v) => {
                    raw.extend_from_slice(&4i32.to_be_bytes());
                    raw.extend_from_slice(&v.to_be_bytes());
                }
                None => raw.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        let mut col = Col::for_type(&Type::INT4_ARRAY, -1).unwrap();
        col.append(Some(&raw)).unwrap();
        col.append(None).unwrap();
        let a = col.finish();
        let list = a.as_any().downcast_ref::<ListArray>().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.value_length(0), 3);
        assert!(list.is_null(1));
        assert!(col.append(Some(&raw[..10])).is_err(), "a truncated array is refused");
        assert!(Col::for_type(&Type::MONEY, -1).err().unwrap().contains("cast"));
        assert!(Col::for_type(&Type::NUMERIC, -1).err().unwrap().contains("numeric(18,2)"));
    }
}
