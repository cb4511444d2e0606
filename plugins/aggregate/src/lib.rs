//! `aggregate`: group by key columns and compute count, sum, min, max and avg.
//!
//! ```toml
//! [steps.mart.transforms.config]
//! group_by = ["order_date", "country"]
//! aggregates = [
//!   { fn = "count", as = "order_count" },                 # rows per group
//!   { fn = "sum", column = "amount", as = "revenue" },
//!   { fn = "avg", column = "amount", as = "avg_order" },
//! ]
//! ```
//!
//! Nulls are skipped by sum/min/max/avg and by `count` with a column; `count` without a
//! column counts rows. Sums of integers are int64, of floats float64; avg is float64;
//! min and max keep the column's type. Groups are emitted at the end of input, in the
//! order they were first seen.

use std::collections::HashMap;
use std::sync::Arc;

use weir_sdk::intset::IntMap;
use weir_sdk::keys::{encode_key, scalar_at, supported, to_array, Scalar};
use weir_sdk::prelude::*;
use weir_sdk::state::{Reader, Writer};

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    group_by: Vec<String>,
    aggregates: Vec<AggSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct AggSpec {
    #[serde(rename = "fn")]
    func: Func,
    column: Option<String>,
    #[serde(rename = "as")]
    name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(crate = "weir_sdk::serde", rename_all = "snake_case")]
