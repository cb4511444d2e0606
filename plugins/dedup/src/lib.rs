//! `dedup`: keep one row per natural key, across the whole input.
//!
//! ```toml
//! [steps.stg_orders.transforms.config]
//! key = ["order_id"]        # one or more columns
//! keep = "last"             # "first" (default) or "last"
//! order_by = "updated_at"   # with keep = "last": the row with the greatest value wins
//! ```
//!
//! `keep = "first"` streams: a row passes the first time its key is seen. `keep = "last"`
//! holds the input until the end (the winner of a key may come in the last batch) and emits
//! one row per key, in the order keys were first seen. Ties on `order_by` go to the later row.
//!
//! The keys seen (and with `keep = "last"`, the winning rows) are kept by the host
//! ([`weir_sdk::keyed`]), not in the plugin's memory: they grow past its memory cap (a
//! table spills to disk past the plugin's `state_mb`), and a checkpoint records only what
//! changed since the last one, without a copy through the plugin.

use weir_sdk::arrow_array::BooleanArray;
use weir_sdk::arrow_select::filter::filter_record_batch;
use weir_sdk::keyed::{more_output, Combine, KeyedState};
use weir_sdk::keys::supported;
use weir_sdk::prelude::*;
use weir_sdk::state::{Reader, Writer};

/// Rows one `finish` call hands back (keep = "last").
const SCAN_ROWS: u32 = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    key: Vec<String>,
    #[serde(default)]
    keep: Keep,
    order_by: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(crate = "weir_sdk::serde", rename_all = "snake_case")]
pub enum Keep {
    #[default]
    First,
    Last,
}

pub struct Dedup {
    keep: Keep,
    schema: SchemaRef,
    /// The key columns' input positions, ascending and each once: the columns a row filter
    /// call receives.
    filter_columns: Vec<usize>,
    /// keep = "first": the keys seen, a set over the filter columns.
    seen: Option<KeyedState>,
    /// keep = "last": every column, the last (or greatest-ordered) row per key.
    winners: Option<KeyedState>,
    /// Key columns ahead of the values in what `winners` scans back.
    key_count: usize,
    rows_in: u64,
    rows_out: u64,
}

impl Dedup {
    /// keep = "first": for each row of `keys` (the filter columns), whether its key is new.
    fn first_seen(&mut self, keys: &RecordBatch) -> Result<BooleanArray> {
        let seen = self.seen.as_ref().ok_or_else(|| Error::internal("keep = first without its set"))?;
        let fresh = seen.insert_new(keys)?;
        let dropped = fresh.iter().filter(|k| !**k).count();
        host::counter_add("duplicates_dropped", dropped as i64);
        Ok(BooleanArray::from(fresh))
    }
}

impl Transform for Dedup {
    type Config = Config;

    fn new(config: Config, input: &SchemaRef, _ctx: &Context) -> Result<Self> {
        if config.key.is_empty() {
            return Err(Error::config("key: name at least one column"));
        }
        let mut keys = Vec::new();
        let mut key_names: Vec<&str> = Vec::new();
        for name in &config.key {
            let i = require_column(input, name, &[]).map_err(|e| Error::config(format!("key: {e}")))?;
            if !supported(input.field(i).data_type()) {
                return Err(Error::config(format!(
                    "key: column `{name}` has type {}, which cannot be a key",
                    input.field(i).data_type()
                )));
            }
            if !keys.contains(&i) {
                keys.push(i);
                key_names.push(name);
            }
        }
        let order_by = match (config.keep, &config.order_by) {
            (Keep::Last, Some(name)) => {
                require_column(input, name, &[]).map_err(|e| Error::config(format!("order_by: {e}")))?;
                Some(name.as_str())
            }
            (Keep::First, Some(_)) => {
                return Err(Error::config(
                    "order_by: only used with keep = \"last\" (keep = \"first\" keeps arrival order)",
                ))
            }
            (_, None) => None,
        };
        let mut filter_columns = keys.clone();
        filter_columns.sort_unstable();
        let mut d = Dedup {
            keep: config.keep,
            schema: input.clone(),
            filter_columns,
            seen: None,
            winners: None,
            key_count: key_names.len(),
            rows_in: 0,
            rows_out: 0,
        };
        match config.keep {
            Keep::First => {
                let projected = std::sync::Arc::new(input.project(&d.filter_columns)?);
                d.seen = Some(KeyedState::set("seen", &key_names, &projected)?);
            }
            Keep::Last => {
                let values: Vec<(&str, Combine)> =
                    input.fields().iter().map(|f| (f.name().as_str(), Combine::Last)).collect();
                d.winners = Some(KeyedState::table("winners", &key_names, &values, order_by, input)?);
            }
        }
        Ok(d)
    }

    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// keep = "first" only keeps or drops rows, deciding from the key: it is a row filter, so
    /// only the key columns cross into the sandbox and the host drops the rows.
    fn filter_columns(&self) -> Option<Vec<String>> {
        (self.keep == Keep::First)
            .then(|| self.filter_columns.iter().map(|&i| self.schema.field(i).name().clone()).collect())
    }

