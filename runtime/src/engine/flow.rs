//! A step's batches in flight: one thread per stage, joined by bounded channels.
//!
//! ```text
//!   reader ──Batch/Copy/Checkpoint/End──> plugin 1 ──> ... ──> writer (checks, sink)
//! ```
//!
//! The reader pulls from the [`Source`] and, every `checkpoint_every` batches at a boundary
//! the source allows, sends a checkpoint mark behind them. Each plugin stage adds its
//! snapshot to the mark as it passes; when it reaches the writer, everything before it went
//! through every stage, so the writer makes the sink durable and stores the checkpoint. A
//! stage that fails records its error and drops its sender: the stages after it see their
//! input close without `End` and stop without finishing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;

use super::quality::Quality;
use super::step::StepCtx;
use super::{debug_pause, PluginTimings, Progress};
use crate::cpu_clock::CpuTime;
use crate::io::sink::{CopiedGroup, Sink};
use crate::io::source::{Position, Skipped, Source};
use crate::plugin::{CallError, TransformInstance};
use crate::store::Checkpoint;
use crate::{Error, Result};

/// A checkpoint marker travelling down a step's stages behind the batches before it.
struct Mark {
    source: Position,
    batches: u64,
    rows_read: u64,
    rows_skipped: u64,
    /// Filled in by each plugin stage, in order.
    states: Vec<Option<Vec<u8>>>,
}

enum Msg {
    Batch(RecordBatch),
    Checkpoint(Box<Mark>),
    /// The batches that follow, up to this many rows, are one input row group whose
    /// untouched columns the sink copies (their values in the batches are placeholders).
    Copy(Box<CopiedGroup>),
    End,
}

/// What flows through a step: its source, its transforms in order, its sink and checks.
pub(super) struct Flow<'q> {
    pub source: Box<dyn Source>,
    pub transforms: Vec<(usize, TransformInstance)>,
    pub sink: Box<dyn Sink>,
    pub quality: Option<&'q mut Quality>,
    /// Where a resumed step starts (the default for a fresh one).
    pub base: Checkpoint,
    /// Checkpoint every this many batches (0: never).
    pub every: u64,
    /// The step's output schema, stored with each checkpoint.
    pub schema_ipc: Vec<u8>,
}

/// What went through a step.
#[derive(Default)]
pub(super) struct Flowed {
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_skipped: u64,
    /// The first skipped rows, with their place.
    pub skipped: Vec<Skipped>,
    /// The partitions the sink wrote.
    pub partitions: Vec<String>,
    pub copied_row_groups: u64,
    pub counters: BTreeMap<String, BTreeMap<String, i64>>,
    pub plugins: Vec<PluginTimings>,
    pub read_secs: f64,
    /// The source's high watermark when it ended (incremental sources).
    pub high_watermark: Option<String>,
    pub check_secs: f64,
    pub write_secs: f64,
}

/// The live counters and the shared failure state of one step's threads.
struct Shared {
    /// Checkpoints the writer stored this attempt: files a plugin's state replaced since an
    /// earlier checkpoint may go once a later one is stored.
    checkpoints_saved: AtomicU64,
    rows_read: AtomicU64,
    rows_written: AtomicU64,
    cancel: AtomicBool,
    errors: Mutex<Vec<Error>>,
    counters: Mutex<BTreeMap<String, BTreeMap<String, i64>>>,
    timings: Mutex<Vec<PluginTimings>>,
}

impl Shared {
    fn fail(&self, e: Error) {
        self.cancel.store(true, Ordering::Relaxed);
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }

    /// The error to report: a stage's own error beats the "channel closed" symptoms it
    /// causes downstream.
    fn first_error(&self, e: Option<Error>) -> Option<Error> {
        let mut errs = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errs.is_empty() {
            e
        } else {
            Some(errs.remove(0))
        }
    }
}