pub enum Func {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

struct Agg {
    func: Func,
    column: Option<usize>,
    out_type: DataType,
}

#[derive(Clone)]
enum Acc {
    Count(i64),
    SumInt(Option<i64>),
    SumFloat(Option<f64>),
    MinMax(Scalar),
    Avg(f64, i64),
}

pub struct Aggregate {
    keys: Vec<usize>,
    aggs: Vec<Agg>,
    schema: SchemaRef,
    groups: HashMap<Vec<u8>, usize>,
    key_values: Vec<Vec<Scalar>>,
    /// Accumulators of all groups, `aggs.len()` per group, group after group.
    accs: Vec<Acc>,
    buf: Vec<u8>,
    /// One int64 key: groups by value (and the null group), instead of `groups`.
    int_key: bool,
    int_index: IntMap,
    null_group: Option<usize>,
    /// The group of each row of the batch being processed (kept to reuse its allocation).
    gids: Vec<u32>,
}

impl Aggregate {
    fn new_group(&mut self, key: Vec<Scalar>) -> Result<usize> {
        let g = self.key_values.len();
        if g >= u32::MAX as usize - 1 {
            return Err(Error::internal("more than 4 billion groups"));
        }
        self.key_values.push(key);
        self.accs.extend(self.aggs.iter().map(initial));
        Ok(g)
    }
}

/// Fold one aggregate's column into the accumulators of the rows' groups. Float64 and
/// int64 columns without nulls, and row counts, take typed loops; the rest goes value by
/// value.
fn update_column(accs: &mut [Acc], n: usize, a: usize, func: Func, values: &Values, gids: &[u32]) -> Result<()> {
    let acc = |g: u32| g as usize * n + a;
    match values {
        Values::Rows => {
            for &g in gids {
                match &mut accs[acc(g)] {
                    Acc::Count(c) => *c += 1,
                    other => update(other, func, Scalar::Int(1)),
                }
            }
        }
        Values::F64(arr) if arr.null_count() == 0 => {
            for (&g, &v) in gids.iter().zip(arr.values().iter()) {
                match &mut accs[acc(g)] {
                    Acc::SumFloat(s) => *s = Some(s.unwrap_or(0.0) + v),
                    Acc::Avg(s, c) => {
                        *s += v;
                        *c += 1;
                    }
                    Acc::Count(c) => *c += 1,
                    other => update(other, func, Scalar::Float(v)),
                }
            }
        }
        Values::I64(arr) if arr.null_count() == 0 => {
            for (&g, &v) in gids.iter().zip(arr.values().iter()) {
                match &mut accs[acc(g)] {
                    Acc::SumInt(s) => *s = Some(s.unwrap_or(0).wrapping_add(v)),
                    Acc::Count(c) => *c += 1,
                    other => update(other, func, Scalar::Int(v)),
                }
            }
        }
        _ => {
            for (row, &g) in gids.iter().enumerate() {
                update(&mut accs[acc(g)], func, values.at(row)?);
            }
        }
    }
    Ok(())
}

/// Typed access to an aggregated column, so the hot loop does not match on types per row.
enum Values<'a> {
    Rows,
    F64(&'a weir_sdk::arrow_array::Float64Array),
    I64(&'a weir_sdk::arrow_array::Int64Array),
    Any(&'a dyn Array),
}

impl<'a> Values<'a> {
    fn of(col: Option<&'a ArrayRef>) -> Values<'a> {
        match col {
            None => Values::Rows,
            Some(c) => match c.data_type() {
                DataType::Float64 => Values::F64(c.as_primitive()),
                DataType::Int64 => Values::I64(c.as_primitive()),
                _ => Values::Any(c.as_ref()),
            },
        }
    }

    fn at(&self, row: usize) -> Result<Scalar> {
        Ok(match self {
            Values::Rows => Scalar::Int(1),
            Values::F64(a) if a.is_valid(row) => Scalar::Float(a.value(row)),
            Values::I64(a) if a.is_valid(row) => Scalar::Int(a.value(row)),
            Values::F64(_) | Values::I64(_) => Scalar::Null,
            Values::Any(a) => scalar_at(*a, row)?,
        })
    }
}

fn is_int(t: &DataType) -> bool {
    t.is_integer()
}

impl Transform for Aggregate {
    type Config = Config;

    fn new(config: Config, input: &SchemaRef, _ctx: &Context) -> Result<Self> {
        if config.aggregates.is_empty() {
            return Err(Error::config("aggregates: list at least one aggregate"));
        }
        let mut fields = Vec::new();
        let mut keys = Vec::new();
        for name in &config.group_by {
            let i = require_column(input, name, &[]).map_err(|e| Error::config(format!("group_by: {e}")))?;
            if !supported(input.field(i).data_type()) {
                return Err(Error::config(format!(
                    "group_by: column `{name}` has type {}, which cannot be grouped on",
                    input.field(i).data_type()
                )));
            }
            keys.push(i);
            fields.push(input.field(i).clone());
        }
        let mut aggs = Vec::new();
        for (n, spec) in config.aggregates.iter().enumerate() {
            let column = match &spec.column {
                Some(c) => {
                    Some(require_column(input, c, &[]).map_err(|e| Error::config(format!("aggregates[{n}]: {e}")))?)
                }
                None if spec.func == Func::Count => None,
                None => {
                    return Err(Error::config(
                        format!("aggregates[{n}]: `{:?}` needs a column", spec.func).to_lowercase(),
                    ))
                }
            };
            let in_type = column.map(|c| input.field(c).data_type().clone());
            let out_type = match (spec.func, &in_type) {
                (Func::Count, _) => DataType::Int64,
                (Func::Sum, Some(t)) if is_int(t) => DataType::Int64,
                (Func::Sum | Func::Avg, Some(t)) if t.is_numeric() => DataType::Float64,
                (Func::Min | Func::Max, Some(t)) if supported(t) => t.clone(),
                (f, t) => {
                    return Err(Error::config(format!(
                        "aggregates[{n}]: {f:?} does not apply to a column of type {}",
                        t.as_ref().map(|t| t.to_string()).unwrap_or_default()
                    )))
                }
            };
            if fields.iter().any(|f: &Field| f.name() == &spec.name) {
                return Err(Error::config(format!("aggregates[{n}].as: output column `{}` appears twice", spec.name)));
            }
            fields.push(Field::new(&spec.name, out_type.clone(), spec.func != Func::Count));
            aggs.push(Agg { func: spec.func, column, out_type });
        }
        Ok(Aggregate {
            keys,
            aggs,
            schema: Arc::new(Schema::new(fields)),
            groups: HashMap::new(),
            key_values: Vec::new(),
            accs: Vec::new(),
            buf: Vec::new(),
            int_key: false,
            int_index: IntMap::new(),
            null_group: None,
            gids: Vec::new(),
        })
        .map(|mut a: Aggregate| {
            a.int_key = a.keys.len() == 1 && input.field(a.keys[0]).data_type() == &DataType::Int64;
            a
        })
    }

    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn process(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let key_cols: Vec<&ArrayRef> = self.keys.iter().map(|&i| batch.column(i)).collect();
        let values: Vec<Values> = self.aggs.iter().map(|a| Values::of(a.column.map(|c| batch.column(c)))).collect();
        // Pass 1: the group of every row. One int64 key: groups are found by value in an
        // open-addressing table, never by encoding the row.
        let mut gids = std::mem::take(&mut self.gids);
        gids.clear();
        if self.int_key {
            let k = key_cols[0].as_primitive::<weir_sdk::arrow_array::types::Int64Type>();
            for row in 0..batch.num_rows() {
                let g = if k.is_null(row) {
                    match self.null_group {
                        Some(g) => g,
                        None => {
                            let g = self.new_group(vec![Scalar::Null])?;
                            self.null_group = Some(g);
                            g
                        }
                    }
                } else {
                    let key = k.value(row);
                    let (g, new) = self.int_index.get_or_insert(key, self.key_values.len() as u32);
                    if new {
                        self.new_group(vec![Scalar::Int(key)])?;
                    }
                    g as usize
                };
                gids.push(g as u32);
            }
        } else {
            for row in 0..batch.num_rows() {
                encode_key(&key_cols, row, &mut self.buf)?;
                let g = match self.groups.get(&self.buf) {
                    Some(&g) => g,
                    None => {
                        let kv = key_cols.iter().map(|c| scalar_at(c.as_ref(), row)).collect::<Result<Vec<_>>>()?;
                        let g = self.new_group(kv)?;
                        self.groups.insert(self.buf.clone(), g);
                        g
                    }
                };
                gids.push(g as u32);
            }
        }
        // Pass 2: each aggregate over the batch, typed where the column allows.
        let n = self.aggs.len();
        for (a, (agg, v)) in self.aggs.iter().zip(&values).enumerate() {
            update_column(&mut self.accs, n, a, agg.func, v, &gids)?;
        }
        self.gids = gids;
        Ok(RecordBatch::new_empty(self.schema.clone()))
    }

    fn snapshot(&self) -> Result<Option<Vec<u8>>> {
        let mut w = Writer::default();
        let mut key = Vec::new();
        w.u64(self.key_values.len() as u64);
        for (g, kv) in self.key_values.iter().enumerate() {
            let _ = g;
            weir_sdk::keys::encode_scalars(kv, &mut key);
            w.bytes(&key);
            w.u64(kv.len() as u64);
            kv.iter().for_each(|s| w.scalar(s));
            let n = self.aggs.len();
            w.u64(n as u64);
            for acc in &self.accs[g * n..(g + 1) * n] {
                match acc {
                    Acc::Count(c) => {
                        w.u64(0);
                        w.i64(*c);
                    }
                    Acc::SumInt(v) => {
                        w.u64(1);
                        w.scalar(&v.map(Scalar::Int).unwrap_or(Scalar::Null));
                    }
                    Acc::SumFloat(v) => {
                        w.u64(2);
                        w.scalar(&v.map(Scalar::Float).unwrap_or(Scalar::Null));
                    }
                    Acc::MinMax(v) => {
                        w.u64(3);
                        w.scalar(v);
                    }
                    Acc::Avg(sum, n) => {
                        w.u64(4);
                        w.f64(*sum);
                        w.i64(*n);
                    }
                }
            }
        }
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = Reader::new(state);
        self.groups.clear();
        self.key_values.clear();
        self.accs.clear();
        self.int_index = IntMap::new();
        self.null_group = None;
        for g in 0..r.u64()? as usize {
            let key = r.bytes()?.to_vec();
            if !self.int_key {
                self.groups.insert(key, g);
            }
            let kv = (0..r.u64()?).map(|_| r.scalar()).collect::<Result<Vec<_>>>()?;
            self.key_values.push(kv);
            let mut accs = Vec::new();
            for _ in 0..r.u64()? {
                accs.push(match r.u64()? {
                    0 => Acc::Count(r.i64()?),
                    1 => Acc::SumInt(match r.scalar()? {
                        Scalar::Int(i) => Some(i),
                        _ => None,
                    }),
                    2 => Acc::SumFloat(r.scalar()?.as_f64()),
                    3 => Acc::MinMax(r.scalar()?),
                    4 => Acc::Avg(r.f64()?, r.i64()?),
                    _ => return Err(Error::internal("checkpoint state is not from this plugin")),
                });
            }
            if accs.len() != self.aggs.len() {
                return Err(Error::internal("checkpoint state is not from this plugin"));
            }
            self.accs.extend(accs);
        }
        if self.int_key {
            for (g, kv) in self.key_values.iter().enumerate() {
                match kv.as_slice() {
                    [Scalar::Int(k)] => {
                        self.int_index.get_or_insert(*k, g as u32);
                    }
                    _ => self.null_group = Some(g),
                }
            }
        }
        r.end()
    }

    fn finish(&mut self) -> Result<Option<RecordBatch>> {
        if self.key_values.is_empty() && !self.keys.is_empty() {
            return Ok(None);
        }
        if self.key_values.is_empty() {
            // a global aggregate over empty input still has one row
            self.key_values.push(vec![]);
            self.accs.extend(self.aggs.iter().map(initial));
        }
        let mut columns = Vec::new();
        for k in 0..self.keys.len() {
            let values: Vec<Scalar> = self.key_values.iter().map(|kv| kv[k].clone()).collect();
            columns.push(to_array(self.schema.field(k).data_type(), &values)?);
        }
        for (n, a) in self.aggs.iter().enumerate() {
            let values: Vec<Scalar> = self.accs.chunks(self.aggs.len()).map(|accs| result(&accs[n])).collect();
            columns.push(to_array(&a.out_type, &values)?);
        }
        Ok(Some(RecordBatch::try_new(self.schema.clone(), columns)?))
    }
}

fn initial(a: &Agg) -> Acc {
    match a.func {
        Func::Count => Acc::Count(0),
        Func::Sum if a.out_type == DataType::Int64 => Acc::SumInt(None),
        Func::Sum => Acc::SumFloat(None),
        Func::Min | Func::Max => Acc::MinMax(Scalar::Null),
        Func::Avg => Acc::Avg(0.0, 0),
    }
}

fn update(acc: &mut Acc, func: Func, value: Scalar) {
    if value == Scalar::Null {
        return;
    }
    match acc {
        Acc::Count(c) => *c += 1,
        Acc::SumInt(s) => {
            if let Scalar::Int(v) = value {
                *s = Some(s.unwrap_or(0).wrapping_add(v));
            }
        }
        Acc::SumFloat(s) => *s = Some(s.unwrap_or(0.0) + value.as_f64().unwrap_or(0.0)),
        Acc::Avg(sum, n) => {
            *sum += value.as_f64().unwrap_or(0.0);
            *n += 1;
        }
        Acc::MinMax(cur) => {
            let better = match func {
                Func::Min => *cur == Scalar::Null || value.total_cmp(cur).is_lt(),
                _ => *cur == Scalar::Null || value.total_cmp(cur).is_gt(),
            };
            if better {
                *cur = value;
            }
        }
    }
}

fn result(acc: &Acc) -> Scalar {
    match acc {
        Acc::Count(c) => Scalar::Int(*c),
        Acc::SumInt(s) => s.map(Scalar::Int).unwrap_or(Scalar::Null),
        Acc::SumFloat(s) => s.map(Scalar::Float).unwrap_or(Scalar::Null),
        Acc::MinMax(v) => v.clone(),
        Acc::Avg(_, 0) => Scalar::Null,
        Acc::Avg(s, n) => Scalar::Float(s / *n as f64),
    }
}

weir_sdk::export_transform!(Aggregate);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::arrow_array::types::{Float64Type, Int64Type};
    use weir_sdk::arrow_array::{Float64Array, Int64Array};
    use weir_sdk::testing::Harness;

    fn batch(c: &[&str], amount: &[Option<f64>], qty: &[i64]) -> RecordBatch {
        RecordBatch::try_from_iter([
            ("country", Arc::new(StringArray::from(c.to_vec())) as ArrayRef),
            ("amount", Arc::new(Float64Array::from(amount.to_vec())) as ArrayRef),
            ("qty", Arc::new(Int64Array::from(qty.to_vec())) as ArrayRef),
        ])
        .unwrap()
    }

    const CFG: &str = r#"
        group_by = ["country"]
        aggregates = [
          { fn = "count", as = "n" },
          { fn = "sum", column = "amount", as = "revenue" },
          { fn = "sum", column = "qty", as = "qty" },
          { fn = "avg", column = "amount", as = "avg" },
          { fn = "min", column = "amount", as = "lo" },
          { fn = "max", column = "qty", as = "hi" },
        ]"#;

    #[test]
    fn groups_across_batches() {
        let a = batch(&["DE", "FR", "DE"], &[Some(10.0), Some(5.0), None], &[1, 2, 3]);
        let b = batch(&["FR", "DE"], &[Some(7.5), Some(2.0)], &[4, 5]);
        let mut h = Harness::<Aggregate>::new(CFG, &a.schema()).unwrap();
        assert!(h.process(&a).unwrap().iter().all(|b| b.num_rows() == 0));
        let out = h.run(&[b]).unwrap();
        assert_eq!(out.num_rows(), 2);
        let country: Vec<_> = out.column(0).as_string::<i32>().iter().flatten().collect();
        assert_eq!(country, ["DE", "FR"]);
        assert_eq!(out.column(1).as_primitive::<Int64Type>().values().to_vec(), [3, 2]);
        assert_eq!(out.column(2).as_primitive::<Float64Type>().values().to_vec(), [12.0, 12.5]);
        assert_eq!(out.column(3).as_primitive::<Int64Type>().values().to_vec(), [9, 6]);
        assert_eq!(out.column(4).as_primitive::<Float64Type>().value(0), 6.0);
        assert_eq!(out.column(5).as_primitive::<Float64Type>().value(1), 5.0);
        assert_eq!(out.column(6).as_primitive::<Int64Type>().value(0), 5);
    }

    #[test]
    fn snapshot_and_restore_continue_where_it_stopped() {
        let a = batch(&["DE", "FR", "DE"], &[Some(10.0), Some(5.0), None], &[1, 2, 3]);
        let b = batch(&["FR", "DE", "IT"], &[Some(7.5), Some(2.0), Some(1.0)], &[4, 5, 6]);
        let expected = Harness::<Aggregate>::new(CFG, &a.schema()).unwrap().run(&[a.clone(), b.clone()]).unwrap();
        let mut first = Harness::<Aggregate>::new(CFG, &a.schema()).unwrap();
        first.process(&a).unwrap();
        let state = first.snapshot().unwrap().unwrap();
        let mut second = Harness::<Aggregate>::new(CFG, &a.schema()).unwrap();
        second.restore(&state).unwrap();
        assert_eq!(second.run(&[b]).unwrap(), expected);
    }

    #[test]
    fn int64_keys_with_nulls_across_batches_and_checkpoints() {
        let mk = |ids: &[Option<i64>], v: &[f64]| {
            RecordBatch::try_from_iter([
                ("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef),
                ("amount", Arc::new(Float64Array::from(v.to_vec())) as ArrayRef),
            ])
            .unwrap()
        };
        let a = mk(&[Some(1), None, Some(2)], &[1.0, 2.0, 3.0]);
        let b = mk(&[Some(2), Some(1), None], &[4.0, 5.0, 6.0]);
        let cfg = "group_by = [\"id\"]\naggregates = [{ fn = \"sum\", column = \"amount\", as = \"s\" }, { fn = \"count\", as = \"n\" }]";
        let expected = Harness::<Aggregate>::new(cfg, &a.schema()).unwrap().run(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(expected.num_rows(), 3, "1, null and 2 are three groups");
        assert_eq!(expected.column(1).as_primitive::<Float64Type>().values().to_vec(), [6.0, 8.0, 7.0]);
        let mut first = Harness::<Aggregate>::new(cfg, &a.schema()).unwrap();
        first.process(&a).unwrap();
        let state = first.snapshot().unwrap().unwrap();
        let mut second = Harness::<Aggregate>::new(cfg, &a.schema()).unwrap();
        second.restore(&state).unwrap();
        assert_eq!(second.run(&[b]).unwrap(), expected);
    }

    #[test]
    fn config_errors() {
        let s = batch(&[], &[], &[]).schema();
        let e = Harness::<Aggregate>::new("aggregates = [{ fn = \"median\", column = \"qty\", as = \"m\" }]", &s)
            .err()
            .unwrap();
        assert!(e.to_string().contains("median"), "{e}");
        let e = Harness::<Aggregate>::new("aggregates = [{ fn = \"sum\", as = \"m\" }]", &s).err().unwrap();
        assert!(e.to_string().contains("needs a column"), "{e}");
        let e = Harness::<Aggregate>::new("aggregates = [{ fn = \"sum\", column = \"country\", as = \"m\" }]", &s)
            .err()
            .unwrap();
        assert!(e.to_string().contains("Utf8"), "{e}");
    }
}
