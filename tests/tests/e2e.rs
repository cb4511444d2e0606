//! End-to-end tests of the `weir` binary: the orders example, hostile plugins, config
//! errors, malformed input and plugin inspection.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Date32Type, Float64Type, Int64Type};
use arrow_array::Array;
use weir_tests::*;

// ------------------------------------------------------------------------------------------
// The orders example

/// Copy the example into a temp dir, pointing its plugin paths at the built plugins.
fn example_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("examples/orders");
    for sub in ["data", "secrets"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap().flatten() {
            std::fs::copy(e.path(), dir.path().join(sub).join(e.file_name())).unwrap();
        }
    }
    let plugins = plugin("mask").parent().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(src.join("pipeline.toml")).unwrap().replace("../../dist/plugins", &plugins);
    std::fs::write(dir.path().join("pipeline.toml"), text).unwrap();
    dir
}

#[derive(Debug, Clone)]
struct RawOrder {
    email: String,
    country: String,
    amount: f64,
    status: String,
    ordered_at: String,
    updated_at: String,
}

/// The example's input, read independently of weir: the rows a careful reader would keep
/// (malformed ones dropped), in file order.
fn raw_orders(dir: &Path) -> Vec<(i64, RawOrder)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("data")).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    let mut rows = Vec::new();
    for f in files {
        let mut r = csv::ReaderBuilder::new().flexible(true).from_path(&f).unwrap();
        for rec in r.records() {
            let rec = rec.unwrap();
            if rec.len() != 7 {
                continue;
            }
            let (Ok(id), Ok(amount)) = (rec[0].parse::<i64>(), rec[3].parse::<f64>()) else {
                continue;
            };
            rows.push((
                id,
                RawOrder {
                    email: rec[1].to_string(),
                    country: rec[2].to_string(),
                    amount,
                    status: rec[4].to_string(),
                    ordered_at: rec[5].to_string(),
                    updated_at: rec[6].to_string(),
                },
            ));
        }
    }
    rows
}

#[test]
fn orders_example_end_to_end() {
    let dir = example_copy();
    let out = weir(dir.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 3, "success with a warning (orders without a country): {}", out.stderr);
    let summary = out.json();
    let raw = raw_orders(dir.path());

    // Expected staging: the latest version (greatest updated_at, later row on ties) per order.
    let mut latest: BTreeMap<i64, RawOrder> = BTreeMap::new();
    for (id, o) in &raw {
        match latest.get(id) {
            Some(cur) if cur.updated_at > o.updated_at => {}
            _ => {
                latest.insert(*id, o.clone());
            }
        }
    }
    // Orders whose latest version has a negative amount are quarantined by the range check.
    let negative: Vec<i64> = latest.iter().filter(|(_, o)| o.amount < 0.0).map(|(id, _)| *id).collect();
    assert!(!negative.is_empty());
    let quarantined: BTreeMap<i64, RawOrder> = negative.iter().map(|id| (*id, latest.remove(id).unwrap())).collect();
    let steps = summary["steps"].as_array().unwrap();
    assert_eq!(steps[0]["name"], "stg_orders");
    assert_eq!(steps[0]["rows_read"].as_u64().unwrap(), raw.len() as u64);
    assert_eq!(steps[0]["rows_skipped"], 2, "the two malformed rows are skipped and counted");
    assert_eq!(steps[0]["rows_written"].as_u64().unwrap(), latest.len() as u64);
    assert_eq!(steps[0]["rows_quarantined"].as_u64().unwrap(), quarantined.len() as u64);
    let no_country = latest.values().filter(|o| o.country.is_empty()).count() as u64;
    let warn = steps[0]["checks"].as_array().unwrap().iter().find(|c| c["check"] == "not_null(country)").unwrap();
    assert_eq!((warn["passed"].as_bool(), warn["failing_rows"].as_u64()), (Some(false), Some(no_country)));
    assert!(steps[0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] != "not_null(country)")
        .all(|c| c["passed"] == true));
    // the quarantine dataset holds exactly those orders, with run, partition, check and reason
    let qfiles = parquet_files(&dir.path().join("out/stg_orders_quarantine"));
    assert_eq!(qfiles.len(), 1);
    assert_eq!(qfiles[0].1, [("partition".to_string(), "__all__".to_string())]);
    let q = &read_parquet(&qfiles[0].0)[0];
    let qids: Vec<i64> = q.column(0).as_primitive::<Int64Type>().values().to_vec();
    assert_eq!(qids.iter().copied().collect::<std::collections::BTreeSet<_>>(), quarantined.keys().copied().collect());
    let schema = q.schema();
    let col = |n: &str| q.column(schema.index_of(n).unwrap()).clone();
    assert!(col("_weir_check").as_string::<i32>().iter().all(|v| v == Some("range(amount)")));
    assert!(col("_weir_reason").as_string::<i32>().value(0).contains("is outside [0, -]"));
    assert_eq!(col("_weir_run_id").as_primitive::<Int64Type>().value(0), summary["run_id"].as_i64().unwrap());
    assert_eq!(steps[0]["partitions"].as_array().unwrap().len(), 7);
    assert!(out.stderr.contains("orders_2024-01-03.csv:18: expected 7 fields, found 5"), "{}", out.stderr);
    assert!(out.stderr.contains("orders_2024-01-05.csv:43: column `amount`"), "{}", out.stderr);

    // Read stg_orders back, independently.
    let key = b"demo-only-key-do-not-use-in-production";
    let mut seen: HashMap<i64, ()> = HashMap::new();
    let files = parquet_files(&dir.path().join("out/stg_orders"));
    assert_eq!(files.len(), 7);
    let emails: std::collections::HashSet<&str> = raw.iter().map(|(_, o)| o.email.as_str()).collect();
    for (file, hive) in &files {
        assert_eq!(hive[0].0, "order_date");
        for b in read_parquet(file) {
            let names: Vec<String> = b.schema().fields().iter().map(|f| f.name().clone()).collect();
            assert_eq!(names, ["order_id", "email_hash", "country", "amount", "status", "ordered_at", "updated_at"]);
            let ids = b.column(0).as_primitive::<Int64Type>();
            let hashes = b.column(1).as_string::<i32>();
            let status = b.column(4).as_string::<i32>();
            let amount = b.column(3).as_primitive::<Float64Type>();
            for row in 0..b.num_rows() {
                let id = ids.value(row);
                assert!(seen.insert(id, ()).is_none(), "order {id} appears twice");
                let want = &latest[&id];
                assert_eq!(status.value(row), want.status, "order {id} keeps its latest status");
                assert_eq!(amount.value(row), want.amount, "order {id} keeps its latest amount");
                assert!(hive[0].1 == want.ordered_at[..10], "order {id} is in its order date's partition");
                // the email is masked with HMAC-SHA256 under the configured key
                let h = hashes.value(row);
                assert!(!emails.contains(h) && !h.contains('@'), "raw email left in stg_orders: {h}");
                let e = want.email.as_bytes();
                let expected = weir_sdk::hashing::hash_strings(Some(key), &[0, e.len() as u32], e).unwrap();
                assert_eq!(h.as_bytes(), &expected[..]);
            }
            // no column anywhere holds a raw email
            for c in b.columns() {
                if let Some(s) = c.as_string_opt::<i32>() {
                    assert!(s.iter().flatten().all(|v| !v.contains('@')));
                }
            }
        }
    }
    assert_eq!(seen.len(), latest.len());

    // The mart equals a direct computation over the input.
    let mut expected: BTreeMap<(String, String), (i64, f64)> = BTreeMap::new();
    for o in latest.values() {
        let e = expected.entry((o.ordered_at[..10].to_string(), o.country.clone())).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += o.amount;
    }
    let mart_files = parquet_files(&dir.path().join("out/mart_revenue_daily"));
    assert_eq!(mart_files.len(), 1);
    let mut got: BTreeMap<(String, String), (i64, f64)> = BTreeMap::new();
    for b in read_parquet(&mart_files[0].0) {
        let names: Vec<String> = b.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["day", "country", "order_count", "revenue"]);
        let day = b.column(0).as_primitive::<Date32Type>();
        for row in 0..b.num_rows() {
            let d = day.value_as_date(row).unwrap().to_string();
            let c = b.column(1).as_string::<i32>().value(row).to_string();
            let n = b.column(2).as_primitive::<Int64Type>().value(row);
            let r = b.column(3).as_primitive::<Float64Type>().value(row);
            assert!(got.insert((d, c), (n, r)).is_none());
        }
    }
    assert_eq!(got.len(), expected.len());
    for (k, (n, r)) in &expected {
        let (gn, gr) = got[k];
        assert_eq!(gn, *n, "order_count for {k:?}");
        assert!((gr - r).abs() < 1e-6, "revenue for {k:?}: {gr} vs {r}");
    }
    let total: f64 = got.values().map(|v| v.1).sum();
    let direct: f64 = latest.values().map(|o| o.amount).sum();
    assert!((total - direct).abs() < 1e-6);

    // Nothing left behind but the datasets.
    assert_eq!(entries(&dir.path().join("out")), ["mart_revenue_daily", "stg_orders", "stg_orders_quarantine"]);

    // A second run of the same input, config and plugins is recognised and does nothing.
    let before = snapshot(&dir.path().join("out"));
    let again = weir(dir.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.json()["status"], "UP_TO_DATE");
    assert_eq!(again.json()["identical_to"], summary["run_id"]);
    assert_eq!(snapshot(&dir.path().join("out")), before);
    // Forced, it runs again and rewrites identical files: no duplicates, same bytes.
    let forced = weir(dir.path(), &["run", "pipeline.toml", "--json", "--force"]);
    assert_eq!(forced.code, 3, "{}", forced.stderr);
    assert_eq!(forced.json()["status"], "SUCCESS");
    let after = snapshot(&dir.path().join("out"));
    let data = |s: &[(PathBuf, Vec<u8>)]| {
        s.iter().filter(|(p, _)| !p.starts_with("stg_orders_quarantine")).cloned().collect::<Vec<_>>()
    };
    assert_eq!(data(&after), data(&before), "a rerun rewrites identical files");
    // the quarantine of that partition is replaced, not appended to: no duplicates
    let qfiles = parquet_files(&dir.path().join("out/stg_orders_quarantine"));
    assert_eq!(qfiles.len(), 1);
    assert_eq!(read_parquet(&qfiles[0].0)[0].num_rows(), quarantined.len());

    // The history knows both runs, with rows per step and plugin digests.
    let runs = weir(dir.path(), &["runs", "--pipeline", "pipeline.toml", "--json"]).json();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r["status"] == "SUCCESS"));
    assert_eq!(runs[0]["attempt"], 2, "the forced rerun is attempt 2 of the same fingerprint");
    assert_eq!(runs[0]["steps"][0]["rows_written"].as_u64().unwrap(), latest.len() as u64);
    assert_eq!(runs[0]["plugins"].as_object().unwrap().len(), 5, "four transforms and a quality rule");
    let show = weir(dir.path(), &["runs", "--pipeline", "pipeline.toml", "show", &runs[1]["id"].to_string()]);
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert!(show.stdout.contains("SUCCESS") && show.stdout.contains("plugin    mask"), "{}", show.stdout);
    assert!(show.stdout.contains("published created"), "{}", show.stdout);
}

#[test]
fn partition_run_reads_only_that_partition() {
    let dir = example_copy();
    let out = weir(dir.path(), &["run", "pipeline.toml", "--partition", "2024-01-01", "--json"]);
    assert!(out.code == 0 || out.code == 3, "{}", out.stderr);
    let lines =
        std::fs::read_to_string(dir.path().join("data/orders_2024-01-01.csv")).unwrap().lines().count() as u64 - 1;
    let s = out.json();
    assert_eq!(s["partition"], "2024-01-01");
    assert_eq!(s["steps"][0]["rows_read"].as_u64().unwrap(), lines);
    assert_eq!(entries(&dir.path().join("out/stg_orders")), ["order_date=2024-01-01"]);

    let missing = weir(dir.path(), &["run", "pipeline.toml", "--partition", "1999-01-01"]);
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("no input files match") && missing.stderr.contains("orders_1999-01-01.csv"),
        "{}",
        missing.stderr
    );
}

// ------------------------------------------------------------------------------------------
// Hostile plugins

const INPUT_CSV: &str = "id,name\n1,a\n2,b\n3,c\n";

/// A pipeline: csv -> hostile(mode) -> out/data.
fn hostile_pipeline(dir: &Path, mode: &str, limits: &str) {
    std::fs::write(dir.join("in.csv"), INPUT_CSV).unwrap();
    let text = format!(
        r#"[pipeline]
name = "hostile"

[sources.input]
format = "csv"
path = "in.csv"

[plugins.hostile]
path = "{}"
{limits}

[steps.attack]
input = "input"
output = {{ path = "out/data" }}

[[steps.attack.transforms]]
plugin = "hostile"
config = {{ {config} }}
"#,
        plugin("hostile").display(),
        // a mode name, or the whole config table's contents
        config = if mode.contains('=') { mode.to_string() } else { format!("mode = \"{mode}\"") }
    );
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
}

/// Publish a good output first (mode `env` passes batches through when the sandbox hides the
/// environment), then run `mode`: it must fail with `expect` in the message and leave the
/// published output exactly as it was, with no staging left behind.
fn assert_contained(mode: &str, limits: &str, expect: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    hostile_pipeline(dir.path(), "env", "");
    let ok = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(ok.code, 0, "baseline run: {}", ok.stderr);
    let before = snapshot(&dir.path().join("out"));
    assert!(!before.is_empty());

    hostile_pipeline(dir.path(), mode, limits);
    let (out, peak) = weir_with_peak_rss(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1, "mode {mode} must fail the run: {}", out.stderr);
    // weir's own memory: the plugin's memory cap plus the host's, nowhere near what the
    // attack asked for (plugin linear memory counts in weir's RSS)
    assert!(peak < 768 << 20, "mode {mode}: weir's peak RSS was {} MiB", peak >> 20);
    for e in expect {
        assert!(out.stderr.contains(e), "mode {mode}: expected {e:?} in:\n{}", out.stderr);
    }
    assert!(
        // `hostile (transform 1 of 1)` in a batch, `hostile` at init
        out.stderr.contains("pipeline `hostile`, step `attack`, plugin `hostile"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("SANDBOX ESCAPE"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked at runtime"), "the host must not panic: {}", out.stderr);
    assert_eq!(snapshot(&dir.path().join("out")), before, "mode {mode}: the published output changed");
    assert_eq!(entries(&dir.path().join("out")), ["data"], "mode {mode}: staging left behind");
    out
}

#[test]
fn hostile_infinite_loop_hits_the_deadline() {
    let started = std::time::Instant::now();
    assert_contained("loop", "timeout_ms = 300", &["batch 1", "exceeded its wall-clock deadline of 300ms"]);
    // not a timing assertion on weir's speed: a guard that the deadline stopped the loop at all
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
}

#[test]
fn hostile_memory_bomb_hits_the_cap() {
    assert_contained("memory", "memory_mb = 32", &["batch 1", "hit its memory cap of 32 MiB"]);
}

#[test]
fn hostile_panic_is_a_contained_trap() {
    assert_contained("panic", "", &["batch 1", "trapped", "hostile plugin panics on purpose"]);
}

#[test]
fn hostile_file_read_is_denied() {
    assert_contained("read_file", "", &["could not read /etc/passwd"]);
}

#[test]
fn hostile_socket_is_denied() {
    assert_contained("socket", "", &["could not connect to 127.0.0.1:22"]);
}

#[test]
fn hostile_garbage_output_is_rejected() {
    assert_contained("garbage", "", &["batch 1", "not a valid Arrow IPC stream"]);
}

#[test]
fn hostile_schema_lie_is_rejected() {
    assert_contained("schema_lie", "", &["batch 1", "differs from the schema it declared", "surprise: Int64"]);
}

#[test]
fn hostile_output_flood_is_capped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    hostile_pipeline(dir.path(), "shout", "");
    let out = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("[attack/hostile] stdout:"), "{}", out.stderr);
    assert!(out.stderr.contains("bytes dropped"), "{}", out.stderr);
    assert!(out.stderr.len() < 512 * 1024, "stdout flood was forwarded uncapped: {} bytes", out.stderr.len());
    // the plugin's own lines have their own target: silenced alone, weir's notes about them stay
    let quiet = weir(dir.path(), &["run", "pipeline.toml", "--force", "--log-level", "weir::plugin=off"]);
    assert_eq!(quiet.code, 0, "{}", quiet.stderr);
    assert!(!quiet.stderr.contains("!!!!"), "{}", quiet.stderr);
    assert!(quiet.stderr.contains("bytes dropped") && quiet.stderr.contains("weir: plugin"), "{}", quiet.stderr);
    let json = weir(dir.path(), &["run", "pipeline.toml", "--force", "--log-format", "json"]);
    let lines: Vec<serde_json::Value> = json.stderr.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let target = |text: &str| {
        let line = lines.iter().find(|l| l["message"].as_str().unwrap().contains(text)).unwrap();
        line["target"].as_str().unwrap().to_string()
    };
    assert_eq!(target("stdout: !!!!"), "weir::plugin");
    assert_eq!(target("bytes dropped"), "weir");
}

#[test]
fn hostile_sleep_is_cut_short_at_the_deadline() {
    // a plugin blocked in a WASI sleep (a host call the epoch ticker cannot interrupt)
    let started = std::time::Instant::now();
    assert_contained(
        r#"mode = "slow", sleep_ms = 120000"#,
        "timeout_ms = 500",
        &["batch 1", "exceeded its wall-clock deadline of 500ms"],
    );
    // a guard that the deadline held at all, not a timing assertion: the sleep asked for 120 s
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "{:?}", started.elapsed());
}

