//! Sources read by extractor plugins (`[sources.x] plugin = "NAME"`): the host runs the
//! plugin's `extractor` world in its sandbox, `open` then `next` until none.
//!
//! The position of a checkpoint is the plugin's own (opaque bytes, kept base64 in the
//! checkpoint's JSON) with the watermark so far; `seek` starts a fresh instance and opens it
//! from that position, so a resumed run continues where the plugin said it stood.

use std::collections::VecDeque;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use base64::Engine as _;

use super::{Position, Skipped, Source};
use crate::io::{Error, Result};
use crate::plugin::{CallError, ExtractorInstance, Limits, LoadedPlugin, LogSink};

/// What opening an extractor source needs besides its configuration.
#[derive(Clone)]
pub struct ExtractorSetup {
    pub plugin: LoadedPlugin,
    pub limits: Limits,
    pub log: LogSink,
    /// Pipeline, step, plugin name and partition, as the plugin sees them.
    pub context: weir_sdk::Context,
    /// The watermark committed by the last successful run, if any.
    pub watermark: Option<String>,
}

pub struct ExtractorSource {
    setup: ExtractorSetup,
    source_name: String,
    config_json: String,
    instance: ExtractorInstance,
    schema: SchemaRef,
    /// Batches of the last `next` not handed out yet.
    pending: VecDeque<RecordBatch>,
    /// Where the plugin stands after the last `next` (none before the first).
    position: Option<Vec<u8>>,
    watermark: Option<String>,
    calls: usize,
    done: bool,
}

impl ExtractorSource {
    pub fn open(source_name: &str, config_json: &str, setup: ExtractorSetup) -> Result<Self> {
        let (instance, schema) = start(source_name, config_json, &setup, None)?;
        Ok(ExtractorSource {
            watermark: setup.watermark.clone(),
            setup,
            source_name: source_name.to_string(),
            config_json: config_json.to_string(),
            instance,
            schema,
            pending: VecDeque::new(),
            position: None,
            calls: 0,
            done: false,
        })
    }

    fn fail(&self, batch: Option<u64>, e: impl Into<FailCause>) -> Error {
        failure(&self.setup, &self.source_name, batch, e.into())
    }
}

/// A new instance, opened from `position`: the instance and its schema.
fn start(
    source_name: &str,
    config_json: &str,
    setup: &ExtractorSetup,
    position: Option<&[u8]>,
) -> Result<(ExtractorInstance, SchemaRef)> {
    let mut inst = ExtractorInstance::new(&setup.plugin, setup.limits, setup.log.clone())
        .map_err(|e| failure(setup, source_name, None, FailCause::Load(e.to_string())))?;
    let schema = inst
        .open(config_json, &setup.context, position, setup.watermark.as_deref())
        .map_err(|e| failure(setup, source_name, None, FailCause::Call("open", e)))?;
    Ok((inst, schema))
}

enum FailCause {
    Load(String),
    Call(&'static str, CallError),
}

fn failure(setup: &ExtractorSetup, source_name: &str, batch: Option<u64>, cause: FailCause) -> Error {
    let plugin = setup.context.plugin.clone();
    let (cause, kill) = match cause {
        FailCause::Load(m) => (format!("source `{source_name}`: {m}"), None),
        FailCause::Call(call, e) => (format!("source `{source_name}`: {call} failed: {e}"), e.kill()),
    };
    Error::Plugin(Box::new(crate::PluginFailure {
        pipeline: setup.context.pipeline.clone(),
        step: setup.context.step.clone(),
        plugin: plugin.clone(),
        batch,
        cause,
        kill: kill.map(|reason| Box::new(crate::Kill { reason, plugin })),
    }))
}

impl From<(&'static str, CallError)> for FailCause {
    fn from((call, e): (&'static str, CallError)) -> Self {
        FailCause::Call(call, e)
    }
}

impl From<String> for FailCause {
    fn from(m: String) -> Self {
        FailCause::Load(m)
    }
}

impl Source for ExtractorSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn next_batch(&mut self) -> Option<Result<RecordBatch>> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some(Ok(b));
            }
            if self.done {
                return None;
            }
            self.calls += 1;
            match self.instance.next_batches() {
                Ok(Some(e)) => {
                    self.pending.extend(e.batches);
                    self.position = Some(e.position);
                    if e.watermark.is_some() {
                        self.watermark = e.watermark;
                    }
                }
                Ok(None) => self.done = true,
                Err(e) => {
                    self.done = true;
                    return Some(Err(self.fail(Some(self.calls as u64), ("next", e))));
                }
            }
        }
    }

    fn position(&self) -> Position {
        serde_json::json!({
            "extractor": self.position.as_ref().map(|p| base64::engine::general_purpose::STANDARD.encode(p)),
            "watermark": self.watermark,
            "done": self.done,
        })
    }

    fn seek(&mut self, at: &Position) -> Result<()> {
        let bad = || {
            Error::Internal(format!("source `{}`: the checkpoint's position is not an extractor's", self.source_name))
        };
        let obj = at.as_object().ok_or_else(bad)?;
        let position = match obj.get("extractor") {
            Some(serde_json::Value::String(p)) => {
                Some(base64::engine::general_purpose::STANDARD.decode(p).map_err(|_| bad())?)
            }
            Some(serde_json::Value::Null) | None => None,
            Some(_) => return Err(bad()),
        };
        self.done = obj.get("done").and_then(|d| d.as_bool()).unwrap_or(false);
        self.watermark = obj.get("watermark").and_then(|w| w.as_str()).map(str::to_string);
        self.pending.clear();
        if self.done {
            return Ok(());
        }
        let (instance, schema) = start(&self.source_name, &self.config_json, &self.setup, position.as_deref())?;
        if !weir_sdk::util::same_shape(&schema, &self.schema) {
            return Err(self.fail(
                None,
                format!(
                    "resumed, the plugin declares {} where the checkpoint has {}; run without --resume",
                    weir_sdk::util::schema_text(&schema),
                    weir_sdk::util::schema_text(&self.schema)
                ),
            ));
        }
        self.instance = instance;
        self.position = position;
        Ok(())
    }

    fn at_boundary(&self) -> bool {
        // the position is where the plugin stands after its last call: only once every
        // batch of that call is out
        self.pending.is_empty()
    }

    fn skipped(&self) -> (u64, &[Skipped]) {
        (0, &[])
    }

    fn inputs(&self) -> usize {
        1
    }

    fn high_watermark(&self) -> Option<String> {
        self.watermark.clone()
    }

    fn plugin_counters(&self) -> Option<(String, std::collections::HashMap<String, i64>)> {
        Some((self.setup.context.plugin.clone(), self.instance.counters().clone()))
    }
}
