//! Debezium change events (`format = "debezium"`): JSON lines of the standard envelope
//! (`{"payload": {"before", "after", "op", "source": {"lsn", "ts_ms"}, "ts_ms"}}`, or the
//! payload alone, as Kafka Connect's JSON converter writes it with or without schemas).
//!
//! Each event becomes one row: the row image (`after` for `c`, `u` and `r`; `before` for
//! `d`) in the declared columns, plus [`OP`] (`c`, `u`, `d` or `r`) and [`LSN`] (the
//! event's `source.lsn`, else `source.ts_ms`, else `ts_ms`): what a merge output orders a
//! key's events by (`sequence_by = "_lsn"`) and deletes by (`delete_when = { column = "_op",
//! value = "d" }`). A Kafka tombstone (a `null` line) is skipped. Debezium's integer
//! encodings of dates (days) and timestamps (microseconds) are read as such.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde_json::{Map, Value};

use crate::config::Source;
use crate::io::{Error, Result};

/// The operation column a Debezium source adds.
pub const OP: &str = "_op";
/// The ordering column a Debezium source adds: the event's log position.
pub const LSN: &str = "_lsn";

/// The declared columns, then [`OP`] and [`LSN`].
pub(super) fn schema(source: &Source) -> Result<SchemaRef> {
    if source.schema.is_empty() {
        return Err(Error::SourceInvalid {
            source_name: source.name.clone(),
            message: "a debezium source needs a `schema`: the columns of the table the events are about".into(),
        });
    }
    if let Some((n, _)) = source.schema.iter().find(|(n, _)| n == OP || n == LSN) {
        return Err(Error::SourceInvalid {
            source_name: source.name.clone(),
            message: format!("`{n}` is the column a debezium source adds itself; the schema names the table's columns"),
        });
    }
    let mut fields: Vec<Field> = source.schema.iter().map(|(n, t)| Field::new(n, t.clone(), true)).collect();
    fields.push(Field::new(OP, DataType::Utf8, false));
    fields.push(Field::new(LSN, DataType::Int64, false));
    Ok(Arc::new(Schema::new(fields)))
}

/// How one event line becomes a flat row line for the JSON-lines decoder.
pub(super) struct Envelope {
    /// Declared columns Debezium may send as integers: dates (days since 1970) and
    /// timestamps (microseconds since 1970), with whether they carry a time zone.
    dates: Vec<String>,
    timestamps: Vec<(String, bool)>,
}

impl Envelope {
    pub(super) fn new(schema: &Schema) -> Self {
        let mut dates = Vec::new();
        let mut timestamps = Vec::new();
        for f in schema.fields() {
            match f.data_type() {
                DataType::Date32 => dates.push(f.name().clone()),
                DataType::Timestamp(TimeUnit::Microsecond, tz) => timestamps.push((f.name().clone(), tz.is_some())),
                _ => {}
            }
        }
        Envelope { dates, timestamps }
    }