#[test]
fn hostile_log_flood_is_capped_per_call_and_per_run_and_said_once() {
    let dir = tempfile::tempdir().unwrap();
    // three batches of 200,000 log lines of 1 KiB each: 600 MB asked for
    hostile_pipeline(dir.path(), "log_flood", "max_log_kb = 100\ntimeout_ms = 60000");
    let text = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    std::fs::write(
        dir.path().join("pipeline.toml"),
        text.replace("name = \"hostile\"", "name = \"hostile\"\nbatch_size = 1"),
    )
    .unwrap();
    let (out, peak) = weir_with_peak_rss(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 0, "a flood is capped, not fatal: {}", &out.stderr[out.stderr.len().saturating_sub(2000)..]);
    assert!(out.stderr.len() < 300 << 10, "the log was flooded: {} bytes", out.stderr.len());
    let notes: Vec<&str> = out.stderr.lines().filter(|l| !l.contains("xxxxxxxx")).collect();
    assert!(
        notes
            .iter()
            .any(|l| l.contains("log lines, ") && l.contains("dropped: `log` is capped at 65536 bytes per call")),
        "the per-call cap is said: {notes:#?}"
    );
    let said = out.stderr.matches("log budget of 100 KiB per run reached (max_log_kb)").count();
    assert_eq!(said, 1, "the run cap is said once");
    assert!(out.stderr.contains("over this run its log caps dropped 599900 lines"), "the total is counted");
    assert!(peak < 512 << 20, "weir's peak RSS was {} MiB", peak >> 20);
    assert_eq!(dataset_rows(&dir.path().join("out/data")).len(), 3, "every row published");
}

#[test]
fn hostile_counter_flood_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    hostile_pipeline(dir.path(), "counter_flood", "");
    let (out, peak) = weir_with_peak_rss(dir.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(peak < 512 << 20, "weir's peak RSS was {} MiB", peak >> 20);
    assert_eq!(out.stderr.matches("at most 1000 distinct counter names per plugin").count(), 1, "{}", out.stderr);
    let counters = &out.json()["steps"][0]["counters"]["hostile"];
    assert_eq!(counters.as_object().unwrap().len(), 1000, "{counters}");
    assert!(out.stderr.contains("99000 new counter names were refused"), "{}", out.stderr);
}

#[test]
fn hostile_output_amplification_hits_the_output_budget() {
    // 3 input rows, 4,294,967,295 output rows of type Null (which cost nothing in Arrow IPC)
    assert_contained(
        "amplify",
        "",
        &[
            "batch 1",
            "returned 4294967295 rows in one call",
            "output budget of 100000000 rows per call (max_output_rows)",
        ],
    );
    assert_contained("amplify", "max_output_rows = 2", &["returned 4294967295 rows", "budget of 2 rows per call"]);
}

#[test]
fn hostile_keyed_state_misuse_is_refused_and_an_endless_finish_is_stopped() {
    // every misuse of the state interface comes back to the plugin as an error
    let dir = tempfile::tempdir().unwrap();
    hostile_pipeline(dir.path(), "state_abuse", "");
    let out = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(dataset_rows(&dir.path().join("out/data")).len(), 3);
    // a finish that asks for more forever: stopped past the rows read plus one call's cap
    let (out, peak) = {
        hostile_pipeline(dir.path(), "endless_finish", "max_output_rows = 50");
        weir_with_peak_rss(dir.path(), &["run", "pipeline.toml"])
    };
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("finish kept asking to be called again past 54 rows (it read 3)"), "{}", out.stderr);
    assert!(peak < 512 << 20, "weir's peak RSS was {} MiB", peak >> 20);
    // a snapshot sent in parts past the memory cap fails its checkpoint, even when the
    // plugin carries on as if the host had taken it
    let (out, peak) = {
        hostile_pipeline(dir.path(), "snapshot_flood", "memory_mb = 64");
        let text = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
        let text = text.replace("[pipeline]\n", "[pipeline]\ncheckpoint_every = 1\n");
        std::fs::write(dir.path().join("pipeline.toml"), text).unwrap();
        weir_with_peak_rss(dir.path(), &["run", "pipeline.toml"])
    };
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("its snapshot passed the memory cap of 64 MiB"), "{}", out.stderr);
    assert!(peak < 512 << 20, "weir's peak RSS was {} MiB", peak >> 20);
}

#[test]
fn hostile_output_schemas_weir_cannot_publish_are_refused_at_init() {
    for (mode, expect) in [
        ("dup_columns", "column `x` appears twice"),
        ("case_columns", "columns `x` and `X` differ only in case"),
        ("weir_column", "column `_weir_run_id` uses weir's own `_weir_` prefix"),
        ("union_column", "column `u` has type Union"),
    ] {
        let out = assert_contained(mode, "", &["init", expect]);
        assert!(out.stderr.contains("cannot publish"), "{mode}: {}", out.stderr);
    }
}

#[test]
fn an_output_that_cannot_be_partitioned_fails_at_once_and_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("in.csv"), INPUT_CSV).unwrap();
    std::fs::write(
        d.join("pipeline.toml"),
        r#"[pipeline]
name = "nopart"

[sources.input]
format = "csv"
path = "in.csv"

[steps.s]
input = "input"
output = { path = "out/s", partition_by = "day" }
retry = { attempts = 3, backoff_ms = 1 }
"#,
    )
    .unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("partition_by column `day` is not in the step's output"), "{}", out.stderr);
    assert!(!out.stderr.contains("retrying"), "a user error is not retried: {}", out.stderr);
    let run = &weir(d, &["runs", "--pipeline", "pipeline.toml", "--json"]).json()[0];
    assert_eq!(run["attempts"].as_array().unwrap().len(), 1, "{run}");
}

#[test]
fn hostile_column_rewrite_declarations_are_held_to() {
    assert_contained(
        "rewrite_rows",
        "",
        &["batch 1", "broke its column rewrite declaration", "returned 2 rows for a batch of 3"],
    );
    // refused at init, before any batch
    let dir = tempfile::tempdir().unwrap();
    hostile_pipeline(dir.path(), "rewrite_unknown", "");
    let out = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "step `attack`, plugin `hostile`: init failed: broke its column rewrite declaration (`weir.rewrites`): \
             it names `nope`, which is not a column of the input"
        ),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(!dir.path().join("out/data").exists(), "nothing published");
}

#[test]
fn hostile_row_filter_declarations_are_held_to() {
    assert_contained(
        "filter_rows",
        "",
        &["batch 1", "broke its row filter declaration", "returned 2 mask values for a batch of 3 rows"],
    );
    assert_contained(
        "filter_type",
        "",
        &["batch 1", "broke its row filter declaration", "where a filter returns one Boolean column"],
    );
    // refused at init, before any batch
    let dir = tempfile::tempdir().unwrap();
    hostile_pipeline(dir.path(), "filter_schema", "");
    let out = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("init failed: broke its row filter declaration (`weir.filter`): its output schema [")
            && out.stderr.contains("is not its input schema"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(!dir.path().join("out/data").exists(), "nothing published");
}

#[test]
fn a_filter_sends_only_the_columns_it_tests_and_the_host_drops_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let note = "n".repeat(2000);
    let mut csv = String::from("id,amount,country,note\n");
    for i in 0..300 {
        let country = ["DE", "FR", "US"][i % 3];
        csv.push_str(&format!("{i},{}.5,{country},{note}{i}\n", i % 50));
    }
    std::fs::write(dir.path().join("in.csv"), &csv).unwrap();
    let text = format!(
        r#"[pipeline]
name = "wide"
batch_size = 64

[sources.input]
format = "csv"
path = "in.csv"

[plugins.filter]
path = "{}"

[steps.kept]
input = "input"
output = {{ path = "out/data" }}

[[steps.kept.transforms]]
plugin = "filter"
config.where = [{{ column = "amount", op = ">", value = 20 }}, {{ column = "country", op = "in", values = ["DE", "US"] }}]
"#,
        plugin("filter").display()
    );
    std::fs::write(dir.path().join("pipeline.toml"), text).unwrap();
    let out = weir(dir.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json = out.json();
    let p = &json["steps"][0]["timings"]["plugins"][0];
    // the notes weigh 600 KB and never cross; amounts and countries (about 4 KB) go in and
    // one mask bit per row comes back, with IPC framing
    assert!(p["bytes_in"].as_u64().unwrap() < 40_000, "{p}");
    assert!(p["bytes_out"].as_u64().unwrap() < 10_000, "{p}");
    let want: Vec<usize> = (0..300).filter(|i| i % 50 >= 20 && i % 3 != 1).collect();
    assert_eq!(json["steps"][0]["counters"]["filter"]["rows_kept"], want.len());
    assert_eq!(json["steps"][0]["rows_written"], want.len());
    let files = parquet_files(&dir.path().join("out/data"));
    let batches = read_parquet(&files[0].0);
    let names: Vec<String> = batches[0].schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["id", "amount", "country", "note"], "every column stays");
    let mut got = Vec::new();
    for b in &batches {
        for r in 0..b.num_rows() {
            let id = b.column(0).as_primitive::<Int64Type>().value(r);
            assert_eq!(b.column(3).as_string::<i32>().value(r), format!("{note}{id}"), "rows stay whole");
            got.push(id as usize);
        }
    }
    assert_eq!(got, want, "the rows kept, in input order");
}

#[test]
fn a_mask_sends_only_the_columns_it_masks_through_the_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let note = "n".repeat(2000);
    let mut csv = String::from("id,email,note\n");
    for i in 0..200 {
        csv.push_str(&format!("{i},u{i}@example.com,{note}{i}\n"));
    }
    std::fs::write(dir.path().join("in.csv"), &csv).unwrap();
    let text = format!(
        r#"[pipeline]
name = "wide"

[sources.input]
format = "csv"
path = "in.csv"

[plugins.mask]
path = "{}"

[steps.masked]
input = "input"
output = {{ path = "out/data" }}

[[steps.masked.transforms]]
plugin = "mask"
config.columns = {{ email = {{ method = "sha256" }} }}
"#,
        plugin("mask").display()
    );
    std::fs::write(dir.path().join("pipeline.toml"), text).unwrap();
    let out = weir(dir.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let p = &out.json()["steps"][0]["timings"]["plugins"][0];
    // the notes weigh 400 KB and must not cross; the emails (3.5 KB) and their digests
    // (12.8 KB) do, with IPC framing
    assert!(p["bytes_in"].as_u64().unwrap() < 20_000, "{p}");
    assert!(p["bytes_out"].as_u64().unwrap() < 40_000, "{p}");
    let files = parquet_files(&dir.path().join("out/data"));
    let batches = read_parquet(&files[0].0);
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 200);
    let b = &batches[0];
    let names: Vec<String> = b.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["id", "email", "note"], "columns stay in place");
    assert_eq!(b.column(0).as_primitive::<Int64Type>().value(7), 7);
    assert_eq!(b.column(2).as_string::<i32>().value(7), format!("{note}7"), "untouched columns are intact");
    use sha2::Digest;
    let want: String = sha2::Sha256::digest(b"u7@example.com").iter().map(|x| format!("{x:02x}")).collect();
    assert_eq!(b.column(1).as_string::<i32>().value(7), want);
}

/// The hostile plugin's bytes with every occurrence of `from` replaced by `to` (same length,
/// so the component stays well-formed); fails the test if `from` does not occur.
fn hostile_with(from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(plugin("hostile")).unwrap();
    let mut replaced = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            replaced += 1;
        }
        i += 1;
    }
    assert!(replaced > 0, "{} not in the hostile plugin", String::from_utf8_lossy(from));
    bytes
}

#[test]
fn a_plugin_built_against_contract_0_2_0_still_runs() {
    // 0.2.1 and 0.2.2 only added imports: a 0.2.0 plugin (every name it imports and
    // exports says 0.2.0) links and runs unchanged
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(plugin("hostile")).unwrap();
    let mut replaced = 0;
    for i in 0..bytes.len().saturating_sub(17) {
        if bytes[i..].starts_with(b"weir:plugin") {
            if let Some(at) = bytes[i..i + 40].windows(6).position(|w| w == b"@0.2.2") {
                bytes[i + at + 5] = b'0';
                replaced += 1;
            }
        }
    }
    assert!(replaced >= 2, "the plugin names its contract: {replaced}");
    std::fs::write(dir.path().join("old.wasm"), bytes).unwrap();
    let out = weir(dir.path(), &["plugin", "inspect", "old.wasm"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("weir:plugin@0.2.0 (supported by this weir"), "{}", out.stdout);
    hostile_pipeline(dir.path(), "env", "");
    let text = std::fs::read_to_string(dir.path().join("pipeline.toml"))
        .unwrap()
        .replace(&plugin("hostile").display().to_string(), "old.wasm");
    std::fs::write(dir.path().join("pipeline.toml"), text).unwrap();
    let run = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn incompatible_contract_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let patched = hostile_with(b"weir:plugin/transform@0.2.2", b"weir:plugin/transform@0.9.0");
    let wasm = dir.path().join("future.wasm");
    std::fs::write(&wasm, patched).unwrap();
    let out = weir(dir.path(), &["plugin", "inspect", "future.wasm"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.contains("weir:plugin@0.9.0 (NOT supported: this weir runs weir:plugin@0.2.x)"),
        "{}",
        out.stdout
    );
    hostile_pipeline(dir.path(), "env", "");
    let text = std::fs::read_to_string(dir.path().join("pipeline.toml"))
        .unwrap()
        .replace(&plugin("hostile").display().to_string(), "future.wasm");
    std::fs::write(dir.path().join("pipeline.toml"), text).unwrap();
    let run = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("was built against weir:plugin@0.9.0, but this weir supports weir:plugin@0.2.x"),
        "{}",
        run.stderr
    );
    assert!(!dir.path().join("out").exists());
}

// ------------------------------------------------------------------------------------------
// Config errors, malformed input, inspection

#[test]
fn config_errors_name_file_line_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    hostile_pipeline(dir.path(), "env", "");
    let good = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();

    let cases: Vec<(String, &str, usize)> = vec![
        (good.replace("format = \"csv\"", "format = \"csv\"\nseperator = \";\""), "unknown field `seperator`", 6),
        (good.replace("name = \"hostile\"", "name = \"hostile\"\nbatch_size = \"many\""), "invalid type", 3),
        (good.replace(&plugin("hostile").display().to_string(), "missing/x.wasm"), "does not exist", 9),
        (
            good.replace("{limits}", "").replace("[plugins.hostile]\n", "[plugins.hostile]\nsha256 = \"abc123\"\n"),
            "sha256 pin does not match",
            9,
        ),
        (good.replace("plugin = \"hostile\"", "plugin = \"hostle\""), "plugin `hostle`, which is not declared", 17),
    ];
    for (text, needle, line) in cases {
        std::fs::write(dir.path().join("pipeline.toml"), &text).unwrap();
        for cmd in ["validate", "run"] {
            let out = weir(dir.path(), &[cmd, "pipeline.toml"]);
            assert_eq!(out.code, 2, "{cmd}: {}", out.stderr);
            assert!(out.stderr.contains(needle), "{cmd}: expected {needle:?}:\n{}", out.stderr);
            assert!(
                out.stderr.contains(&format!("pipeline.toml:{line}:")),
                "{cmd}: expected line {line}:\n{}",
                out.stderr
            );
            assert!(out.stderr.contains("hint:"), "{cmd}: {}", out.stderr);
        }
    }
    // plugin config errors come from the plugin, with the transform's line
    std::fs::write(
        dir.path().join("pipeline.toml"),
        good.replace("config = { mode = \"env\" }", "config = { mood = \"env\" }"),
    )
    .unwrap();
    let out = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("pipeline.toml:16: step `attack`, plugin `hostile` rejected its config"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("unknown field `mood`, expected one of `mode`"), "{}", out.stderr);
    assert!(!out.stderr.contains("column 7"), "JSON positions mean nothing to the user: {}", out.stderr);
}

#[test]
fn malformed_rows_fail_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    hostile_pipeline(dir.path(), "env", "");
    std::fs::write(dir.path().join("in.csv"), "id,name\n1,a\n2\n3,c\n").unwrap();
    let out = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("in.csv:3: expected 2 fields, found 1"), "{}", out.stderr);
    assert!(!dir.path().join("out").exists(), "nothing published");

    let text = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    std::fs::write(
        dir.path().join("pipeline.toml"),
        text.replace("path = \"in.csv\"", "path = \"in.csv\"\nschema = { id = \"int64\", name = \"string\" }"),
    )
    .unwrap();
    std::fs::write(dir.path().join("in.csv"), "id,name\n1,a\n2x,b\n").unwrap();
    let out = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("in.csv:3: column `id`: cannot parse \"2x\" as int64"), "{}", out.stderr);

    std::fs::write(dir.path().join("in.csv"), b"id,name\n1,a\n2,\xff\xfe\n".as_slice()).unwrap();
    let out = weir(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("in.csv:3: column `name`: invalid UTF-8"), "{}", out.stderr);
}

