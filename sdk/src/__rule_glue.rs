//! Glue between the generated quality-rule exports and a [`QualityRule`].

use std::cell::RefCell;

use crate::__bindings::weir::plugin::types as ty;
use crate::__glue::to_wit;
use crate::__rule_bindings::exports::weir::plugin::quality_rule as wq;
use crate::error::Error;
use crate::rule::{BatchVerdict, QualityRule, RuleRunner, Verdict};
use crate::Context;

trait Erased {
    fn check(&mut self, batch: &[u8]) -> Result<BatchVerdict, Error>;
    fn finish(&mut self) -> Result<Verdict, Error>;
}

impl<T: QualityRule> Erased for RuleRunner<T> {
    fn check(&mut self, batch: &[u8]) -> Result<BatchVerdict, Error> {
        RuleRunner::check(self, batch)
    }
    fn finish(&mut self) -> Result<Verdict, Error> {
        RuleRunner::finish(self)
    }
}

thread_local! {
    static RULE: RefCell<Option<Box<dyn Erased>>> = const { RefCell::new(None) };
}

fn metrics(m: Vec<(String, f64)>) -> Vec<wq::Metric> {
    m.into_iter().map(|(name, value)| wq::Metric { name, value }).collect()
}

pub fn init<T: QualityRule>(config: String, input_schema: Vec<u8>, ctx: ty::Context) -> Result<(), ty::PluginError> {
    let ctx = Context { pipeline: ctx.pipeline, step: ctx.step, plugin: ctx.plugin, partition: ctx.partition };
    let runner = RuleRunner::<T>::init(&config, &input_schema, ctx).map_err(to_wit)?;
    RULE.with(|cell| *cell.borrow_mut() = Some(Box::new(runner)));
    Ok(())
}

fn with_rule<R>(f: impl FnOnce(&mut dyn Erased) -> Result<R, Error>) -> Result<R, ty::PluginError> {
    RULE.with(|cell| match cell.borrow_mut().as_mut() {
        Some(r) => f(r.as_mut()).map_err(to_wit),
        None => Err(ty::PluginError::Internal("called before init".into())),
    })
}

pub fn check(batch: Vec<u8>) -> Result<wq::BatchVerdict, ty::PluginError> {
    with_rule(|r| r.check(&batch)).map(|v| wq::BatchVerdict {
        failed_rows: v.failed_rows,
        reasons: v.reasons,
        metrics: metrics(v.metrics),
    })
}

pub fn finish() -> Result<wq::Verdict, ty::PluginError> {
    with_rule(|r| r.finish()).map(|v| wq::Verdict {
        passed: v.passed,
        observed: v.observed,
        message: v.message,
        metrics: metrics(v.metrics),
    })
}