/// Run every batch of the step through its stages, to the sink.
pub(super) fn run(ctx: &StepCtx<'_>, flow: Flow<'_>, started: Instant) -> Result<Flowed> {
    let Flow { source, transforms, sink, quality, base, every, schema_ipc } = flow;
    let shared = Shared {
        checkpoints_saved: AtomicU64::new(0),
        rows_read: AtomicU64::new(base.rows_read),
        rows_written: AtomicU64::new(base.rows_written),
        cancel: AtomicBool::new(false),
        errors: Mutex::default(),
        counters: Mutex::default(),
        timings: Mutex::new(
            ctx.step
                .transforms
                .iter()
                .map(|t| PluginTimings { plugin: t.plugin.clone(), ..Default::default() })
                .collect(),
        ),
    };
    let cap = ctx.pipeline.channel_capacity;
    let mut out = Flowed::default();
    let result = std::thread::scope(|scope| -> Result<()> {
        let (tx, mut rx) = sync_channel::<Msg>(cap);
        let (shared, base) = (&shared, &base);
        let stop = ctx.options.cancel.as_deref();
        let reader = scope.spawn(move || read(source, tx, shared, base, every, stop));
        for (index, inst) in transforms {
            let (tx, next_rx) = sync_channel::<Msg>(cap);
            let input = std::mem::replace(&mut rx, next_rx);
            scope.spawn(move || {
                if let Err(e) = plugin_stage(ctx, inst, index, input, tx, shared, base.batches) {
                    shared.fail(e);
                }
            });
        }
        let (done, stopped) = std::sync::mpsc::channel::<()>();
        let progress = ctx.options.progress.clone().map(|cb| {
            scope.spawn(move || loop {
                cb(&Progress {
                    step: ctx.step.name.clone(),
                    rows_read: shared.rows_read.load(Ordering::Relaxed),
                    rows_written: shared.rows_written.load(Ordering::Relaxed),
                    elapsed: started.elapsed(),
                });
                // it waits on a channel between updates, so the step ends as soon as its work does
                if !matches!(
                    stopped.recv_timeout(Duration::from_millis(200)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                ) {
                    break;
                }
            })
        });
        let seq = ctx
            .step
            .output
            .as_ref()
            .is_some_and(|o| o.mode == crate::config::OutputMode::Merge)
            .then(super::merge::SeqNumbers::default);
        let mut writer = Writer { ctx, sink: Some(sink), quality, shared, schema_ipc: &schema_ipc, out: &mut out, seq };
        let written = writer.drain(rx);
        if written.is_err() {
            shared.cancel.store(true, Ordering::Relaxed);
        }
        let read = reader.join().map_err(|_| Error::Internal("the reader thread panicked".into()))?;
        drop(done);
        if let Some(h) = progress {
            let _ = h.join();
        }
        // the scope joins the plugin stages here
        written?;
        let (rows_skipped, skipped, read_secs, high_watermark) = read?;
        (out.rows_skipped, out.skipped, out.read_secs, out.high_watermark) =
            (rows_skipped, skipped, read_secs, high_watermark);
        Ok(())
    });
    if let Some(e) = shared.first_error(result.err()) {
        return Err(e);
    }
    out.rows_read = shared.rows_read.load(Ordering::Relaxed);
    out.rows_written = shared.rows_written.load(Ordering::Relaxed);
    out.counters = shared.counters.into_inner().unwrap_or_else(|e| e.into_inner());
    out.plugins = shared.timings.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(out)
}

/// The reader thread: batches from the source, with checkpoint marks between them. Returns
/// the rows skipped in all, the first of them, and the CPU seconds spent reading.
fn read(
    mut source: Box<dyn Source>,
    tx: SyncSender<Msg>,
    shared: &Shared,
    base: &Checkpoint,
    every: u64,
    stop: Option<&AtomicBool>,
) -> Result<(u64, Vec<Skipped>, f64, Option<String>)> {
    let mut secs = 0f64;
    let (mut batches, mut marked) = (base.batches, base.batches);
    // a closed channel means a later stage stopped; it reports why
    let stopped = || Ok((0, Vec::new(), 0.0, None));
    loop {
        let t = CpuTime::now();
        let Some(batch) = source.next_batch() else { break };
        secs += t.elapsed_secs();
        if shared.cancel.load(Ordering::Relaxed) {
            return stopped();
        }
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            // reported as the step's own error, ahead of the closed channel it causes
            shared.fail(Error::Cancelled("stopped on request".into()));
            return stopped();
        }
        let batch = batch?;
        shared.rows_read.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
        if let Some(group) = source.take_copied() {
            if tx.send(Msg::Copy(Box::new(group))).is_err() {
                return stopped();
            }
        }
        if tx.send(Msg::Batch(batch)).is_err() {
            return stopped();
        }
        batches += 1;
        if every > 0 && batches - marked >= every && source.at_boundary() {
            marked = batches;
            let mark = Mark {
                source: source.position(),
                batches,
                rows_read: shared.rows_read.load(Ordering::Relaxed),
                rows_skipped: base.rows_skipped + source.skipped().0,
                states: Vec::new(),
            };
            if tx.send(Msg::Checkpoint(Box::new(mark))).is_err() {
                return stopped();
            }
        }
    }
    let _ = tx.send(Msg::End);
    if let Some((plugin, counters)) = source.plugin_counters() {
        let mut c = shared.counters.lock().unwrap_or_else(|e| e.into_inner());
        let entry = c.entry(plugin).or_default();
        for (k, v) in counters {
            *entry.entry(k).or_insert(0) += v;
        }
    }
    let (skipped, first) = source.skipped();
    Ok((base.rows_skipped + skipped, first.to_vec(), secs + source.helper_cpu_secs(), source.high_watermark()))
}

