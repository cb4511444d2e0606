//! `filter`: keep the rows that match every condition.
//!
//! ```toml
//! [steps.big_orders.transforms.config]
//! where = [
//!   { column = "amount", op = ">", value = 400.0 },
//!   { column = "country", op = "in", values = ["DE", "FR"] },
//! ]
//! ```
//!
//! Operators: `=`, `!=`, `<`, `<=`, `>`, `>=` against a number or a string `value`;
//! `in` / `not_in` against a list of `values`; `is_null`, `not_null`. A null never matches a
//! comparison.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use weir_sdk::arrow_array::{BooleanArray, Float64Array};
use weir_sdk::arrow_buffer::BooleanBuffer;
use weir_sdk::arrow_cast::cast;
use weir_sdk::arrow_select::filter::filter_record_batch;
use weir_sdk::prelude::*;

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    #[serde(rename = "where")]
    conditions: Vec<Condition>,
}

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Condition {
    column: String,
    op: String,
    value: Option<weir_sdk::serde_json::Value>,
    values: Option<Vec<weir_sdk::serde_json::Value>>,
}

enum Test {
    Num(Cmp, f64),
    Text(Cmp, String),
    In(HashSet<String, BuildHasherDefault<WordHasher>>, bool),
    /// `in` / `not_in` where every listed value is at most 7 bytes (codes, statuses)
    InShort(ShortSet, bool),
    Null(bool),
}

/// A comparison operator, applied to the ordering of (value, operand).
#[derive(Clone, Copy)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn holds(self, ord: Option<std::cmp::Ordering>) -> bool {
        use std::cmp::Ordering::*;
        matches!(
            (self, ord),
            (Cmp::Eq, Some(Equal))
                | (Cmp::Ne, Some(Less | Greater))
                | (Cmp::Lt, Some(Less))
                | (Cmp::Le, Some(Less | Equal))
                | (Cmp::Gt, Some(Greater))
                | (Cmp::Ge, Some(Greater | Equal))
        )
    }
}

