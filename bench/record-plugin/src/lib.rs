//! W1 and W2 of the benchmark written row at a time, as a per-record Wasm transform:
//! the host calls `process` once per row. W1 hashes through the host's per-row HMAC
//! import; W2 parses the timestamp text in the guest.
//!
//! Built for wasm32 only: on other targets the crate is empty (its export names are not
//! valid native symbol names).
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::collections::HashSet;

wit_bindgen::generate!({
    path: "../wit/record.wit",
    world: "record-plugin",
});

use exports::weir_bench::per_record::row_transform::{Guest, Value};
use weir_bench::per_record::host::hmac_hex;

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    W1,
    W2,
}

struct State {
    workload: Workload,
    countries: HashSet<String>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(workload: String) -> Result<(), String> {
        let workload = match workload.as_str() {
            "W1" => Workload::W1,
            "W2" => Workload::W2,
            other => return Err(format!("unknown workload `{other}` (W1 or W2)")),
        };
        let countries = (0..100).map(|c| format!("C{c:03}")).collect();
        STATE.with(|s| *s.borrow_mut() = Some(State { workload, countries }));
        Ok(())
    }

    fn process(mut row: Vec<Value>) -> Result<Option<Vec<Value>>, String> {
        STATE.with(|s| {
            let s = s.borrow();
            let s = s.as_ref().ok_or("process before init")?;
            match s.workload {
                // event_id, user_id, email, name, country, category, amount, ts, flag
                Workload::W1 => {
                    if row.len() != 9 {
                        return Err(format!("expected 9 columns, got {}", row.len()));
                    }
                    if let Value::Text(email) = &row[2] {
                        row[2] = Value::Text(hmac_hex(email));
                    }
                    row[3] = Value::Null;
                    Ok(Some(row))
                }
                // event_id, user_id, country, category, amount, ts
                Workload::W2 => {
                    let [id, user, country, category, amount, ts]: [Value; 6] =
                        row.try_into().map_err(|r: Vec<Value>| format!("expected 6 columns, got {}", r.len()))?;
                    let keep = matches!(amount, Value::Float(a) if a > 400.0)
                        && matches!(&country, Value::Text(c) if s.countries.contains(c));
                    if !keep {
                        return Ok(None);
                    }
                    let ts = match ts {
                        Value::Text(t) => Value::Int(parse_micros(&t).ok_or_else(|| format!("bad timestamp `{t}`"))?),
                        other => other,
                    };
                    Ok(Some(vec![id, user, country, category, amount, ts]))
                }
            }
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SS` (or a space for `T`) as microseconds since the Unix epoch.
fn parse_micros(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() != 19 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { t.get(r)?.parse().ok() };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // days from civil (proleptic Gregorian)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000_000 + ss * 1_000_000)
}

export!(Plugin);
