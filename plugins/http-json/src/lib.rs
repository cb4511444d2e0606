//! `http-json`: a paginated JSON API read into Arrow batches, one page per batch.
//!
//! ```toml
//! [plugins.api]
//! path = "dist/plugins/http-json.wasm"
//! allowed_hosts = ["https://api.example.com"]
//! headers = { Authorization = { secret = "api_token", template = "Bearer {}" } }
//!
//! [sources.issues]
//! plugin = "api"
//! config = { url = "https://api.example.com/issues", records = "/items",
//!            pagination = { kind = "page", param = "page", size_param = "per_page", size = 100 },
//!            incremental = { param = "updated_since", column = "updated_at" },
//!            schema = { id = "int64", title = "string", updated_at = "timestamp" } }
//! ```
//!
//! - `url`: the first page (`{partition}` is replaced by the run's partition); `query`:
//!   more query parameters.
//! - `records`: a JSON pointer to the array of records in a page (`""`: the page is the
//!   array). `schema`: the columns, by record key (`paths` maps a column to a JSON pointer
//!   inside the record instead); types `int64`, `float64`, `string`, `bool`, `date`,
//!   `timestamp` (RFC 3339 text or epoch seconds). An object or array in a `string` column
//!   is kept as its JSON text; a missing key is null.
//! - `pagination.kind`: `page` (a page-number parameter; ends at an empty or short page),
//!   `cursor` (the next cursor at the JSON pointer `next`; ends when it is null or absent),
//!   `link` (the `Link: <...>; rel="next"` header) or `none`.
//! - `incremental`: the parameter that gets the last committed watermark, and the column
//!   whose highest value becomes the next one (compared as numbers, or as text, which
//!   orders RFC 3339 times of one format).
//! - `retry`: `429` (waiting `Retry-After` seconds, at most `max_backoff_ms`) and `5xx`
//!   responses and connection failures are retried with exponential backoff and jitter, up
//!   to `attempts` tries; each retry is counted (`http_retries`, `http_429`, `http_5xx`).
//!   Any other `4xx` fails at once, naming the status and URL.
//!
//! The position after each page is the next page's URL, so a resumed run continues there.

use std::collections::BTreeMap;
use std::sync::Arc;

use weir_sdk::arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder};
use weir_sdk::extract::{Extracted, Extractor};
use weir_sdk::prelude::*;
use weir_sdk::serde_json::Value;

#[derive(Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    url: String,
    #[serde(default)]
    query: BTreeMap<String, String>,
    #[serde(default)]
    records: String,
    schema: BTreeMap<String, String>,
    #[serde(default)]
    paths: BTreeMap<String, String>,
    #[serde(default)]
    pagination: Pagination,
    incremental: Option<Incremental>,
    #[serde(default)]
    retry: Retry,
    /// The largest page body read, in MiB.
    #[serde(default = "default_page_mb")]
    max_page_mb: u64,
}

fn default_page_mb() -> u64 {
    64
}

#[derive(Deserialize, Default, Clone)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum Pagination {
    Page {
        #[serde(default = "page_param")]
        param: String,
        #[serde(default = "one")]
        start: u64,
        size_param: Option<String>,
        size: Option<u64>,
    },
    Cursor {
        param: String,
        next: String,
    },
    Link,
    #[default]
    None,
}

fn page_param() -> String {
    "page".into()
}

fn one() -> u64 {
    1
}

#[derive(Deserialize, Clone)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Incremental {
    param: String,
    column: String,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
// read by the wasm32 HTTP client only
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub struct Retry {
    attempts: u32,
    backoff_ms: u64,
    max_backoff_ms: u64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 5, backoff_ms: 200, max_backoff_ms: 10_000 }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Int,
    Float,
    Text,
    Bool,
    Date,
    Timestamp,
}

struct Column {
    name: String,
    pointer: Option<String>,
    kind: Kind,
}

pub struct HttpJson {
    schema: SchemaRef,
    columns: Vec<Column>,
    records: String,
    pagination: Pagination,
    retry: Retry,
    max_page_bytes: u64,
    /// The next page to fetch; `None` once the last page was read.
    next_url: Option<String>,
    page: u64,
    watermark_column: Option<usize>,
    watermark: Option<Value>,
}

/// What a position holds: the next page, and the watermark so far.
#[derive(weir_sdk::serde::Serialize, Deserialize)]
#[serde(crate = "weir_sdk::serde")]
struct Position {
    next_url: Option<String>,
    page: u64,
    watermark: Option<Value>,
}

impl Extractor for HttpJson {
    type Config = Config;