    /// The row `text` (one event) stands for, as a JSON object line; none for a tombstone.
    pub(super) fn row(&self, text: &str) -> std::result::Result<Option<String>, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let payload = match value {
            Value::Null => return Ok(None),
            Value::Object(mut o) if o.contains_key("payload") => o.remove("payload").unwrap_or(Value::Null),
            other => other,
        };
        let mut payload = match payload {
            Value::Null => return Ok(None),
            Value::Object(o) => o,
            _ => return Err("not a Debezium change event: each line must be a JSON object".into()),
        };
        let op = match payload.get("op") {
            Some(Value::String(s)) if matches!(s.as_str(), "c" | "u" | "d" | "r") => s.clone(),
            Some(Value::String(s)) if s == "t" => {
                return Err(
                    "a truncate event (op `t`): weir does not apply truncates; remove it or reload the table".into()
                )
            }
            Some(other) => return Err(format!("not a Debezium change event: `op` is {other}, not c, u, d or r")),
            None => return Err("not a Debezium change event: it has no `op` (c, u, d or r)".into()),
        };
        let lsn = payload
            .get("source")
            .and_then(|s| s.get("lsn").filter(|v| !v.is_null()).or_else(|| s.get("ts_ms")))
            .or_else(|| payload.get("ts_ms"))
            .and_then(Value::as_i64)
            .ok_or("the event has no `source.lsn`, `source.ts_ms` or `ts_ms` to order it by")?;
        let image = if op == "d" { "before" } else { "after" };
        let mut row = match payload.remove(image) {
            Some(Value::Object(o)) => o,
            _ if op == "d" => {
                return Err(
                    "a delete event without `before`: the table's REPLICA IDENTITY must cover the key columns".into()
                )
            }
            _ => return Err(format!("a `{op}` event without `after`")),
        };
        self.convert(&mut row);
        row.insert(OP.into(), Value::String(op));
        row.insert(LSN.into(), Value::from(lsn));
        Ok(Some(Value::Object(row).to_string()))
    }

    /// Debezium's integer dates and timestamps as the text the decoder reads.
    fn convert(&self, row: &mut Map<String, Value>) {
        for name in &self.dates {
            if let Some(days) = row.get(name).and_then(Value::as_i64) {
                let date = chrono::DateTime::from_timestamp(days.saturating_mul(86_400), 0).map(|d| d.date_naive());
                if let Some(d) = date {
                    row.insert(name.clone(), Value::String(d.format("%Y-%m-%d").to_string()));
                }
            }
        }
        for (name, zoned) in &self.timestamps {
            if let Some(us) = row.get(name).and_then(Value::as_i64) {
                if let Some(t) = chrono::DateTime::from_timestamp_micros(us) {
                    let text = if *zoned {
                        t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
                    } else {
                        t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
                    };
                    row.insert(name.clone(), Value::String(text));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope::new(&Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("d", DataType::Date32, true),
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        ]))
    }

    #[test]
    fn events_become_rows() {
        let e = envelope();
        let row = e
            .row(r#"{"payload":{"before":null,"after":{"id":1,"d":19723,"t":1704067200000000},"op":"c","source":{"lsn":42,"ts_ms":5},"ts_ms":6}}"#)
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(&row).unwrap();
        assert_eq!(v["id"], 1);
        assert_eq!(v["d"], "2024-01-01");
        assert_eq!(v["t"], "2024-01-01T00:00:00.000000Z");
        assert_eq!(v["_op"], "c");
        assert_eq!(v["_lsn"], 42);
        // a delete carries `before`; without an lsn the source's ts_ms orders it
        let row = e.row(r#"{"before":{"id":7},"after":null,"op":"d","source":{"ts_ms":99}}"#).unwrap().unwrap();
        let v: Value = serde_json::from_str(&row).unwrap();
        assert_eq!((v["id"].as_i64(), v["_op"].as_str(), v["_lsn"].as_i64()), (Some(7), Some("d"), Some(99)));
        // Kafka tombstones are skipped
        assert_eq!(e.row("null").unwrap(), None);
        assert_eq!(e.row(r#"{"schema":{},"payload":null}"#).unwrap(), None);
    }

    #[test]
    fn what_is_not_an_event_is_named() {
        let e = envelope();
        for (line, says) in [
            (r#"{"after":{"id":1}}"#, "no `op`"),
            (r#"{"op":"x","after":{}}"#, "not c, u, d or r"),
            (r#"{"op":"t","source":{"lsn":1}}"#, "truncate"),
            (r#"{"op":"d","source":{"lsn":1}}"#, "REPLICA IDENTITY"),
            (r#"{"op":"c","after":{"id":1}}"#, "to order it by"),
            (r#"[1,2]"#, "JSON object"),
            (r#"{"op":"c""#, "not valid JSON"),
        ] {
            let err = e.row(line).unwrap_err();
            assert!(err.contains(says), "{line}: {err}");
        }
    }
}
