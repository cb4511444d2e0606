use std::collections::HashMap as StdMap;

use arrow_array::{Int32Array, StringArray};

use super::*;

fn batch(keys: &[Option<&str>], n: &[Option<i64>], x: &[Option<f64>], t: &[i32]) -> RecordBatch {
    RecordBatch::try_from_iter([
        ("k", Arc::new(StringArray::from(keys.to_vec())) as ArrayRef),
        ("n", Arc::new(Int64Array::from(n.to_vec())) as ArrayRef),
        ("x", Arc::new(Float64Array::from(x.to_vec())) as ArrayRef),
        ("t", Arc::new(Int32Array::from(t.to_vec())) as ArrayRef),
    ])
    .unwrap()
}

fn all(state: &mut KeyedState, chunk: usize) -> Vec<RecordBatch> {
    std::iter::from_fn(|| state.scan(chunk).unwrap()).collect()
}

/// One table of `key -> (first seen, values)` computed row by row, the reference the
/// spilling table must equal.
#[allow(clippy::type_complexity)]
fn reference(
    rows: &[(String, Option<i64>, Option<f64>, i32)],
) -> Vec<(String, Option<i64>, Option<i64>, Option<f64>, i32)> {
    let mut order = Vec::new();
    let mut m: StdMap<String, (Option<i64>, Option<i64>, Option<f64>, i32)> = StdMap::new();
    for (k, n, x, t) in rows {
        match m.get_mut(k) {
            None => {
                order.push(k.clone());
                m.insert(k.clone(), (*n, *n, *x, *t));
            }
            Some(e) => {
                e.0 = match (e.0, n) {
                    (Some(a), Some(b)) => Some(a.wrapping_add(*b)),
                    (a, b) => a.or(*b),
                };
                e.1 = match (e.1, n) {
                    (Some(a), Some(b)) => Some(a.min(*b)),
                    (a, b) => a.or(*b),
                };
                e.2 = match (e.2, x) {
                    (Some(a), Some(b)) => Some(a.max(*b)),
                    (a, b) => a.or(*b),
                };
                // last by order column t: ties to the later row
                if *t >= e.3 {
                    e.3 = *t;
                }
            }
        }
    }
    order.into_iter().map(|k| (k.clone(), m[&k].0, m[&k].1, m[&k].2, m[&k].3)).collect()
}

