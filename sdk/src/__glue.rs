//! Glue between the generated component exports and a [`RawTransform`]. One instance of a
//! component runs one plugin instance, so the state lives in a thread-local.

use std::cell::RefCell;

use crate::__bindings::weir::plugin::types as ty;
use crate::error::Error;
use crate::host::{phase, phases};
use crate::runner::RawTransform;
use crate::Context;

trait Erased {
    fn process(&mut self, batch: &[u8]) -> Result<Vec<u8>, Error>;
    fn finish(&mut self) -> Result<Vec<u8>, Error>;
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, Error>;
    fn restore(&mut self, state: &[u8]) -> Result<(), Error>;
}

impl<T: RawTransform> Erased for T {
    fn process(&mut self, batch: &[u8]) -> Result<Vec<u8>, Error> {
        RawTransform::process(self, batch)
    }
    fn finish(&mut self) -> Result<Vec<u8>, Error> {
        RawTransform::finish(self)
    }
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, Error> {
        RawTransform::snapshot(self)
    }
    fn restore(&mut self, state: &[u8]) -> Result<(), Error> {
        RawTransform::restore(self, state)
    }
}

thread_local! {
    static INSTANCE: RefCell<Option<Box<dyn Erased>>> = const { RefCell::new(None) };
}

pub(crate) fn to_wit(e: Error) -> ty::PluginError {
    match e {
        Error::InvalidConfig(m) => ty::PluginError::InvalidConfig(m),
        Error::InvalidInput { row, column, message } => {
            ty::PluginError::InvalidInput(ty::InputError { row, column, message })
        }
        Error::Internal(m) => ty::PluginError::Internal(m),
    }
}

pub fn init<T: RawTransform>(
    config: String,
    input_schema: Vec<u8>,
    ctx: ty::Context,
) -> Result<Vec<u8>, ty::PluginError> {
    let ctx = Context { pipeline: ctx.pipeline, step: ctx.step, plugin: ctx.plugin, partition: ctx.partition };
    let (instance, schema) = T::init(&config, &input_schema, ctx).map_err(to_wit)?;
    INSTANCE.with(|cell| *cell.borrow_mut() = Some(Box::new(instance)));
    Ok(schema)
}

fn with_instance<R>(f: impl FnOnce(&mut dyn Erased) -> Result<R, Error>) -> Result<R, ty::PluginError> {
    INSTANCE.with(|cell| match cell.borrow_mut().as_mut() {
        Some(instance) => f(instance.as_mut()).map_err(to_wit),
        None => Err(ty::PluginError::Internal("called before init".into())),
    })
}

pub fn process(batch: Vec<u8>) -> Result<Vec<u8>, ty::PluginError> {
    phase(phases::ENTERED);
    let out = with_instance(|i| i.process(&batch));
    drop(batch);
    phase(phases::LEAVING);
    out
}

pub fn finish() -> Result<Vec<u8>, ty::PluginError> {
    phase(phases::ENTERED);
    let out = with_instance(|i| i.finish());
    phase(phases::LEAVING);
    out
}

/// Parts of a snapshot crossing to or from the host (contract 0.2.2).
const SNAPSHOT_PART: usize = 1 << 20;

/// The plugin's snapshot goes to the host in parts (`snapshot-write`), never in one call
/// whose size grows with the state; the call itself returns an empty tail.
pub fn snapshot() -> Result<Option<Vec<u8>>, ty::PluginError> {
    use crate::__bindings::weir::plugin::state::snapshot_write;
    let Some(bytes) = with_instance(|i| i.snapshot())? else { return Ok(None) };
    for part in bytes.chunks(SNAPSHOT_PART) {
        snapshot_write(part).map_err(|e| ty::PluginError::Internal(format!("snapshot: {e}")))?;
    }
    Ok(Some(Vec::new()))
}

/// The host hands a 0.2.2 plugin an empty list and the snapshot in parts (`snapshot-read`).
pub fn restore(state: Vec<u8>) -> Result<(), ty::PluginError> {
    use crate::__bindings::weir::plugin::state::snapshot_read;
    let mut whole = state;
    if whole.is_empty() {
        loop {
            let part = snapshot_read(SNAPSHOT_PART as u32);
            if part.is_empty() {
                break;
            }
            whole.extend_from_slice(&part);
        }
    }
    with_instance(|i| i.restore(&whole))
}
