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
//! flush_groups = 1048576    # groups held in the plugin before they go to the host (default)
//! ```
//!
//! Nulls are skipped by sum/min/max/avg and by `count` with a column; `count` without a
//! column counts rows. Sums of integers are int64, of floats float64; avg is float64;
//! min and max keep the column's type. Groups are emitted at the end of input, in the
//! order they were first seen.
//!
//! State layout: every group owns `width` consecutive 64-bit slots (its row count, and per
//! aggregated numeric column its non-null count and the sums asked for), so one row updates
//! one or two cache lines whatever the number of aggregates. Sums and averages of the same
//! column share their slots. Min and max keep a value per group in their own vector.
//!
//! Past [`FLUSH_GROUPS`] groups the groups are handed to the
//! host's keyed state ([`weir_sdk::keyed`]) as partial aggregates (slot sums, extremes) and
//! the plugin starts empty again: the host combines them (spilling to disk past the
//! plugin's `state_mb`) and checkpoints them without a copy through the plugin, and
//! `finish` reads them back in parts, groups in the order they were first seen. Float sums
//! combined from partials may differ from a single running sum in their last bits.

use std::collections::HashMap;
use std::sync::Arc;

use weir_sdk::arrow_array::types::{Float64Type, Int64Type};
use weir_sdk::arrow_array::{Float64Array, Int64Array};
use weir_sdk::intset::IntMap;
use weir_sdk::keyed::{more_output, Combine, KeyedState};
use weir_sdk::keys::{encode_key, scalar_at, supported, to_array, Scalar};
use weir_sdk::prelude::*;
use weir_sdk::state::{Reader, Writer};

/// Version tag of the checkpoint state; state of another layout is refused.
const STATE_VERSION: u64 = 3;
/// Groups held in the plugin's memory before they go to the host.
pub const FLUSH_GROUPS: usize = 1 << 20;
/// Groups one `finish` call hands back once they are in the host.
const SCAN_ROWS: u32 = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    group_by: Vec<String>,
    aggregates: Vec<AggSpec>,
    /// Groups held in the plugin's memory before they go to the host's keyed state
    /// (default [`FLUSH_GROUPS`]; fewer trade speed for plugin memory).
    flush_groups: Option<usize>,
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

/// Where an output column's value comes from.
#[derive(Debug, Clone, Copy)]
enum Out {
    /// Rows of the group (slot 0).
    Rows,
    /// Non-null values of a column: slot `n`.
    NonNull { n: usize },
    /// Wrapping int64 sum in slot `sum`, null when slot `n` is zero.
    SumInt { sum: usize, n: usize },
    /// Float sum in slot `sum`, null when slot `n` is zero.
    SumFloat { sum: usize, n: usize },
    /// Float sum / count, null when the count is zero.
    Avg { sum: usize, n: usize },
    /// Index into `Aggregate::extremes`.
    Extreme { index: usize },
}

/// The slots one input column feeds.
#[derive(Debug, Clone)]
struct Input {
    column: usize,
    n: usize,
    int_sum: Option<usize>,
    float_sum: Option<usize>,
}

/// The groups' keys: one int64 column found by value, or any key columns by encoded bytes.
enum Keys {
    Int { index: IntMap, keys: Vec<i64>, null_group: Option<u32> },
    Any { groups: HashMap<Vec<u8>, u32>, values: Vec<Vec<Scalar>>, buf: Vec<u8> },
}

impl Keys {
    fn len(&self) -> usize {
        match self {
            Keys::Int { keys, .. } => keys.len(),
            Keys::Any { values, .. } => values.len(),
        }
    }
}