#[test]
fn jsonl_source_with_a_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    hostile_pipeline(dir.path(), "env", "");
    let text = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    std::fs::write(
        dir.path().join("pipeline.toml"),
        text.replace(
            "format = \"csv\"\npath = \"in.csv\"",
            "format = \"jsonl\"\npath = \"in.jsonl\"\non_error = \"skip\"",
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("in.jsonl"),
        "{\"id\": 1, \"name\": \"a\"}\n{\"id\": 2, \"name\": \n{\"id\": 3, \"name\": \"c\"}\n",
    )
    .unwrap();
    let out = weir(dir.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = out.json();
    assert_eq!(s["steps"][0]["rows_written"], 2);
    assert_eq!(s["steps"][0]["rows_skipped"], 1);
    assert!(out.stderr.contains("in.jsonl:2: not valid JSON"), "{}", out.stderr);
    let b = read_parquet(&parquet_files(&dir.path().join("out/data"))[0].0);
    assert_eq!(b[0].column(0).as_primitive::<Int64Type>().values().to_vec(), [1, 3]);
}

#[test]
fn a_plugin_importing_what_weir_lacks_is_described_and_refused() {
    // the host interface renamed (same length, every occurrence): the contract version is
    // still supported, but the sandbox has nothing to link the import to
    let dir = tempfile::tempdir().unwrap();
    let patched = hostile_with(b"weir:plugin/host@0.2.2", b"weir:plugin/hast@0.2.2");
    std::fs::write(dir.path().join("odd.wasm"), patched).unwrap();
    let out = weir(dir.path(), &["plugin", "inspect", "odd.wasm"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.contains("world:     transform"), "{}", out.stdout);
    assert!(out.stdout.contains("start:     CANNOT START in weir's sandbox"), "{}", out.stdout);
    assert!(out.stdout.contains("weir:plugin/hast@0.2.2"), "{}", out.stdout);
    assert!(out.stdout.contains("exports:\n  weir:plugin/transform@0.2.2"), "{}", out.stdout);
    let json = weir(dir.path(), &["plugin", "inspect", "odd.wasm", "--json"]).json();
    assert!(json["start"]["error"].as_str().unwrap().contains("weir:plugin/hast@0.2.2"), "{json}");
    assert_eq!(json["compatible"], true);
    // a plugin that starts reports no error
    let good = weir(dir.path(), &["plugin", "inspect", plugin("hostile").to_str().unwrap(), "--json"]).json();
    assert!(good["start"]["error"].is_null(), "{good}");
}

#[test]
fn plugin_inspect_shows_world_version_digest_imports() {
    use sha2::Digest;
    let p = plugin("mask");
    let digest: String = sha2::Sha256::digest(std::fs::read(&p).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = weir(dir.path(), &["plugin", "inspect", p.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("world:     transform"), "{}", out.stdout);
    assert!(out.stdout.contains("weir:plugin@0.2.2"), "{}", out.stdout);
    assert!(out.stdout.contains(&digest));
    assert!(out.stdout.contains("weir:plugin/host@0.2.2"));
    let json = weir(dir.path(), &["plugin", "inspect", p.to_str().unwrap(), "--json"]).json();
    assert_eq!(json["sha256"], digest);
    assert_eq!(json["compatible"], true);

    std::fs::write(dir.path().join("junk.wasm"), b"\0asm garbage").unwrap();
    let out = weir(dir.path(), &["plugin", "inspect", "junk.wasm"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("is not a WebAssembly component"), "{}", out.stderr);
}

#[test]
fn the_compile_cache_keeps_to_its_limit_dropping_what_was_used_longest_ago() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(cache.join("venv")).unwrap();
    // two compiled entries from earlier plugin versions (8 MB each, sparse), the older
    // one used longest ago, and files that are not compiled plugins
    let old = |name: &str, secs_ago: u64| {
        let p = cache.join(format!("{name}-0000000000000000.cwasm"));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago)).unwrap();
        p
    };
    let oldest = old("aaaa", 7200);
    let older = old("bbbb", 3600);
    std::fs::write(cache.join("notes.txt"), "mine").unwrap();
    std::fs::write(cache.join("venv").join("python"), "mine").unwrap();
    let cache_arg = cache.to_str().unwrap();
    let mask = plugin("mask");
    let run = |args: &[&str], limit: &str| {
        let out = weir_command(dir.path(), args).env("WEIR_CACHE_MAX_MB", limit).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // compiling mask (about 7 MB of code) takes the cache past 20 MB: the entry used
    // longest ago goes, the other stays, and so does the new one
    let (code, _, err) = run(&["plugin", "inspect", mask.to_str().unwrap(), "--cache-dir", cache_arg], "20");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("removed 1 compiled plugin(s) used longest ago"), "{err}");
    assert!(!oldest.exists(), "the entry used longest ago is removed");
    assert!(older.exists(), "the cache fits again after one removal");
    assert!(cache.join("notes.txt").exists() && cache.join("venv").join("python").exists());
    let listed = |limit: &str| {
        let (code, out, err) = run(&["plugin", "cache", "--json", "--cache-dir", cache_arg], limit);
        assert_eq!(code, Some(0), "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let json = listed("20");
    assert_eq!(json["entries"], 2, "{json}");
    assert_eq!(json["limit_bytes"], 20u64 << 20);
    let newest = json["compiled"][0]["file"].as_str().unwrap().to_string();
    assert_ne!(newest, older.to_str().unwrap(), "newest first: {json}");

    // a load from the cache marks the entry used: set it back an hour, load, look again
    let f = std::fs::File::options().write(true).open(&newest).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600 * 5)).unwrap();
    drop(f);
    let (code, out, err) = run(&["plugin", "inspect", mask.to_str().unwrap(), "--cache-dir", cache_arg], "20");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("from the compile cache"), "{out}");
    let age = std::fs::metadata(&newest).unwrap().modified().unwrap().elapsed().unwrap();
    assert!(age.as_secs() < 600, "loading marked the entry used ({age:?} ago)");

    // an unusable limit is named (and the default kept)
    let (_, out, err) = run(&["plugin", "cache", "--cache-dir", cache_arg], "lots");
    assert!(err.contains("WEIR_CACHE_MAX_MB=\"lots\" is not a whole number"), "{err}");
    assert!(out.contains("limit 2048 MB"), "{out}");

    // with a limit of 0, a newly compiled plugin is kept, alone
    let dedup = plugin("dedup");
    let (code, _, err) = run(&["plugin", "inspect", dedup.to_str().unwrap(), "--cache-dir", cache_arg], "0");
    assert_eq!(code, Some(0), "{err}");
    let json = listed("0");
    assert_eq!(json["entries"], 1, "{json}");
    assert_ne!(json["compiled"][0]["file"].as_str().unwrap(), newest, "the new entry is the one kept");
    assert!(!older.exists());

    // --clear removes compiled entries only
    let (code, out, err) = run(&["plugin", "cache", "--clear", "--cache-dir", cache_arg], "20");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("removed 1 compiled plugin(s)"), "{out}");
    assert_eq!(listed("20")["entries"], 0);
    assert!(cache.join("notes.txt").exists() && cache.join("venv").join("python").exists());
}

#[test]
fn a_plugin_rewritten_in_place_is_hashed_again() {
    // `weir` remembers a plugin file's digest by its identity (inode, size, mtime, ctime) to
    // skip reading and hashing it on every start; a rewrite must never be served the digest
    // (and compiled code) of what the file held before, even with its mtime set back.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.wasm");
    let original = std::fs::read(plugin("mask")).unwrap();
    std::fs::write(&p, &original).unwrap();
    // only files settled for 2 s are remembered (a rewrite within the timestamp
    // granularity could keep the identity)
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let first = weir(dir.path(), &["plugin", "inspect", "p.wasm", "--json"]).json();
    let again = weir(dir.path(), &["plugin", "inspect", "p.wasm", "--json"]).json();
    assert_eq!(first["sha256"], again["sha256"]);
    for key in ["load_secs", "instantiate_secs"] {
        assert!(again["start"][key].as_f64().unwrap() > 0.0, "{again}");
    }
    assert!(again["start"]["compile_secs"].is_null(), "cached the second time: {again}");

    let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
    let mut changed = original.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0x01;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::io::Write::write_all(&mut &f, &changed).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let out = weir(dir.path(), &["plugin", "inspect", "p.wasm", "--json"]);
    if out.code == 0 {
        assert_ne!(out.json()["sha256"], first["sha256"], "the rewritten file was not hashed again");
    } else {
        assert!(out.stderr.contains("p.wasm"), "{}", out.stderr);
    }
}

#[test]
fn help_teaches() {
    let dir = tempfile::tempdir().unwrap();
    let out = weir(dir.path(), &["run", "--help"]);
    assert_eq!(out.code, 0);
    assert!(out.stdout.contains("--partition") && out.stdout.contains("Examples:"), "{}", out.stdout);
    let out = weir(dir.path(), &["--help"]);
    assert!(out.stdout.contains("Exit codes"), "{}", out.stdout);
}