/// A transform's thread: each batch through the sandbox, a snapshot at each mark, the
/// plugin's final batches at the end. Its timings and counters are added when it stops.
fn plugin_stage(
    ctx: &StepCtx<'_>,
    mut inst: TransformInstance,
    index: usize,
    input: Receiver<Msg>,
    output: SyncSender<Msg>,
    shared: &Shared,
    first_batch: u64,
) -> Result<()> {
    let failure = |batch: Option<u64>, cause: String, kill: Option<&'static str>| {
        let plugin = &ctx.step.transforms[index].plugin;
        Error::Plugin(crate::PluginFailure {
            pipeline: ctx.pipeline.name.clone(),
            step: ctx.step.name.clone(),
            plugin: super::step::transform_label(ctx.step, index),
            batch,
            cause,
            kill: kill.map(|reason| Box::new(crate::Kill { reason, plugin: plugin.clone() })),
        })
    };
    let (mut batch_no, mut rows_before) = (first_batch, 0u64);
    // Ok(false): the channel closed, a stage nearby failed and reports why
    let result = (|| loop {
        match input.recv() {
            Ok(Msg::Batch(b)) => {
                batch_no += 1;
                if shared.cancel.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                let out = inst.process(&b).map_err(|e| {
                    let kill = e.kill();
                    failure(Some(batch_no), describe_call_error(e, rows_before), kill)
                })?;
                rows_before += b.num_rows() as u64;
                for o in out {
                    if output.send(Msg::Batch(o)).is_err() {
                        return Ok(false);
                    }
                }
            }
            Ok(Msg::Copy(group)) => {
                if output.send(Msg::Copy(group)).is_err() {
                    return Ok(false);
                }
            }
            Ok(Msg::Checkpoint(mut mark)) => {
                inst.release_state_files(shared.checkpoints_saved.load(Ordering::Acquire));
                let state = inst.snapshot().map_err(|e| {
                    let kill = e.kill();
                    failure(
                        None,
                        format!(
                            "checkpoint snapshot failed: {e}\n(nothing was published; a plugin with large state keeps it in the host's keyed state, weir_sdk::keyed::KeyedState; otherwise raise its memory_mb, or set checkpoint_every = 0 under [pipeline])"
                        ),
                        kill,
                    )
                })?;
                mark.states.push(state);
                if output.send(Msg::Checkpoint(mark)).is_err() {
                    return Ok(false);
                }
            }
            Ok(Msg::End) => {
                // a plugin may hand its last output in parts, but no more rows in all than
                // it read plus one call's cap: a plugin cannot keep the step alive forever
                let cap = rows_before.saturating_add(inst.limits().output_rows);
                let mut emitted = 0u64;
                loop {
                    let (out, more) =
                        inst.finish().map_err(|e| failure(None, format!("finish failed: {e}"), e.kill()))?;
                    for o in out {
                        emitted += o.num_rows() as u64;
                        if output.send(Msg::Batch(o)).is_err() {
                            return Ok(false);
                        }
                    }
                    if !more {
                        break;
                    }
                    if shared.cancel.load(Ordering::Relaxed) {
                        return Ok(false);
                    }
                    if emitted > cap {
                        return Err(failure(
                            None,
                            format!("finish kept asking to be called again past {emitted} rows (it read {rows_before}); stopped"),
                            Some("output_budget"),
                        ));
                    }
                }
                let _ = output.send(Msg::End);
                return Ok(true);
            }
            Err(_) => return Ok(false),
        }
    })();
    if let Some(t) = shared.timings.lock().unwrap_or_else(|e| e.into_inner()).get_mut(index) {
        t.calls.add(&inst.timings());
    }
    let mut c = shared.counters.lock().unwrap_or_else(|e| e.into_inner());
    let entry = c.entry(ctx.step.transforms[index].plugin.clone()).or_default();
    for (k, v) in inst.counters() {
        *entry.entry(k.clone()).or_insert(0) += v;
    }
    result.map(|_| ())
}

