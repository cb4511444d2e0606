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

use std::collections::HashMap;

use weir_sdk::arrow_array::BooleanArray;
use weir_sdk::arrow_select::{filter::filter_record_batch, interleave::interleave_record_batch};
use weir_sdk::intset::IntSet;
use weir_sdk::ipc;
use weir_sdk::keys::{encode_key, scalar_at, supported, Scalar};
use weir_sdk::prelude::*;
use weir_sdk::state::{Reader, Writer};

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
    keys: Vec<usize>,
    order_by: Option<usize>,
    keep: Keep,
    schema: SchemaRef,
    seen: HashMap<Vec<u8>, usize>,
    /// keep = last: winners in first-seen order, as (batch, row, order value).
    winners: Vec<(usize, usize, Scalar)>,
    held: Vec<RecordBatch>,
    buf: Vec<u8>,
    /// keep = first on one int64 key: the keys seen, without encoding rows (`seen` stays empty).
    int_key: bool,
    seen_int: IntSet,
    seen_null: bool,
    /// The key columns' input positions, ascending and each once: the columns a row filter
    /// call receives.
    filter_columns: Vec<usize>,
    /// Where each key column (in `keys` order) is among `filter_columns`.
    filter_keys: Vec<usize>,
}

impl Dedup {
    /// keep = "first": for each row, whether its key is new (the key is then seen).
    fn first_seen(&mut self, key_cols: &[&ArrayRef]) -> Result<Vec<bool>> {
        let rows = key_cols.first().map_or(0, |c| c.len());
        let keep: Vec<bool> = if self.int_key {
            let ids = key_cols[0].as_primitive::<weir_sdk::arrow_array::types::Int64Type>();
            (0..rows)
                .map(|r| {
                    if ids.is_null(r) {
                        !std::mem::replace(&mut self.seen_null, true)
                    } else {
                        self.seen_int.insert(ids.value(r))
                    }
                })
                .collect()
        } else {
            let mut keep = Vec::with_capacity(rows);
            for row in 0..rows {
                encode_key(key_cols, row, &mut self.buf)?;
                let new = !self.seen.contains_key(&self.buf);
                if new {
                    self.seen.insert(self.buf.clone(), 0);
                }
                keep.push(new);
            }
            keep
        };
        let dropped = keep.iter().filter(|k| !**k).count();
        host::counter_add("duplicates_dropped", dropped as i64);
        Ok(keep)
    }
}

impl Transform for Dedup {
    type Config = Config;

    fn new(config: Config, input: &SchemaRef, _ctx: &Context) -> Result<Self> {
        if config.key.is_empty() {
            return Err(Error::config("key: name at least one column"));
        }
        let mut keys = Vec::new();
        for name in &config.key {
            let i = require_column(input, name, &[]).map_err(|e| Error::config(format!("key: {e}")))?;
            if !supported(input.field(i).data_type()) {
                return Err(Error::config(format!(
                    "key: column `{name}` has type {}, which cannot be a key",
                    input.field(i).data_type()
                )));
            }
            keys.push(i);
        }
        let order_by = match (config.keep, &config.order_by) {
            (Keep::Last, Some(name)) => {
                Some(require_column(input, name, &[]).map_err(|e| Error::config(format!("order_by: {e}")))?)
            }
            (Keep::Last, None) => None,
            (Keep::First, Some(_)) => {
                return Err(Error::config(
                    "order_by: only used with keep = \"last\" (keep = \"first\" keeps arrival order)",
                ))
            }
            (Keep::First, None) => None,
        };
        let mut filter_columns = keys.clone();
        filter_columns.sort_unstable();
        filter_columns.dedup();
        let filter_keys = keys.iter().map(|k| filter_columns.binary_search(k).unwrap_or_default()).collect();
        Ok(Dedup {
            keys,
            filter_columns,
            filter_keys,
            order_by,
            keep: config.keep,
            schema: input.clone(),
            seen: HashMap::new(),
            winners: Vec::new(),
            held: Vec::new(),
            buf: Vec::new(),
            int_key: false,
            seen_int: IntSet::new(),
            seen_null: false,
        })
        .map(|mut d: Dedup| {
            d.int_key =
                d.keep == Keep::First && d.keys.len() == 1 && input.field(d.keys[0]).data_type() == &DataType::Int64;
            d
        })
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
        let key_cols: Vec<&ArrayRef> = self.filter_keys.iter().map(|&k| batch.column(k)).collect();
        Ok(BooleanArray::from(self.first_seen(&key_cols)?))
    }