#[test]
fn time_split_accounts_for_every_stage_and_plugin() {
    let dir = example_copy();
    let out = weir(dir.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    let s = out.json();
    let step = &s["steps"][0];
    let t = &step["timings"];
    assert!(t["read"].as_f64().unwrap() > 0.0 && t["write"].as_f64().unwrap() > 0.0, "{t}");
    assert!(t["checks"].as_f64().unwrap() > 0.0, "the step has row checks: {t}");
    let plugins = t["plugins"].as_array().unwrap();
    let names: Vec<&str> = plugins.iter().map(|p| p["plugin"].as_str().unwrap()).collect();
    assert_eq!(names, ["mask", "dedup", "cast"], "one entry per transform, in order");
    for p in plugins {
        // every batch plus finish is one call; SDK plugins mark their phases, so nothing is unsplit
        assert!(p["calls"].as_u64().unwrap() >= 2, "{p}");
        assert!(p["bytes_in"].as_u64().unwrap() > 0 && p["bytes_out"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["guest_unsplit"].as_f64(), Some(0.0), "{p}");
        for k in ["host_encode", "copy_in", "guest_decode", "guest_compute", "guest_encode", "copy_out", "host_decode"]
        {
            assert!(p[k].as_f64().unwrap() >= 0.0, "{k} in {p}");
        }
        assert!(p["guest_compute"].as_f64().unwrap() > 0.0, "{p}");
    }
    // the phase marks are not reported as the plugin's own counters
    assert!(step["counters"].to_string().find("weir.phase").is_none(), "{}", step["counters"]);

    let out = weir(dir.path(), &["run", "pipeline.toml", "--force", "--timings"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    for want in ["time split of step `stg_orders`", "plugin mask", "copy in", "guest decode", "encode + write output"] {
        assert!(out.stdout.contains(want), "`{want}` missing from:\n{}", out.stdout);
    }
}

#[test]
fn steps_read_earlier_steps_and_keep_types() {
    // stg -> mart through a partitioned intermediate: the mart sees the partition column with
    // its original type (date), rebuilt from the hive directories.
    let dir = example_copy();
    let out = weir(dir.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    let s = out.json();
    assert_eq!(s["steps"][1]["input"], "stg_orders");
    assert_eq!(s["steps"][1]["rows_read"], s["steps"][0]["rows_written"]);
    let b = read_parquet(&parquet_files(&dir.path().join("out/mart_revenue_daily"))[0].0);
    assert_eq!(b[0].schema().field(0).data_type(), &arrow_schema::DataType::Date32);
    assert!(b[0].column(0).null_count() == 0);
}

#[test]
fn parquet_dataset_source_with_hive_partitions() {
    // The example's stg_orders (hive-partitioned Parquet) read back as a source.
    let dir = example_copy();
    assert_eq!(weir(dir.path(), &["run", "pipeline.toml"]).code, 3);
    let text = r#"[pipeline]
name = "reread"

[sources.stg]
format = "parquet"
path = "out/stg_orders"

[steps.copy]
input = "stg"
output = { path = "out/copy", partition_by = "order_date" }
"#;
    std::fs::write(dir.path().join("reread.toml"), text).unwrap();
    let out = weir(dir.path(), &["run", "reread.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = out.json();
    assert_eq!(s["steps"][0]["files"], 7);
    assert_eq!(s["steps"][0]["rows_read"], s["steps"][0]["rows_written"]);
    assert_eq!(entries(&dir.path().join("out/copy")), entries(&dir.path().join("out/stg_orders")));
    // a step with no plugins copies rows exactly
    let a: usize = parquet_files(&dir.path().join("out/stg_orders"))
        .iter()
        .map(|(f, _)| read_parquet(f).iter().map(|b| b.num_rows()).sum::<usize>())
        .sum();
    let b: usize = parquet_files(&dir.path().join("out/copy"))
        .iter()
        .map(|(f, _)| read_parquet(f).iter().map(|b| b.num_rows()).sum::<usize>())
        .sum();
    assert_eq!(a, b);
}

#[test]
fn outputs_take_row_group_size_and_compression_and_keep_every_row_in_order() {
    // Batches of 700 rows straddle row groups of 1024; columns are encoded on several
    // threads; the file must hold every row, in order, with the codec asked for.
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("id,hash,x\n");
    for i in 0..5000 {
        let hash = if i % 11 == 0 { String::new() } else { format!("{:064x}", i * 7919) };
        csv.push_str(&format!("{i},{hash},{}\n", i as f64 / 8.0));
    }
    std::fs::write(dir.path().join("rows.csv"), &csv).unwrap();
    let text = r#"[pipeline]
name = "codecs"
batch_size = 700

[sources.rows]
format = "csv"
path = "rows.csv"
schema = { id = "int64", hash = "string", x = "float64" }

[steps.snappy]
input = "rows"
output = { path = "out/snappy", row_group_size = 1024, compression = "snappy" }

[steps.default]
input = "rows"
output = { path = "out/default" }
"#;
    std::fs::write(dir.path().join("p.toml"), text).unwrap();
    let out = weir(dir.path(), &["run", "p.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for (step, codec, groups) in
        [("snappy", "SNAPPY", vec![1024, 1024, 1024, 1024, 904]), ("default", "ZSTD", vec![5000])]
    {
        let files = parquet_files(&dir.path().join("out").join(step));
        assert_eq!(files.len(), 1, "{step}");
        let file = std::fs::File::open(&files[0].0).unwrap();
        let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
        use parquet::file::reader::FileReader;
        let meta = reader.metadata();
        let sizes: Vec<i64> = meta.row_groups().iter().map(|g| g.num_rows()).collect();
        assert_eq!(sizes, groups, "{step}");
        for g in meta.row_groups() {
            for c in g.columns() {
                assert!(c.compression().to_string().starts_with(codec), "{step}: {}", c.compression());
            }
        }
        let mut lines = vec!["id,hash,x".to_string()];
        for b in read_parquet(&files[0].0) {
            let (id, hash, x) = (
                b.column(0).as_primitive::<Int64Type>(),
                b.column(1).as_string::<i32>(),
                b.column(2).as_primitive::<Float64Type>(),
            );
            for r in 0..b.num_rows() {
                let hash = if hash.is_null(r) { "" } else { hash.value(r) };
                lines.push(format!("{},{hash},{}", id.value(r), x.value(r)));
            }
        }
        assert_eq!(lines.join("\n") + "\n", csv, "{step}: rows differ");
    }
}

// ------------------------------------------------------------------------------------------
// Reliable runs: crash recovery, atomic publish

/// Rows of a dataset directory, as (day, id, name) sorted, read with the Parquet reader.
fn dataset_rows(dir: &Path) -> Vec<String> {
    let mut rows = Vec::new();
    for (f, hive) in parquet_files(dir) {
        for b in read_parquet(&f) {
            rows.extend(batch_rows(&b).into_iter().map(|r| format!("{hive:?} {r}")));
        }
    }
    rows.sort();
    rows
}

/// Each row of a batch as its values joined by commas.
fn batch_rows(b: &arrow_array::RecordBatch) -> Vec<String> {
    let fmt: Vec<_> = b
        .columns()
        .iter()
        .map(|c| arrow_cast::display::ArrayFormatter::try_new(c.as_ref(), &Default::default()).unwrap())
        .collect();
    (0..b.num_rows()).map(|r| fmt.iter().map(|f| f.value(r).to_string()).collect::<Vec<_>>().join(",")).collect()
}

/// Two steps (`a`, `b`) reading one CSV through the hostile plugin, each to its own dataset.
fn two_step_pipeline(dir: &Path, mode: &str, batch_size: usize) {
    let text = format!(
        r#"[pipeline]
name = "crashy"
batch_size = {batch_size}

[sources.input]
format = "csv"
path = "in.csv"

[plugins.hostile]
path = "{}"

[steps.a]
input = "input"
output = {{ path = "out/a" }}

[[steps.a.transforms]]
plugin = "hostile"
config = {{ mode = "{mode}", sleep_ms = 300 }}

[steps.b]
input = "input"
output = {{ path = "out/b", partition_by = "day" }}
"#,
        plugin("hostile").display()
    );
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
}

const V1: &str = "day,id,name\nmon,1,a\nmon,2,b\ntue,3,c\n";
const V2: &str = "day,id,name\nmon,1,A\nmon,2,B\ntue,3,C\ntue,4,D\nwed,5,E\n";

/// Start weir, wait for a line of its stderr containing `marker`, then kill -9 it.
fn kill_at(dir: &Path, args: &[&str], env: &[(&str, &str)], marker: &str, extra_wait: std::time::Duration) {
    kill_at_nth(dir, args, env, marker, 1, extra_wait)
}

#[test]
fn kill_9_at_any_point_leaves_old_or_new_and_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    two_step_pipeline(d, "env", 1);
    std::fs::write(d.join("in.csv"), V1).unwrap();
    assert_eq!(weir(d, &["run", "pipeline.toml"]).code, 0);
    let (old_a, old_b) = (dataset_rows(&d.join("out/a")), dataset_rows(&d.join("out/b")));
    let (snap_a, snap_b) = (snapshot(&d.join("out/a")), snapshot(&d.join("out/b")));
    assert_eq!((old_a.len(), old_b.len()), (3, 3));

    // the new state, computed by an uninterrupted run elsewhere
    let other = tempfile::tempdir().unwrap();
    two_step_pipeline(other.path(), "env", 1);
    std::fs::write(other.path().join("in.csv"), V2).unwrap();
    assert_eq!(weir(other.path(), &["run", "pipeline.toml"]).code, 0);
    let (new_a, new_b) = (dataset_rows(&other.path().join("out/a")), dataset_rows(&other.path().join("out/b")));
    assert_ne!(old_a, new_a);

    std::fs::write(d.join("in.csv"), V2).unwrap();
    let ms = std::time::Duration::from_millis;

    // 1. while a plugin runs (slow mode: 300 ms a batch)
    two_step_pipeline(d, "slow", 1);
    kill_at(d, &["run", "pipeline.toml"], &[], "plugin `hostile` ready", ms(700));
    assert_eq!(snapshot(&d.join("out/a")), snap_a, "killed mid-step: a must be exactly the old state");
    assert_eq!(snapshot(&d.join("out/b")), snap_b);
    assert!(entries(&d.join("out")).iter().any(|e| e.contains("weir-staging")), "the killed run left staging behind");

    // `weir recover` finds it by its dead pid, marks it FAILED and removes its staging
    let rec = weir(d, &["recover", "pipeline.toml"]);
    assert_eq!(rec.code, 0, "{}", rec.stderr);
    assert!(rec.stdout.contains("recovered 1 run"), "{}", rec.stdout);
    assert_eq!(entries(&d.join("out")), ["a", "b"]);
    let runs = weir(d, &["runs", "--pipeline", "pipeline.toml", "--json"]).json();
    assert_eq!(runs[0]["status"], "FAILED");
    assert!(runs[0]["error"].as_str().unwrap().contains("crashed: process"), "{}", runs[0]);

    // 2. between staging and publish
    two_step_pipeline(d, "env", 1);
    kill_at(
        d,
        &["run", "pipeline.toml"],
        &[("WEIR_DEBUG_PAUSE", "before-publish:20000")],
        "debug pause at before-publish",
        ms(0),
    );
    assert_eq!(snapshot(&d.join("out/a")), snap_a, "killed before publish: old state");
    assert_eq!(snapshot(&d.join("out/b")), snap_b);

    // 3. during publish: after `a` switched, before `b`
    kill_at(
        d,
        &["run", "pipeline.toml"],
        &[("WEIR_DEBUG_PAUSE", "between-publishes:20000")],
        "debug pause at between-publishes",
        ms(0),
    );
    assert_eq!(dataset_rows(&d.join("out/a")), new_a, "a was switched: exactly the new state");
    assert_eq!(snapshot(&d.join("out/b")), snap_b, "b was not: exactly the old state");

    // the next run recovers the dead one (no `weir recover` needed): it had decided to
    // publish, so its remaining switch is made from its staged output, and the new run finds
    // the same input already published
    let out = weir(d, &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("weir: recovered run #") && out.stderr.contains("it had decided to publish"),
        "{}",
        out.stderr
    );
    assert_eq!(out.json()["status"], "UP_TO_DATE", "{}", out.stdout);
    assert_eq!(dataset_rows(&d.join("out/a")), new_a);
    assert_eq!(dataset_rows(&d.join("out/b")), new_b);
    assert_eq!(entries(&d.join("out")), ["a", "b"], "no staging left");
    let runs = weir(d, &["runs", "--pipeline", "pipeline.toml", "--json"]).json();
    let statuses: Vec<&str> = runs.as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["SUCCESS", "FAILED", "FAILED", "SUCCESS"], "nothing is left RUNNING");
    assert!(runs[0]["note"].as_str().unwrap().contains("completed by recovery"), "{}", runs[0]);
}

/// A run writing three things at once: `a` (whole), `a`'s quarantined rows and one
/// partition of `b`, from `in/{partition}.csv`.
fn all_or_nothing_pipeline(dir: &Path) {
    let text = r#"[pipeline]
name = "wap"

[sources.input]
format = "csv"
path = "in/{partition}.csv"

[steps.a]
input = "input"
output = { path = "out/a" }

[[steps.a.checks]]
check = "not_null"
column = "name"
severity = "quarantine"
tolerance = 0.5

[steps.b]
input = "input"
output = { path = "out/b", partition_by = "day" }
"#;
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
    std::fs::create_dir_all(dir.join("in")).unwrap();
}

const MON_V1: &str = "day,id,name\nmon,1,a\nmon,2,\nmon,3,c\n";
const MON_V2: &str = "day,id,name\nmon,1,A\nmon,2,B\nmon,3,\nmon,4,D\n";

/// (id, run id) of every quarantined row.
fn quarantined(dir: &Path) -> Vec<(i64, i64)> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;
    let mut out = Vec::new();
    for (f, _) in parquet_files(&dir.join("out/a_quarantine")) {
        for b in read_parquet(&f) {
            let id = b.column_by_name("id").unwrap().as_primitive::<Int64Type>();
            let run = b.column_by_name("_weir_run_id").unwrap().as_primitive::<Int64Type>();
            out.extend((0..b.num_rows()).map(|r| (id.value(r), run.value(r))));
        }
    }
    out.sort();
    out
}

#[test]
fn a_crash_anywhere_in_a_publish_is_rolled_back_before_the_decision_and_forward_after_it() {
    let ms = std::time::Duration::from_millis;
    let run_mon = ["run", "pipeline.toml", "--partition", "mon"];
    // what v2 looks like, from an uninterrupted run elsewhere
    let other = tempfile::tempdir().unwrap();
    all_or_nothing_pipeline(other.path());
    std::fs::write(other.path().join("in/mon.csv"), MON_V2).unwrap();
    let ok = weir(other.path(), &run_mon);
    assert!(ok.code == 0 || ok.code == 3, "{}", ok.stderr);
    let (v2_a, v2_b) = (dataset_rows(&other.path().join("out/a")), dataset_rows(&other.path().join("out/b")));

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    all_or_nothing_pipeline(d);
    let publish_v1 = || {
        std::fs::write(d.join("in/mon.csv"), MON_V1).unwrap();
        let ok = weir(d, &run_mon);
        assert!(ok.code == 0 || ok.code == 3, "{}", ok.stderr);
    };
    publish_v1();
    let (v1_a, v1_b) = (dataset_rows(&d.join("out/a")), dataset_rows(&d.join("out/b")));
    assert_ne!((&v1_a, &v1_b), (&v2_a, &v2_b));
    // which version each published dataset holds, and which run the quarantine came from
    let state = || {
        let version = |rows: Vec<String>, v1: &Vec<String>, v2: &Vec<String>| match rows {
            r if &r == v1 => "v1",
            r if &r == v2 => "v2",
            _ => "neither",
        };
        let q = quarantined(d);
        let q_version = match q.iter().map(|(id, _)| *id).collect::<Vec<_>>().as_slice() {
            [2] => "v1",
            [3] => "v2",
            _ => "neither",
        };
        (
            [
                version(dataset_rows(&d.join("out/a")), &v1_a, &v2_a),
                q_version,
                version(dataset_rows(&d.join("out/b")), &v1_b, &v2_b),
            ],
            q.first().map(|(_, run)| *run).unwrap_or(-1),
        )
    };
    let last_run = || weir(d, &["runs", "--pipeline", "pipeline.toml", "--json"]).json()[0].clone();

    // (pause point, its nth occurrence, whether the run had decided to publish by then);
    // the run makes three switches: a, a's quarantine, b's partition
    let points = [
        ("before-publish", 1, false),
        ("after-decision", 1, true),
        ("after-switch", 1, true),
        ("between-publishes", 1, true),
        ("after-switch", 2, true),
        ("between-publishes", 2, true),
        ("after-switch", 3, true),
        ("before-finish", 1, true),
    ];
    let mut last_killed = 0;
    // each point settled by `weir recover`, then again by the next plain `weir run`
    let rounds = points.iter().flat_map(|p| [(*p, true), (*p, false)]);
    for ((point, nth, decided), by_recover) in rounds {
        let at = format!("{point} #{nth}, then {}", if by_recover { "weir recover" } else { "weir run" });
        publish_v1();
        assert_eq!(state().0, ["v1"; 3], "{at}: the previous round left one run's output");
        std::fs::write(d.join("in/mon.csv"), MON_V2).unwrap();
        let pause = format!("{point}#{nth}:20000");
        kill_at(d, &run_mon, &[("WEIR_DEBUG_PAUSE", &pause)], &format!("debug pause at {point}"), ms(0));
        let killed = last_run();
        assert_eq!(killed["status"], "RUNNING", "{at}");
        let killed_id = killed["id"].as_i64().unwrap();
        last_killed = killed_id;
        if !decided {
            assert_eq!(state().0, ["v1"; 3], "{at}: nothing is switched before the decision");
        }
        let staged_before: Vec<String> =
            entries(&d.join("out")).into_iter().filter(|e| e.contains("weir-staging")).collect();
        assert!(decided || !staged_before.is_empty(), "{at}: the killed run left its staging");

        let out = if by_recover { weir(d, &["recover", "pipeline.toml"]) } else { weir(d, &run_mon) };
        assert!(out.code == 0 || out.code == 3, "{at}: {}", out.stderr);
        let (published, q_run) = state();
        let killed = weir(d, &["runs", "show", &killed_id.to_string(), "--pipeline", "pipeline.toml", "--json"]).json();
        if decided {
            assert_eq!(published, ["v2"; 3], "{at}: every dataset from the decided run");
            assert_eq!(q_run, killed_id, "{at}: the quarantine too");
            assert_eq!(killed["status"], "SUCCESS", "{at}: {killed}");
            let note = killed["note"].as_str().unwrap();
            assert!(note.contains("completed by recovery after it crashed"), "{at}: {note}");
            assert!(killed["decision"]["switches"].as_array().unwrap().iter().all(|s| !s["done_at_ms"].is_null()));
            assert_eq!(killed["published"].as_array().unwrap().len(), 3, "{at}: every switch audited once");
            assert_eq!(killed["steps"][0]["rows_quarantined"], 1, "{at}: recorded with the decision");
            if by_recover {
                assert!(out.stdout.contains("1 completed (had decided to publish)"), "{at}: {}", out.stdout);
            } else {
                assert!(
                    out.stdout.contains("up to date"),
                    "{at}: the input was published by the recovered run: {}",
                    out.stdout
                );
            }
        } else {
            assert_eq!(killed["status"], "FAILED", "{at}: {killed}");
            assert!(killed["decision"].is_null() && killed["published"].as_array().unwrap().is_empty());
            if by_recover {
                assert_eq!(published, ["v1"; 3], "{at}: discarded, the old datasets stay");
                assert!(out.stdout.contains("0 completed"), "{at}: {}", out.stdout);
            } else {
                assert_eq!(published, ["v2"; 3], "{at}: the new run published all");
                assert_ne!(q_run, killed_id);
            }
        }
        assert_eq!(entries(&d.join("out")), ["a", "a_quarantine", "b"], "{at}: no staging left");
        assert_eq!(entries(&d.join("out/b")), ["day=mon"], "{at}");
        assert_eq!(entries(&d.join("out/a_quarantine")), ["partition=mon"], "{at}");
    }
    // a publish that breaks off after the decision (here a file stands where the quarantine
    // dataset's folder belongs) is recorded FAILED with its decision kept; no other run may
    // publish until it is completed, and recovery completes it once the cause is fixed
    publish_v1();
    std::fs::remove_dir_all(d.join("out/a_quarantine")).unwrap();
    std::fs::write(d.join("out/a_quarantine"), "in the way").unwrap();
    std::fs::write(d.join("in/mon.csv"), MON_V2).unwrap();
    let out = weir(d, &run_mon);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("publish broke off after 1 of 3 switches"), "{}", out.stderr);
    assert!(out.stderr.contains("`weir recover` (or the next `weir run`) completes it"), "{}", out.stderr);
    assert!(!out.stderr.contains("nothing was published"), "{}", out.stderr);
    let broken = last_run();
    assert_eq!(broken["status"], "FAILED");
    let broken_id = broken["id"].as_i64().unwrap();
    let again = weir(d, &run_mon);
    assert_eq!(again.code, 1, "{}", again.stderr);
    assert!(
        again.stderr.contains(&format!("run #{broken_id} had decided to publish, but its switch 2 of 3")),
        "{}",
        again.stderr
    );
    assert_eq!(last_run()["id"].as_i64().unwrap(), broken_id, "no new run started over it");
    std::fs::remove_file(d.join("out/a_quarantine")).unwrap();
    let rec = weir(d, &["recover", "pipeline.toml"]);
    assert_eq!(rec.code, 0, "{}", rec.stderr);
    let (published, q_run) = state();
    assert_eq!((published, q_run), (["v2"; 3], broken_id));
    let fixed = last_run();
    assert_eq!(fixed["status"], "SUCCESS");
    assert!(fixed["note"].as_str().unwrap().contains("completed by recovery after its publish broke off"), "{fixed}");

    // the table says what happened
    let table = weir(d, &["runs", "--pipeline", "pipeline.toml"]);
    assert!(table.stdout.contains("completed by recovery"), "{}", table.stdout);
    let show = weir(d, &["runs", "show", &last_killed.to_string(), "--pipeline", "pipeline.toml"]);
    assert!(show.stdout.contains("note      completed by recovery"), "{}", show.stdout);
    assert!(show.stdout.contains("switch    made    quarantine"), "{}", show.stdout);
}

/// Start `weir` with `args` in `dir`, holding its lease `pause_ms` before it publishes.
fn spawn_paused(dir: &Path, args: &[&str], pause_ms: u64) -> std::process::Child {
    weir_command(dir, args)
        .env("WEIR_DEBUG_PAUSE", format!("before-publish:{pause_ms}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(child: std::process::Child) -> Output {
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn of_eight_runs_of_one_partition_started_at_once_one_runs_and_with_wait_all_run_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    all_or_nothing_pipeline(d);
    std::fs::write(d.join("in/mon.csv"), MON_V1).unwrap();
    std::fs::write(d.join("in/tue.csv"), "day,id,name\ntue,9,z\n").unwrap();
    let mon = ["run", "pipeline.toml", "--partition", "mon", "--force"];
    let mut children: Vec<_> = (0..8).map(|_| spawn_paused(d, &mon, 3000)).collect();
    // a run of another partition is not held up by them
    children.push(spawn_paused(d, &["run", "pipeline.toml", "--partition", "tue"], 0));
    let mut outs: Vec<Output> = children.into_iter().map(finished).collect();
    let tue = outs.pop().unwrap();
    assert!(tue.code == 0 || tue.code == 3, "{}", tue.stderr);
    let ran: Vec<&Output> = outs.iter().filter(|o| o.code == 0 || o.code == 3).collect();
    assert_eq!(ran.len(), 1, "exactly one runs: {outs:#?}");
    let runs = weir(d, &["runs", "--pipeline", "pipeline.toml", "--json"]).json();
    let mon_runs: Vec<&serde_json::Value> =
        runs.as_array().unwrap().iter().filter(|r| r["partition"] == "mon").collect();
    assert_eq!(mon_runs.len(), 1, "the refused runs leave no record: {runs}");
    assert_eq!(mon_runs[0]["status"], "SUCCESS");
    let winner = mon_runs[0]["id"].as_i64().unwrap();
    for o in outs.iter().filter(|o| o.code != 0 && o.code != 3) {
        assert_eq!(o.code, 1, "{}", o.stderr);
        assert!(
            o.stderr.contains(&format!("run #{winner} of this pipeline and partition is still running (pid "))
                && o.stderr.contains("pass --wait"),
            "the refusal names the live run: {}",
            o.stderr
        );
    }

    // with --wait they run one after another
    let waiting: Vec<_> = (0..3).map(|_| spawn_paused(d, &[&mon[..], &["--wait"]].concat(), 300)).collect();
    let outs: Vec<Output> = waiting.into_iter().map(finished).collect();
    for o in &outs {
        assert!(o.code == 0 || o.code == 3, "{}", o.stderr);
    }
    assert!(outs.iter().filter(|o| o.stderr.contains("weir: waiting for run #")).count() >= 2, "{outs:#?}");
    let runs = weir(d, &["runs", "--pipeline", "pipeline.toml", "--json"]).json();
    let mut spans: Vec<(i64, i64)> = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["partition"] == "mon" && r["id"].as_i64().unwrap() > winner)
        .map(|r| {
            assert_eq!(r["status"], "SUCCESS");
            (r["started_at_ms"].as_i64().unwrap(), r["finished_at_ms"].as_i64().unwrap())
        })
        .collect();
    spans.sort();
    assert_eq!(spans.len(), 3);
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "runs of one partition overlapped: {spans:?}");
    }
}

#[test]
fn a_polling_reader_never_sees_a_partial_or_missing_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    two_step_pipeline(&d, "env", 2);
    std::fs::write(d.join("in.csv"), V1).unwrap();
    assert_eq!(weir(&d, &["run", "pipeline.toml"]).code, 0);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, file) = (stop.clone(), d.join("out/a/part-00000.parquet"));
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let f = std::fs::File::open(&file).unwrap_or_else(|e| panic!("read {reads}: dataset missing: {e}"));
                let rows: usize = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                    .unwrap_or_else(|e| panic!("read {reads}: partial file: {e}"))
                    .build()
                    .unwrap()
                    .map(|b| b.unwrap().num_rows())
                    .sum();
                assert!(rows == 3 || rows == 5, "read {reads}: saw {rows} rows");
                reads += 1;
            }
            reads
        })
    };
    for i in 0..12 {
        std::fs::write(d.join("in.csv"), if i % 2 == 0 { V2 } else { V1 }).unwrap();
        let out = weir(&d, &["run", "pipeline.toml"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw a broken dataset");
    assert!(reads > 0);
}

// ------------------------------------------------------------------------------------------
// Retries

/// Run weir; when a stderr line contains `marker`, call `action` once. Returns the exit code
/// and all stderr.
fn run_reacting(dir: &Path, args: &[&str], marker: &str, action: impl FnOnce()) -> (i32, String) {
    use std::io::{BufRead, BufReader};
    let mut child = weir_command(dir, args)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut action = Some(action);
    let mut all = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        all.push_str(&line);
        all.push('\n');
        if line.contains(marker) {
            if let Some(a) = action.take() {
                a();
            }
        }
    }
    (child.wait().unwrap().code().unwrap_or(-1), all)
}

#[test]
fn a_source_that_fails_twice_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("pipeline.toml"),
        r#"[pipeline]
name = "retrying"

[sources.late]
format = "csv"
path = "landing/late.csv"
retry = { attempts = 3, backoff_ms = 200 }

[steps.copy]
input = "late"
output = { path = "out/copy" }
"#,
    )
    .unwrap();
    let landing = d.join("landing");
    let (code, stderr) = run_reacting(d, &["run", "pipeline.toml"], "attempt 2 of 3 failed", || {
        std::fs::create_dir_all(&landing).unwrap();
        std::fs::write(landing.join("late.csv"), "id\n1\n2\n").unwrap();
    });
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("step `copy` attempt 1 of 3 failed (transient): no input files match"), "{stderr}");
    assert!(stderr.contains("retrying in"), "{stderr}");
    let runs = weir(d, &["runs", "--pipeline", "pipeline.toml", "--json"]).json();
    let attempts = runs[0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert!(attempts[0]["error"].as_str().unwrap().contains("no input files match"));
    assert!(attempts[2]["error"].is_null());
    assert_eq!(runs[0]["status"], "SUCCESS");
    assert_eq!(runs[0]["steps"][0]["rows_written"], 2);
    // the waits grew: the second retry started at least backoff*2/2 after the second failure
    let t: Vec<i64> = attempts.iter().map(|a| a["at_ms"].as_i64().unwrap()).collect();
    assert!(t[2] - t[1] >= 200, "backoff doubles (with jitter from half): {t:?}");
}