    fn open(c: Config, ctx: &Context, position: Option<&[u8]>, watermark: Option<&str>) -> Result<Self> {
        if c.schema.is_empty() {
            return Err(Error::config("schema: declare at least one column (name = \"type\")"));
        }
        let mut columns = Vec::new();
        let mut fields = Vec::new();
        for (name, ty) in &c.schema {
            let (kind, dt) = match ty.as_str() {
                "int64" => (Kind::Int, DataType::Int64),
                "float64" => (Kind::Float, DataType::Float64),
                "string" => (Kind::Text, DataType::Utf8),
                "bool" => (Kind::Bool, DataType::Boolean),
                "date" => (Kind::Date, DataType::Date32),
                "timestamp" => (
                    Kind::Timestamp,
                    DataType::Timestamp(weir_sdk::arrow_schema::TimeUnit::Microsecond, Some("+00:00".into())),
                ),
                other => {
                    return Err(Error::config(format!(
                        "schema.{name}: unknown type `{other}` (int64, float64, string, bool, date, timestamp)"
                    )))
                }
            };
            fields.push(Field::new(name, dt, true));
            columns.push(Column { name: name.clone(), pointer: c.paths.get(name).cloned(), kind });
        }
        if let Some(unknown) = c.paths.keys().find(|k| !c.schema.contains_key(*k)) {
            return Err(Error::config(format!("paths.{unknown}: not a column of `schema`")));
        }
        let watermark_column =
            match &c.incremental {
                Some(inc) => Some(columns.iter().position(|col| col.name == inc.column).ok_or_else(|| {
                    Error::config(format!("incremental.column: `{}` is not in `schema`", inc.column))
                })?),
                None => None,
            };
        if c.retry.attempts == 0 {
            return Err(Error::config("retry.attempts: at least 1 (the first try)"));
        }
        let (next_url, page, watermark) = match position {
            Some(bytes) => {
                let p: Position = weir_sdk::serde_json::from_slice(bytes)
                    .map_err(|e| Error::internal(format!("the checkpointed position is unreadable: {e}")))?;
                (p.next_url, p.page, p.watermark)
            }
            None => {
                let base = c.url.replace("{partition}", ctx.partition.as_deref().unwrap_or(""));
                split_url(&base).map_err(|e| Error::config(format!("url: {e}")))?;
                let mut params: Vec<(String, String)> = c.query.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                if let (Some(inc), Some(w)) = (&c.incremental, watermark) {
                    params.push((inc.param.clone(), w.to_string()));
                }
                let start = match &c.pagination {
                    Pagination::Page { param, start, size_param, size } => {
                        if let (Some(sp), Some(n)) = (size_param, size) {
                            params.push((sp.clone(), n.to_string()));
                        }
                        params.push((param.clone(), start.to_string()));
                        *start
                    }
                    _ => 0,
                };
                let prior = watermark.map(|w| Value::String(w.to_string()));
                (Some(with_params(&base, &params)), start, prior)
            }
        };
        Ok(HttpJson {
            schema: Arc::new(Schema::new(fields)),
            columns,
            records: c.records,
            pagination: c.pagination,
            retry: c.retry,
            max_page_bytes: c.max_page_mb.max(1) << 20,
            next_url,
            page,
            watermark_column,
            watermark,
        })
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn next(&mut self) -> Result<Option<Extracted>> {
        let Some(url) = self.next_url.clone() else { return Ok(None) };
        let page = http::get(&url, self.retry, self.max_page_bytes)?;
        let body: Value = weir_sdk::serde_json::from_slice(&page.body)
            .map_err(|e| Error::internal(format!("GET {url}: the response is not JSON: {e}")))?;
        let records = body
            .pointer(&self.records)
            .and_then(Value::as_array)
            .ok_or_else(|| Error::internal(format!("GET {url}: no array at `{}` in the response", self.records)))?;
        let batch = self.batch(records, &url)?;
        self.next_url = match &self.pagination {
            Pagination::Page { param, size, .. } => {
                let short = size.is_some_and(|n| (records.len() as u64) < n);
                if records.is_empty() || short {
                    None
                } else {
                    self.page += 1;
                    Some(replace_param(&url, param, &self.page.to_string()))
                }
            }
            Pagination::Cursor { param, next } => match body.pointer(next) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.is_empty() => None,
                Some(Value::String(s)) => Some(replace_param(&url, param, s)),
                Some(v) => Some(replace_param(&url, param, &v.to_string())),
            },
            Pagination::Link => match page.link_next {
                Some(next) => Some(resolve(&url, &next)?),
                None => None,
            },
            Pagination::None => None,
        };
        let position = Position { next_url: self.next_url.clone(), page: self.page, watermark: self.watermark.clone() };
        let position = weir_sdk::serde_json::to_vec(&position).map_err(|e| Error::internal(e.to_string()))?;
        let watermark = self.watermark.as_ref().map(|w| match w {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        Ok(Some(Extracted { batch, position, watermark }))
    }
}

impl HttpJson {
    fn batch(&mut self, records: &[Value], url: &str) -> Result<RecordBatch> {
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        for (ci, col) in self.columns.iter().enumerate() {
            let values: Vec<Option<&Value>> = records
                .iter()
                .map(|r| {
                    match &col.pointer {
                        Some(p) => r.pointer(p),
                        None => r.get(&col.name),
                    }
                    .filter(|v| !v.is_null())
                })
                .collect();
            let bad = |row: usize, v: &Value| {
                Error::internal(format!(
                    "GET {url}: record {row}: column `{}`: cannot read {v} as {}",
                    col.name,
                    self.schema.field(ci).data_type()
                ))
            };
            let array: ArrayRef = match col.kind {
                Kind::Int => {
                    let mut b = Int64Builder::with_capacity(values.len());
                    for (row, v) in values.iter().enumerate() {
                        b.append_option(match v {
                            None => None,
                            Some(Value::Number(n)) => Some(n.as_i64().ok_or_else(|| bad(row, v.unwrap()))?),
                            Some(Value::String(s)) => Some(s.trim().parse().map_err(|_| bad(row, v.unwrap()))?),
                            Some(other) => return Err(bad(row, other)),
                        });
                    }
                    Arc::new(b.finish())
                }
                Kind::Float => {
                    let mut b = Float64Builder::with_capacity(values.len());
                    for (row, v) in values.iter().enumerate() {
                        b.append_option(match v {
                            None => None,
                            Some(Value::Number(n)) => n.as_f64(),
                            Some(Value::String(s)) => Some(s.trim().parse().map_err(|_| bad(row, v.unwrap()))?),
                            Some(other) => return Err(bad(row, other)),
                        });
                    }
                    Arc::new(b.finish())
                }
                Kind::Bool => {
                    let mut b = BooleanBuilder::with_capacity(values.len());
                    for (row, v) in values.iter().enumerate() {
                        b.append_option(match v {
                            None => None,
                            Some(Value::Bool(x)) => Some(*x),
                            Some(other) => return Err(bad(row, other)),
                        });
                    }
                    Arc::new(b.finish())
                }
                Kind::Text | Kind::Date | Kind::Timestamp => {
                    let mut b = StringBuilder::with_capacity(values.len(), 16 * values.len());
                    for v in &values {
                        match v {
                            None => b.append_null(),
                            Some(Value::String(s)) => b.append_value(s),
                            Some(other) => b.append_value(other.to_string()),
                        }
                    }
                    let text: ArrayRef = Arc::new(b.finish());
                    if col.kind == Kind::Text {
                        text
                    } else {
                        self.typed_text(&text, ci, &values, url)?
                    }
                }
            };
            arrays.push(array);
        }
        if let Some(wc) = self.watermark_column {
            let col = &self.columns[wc];
            for r in records {
                let v = match &col.pointer {
                    Some(p) => r.pointer(p),
                    None => r.get(&col.name),
                };
                if let Some(v) = v.filter(|v| !v.is_null()) {
                    if self.watermark.as_ref().is_none_or(|w| later(v, w)) {
                        self.watermark = Some(v.clone());
                    }
                }
            }
        }
        Ok(RecordBatch::try_new(self.schema.clone(), arrays)?)
    }

    /// Dates and timestamps: text cast by Arrow; epoch seconds for timestamps.
    fn typed_text(&self, text: &ArrayRef, ci: usize, values: &[Option<&Value>], url: &str) -> Result<ArrayRef> {
        let dt = self.schema.field(ci).data_type().clone();
        if self.columns[ci].kind == Kind::Timestamp && values.iter().any(|v| matches!(v, Some(Value::Number(_)))) {
            let mut b = Int64Builder::with_capacity(values.len());
            for (row, v) in values.iter().enumerate() {
                b.append_option(match v {
                    None => None,
                    Some(Value::Number(n)) => Some(
                        n.as_f64()
                            .map(|s| (s * 1e6) as i64)
                            .ok_or_else(|| Error::internal(format!("GET {url}: record {row}: bad epoch {n}")))?,
                    ),
                    Some(other) => {
                        return Err(Error::internal(format!(
                            "GET {url}: record {row}: column `{}`: mixes epoch numbers and {other}",
                            self.columns[ci].name
                        )))
                    }
                });
            }
            let micros = b.finish().with_data_type(weir_sdk::arrow_schema::DataType::Int64);
            let ts = weir_sdk::arrow_array::TimestampMicrosecondArray::from(micros.into_data())
                .with_timezone("+00:00".to_string());
            return Ok(Arc::new(ts));
        }
        let opts = weir_sdk::arrow_cast::CastOptions { safe: false, ..Default::default() };
        weir_sdk::arrow_cast::cast_with_options(text, &dt, &opts).map_err(|e| {
            let row = (0..text.len())
                .find(|&i| weir_sdk::arrow_cast::cast_with_options(&text.slice(i, 1), &dt, &opts).is_err())
                .unwrap_or(0);
            Error::internal(format!("GET {url}: record {row}: column `{}`: {e}", self.columns[ci].name))
        })
    }
}

/// Whether watermark value `v` is past `w`: numbers as numbers, anything else as text.
fn later(v: &Value, w: &Value) -> bool {
    match (v.as_f64(), w.as_f64()) {
        (Some(a), Some(b)) => a > b,
        _ => {
            let text = |x: &Value| match x {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            text(v) > text(w)
        }
    }
}

/// `scheme://authority` and the rest (`/path?query`) of an absolute http(s) URL.
fn split_url(url: &str) -> std::result::Result<(&str, &str, &str), String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("`{url}` is not an absolute http(s) URL"))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("`{url}`: only http and https are supported"));
    }
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok((scheme, authority, path))
}

