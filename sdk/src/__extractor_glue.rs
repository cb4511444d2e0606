//! Glue between the generated extractor exports and an [`Extractor`].

use std::cell::RefCell;

use crate::__bindings::weir::plugin::types as ty;
use crate::__extractor_bindings::exports::weir::plugin::extractor as wx;
use crate::__glue::to_wit;
use crate::error::Error;
use crate::extract::{Encoded, Extractor, ExtractorRunner};
use crate::Context;

type Next = Result<Option<Encoded>, Error>;

trait Erased {
    fn next(&mut self) -> Next;
}

impl<T: Extractor> Erased for ExtractorRunner<T> {
    fn next(&mut self) -> Next {
        ExtractorRunner::next_encoded(self)
    }
}

thread_local! {
    static EXTRACTOR: RefCell<Option<Box<dyn Erased>>> = const { RefCell::new(None) };
}

pub fn open<T: Extractor>(
    config: String,
    ctx: ty::Context,
    position: Option<Vec<u8>>,
    watermark: Option<String>,
) -> Result<Vec<u8>, ty::PluginError> {
    let ctx = Context { pipeline: ctx.pipeline, step: ctx.step, plugin: ctx.plugin, partition: ctx.partition };
    let (runner, schema) =
        ExtractorRunner::<T>::open(&config, ctx, position.as_deref(), watermark.as_deref()).map_err(to_wit)?;
    EXTRACTOR.with(|cell| *cell.borrow_mut() = Some(Box::new(runner)));
    Ok(schema)
}

pub fn next() -> Result<Option<wx::Extracted>, ty::PluginError> {
    EXTRACTOR.with(|cell| match cell.borrow_mut().as_mut() {
        Some(r) => r
            .next()
            .map(|o| o.map(|e| wx::Extracted { batch: e.ipc, position: e.position, watermark: e.watermark }))
            .map_err(to_wit),
        None => Err(ty::PluginError::Internal("next called before open".into())),
    })
}