    fn keep(&mut self, batch: &RecordBatch) -> Result<BooleanArray> {
        // the batch holds the key columns only, in input order
        self.first_seen(batch)
    }

    fn process(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        self.rows_in += batch.num_rows() as u64;
        match self.keep {
            Keep::First => {
                let keep = self.first_seen(&batch.project(&self.filter_columns)?)?;
                Ok(filter_record_batch(&batch, &keep)?)
            }
            Keep::Last => {
                if let Some(w) = &self.winners {
                    w.merge(&batch)?;
                }
                Ok(RecordBatch::new_empty(self.schema.clone()))
            }
        }
    }

    /// The host keeps the keys and rows; the plugin's own state is its row count.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>> {
        let mut w = Writer::default();
        w.u64(self.rows_in);
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = Reader::new(state);
        self.rows_in = r.u64()?;
        r.end()
    }

    /// keep = "last": the winners, a part per call.
    fn finish(&mut self) -> Result<Option<RecordBatch>> {
        let Some(w) = &self.winners else { return Ok(None) };
        match w.scan(SCAN_ROWS)? {
            Some(b) => {
                self.rows_out += b.num_rows() as u64;
                more_output();
                Ok(Some(RecordBatch::try_new(self.schema.clone(), b.columns()[self.key_count..].to_vec())?))
            }
            None => {
                host::counter_add("duplicates_dropped", self.rows_in.saturating_sub(self.rows_out) as i64);
                Ok(None)
            }
        }
    }
}