/// Percent-encode a query component.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn with_params(url: &str, params: &[(String, String)]) -> String {
    let mut out = url.to_string();
    for (k, v) in params {
        out.push(if out.contains('?') { '&' } else { '?' });
        out.push_str(&encode(k));
        out.push('=');
        out.push_str(&encode(v));
    }
    out
}

/// `url` with query parameter `name` set to `value` (added when absent).
fn replace_param(url: &str, name: &str, value: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let key = encode(name);
    let mut parts: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(key.as_str()))
        .map(String::from)
        .collect();
    parts.push(format!("{key}={}", encode(value)));
    format!("{base}?{}", parts.join("&"))
}

/// A `Link` target, absolute or relative to the page it came from.
fn resolve(page: &str, target: &str) -> Result<String> {
    if target.contains("://") {
        split_url(target).map_err(Error::internal)?;
        return Ok(target.to_string());
    }
    let (scheme, authority, _) = split_url(page).map_err(Error::internal)?;
    if target.starts_with('/') {
        Ok(format!("{scheme}://{authority}{target}"))
    } else {
        Err(Error::internal(format!("GET {page}: a relative Link target `{target}` that is not a path")))
    }
}

/// The `rel="next"` target of a `Link` header value.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
fn link_next(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| target.to_string())
    })
}