#[test]
fn a_plugin_invalid_input_error_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("in.csv"), "id\n1\nx2\n").unwrap();
    std::fs::write(
        d.join("pipeline.toml"),
        format!(
            r#"[pipeline]
name = "strict"

[sources.input]
format = "csv"
path = "in.csv"
schema = {{ id = "string" }}

[plugins.cast]
path = "{}"

[steps.typed]
input = "input"
output = {{ path = "out/typed" }}
retry = {{ attempts = 5, backoff_ms = 10 }}

[[steps.typed.transforms]]
plugin = "cast"
config.columns = [{{ column = "id", type = "int64" }}]
"#,
            plugin("cast").display()
        ),
    )
    .unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(
            "batch 1: invalid input at row 1 (column `id`): cannot cast \"x2\" to Int64 (row 2 of the step's input)"
        ),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("retrying"), "{}", out.stderr);
    let runs = weir(d, &["runs", "--pipeline", "pipeline.toml", "--json"]).json();
    assert_eq!(runs[0]["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(runs[0]["status"], "FAILED");
}

// ------------------------------------------------------------------------------------------
// Backfills

fn day_file(day: u32, good: bool) -> String {
    if good {
        format!("day,id,v\n2024-01-{day:02},1,x{day}\n2024-01-{day:02},2,y{day}\n")
    } else {
        format!("day,id,v\n2024-01-{day:02},1\n")
    }
}

#[test]
fn backfill_killed_midway_resumes_marks_partial_and_reruns_only_failed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    for day in 1..=30 {
        std::fs::write(d.join(format!("data/d_2024-01-{day:02}.csv")), day_file(day, day != 17)).unwrap();
    }
    std::fs::write(
        d.join("pipeline.toml"),
        format!(
            r#"[pipeline]
name = "daily"
batch_size = 1

[sources.input]
format = "csv"
path = "data/d_{{partition}}.csv"

[plugins.hostile]
path = "{}"

[steps.copy]
input = "input"
output = {{ path = "out/data", partition_by = "day" }}

[[steps.copy.transforms]]
plugin = "hostile"
config = {{ mode = "slow", sleep_ms = 100 }}
"#,
            plugin("hostile").display()
        ),
    )
    .unwrap();
    let args = ["backfill", "pipeline.toml", "--from", "2024-01-01", "--to", "2024-01-30", "--parallel", "2"];
    kill_at(d, &args, &[], "(8 done", std::time::Duration::ZERO);
    let b = weir(d, &["backfills", "--pipeline", "pipeline.toml", "--json"]).json();
    assert_eq!(b[0]["status"], "INTERRUPTED", "killed: the plan is persisted, not finished: {}", b[0]);
    assert!(b[0]["interrupted"].as_str().unwrap().contains("is gone"), "{}", b[0]);
    let table = weir(d, &["backfills", "--pipeline", "pipeline.toml"]);
    assert!(table.stdout.contains("INTERRUPTED"), "{}", table.stdout);
    assert!(
        table.stdout.contains("backfill #1 was interrupted (its process ")
            && table.stdout.contains("continue it with: weir backfill pipeline.toml --resume 1"),
        "{}",
        table.stdout
    );
    assert_eq!(b[0]["partitions"].as_array().unwrap().len(), 30);
    let done_before = b[0]["partitions"].as_array().unwrap().iter().filter(|p| p["status"] == "SUCCESS").count();
    assert!((8..30).contains(&done_before), "{done_before}");

    // resume: the rest runs; the broken day fails; PARTIAL and exit 1
    let out = weir(d, &["backfill", "pipeline.toml", "--resume", "1"]);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("backfill #1 PARTIAL"), "{}", out.stdout);
    assert!(
        out.stdout.contains("failed 2024-01-17: ") && out.stdout.contains("expected 3 fields, found 2"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains(&format!("resuming {} of 30 partitions", 30 - done_before)), "{}", out.stderr);
    let b = weir(d, &["backfills", "--pipeline", "pipeline.toml", "--json"]).json();
    assert_eq!(b[0]["status"], "PARTIAL");
    assert_eq!(entries(&d.join("out/data")).len(), 29);

    // fix the input; --only-failed runs just that partition
    std::fs::write(d.join("data/d_2024-01-17.csv"), day_file(17, true)).unwrap();
    let out = weir(d, &["backfill", "pipeline.toml", "--resume", "1", "--only-failed", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = out.json();
    assert_eq!((s["ran"].as_u64(), s["status"].as_str()), (Some(1), Some("SUCCESS")));
    assert_eq!(s["already_done"], 29);

    // every partition published, each by exactly one successful run, nothing left RUNNING
    assert_eq!(entries(&d.join("out/data")).len(), 30);
    for day in 1..=30 {
        let rows = dataset_rows(&d.join(format!("out/data/day=2024-01-{day:02}")));
        assert_eq!(rows.len(), 2, "day {day}: {rows:?}");
    }
    let runs = weir(d, &["runs", "--pipeline", "pipeline.toml", "--limit", "1000", "--json"]).json();
    let runs = runs.as_array().unwrap();
    assert!(runs.iter().all(|r| r["status"] != "RUNNING"));
    assert!(runs.iter().all(|r| r["backfill_id"] == 1));
    for day in 1..=30 {
        let p = format!("2024-01-{day:02}");
        let ok = runs.iter().filter(|r| r["partition"] == p.as_str() && r["status"] == "SUCCESS").count();
        assert_eq!(ok, 1, "partition {p} published by {ok} successful runs");
    }
}

#[test]
fn backfill_exit_codes_agree_with_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::write(d.join("data/eu.csv"), "region,id,name\neu,1,a\neu,2,b\n").unwrap();
    std::fs::write(d.join("data/us.csv"), "region,id,name\nus,3,c\nus,4,\n").unwrap();
    std::fs::write(
        d.join("pipeline.toml"),
        r#"[pipeline]
name = "regions"

[sources.input]
format = "csv"
path = "data/{partition}.csv"

[steps.copy]
input = "input"
output = { path = "out/data", partition_by = "region" }

[[steps.copy.checks]]
check = "not_null"
column = "name"
severity = "warn"
"#,
    )
    .unwrap();
    // a failed `warn` check: exit 3, as `weir run` does, with the warning listed
    let run = weir(d, &["run", "pipeline.toml", "--partition", "us"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    let out = weir(d, &["backfill", "pipeline.toml", "--partitions", "eu,us", "--force"]);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("backfill #1 SUCCESS: 2 partitions ran, 2 succeeded, 0 failed"), "{}", out.stdout);
    assert!(
        out.stdout.contains("warning us: check `not_null(name)` on `copy` (warn): 1 of 2 rows fail"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("warning eu"), "{}", out.stdout);
    // no warnings: 0
    std::fs::write(d.join("data/us.csv"), "region,id,name\nus,3,c\nus,4,d\n").unwrap();
    let out = weir(d, &["backfill", "pipeline.toml", "--partitions", "eu,us"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
}

#[test]
fn backfill_refuses_unpartitioned_outputs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pipeline.toml"),
        "[pipeline]\nname = \"x\"\n[sources.i]\nformat = \"csv\"\npath = \"d_{partition}.csv\"\n[steps.s]\ninput = \"i\"\noutput = { path = \"out/s\" }\n",
    )
    .unwrap();
    let out = weir(dir.path(), &["backfill", "pipeline.toml", "--partitions", "a,b"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("step `s` writes its whole dataset"), "{}", out.stderr);
}

// ------------------------------------------------------------------------------------------
// Checkpoints and --resume

/// Start weir and kill -9 it `wait` after the `n`th stderr line containing `marker`.
fn kill_at_nth(dir: &Path, args: &[&str], env: &[(&str, &str)], marker: &str, n: usize, wait: std::time::Duration) {
    use std::io::{BufRead, BufReader};
    let mut cmd = weir_command(dir, args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let mut seen = 0;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        lines.push(line.clone());
        if line.contains(marker) {
            seen += 1;
            if seen == n {
                std::thread::sleep(wait);
                child.kill().unwrap();
                child.wait().unwrap();
                return;
            }
        }
    }
    let _ = child.wait();
    panic!("weir ended before the {n}th {marker:?}: {lines:?}");
}

/// A pipeline of two steps over `in.csv`: the hostile plugin sleeping `sleep_ms` per batch,
/// then `dedup` into `out/<first>`; `aggregate` over that into `out/<second>`.
struct TwoSteps<'a> {
    name: &'a str,
    batch_size: usize,
    checkpoint_every: u64,
    /// Lines under `[plugins.dedup]` and `[plugins.aggregate]` (limits).
    limits: &'a str,
    sleep_ms: u64,
    dedup: &'a str,
    first: &'a str,
    aggregate: &'a str,
    second: &'a str,
}

fn dedup_then_aggregate(dir: &Path, p: &TwoSteps) {
    let TwoSteps { name, batch_size, checkpoint_every, limits, sleep_ms, dedup, first, aggregate, second } = p;
    let text = format!(
        r#"[pipeline]
name = "{name}"
batch_size = {batch_size}
checkpoint_every = {checkpoint_every}

[sources.input]
format = "csv"
path = "in.csv"

[plugins.hostile]
path = "{}"

[plugins.dedup]
path = "{}"
{limits}

[plugins.aggregate]
path = "{}"
{limits}

[steps.{first}]
input = "input"
output = {{ path = "out/{first}" }}

[[steps.{first}.transforms]]
plugin = "hostile"
config = {{ mode = "slow", sleep_ms = {sleep_ms} }}

[[steps.{first}.transforms]]
plugin = "dedup"
config = {dedup}

[steps.{second}]
input = "{first}"
output = {{ path = "out/{second}" }}

[[steps.{second}.transforms]]
plugin = "aggregate"
config = {aggregate}
"#,
        plugin("hostile").display(),
        plugin("dedup").display(),
        plugin("aggregate").display()
    );
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
}

/// slow passthrough -> dedup(keep last by v), 2 rows a batch, a checkpoint every 2 batches;
/// then a second step counting rows per key.
fn resumable_pipeline(dir: &Path) {
    let mut csv = String::from("id,k,v\n");
    for i in 0..40 {
        // every key comes back later with a greater v: dedup must remember what it saw
        csv.push_str(&format!("{i},k{},{}\n", i % 7, i));
    }
    std::fs::write(dir.join("in.csv"), csv).unwrap();
    dedup_then_aggregate(
        dir,
        &TwoSteps {
            name: "resumable",
            batch_size: 2,
            checkpoint_every: 2,
            limits: "",
            sleep_ms: 40,
            dedup: r#"{ key = ["k"], keep = "last", order_by = "v" }"#,
            first: "latest",
            aggregate: r#"{ group_by = ["k"], aggregates = [{ fn = "max", column = "v", as = "v" }, { fn = "count", as = "n" }] }"#,
            second: "per_key",
        },
    );
}

#[test]
fn resume_after_a_crash_equals_an_uninterrupted_run() {
    let whole = tempfile::tempdir().unwrap();
    resumable_pipeline(whole.path());
    let out = weir(whole.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (want_latest, want_per_key) =
        (dataset_rows(&whole.path().join("out/latest")), dataset_rows(&whole.path().join("out/per_key")));
    assert_eq!(want_latest.len(), 7);

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    resumable_pipeline(d);
    // killed while processing, after its third checkpoint
    kill_at_nth(
        d,
        &["run", "pipeline.toml"],
        &[("WEIR_DEBUG_PAUSE", "after-checkpoint:1")],
        "debug pause at after-checkpoint",
        3,
        std::time::Duration::from_millis(60),
    );
    assert!(!d.join("out/latest").exists(), "nothing published by the killed run");

    let out = weir(d, &["run", "pipeline.toml", "--resume", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = out.json();
    assert_eq!(s["resumed_from"], 1, "{s}");
    assert!(out.stderr.contains("weir: resuming run #1 from its checkpoints"), "{}", out.stderr);
    // killed after the third checkpoint (batch 6); on a loaded machine it may have made one more
    let resumed_at: u64 = out
        .stderr
        .split("step `latest` resumes after batch ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume line: {}", out.stderr));
    assert!(resumed_at >= 6 && resumed_at.is_multiple_of(2) && resumed_at < 20, "{resumed_at}");
    assert!(out.stderr.contains(&format!("({} rows already read and staged)", resumed_at * 2)), "{}", out.stderr);
    assert_eq!(s["steps"][0]["rows_read"], 40, "counts carry over from the checkpoint");
    assert_eq!(dataset_rows(&d.join("out/latest")), want_latest, "the resumed output equals an uninterrupted run's");
    assert_eq!(dataset_rows(&d.join("out/per_key")), want_per_key);
    assert_eq!(entries(&d.join("out")), ["latest", "per_key"], "no staging left");

    // nothing left to resume now
    let again = weir(d, &["run", "pipeline.toml", "--resume"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stderr.contains("nothing to resume"), "{}", again.stderr);
}

// ------------------------------------------------------------------------------------------
// Quality gates

/// csv (id, country, amount) -> checks -> out/data, with `checks` appended to the step.
fn checked_pipeline(dir: &Path, checks: &str) {
    let text = format!(
        r#"[pipeline]
name = "gated"

[sources.input]
format = "csv"
path = "in.csv"
schema = {{ id = "int64", country = "string", amount = "float64" }}

[plugins.formats]
path = "{}"

[plugins.hostile_rule]
path = "{}"
timeout_ms = 300

[steps.data]
input = "input"
output = {{ path = "out/data" }}
{checks}
"#,
        plugin("formats").display(),
        plugin("hostile-rule").display()
    );
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
}

fn rows_csv(n: usize, bad_country_every: usize) -> String {
    let mut s = String::from("id,country,amount\n");
    for i in 0..n {
        let country = if bad_country_every > 0 && i % bad_country_every == 0 { "" } else { "DE" };
        s.push_str(&format!("{i},{country},{}.5\n", i % 50));
    }
    s
}

#[test]
fn a_blocking_check_keeps_the_published_data_and_a_warning_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let checks = r#"
[[steps.data.checks]]
check = "not_null"
column = "country"

[[steps.data.checks]]
check = "unique"
column = "id"
severity = "warn"
"#;
    checked_pipeline(d, checks);
    std::fs::write(d.join("in.csv"), rows_csv(10, 0)).unwrap();
    let ok = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("[2/2 checks passed]"), "{}", ok.stdout);
    let before = snapshot(&d.join("out"));

    // nulls in a blocking check: exit 1, the check named with numbers, nothing published
    std::fs::write(d.join("in.csv"), rows_csv(10, 3)).unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("step `data` failed its quality gate"), "{}", out.stderr);
    assert!(out.stderr.contains("check `not_null(country)` (block) failed: 4 of 10 rows fail"), "{}", out.stderr);
    // one line per distinct reason, with the rows it is about
    let table = weir(d, &["checks", "--pipeline", "pipeline.toml", "--failed"]);
    let samples: Vec<&str> = table.stdout.lines().filter(|l| l.trim_start().starts_with("e.g.")).collect();
    assert_eq!(samples, ["       e.g. country is null (rows 1, 4, 7, 10)"], "{}", table.stdout);
    assert_eq!(snapshot(&d.join("out")), before, "a blocked run leaves the published data as it was");
    assert_eq!(entries(&d.join("out")), ["data"]);

    // duplicates in a warning check: exit 3, published, recorded
    std::fs::write(d.join("in.csv"), format!("{}0,DE,1.5\n", rows_csv(10, 0))).unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stdout.contains("warning: check `unique(id)` on `data` (warn): 1 of 11 rows fail"), "{}", out.stdout);
    assert_ne!(snapshot(&d.join("out")), before, "a warning publishes");
    let failed = weir(d, &["checks", "--pipeline", "pipeline.toml", "--failed", "--json"]).json();
    let failed: Vec<(String, bool)> = failed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["check"].as_str().unwrap().to_string(), c["passed"].as_bool().unwrap()))
        .collect();
    assert_eq!(failed, [("unique(id)".to_string(), false), ("not_null(country)".to_string(), false)]);
    let table = weir(d, &["checks", "--pipeline", "pipeline.toml"]);
    assert!(table.stdout.contains("e.g. duplicate id=0"), "{}", table.stdout);
    // the table stays aligned whatever the length of step and check names
    let lines: Vec<&str> = table.stdout.lines().collect();
    let at = lines[0].find("SEVERITY").unwrap();
    for row in lines.iter().skip(1).filter(|l| !l.trim_start().starts_with("e.g.")) {
        let (before, after) = row.split_at(at);
        assert!(before.ends_with("  ") && !after.starts_with(' '), "misaligned:\n{}", table.stdout);
    }
}