    fn process(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let key_cols: Vec<&ArrayRef> = self.keys.iter().map(|&i| batch.column(i)).collect();
        match self.keep {
            Keep::First => {
                let keep = self.first_seen(&key_cols)?;
                Ok(filter_record_batch(&batch, &BooleanArray::from(keep))?)
            }
            Keep::Last => {
                let b = self.held.len();
                for row in 0..batch.num_rows() {
                    encode_key(&key_cols, row, &mut self.buf)?;
                    let order = match self.order_by {
                        Some(i) => scalar_at(batch.column(i).as_ref(), row)?,
                        None => Scalar::Null,
                    };
                    match self.seen.get(&self.buf) {
                        Some(&w) => {
                            // later rows win ties: arrival order breaks them
                            if order.total_cmp(&self.winners[w].2).is_ge() {
                                self.winners[w] = (b, row, order);
                            }
                        }
                        None => {
                            self.seen.insert(self.buf.clone(), self.winners.len());
                            self.winners.push((b, row, order));
                        }
                    }
                }
                self.held.push(batch);
                Ok(RecordBatch::new_empty(self.schema.clone()))
            }
        }
    }

    fn snapshot(&self) -> Result<Option<Vec<u8>>> {
        let mut w = Writer::default();
        // int keys are written as encode_key would write them: tag 2 and the value; null as 0
        w.u64((self.seen.len() + self.seen_int.len() + usize::from(self.seen_null)) as u64);
        for (k, v) in &self.seen {
            w.bytes(k);
            w.u64(*v as u64);
        }
        for k in self.seen_int.iter() {
            let mut b = vec![2u8];
            b.extend_from_slice(&k.to_le_bytes());
            w.bytes(&b);
            w.u64(0);
        }
        if self.seen_null {
            w.bytes(&[0]);
            w.u64(0);
        }
        w.u64(self.winners.len() as u64);
        for (b, r, o) in &self.winners {
            w.u64(*b as u64);
            w.u64(*r as u64);
            w.scalar(o);
        }
        let held = if self.held.is_empty() { Vec::new() } else { ipc::encode(&self.schema, &self.held)? };
        w.bytes(&held);
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = Reader::new(state);
        self.seen.clear();
        self.seen_int = IntSet::new();
        self.seen_null = false;
        for _ in 0..r.u64()? {
            let k = r.bytes()?.to_vec();
            let v = r.u64()? as usize;
            match (self.int_key, k.as_slice()) {
                (true, [0]) => self.seen_null = true,
                (true, [2, rest @ ..]) if rest.len() == 8 => {
                    self.seen_int.insert(i64::from_le_bytes(rest.try_into().map_err(|_| Error::internal("bad key"))?));
                }
                _ => {
                    self.seen.insert(k, v);
                }
            }
        }
        self.winners.clear();
        for _ in 0..r.u64()? {
            let (b, row) = (r.u64()? as usize, r.u64()? as usize);
            self.winners.push((b, row, r.scalar()?));
        }
        let held = r.bytes()?;
        self.held = if held.is_empty() { Vec::new() } else { ipc::decode(held)?.1 };
        r.end()
    }

    fn finish(&mut self) -> Result<Option<RecordBatch>> {
        if self.keep == Keep::First || self.winners.is_empty() {
            return Ok(None);
        }
        let total: usize = self.held.iter().map(|b| b.num_rows()).sum();
        host::counter_add("duplicates_dropped", (total - self.winners.len()) as i64);
        let refs: Vec<&RecordBatch> = self.held.iter().collect();
        let indices: Vec<(usize, usize)> = self.winners.iter().map(|(b, r, _)| (*b, *r)).collect();
        let out = interleave_record_batch(&refs, &indices)?;
        self.held.clear();
        self.winners.clear();
        Ok(Some(out))
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