/// A hasher for the `in` sets: eight bytes per multiply. SipHash (the std default) costs
/// more than the rest of the filter loop; the set is the config's values, so hash flooding
/// by the data cannot grow it.
#[derive(Default)]
struct WordHasher(u64);

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let word = u64::from_le_bytes(c.try_into().unwrap_or_default());
            self.0 = (self.0 ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.0 = (self.0 ^ u64::from_le_bytes(tail) ^ bytes.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

/// A set of strings of at most 7 bytes, each packed with its length into one word. Every
/// key sits within `PROBES` slots of its home slot, so a lookup is one unaligned load, a
/// multiply and `PROBES` compares with no branch: whether a row's value is in the set is as
/// good as random to the branch predictor, and a probe loop mispredicted on most rows.
struct ShortSet {
    /// `mask + PROBES` slots: a home slot near the end probes past it without wrapping.
    slots: Vec<u64>,
    mask: usize,
    multiplier: u64,
}

/// Never a packed value: those have a length of 0..=7 in the top byte.
const EMPTY: u64 = u64::MAX;

/// Slots a lookup compares, from the key's home slot on.
const PROBES: usize = 4;

impl ShortSet {
    /// `None` when a value is longer than 7 bytes or no table of a bounded size keeps every
    /// key within `PROBES` slots of home (then the caller uses a hashed set).
    fn new(values: &[String]) -> Option<ShortSet> {
        let mut keys: Vec<u64> = values.iter().map(|v| Self::pack(v.as_bytes(), 0, v.len())).collect::<Option<_>>()?;
        keys.sort_unstable();
        keys.dedup();
        let smallest = (keys.len() * 4).next_power_of_two().max(8);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for size in (0..4).map(|shift| smallest << shift) {
            for _ in 0..16 {
                let mut set = ShortSet { slots: vec![EMPTY; size + PROBES], mask: size - 1, multiplier: seed | 1 };
                if keys.iter().all(|&k| set.place(k)) {
                    return Some(set);
                }
                // the next odd multiplier (splitmix64 step)
                seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                seed = (seed ^ (seed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                seed = (seed ^ (seed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            }
        }
        None
    }

    /// Put `key` in the first free slot of its probe window; false when the window is full.
    fn place(&mut self, key: u64) -> bool {
        let home = self.home(key);
        match self.slots[home..home + PROBES].iter().position(|s| *s == EMPTY) {
            Some(i) => {
                self.slots[home + i] = key;
                true
            }
            None => false,
        }
    }

    /// `data[start..end]` with its length as one word, or `None` when longer than 7 bytes.
    #[inline]
    fn pack(data: &[u8], start: usize, end: usize) -> Option<u64> {
        let len = end.checked_sub(start).filter(|l| *l <= 7)?;
        let word = match data.get(start..start + 8) {
            Some(w) => u64::from_le_bytes(w.try_into().ok()?) & ((1u64 << (8 * len)) - 1),
            None => {
                let mut w = [0u8; 8];
                w[..len].copy_from_slice(data.get(start..end)?);
                u64::from_le_bytes(w)
            }
        };
        Some(word | (len as u64) << 56)
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(self.multiplier) >> 32) as usize & self.mask
    }

    #[inline]
    fn contains(&self, key: u64) -> bool {
        let home = self.home(key);
        let window: &[u64; PROBES] = match self.slots[home..home + PROBES].try_into() {
            Ok(w) => w,
            Err(_) => return false,
        };
        // `|` rather than `any`, which would stop (and branch) at the first match
        window.iter().fold(false, |found, s| found | (*s == key))
    }
}

struct Plan {
    /// Position of the column among the filter's columns (the batches `keep` gets).
    index: usize,
    numeric: bool,
    test: Test,
}

pub struct Filter {
    plans: Vec<Plan>,
    schema: SchemaRef,
    /// The columns the conditions read: input positions, ascending.
    columns: Vec<usize>,
    /// Scratch: positions of the rows still kept.
    rows: Vec<u32>,
}

fn text(v: &weir_sdk::serde_json::Value) -> String {
    match v {
        weir_sdk::serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Transform for Filter {
    type Config = Config;

    fn new(config: Config, input: &SchemaRef, _ctx: &Context) -> Result<Self> {
        let mut plans = Vec::new();
        for (i, c) in config.conditions.into_iter().enumerate() {
            let index = require_column(input, &c.column, &[]).map_err(|e| Error::config(format!("where[{i}]: {e}")))?;
            let numeric = input.field(index).data_type().is_numeric();
            let need_value =
                || c.value.clone().ok_or_else(|| Error::config(format!("where[{i}]: `{}` needs `value`", c.op)));
            let test = match c.op.as_str() {
                "is_null" => Test::Null(true),
                "not_null" => Test::Null(false),
                "in" | "not_in" => {
                    let values = c.values.as_ref().ok_or_else(|| Error::config(format!("where[{i}]: `{}` needs `values`", c.op)))?;
                    let values: Vec<String> = values.iter().map(text).collect();
                    match ShortSet::new(&values) {
                        Some(short) => Test::InShort(short, c.op == "in"),
                        None => Test::In(values.into_iter().collect(), c.op == "in"),
                    }
                }
                op @ ("=" | "!=" | "<" | "<=" | ">" | ">=") => {
                    let v = need_value()?;
                    let cmp = match op {
                        "=" => Cmp::Eq,
                        "!=" => Cmp::Ne,
                        "<" => Cmp::Lt,
                        "<=" => Cmp::Le,
                        ">" => Cmp::Gt,
                        _ => Cmp::Ge,
                    };
                    match (numeric, v.as_f64()) {
                        (true, Some(n)) => Test::Num(cmp, n),
                        (true, None) => {
                            return Err(Error::config(format!(
                                "where[{i}]: column `{}` is numeric; compare it with a number",
                                c.column
                            )))
                        }
                        (false, _) => Test::Text(cmp, text(&v)),
                    }
                }
                other => return Err(Error::config(format!("where[{i}].op: unknown operator `{other}`; use =, !=, <, <=, >, >=, in, not_in, is_null or not_null"))),
            };
            plans.push(Plan { index, numeric, test });
        }
        // plans read the batches `keep` gets: only the columns named, in input order
        let mut columns: Vec<usize> = plans.iter().map(|p| p.index).collect();
        columns.sort_unstable();
        columns.dedup();
        for p in &mut plans {
            p.index = columns.binary_search(&p.index).unwrap_or_default();
        }
        Ok(Filter { plans, schema: input.clone(), columns, rows: Vec::new() })
    }

    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Only the columns the conditions read cross into the sandbox; the host drops the rows.
    fn filter_columns(&self) -> Option<Vec<String>> {
        (!self.columns.is_empty()).then(|| self.columns.iter().map(|&i| self.schema.field(i).name().clone()).collect())
    }

    fn process(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let keep = self.keep(&batch.project(&self.columns)?)?;
        Ok(filter_record_batch(&batch, &keep)?)
    }

    fn keep(&mut self, batch: &RecordBatch) -> Result<BooleanArray> {
        let n = batch.num_rows();
        let mut keep = vec![true; n];
        for p in &self.plans {
            let col = batch.column(p.index);
            match &p.test {
                // rows an earlier condition dropped are not tested again
                Test::Null(want) => (0..n).for_each(|r| keep[r] &= col.is_null(r) == *want),
                Test::Num(f, v) if p.numeric => {
                    let nums = cast(col, &DataType::Float64)?;
                    let nums =
                        nums.as_any().downcast_ref::<Float64Array>().ok_or_else(|| Error::internal("cast to f64"))?;
                    // one plain comparison loop per operator (NaN compares false, as with
                    // partial_cmp), then the nulls
                    let (values, v) = (nums.values().as_ref(), *v);
                    match f {
                        Cmp::Eq => compare(&mut keep, values, |x| x == v),
                        // not `x != v`, which holds for NaN
                        #[allow(clippy::double_comparisons)]
                        Cmp::Ne => compare(&mut keep, values, |x| x < v || x > v),
                        Cmp::Lt => compare(&mut keep, values, |x| x < v),
                        Cmp::Le => compare(&mut keep, values, |x| x <= v),
                        Cmp::Gt => compare(&mut keep, values, |x| x > v),
                        Cmp::Ge => compare(&mut keep, values, |x| x >= v),
                    }
                    if let Some(nulls) = nums.nulls() {
                        keep.iter_mut().zip(nulls.iter()).for_each(|(k, valid)| *k &= valid);
                    }
                }
                Test::Num(..) => {}
                Test::Text(f, v) => {
                    let s = cast(col, &DataType::Utf8)?;
                    let s = s.as_string::<i32>();
                    for &r in kept_rows(&keep, &mut self.rows) {
                        let r = r as usize;
                        keep[r] = s.is_valid(r) && f.holds(Some(s.value(r).cmp(v.as_str())));
                    }
                }
                Test::InShort(set, want) => {
                    let s = cast(col, &DataType::Utf8)?;
                    let s = s.as_string::<i32>();
                    let (offsets, data) = (s.value_offsets(), s.value_data());
                    for &r in kept_rows(&keep, &mut self.rows) {
                        let r = r as usize;
                        let found = ShortSet::pack(data, offsets[r] as usize, offsets[r + 1] as usize)
                            .is_some_and(|key| set.contains(key));
                        keep[r] = s.is_valid(r) && found == *want;
                    }
                }
                Test::In(set, want) => {
                    let s = cast(col, &DataType::Utf8)?;
                    let s = s.as_string::<i32>();
                    for &r in kept_rows(&keep, &mut self.rows) {
                        let r = r as usize;
                        keep[r] = s.is_valid(r) && set.contains(s.value(r)) == *want;
                    }
                }
            }
        }
        let keep = BooleanArray::from(BooleanBuffer::collect_bool(n, |i| keep[i]));
        host::counter_add("rows_kept", keep.true_count() as i64);
        Ok(keep)
    }
}

/// The positions of the rows still kept, gathered without a branch per row (whether a row
/// survived an earlier condition is as good as random to the branch predictor).
fn kept_rows<'a>(keep: &[bool], rows: &'a mut Vec<u32>) -> &'a [u32] {
    rows.clear();
    rows.resize(keep.len(), 0);
    let mut n = 0;
    for (r, k) in keep.iter().enumerate() {
        rows[n] = r as u32;
        n += usize::from(*k);
    }
    &rows[..n]
}

fn compare(keep: &mut [bool], values: &[f64], test: impl Fn(f64) -> bool) {
    keep.iter_mut().zip(values).for_each(|(k, x)| *k &= test(*x));
}

weir_sdk::export_transform!(Filter);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use weir_sdk::testing::Harness;

    #[test]
    fn keeps_rows_matching_every_condition() {
        let b = RecordBatch::try_from_iter([
            ("amount", Arc::new(Float64Array::from(vec![Some(10.0), Some(500.0), None, Some(800.0)])) as ArrayRef),
            ("country", Arc::new(StringArray::from(vec!["DE", "DE", "DE", "US"])) as ArrayRef),
        ])
        .unwrap();
        let cfg = r#"where = [{ column = "amount", op = ">", value = 100 }, { column = "country", op = "in", values = ["DE", "FR"] }]"#;
        let out = Harness::<Filter>::new(cfg, &b.schema()).unwrap().run(std::slice::from_ref(&b)).unwrap();
        assert_eq!(out.num_rows(), 1);
        assert_eq!(out.column(0).as_primitive::<weir_sdk::arrow_array::types::Float64Type>().value(0), 500.0);
        let e = Harness::<Filter>::new(r#"where = [{ column = "amount", op = "~" , value = 1 }]"#, &b.schema())
            .err()
            .unwrap();
        assert!(e.to_string().contains("unknown operator"), "{e}");
        let e = Harness::<Filter>::new(r#"where = [{ column = "amount", op = ">" , value = "x" }]"#, &b.schema())
            .err()
            .unwrap();
        assert!(e.to_string().contains("compare it with a number"), "{e}");
    }

    #[test]
    fn numeric_operators_compare_as_partial_cmp_does_with_nan_signed_zero_and_nulls() {
        let values =
            [Some(1.0), Some(2.0), Some(f64::NAN), None, Some(-0.0), Some(0.0), Some(3.0), Some(f64::INFINITY)];
        let b = RecordBatch::try_from_iter([("x", Arc::new(Float64Array::from(values.to_vec())) as ArrayRef)]).unwrap();
        for (op, cmp) in
            [("=", Cmp::Eq), ("!=", Cmp::Ne), ("<", Cmp::Lt), ("<=", Cmp::Le), (">", Cmp::Gt), (">=", Cmp::Ge)]
        {
            for v in [2.0, 0.0, -1.5] {
                let cfg = format!("where = [{{ column = \"x\", op = \"{op}\", value = {v:?} }}]");
                let out = Harness::<Filter>::new(&cfg, &b.schema()).unwrap().run(std::slice::from_ref(&b)).unwrap();
                let got: Vec<f64> =
                    out.column(0).as_primitive::<weir_sdk::arrow_array::types::Float64Type>().values().to_vec();
                let want: Vec<f64> =
                    values.iter().flatten().copied().filter(|x| cmp.holds(x.partial_cmp(&v))).collect();
                assert_eq!(format!("{got:?}"), format!("{want:?}"), "x {op} {v}");
            }
        }
    }

    #[test]
    fn in_and_not_in_match_exact_strings_of_any_length_and_never_nulls() {
        // with a value longer than 7 bytes (a hashed set) and with short values only (packed)
        in_and_not_in(&["", "abcdefgh", "abcdefghi", "ü-ünïcode-long-string-xx"]);
        in_and_not_in(&["", "a", "abcdefg", "ü", "C001", "C001"]);
    }

    #[test]
    fn a_short_set_finds_its_members_and_nothing_else_at_any_size() {
        for n in [1usize, 2, 100, 200, 5000] {
            let values: Vec<String> = (0..n).map(|i| format!("C{i:03}")).collect();
            let set = ShortSet::new(&values).expect("codes this short and this few fit a window table");
            let key = |v: &str| ShortSet::pack(v.as_bytes(), 0, v.len()).unwrap();
            assert!(values.iter().all(|v| set.contains(key(v))), "{n} members");
            for other in (n..n + 300).map(|i| format!("C{i:03}")).chain(["".into(), "C".into(), "c000".into()]) {
                assert!(!set.contains(key(&other)), "{other} is not among {n}");
            }
        }
        assert!(ShortSet::new(&["abcdefgh".to_string()]).is_none(), "8 bytes do not pack");
    }

    fn in_and_not_in(set: &[&str]) {
        let rows = vec![
            Some(""),
            Some("abcdefgh"),
            Some("abcdefghi"),
            Some("abcdefgH"),
            Some("abcdefgh\0"),
            None,
            Some("ü-ünïcode-long-string-xx"),
            Some("ü-ünïcode-long-string-x"),
            Some("zz"),
            Some("a"),
            Some("a\0"),
            Some("abcdefg"),
            Some("abcdefG"),
            Some("C001"),
            Some("C0010"),
            Some("ü"),
            Some("C001"), // the last value: fewer than 8 bytes left in the buffer
        ];
        let b = RecordBatch::try_from_iter([("c", Arc::new(StringArray::from(rows.clone())) as ArrayRef)]).unwrap();
        let sliced = b.slice(9, rows.len() - 9); // offsets that do not start at 0
        for (op, want) in [("in", true), ("not_in", false)] {
            let values = set.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ");
            let cfg = format!("where = [{{ column = \"c\", op = \"{op}\", values = [{values}] }}]");
            let out = Harness::<Filter>::new(&cfg, &b.schema()).unwrap().run(std::slice::from_ref(&b)).unwrap();
            let got: Vec<&str> = out.column(0).as_string::<i32>().iter().map(|v| v.unwrap()).collect();
            let expected: Vec<&str> = rows.iter().flatten().copied().filter(|v| set.contains(v) == want).collect();
            assert_eq!(got, expected, "{op}");
            let out = Harness::<Filter>::new(&cfg, &b.schema()).unwrap().run(std::slice::from_ref(&sliced)).unwrap();
            let got: Vec<&str> = out.column(0).as_string::<i32>().iter().map(|v| v.unwrap()).collect();
            let expected: Vec<&str> = rows[9..].iter().flatten().copied().filter(|v| set.contains(v) == want).collect();
            assert_eq!(got, expected, "{op} on a slice");
        }
    }
}