/// A response the extractor read.
struct Page {
    body: Vec<u8>,
    link_next: Option<String>,
}

#[cfg(target_arch = "wasm32")]
mod http {
    use super::{link_next, split_url, Page, Retry};
    use wasi::http::outgoing_handler;
    use wasi::http::types::{ErrorCode, Fields, Method, OutgoingRequest, Scheme};
    use wasi::io::streams::StreamError;
    use weir_sdk::prelude::*;

    enum Outcome {
        Done(Page),
        /// Worth another try, after at least this many milliseconds (`Retry-After`).
        Again(String, Option<u64>),
    }

    pub(super) fn get(url: &str, retry: Retry, max_bytes: u64) -> Result<Page> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (why, after) = match once(url, max_bytes)? {
                Outcome::Done(p) => return Ok(p),
                Outcome::Again(why, after) => (why, after),
            };
            if attempt >= retry.attempts {
                return Err(Error::internal(format!(
                    "GET {url}: {why}; gave up after {attempt} tries (retry.attempts)"
                )));
            }
            host::counter_add("http_retries", 1);
            let backoff = retry.backoff_ms.saturating_mul(1 << (attempt - 1).min(20)).min(retry.max_backoff_ms);
            let wait = match after {
                Some(ms) if ms > retry.max_backoff_ms => {
                    return Err(Error::internal(format!(
                        "GET {url}: {why}; the server asks to wait {} s, longer than retry.max_backoff_ms",
                        ms / 1000
                    )))
                }
                Some(ms) => ms,
                // full jitter: anywhere up to the backoff
                None => wasi::random::random::get_random_u64() % backoff.max(1) + 1,
            };
            host::log(Level::Info, &format!("GET {url}: {why}; retrying in {wait} ms (try {})", attempt + 1));
            wasi::clocks::monotonic_clock::subscribe_duration(wait * 1_000_000).block();
        }
    }

    fn once(url: &str, max_bytes: u64) -> Result<Outcome> {
        let (scheme, authority, path) = split_url(url).map_err(Error::internal)?;
        let headers = Fields::new();
        let _ = headers.append("accept", b"application/json");
        let req = OutgoingRequest::new(headers);
        let _ = req.set_method(&Method::Get);
        let _ = req.set_scheme(Some(&if scheme == "https" { Scheme::Https } else { Scheme::Http }));
        req.set_authority(Some(authority)).map_err(|_| Error::internal(format!("GET {url}: bad host")))?;
        let path = if path.is_empty() { "/".to_string() } else { path.to_string() };
        req.set_path_with_query(Some(&path)).map_err(|_| Error::internal(format!("GET {url}: bad path")))?;
        let response = match outgoing_handler::handle(req, None) {
            Ok(future) => {
                future.subscribe().block();
                match future.get() {
                    Some(Ok(Ok(r))) => r,
                    Some(Ok(Err(e))) => return failed(url, e),
                    _ => return Err(Error::internal(format!("GET {url}: no response"))),
                }
            }
            Err(e) => return failed(url, e),
        };
        let status = response.status();
        let header = |name: &str| response.headers().get(name).first().map(|v| String::from_utf8_lossy(v).into_owned());
        if status == 429 {
            host::counter_add("http_429", 1);
            let after = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(|s| s * 1000);
            return Ok(Outcome::Again("429 Too Many Requests".into(), after));
        }
        if status >= 500 {
            host::counter_add("http_5xx", 1);
            return Ok(Outcome::Again(format!("server error {status}"), None));
        }
        if !(200..300).contains(&status) {
            return Err(Error::internal(format!("GET {url}: HTTP {status}; not retried (only 429 and 5xx are)")));
        }
        let link = header("link").and_then(|l| link_next(&l));
        let body = response.consume().map_err(|_| Error::internal(format!("GET {url}: no body")))?;
        let stream = body.stream().map_err(|_| Error::internal(format!("GET {url}: no body stream")))?;
        let mut bytes = Vec::new();
        loop {
            match stream.blocking_read(1 << 16) {
                Ok(chunk) => {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() as u64 > max_bytes {
                        return Err(Error::internal(format!(
                            "GET {url}: the response is larger than max_page_mb ({} MiB)",
                            max_bytes >> 20
                        )));
                    }
                }
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Ok(Outcome::Again(format!("reading the body failed: {}", e.to_debug_string()), None))
                }
            }
        }
        Ok(Outcome::Done(Page { body: bytes, link_next: link }))
    }

    fn failed(url: &str, e: ErrorCode) -> Result<Outcome> {
        match e {
            ErrorCode::HttpRequestDenied => Err(Error::internal(format!(
                "GET {url}: the host refused the request: its origin is not in this plugin's allowed_hosts"
            ))),
            ErrorCode::ConnectionRefused
            | ErrorCode::ConnectionTerminated
            | ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::HttpResponseIncomplete
            | ErrorCode::HttpResponseTimeout => Ok(Outcome::Again(format!("{e:?}"), None)),
            other => Err(Error::internal(format!("GET {url}: {other:?}"))),
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod http {
    use super::{Page, Retry};
    use weir_sdk::prelude::*;

    pub(super) fn get(url: &str, _retry: Retry, _max_bytes: u64) -> Result<Page> {
        Err(Error::internal(format!("GET {url}: HTTP needs the wasm32-wasip2 build")))
    }
}

weir_sdk::export_extractor!(HttpJson);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_params() {
        let h = r#"<https://a.example/x?page=2>; rel="next", <https://a.example/x?page=9>; rel="last""#;
        assert_eq!(link_next(h).as_deref(), Some("https://a.example/x?page=2"));
        assert_eq!(link_next(r#"<https://a.example/x?page=9>; rel="last""#), None);
        assert_eq!(replace_param("http://h/p?a=1&page=3", "page", "4"), "http://h/p?a=1&page=4");
        assert_eq!(replace_param("http://h/p", "c", "a b&c"), "http://h/p?c=a%20b%26c");
        assert_eq!(resolve("http://h:8/p?x", "/q?page=2").unwrap(), "http://h:8/q?page=2");
        assert!(split_url("ftp://h/x").is_err());
        assert!(later(&Value::from(10), &Value::from(9)));
        assert!(later(&Value::from("2026-01-02T00:00:00Z"), &Value::from("2026-01-01T23:00:00Z")));
    }
}