/// An invalid-input error also names the row within the step's whole input. Row values
/// are not printed: they may be the very PII the step exists to mask.
fn describe_call_error(e: CallError, rows_before: u64) -> String {
    if let CallError::InvalidInput { row: Some(row), .. } = &e {
        return format!("{e} (row {} of the step's input)", rows_before + row + 1);
    }
    e.to_string()
}

/// The writer, on the step's own thread: checks, quarantine, sink, checkpoints.
struct Writer<'a, 'q> {
    ctx: &'a StepCtx<'a>,
    sink: Option<Box<dyn Sink>>,
    quality: Option<&'q mut Quality>,
    shared: &'a Shared,
    schema_ipc: &'a [u8],
    out: &'a mut Flowed,
    /// A merge output: each row's ordinal, written as `_weir_seq` so the merge knows
    /// which of a key's rows came last (they may land in different partitions).
    seq: Option<super::merge::SeqNumbers>,
}

impl Writer<'_, '_> {
    /// Take every message until `End` (then finish the sink) or a closed channel (a stage
    /// failed; its error is recorded).
    fn drain(&mut self, rx: Receiver<Msg>) -> Result<()> {
        let ended = self.take(&rx);
        drop(rx);
        let Some(sink) = self.sink.take() else { return Err(Error::Internal("the sink was finished twice".into())) };
        let t = CpuTime::now();
        let encode_cpu = sink.encode_cpu();
        let result = match ended {
            Ok(true) => sink.finish().map(|p| self.out.partitions = p).map_err(Error::from),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        self.out.write_secs += t.elapsed_secs() + encode_cpu();
        result
    }

    fn take(&mut self, rx: &Receiver<Msg>) -> Result<bool> {
        loop {
            match rx.recv() {
                Ok(Msg::Batch(b)) => self.write(b)?,
                Ok(Msg::Copy(group)) => {
                    let t = CpuTime::now();
                    self.sink_mut()?.copy_next(*group)?;
                    self.out.write_secs += t.elapsed_secs();
                    self.out.copied_row_groups += 1;
                }
                Ok(Msg::Checkpoint(mark)) => self.checkpoint(*mark)?,
                Ok(Msg::End) => return Ok(true),
                Err(_) => return Ok(false),
            }
        }
    }

    fn sink_mut(&mut self) -> Result<&mut Box<dyn Sink>> {
        self.sink.as_mut().ok_or_else(|| Error::Internal("a batch came after the sink was finished".into()))
    }

    /// One batch: through the row checks (failing rows to the quarantine), then the sink.
    fn write(&mut self, batch: RecordBatch) -> Result<()> {
        let batch = match self.quality.as_deref_mut() {
            Some(q) => {
                let t = CpuTime::now();
                let good = q.apply(&self.ctx.step.name, &batch)?;
                self.out.check_secs += t.elapsed_secs();
                good
            }
            None => batch,
        };
        let rows = batch.num_rows() as u64;
        if rows > 0 {
            let t = CpuTime::now();
            let batch = match &mut self.seq {
                Some(numbers) => numbers.number(&batch)?,
                None => batch,
            };
            self.sink_mut()?.write(&batch)?;
            self.out.write_secs += t.elapsed_secs();
        }
        self.shared.rows_written.fetch_add(rows, Ordering::Relaxed);
        Ok(())
    }

    /// Everything before the mark is through every stage: make it durable and store it.
    fn checkpoint(&mut self, mark: Mark) -> Result<()> {
        let sink = self.sink_mut()?.checkpoint()?;
        let c = Checkpoint {
            step: self.ctx.step.name.clone(),
            complete: false,
            source: mark.source,
            sink,
            batches: mark.batches,
            rows_read: mark.rows_read,
            rows_written: self.shared.rows_written.load(Ordering::Relaxed),
            rows_skipped: mark.rows_skipped,
            partitions: Vec::new(),
            schema: self.schema_ipc.to_vec(),
            states: mark.states,
        };
        self.ctx.store.save_checkpoint(self.ctx.run_id, &c)?;
        self.shared.checkpoints_saved.fetch_add(1, Ordering::Release);
        debug_pause("after-checkpoint", &*self.ctx.options.log);
        Ok(())
    }
}
