use super::*;
use arrow_array::{Float64Array, TimestampSecondArray};

fn batch(ids: &[Option<i64>], names: &[Option<&str>], amounts: &[f64]) -> RecordBatch {
    RecordBatch::try_from_iter([
        ("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef),
        ("name", Arc::new(StringArray::from(names.to_vec())) as ArrayRef),
        ("amount", Arc::new(Float64Array::from(amounts.to_vec())) as ArrayRef),
    ])
    .unwrap()
}

fn check(kind: Kind, severity: Severity) -> Check {
    Check { name: format!("{kind:?}").chars().take(24).collect(), kind, severity, tolerance: 0.0, line: 1 }
}

fn run(checks: Vec<Check>, batches: &[RecordBatch]) -> (Vec<CheckResult>, u64, u64) {
    run_with(checks, batches, HashMap::new(), &History::default())
}

fn run_with(
    checks: Vec<Check>,
    batches: &[RecordBatch],
    targets: HashMap<usize, HashSet<String>>,
    history: &History,
) -> (Vec<CheckResult>, u64, u64) {
    let mut c = Checker::new("s", checks, &batches[0].schema(), targets, 7, Some("p")).unwrap();
    let (mut kept, mut quarantined) = (0, 0);
    for b in batches {
        let (good, bad) = c.apply(b).unwrap();
        kept += good.num_rows() as u64;
        quarantined += bad.map(|b| b.num_rows() as u64).unwrap_or(0);
    }
    (c.finish(history), kept, quarantined)
}

#[test]
fn not_null_passes_and_fails_with_tolerance() {
    let b = batch(&[Some(1), None, Some(3), None], &[Some("a"); 4], &[1.0; 4]);
    let (r, _, _) = run(vec![check(Kind::NotNull { column: "id".into() }, Severity::Block)], std::slice::from_ref(&b));
    assert!(!r[0].passed);
    assert_eq!(r[0].failing_rows, 2);
    let mut c = check(Kind::NotNull { column: "id".into() }, Severity::Block);
    c.tolerance = 0.5; // half of 4 rows may fail
    assert!(run(vec![c.clone()], std::slice::from_ref(&b)).0[0].passed);
    c.tolerance = 1.0; // a count: one row may fail
    assert!(!run(vec![c], std::slice::from_ref(&b)).0[0].passed);
    let ok = batch(&[Some(1)], &[Some("a")], &[1.0]);
    assert!(run(vec![check(Kind::NotNull { column: "id".into() }, Severity::Block)], &[ok]).0[0].passed);
}

#[test]
fn accepted_values_range_and_regex() {
    let b = batch(&[Some(1), Some(2), Some(3)], &[Some("ok"), Some("bad"), None], &[5.0, -1.0, 200.0]);
    let values: HashSet<String> = ["ok".to_string()].into();
    let (r, _, _) = run(
        vec![
            check(Kind::AcceptedValues { column: "name".into(), values }, Severity::Warn),
            check(Kind::Range { column: "amount".into(), min: Some(0.0), max: Some(100.0) }, Severity::Warn),
            check(Kind::Regex { column: "name".into(), pattern: regex::Regex::new("^o").unwrap() }, Severity::Warn),
        ],
        &[b],
    );
    assert_eq!((r[0].passed, r[0].failing_rows), (false, 1), "nulls are left to not_null");
    assert!(r[0].sample[0].contains("\"bad\""));
    assert_eq!(r[1].failing_rows, 2);
    assert_eq!(r[2].failing_rows, 1);
}

#[test]
fn unique_spans_batches_and_composite_keys() {
    let a = batch(&[Some(1), Some(2)], &[Some("x"), Some("x")], &[1.0, 1.0]);
    let b = batch(&[Some(2), Some(1), None, None], &[Some("y"), Some("x"), Some("x"), Some("x")], &[1.0; 4]);
    let (r, _, _) =
        run(vec![check(Kind::Unique { columns: vec!["id".into()] }, Severity::Warn)], &[a.clone(), b.clone()]);
    assert_eq!(r[0].failing_rows, 2, "ids 2 and 1 repeat in the second batch; nulls are not duplicates");
    let (r, _, _) =
        run(vec![check(Kind::Unique { columns: vec!["id".into(), "name".into()] }, Severity::Warn)], &[a, b]);
    assert_eq!(r[0].failing_rows, 1, "only (1, x) repeats");
    assert!(r[0].sample[0].contains("id=1, name=x"));
}

#[test]
fn quarantine_moves_failing_rows_out() {
    let b = batch(&[Some(1), None, Some(3)], &[Some("a"), Some("b"), Some("c")], &[1.0, 2.0, 3.0]);
    let mut c = Checker::new(
        "s",
        vec![check(Kind::NotNull { column: "id".into() }, Severity::Quarantine)],
        &b.schema(),
        HashMap::new(),
        42,
        Some("2024-01-01"),
    )
    .unwrap();
    let (good, bad) = c.apply(&b).unwrap();
    assert_eq!(good.num_rows(), 2);
    let bad = bad.unwrap();
    assert_eq!(bad.num_rows(), 1);
    assert_eq!(bad.column(1).as_any().downcast_ref::<StringArray>().unwrap().value(0), "b");
    assert_eq!(bad.column(3).as_any().downcast_ref::<Int64Array>().unwrap().value(0), 42);
    assert_eq!(bad.column(4).as_any().downcast_ref::<StringArray>().unwrap().value(0), "2024-01-01");
    assert_eq!(bad.column(6).as_any().downcast_ref::<StringArray>().unwrap().value(0), "id is null");
    let r = c.finish(&History::default());
    assert!(!r[0].passed && r[0].failing_rows == 1);
}

#[test]
fn relationships_against_target_values() {
    let b = batch(&[Some(1), Some(2), Some(9)], &[Some("a"); 3], &[1.0; 3]);
    let targets = HashMap::from([(0, HashSet::from(["1".to_string(), "2".to_string()]))]);
    let k =
        Kind::Relationships { column: "id".into(), target: RelTarget::Step("dim".into()), target_column: "id".into() };
    let (r, _, _) = run_with(vec![check(k, Severity::Warn)], &[b], targets, &History::default());
    assert_eq!(r[0].failing_rows, 1);
    assert!(r[0].sample[0].contains("\"9\" is not in dim.id"));
}

#[test]
fn dataset_level_checks_on_empty_and_full_input() {
    let empty = batch(&[], &[], &[]);
    let checks = vec![
        check(Kind::RowCount { min: Some(1), max: None }, Severity::Block),
        check(Kind::Volume { max_change: 0.5 }, Severity::Warn),
    ];
    let (r, _, _) = run(checks.clone(), std::slice::from_ref(&empty));
    assert!(!r[0].passed, "an empty partition fails row_count >= 1");
    assert!(r[1].passed, "no history yet");
    let full = batch(&[Some(1), Some(2), Some(3)], &[Some("a"); 3], &[1.0; 3]);
    let h = History { previous_rows: Some(10), ..Default::default() };
    let (r, _, _) = run_with(checks, &[full], HashMap::new(), &h);
    assert!(r[0].passed);
    assert!(!r[1].passed && r[1].observed.contains("-70.0%"), "{:?}", r[1]);
}

#[test]
fn freshness_and_anomaly() {
    let b = RecordBatch::try_from_iter([("at", Arc::new(TimestampSecondArray::from(vec![1_000, 5_000])) as ArrayRef)])
        .unwrap();
    let fresh = check(Kind::Freshness { column: "at".into(), max_age_secs: 3_600 }, Severity::Block);
    let h = History { logical_time: 6_000, ..Default::default() };
    assert!(run_with(vec![fresh.clone()], std::slice::from_ref(&b), HashMap::new(), &h).0[0].passed);
    let h = History { logical_time: 50_000, ..Default::default() };
    assert!(!run_with(vec![fresh], std::slice::from_ref(&b), HashMap::new(), &h).0[0].passed);

    let anomaly = check(Kind::Anomaly { metric: Metric::RowCount, runs: 3, z: 3.0 }, Severity::Warn);
    let name = anomaly.name.clone();
    let few = History { metrics: HashMap::from([(name.clone(), vec![2.0, 2.0])]), ..Default::default() };
    assert!(
        run_with(vec![anomaly.clone()], std::slice::from_ref(&b), HashMap::new(), &few).0[0].passed,
        "inactive before 3 runs"
    );
    let steady = History { metrics: HashMap::from([(name.clone(), vec![2.0, 2.1, 1.9])]), ..Default::default() };
    assert!(run_with(vec![anomaly.clone()], std::slice::from_ref(&b), HashMap::new(), &steady).0[0].passed);
    let big = History { metrics: HashMap::from([(name, vec![100.0, 101.0, 99.0])]), ..Default::default() };
    let r = run_with(vec![anomaly], &[b], HashMap::new(), &big).0;
    assert!(!r[0].passed && r[0].observed.contains("z = "), "{:?}", r[0]);
    assert_eq!(Checker::metric_value(&r[0]), Some(2.0));
}

#[test]
fn checks_name_missing_or_wrong_columns() {
    let b = batch(&[Some(1)], &[Some("a")], &[1.0]);
    let e = Checker::new(
        "s",
        vec![check(Kind::NotNull { column: "nope".into() }, Severity::Block)],
        &b.schema(),
        HashMap::new(),
        1,
        None,
    )
    .err()
    .unwrap();
    assert!(e.contains("`nope`") && e.contains("does not output"), "{e}");
    let e = Checker::new(
        "s",
        vec![check(Kind::Regex { column: "id".into(), pattern: regex::Regex::new("x").unwrap() }, Severity::Block)],
        &b.schema(),
        HashMap::new(),
        1,
        None,
    )
    .err()
    .unwrap();
    assert!(e.contains("cannot read column `id`"), "{e}");
    assert_eq!(parse_duration("36h"), Some(129_600));
    assert_eq!(parse_duration("2d"), Some(172_800));
    assert_eq!(parse_duration("h"), None);
}
