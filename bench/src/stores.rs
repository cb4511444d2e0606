//! `weir-bench stores`: the host's keyed state (`weir::state`) against two maintained
//! embedded stores, fjall (an LSM tree) and redb (a copy-on-write B-tree), on the two things
//! a plugin's state does: a set asked which keys are new (dedup keep=first, `unique`) and
//! a table summing values per key (aggregate), each past a memory budget so it must use
//! the disk. Built only with `--features stores`; one store and workload per process, so
//! each reports its own peak RSS.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use weir::state::{Combine, KeyedState, Spec};

/// Row `i`'s key (one of `keys`, drawn with repeats) and value.
fn rows(n: usize, keys: u64) -> impl Iterator<Item = (String, i64)> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n).map(move |i| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (format!("user-{:012}", x % keys), (i % 1000) as i64)
    })
}

/// The same rows as batches of 64K.
fn batches(n: usize, keys: u64) -> impl Iterator<Item = RecordBatch> {
    let mut it = rows(n, keys).peekable();
    std::iter::from_fn(move || {
        it.peek()?;
        let chunk: Vec<(String, i64)> = it.by_ref().take(super::BATCH).collect();
        let k: ArrayRef = Arc::new(StringArray::from_iter_values(chunk.iter().map(|(k, _)| k.as_str())));
        let v: ArrayRef = Arc::new(Int64Array::from_iter_values(chunk.iter().map(|(_, v)| *v)));
        RecordBatch::try_from_iter([("k", k), ("v", v)]).ok()
    })
}

/// What a run must agree on across stores: new keys, or keys and the sum of their sums
/// weighted by a hash of the key (order-free).
#[derive(Default)]
struct Outcome {
    new_keys: u64,
    keys: u64,
    weighted: u64,
}

impl Outcome {
    fn add_sum(&mut self, key: &[u8], sum: i64) {
        self.keys += 1;
        let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3));
        self.weighted = self.weighted.wrapping_add(h.wrapping_mul(sum as u64));
    }
}

pub fn run(store: &str, workload: &str, n: usize, keys: u64, budget_mb: usize, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::tempdir_in(dir)?;
    let budget = budget_mb << 20;
    let t = Instant::now();
    let out = match (store, workload) {
        ("weir" | "weir-memory", _) => weir_state(workload, n, keys, budget, (store == "weir").then(|| tmp.path()))?,
        ("fjall", _) => fjall_store(workload, n, keys, budget, tmp.path())?,
        ("redb", _) => redb_store(workload, n, keys, budget, tmp.path())?,
        (other, _) => bail!("unknown store `{other}`: weir, weir-memory, fjall or redb"),
    };
    let secs = t.elapsed().as_secs_f64();
    let disk = du(tmp.path());
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    println!(
        "{}",
        serde_json::json!({
            "store": store, "workload": workload, "rows": n, "keys": keys, "budget_mb": budget_mb,
            "seconds": secs, "peak_rss_mb": ru.ru_maxrss / 1024, "disk_mb_at_end": disk >> 20,
            "new_keys": out.new_keys, "keys_out": out.keys, "weighted": format!("{:016x}", out.weighted),
        })
    );
    Ok(())
}

fn du(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => du(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn weir_state(workload: &str, n: usize, keys: u64, budget: usize, dir: Option<&Path>) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut it = batches(n, keys);
    let Some(first) = it.next() else { return Ok(out) };
    let (spec, budget) = match workload {
        "set" => (Spec::set("s", &["k"]), budget),
        "sum" => (Spec::table("s", &["k"], &[("v", Combine::Sum)], None), budget),
        other => bail!("unknown workload `{other}`: set or sum"),
    };
    let budget = if dir.is_none() { usize::MAX } else { budget };
    let mut state = KeyedState::open(spec, first.schema(), dir.map(|d| d.join("state")), None)?;
    for b in std::iter::once(first).chain(it) {
        if workload == "set" {
            out.new_keys += state.insert_new(&b, budget)?.iter().filter(|n| **n).count() as u64;
        } else {
            state.merge(&b, budget)?;
        }
    }
    if workload == "sum" {
        while let Some(b) = state.scan(super::BATCH)? {
            let (k, v) = (b.column(0).as_string::<i32>(), b.column(1).as_primitive::<Int64Type>());
            for i in 0..b.num_rows() {
                out.add_sum(k.value(i).as_bytes(), v.value(i));
            }
        }
    }
    Ok(out)
}

fn fjall_store(workload: &str, n: usize, keys: u64, budget: usize, dir: &Path) -> Result<Outcome> {
    let db = fjall::Database::builder(dir).cache_size(budget as u64).temporary(true).open()?;
    let ks = db.keyspace("s", fjall::KeyspaceCreateOptions::default)?;
    let mut out = Outcome::default();
    for (k, v) in rows(n, keys) {
        match workload {
            "set" => {
                if !ks.contains_key(&k)? {
                    ks.insert(k.as_bytes(), [])?;
                    out.new_keys += 1;
                }
            }
            _ => {
                let old = ks.get(&k)?.map(|b| i64::from_le_bytes(b[..8].try_into().unwrap_or_default())).unwrap_or(0);
                ks.insert(k.as_bytes(), old.wrapping_add(v).to_le_bytes())?;
            }
        }
    }
    if workload == "sum" {
        for g in ks.iter() {
            let (k, v) = g.into_inner()?;
            out.add_sum(&k, i64::from_le_bytes(v[..8].try_into().unwrap_or_default()));
        }
    }
    Ok(out)
}

fn redb_store(workload: &str, n: usize, keys: u64, budget: usize, dir: &Path) -> Result<Outcome> {
    use redb::{ReadableDatabase, ReadableTable};
    const T: redb::TableDefinition<&[u8], i64> = redb::TableDefinition::new("s");
    let db = redb::Database::builder().set_cache_size(budget).create(dir.join("s.redb"))?;
    let mut out = Outcome::default();
    let mut it = rows(n, keys).peekable();
    while it.peek().is_some() {
        // one transaction per 64K rows, not made durable (a spill needs no fsync)
        let mut tx = db.begin_write()?;
        tx.set_durability(redb::Durability::None)?;
        {
            let mut t = tx.open_table(T)?;
            for (k, v) in it.by_ref().take(super::BATCH) {
                let old = t.get(k.as_bytes())?.map(|g| g.value());
                match (workload, old) {
                    ("set", Some(_)) => {}
                    ("set", None) => {
                        t.insert(k.as_bytes(), 0)?;
                        out.new_keys += 1;
                    }
                    (_, old) => {
                        t.insert(k.as_bytes(), old.unwrap_or(0).wrapping_add(v))?;
                    }
                }
            }
        }
        tx.commit()?;
    }
    if workload == "sum" {
        let tx = db.begin_read()?;
        let t = tx.open_table(T)?;
        for e in t.iter()? {
            let (k, v) = e?;
            out.add_sum(k.value(), v.value());
        }
    }
    Ok(out)
}
