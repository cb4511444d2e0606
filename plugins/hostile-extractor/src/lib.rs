//! A hostile extractor, for tests only: `mode` picks the attack.
//!
//! | mode           | what `next` does                                                   |
//! |----------------|--------------------------------------------------------------------|
//! | `loop`         | spins forever (the deadline stops it)                              |
//! | `memory`       | grows its memory without end (the memory cap stops it)             |
//! | `schema_lie`   | returns a batch of another schema than it declared (the SDK says so)|
//! | `big_position` | returns a 2 MiB position                                           |
//! | `many_rows`    | returns 1000 rows in one call (over a small `max_output_rows`)     |
//! | `panic`        | panics                                                             |
//! | `http_flood`   | sends 1000 requests to `url` (not granted: refused, log capped)    |
//! | `env`          | reads the host's environment                                       |
//!
//! Any other mode returns three batches of one row, then ends.

use std::sync::Arc;

use weir_sdk::arrow_array::Int64Array;
use weir_sdk::extract::{Extracted, Extractor};
use weir_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    mode: String,
    #[serde(default)]
    url: String,
}

pub struct Hostile {
    mode: String,
    url: String,
    schema: SchemaRef,
    calls: i64,
}

impl Extractor for Hostile {
    type Config = Config;

    fn open(c: Config, _ctx: &Context, _position: Option<&[u8]>, _watermark: Option<&str>) -> Result<Self> {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        Ok(Hostile { mode: c.mode, url: c.url, schema, calls: 0 })
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn next(&mut self) -> Result<Option<Extracted>> {
        self.calls += 1;
        let rows = |n: i64| Int64Array::from_iter_values(0..n);
        let one = |schema: &SchemaRef, n: i64| RecordBatch::try_new(schema.clone(), vec![Arc::new(rows(n))]);
        match self.mode.as_str() {
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "panic" => panic!("hostile extractor panics on purpose"),
            "schema_lie" => {
                let other = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, true)]));
                let batch = RecordBatch::try_new(other, vec![Arc::new(StringArray::from(vec!["x"]))])?;
                Ok(Some(Extracted { batch, position: vec![], watermark: None }))
            }
            "big_position" => {
                Ok(Some(Extracted { batch: one(&self.schema, 1)?, position: vec![7u8; 2 << 20], watermark: None }))
            }
            "many_rows" => Ok(Some(Extracted { batch: one(&self.schema, 1000)?, position: vec![], watermark: None })),
            "env" => match std::env::var("HOME") {
                Ok(v) => Err(Error::internal(format!("SANDBOX ESCAPE: HOME={v}"))),
                Err(_) => Err(Error::internal("no HOME in the sandbox")),
            },
            "http_flood" => {
                let mut refused = 0;
                for _ in 0..1000 {
                    if flood_once(&self.url) {
                        refused += 1;
                    }
                }
                Err(Error::internal(format!("{refused} of 1000 requests refused")))
            }
            _ if self.calls > 3 => Ok(None),
            _ => Ok(Some(Extracted {
                batch: one(&self.schema, 1)?,
                position: self.calls.to_string().into_bytes(),
                watermark: Some(self.calls.to_string()),
            })),
        }
    }
}

/// One GET to `url`; whether the host refused it.
#[cfg(target_arch = "wasm32")]
fn flood_once(url: &str) -> bool {
    use wasi::http::types::{ErrorCode, Fields, Method, OutgoingRequest, Scheme};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let req = OutgoingRequest::new(Fields::new());
    let _ = req.set_method(&Method::Get);
    let _ = req.set_scheme(Some(&Scheme::Http));
    let _ = req.set_authority(Some(authority));
    let _ = req.set_path_with_query(Some(if path.is_empty() { "/" } else { path }));
    match wasi::http::outgoing_handler::handle(req, None) {
        Ok(f) => {
            f.subscribe().block();
            matches!(f.get(), Some(Ok(Err(ErrorCode::HttpRequestDenied))))
        }
        Err(ErrorCode::HttpRequestDenied) => true,
        Err(_) => false,
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn flood_once(_url: &str) -> bool {
    false
}

weir_sdk::export_extractor!(Hostile);