#[test]
fn volume_and_anomaly_learn_from_real_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let checks = r#"
[[steps.data.checks]]
check = "volume"
max_change = 0.5
severity = "warn"

[[steps.data.checks]]
check = "anomaly"
metric = "row_count"
runs = 3
z = 3.0
severity = "warn"
"#;
    checked_pipeline(d, checks);
    let mut codes = Vec::new();
    for n in [20, 22, 21, 20, 100] {
        std::fs::write(d.join("in.csv"), rows_csv(n, 0)).unwrap();
        codes.push(weir(d, &["run", "pipeline.toml"]).code);
    }
    assert_eq!(codes, [0, 0, 0, 0, 3], "steady runs pass; the 5x jump warns");
    let results = weir(d, &["checks", "--pipeline", "pipeline.toml", "--json"]).json();
    let last: Vec<&serde_json::Value> = results.as_array().unwrap().iter().filter(|c| c["run_id"] == 5).collect();
    assert_eq!(last.len(), 2);
    assert!(last.iter().all(|c| c["passed"] == false), "{last:?}");
    assert!(last[0]["observed"].as_str().unwrap().contains("+400.0% vs 20"), "{:?}", last[0]);
    assert!(last[1]["threshold"].as_str().unwrap().contains("over 3 runs"), "{:?}", last[1]);
    // the anomaly check was inactive until three runs existed
    let first =
        results.as_array().unwrap().iter().find(|c| c["run_id"] == 1 && c["check"] == "anomaly(row_count)").unwrap();
    assert!(first["threshold"].as_str().unwrap().contains("once 3 runs exist (0 so far)"), "{first}");
}

#[test]
fn relationships_against_a_published_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // a published dimension: ids 0..5
    std::fs::create_dir_all(d.join("dim")).unwrap();
    std::fs::write(d.join("dim.csv"), "id\n0\n1\n2\n3\n4\n").unwrap();
    std::fs::write(
        d.join("dim.toml"),
        "[pipeline]\nname = \"dim\"\n[sources.i]\nformat = \"csv\"\npath = \"dim.csv\"\n[steps.dim]\ninput = \"i\"\noutput = { path = \"published/dim\" }\n",
    )
    .unwrap();
    assert_eq!(weir(d, &["run", "dim.toml"]).code, 0);
    let checks = r#"
[[steps.data.checks]]
check = "relationships"
column = "id"
to = { path = "published/dim", column = "id" }
severity = "quarantine"
"#;
    checked_pipeline(d, checks);
    std::fs::write(d.join("in.csv"), rows_csv(8, 0)).unwrap();
    let out = weir(d, &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 3, "3 misses quarantined past a tolerance of 0 are reported: {}", out.stderr);
    let s = out.json();
    assert_eq!(s["steps"][0]["rows_written"], 5);
    assert_eq!(s["steps"][0]["rows_quarantined"], 3);
    let c = &s["steps"][0]["checks"][0];
    assert_eq!(c["failing_rows"], 3);
    assert!(c["sample"][0].as_str().unwrap().contains("is not in"), "{c}");
}

#[test]
fn a_wasm_quality_rule_judges_rows_and_a_hostile_one_fails_its_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("in.csv"), "id,country,amount\n1,DE,1\n2,de,2\n3,,3\n4,Germany,4\n").unwrap();
    checked_pipeline(
        d,
        r#"
[[steps.data.checks]]
check = "plugin"
plugin = "formats"
config = { column = "country", format = "iso_country" }
severity = "warn"
"#,
    );
    let out = weir(d, &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    let c = &out.json()["steps"][0]["checks"][0];
    assert_eq!((c["check"].as_str(), c["failing_rows"].as_u64()), (Some("plugin(formats)"), Some(2)));
    assert!(c["observed"].as_str().unwrap().contains("the rule says: 2 of 4 values malformed"), "{c}");
    assert!(c["sample"][0].as_str().unwrap().contains("\"de\" is not a valid IsoCountry"), "{c}");
    // what the rule measured is recorded and shown
    assert_eq!(c["metrics"]["failing_rows"].as_f64(), Some(2.0), "{c}");
    let stored = weir(d, &["checks", "--pipeline", "pipeline.toml", "--json"]).json();
    assert_eq!(stored[0]["metrics"]["failing_rows"].as_f64(), Some(2.0), "{stored}");

    // a published state, then hostile rules: the check fails clearly, nothing is published
    checked_pipeline(d, "");
    assert_eq!(weir(d, &["run", "pipeline.toml"]).code, 0);
    let before = snapshot(&d.join("out"));
    for (mode, expect) in [("trap", "trapped (crashed)"), ("loop", "exceeded its wall-clock deadline of 300ms")] {
        checked_pipeline(
            d,
            &format!("\n[[steps.data.checks]]\ncheck = \"plugin\"\nplugin = \"hostile_rule\"\nconfig = {{ mode = \"{mode}\" }}\n"),
        );
        let out = weir(d, &["run", "pipeline.toml"]);
        assert_eq!(out.code, 1, "{mode}: {}", out.stderr);
        assert!(
            out.stderr.contains("check `plugin(hostile_rule)` (block) failed: the rule plugin `hostile_rule` failed"),
            "{mode}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(expect), "{mode}: {}", out.stderr);
        assert_eq!(snapshot(&d.join("out")), before, "{mode}: nothing published");
    }
}

#[test]
fn sources_read_only_the_columns_asked_for() {
    let dir = example_copy();
    let d = dir.path();
    assert_eq!(weir(d, &["run", "pipeline.toml"]).code, 3);
    std::fs::write(
        d.join("narrow.toml"),
        r#"[pipeline]
name = "narrow"

[sources.stg]
format = "parquet"
path = "out/stg_orders"
columns = ["amount", "order_id"]

[sources.raw]
format = "csv"
path = "data/orders_2024-01-01.csv"
columns = ["country"]

[steps.from_parquet]
input = "stg"
output = { path = "out/narrow_parquet" }

[steps.from_csv]
input = "raw"
output = { path = "out/narrow_csv" }
"#,
    )
    .unwrap();
    let out = weir(d, &["run", "narrow.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let names = |p: &str| -> Vec<String> {
        read_parquet(&parquet_files(&d.join(p))[0].0)[0].schema().fields().iter().map(|f| f.name().clone()).collect()
    };
    assert_eq!(names("out/narrow_parquet"), ["amount", "order_id"]);
    assert_eq!(names("out/narrow_csv"), ["country"]);
    std::fs::write(
        d.join("narrow.toml"),
        std::fs::read_to_string(d.join("narrow.toml")).unwrap().replace("\"country\"]", "\"colour\"]"),
    )
    .unwrap();
    let out = weir(d, &["run", "narrow.toml"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("sources.raw.columns names a column the input does not have"), "{}", out.stderr);
}

// ------------------------------------------------------------------------------------------
// Copying the columns no plugin touches

/// `rows` events (id from `start`) as Parquet in row groups of 1000 rows, written in batches
/// of 700 (so row groups and batches do not line up): id, email (some null), note, amount
/// (some null), flag, and tags, a list (nested, so never copied).
fn events_parquet(path: &Path, rows: usize, start: i64, codec: parquet::basic::Compression) {
    use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, ListArray, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let item = Arc::new(Field::new("item", DataType::Int32, true));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("email", DataType::Utf8, true),
        Field::new("note", DataType::Utf8, false),
        Field::new("amount", DataType::Float64, true),
        Field::new("flag", DataType::Boolean, false),
        Field::new("tags", DataType::List(item), true),
    ]));
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(codec)
        .set_max_row_group_row_count(Some(1000))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props)).unwrap();
    let ids: Vec<i64> = (start..start + rows as i64).collect();
    for chunk in ids.chunks(700) {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(chunk.to_vec())),
            Arc::new(StringArray::from_iter(chunk.iter().map(|i| (i % 11 != 0).then(|| format!("u{i}@example.com"))))),
            Arc::new(StringArray::from_iter_values(
                chunk.iter().map(|i| format!("note {i} {}", "x".repeat(*i as usize % 40))),
            )),
            Arc::new(Float64Array::from_iter(chunk.iter().map(|i| (i % 7 != 0).then(|| *i as f64 / 4.0)))),
            Arc::new(BooleanArray::from_iter(chunk.iter().map(|i| Some(i % 3 == 0)))),
            Arc::new(ListArray::from_iter_primitive::<arrow_array::types::Int32Type, _, _>(
                chunk.iter().map(|i| (i % 5 != 0).then(|| (0..(i % 4) as i32).map(Some).collect::<Vec<_>>())),
            )),
        ];
        w.write(&RecordBatch::try_new(schema.clone(), columns).unwrap()).unwrap();
    }
    w.close().unwrap();
}

/// in/a.parquet (zstd, 2500 rows) and in/b.parquet (snappy, 1200 rows) -> mask email ->
/// out/data, with `output_extra` in the output table.
fn copy_pipeline(dir: &Path, output_extra: &str, a_rows: usize) {
    std::fs::create_dir_all(dir.join("in")).unwrap();
    events_parquet(&dir.join("in/a.parquet"), a_rows, 0, parquet::basic::Compression::ZSTD(Default::default()));
    events_parquet(&dir.join("in/b.parquet"), 1200, 100_000, parquet::basic::Compression::SNAPPY);
    let text = format!(
        r#"[pipeline]
name = "copy"
batch_size = 300
checkpoint_every = 1

[sources.input]
format = "parquet"
path = "in"

[plugins.mask]
path = "{}"

[steps.masked]
input = "input"
output = {{ path = "out/data"{output_extra} }}

[[steps.masked.transforms]]
plugin = "mask"
config.columns = {{ email = {{ method = "sha256" }} }}
"#,
        plugin("mask").display()
    );
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
}

/// The compressed bytes of every column chunk named `column` in `path`, by row group.
fn chunk_bytes(path: &Path, column: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let meta = parquet::file::metadata::ParquetMetaDataReader::new()
        .parse_and_finish(&std::fs::File::open(path).unwrap())
        .unwrap();
    meta.row_groups()
        .iter()
        .map(|g| {
            let c = g.columns().iter().find(|c| c.column_path().string() == column).unwrap();
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset()) as usize;
            bytes[start..start + c.compressed_size() as usize].to_vec()
        })
        .collect()
}

