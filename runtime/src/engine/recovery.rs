//! Settling runs whose process died: an undecided run is marked FAILED and its staging
//! removed; a decided one is completed (rolled forward) from its staged output.

use super::publish::{publisher, Switch};
use super::{Level, LEASE};
use crate::store::{Decision, PublishEntry, RunRecord, RunStore, Status};
use crate::{Error, Result};

/// Find dead runs of the pipeline. One that had not decided to publish is marked FAILED and
/// what it staged is removed (unless kept for `--resume`); one that had decided is completed:
/// its remaining switches are made from its staged output and it is recorded SUCCESS with a
/// note. Fails (after trying every run) if a decided run cannot be completed: no other run
/// may publish over a half-published one.
pub fn recover(
    store: &dyn RunStore,
    pipeline: Option<&str>,
    by: &str,
    log: &dyn Fn(Level, &str),
    keep_staging: bool,
) -> Result<Vec<RunRecord>> {
    let dead = store.recover_stale(pipeline, LEASE.as_millis() as i64, by)?;
    let mut first_error = None;
    for r in &dead {
        if let Some(decision) = &r.decision {
            match roll_forward(store, r, decision, log) {
                Ok(()) => {}
                // the first is returned (and reported by the caller), the others logged
                Err(e) if first_error.is_some() => log(Level::ERROR, &format!("weir: error: {e}")),
                Err(e) => first_error = Some(e),
            }
            continue;
        }
        if !keep_staging {
            remove_staging(r);
        }
        let published = match r.published.len() {
            0 => "it had not decided to publish, so nothing was published".to_string(),
            // a run of a weir from before decisions were recorded
            n => format!("{n} switch(es) had been published by a weir that recorded no decision to complete"),
        };
        log(
            Level::WARN,
            &format!(
                "weir: recovered run #{} of `{}`: {}; {published}; {}",
                r.id,
                r.pipeline,
                r.error.as_deref().unwrap_or("crashed"),
                if keep_staging { "its staging is kept for --resume" } else { "its staging was removed" }
            ),
        );
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(dead),
    }
}

/// Complete the publish of a run that had decided to publish: make each switch not yet made
/// (a switch made but not recorded is recognised by its token), then record it SUCCESS.
fn roll_forward(store: &dyn RunStore, r: &RunRecord, decision: &Decision, log: &dyn Fn(Level, &str)) -> Result<()> {
    complete_decided(store, r, decision, log).inspect_err(|e| {
        // FAILED with its decision kept: the next recovery tries again, and no other run
        // publishes meanwhile
        let _ = store.finish_run(r.id, Status::Failed, &[], Some(&e.to_string()));
    })
}

fn complete_decided(store: &dyn RunStore, r: &RunRecord, decision: &Decision, log: &dyn Fn(Level, &str)) -> Result<()> {
    let total = decision.switches.len();
    let recorded = total - decision.pending();
    let (mut made_now, mut superseded) = (0, 0);
    for (seq, sw) in decision.switches.iter().enumerate() {
        if sw.done_at_ms.is_none() && !store.renew_lease(r.id)? {
            return Err(Error::Publish {
                step: sw.step.clone(),
                message: format!("run #{} was taken over by another process while it was being completed", r.id),
            });
        }
        let (switch, now) = publisher(&sw.kind).complete(sw, log).map_err(|e| Error::Publish {
            step: sw.step.clone(),
            message: format!(
                "run #{} had decided to publish, but its switch {} of {total} ({}) cannot be completed: {e}",
                r.id,
                seq + 1,
                sw.target.display()
            ),
        })?;
        made_now += usize::from(now);
        superseded += usize::from(switch == Switch::Superseded);
        if sw.done_at_ms.is_none() {
            let entry = PublishEntry {
                step: sw.step.clone(),
                path: sw.target.clone(),
                partition: sw.partition.clone(),
                action: switch.action(),
            };
            store.record_switch(r.id, seq, &entry)?;
        }
    }
    // what is left there is replaced data and emptied partition staging folders
    remove_staging(r);
    let cause = r.error.as_deref().unwrap_or("crashed");
    let note = format!(
        "completed by recovery after {}; of its {total} switches {recorded} had been made and recorded by the run, \
         {} made but not recorded, {made_now} made by recovery{}",
        if let Some(c) = cause.strip_prefix("crashed: ") {
            format!("it crashed ({c})")
        } else if let Some(c) = cause.strip_prefix("publish broke off: ") {
            format!("its publish broke off ({c})")
        } else {
            cause.to_string()
        },
        total - recorded - made_now - superseded,
        if superseded > 0 {
            format!(", {superseded} superseded (a later run had replaced the target)")
        } else {
            String::new()
        }
    );
    store.complete_recovered(r.id, &note)?;
    if let (Some(b), Some(p)) = (r.backfill_id, &r.partition) {
        store.set_backfill_partition(b, p, "SUCCESS", Some(r.id), None)?;
    }
    log(Level::INFO, &format!(
        "weir: recovered run #{} of `{}`: it had decided to publish; {made_now} of its {total} switches completed from its staged output; recorded SUCCESS",
        r.id, r.pipeline
    ));
    Ok(())
}

/// Remove what a run staged.
pub(super) fn remove_staging(r: &RunRecord) {
    for s in &r.staging {
        if s.exists() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}