#[test]
fn a_table_that_spills_and_checkpoints_scans_like_one_that_does_not() {
    let spec = Spec::table(
        "t",
        &["k"],
        &[("n", Combine::Sum), ("n", Combine::Min), ("x", Combine::Max), ("t", Combine::Last)],
        Some("t"),
    );
    // 3,000 rows over 700 keys, in batches of 100; values chosen so sums, extremes and the
    // order column all move
    let rows: Vec<(String, Option<i64>, Option<f64>, i32)> = (0..3000i64)
        .map(|i| {
            let k = format!("key-{}", (i * 7919) % 700);
            let n = (i % 11 != 0).then_some(i % 97 - 40);
            let x = (i % 13 != 0).then_some(((i * 31) % 53) as f64 / 4.0);
            (k, n, x, ((i * 17) % 23) as i32)
        })
        .collect();
    let batches: Vec<RecordBatch> = rows
        .chunks(100)
        .map(|c| {
            let keys: Vec<Option<&str>> = c.iter().map(|r| Some(r.0.as_str())).collect();
            let n: Vec<_> = c.iter().map(|r| r.1).collect();
            let x: Vec<_> = c.iter().map(|r| r.2).collect();
            let t: Vec<_> = c.iter().map(|r| r.3).collect();
            batch(&keys, &n, &x, &t)
        })
        .collect();
    let want = reference(&rows);
    let schema = batches[0].schema();
    let tmp = tempfile::tempdir().unwrap();
    // a 8 KiB budget spills every few batches; a checkpoint every 7 batches
    for (budget, every) in [(usize::MAX, 0), (8 << 10, 0), (8 << 10, 7), (usize::MAX, 5)] {
        let dir = tmp.path().join(format!("s-{budget}-{every}"));
        let mut state = KeyedState::open(spec.clone(), schema.clone(), Some(dir.clone()), None).unwrap();
        for (i, b) in batches.iter().enumerate() {
            state.merge(b, budget).unwrap();
            if every > 0 && (i + 1) % every == 0 {
                state.checkpoint().unwrap();
            }
        }
        if budget != usize::MAX {
            assert!(state.spills > 3, "a small budget spills: {}", state.spills);
        }
        let out = all(&mut state, 64);
        assert!(out.iter().all(|b| b.num_rows() <= 64));
        let got: Vec<_> = out
            .iter()
            .flat_map(|b| {
                let k = b.column(0).as_string::<i32>().clone();
                let sum = b.column(1).as_primitive::<Int64Type>().clone();
                let min = b.column(2).as_primitive::<Int64Type>().clone();
                let max = b.column(3).as_primitive::<Float64Type>().clone();
                let t = b.column(4).as_primitive::<arrow_array::types::Int32Type>().clone();
                (0..b.num_rows())
                    .map(|r| {
                        let opt_i = |a: &Int64Array| a.is_valid(r).then(|| a.value(r));
                        (
                            k.value(r).to_string(),
                            opt_i(&sum),
                            opt_i(&min),
                            max.is_valid(r).then(|| max.value(r)),
                            t.value(r),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(got, want, "budget {budget}, checkpoint every {every}");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "a finished scan leaves no files: {left:?}");
    }
}

#[test]
fn a_resumed_table_continues_from_its_checkpoint_and_ignores_later_runs() {
    let spec = Spec::table("t", &["k"], &[("n", Combine::Sum), ("t", Combine::First)], None);
    let b = |keys: &[&str], n: i64| {
        let k: Vec<Option<&str>> = keys.iter().map(|k| Some(*k)).collect();
        batch(&k, &vec![Some(n); keys.len()], &vec![None; keys.len()], &vec![n as i32; keys.len()])
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let mut s = KeyedState::open(spec.clone(), b(&["a"], 1).schema(), Some(dir.clone()), None).unwrap();
    s.merge(&b(&["a", "b"], 1), usize::MAX).unwrap();
    let m = s.checkpoint().unwrap();
    // after the checkpoint: a spill the crash makes worthless
    s.merge(&b(&["a", "c"], 100), 0).unwrap();
    assert!(s.spills >= 2);
    drop(s);
    let mut r = KeyedState::open(spec.clone(), b(&["a"], 1).schema(), Some(dir.clone()), Some(&m)).unwrap();
    r.merge(&b(&["c", "a"], 10), usize::MAX).unwrap();
    let out = all(&mut r, 10);
    let keys: Vec<&str> = out[0].column(0).as_string::<i32>().iter().flatten().collect();
    let sums: Vec<i64> = out[0].column(1).as_primitive::<Int64Type>().values().to_vec();
    let firsts: Vec<i32> = out[0].column(2).as_primitive::<arrow_array::types::Int32Type>().values().to_vec();
    assert_eq!((keys, sums, firsts), (vec!["a", "b", "c"], vec![11, 1, 10], vec![1, 1, 10]));
    // a checkpoint's run that went missing or changed is refused, not read as empty
    let mut s = KeyedState::open(spec.clone(), b(&["a"], 1).schema(), Some(dir.clone()), None).unwrap();
    s.merge(&b(&["a"], 1), usize::MAX).unwrap();
    let m = s.checkpoint().unwrap();
    std::fs::write(dir.join(&m.runs[0].0), b"junk").unwrap();
    let e = KeyedState::open(spec.clone(), b(&["a"], 1).schema(), Some(dir.clone()), Some(&m)).err().unwrap();
    assert!(e.to_string().contains("damaged"), "{e}");
    let other = Spec::table("t", &["k"], &[("n", Combine::Max)], None);
    let e = KeyedState::open(other, b(&["a"], 1).schema(), Some(dir), Some(&m)).err().unwrap();
    assert!(e.to_string().contains("another spec"), "{e}");
}

#[test]
fn sets_answer_which_keys_are_new_and_checkpoint_only_what_is_new() {
    let tmp = tempfile::tempdir().unwrap();
    let ints = |v: &[Option<i64>]| {
        RecordBatch::try_from_iter([("id", Arc::new(Int64Array::from(v.to_vec())) as ArrayRef)]).unwrap()
    };
    let strs = |v: &[Option<&str>]| {
        RecordBatch::try_from_iter([("id", Arc::new(StringArray::from(v.to_vec())) as ArrayRef)]).unwrap()
    };
    for int in [true, false] {
        let dir = tmp.path().join(format!("set-{int}"));
        let (a, b, c) = if int {
            (ints(&[Some(1), Some(2), Some(1), None]), ints(&[None, Some(3), Some(2)]), ints(&[Some(3), Some(4)]))
        } else {
            (
                strs(&[Some("1"), Some("2"), Some("1"), None]),
                strs(&[None, Some("3"), Some("2")]),
                strs(&[Some("3"), Some("4")]),
            )
        };
        let spec = Spec::set("seen", &["id"]);
        let mut s = KeyedState::open(spec.clone(), a.schema(), Some(dir.clone()), None).unwrap();
        assert_eq!(s.insert_new(&a, usize::MAX).unwrap(), [true, true, false, true]);
        let m1 = s.checkpoint().unwrap();
        assert_eq!(s.insert_new(&b, usize::MAX).unwrap(), [false, true, false]);
        let m2 = s.checkpoint().unwrap();
        assert!(m2.log_bytes > m1.log_bytes && m2.log_bytes < 2 * m1.log_bytes, "only the new key is logged");
        s.insert_new(&c, usize::MAX).unwrap(); // after the last checkpoint: lost in the crash
        drop(s);
        let mut r = KeyedState::open(spec.clone(), a.schema(), Some(dir.clone()), Some(&m2)).unwrap();
        assert_eq!(r.insert_new(&c, usize::MAX).unwrap(), [false, true], "int keys: {int}");
        assert!(r.scan(10).is_err(), "a set is not scanned");
        // past the budget: an error naming the key to raise
        let e = r.insert_new(&c, 1).unwrap_err();
        assert!(matches!(e, Error::Budget { .. }), "{e}");
    }
}

#[test]
fn bad_specs_and_batches_are_errors() {
    let b = batch(&[Some("a")], &[Some(1)], &[Some(1.0)], &[1]);
    let open = |spec: Spec| KeyedState::open(spec, b.schema(), None, None).err().map(|e| e.to_string());
    assert!(open(Spec::set("s", &[])).unwrap().contains("key column"));
    assert!(open(Spec::set("s", &["nope"])).unwrap().contains("nope"));
    assert!(open(Spec::table("s", &["k"], &[("k", Combine::Sum)], None)).unwrap().contains("sums are of"));
    assert!(open(Spec::table("s", &["k"], &[("n", Combine::Sum)], Some("t"))).unwrap().contains("order_by"));
    let mut s =
        KeyedState::open(Spec::table("s", &["k"], &[("n", Combine::Sum)], None), b.schema(), None, None).unwrap();
    let other = RecordBatch::try_from_iter([("k", Arc::new(Int64Array::from(vec![1])) as ArrayRef)]).unwrap();
    assert!(s.merge(&other, usize::MAX).unwrap_err().to_string().contains("differ"));
    // in memory only: past the budget is an error, not a spill
    assert!(s.merge(&b, 1).unwrap_err().to_string().contains("budget"));
    assert!(s.insert_new(&b, usize::MAX).unwrap_err().to_string().contains("sets"));
}

/// The runtime's table, spilling and checkpointing, against the SDK's model (the state the
/// native test harness keeps): generated rows with nulls, several key and value types.
#[test]
fn tables_match_the_sdk_model_on_generated_rows() {
    use arrow_array::{BooleanArray, TimestampMillisecondArray};
    use weir_sdk::testing::ModelState;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let batches: Vec<RecordBatch> = (0..30)
        .map(|_| {
            let n = 1 + next(80) as usize;
            let mut col = |m: u64| -> Vec<Option<i64>> {
                (0..n).map(|_| if next(9) == 0 { None } else { Some(next(m) as i64 - (m as i64) / 2) }).collect()
            };
            let (k1, k2, v, t) = (col(6), col(5), col(1000), col(50));
            let s: Vec<Option<String>> = col(40).into_iter().map(|x| x.map(|x| format!("s{x}"))).collect();
            let f: Vec<Option<f64>> = col(300).into_iter().map(|x| x.map(|x| x as f64 / 8.0)).collect();
            let b: Vec<Option<bool>> = col(4).into_iter().map(|x| x.map(|x| x > 0)).collect();
            RecordBatch::try_from_iter([
                ("k1", Arc::new(Int64Array::from(k1)) as ArrayRef),
                ("k2", Arc::new(StringArray::from_iter(k2.iter().map(|x| x.map(|x| format!("g{x}"))))) as ArrayRef),
                ("v", Arc::new(Int64Array::from(v)) as ArrayRef),
                ("f", Arc::new(Float64Array::from(f)) as ArrayRef),
                ("s", Arc::new(StringArray::from(s)) as ArrayRef),
                ("b", Arc::new(BooleanArray::from(b)) as ArrayRef),
                ("t", Arc::new(TimestampMillisecondArray::from(t)) as ArrayRef),
            ])
            .unwrap()
        })
        .collect();
    let schema = batches[0].schema();
    let values = [
        ("v", Combine::Sum),
        ("f", Combine::Sum),
        ("f", Combine::Min),
        ("s", Combine::Max),
        ("s", Combine::First),
        ("b", Combine::Last),
        ("v", Combine::Last),
        ("t", Combine::Min),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, order) in [None, Some("t")].into_iter().enumerate() {
        let spec = Spec::table("g", &["k1", "k2"], &values, order);
        let mut model = ModelState::open("g", &["k1", "k2"], &values, order, &schema).unwrap();
        let dir = tmp.path().join(i.to_string());
        let mut state = KeyedState::open(spec, schema.clone(), Some(dir), None).unwrap();
        for (n, b) in batches.iter().enumerate() {
            model.merge(b).unwrap();
            state.merge(b, 4 << 10).unwrap();
            if n % 11 == 10 {
                state.checkpoint().unwrap();
            }
        }
        assert!(state.spills > 0);
        let want = std::iter::from_fn(|| model.scan(17).unwrap()).collect::<Vec<_>>();
        let got = all(&mut state, 23);
        let want = arrow_select::concat::concat_batches(&want[0].schema(), &want).unwrap();
        let got = arrow_select::concat::concat_batches(&got[0].schema(), &got).unwrap();
        assert_eq!(got.num_rows(), want.num_rows(), "order {order:?}");
        for c in 0..want.num_columns() {
            assert_eq!(got.column(c).as_ref(), want.column(c).as_ref(), "column {c}, order {order:?}");
        }
    }
}

#[test]
fn a_set_past_its_budget_spills_merges_and_resumes_with_the_same_answers() {
    let tmp = tempfile::tempdir().unwrap();
    const KEYS: u64 = 20_000;
    const BUDGET: usize = 96 << 10;
    for int in [true, false] {
        // keys drawn with repeats from KEYS values (ints sparse, so no bitmap), some null
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut ids: Vec<Option<u64>> = Vec::new();
        for _ in 0..60_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ids.push((!x.is_multiple_of(97)).then_some(x % KEYS));
        }
        let batches: Vec<RecordBatch> = ids
            .chunks(500)
            .map(|c| {
                let col: ArrayRef = if int {
                    Arc::new(Int64Array::from_iter(c.iter().map(|v| v.map(|v| v as i64 * 1_000_003 - 7_000_000_000))))
                } else {
                    Arc::new(StringArray::from_iter(c.iter().map(|v| v.map(|v| format!("key-{v:08}")))))
                };
                RecordBatch::try_from_iter([("id", col)]).unwrap()
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let expected: Vec<Vec<bool>> = ids.chunks(500).map(|c| c.iter().map(|v| seen.insert(*v)).collect()).collect();

        let dir = tmp.path().join(format!("spill-{int}"));
        let spec = Spec::set("seen", &["id"]);
        let mut s = KeyedState::open(spec.clone(), batches[0].schema(), Some(dir.clone()), None).unwrap();
        let mut manifests: Vec<Manifest> = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            assert_eq!(s.insert_new(b, BUDGET).unwrap(), expected[i], "batch {i}, int keys: {int}");
            assert!(s.memory_bytes() <= BUDGET);
            if i % 30 == 29 && i < 90 {
                // the engine stores a checkpoint after later stages caught up: one behind
                s.release(manifests.len().saturating_sub(1) as u64);
                manifests.push(s.checkpoint().unwrap());
            }
            if i == 100 {
                break; // a crash: what came after the checkpoint at batch 89 is lost
            }
        }
        assert!(s.spills >= 2, "int keys: {int}: {} spills", s.spills);
        if !int {
            assert!(s.spills as usize > MERGE_RUNS, "string keys spill often enough to merge");
            assert!(s.key_runs.len() <= MERGE_RUNS, "runs are merged");
        }
        drop(s);
        // the last two checkpoints may be the stored one: every file they name is there
        for m in &manifests[manifests.len() - 2..] {
            for (f, len) in &m.runs {
                assert_eq!(std::fs::metadata(dir.join(f)).map(|m| m.len()).ok(), Some(*len), "{f} of {m:?}");
            }
        }
        let m = manifests.last().unwrap().clone();
        assert!(!m.runs.is_empty() && m.log_file.is_some(), "{m:?}");
        let mut r = KeyedState::open(spec.clone(), batches[0].schema(), Some(dir.clone()), Some(&m)).unwrap();
        let mut taken = 0;
        for (i, b) in batches.iter().enumerate().skip(90) {
            assert_eq!(r.insert_new(b, BUDGET).unwrap(), expected[i], "resumed batch {i}, int keys: {int}");
            if i % 30 == 29 {
                r.checkpoint().unwrap();
                taken += 1;
            }
        }
        // what spills and merges replaced is gone once a later checkpoint is stored
        let last = r.checkpoint().unwrap();
        r.release(taken + 1);
        let files: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(files.len() <= last.runs.len() + 1, "{files:?}");
    }
}

#[test]
fn damaged_key_runs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let b = |keys: std::ops::Range<i32>| {
        let col: ArrayRef = Arc::new(StringArray::from_iter_values(keys.map(|k| format!("k{k}"))));
        RecordBatch::try_from_iter([("id", col)]).unwrap()
    };
    let spec = Spec::set("seen", &["id"]);
    let mut s = KeyedState::open(spec.clone(), b(0..1).schema(), Some(dir.clone()), None).unwrap();
    s.insert_new(&b(0..5000), 64 << 10).unwrap();
    let m = s.checkpoint().unwrap();
    assert!(!m.runs.is_empty());
    drop(s);
    let run = dir.join(&m.runs[0].0);
    let mut bytes = std::fs::read(&run).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0xFF; // the footer
    std::fs::write(&run, &bytes).unwrap();
    let e = KeyedState::open(spec, b(0..1).schema(), Some(dir), Some(&m)).err().unwrap();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
}