#[test]
fn parquet_columns_no_plugin_touches_are_copied_page_for_page() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_pipeline(d, "", 2500);
    let out = weir(d, &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = &out.json()["steps"][0];
    // email is masked, tags is nested: both are decoded; a.parquet's three row groups are
    // copied, b.parquet (snappy, where the output is zstd) is decoded and encoded again
    assert_eq!(s["copied_columns"], serde_json::json!(["id", "note", "amount", "flag"]), "{s}");
    assert_eq!(s["copied_row_groups"], 3, "{s}");
    assert_eq!(s["rows_written"], 3700, "{s}");
    assert!(out.stderr.contains("copies 4 column(s) no plugin touches from the input's Parquet pages: id, note"));

    // every value is the input's, email masked (nulls stay null)
    let mut want = Vec::new();
    for name in ["a", "b"] {
        let input = d.join(format!("in/{name}.parquet"));
        for b in read_parquet(&input) {
            let email = b.column(1).as_string::<i32>();
            let masked: arrow_array::StringArray = email
                .iter()
                .map(|e| {
                    e.map(|e| {
                        use sha2::Digest;
                        sha2::Sha256::digest(e.as_bytes()).iter().map(|x| format!("{x:02x}")).collect::<String>()
                    })
                })
                .collect();
            let mut columns = b.columns().to_vec();
            columns[1] = Arc::new(masked);
            want.push(arrow_array::RecordBatch::try_new(b.schema(), columns).unwrap());
        }
    }
    let want_dir = d.join("want");
    std::fs::create_dir_all(&want_dir).unwrap();
    let f = std::fs::File::create(want_dir.join("x.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, want[0].schema(), None).unwrap();
    want.iter().for_each(|b| w.write(b).unwrap());
    w.close().unwrap();
    let got = dataset_rows(&d.join("out/data"));
    assert_eq!(got.len(), 3700);
    assert_eq!(got, dataset_rows(&want_dir), "the output holds the input's rows, email masked");

    // the copied chunks are the input's bytes, in row groups of the input's sizes, with a page
    // index that points into the output; b's columns were compressed again, with zstd
    let outputs = parquet_files(&d.join("out/data"));
    let mut note_chunks = Vec::new();
    let mut sizes = Vec::new();
    for (f, _) in &outputs {
        note_chunks.extend(chunk_bytes(f, "note"));
        let meta = parquet::file::metadata::ParquetMetaDataReader::new()
            .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Optional)
            .parse_and_finish(&std::fs::File::open(f).unwrap())
            .unwrap();
        for (g, rg) in meta.row_groups().iter().enumerate() {
            sizes.push(rg.num_rows());
            for (c, col) in rg.columns().iter().enumerate() {
                assert!(matches!(col.compression(), parquet::basic::Compression::ZSTD(_)), "{}", f.display());
                let start = col.dictionary_page_offset().unwrap_or(col.data_page_offset());
                let offsets = meta.page_index().and_then(|i| i.offset_index(g, c));
                let offsets = offsets.unwrap_or_else(|| panic!("{}: no offset index for column {c}", f.display()));
                for p in &offsets.page_locations {
                    assert!(p.offset >= start && p.offset < start + col.compressed_size(), "{p:?}");
                }
            }
        }
    }
    for (g, chunk) in chunk_bytes(&d.join("in/a.parquet"), "note").iter().enumerate() {
        assert!(note_chunks.contains(chunk), "row group {g} of a.parquet was not copied as it is");
    }
    assert!(sizes.starts_with(&[1000, 1000, 500]), "a.parquet's row groups keep their sizes: {sizes:?}");

    // `copy_columns = false` decodes and encodes everything, to the same rows
    let plain = tempfile::tempdir().unwrap();
    copy_pipeline(plain.path(), ", copy_columns = false", 2500);
    let out = weir(plain.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = &out.json()["steps"][0];
    assert_eq!((&s["copied_columns"], &s["copied_row_groups"]), (&serde_json::json!([]), &serde_json::json!(0)));
    assert_eq!(dataset_rows(&plain.path().join("out/data")), got);
}

#[test]
fn a_run_that_copies_columns_resumes_between_row_groups() {
    let whole = tempfile::tempdir().unwrap();
    copy_pipeline(whole.path(), "", 6000);
    let out = weir(whole.path(), &["run", "pipeline.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let want = dataset_rows(&whole.path().join("out/data"));
    assert_eq!(want.len(), 7200);

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_pipeline(d, "", 6000);
    // checkpoints come at row group ends (every 4 batches of 300 rows here), never inside one
    kill_at_nth(
        d,
        &["run", "pipeline.toml"],
        &[("WEIR_DEBUG_PAUSE", "after-checkpoint:3000")],
        "debug pause at after-checkpoint",
        2,
        std::time::Duration::from_millis(60),
    );
    let out = weir(d, &["run", "pipeline.toml", "--resume", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let resumed_at: u64 = out
        .stderr
        .split("step `masked` resumes after batch ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume line: {}", out.stderr));
    assert!(resumed_at >= 8 && resumed_at.is_multiple_of(4) && resumed_at < 24, "{resumed_at}");
    let s = &out.json()["steps"][0];
    assert_eq!(s["copied_row_groups"], 6 - resumed_at / 4, "the rest of a.parquet is still copied: {}", out.stderr);
    assert_eq!(dataset_rows(&d.join("out/data")), want, "the resumed output equals an uninterrupted run's");
}

#[test]
fn named_time_zones_with_dst_cast_partition_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // instants around New York's DST switches, and dates whose local day differs from UTC's
    let instants = [
        ("1", "2024-01-01T04:30:00Z", "2023-12-31", "2023-12-31T23:30:00-05:00"),
        ("2", "2024-03-10T06:30:00Z", "2024-03-10", "2024-03-10T01:30:00-05:00"),
        ("3", "2024-03-10T07:30:00Z", "2024-03-10", "2024-03-10T03:30:00-04:00"),
        ("4", "2024-07-01T04:30:00Z", "2024-07-01", "2024-07-01T00:30:00-04:00"),
        ("5", "2024-11-03T05:30:00Z", "2024-11-03", "2024-11-03T01:30:00-04:00"),
        ("6", "2024-11-03T06:30:00Z", "2024-11-03", "2024-11-03T01:30:00-05:00"),
    ];
    let csv: String =
        std::iter::once("id,at\n".to_string()).chain(instants.iter().map(|(i, t, ..)| format!("{i},{t}\n"))).collect();
    std::fs::write(d.join("in.csv"), csv).unwrap();
    std::fs::write(
        d.join("pipeline.toml"),
        format!(
            r#"[pipeline]
name = "zones"

[sources.input]
format = "csv"
path = "in.csv"
schema = {{ id = "int64", at = "timestamp_tz" }}

[plugins.cast]
path = "{}"

[steps.local]
input = "input"
output = {{ path = "out/local", partition_by = "local_day" }}

[[steps.local.transforms]]
plugin = "cast"
config = {{ columns = [{{ column = "id" }}, {{ column = "at", type = "date", rename = "utc_day" }}, {{ column = "at", type = "timestamp_tz(America/New_York)", rename = "local_at" }}] }}

[[steps.local.transforms]]
plugin = "cast"
config = {{ columns = [{{ column = "id" }}, {{ column = "utc_day" }}, {{ column = "local_at" }}, {{ column = "local_at", type = "date", rename = "local_day" }}] }}

[[steps.local.checks]]
check = "freshness"
column = "local_at"
max_age = "36500d"

[steps.by_instant]
input = "local"
output = {{ path = "out/by_instant", partition_by = "local_at" }}
"#,
            plugin("cast").display()
        ),
    )
    .unwrap();
    let out = weir(d, &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // every row's local time and day, read back from the published files
    let rows = dataset_rows(&d.join("out/local"));
    for (id, at, day, local) in instants {
        let utc_day = &at[..10];
        let want = format!("[(\"local_day\", \"{day}\")] {id},{utc_day},{local}");
        assert!(rows.contains(&want), "{want} not in {rows:#?}");
    }
    assert_eq!(
        entries(&d.join("out/local")),
        ["local_day=2023-12-31", "local_day=2024-03-10", "local_day=2024-07-01", "local_day=2024-11-03"]
    );
    // the freshness check reads instants, not New York wall-clock times
    let check = &out.json()["steps"][0]["checks"][0];
    assert!(check["observed"].as_str().unwrap().contains("(2024-11-03 06:30:00Z)"), "{check}");
    // a zoned timestamp names partitions in its zone: 03:30 exists only after the switch
    let dirs = entries(&d.join("out/by_instant"));
    assert_eq!(dirs.len(), 6, "{dirs:?}");
    assert!(dirs.iter().any(|n| n.starts_with("local_at=2024-03-10T03")), "{dirs:?}");
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn bzip2(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn compressed_csv_and_json_lines_stream_whatever_their_names_say() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("csv")).unwrap();
    std::fs::create_dir_all(d.join("jsonl")).unwrap();
    let rows = |from: i64, to: i64| -> String { (from..=to).map(|i| format!("{i},n{i}\n")).collect() };
    let csv = |from, to| format!("id,name\n{}", rows(from, to));
    // two gzip members in one file (as `cat a.gz b.gz` makes)
    let mut two_members = gzip(csv(1, 2).as_bytes());
    two_members.extend(gzip(rows(3, 4).as_bytes()));
    std::fs::write(d.join("csv/p1.csv.gz"), two_members).unwrap();
    std::fs::write(d.join("csv/p2.csv.zst"), zstd::encode_all(csv(5, 6).as_bytes(), 3).unwrap()).unwrap();
    std::fs::write(d.join("csv/p3.csv.bz2"), bzip2(csv(7, 8).as_bytes())).unwrap();
    // misnamed both ways: gzip named .csv, plain text named .csv.gz
    std::fs::write(d.join("csv/p4.csv"), gzip(csv(9, 10).as_bytes())).unwrap();
    std::fs::write(d.join("csv/p5.csv.gz"), csv(11, 12)).unwrap();
    let jsonl = |from: i64, to: i64| -> String {
        (from..=to).map(|i| format!("{{\"id\": {i}, \"name\": \"n{i}\"}}\n")).collect()
    };
    std::fs::write(d.join("jsonl/a.jsonl.gz"), gzip(jsonl(1, 3).as_bytes())).unwrap();
    std::fs::write(d.join("jsonl/b.jsonl.zst"), zstd::encode_all(jsonl(4, 6).as_bytes(), 3).unwrap()).unwrap();
    let pipeline = |extra: &str| {
        format!(
            r#"[pipeline]
name = "compressed"

[sources.csv]
format = "csv"
path = "csv"
schema = {{ id = "int64", name = "string" }}
retry = {{ attempts = 3, backoff_ms = 1 }}

[sources.jsonl]
format = "jsonl"
path = "jsonl"
schema = {{ id = "int64", name = "string" }}

[steps.from_csv]
input = "csv"
output = {{ path = "out/csv" }}

[steps.from_jsonl]
input = "jsonl"
output = {{ path = "out/jsonl" }}
{extra}"#
        )
    };
    std::fs::write(d.join("pipeline.toml"), pipeline("")).unwrap();
    let out = weir(d, &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let ids = |ds: &str| -> Vec<String> {
        let mut v: Vec<String> =
            dataset_rows(&d.join(ds)).into_iter().map(|r| r.trim_start_matches("[] ").to_string()).collect();
        v.sort_by_key(|r| r.split(',').next().unwrap().parse::<i64>().unwrap());
        v
    };
    let want = |n: i64| -> Vec<String> { (1..=n).map(|i| format!("{i},n{i}")).collect() };
    assert_eq!(ids("out/csv"), want(12));
    assert_eq!(ids("out/jsonl"), want(6));
    assert_eq!(out.json()["steps"][0]["files"], 5, "every compressed name is found in the folder");

    // a bad row inside a compressed file is named by its line in the decompressed text
    std::fs::write(d.join("csv/p3.csv.bz2"), bzip2(b"id,name\n7,n7\nseven,n8\n")).unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("p3.csv.bz2:3: column `id`"), "{}", out.stderr);
    std::fs::write(d.join("csv/p3.csv.bz2"), bzip2(csv(7, 8).as_bytes())).unwrap();

    // a truncated file is the data's fault: named, not retried, nothing published
    let before = snapshot(&d.join("out"));
    let whole = gzip(csv(1, 2000).as_bytes());
    std::fs::write(d.join("csv/p1.csv.gz"), &whole[..whole.len() / 2]).unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("p1.csv.gz") && out.stderr.contains("not a valid gzip stream"), "{}", out.stderr);
    assert!(!out.stderr.contains("retrying"), "{}", out.stderr);
    assert_eq!(snapshot(&d.join("out")), before);
}

#[test]
fn a_backfill_killed_mid_publish_is_completed_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    for day in 1..=3 {
        std::fs::write(d.join(format!("data/d_2024-01-{day:02}.csv")), day_file(day, true)).unwrap();
    }
    std::fs::write(
        d.join("pipeline.toml"),
        r#"[pipeline]
name = "daily"

[sources.input]
format = "csv"
path = "data/d_{partition}.csv"

[steps.copy]
input = "input"
output = { path = "out/data", partition_by = "day" }

[steps.again]
input = "copy"
output = { path = "out/again", partition_by = "day" }
"#,
    )
    .unwrap();
    // one partition at a time; killed after the first partition's first switch
    let args = ["backfill", "pipeline.toml", "--from", "2024-01-01", "--to", "2024-01-03", "--parallel", "1"];
    kill_at(
        d,
        &args,
        &[("WEIR_DEBUG_PAUSE", "between-publishes#1:20000")],
        "debug pause at between-publishes",
        std::time::Duration::ZERO,
    );
    let b = &weir(d, &["backfills", "--pipeline", "pipeline.toml", "--json"]).json()[0];
    assert_eq!(b["status"], "INTERRUPTED", "{b}");
    assert_eq!(entries(&d.join("out/data")), ["day=2024-01-01"], "the first switch was made");
    assert!(!d.join("out/again/day=2024-01-01").exists(), "the second not yet");

    // recovery completes the decided run and marks its partition done in the plan
    let rec = weir(d, &["recover", "pipeline.toml"]);
    assert!(rec.stdout.contains("1 completed (had decided to publish)"), "{}", rec.stdout);
    assert_eq!(entries(&d.join("out/again")), ["day=2024-01-01"]);
    let b = &weir(d, &["backfills", "--pipeline", "pipeline.toml", "--json"]).json()[0];
    let first = &b["partitions"][0];
    assert_eq!((first["partition"].as_str(), first["status"].as_str()), (Some("2024-01-01"), Some("SUCCESS")), "{b}");

    // resuming runs only the rest
    let out = weir(d, &["backfill", "pipeline.toml", "--resume", "1", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = out.json();
    assert_eq!(
        (s["ran"].as_u64(), s["already_done"].as_u64(), s["status"].as_str()),
        (Some(2), Some(1), Some("SUCCESS"))
    );
    for ds in ["out/data", "out/again"] {
        assert_eq!(entries(&d.join(ds)), ["day=2024-01-01", "day=2024-01-02", "day=2024-01-03"], "{ds}");
        assert_eq!(dataset_rows(&d.join(ds)).len(), 6, "{ds}");
    }
}

#[test]
fn log_lines_have_levels_and_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("in.csv"), "id,name\n1,a\nx,b\n2,c\n").unwrap();
    std::fs::write(
        d.join("pipeline.toml"),
        r#"[pipeline]
name = "logs"

[sources.input]
format = "csv"
path = "in.csv"
schema = { id = "int64", name = "string" }
on_error = "skip"

[steps.s]
input = "input"
output = { path = "out/s" }
"#,
    )
    .unwrap();
    // machines get one JSON object a line, each with its level
    let out = weir(d, &["run", "pipeline.toml", "--force", "--log-format", "json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<serde_json::Value> =
        out.stderr.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let skipped = lines.iter().find(|l| l["message"].as_str().unwrap().contains("in.csv:3: column `id`")).unwrap();
    assert_eq!(skipped["level"], "WARN", "{skipped}");
    assert!(lines.iter().all(|l| l["timestamp"].is_string()));
    // --quiet keeps warnings (the skipped row) and drops the rest; --log-level decides too
    let quiet = weir(d, &["run", "pipeline.toml", "--force", "--quiet"]);
    assert!(quiet.stderr.contains("in.csv:3: column `id`"), "{}", quiet.stderr);
    let errors_only = weir(d, &["run", "pipeline.toml", "--force", "--log-level", "error"]);
    assert_eq!(errors_only.stderr, "", "nothing at error level in a good run");
    let bad = weir(d, &["run", "pipeline.toml", "--log-level", "loud"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("unknown log level `loud`"), "{}", bad.stderr);
    let bad = weir(d, &["run", "pipeline.toml", "--log-level", "weir::plugin=chatty"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("bad log directive `weir::plugin=chatty`"), "{}", bad.stderr);
    // a directive alone keeps the default level for the rest
    let plugins_quiet = weir(d, &["run", "pipeline.toml", "--force", "--log-level", "weir::plugin=warn"]);
    assert!(plugins_quiet.stderr.contains("weir: skipped"), "{}", plugins_quiet.stderr);
    let env = weir_command(d, &["run", "pipeline.toml", "--force"]).env("WEIR_LOG", "warn").output().unwrap();
    let env_err = String::from_utf8_lossy(&env.stderr);
    assert!(env_err.contains("weir: skipped") && !env_err.contains("weir: plugin"), "{env_err}");
}

#[test]
fn csv_dialects_keep_their_line_numbers_and_bad_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // two lines before the header, Latin-1 text, a backslash-escaped quote, a bad row on line 6
    let mut text = b"Export\n# from the ledger\nid,name\n1,\"Zo\xeb\"\n2,\"say \\\"hi\\\"\"\nx,bad\n".to_vec();
    text.extend_from_slice(b"3,\"caf\xe9\"\n");
    std::fs::write(d.join("in.csv"), &text).unwrap();
    let pipeline = |extra: &str| {
        format!(
            "[pipeline]\nname = \"dialects\"\n\n[sources.input]\nformat = \"csv\"\npath = \"in.csv\"\nschema = {{ id = \"int64\", name = \"string\" }}\n{extra}\n\n[steps.s]\ninput = \"input\"\noutput = {{ path = \"out/s\" }}\n"
        )
    };
    std::fs::write(d.join("pipeline.toml"), pipeline("skip_rows = 2\nencoding = \"latin1\"\nescape = \"\\\\\""))
        .unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("in.csv:6: column `id`: cannot parse \"x\""), "{}", out.stderr);
    std::fs::write(
        d.join("pipeline.toml"),
        pipeline("skip_rows = 2\nencoding = \"latin1\"\nescape = \"\\\\\"\non_error = \"skip\""),
    )
    .unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows = dataset_rows(&d.join("out/s"));
    let names: Vec<&str> = rows.iter().map(|r| r.split_once(',').unwrap().1).collect();
    assert_eq!(names, ["Zoë", "say \"hi\"", "café"]);
    // without the encoding, the Latin-1 byte is bad UTF-8, named with its line and the advice
    std::fs::write(d.join("pipeline.toml"), pipeline("skip_rows = 2\nescape = \"\\\\\"")).unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert!(out.stderr.contains("in.csv:4: column `name`: invalid UTF-8"), "{}", out.stderr);
    // more lines skipped than the file has
    std::fs::write(d.join("pipeline.toml"), pipeline("skip_rows = 50")).unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert!(out.stderr.contains("the file ends before the 50 lines skip_rows skips"), "{}", out.stderr);
    // keys in the wrong place, and an encoding nobody knows, each named at its line
    std::fs::write(d.join("pipeline.toml"), pipeline("encoding = \"klingon\"\nquote = \"''\"")).unwrap();
    let out = weir(d, &["validate", "pipeline.toml"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("unknown encoding `klingon`"), "{}", out.stderr);
    assert!(out.stderr.contains("sources.input.quote must be one ASCII character"), "{}", out.stderr);
    let jsonl = pipeline("skip_rows = 1").replace("format = \"csv\"", "format = \"jsonl\"");
    std::fs::write(d.join("pipeline.toml"), jsonl).unwrap();
    let out = weir(d, &["validate", "pipeline.toml"]);
    assert!(out.stderr.contains("sources.input.skip_rows applies to csv sources only"), "{}", out.stderr);
}

#[test]
fn csv_null_markers_read_as_null() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("in.csv"), "id,amount,name\n1,NULL,a\n2,\\N,NULL\n3,4.5,\n").unwrap();
    let pipeline = |extra: &str| {
        format!(
            "[pipeline]\nname = \"nulls\"\n\n[sources.input]\nformat = \"csv\"\npath = \"in.csv\"\n{extra}\n\n[steps.s]\ninput = \"input\"\noutput = {{ path = \"out/s\" }}\n"
        )
    };
    // without markers, NULL in a number column is bad data, named
    std::fs::write(
        d.join("pipeline.toml"),
        pipeline("schema = { id = \"int64\", amount = \"float64\", name = \"string\" }"),
    )
    .unwrap();
    let out = weir(d, &["run", "pipeline.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("in.csv:2: column `amount`: cannot parse \"NULL\""), "{}", out.stderr);
    // with them, both markers are nulls in every column, and inference ignores them
    for schema in ["schema = { id = \"int64\", amount = \"float64\", name = \"string\" }\n", ""] {
        std::fs::write(d.join("pipeline.toml"), pipeline(&format!("{schema}null_values = [\"NULL\", \"\\\\N\"]")))
            .unwrap();
        let out = weir(d, &["run", "pipeline.toml", "--force"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let rows = dataset_rows(&d.join("out/s"));
        assert_eq!(rows, ["[] 1,,a", "[] 2,,", "[] 3,4.5,"], "{schema}");
        let f = &parquet_files(&d.join("out/s"))[0].0;
        let schema_read = read_parquet(f)[0].schema();
        assert_eq!(schema_read.field(1).data_type(), &arrow_schema::DataType::Float64, "inferred past the markers");
        let names = read_parquet(f)[0].column(2).clone();
        assert_eq!(names.null_count(), 2, "NULL and the empty field");
    }
    // a marker on a source that is not CSV is refused with its line
    std::fs::write(
        d.join("pipeline.toml"),
        "[pipeline]\nname = \"nulls\"\n\n[sources.input]\nformat = \"jsonl\"\npath = \"in.jsonl\"\nnull_values = [\"NULL\"]\n\n[steps.s]\ninput = \"input\"\noutput = { path = \"out/s\" }\n",
    )
    .unwrap();
    let out = weir(d, &["validate", "pipeline.toml"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stdout.contains("pipeline.toml:7:") || out.stderr.contains("pipeline.toml:7:"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert!(format!("{}{}", out.stdout, out.stderr).contains("null_values applies to csv sources only"));
}

#[test]
fn hostile_records_without_end_are_refused_at_max_record_mb_not_read_into_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // a good line, then a 4 MiB one without a line end; a CSV whose second record opens a quote
    // that never closes
    let long = "x".repeat(4 << 20);
    std::fs::write(d.join("in.jsonl"), format!("{{\"id\":1}}\n{{\"id\":2,\"pad\":\"{long}\"}}")).unwrap();
    std::fs::write(d.join("in.csv"), format!("id,name\n1,a\n2,\"{}", "y\n".repeat(2 << 20))).unwrap();
    let pipeline = |format: &str, extra: &str| {
        format!(
            "[pipeline]\nname = \"long\"\n\n[sources.input]\nformat = \"{format}\"\npath = \"in.{format}\"\nschema = {{ id = \"int64\"{} }}\non_error = \"skip\"\n{extra}\n\n[steps.s]\ninput = \"input\"\noutput = {{ path = \"out/{format}\" }}\n",
            if format == "csv" { ", name = \"string\"" } else { "" }
        )
    };
    for (format, line) in [("jsonl", 2), ("csv", 3)] {
        std::fs::write(d.join("pipeline.toml"), pipeline(format, "max_record_mb = 1")).unwrap();
        let out = weir(d, &["run", "pipeline.toml"]);
        // never skipped, even with on_error = "skip": what follows is not records either
        assert_eq!(out.code, 1, "{format}: {}", out.stderr);
        assert!(
            out.stderr.contains(&format!("in.{format}:{line}: a record longer than 1 MiB")),
            "{format}: {}",
            out.stderr
        );
        assert!(out.stderr.contains("raise the source's max_record_mb"), "{}", out.stderr);
        // with room for it, the same file reads
        std::fs::write(d.join("pipeline.toml"), pipeline(format, "max_record_mb = 16")).unwrap();
        let out = weir(d, &["run", "pipeline.toml", "--force"]);
        assert_eq!(out.code, 0, "{format}: {}", out.stderr);
        assert_eq!(dataset_rows(&d.join(format!("out/{format}"))).len(), 2, "{format}");
    }
    std::fs::write(d.join("pipeline.toml"), pipeline("csv", "max_record_mb = 0")).unwrap();
    let out = weir(d, &["validate", "pipeline.toml"]);
    assert!(out.stderr.contains("sources.input.max_record_mb must be 1..1024"), "{}", out.stderr);
}

#[test]
fn an_output_path_that_is_not_weirs_to_replace_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("landing")).unwrap();
    std::fs::write(d.join("landing/in.csv"), "id\n1\n").unwrap();
    std::fs::create_dir_all(d.join("reports")).unwrap();
    std::fs::write(d.join("reports/q3.xlsx"), "precious").unwrap();
    std::fs::write(d.join("notes.txt"), "precious").unwrap();
    let pipeline = |out: &str| {
        format!(
            "[pipeline]\nname = \"guard\"\n\n[sources.input]\nformat = \"csv\"\npath = \"landing/in.csv\"\n\n[steps.s]\ninput = \"input\"\noutput = {{ path = \"{out}\" }}\n"
        )
    };
    for (out, says) in [
        ("landing/in.csv", "holds the files of sources.input"),
        ("landing", "holds the files of sources.input"),
        (".", "holds the files of sources.input"),
        ("reports", "holds `q3.xlsx`, which is not part of a dataset weir wrote"),
        ("notes.txt", "exists and is not a directory"),
    ] {
        std::fs::write(d.join("pipeline.toml"), pipeline(out)).unwrap();
        let out_ = weir(d, &["run", "pipeline.toml"]);
        assert_eq!(out_.code, 2, "{out}: {}", out_.stderr);
        assert!(out_.stderr.contains(says), "{out}: {}", out_.stderr);
        assert!(out_.stderr.contains("pipeline.toml:"), "{out}: {}", out_.stderr);
    }
    assert_eq!(std::fs::read_to_string(d.join("landing/in.csv")).unwrap(), "id\n1\n");
    assert_eq!(std::fs::read_to_string(d.join("reports/q3.xlsx")).unwrap(), "precious");
    assert_eq!(std::fs::read_to_string(d.join("notes.txt")).unwrap(), "precious");
    // a dataset weir wrote is replaced, run after run
    std::fs::write(d.join("pipeline.toml"), pipeline("out/s")).unwrap();
    assert_eq!(weir(d, &["run", "pipeline.toml"]).code, 0);
    let again = weir(d, &["run", "pipeline.toml", "--force"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
}

#[test]
fn hostile_files_of_too_many_columns_are_refused_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let header: Vec<String> = (0..20_000).map(|i| format!("c{i}")).collect();
    std::fs::write(d.join("wide.csv"), format!("{}\n{}\n", header.join(","), "1,".repeat(19_999) + "1")).unwrap();
    // a new key on every line: inference would keep them all
    let lines: String = (0..12_000).map(|i| format!("{{\"k{i}\":1}}\n")).collect();
    std::fs::write(d.join("wide.jsonl"), lines).unwrap();
    for (file, format, line, says) in [
        ("wide.csv", "csv", 1, "20000 columns; weir reads at most 10000"),
        ("wide.jsonl", "jsonl", 10_001, "more than 10000 distinct keys"),
    ] {
        std::fs::write(
            d.join("pipeline.toml"),
            format!("[pipeline]\nname = \"wide\"\n\n[sources.input]\nformat = \"{format}\"\npath = \"{file}\"\ninfer_rows = 20000\n\n[steps.s]\ninput = \"input\"\noutput = {{ path = \"out/{format}\" }}\n"),
        )
        .unwrap();
        let out = weir(d, &["run", "pipeline.toml"]);
        assert_eq!(out.code, 1, "{file}: {}", out.stderr);
        assert!(out.stderr.contains(&format!("{file}:{line}: {says}")), "{file}: {}", out.stderr);
    }
}

// ------------------------------------------------------------------------------------------
// Keyed state kept by the host

/// Rows of a dataset in file and row order.
fn ordered_rows(dir: &Path) -> Vec<String> {
    parquet_files(dir).iter().flat_map(|(f, _)| read_parquet(f)).flat_map(|b| batch_rows(&b)).collect()
}

/// 20,000 rows over 12,000 keys with 200-byte payloads (a few MB of state), 1,000 rows a
/// batch: dedup keep = last by `v`, then a group-by on the kept rows, under `state_mb`.
fn state_pipeline(dir: &Path, state: &str, slow_ms: u64) {
    let mut csv = String::from("id,k,v,pad\n");
    let pad = "x".repeat(200);
    for i in 0..20_000u64 {
        let k = (i * 7919) % 12_000;
        csv.push_str(&format!("{i},key-{k},{},{pad}{}\n", (i * 31) % 1000, i % 10));
    }
    std::fs::write(dir.join("in.csv"), csv).unwrap();
    dedup_then_aggregate(
        dir,
        &TwoSteps {
            name: "state",
            batch_size: 1000,
            checkpoint_every: 4,
            limits: state,
            sleep_ms: slow_ms,
            dedup: r#"{ key = ["k"], keep = "last", order_by = "v" }"#,
            first: "latest",
            aggregate: r#"{ group_by = ["k"], flush_groups = 1000, aggregates = [{ fn = "max", column = "v", as = "v" }, { fn = "sum", column = "id", as = "ids" }, { fn = "min", column = "pad", as = "pad" }] }"#,
            second: "per_pad",
        },
    );
}

#[test]
fn keyed_state_spills_past_its_budget_and_a_killed_run_resumes_to_the_same_rows() {
    // the reference: state in memory
    let whole = tempfile::tempdir().unwrap();
    state_pipeline(whole.path(), "", 0);
    let out = weir(whole.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.json()["steps"][0]["counters"]["dedup"].get("state_spills").is_none(), "{}", out.stdout);
    let want_latest = ordered_rows(&whole.path().join("out/latest"));
    let want_per_pad = ordered_rows(&whole.path().join("out/per_pad"));
    assert_eq!(want_latest.len(), 12_000);
    assert_eq!(want_per_pad.len(), 12_000);

    // a 1 MiB budget: the winners spill to disk, and come back the same, in the same order
    let small = tempfile::tempdir().unwrap();
    state_pipeline(small.path(), "state_mb = 1", 0);
    let out = weir(small.path(), &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let counters = &out.json()["steps"][0]["counters"]["dedup"];
    assert!(counters["state_spills"].as_i64().unwrap() >= 2, "{counters}");
    assert_eq!(counters["duplicates_dropped"], 8_000);
    assert_eq!(ordered_rows(&small.path().join("out/latest")), want_latest);
    assert_eq!(ordered_rows(&small.path().join("out/per_pad")), want_per_pad);
    assert_eq!(entries(&small.path().join("out")), ["latest", "per_pad"], "no state left beside the output");

    // killed -9 after its second checkpoint, with state spilled; resumed: the same rows
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    state_pipeline(d, "state_mb = 1", 30);
    kill_at_nth(
        d,
        &["run", "pipeline.toml"],
        &[("WEIR_DEBUG_PAUSE", "after-checkpoint:1")],
        "debug pause at after-checkpoint",
        2,
        std::time::Duration::from_millis(50),
    );
    let staged_state: Vec<String> = entries(&d.join("out")).into_iter().filter(|e| e.ends_with("-state")).collect();
    assert_eq!(staged_state.len(), 1, "the killed run left its state: {:?}", entries(&d.join("out")));
    let out = weir(d, &["run", "pipeline.toml", "--resume", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("step `latest` resumes after batch "), "{}", out.stderr);
    assert_eq!(out.json()["steps"][0]["rows_read"], 20_000);
    assert_eq!(ordered_rows(&d.join("out/latest")), want_latest, "resumed equals uninterrupted");
    assert_eq!(ordered_rows(&d.join("out/per_pad")), want_per_pad);
    assert_eq!(entries(&d.join("out")), ["latest", "per_pad"]);
}

#[test]
fn dedup_keys_larger_than_the_plugin_memory_pass_with_checkpoints_on() {
    // 200,000 distinct 100-byte keys: about 20 MB of keys, more than the plugin's 16 MiB
    // of memory; they live in the host, and every checkpoint writes only the new ones
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut csv = String::from("k,n\n");
    let long = "k".repeat(90);
    for i in 0..220_000u64 {
        csv.push_str(&format!("{long}{:010},{i}\n", i % 200_000));
    }
    std::fs::write(d.join("in.csv"), csv).unwrap();
    std::fs::write(
        d.join("pipeline.toml"),
        format!(
            r#"[pipeline]
name = "big_keys"
batch_size = 4096
checkpoint_every = 4

[sources.input]
format = "csv"
path = "in.csv"

[plugins.dedup]
path = "{}"
memory_mb = 16

[steps.out]
input = "input"
output = {{ path = "out/keys" }}

[[steps.out.transforms]]
plugin = "dedup"
config = {{ key = ["k"] }}
"#,
            plugin("dedup").display()
        ),
    )
    .unwrap();
    let out = weir(d, &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = out.json();
    assert_eq!(s["steps"][0]["rows_written"], 200_000);
    assert_eq!(s["steps"][0]["counters"]["dedup"]["duplicates_dropped"], 20_000);
    let kept = dataset_rows(&d.join("out/keys"));
    // a set past its budget spills its keys to disk and gives the same rows
    let text = std::fs::read_to_string(d.join("pipeline.toml")).unwrap().replace("memory_mb = 16", "state_mb = 1");
    std::fs::write(d.join("pipeline.toml"), text).unwrap();
    let out = weir(d, &["run", "pipeline.toml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = out.json();
    assert!(s["steps"][0]["counters"]["dedup"]["state_spills"].as_i64().unwrap() > 1, "{s}");
    assert_eq!(s["steps"][0]["counters"]["dedup"]["duplicates_dropped"], 20_000);
    assert_eq!(dataset_rows(&d.join("out/keys")), kept);
    // killed -9 after its third checkpoint with keys spilled; resumed: the same rows
    std::fs::remove_dir_all(d.join("out")).unwrap();
    std::fs::remove_dir_all(d.join(".weir")).ok();
    kill_at_nth(
        d,
        &["run", "pipeline.toml"],
        &[("WEIR_DEBUG_PAUSE", "after-checkpoint:1")],
        "debug pause at after-checkpoint",
        3,
        std::time::Duration::from_millis(50),
    );
    let out = weir(d, &["run", "pipeline.toml", "--resume", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("resumes after batch "), "{}", out.stderr);
    assert_eq!(dataset_rows(&d.join("out/keys")), kept, "resumed equals uninterrupted");
}

#[test]
fn schema_contracts_record_every_version_and_evolve_freeze_or_fail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pipeline = |policy: &str| {
        std::fs::write(
            d.join("p.toml"),
            format!(
                "[pipeline]\nname = \"contracts\"\n\n[sources.people]\nformat = \"csv\"\npath = \"in.csv\"\n{policy}\n\n[steps.copy]\ninput = \"people\"\noutput = {{ path = \"out\" }}\n"
            ),
        )
        .unwrap();
    };
    let columns = || -> Vec<String> {
        let b = read_parquet(&parquet_files(&d.join("out"))[0].0);
        b[0].schema().fields().iter().map(|f| f.name().clone()).collect()
    };
    std::fs::write(d.join("in.csv"), "id,name\n1,ann\n2,bob\n").unwrap();
    pipeline("schema_change = \"fail\"");
    let out = weir(d, &["run", "p.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    // fail: a new column stops the run, names it, publishes nothing
    std::fs::write(d.join("in.csv"), "id,name,email\n1,ann,a@x\n2,bob,b@x\n").unwrap();
    let out = weir(d, &["run", "p.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("source `people`: its columns changed since run #1"), "{}", out.stderr);
    assert!(out.stderr.contains("+ email (Utf8)"), "{}", out.stderr);
    assert_eq!(columns(), ["id", "name"]);
    // ... and keeps stopping it: a failed run's schema is recorded but not adopted
    assert_eq!(weir(d, &["run", "p.toml"]).code, 1);

    // freeze: the new column is dropped with a warning
    pipeline("schema_change = \"freeze\"");
    let out = weir(d, &["run", "p.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("dropped (schema_change = \"freeze\"): + email (Utf8)"), "{}", out.stderr);
    assert_eq!(columns(), ["id", "name"]);

    // evolve: the new column goes into the output, and later runs expect it
    pipeline("schema_change = \"evolve\"");
    let out = weir(d, &["run", "p.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(columns(), ["id", "name", "email"]);
    pipeline("schema_change = \"fail\"");
    assert_eq!(weir(d, &["run", "p.toml", "--force"]).code, 0, "the evolved schema is the one compared with");

    // a removed column or a changed type is not taken in by evolve
    pipeline("schema_change = \"evolve\"");
    std::fs::write(d.join("in.csv"), "id,email\n1.5,a@x\n").unwrap();
    let out = weir(d, &["run", "p.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("- name (Utf8)") && out.stderr.contains("id Int64 -> Float64"), "{}", out.stderr);

    // no policy: taken as it is, the change logged
    pipeline("");
    let out = weir(d, &["run", "p.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("source `people` changed since run #"), "{}", out.stderr);

    // the history: every version, the run that first saw it, what it did
    let out = weir(d, &["schema", "p.toml", "people", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let actions: Vec<String> =
        out.json().as_array().unwrap().iter().map(|v| v["action"].as_str().unwrap().to_string()).collect();
    assert_eq!(actions, ["initial", "failed", "frozen", "evolved", "failed", "changed"]);
    let out = weir(d, &["schema", "p.toml", "people"]);
    assert!(out.stdout.contains("6 schema versions") && out.stdout.contains("+ email (Utf8)"), "{}", out.stdout);
    let out = weir(d, &["schema", "p.toml", "nobody"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no source `nobody`"), "{}", out.stderr);
}

#[test]
fn schema_contracts_map_a_retyped_column_back_and_fill_a_removed_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pipeline = |extra: &str| {
        std::fs::write(
            d.join("p.toml"),
            format!(
                "[pipeline]\nname = \"maps\"\n\n[sources.people]\nformat = \"csv\"\npath = \"in.csv\"\nschema_change = \"evolve\"\n{extra}\n\n[steps.copy]\ninput = \"people\"\noutput = {{ path = \"out\" }}\n"
            ),
        )
        .unwrap();
    };
    std::fs::write(d.join("in.csv"), "id,name\n1,ann\n").unwrap();
    pipeline("");
    assert_eq!(weir(d, &["run", "p.toml"]).code, 0);
    // `id` now reads as Float64 and `name` is gone: evolve stops, naming the keys that map them
    std::fs::write(d.join("in.csv"), "id\n7.0\n").unwrap();
    let out = weir(d, &["run", "p.toml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("fill_missing") && out.stderr.contains("cast ="), "{}", out.stderr);
    pipeline("cast = { id = \"int64\" }\nfill_missing = [\"name\"]");
    let out = weir(d, &["run", "p.toml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("no longer has `name`: read as nulls"), "{}", out.stderr);
    let b = read_parquet(&parquet_files(&d.join("out"))[0].0);
    let schema = b[0].schema();
    assert_eq!(schema.field(0).data_type(), &arrow_schema::DataType::Int64);
    assert_eq!(schema.field(1).name(), "name");
    assert_eq!(b[0].column(0).as_primitive::<Int64Type>().value(0), 7);
    assert_eq!(b[0].column(1).null_count(), 1);
    // a cast of a column the source lacks is named
    pipeline("cast = { nope = \"int64\" }");
    let out = weir(d, &["run", "p.toml", "--force"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("`cast` names `nope`"), "{}", out.stderr);
}