weir_sdk::export_transform!(Dedup);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use weir_sdk::arrow_array::Int64Array;
    use weir_sdk::testing::Harness;

    fn batch(ids: &[i64], vs: &[i64], tag: &[&str]) -> RecordBatch {
        RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef),
            ("v", Arc::new(Int64Array::from(vs.to_vec())) as ArrayRef),
            ("tag", Arc::new(StringArray::from(tag.to_vec())) as ArrayRef),
        ])
        .unwrap()
    }

    #[test]
    fn keep_first_across_batches() {
        let a = batch(&[1, 2, 1], &[10, 20, 11], &["a", "b", "c"]);
        let b = batch(&[2, 3], &[21, 30], &["d", "e"]);
        let mut h = Harness::<Dedup>::new("key = [\"id\"]", &a.schema()).unwrap();
        let out = h.run(&[a, b]).unwrap();
        let tags: Vec<_> = out.column(2).as_string::<i32>().iter().flatten().collect();
        assert_eq!(tags, ["a", "b", "e"]);
    }

    #[test]
    fn keep_last_by_order_column_across_batches() {
        let a = batch(&[1, 2, 1], &[10, 20, 5], &["a", "b", "c"]);
        let b = batch(&[2, 1, 3], &[21, 10, 30], &["d", "e", "f"]);
        let mut h = Harness::<Dedup>::new("key = [\"id\"]\nkeep = \"last\"\norder_by = \"v\"", &a.schema()).unwrap();
        let out = h.run(&[a, b]).unwrap();
        let tags: Vec<_> = out.column(2).as_string::<i32>().iter().flatten().collect();
        // id 1: v=10 twice (a, e) -> the later one wins; id 2: d (21); id 3: f
        assert_eq!(tags, ["e", "d", "f"]);
    }

    #[test]
    fn snapshot_and_restore_continue_where_it_stopped() {
        let a = batch(&[1, 2, 1], &[10, 20, 5], &["a", "b", "c"]);
        let b = batch(&[2, 1, 3], &[21, 10, 30], &["d", "e", "f"]);
        for cfg in ["key = [\"id\"]", "key = [\"id\"]\nkeep = \"last\"\norder_by = \"v\""] {
            let mut whole = Harness::<Dedup>::new(cfg, &a.schema()).unwrap();
            let expected = whole.run(&[a.clone(), b.clone()]).unwrap();
            // first half in one instance, checkpoint, second half in a fresh one
            let mut first = Harness::<Dedup>::new(cfg, &a.schema()).unwrap();
            let mut out = first.process(&a).unwrap();
            let state = first.snapshot().unwrap().expect("dedup keeps state");
            let mut second = Harness::<Dedup>::new(cfg, &a.schema()).unwrap();
            second.restore(&state).unwrap();
            out.extend(second.process(&b).unwrap());
            out.extend(second.finish().unwrap());
            let got = weir_sdk::arrow_select::concat::concat_batches(&expected.schema(), &out).unwrap();
            assert_eq!(got, expected, "{cfg}");
            assert!(second.restore(&state[..state.len() - 1]).is_err(), "a truncated state is an error");
        }
    }

    #[test]
    fn keep_first_is_a_row_filter_on_the_key_columns_in_any_order() {
        let a = batch(&[1, 1, 2, 1], &[1, 2, 1, 1], &["x", "x", "x", "y"]);
        // key columns named out of input order, and one named twice
        let dedup = |key: &[&str], keep| {
            let config = Config { key: key.iter().map(|k| k.to_string()).collect(), keep, order_by: None };
            Dedup::new(config, &a.schema(), &Context::default()).unwrap()
        };
        for (key, filter, kept) in [
            (vec!["tag", "id"], vec!["id", "tag"], vec![1, 2, 1]),
            (vec!["id", "id"], vec!["id"], vec![1, 2]),
            (vec!["v"], vec!["v"], vec![1, 1]),
        ] {
            let cfg = format!("key = {key:?}");
            let d = dedup(&key, Keep::First);
            assert_eq!(d.filter_columns(), Some(filter.iter().map(|s| s.to_string()).collect()), "{cfg}");
            // the harness sends only those columns and drops the rows as the host does
            let out = Harness::<Dedup>::new(&cfg, &a.schema()).unwrap().run(std::slice::from_ref(&a)).unwrap();
            assert_eq!(out.num_columns(), 3, "{cfg}: every column stays");
            let ids: Vec<i64> =
                out.column(0).as_primitive::<weir_sdk::arrow_array::types::Int64Type>().values().to_vec();
            assert_eq!(ids, kept, "{cfg}");
        }
        assert_eq!(dedup(&["id"], Keep::Last).filter_columns(), None, "keep = last emits at the end: not a filter");
    }

    #[test]
    fn composite_keys_and_config_errors() {
        let a = batch(&[1, 1, 1], &[1, 2, 1], &["a", "b", "c"]);
        let mut h = Harness::<Dedup>::new("key = [\"id\", \"v\"]", &a.schema()).unwrap();
        assert_eq!(h.run(std::slice::from_ref(&a)).unwrap().num_rows(), 2);
        let e = Harness::<Dedup>::new("key = [\"nope\"]", &a.schema()).err().unwrap();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = Harness::<Dedup>::new("key = [\"id\"]\norder_by = \"v\"", &a.schema()).err().unwrap();
        assert!(e.to_string().contains("order_by"), "{e}");
        let e = Harness::<Dedup>::new("key = [\"id\"]\nkeep = \"middle\"", &a.schema()).err().unwrap();
        assert!(e.to_string().contains("keep"), "{e}");
    }
}