pub struct Aggregate {
    keys: Vec<usize>,
    key_state: Keys,
    outs: Vec<Out>,
    out_types: Vec<DataType>,
    inputs: Vec<Input>,
    /// Min/max aggregates: (column, is min).
    extreme_cols: Vec<(usize, bool)>,
    schema: SchemaRef,
    /// `width` slots per group, group after group.
    slots: Vec<u64>,
    width: usize,
    /// Per min/max aggregate, the current value of every group.
    extremes: Vec<Vec<Scalar>>,
    /// The group of each row of the batch being processed (kept to reuse its allocation).
    gids: Vec<u32>,
    /// What the look-ahead loads read (kept so they are not optimised away).
    touched: u64,
    /// Which slots hold float sums (the others counts and int sums).
    float_slots: Vec<bool>,
    /// Each min/max aggregate's type.
    extreme_types: Vec<DataType>,
    /// The groups handed to the host, once there are any.
    partials: Option<KeyedState>,
    /// Groups held before they go to the host (a test lowers it).
    flush_groups: usize,
}

/// Typed access to an input column, so the hot loop does not match on types per row.
enum Col<'a> {
    F64(&'a Float64Array),
    I64(&'a Int64Array),
    Any(&'a dyn Array),
}

impl<'a> Col<'a> {
    fn of(c: &'a ArrayRef) -> Col<'a> {
        match c.data_type() {
            DataType::Float64 => Col::F64(c.as_primitive::<Float64Type>()),
            DataType::Int64 => Col::I64(c.as_primitive::<Int64Type>()),
            _ => Col::Any(c.as_ref()),
        }
    }
}

fn add_f64(slot: &mut u64, v: f64) {
    *slot = (f64::from_bits(*slot) + v).to_bits();
}

/// Fold row `row` of one input column into a group's slots.
#[inline(always)]
fn fold(state: &mut [u64], input: &Input, col: &Col, row: usize) -> Result<()> {
    match col {
        Col::F64(a) => {
            if a.is_valid(row) {
                state[input.n] += 1;
                if let Some(s) = input.float_sum {
                    add_f64(&mut state[s], a.value(row));
                }
            }
        }
        Col::I64(a) => {
            if a.is_valid(row) {
                let v = a.value(row);
                state[input.n] += 1;
                if let Some(s) = input.int_sum {
                    state[s] = (state[s] as i64).wrapping_add(v) as u64;
                }
                if let Some(s) = input.float_sum {
                    add_f64(&mut state[s], v as f64);
                }
            }
        }
        Col::Any(a) => {
            if a.is_valid(row) {
                state[input.n] += 1;
                if input.int_sum.is_some() || input.float_sum.is_some() {
                    let v = scalar_at(*a, row)?;
                    if let (Some(s), Scalar::Int(i)) = (input.int_sum, &v) {
                        state[s] = (state[s] as i64).wrapping_add(*i) as u64;
                    }
                    if let (Some(s), Some(f)) = (input.float_sum, v.as_f64()) {
                        add_f64(&mut state[s], f);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Room for one more group; returns its number.
fn new_group(slots: &mut Vec<u64>, width: usize, extremes: &mut [Vec<Scalar>]) -> Result<u32> {
    let g = slots.len() / width;
    if g >= u32::MAX as usize - 1 {
        return Err(Error::internal("more than 4 billion groups"));
    }
    slots.resize(slots.len() + width, 0);
    extremes.iter_mut().for_each(|e| e.push(Scalar::Null));
    Ok(g as u32)
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
        let mut width = 1; // slot 0: rows
        let mut inputs: Vec<Input> = Vec::new();
        let mut extreme_cols = Vec::new();
        let (mut outs, mut out_types) = (Vec::new(), Vec::new());
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
                (Func::Sum, Some(t)) if t.is_integer() => DataType::Int64,
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
            let mut slot = || {
                width += 1;
                width - 1
            };
            let mut input_of = |c: usize, slot: &mut dyn FnMut() -> usize| -> usize {
                match inputs.iter().position(|i| i.column == c) {
                    Some(i) => i,
                    None => {
                        inputs.push(Input { column: c, n: slot(), int_sum: None, float_sum: None });
                        inputs.len() - 1
                    }
                }
            };
            let out = match (spec.func, column) {
                (Func::Count, None) => Out::Rows,
                (Func::Min | Func::Max, Some(c)) => {
                    extreme_cols.push((c, spec.func == Func::Min));
                    Out::Extreme { index: extreme_cols.len() - 1 }
                }
                (func, Some(c)) => {
                    let i = input_of(c, &mut slot);
                    let n = inputs[i].n;
                    match func {
                        Func::Count => Out::NonNull { n },
                        Func::Sum if out_type == DataType::Int64 => {
                            let sum = *inputs[i].int_sum.get_or_insert_with(&mut slot);
                            Out::SumInt { sum, n }
                        }
                        Func::Sum => Out::SumFloat { sum: *inputs[i].float_sum.get_or_insert_with(&mut slot), n },
                        _ => Out::Avg { sum: *inputs[i].float_sum.get_or_insert_with(&mut slot), n },
                    }
                }
                (_, None) => unreachable!("checked above: only count goes without a column"),
            };
            outs.push(out);
            out_types.push(out_type);
        }
        let key_state = fresh_keys(&keys, input);
        let mut float_slots = vec![false; width];
        for i in &inputs {
            if let Some(s) = i.float_sum {
                float_slots[s] = true;
            }
        }
        let extreme_types = extreme_cols.iter().map(|&(c, _)| input.field(c).data_type().clone()).collect();
        Ok(Aggregate {
            float_slots,
            extreme_types,
            partials: None,
            flush_groups: config.flush_groups.unwrap_or(FLUSH_GROUPS).max(1),
            keys,
            key_state,
            outs,
            out_types,
            inputs,
            extremes: vec![Vec::new(); extreme_cols.len()],
            extreme_cols,
            schema: Arc::new(Schema::new(fields)),
            slots: Vec::new(),
            width,
            gids: Vec::new(),
            touched: 0,
        })
    }

    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn process(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let width = self.width;
        // Pass 1: the group of every row. One int64 key: groups are found by value in an
        // open-addressing table, never by encoding the row.
        let mut gids = std::mem::take(&mut self.gids);
        gids.clear();
        match &mut self.key_state {
            Keys::Int { index, keys, null_group } if batch.column(self.keys[0]).null_count() == 0 => {
                let k = batch.column(self.keys[0]).as_primitive::<Int64Type>();
                if keys.len() + k.len() >= u32::MAX as usize - 1 {
                    return Err(Error::internal("more than 4 billion groups"));
                }
                let (slots, extremes) = (&mut self.slots, &mut self.extremes);
                index.get_or_insert_all(k.values(), keys.len() as u32, &mut gids, |key| {
                    keys.push(key);
                    slots.resize(slots.len() + width, 0);
                    extremes.iter_mut().for_each(|e| e.push(Scalar::Null));
                });
            }
            Keys::Int { index, keys, null_group } => {
                let k = batch.column(self.keys[0]).as_primitive::<Int64Type>();
                for row in 0..batch.num_rows() {
                    let g = if k.is_null(row) {
                        match *null_group {
                            Some(g) => g,
                            None => {
                                let g = new_group(&mut self.slots, width, &mut self.extremes)?;
                                keys.push(0);
                                *null_group = Some(g);
                                g
                            }
                        }
                    } else {
                        let key = k.value(row);
                        let (g, new) = index.get_or_insert(key, keys.len() as u32);
                        if new {
                            new_group(&mut self.slots, width, &mut self.extremes)?;
                            keys.push(key);
                        }
                        g
                    };
                    gids.push(g);
                }
            }
            Keys::Any { groups, values, buf } => {
                let key_cols: Vec<&ArrayRef> = self.keys.iter().map(|&i| batch.column(i)).collect();
                for row in 0..batch.num_rows() {
                    encode_key(&key_cols, row, buf)?;
                    let g = match groups.get(buf.as_slice()) {
                        Some(&g) => g,
                        None => {
                            let kv = key_cols.iter().map(|c| scalar_at(c.as_ref(), row)).collect::<Result<Vec<_>>>()?;
                            let g = new_group(&mut self.slots, width, &mut self.extremes)?;
                            values.push(kv);
                            groups.insert(buf.clone(), g);
                            g
                        }
                    };
                    gids.push(g);
                }
            }
        }
        // Pass 2: one pass over the rows updating each row's group slots (one or two cache
        // lines), typed where the column allows.
        let cols: Vec<Col> = self.inputs.iter().map(|i| Col::of(batch.column(i.column))).collect();
        match (self.inputs.as_slice(), cols.as_slice()) {
            // The common shape (count, sum and avg of one float column without nulls) gets a
            // loop of its own.
            ([input], [Col::F64(a)]) if a.null_count() == 0 && input.float_sum.is_some() => {
                let (n, s) = (input.n, input.float_sum.unwrap_or_default());
                // 16 rows at a time: load their groups' first slots (misses overlap), then
                // update from warm cache lines; see IntMap::get_or_insert_all
                let mut touched = 0u64;
                for (g16, v16) in gids.chunks(32).zip(a.values().chunks(32)) {
                    for &g in g16 {
                        touched ^= self.slots[g as usize * width];
                    }
                    for (&g, &v) in g16.iter().zip(v16) {
                        let state = &mut self.slots[g as usize * width..][..width];
                        state[0] += 1;
                        state[n] += 1;
                        add_f64(&mut state[s], v);
                    }
                }
                self.touched ^= touched;
            }
            _ => {
                for (row, &g) in gids.iter().enumerate() {
                    let state = &mut self.slots[g as usize * width..][..width];
                    state[0] += 1;
                    for (input, col) in self.inputs.iter().zip(&cols) {
                        fold(state, input, col, row)?;
                    }
                }
            }
        }
        for (values, &(c, min)) in self.extremes.iter_mut().zip(&self.extreme_cols) {
            let col = batch.column(c);
            for (row, &g) in gids.iter().enumerate() {
                let v = scalar_at(col.as_ref(), row)?;
                let cur = &mut values[g as usize];
                if v != Scalar::Null && (*cur == Scalar::Null || v.total_cmp(cur) == min_or_max(min)) {
                    *cur = v;
                }
            }
        }
        self.gids = gids;
        if self.key_state.len() >= self.flush_groups {
            self.flush()?;
        }
        Ok(RecordBatch::new_empty(self.schema.clone()))
    }

    /// The groups held here (at most `flush_groups`: more went to the host, which
    /// checkpoints them itself), and whether some went to the host.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>> {
        let mut w = Writer::default();
        let groups = self.key_state.len();
        w.u64(STATE_VERSION);
        w.u64(u64::from(self.partials.is_some()));
        w.u64(self.width as u64);
        w.u64(self.extremes.len() as u64);
        w.u64(groups as u64);
        for g in 0..groups {
            match &self.key_state {
                Keys::Int { keys, null_group, .. } => {
                    w.u64(1);
                    w.scalar(&if *null_group == Some(g as u32) { Scalar::Null } else { Scalar::Int(keys[g]) });
                }
                Keys::Any { values, .. } => {
                    w.u64(values[g].len() as u64);
                    values[g].iter().for_each(|s| w.scalar(s));
                }
            }
        }
        let bytes: Vec<u8> = self.slots.iter().flat_map(|s| s.to_le_bytes()).collect();
        w.bytes(&bytes);
        for values in &self.extremes {
            values.iter().for_each(|s| w.scalar(s));
        }
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let foreign = || Error::internal("checkpoint state is not from this version of the plugin and config");
        let mut r = Reader::new(state);
        if r.u64()? != STATE_VERSION {
            return Err(foreign());
        }
        if r.u64()? == 1 {
            self.open_partials()?;
        }
        if r.u64()? != self.width as u64 || r.u64()? != self.extremes.len() as u64 {
            return Err(foreign());
        }
        let groups = r.u64()? as usize;
        if groups >= u32::MAX as usize - 1 {
            return Err(foreign());
        }
        let mut key_values = Vec::new();
        for _ in 0..groups {
            let n = r.u64()?;
            if n != self.keys.len() as u64 {
                return Err(foreign());
            }
            key_values.push((0..n).map(|_| r.scalar()).collect::<Result<Vec<_>>>()?);
        }
        let bytes = r.bytes()?;
        if bytes.len() != groups * self.width * 8 {
            return Err(foreign());
        }
        self.slots = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        for values in self.extremes.iter_mut() {
            *values = (0..groups).map(|_| r.scalar()).collect::<Result<Vec<_>>>()?;
        }
        match &mut self.key_state {
            Keys::Int { index, keys, null_group } => {
                (*index, *keys, *null_group) = (IntMap::new(), Vec::with_capacity(groups), None);
                for (g, kv) in key_values.into_iter().enumerate() {
                    match kv.as_slice() {
                        [Scalar::Int(k)] => {
                            index.get_or_insert(*k, g as u32);
                            keys.push(*k);
                        }
                        [Scalar::Null] if null_group.is_none() => {
                            *null_group = Some(g as u32);
                            keys.push(0);
                        }
                        _ => return Err(foreign()),
                    }
                }
            }
            Keys::Any { groups: index, values, .. } => {
                index.clear();
                let mut key = Vec::new();
                for (g, kv) in key_values.iter().enumerate() {
                    weir_sdk::keys::encode_scalars(kv, &mut key);
                    index.insert(key.clone(), g as u32);
                }
                *values = key_values;
            }
        }
        r.end()
    }

    fn finish(&mut self) -> Result<Option<RecordBatch>> {
        if self.partials.is_some() {
            return self.finish_part();
        }
        if self.key_state.len() == 0 {
            if !self.keys.is_empty() {
                return Ok(None);
            }
            // a global aggregate over empty input still has one row
            new_group(&mut self.slots, self.width, &mut self.extremes)?;
            if let Keys::Any { values, .. } = &mut self.key_state {
                values.push(vec![]);
            }
        }
        let keys = self.local_keys()?;
        Ok(Some(self.build(keys, &self.slots, &self.extremes)?))
    }
}

impl Aggregate {
    /// The key columns of the groups held here.
    fn local_keys(&self) -> Result<Vec<ArrayRef>> {
        let mut columns: Vec<ArrayRef> = Vec::new();
        match &self.key_state {
            Keys::Int { keys, null_group, .. } => {
                let null = null_group.map(|g| g as usize);
                columns.push(Arc::new(Int64Array::from_iter(
                    keys.iter().enumerate().map(|(g, k)| (Some(g) != null).then_some(*k)),
                )));
            }
            Keys::Any { values, .. } => {
                for k in 0..self.keys.len() {
                    let column: Vec<Scalar> = values.iter().map(|kv| kv[k].clone()).collect();
                    columns.push(to_array(self.schema.field(k).data_type(), &column)?);
                }
            }
        }
        Ok(columns)
    }

    /// The output rows of groups: their keys, `width` slots each, their extremes.
    fn build(&self, mut columns: Vec<ArrayRef>, slots: &[u64], extremes: &[Vec<Scalar>]) -> Result<RecordBatch> {
        let groups = slots.chunks_exact(self.width);
        let f = |s: u64| f64::from_bits(s);
        for (out, dtype) in self.outs.iter().zip(&self.out_types) {
            let array: ArrayRef = match *out {
                Out::Rows => Arc::new(Int64Array::from_iter_values(groups.clone().map(|g| g[0] as i64))),
                Out::NonNull { n } => Arc::new(Int64Array::from_iter_values(groups.clone().map(|g| g[n] as i64))),
                Out::SumInt { sum, n } => {
                    Arc::new(Int64Array::from_iter(groups.clone().map(|g| (g[n] > 0).then_some(g[sum] as i64))))
                }
                Out::SumFloat { sum, n } => {
                    Arc::new(Float64Array::from_iter(groups.clone().map(|g| (g[n] > 0).then_some(f(g[sum])))))
                }
                Out::Avg { sum, n } => Arc::new(Float64Array::from_iter(
                    groups.clone().map(|g| (g[n] > 0).then(|| f(g[sum]) / g[n] as f64)),
                )),
                Out::Extreme { index } => to_array(dtype, &extremes[index])?,
            };
            columns.push(array);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// The partial aggregates' columns: keys `k<i>`, slots `s<j>`, extremes `e<i>`.
    fn partial_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = (0..self.keys.len())
            .map(|k| Field::new(format!("k{k}"), self.schema.field(k).data_type().clone(), true))
            .collect();
        for (j, float) in self.float_slots.iter().enumerate() {
            fields.push(Field::new(format!("s{j}"), if *float { DataType::Float64 } else { DataType::Int64 }, true));
        }
        for (i, t) in self.extreme_types.iter().enumerate() {
            fields.push(Field::new(format!("e{i}"), t.clone(), true));
        }
        Arc::new(Schema::new(fields))
    }

    fn open_partials(&mut self) -> Result<()> {
        let schema = self.partial_schema();
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let nk = self.keys.len();
        let key: Vec<&str> = names[..nk].iter().map(String::as_str).collect();
        let mut values: Vec<(&str, Combine)> =
            names[nk..nk + self.width].iter().map(|n| (n.as_str(), Combine::Sum)).collect();
        for (n, &(_, min)) in names[nk + self.width..].iter().zip(&self.extreme_cols) {
            values.push((n.as_str(), if min { Combine::Min } else { Combine::Max }));
        }
        self.partials = Some(KeyedState::table("partials", &key, &values, None, &schema)?);
        Ok(())
    }

    /// Hand the groups held here to the host as partial aggregates, and start empty.
    fn flush(&mut self) -> Result<()> {
        if self.keys.is_empty() || self.key_state.len() == 0 {
            return Ok(());
        }
        if self.partials.is_none() {
            self.open_partials()?;
        }
        let mut columns = self.local_keys()?;
        let groups = self.key_state.len();
        for (j, float) in self.float_slots.iter().enumerate() {
            let slot = (0..groups).map(|g| self.slots[g * self.width + j]);
            columns.push(if *float {
                Arc::new(Float64Array::from_iter_values(slot.map(f64::from_bits)))
            } else {
                Arc::new(Int64Array::from_iter_values(slot.map(|v| v as i64)))
            });
        }
        for (e, t) in self.extremes.iter().zip(&self.extreme_types) {
            columns.push(to_array(t, e)?);
        }
        let batch = RecordBatch::try_new(self.partial_schema(), columns)?;
        if let Some(p) = &self.partials {
            p.merge(&batch)?;
        }
        self.key_state = match &self.key_state {
            Keys::Int { .. } => Keys::Int { index: IntMap::new(), keys: Vec::new(), null_group: None },
            Keys::Any { .. } => Keys::Any { groups: HashMap::new(), values: Vec::new(), buf: Vec::new() },
        };
        self.slots = Vec::new();
        self.extremes.iter_mut().for_each(|e| *e = Vec::new());
        Ok(())
    }

    /// The groups from the host, a part per call, in first-seen order.
    fn finish_part(&mut self) -> Result<Option<RecordBatch>> {
        self.flush()?;
        let Some(p) = &self.partials else { return Ok(None) };
        let Some(b) = p.scan(SCAN_ROWS)? else { return Ok(None) };
        let (nk, groups) = (self.keys.len(), b.num_rows());
        let mut slots = vec![0u64; groups * self.width];
        for (j, float) in self.float_slots.iter().enumerate() {
            let col = b.column(nk + j);
            for g in 0..groups {
                slots[g * self.width + j] = if *float {
                    col.as_primitive::<Float64Type>().value(g).to_bits()
                } else {
                    col.as_primitive::<Int64Type>().value(g) as u64
                };
            }
        }
        let extremes = (0..self.extreme_types.len())
            .map(|i| (0..groups).map(|g| scalar_at(b.column(nk + self.width + i).as_ref(), g)).collect())
            .collect::<Result<Vec<Vec<Scalar>>>>()?;
        more_output();
        Ok(Some(self.build(b.columns()[..nk].to_vec(), &slots, &extremes)?))
    }
}

/// An empty group table for these key columns.
fn fresh_keys(keys: &[usize], input: &SchemaRef) -> Keys {
    if keys.len() == 1 && input.field(keys[0]).data_type() == &DataType::Int64 {
        Keys::Int { index: IntMap::new(), keys: Vec::new(), null_group: None }
    } else {
        Keys::Any { groups: HashMap::new(), values: Vec::new(), buf: Vec::new() }
    }
}

/// The ordering a new value must have against the current one to replace it.
fn min_or_max(min: bool) -> std::cmp::Ordering {
    if min {
        std::cmp::Ordering::Less
    } else {
        std::cmp::Ordering::Greater
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

    /// `a` processed, its state snapshotted and restored into a fresh instance, which then
    /// runs `b` to the end: what a run resumed from a checkpoint does.
    fn resumed(cfg: &str, a: &RecordBatch, b: &RecordBatch) -> RecordBatch {
        let mut first = Harness::<Aggregate>::new(cfg, &a.schema()).unwrap();
        first.process(a).unwrap();
        let state = first.snapshot().unwrap().unwrap();
        let mut second = Harness::<Aggregate>::new(cfg, &a.schema()).unwrap();
        second.restore(&state).unwrap();
        second.run(std::slice::from_ref(b)).unwrap()
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
    fn groups_handed_to_the_host_come_back_as_if_held_here() {
        // 40 batches over 7 countries; a flush after every group and checkpoints between
        let countries = ["DE", "FR", "IT", "ES", "PL", "NL", "BE"];
        let batches: Vec<RecordBatch> = (0..40)
            .map(|i| {
                let c: Vec<&str> = (0..5).map(|r| countries[(i * 3 + r * 5) % 7]).collect();
                let amount: Vec<Option<f64>> = (0..5).map(|r| ((i + r) % 4 != 0).then_some((i * r) as f64)).collect();
                let qty: Vec<i64> = (0..5).map(|r| (i * 7 + r) as i64 % 13 - 6).collect();
                batch(&c, &amount, &qty)
            })
            .collect();
        let expected = Harness::<Aggregate>::new(CFG, &batches[0].schema()).unwrap().run(&batches).unwrap();
        let cfg = format!("{CFG}\nflush_groups = 1");
        let mut h = Harness::<Aggregate>::new(&cfg, &batches[0].schema()).unwrap();
        for (i, b) in batches.iter().enumerate() {
            h.process(b).unwrap();
            if i % 9 == 0 {
                // a checkpoint: what is in the host and what is held here, resumed
                let state = h.snapshot().unwrap().unwrap();
                h = Harness::<Aggregate>::new(&cfg, &batches[0].schema()).unwrap();
                h.restore(&state).unwrap();
            }
        }
        let parts = h.finish().unwrap();
        let got = weir_sdk::arrow_select::concat::concat_batches(&expected.schema(), &parts).unwrap();
        assert_eq!(got, expected);
    }

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
        assert_eq!(resumed(CFG, &a, &b), expected);
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
        assert_eq!(resumed(cfg, &a, &b), expected);
    }

    #[test]
    fn sums_and_averages_of_one_column_share_its_count_and_all_null_groups_are_null() {
        let mk = |k: &[&str], q: &[Option<i64>]| {
            RecordBatch::try_from_iter([
                ("k", Arc::new(StringArray::from(k.to_vec())) as ArrayRef),
                ("q", Arc::new(Int64Array::from(q.to_vec())) as ArrayRef),
            ])
            .unwrap()
        };
        let cfg = r#"
            group_by = ["k"]
            aggregates = [
              { fn = "sum", column = "q", as = "s" },
              { fn = "avg", column = "q", as = "a" },
              { fn = "count", column = "q", as = "n" },
              { fn = "count", as = "rows" },
              { fn = "sum", column = "q", as = "s2" },
            ]"#;
        let a = mk(&["x", "y", "x"], &[Some(i64::MAX), None, Some(3)]);
        let b = mk(&["y", "x"], &[None, Some(-3)]);
        let out = Harness::<Aggregate>::new(cfg, &a.schema()).unwrap().run(&[a, b]).unwrap();
        assert_eq!(out.num_rows(), 2);
        let s = out.column(1).as_primitive::<Int64Type>();
        assert_eq!((s.value(0), s.is_null(1)), (i64::MAX, true), "int sums wrap, no values is null");
        let avg = out.column(2).as_primitive::<Float64Type>();
        assert_eq!((avg.value(0), avg.is_null(1)), (i64::MAX as f64 / 3.0, true));
        assert_eq!(out.column(3).as_primitive::<Int64Type>().values().to_vec(), [3, 0]);
        assert_eq!(out.column(4).as_primitive::<Int64Type>().values().to_vec(), [3, 2]);
        assert_eq!(out.column(5), out.column(1));
    }

    #[test]
    fn a_global_aggregate_over_no_rows_has_one_row() {
        let s = batch(&[], &[], &[]).schema();
        let cfg = "aggregates = [{ fn = \"count\", as = \"n\" }, { fn = \"sum\", column = \"amount\", as = \"s\" }]";
        let out = Harness::<Aggregate>::new(cfg, &s).unwrap().run(&[]).unwrap();
        assert_eq!(out.num_rows(), 1);
        assert_eq!(out.column(0).as_primitive::<Int64Type>().value(0), 0);
        assert!(out.column(1).is_null(0));
    }

    #[test]
    fn state_from_another_config_is_refused() {
        let a = batch(&["DE"], &[Some(1.0)], &[1]);
        let mut first = Harness::<Aggregate>::new(CFG, &a.schema()).unwrap();
        first.process(&a).unwrap();
        let state = first.snapshot().unwrap().unwrap();
        let other = "group_by = [\"country\"]\naggregates = [{ fn = \"count\", as = \"n\" }]";
        let mut second = Harness::<Aggregate>::new(other, &a.schema()).unwrap();
        let e = second.restore(&state).err().unwrap();
        assert!(e.to_string().contains("not from this version"), "{e}");
        assert!(second.restore(&state[..state.len() / 2]).is_err(), "a truncated state is an error");
    }

    #[test]
    fn int64_keys_without_nulls_match_a_reference_across_batches_and_checkpoints() {
        // the look-ahead path (keys without nulls): many groups, repeats within and across
        // batches, batch sizes that are not multiples of 16
        let mk = |from: i64, n: i64| {
            let ids: Vec<i64> = (from..from + n).map(|i| (i * 7919) % 1009 - 500).collect();
            let v: Vec<f64> = (from..from + n).map(|i| i as f64 / 4.0).collect();
            RecordBatch::try_from_iter([
                ("id", Arc::new(Int64Array::from(ids)) as ArrayRef),
                ("amount", Arc::new(Float64Array::from(v)) as ArrayRef),
            ])
            .unwrap()
        };
        let (a, b) = (mk(0, 3001), mk(3001, 2003));
        let cfg = r#"group_by = ["id"]
            aggregates = [{ fn = "sum", column = "amount", as = "s" }, { fn = "count", as = "n" }, { fn = "avg", column = "amount", as = "a" }]"#;
        let mut first_seen = Vec::new();
        let mut reference: HashMap<i64, (f64, i64)> = HashMap::new();
        for batch in [&a, &b] {
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let v = batch.column(1).as_primitive::<Float64Type>();
            for r in 0..batch.num_rows() {
                let e = reference.entry(ids.value(r)).or_insert_with(|| {
                    first_seen.push(ids.value(r));
                    (0.0, 0)
                });
                e.0 += v.value(r);
                e.1 += 1;
            }
        }
        let out = resumed(cfg, &a, &b);
        assert_eq!(out.column(0).as_primitive::<Int64Type>().values().to_vec(), first_seen);
        for (r, id) in first_seen.iter().enumerate() {
            let (sum, n) = reference[id];
            assert_eq!(out.column(1).as_primitive::<Float64Type>().value(r), sum);
            assert_eq!(out.column(2).as_primitive::<Int64Type>().value(r), n);
            assert_eq!(out.column(3).as_primitive::<Float64Type>().value(r), sum / n as f64);
        }
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
