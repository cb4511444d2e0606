//! Keyed state the host keeps for plugins (the `weir:plugin/state` import) and for its own
//! dataset checks, outside any sandbox.
//!
//! A [`KeyedState`] is a table keyed by one or more columns. Without value columns it is a
//! set of keys, asked batch by batch which keys are new ([`KeyedState::insert_new`]); with
//! value columns, rows under a key already held are combined column by column
//! ([`Combine`]) and the table is read back at the end, one row per key in the order the
//! keys first came ([`KeyedState::scan`]).
//!
//! ```
//! use std::sync::Arc;
//! use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
//! use weir::state::{Combine, KeyedState, Spec};
//!
//! let batch = RecordBatch::try_from_iter([
//!     ("user", Arc::new(StringArray::from(vec!["b", "a", "b"])) as ArrayRef),
//!     ("n", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
//! ])
//! .unwrap();
//! let spec = Spec::table("totals", &["user"], &[("n", Combine::Sum)], None);
//! let mut state = KeyedState::open(spec, batch.schema(), None, None).unwrap();
//! state.merge(&batch, 1 << 20).unwrap();
//! let out = state.scan(100).unwrap().unwrap();
//! assert_eq!(out.num_rows(), 2); // b: 4, then a: 2
//! ```
//!
//! **Memory and disk.** Keys and values are held as `arrow-row` bytes in a hash table. A
//! table whose bytes pass the budget it is handed spills everything it holds to a *run*:
//! one file, its entries grouped by a hash partition of the key, and starts empty again.
//! Runs are combined at the end, one partition at a time (so the end needs about
//! 1/[`PARTITIONS`] of the spilled bytes in memory), each partition sorted by first arrival
//! into a file of its own, and the partitions merged by arrival as the scan reads them.
//! Sets answer at once whether a key is new: a set past its budget writes its keys to a
//! *key run* (see `keyrun`), sorted by hash with a Bloom filter and block index kept in
//! memory (under 2 bytes a key), so a new key is answered from memory and a held one with
//! one block read. Past eight runs they are merged into one. Only when even the filters
//! pass the budget is it an error naming the budget, never a wrong answer.
//!
//! **Checkpoints** are incremental: a table writes what it holds as one more run (what
//! changed since the previous checkpoint, as partial combinations), a set appends the keys
//! new since the previous checkpoint to its log (a spill starts a new log: the run holds
//! the old one's keys). The [`Manifest`] names the files and
//! their lengths; a resumed run reopens exactly those, so files written after the
//! checkpoint are ignored and removed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::io::sync_dir;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{new_null_array, Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_row::{RowConverter, SortField};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};
use weir_sdk::intset::IntSet;

/// Hash partitions of a table's spilled runs.
pub const PARTITIONS: usize = 64;
const RUN_MAGIC: &[u8; 8] = b"WEIRRUN1";
/// Sets: new keys gathered before they are appended to the log.
const PENDING_BYTES: usize = 1 << 20;
/// Sets: key runs merged into one past this many.
const MERGE_RUNS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec or a batch does not fit the state: the plugin's or the config's to fix.
    #[error("state `{name}`: {message}")]
    Invalid { name: String, message: String },
    #[error(
        "state `{name}` holds {keys} keys in about {used_mb} MiB, past its budget of {budget_mb} MiB (a set keeps every key in memory without a spill directory, and under 2 bytes a key with one)"
    )]
    Budget { name: String, keys: usize, used_mb: usize, budget_mb: usize },
    #[error("state `{name}`: {path}: {source}")]
    Io { name: String, path: PathBuf, source: std::io::Error },
    #[error("state `{name}`: its checkpoint files are damaged ({message}); run without --resume")]
    Corrupt { name: String, message: String },
    #[error("state `{name}`: {source}")]
    Arrow { name: String, source: ArrowError },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a value column combines the row held for a key with a new one (the contract's
/// `combine`, as the SDK names it).
pub use weir_sdk::keyed::Combine;

/// What a state holds: its name, key columns, value columns and order column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub name: String,
    pub key: Vec<String>,
    pub values: Vec<(String, Combine)>,
    pub order_by: Option<String>,
}

impl Spec {
    /// A set of keys.
    pub fn set(name: &str, key: &[&str]) -> Spec {
        Spec::table(name, key, &[], None)
    }

    pub fn table(name: &str, key: &[&str], values: &[(&str, Combine)], order_by: Option<&str>) -> Spec {
        Spec {
            name: name.to_string(),
            key: key.iter().map(|k| k.to_string()).collect(),
            values: values.iter().map(|(c, m)| (c.to_string(), *m)).collect(),
            order_by: order_by.map(str::to_string),
        }
    }
}

/// What a checkpoint recorded of a state: enough to reopen it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub spec: Spec,
    /// The next arrival number.
    pub seq: u64,
    /// Table runs, oldest first, with their lengths.
    pub runs: Vec<(String, u64)>,
    /// Set: the durable length of the key log.
    pub log_bytes: u64,
    /// Set: the key log's file (none: `keys.log`, as before sets spilled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<String>,
}

/// How one value column is held in an entry's value bytes.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// One validity byte and eight value bytes.
    SumInt,
    SumFloat,
    /// A length (u32) and the value's row bytes (length 0: no value yet, for min and max).
    Bytes(Combine),
}

struct Value {
    column: usize,
    slot: Slot,
    /// For `Bytes` slots: the column's row encoding, and its null's bytes.
    conv: Option<(RowConverter, Vec<u8>)>,
}

/// One key's place in a [`Table`]'s arena: its bytes, its value's bytes, its first arrival.
#[derive(Debug, Clone, Copy)]
struct Place {
    hash: u64,
    key: usize,
    key_len: u32,
    value: usize,
    value_len: u32,
    seq: u64,
}

/// Keys and values in one byte arena, found through a hash table of [`Place`]s: no
/// allocation per key. A value that changes size is appended anew (the old bytes stay
/// until the table is cleared, and are counted).
struct Table {
    slots: hashbrown::HashTable<Place>,
    arena: Vec<u8>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl Table {
    fn new() -> Table {
        Table { slots: hashbrown::HashTable::new(), arena: Vec::new(), hasher: Default::default() }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    /// An empty table reserves three quarters of its budget at once: address space only
    /// until rows fill it (pages are taken as they are written), and no doubling past the
    /// budget on the way.
    fn reserve(&mut self, budget: usize) {
        let want = (budget / 4 * 3).min(1 << 30);
        if self.is_empty() && self.arena.capacity() < want {
            self.arena = Vec::with_capacity(want);
        }
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Bytes held: the arena and the table.
    fn bytes(&self) -> usize {
        self.arena.len() + self.slots.capacity() * (std::mem::size_of::<Place>() + 1)
    }

    fn hash(&self, key: &[u8]) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, key)
    }

    fn key(&self, s: &Place) -> &[u8] {
        &self.arena[s.key..s.key + s.key_len as usize]
    }

    fn value(&self, s: &Place) -> &[u8] {
        &self.arena[s.value..s.value + s.value_len as usize]
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<&Place> {
        let arena = &self.arena;
        self.slots.find(hash, |s| &arena[s.key..s.key + s.key_len as usize] == key)
    }

    fn insert(&mut self, hash: u64, key: &[u8], seq: u64, value: &[u8]) {
        let at = self.arena.len();
        self.arena.extend_from_slice(key);
        self.arena.extend_from_slice(value);
        let slot = Place {
            hash,
            key: at,
            key_len: key.len() as u32,
            value: at + key.len(),
            value_len: value.len() as u32,
            seq,
        };
        self.slots.insert_unique(hash, slot, |s| s.hash);
    }

    /// Combine `value` (arriving at `seq`) into the key's held value, or insert it.
    fn merge(
        &mut self,
        key: &[u8],
        seq: u64,
        value: &[u8],
        mut combine: impl FnMut(&[u8], &[u8], &mut Vec<u8>),
        scratch: &mut Vec<u8>,
    ) -> bool {
        let hash = self.hash(key);
        let Table { slots, arena, .. } = self;
        match slots.find_mut(hash, |s| &arena[s.key..s.key + s.key_len as usize] == key) {
            Some(s) => {
                combine(&arena[s.value..s.value + s.value_len as usize], value, scratch);
                if scratch.len() == s.value_len as usize {
                    arena[s.value..s.value + scratch.len()].copy_from_slice(scratch);
                } else {
                    s.value = arena.len();
                    s.value_len = scratch.len() as u32;
                    arena.extend_from_slice(scratch);
                }
                s.seq = s.seq.min(seq);
                false
            }
            None => {
                self.insert(hash, key, seq, value);
                true
            }
        }
    }

    /// The slots in order of first arrival.
    fn by_arrival(&self) -> Vec<Place> {
        let mut order: Vec<Place> = self.slots.iter().copied().collect();
        order.sort_unstable_by_key(|s| s.seq);
        order
    }
}

/// The keys of a set, in the cheapest form their type allows.
enum SetKeys {
    /// One int64 key column: a set of ints (a bitmap for dense ids) and whether null came.
    Int {
        keys: IntSet,
        null: bool,
    },
    Bytes,
}

/// A table or set of keyed rows; see the module documentation.
pub struct KeyedState {
    spec: Spec,
    schema: SchemaRef,
    key_columns: Vec<usize>,
    key_conv: RowConverter,
    values: Vec<Value>,
    order: Option<(usize, RowConverter)>,
    /// Sets: how keys are held (tables use `map`).
    set: Option<SetKeys>,
    /// A table's rows, or a set's keys (values empty) when they are not ints.
    map: Table,
    seq: u64,
    dir: Option<PathBuf>,
    runs: Vec<(String, u64)>,
    next_run: u64,
    /// Sets with a directory: keys new since the last write to the log, as the log holds them.
    pending: Vec<u8>,
    /// Sets: bytes written to the log, and of them made durable by a checkpoint.
    written: u64,
    log_bytes: u64,
    /// Sets: the log's file, the spilled keys, and files a spill or merge replaced that a
    /// stored checkpoint may still name, with the number of checkpoints taken when they
    /// were replaced (see [`KeyedState::release`]).
    log_file: String,
    key_runs: Vec<keyrun::KeyRun>,
    replaced: Vec<(String, u64)>,
    /// Sets: the files the latest checkpoint (taken or reopened) names, and checkpoints
    /// taken in this attempt.
    named: Vec<String>,
    taken: u64,
    checkpointed: bool,
    block: Vec<u8>,
    /// Counters for the run summary.
    pub spills: u64,
    pub spilled_bytes: u64,
    scan: Option<Scan>,
}

fn io_err(name: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let (name, path) = (name.to_string(), path.to_path_buf());
    move |source| Error::Io { name, path, source }
}

impl KeyedState {
    /// Open a state over batches of `schema`; `dir` is where it spills and checkpoints
    /// (none: in memory only, so a table that passes its budget is an error too), and
    /// `restore` the manifest of the checkpoint to reopen.
    pub fn open(spec: Spec, schema: SchemaRef, dir: Option<PathBuf>, restore: Option<&Manifest>) -> Result<Self> {
        let name = spec.name.clone();
        let invalid = |message: String| Error::Invalid { name: name.clone(), message };
        let arrow = |source| Error::Arrow { name: name.clone(), source };
        if spec.key.is_empty() {
            return Err(invalid("name at least one key column".into()));
        }
        let find = |c: &str| schema.index_of(c).map_err(|_| invalid(format!("the batches have no column `{c}`")));
        let key_columns = spec.key.iter().map(|c| find(c)).collect::<Result<Vec<_>>>()?;
        let key_conv = RowConverter::new(
            key_columns.iter().map(|&i| SortField::new(schema.field(i).data_type().clone())).collect(),
        )
        .map_err(|e| invalid(format!("key: {e}")))?;
        let mut values = Vec::new();
        for (c, combine) in &spec.values {
            let column = find(c)?;
            let dt = schema.field(column).data_type();
            let slot = match (combine, dt) {
                (Combine::Sum, DataType::Int64) => Slot::SumInt,
                (Combine::Sum, DataType::Float64) => Slot::SumFloat,
                (Combine::Sum, other) => {
                    return Err(invalid(format!("`{c}` is {other}: sums are of int64 or float64 columns")))
                }
                (m, _) => Slot::Bytes(*m),
            };
            let conv = match slot {
                Slot::Bytes(_) => {
                    let conv = RowConverter::new(vec![SortField::new(dt.clone())])
                        .map_err(|e| invalid(format!("`{c}`: {e}")))?;
                    let null = conv.convert_columns(&[new_null_array(dt, 1)]).map_err(arrow)?.row(0).as_ref().to_vec();
                    Some((conv, null))
                }
                _ => None,
            };
            values.push(Value { column, slot, conv });
        }
        let order = match &spec.order_by {
            Some(c) => {
                let i = find(c)?;
                if !spec.values.iter().any(|(_, m)| *m == Combine::Last) {
                    return Err(invalid("order_by orders `last` values: name one".into()));
                }
                let conv = RowConverter::new(vec![SortField::new(schema.field(i).data_type().clone())])
                    .map_err(|e| invalid(format!("order_by: {e}")))?;
                Some((i, conv))
            }
            None => None,
        };
        let set = spec.values.is_empty().then(|| {
            if key_columns.len() == 1 && schema.field(key_columns[0]).data_type() == &DataType::Int64 {
                SetKeys::Int { keys: IntSet::new(), null: false }
            } else {
                SetKeys::Bytes
            }
        });
        let mut state = KeyedState {
            spec,
            schema,
            key_columns,
            key_conv,
            values,
            order,
            set,
            map: Table::new(),
            seq: 0,
            dir,
            runs: Vec::new(),
            next_run: 0,
            pending: Vec::new(),
            written: 0,
            log_bytes: 0,
            log_file: "keys.log".into(),
            key_runs: Vec::new(),
            replaced: Vec::new(),
            named: Vec::new(),
            taken: 0,
            checkpointed: false,
            block: Vec::new(),
            spills: 0,
            spilled_bytes: 0,
            scan: None,
        };
        if let Some(dir) = &state.dir {
            std::fs::create_dir_all(dir).map_err(io_err(&state.spec.name, dir))?;
        }
        match restore {
            Some(m) => state.reopen(m)?,
            None => state.clear_dir()?,
        }
        Ok(state)
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Bytes held in memory now (estimated).
    pub fn memory_bytes(&self) -> usize {
        self.keys_memory() + self.key_runs.iter().map(keyrun::KeyRun::memory_bytes).sum::<usize>()
    }

    /// Bytes of the keys or rows held in memory (what a spill frees).
    fn keys_memory(&self) -> usize {
        match &self.set {
            Some(SetKeys::Int { keys, .. }) => keys.heap_bytes() + self.pending.capacity(),
            _ => self.map.bytes() + self.pending.capacity(),
        }
    }

    /// Keys held in memory.
    pub fn keys_in_memory(&self) -> usize {
        match &self.set {
            Some(SetKeys::Int { keys, null }) => keys.len() + usize::from(*null),
            _ => self.map.len(),
        }
    }

    /// Keys held, in memory and spilled.
    fn keys_held(&self) -> usize {
        self.keys_in_memory() + self.key_runs.iter().map(|r| r.count as usize).sum::<usize>()
    }

    /// Sets: whether a spilled run holds `key`.
    fn spilled(&mut self, key: &[u8]) -> Result<bool> {
        if self.key_runs.is_empty() {
            return Ok(false);
        }
        let hash = keyrun::stable_hash(key);
        for run in &self.key_runs {
            if run
                .contains(hash, key, &mut self.block)
                .map_err(|message| Error::Corrupt { name: self.spec.name.clone(), message })?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn invalid(&self, message: impl Into<String>) -> Error {
        Error::Invalid { name: self.spec.name.clone(), message: message.into() }
    }

    fn arrow(&self, source: ArrowError) -> Error {
        Error::Arrow { name: self.spec.name.clone(), source }
    }

    fn check_batch(&self, batch: &RecordBatch) -> Result<()> {
        if self.scan.is_some() {
            return Err(self.invalid("the state was scanned: no more rows can go in"));
        }
        let (got, want) = (batch.schema(), &self.schema);
        if got.fields().len() != want.fields().len()
            || got
                .fields()
                .iter()
                .zip(want.fields())
                .any(|(a, b)| a.name() != b.name() || a.data_type() != b.data_type())
        {
            return Err(self.invalid("a batch's columns differ from the schema the state was opened with"));
        }
        Ok(())
    }

    /// Sets: add each row's key; `true` for the rows whose key was not held yet (the first
    /// of equal keys in the batch). Past `budget` bytes the keys spill to a key run (with a
    /// directory); it fails, holding the keys it had, when even that does not bring it under.
    pub fn insert_new(&mut self, batch: &RecordBatch, budget: usize) -> Result<Vec<bool>> {
        self.check_batch(batch)?;
        let mut fresh = Vec::with_capacity(batch.num_rows());
        match &self.set {
            None => return Err(self.invalid("insert-new is for sets (a state without value columns); use merge")),
            Some(SetKeys::Int { .. }) => {
                let ids = batch.column(self.key_columns[0]).as_primitive::<Int64Type>();
                for r in 0..ids.len() {
                    let id = (!ids.is_null(r)).then(|| ids.value(r));
                    let new = if self.key_runs.is_empty() {
                        // nothing spilled: one lookup that inserts
                        let Some(SetKeys::Int { keys, null }) = &mut self.set else { unreachable!() };
                        match id {
                            None => !std::mem::replace(null, true),
                            Some(id) => keys.insert(id),
                        }
                    } else {
                        let Some(SetKeys::Int { keys, null }) = &self.set else { unreachable!() };
                        let held = match id {
                            None => *null,
                            Some(id) => keys.contains(id),
                        };
                        let new = !held && !self.spilled(&int_key(id))?;
                        if new {
                            let Some(SetKeys::Int { keys, null }) = &mut self.set else { unreachable!() };
                            match id {
                                None => *null = true,
                                Some(id) => {
                                    keys.insert(id);
                                }
                            }
                        }
                        new
                    };
                    if new && self.dir.is_some() {
                        put_bytes(&mut self.pending, &int_key(id));
                    }
                    fresh.push(new);
                }
            }
            Some(SetKeys::Bytes) => {
                let rows = self.key_rows(batch)?;
                for row in rows.iter() {
                    let key = row.as_ref();
                    let hash = self.map.hash(key);
                    let new = self.map.find(hash, key).is_none() && !self.spilled(key)?;
                    if new {
                        self.map.insert(hash, key, 0, &[]);
                        if self.dir.is_some() {
                            put_bytes(&mut self.pending, key);
                        }
                    }
                    fresh.push(new);
                }
            }
        }
        if self.pending.len() >= PENDING_BYTES && self.dir.is_some() {
            self.write_pending(false)?;
        }
        if self.memory_bytes() > budget && self.dir.is_some() {
            self.spill_keys(true)?;
        }
        // spilled keys' filters past half the budget would spill ever smaller runs
        let runs: usize = self.key_runs.iter().map(keyrun::KeyRun::memory_bytes).sum();
        if self.memory_bytes() > budget || runs > budget / 2 {
            return Err(Error::Budget {
                name: self.spec.name.clone(),
                keys: self.keys_held(),
                used_mb: self.memory_bytes() >> 20,
                budget_mb: budget >> 20,
            });
        }
        Ok(fresh)
    }

    /// Sets: write the keys memory holds as a key run (merging the runs past
    /// [`MERGE_RUNS`]), and start empty with a new log.
    fn spill_keys(&mut self, pressure: bool) -> Result<()> {
        if self.keys_in_memory() == 0 {
            return Ok(());
        }
        let name = self.spec.name.clone();
        let dir = self.dir.clone().ok_or_else(|| self.invalid("spill without a directory (a bug)"))?;
        let file = format!("keys-{:06}.run", self.next_run);
        let path = dir.join(&file);
        let mut w = keyrun::KeyRunWriter::create(&path, self.keys_in_memory() as u64).map_err(io_err(&name, &path))?;
        // keys in hash order, borrowed from where memory holds them (no copy per key)
        match &self.set {
            Some(SetKeys::Int { keys, null }) => {
                let mut ids: Vec<(u64, Option<i64>)> = keys
                    .iter()
                    .map(Some)
                    .chain(null.then_some(None))
                    .map(|id| (keyrun::stable_hash(&int_key(id)), id))
                    .collect();
                ids.sort_unstable();
                for (h, id) in ids {
                    w.push(h, &int_key(id)).map_err(io_err(&name, &path))?;
                }
            }
            _ => {
                let mut refs: Vec<(u64, &[u8])> =
                    self.map.slots.iter().map(|sl| (keyrun::stable_hash(self.map.key(sl)), self.map.key(sl))).collect();
                refs.sort_unstable();
                for (h, k) in refs {
                    w.push(h, k).map_err(io_err(&name, &path))?;
                }
            }
        }
        let len = w.finish().map_err(io_err(&name, &path))?;
        let corrupt = |message: String| Error::Corrupt { name: name.clone(), message };
        self.key_runs.push(keyrun::KeyRun::open(&path, &file).map_err(corrupt)?);
        self.next_run += 1;
        if pressure {
            self.spills += 1;
            self.spilled_bytes += len;
        }
        // the run holds every key the log held: the next keys go to a new log
        self.pending = Vec::new();
        let old_log = std::mem::replace(&mut self.log_file, format!("keys-{:06}.log", self.next_run));
        self.written = 0;
        self.log_bytes = 0;
        self.retire(old_log);
        match &mut self.set {
            Some(SetKeys::Int { keys, null }) => {
                *keys = IntSet::new();
                *null = false;
            }
            _ => self.map = Table::new(),
        }
        if self.key_runs.len() > MERGE_RUNS {
            let file = format!("keys-{:06}.run", self.next_run);
            let path = dir.join(&file);
            let merged = keyrun::merge_runs(&self.key_runs, &path).map_err(corrupt)?;
            let run = keyrun::KeyRun::open(&path, &file).map_err(corrupt)?;
            debug_assert_eq!(run.len, merged);
            self.next_run += 1;
            for old in std::mem::replace(&mut self.key_runs, vec![run]) {
                self.retire(old.file_name);
            }
        }
        sync_dir(&dir);
        Ok(())
    }

    /// A file a spill or merge replaced. No checkpoint names it unless the latest does (an
    /// older one naming it would mean the latest named it too), so otherwise it goes now;
    /// else once a later checkpoint is stored ([`KeyedState::release`]).
    fn retire(&mut self, file: String) {
        let Some(dir) = &self.dir else { return };
        if self.checkpointed && self.named.contains(&file) {
            self.replaced.push((file, self.taken));
        } else {
            let _ = std::fs::remove_file(dir.join(&file));
        }
    }

    /// `saved` checkpoints taken in this attempt are stored (the engine stores them after
    /// later stages caught up, so it can lag behind [`KeyedState::checkpoint`]): remove the
    /// files replaced before the last of them was taken. A file replaced after `t`
    /// checkpoints may be named by the `t`-th (or, at 0, by the one reopened), so it goes
    /// once the `t+1`-th is stored.
    pub fn release(&mut self, saved: u64) {
        let Some(dir) = self.dir.clone() else { return };
        self.replaced.retain(|(file, t)| {
            let done = *t < saved;
            if done {
                let _ = std::fs::remove_file(dir.join(file));
            }
            !done
        });
    }

    fn key_rows(&self, batch: &RecordBatch) -> Result<arrow_row::Rows> {
        let cols: Vec<ArrayRef> = self.key_columns.iter().map(|&i| batch.column(i).clone()).collect();
        self.key_conv.convert_columns(&cols).map_err(|e| self.arrow(e))
    }

    /// Merge every row, in order, combining rows under a key already held. Past `budget`
    /// bytes the table spills to its directory.
    pub fn merge(&mut self, batch: &RecordBatch, budget: usize) -> Result<()> {
        self.check_batch(batch)?;
        if self.set.is_some() {
            // a set merged into: every key is inserted
            self.insert_new(batch, budget)?;
            return Ok(());
        }
        let keys = self.key_rows(batch)?;
        let encoded = self.encode_values(batch)?;
        let order = match &self.order {
            Some((i, conv)) => Some(conv.convert_columns(&[batch.column(*i).clone()]).map_err(|e| self.arrow(e))?),
            None => None,
        };
        let mut value = Vec::new();
        let mut merged = Vec::new();
        let ordered = self.order.is_some();
        self.map.reserve(budget);
        for r in 0..batch.num_rows() {
            row_value(&encoded, order.as_ref(), r, &mut value);
            let key = keys.row(r);
            let values = &self.values;
            let new = self.map.merge(
                key.as_ref(),
                self.seq,
                &value,
                |old, new, out| combine(values, ordered, old, new, out),
                &mut merged,
            );
            if new {
                self.seq += 1;
            }
            if self.map.bytes() > budget {
                if self.dir.is_none() {
                    return Err(Error::Budget {
                        name: self.spec.name.clone(),
                        keys: self.map.len(),
                        used_mb: self.map.bytes() >> 20,
                        budget_mb: budget >> 20,
                    });
                }
                self.spill(true)?;
                self.map.reserve(budget);
            }
        }
        Ok(())
    }

    /// The value columns of a batch, encoded once per column.
    fn encode_values(&self, batch: &RecordBatch) -> Result<Vec<Encoded>> {
        self.values
            .iter()
            .map(|v| {
                let col = batch.column(v.column);
                Ok(match (&v.slot, &v.conv) {
                    (Slot::SumInt, _) => Encoded::Int(col.as_primitive::<Int64Type>().clone()),
                    (Slot::SumFloat, _) => Encoded::Float(col.as_primitive::<Float64Type>().clone()),
                    (Slot::Bytes(m), Some((conv, _))) => Encoded::Rows(
                        conv.convert_columns(std::slice::from_ref(col)).map_err(|e| self.arrow(e))?,
                        matches!(m, Combine::Min | Combine::Max).then(|| col.clone()),
                    ),
                    (Slot::Bytes(_), None) => return Err(self.invalid("a value column has no encoding (a bug)")),
                })
            })
            .collect()
    }

    /// Write what memory holds as one more run, and start empty. `pressure`: because the
    /// budget was passed (counted as a spill; a checkpoint's run is not).
    fn spill(&mut self, pressure: bool) -> Result<()> {
        if self.map.is_empty() {
            return Ok(());
        }
        let dir = self.dir.clone().ok_or_else(|| self.invalid("spill without a directory (a bug)"))?;
        let file = format!("run-{:06}.bin", self.next_run);
        let path = dir.join(&file);
        let len = write_run(&path, self.map.slots.iter().map(|sl| (sl.seq, self.map.key(sl), self.map.value(sl))))
            .map_err(|source| Error::Io { name: self.spec.name.clone(), path: path.clone(), source })?;
        self.next_run += 1;
        self.runs.push((file, len));
        if pressure {
            self.spills += 1;
            self.spilled_bytes += len;
        }
        self.map = Table::new();
        Ok(())
    }

    /// Make the state durable up to here and describe it.
    pub fn checkpoint(&mut self) -> Result<Manifest> {
        let name = self.spec.name.clone();
        let dir = self.dir.clone().ok_or_else(|| self.invalid("a checkpoint needs a state directory (a bug)"))?;
        if self.set.is_some() {
            self.write_pending(true)?;
            self.taken += 1;
            self.checkpointed = true;
            self.named = self.key_runs.iter().map(|r| r.file_name.clone()).collect();
            self.named.push(self.log_file.clone());
        } else {
            self.spill(false)?;
            if let Some((file, _)) = self.runs.last() {
                let path = dir.join(file);
                File::open(&path).and_then(|f| f.sync_all()).map_err(io_err(&name, &path))?;
            }
        }
        sync_dir(&dir);
        let runs = match self.set {
            Some(_) => self.key_runs.iter().map(|r| (r.file_name.clone(), r.len)).collect(),
            None => self.runs.clone(),
        };
        let log_file = self.set.is_some().then(|| self.log_file.clone());
        Ok(Manifest { spec: self.spec.clone(), seq: self.seq, runs, log_bytes: self.log_bytes, log_file })
    }

    /// Sets: append the keys new since the last write to the log; `durable` syncs it (a
    /// checkpoint), otherwise it only keeps memory bounded (the log is cut back to the last
    /// checkpoint's length on resume).
    fn write_pending(&mut self, durable: bool) -> Result<()> {
        let name = self.spec.name.clone();
        let dir = self.dir.clone().ok_or_else(|| self.invalid("a set's log needs a directory (a bug)"))?;
        let path = dir.join(&self.log_file);
        if !self.pending.is_empty() {
            let mut f =
                std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&name, &path))?;
            f.write_all(&self.pending).map_err(io_err(&name, &path))?;
            self.written += self.pending.len() as u64;
            self.pending.clear();
        }
        if durable && self.written > self.log_bytes {
            File::open(&path).and_then(|f| f.sync_data()).map_err(io_err(&name, &path))?;
            self.log_bytes = self.written;
        }
        Ok(())
    }

    /// Start from a checkpoint: its files, nothing after it.
    fn reopen(&mut self, m: &Manifest) -> Result<()> {
        if m.spec != self.spec {
            return Err(self.invalid(
                "the plugin opened it with another spec than the checkpoint was taken with; run without --resume",
            ));
        }
        let name = self.spec.name.clone();
        let dir = self.dir.clone().ok_or_else(|| self.invalid("a resumed state needs its directory (a bug)"))?;
        let corrupt = |message: String| Error::Corrupt { name: name.clone(), message };
        for (file, len) in &m.runs {
            let path = dir.join(file);
            let actual = std::fs::metadata(&path).map(|md| md.len()).unwrap_or(u64::MAX);
            if actual != *len {
                return Err(corrupt(format!("{file} has {actual} bytes, the checkpoint recorded {len}")));
            }
        }
        self.seq = m.seq;
        self.next_run = m.runs.iter().filter_map(|(f, _)| run_number(f)).max().map_or(0, |n| n + 1);
        self.log_bytes = m.log_bytes;
        self.written = m.log_bytes;
        self.log_file = m.log_file.clone().unwrap_or_else(|| "keys.log".into());
        if self.log_file.contains(['/', '\\']) || self.log_file.starts_with('.') {
            return Err(corrupt(format!("the checkpoint names a log `{}`", self.log_file)));
        }
        if self.set.is_some() {
            for (file, _) in &m.runs {
                self.key_runs.push(keyrun::KeyRun::open(&dir.join(file), file).map_err(corrupt)?);
            }
            // spills in this attempt number their files after the checkpoint's
            if let Some(n) = self.log_file.strip_prefix("keys-").and_then(|f| f.strip_suffix(".log")) {
                self.next_run = self.next_run.max(n.parse::<u64>().unwrap_or(0));
            }
            self.checkpointed = true;
            self.named = m.runs.iter().map(|(f, _)| f.clone()).chain([self.log_file.clone()]).collect();
            let path = dir.join(&self.log_file);
            let mut log = Vec::new();
            let shown = self.log_file.clone();
            match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => {
                    (&f).take(m.log_bytes).read_to_end(&mut log).map_err(io_err(&name, &path))?;
                    // keys written after the checkpoint are not part of it
                    f.set_len(m.log_bytes).map_err(io_err(&name, &path))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&name, &path)(e)),
            }
            if (log.len() as u64) < m.log_bytes {
                return Err(corrupt(format!("{shown} is shorter than the {} bytes recorded", m.log_bytes)));
            }
            self.load_log(&log).map_err(corrupt)?;
        } else {
            self.runs = m.runs.clone();
        }
        // runs written after the checkpoint, and whatever a scan left
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if f != self.log_file && !m.runs.iter().any(|(r, _)| *r == f) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    fn load_log(&mut self, mut log: &[u8]) -> std::result::Result<(), String> {
        while !log.is_empty() {
            let key = take_bytes(&mut log).ok_or("keys.log is cut short")?;
            match &mut self.set {
                Some(SetKeys::Int { keys, null }) => match key.len() {
                    0 => *null = true,
                    8 => {
                        keys.insert(i64::from_le_bytes(key.try_into().map_err(|_| "bad key")?));
                    }
                    n => return Err(format!("an int key of {n} bytes in keys.log")),
                },
                _ => {
                    let hash = self.map.hash(key);
                    if self.map.find(hash, key).is_none() {
                        self.map.insert(hash, key, 0, &[]);
                    }
                }
            }
        }
        Ok(())
    }

    /// A fresh state: nothing from an earlier attempt.
    fn clear_dir(&self) -> Result<()> {
        if let Some(dir) = &self.dir {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    std::fs::remove_file(e.path()).map_err(io_err(&self.spec.name, &e.path()))?;
                }
            }
        }
        Ok(())
    }

    /// The schema of what [`KeyedState::scan`] returns: keys, then values (sums as int64 or
    /// float64, others as their column).
    pub fn scan_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> =
            self.key_columns.iter().map(|&i| self.schema.field(i).clone().with_nullable(true)).collect();
        for v in &self.values {
            let f = self.schema.field(v.column);
            fields.push(Field::new(f.name(), f.data_type().clone(), true));
        }
        Arc::new(Schema::new(fields))
    }

    /// After the last row went in: the next at most `max_rows` keys with their values, in
    /// the order the keys first came; `None` when every key was returned.
    pub fn scan(&mut self, max_rows: usize) -> Result<Option<RecordBatch>> {
        if self.set.is_some() {
            return Err(self.invalid("a set is not scanned"));
        }
        if self.scan.is_none() {
            self.scan = Some(self.start_scan()?);
        }
        let max_rows = max_rows.max(1);
        let name = self.spec.name.clone();
        let mut owned: Vec<KeyValue> = Vec::new();
        match self.scan.as_mut() {
            Some(Scan::Memory { order, pos, .. }) => {
                let from = *pos;
                *pos = (from + max_rows).min(order.len());
                if from == *pos {
                    return Ok(None);
                }
                if let Some(Scan::Memory { table, order, .. }) = &self.scan {
                    let taken: Vec<(&[u8], &[u8])> = order[from..from + (max_rows.min(order.len() - from))]
                        .iter()
                        .map(|s| (table.key(s), table.value(s)))
                        .collect();
                    return self.decode(&taken).map(Some);
                }
            }
            Some(Scan::Merge(m)) => {
                while owned.len() < max_rows {
                    match m.next().map_err(|message| Error::Corrupt { name: name.clone(), message })? {
                        Some((k, _, v)) => owned.push((k, v)),
                        None => break,
                    }
                }
            }
            None => {}
        }
        if owned.is_empty() {
            return Ok(None);
        }
        let taken: Vec<(&[u8], &[u8])> = owned.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        self.decode(&taken).map(Some)
    }

    fn start_scan(&mut self) -> Result<Scan> {
        if self.runs.is_empty() {
            let table = std::mem::replace(&mut self.map, Table::new());
            let order = table.by_arrival();
            return Ok(Scan::Memory { table, order, pos: 0 });
        }
        self.spill(false)?;
        let name = self.spec.name.clone();
        let dir = self.dir.clone().ok_or_else(|| self.invalid("runs without a directory (a bug)"))?;
        let corrupt = |message: String| Error::Corrupt { name: name.clone(), message };
        let mut readers = Vec::new();
        for (file, _) in &self.runs {
            let path = dir.join(file);
            readers.push(RunFile::open(&path).map_err(corrupt)?);
        }
        let mut sorted = Vec::new();
        let mut scratch = Vec::new();
        let (values, ordered) = (&self.values, self.order.is_some());
        for p in 0..PARTITIONS {
            // the runs in the order they were written: a later run's rows are later rows
            let mut merged = Table::new();
            for run in &mut readers {
                let section = run.partition(p).map_err(corrupt)?;
                for (key, seq, v) in parse_entries(&section).map_err(corrupt)? {
                    merged.merge(key, seq, v, |old, new, out| combine(values, ordered, old, new, out), &mut scratch);
                }
            }
            if merged.is_empty() {
                continue;
            }
            let order = merged.by_arrival();
            let path = dir.join(format!("sorted-{p:02}.bin"));
            write_run(&path, order.iter().map(|sl| (sl.seq, merged.key(sl), merged.value(sl))))
                .map_err(io_err(&name, &path))?;
            sorted.push((path, p));
        }
        // the runs are combined into the sorted partitions
        for (file, _) in std::mem::take(&mut self.runs) {
            let _ = std::fs::remove_file(dir.join(file));
        }
        Ok(Scan::Merge(Box::new(SortedMerge::new(sorted).map_err(corrupt)?)))
    }

    /// Keys and value bytes back into columns.
    fn decode(&self, taken: &[(&[u8], &[u8])]) -> Result<RecordBatch> {
        let corrupt = |message: &str| Error::Corrupt { name: self.spec.name.clone(), message: message.to_string() };
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<Vec<ArrayRef>> {
            let parser = self.key_conv.parser();
            let mut columns =
                self.key_conv.convert_rows(taken.iter().map(|(k, _)| parser.parse(k))).map_err(|e| self.arrow(e))?;
            // each value's bytes, split per column
            let mut fields: Vec<Vec<&[u8]>> = vec![Vec::with_capacity(taken.len()); self.values.len()];
            for (_, v) in taken {
                let mut rest: &[u8] = v;
                if self.order.is_some() {
                    take_bytes(&mut rest).ok_or_else(|| corrupt("a value is cut short"))?;
                }
                for (i, val) in self.values.iter().enumerate() {
                    let field = match val.slot {
                        Slot::SumInt | Slot::SumFloat => take(&mut rest, 9),
                        Slot::Bytes(_) => take_bytes(&mut rest),
                    };
                    fields[i].push(field.ok_or_else(|| corrupt("a value is cut short"))?);
                }
            }
            for (val, got) in self.values.iter().zip(fields) {
                let sum = |f: &[u8]| (f[0] == 1).then(|| u64::from_le_bytes(f[1..9].try_into().unwrap_or_default()));
                columns.push(match (&val.slot, &val.conv) {
                    (Slot::SumInt, _) => Arc::new(got.iter().map(|f| sum(f).map(|v| v as i64)).collect::<Int64Array>()),
                    (Slot::SumFloat, _) => {
                        Arc::new(got.iter().map(|f| sum(f).map(f64::from_bits)).collect::<Float64Array>())
                    }
                    (Slot::Bytes(_), Some((conv, null))) => {
                        let parser = conv.parser();
                        let rows = got.iter().map(|f| parser.parse(if f.is_empty() { null } else { f }));
                        conv.convert_rows(rows).map_err(|e| self.arrow(e))?.remove(0)
                    }
                    (Slot::Bytes(_), None) => return Err(corrupt("a value column has no encoding")),
                });
            }
            Ok(columns)
        }))
        .map_err(|_| corrupt("a key or value could not be decoded"))??;
        RecordBatch::try_new(self.scan_schema(), decoded).map_err(|e| self.arrow(e))
    }

    /// Remove the state's files (the step is done with it).
    pub fn remove_files(&self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// An entry as a run stores it: key bytes, first arrival, value bytes.
type Stored = (Box<[u8]>, u64, Box<[u8]>);
/// An entry read in place from a run's bytes.
type Borrowed<'a> = (&'a [u8], u64, &'a [u8]);
/// Key and value bytes of a scanned entry.
type KeyValue = (Box<[u8]>, Box<[u8]>);

/// A batch's value columns, encoded for [`KeyedState::row_value`].
enum Encoded {
    Int(Int64Array),
    Float(Float64Array),
    /// Row bytes, and for min and max the column (to skip its nulls).
    Rows(arrow_row::Rows, Option<ArrayRef>),
}

/// Row `r`'s value bytes: the order value first (when there is one), then each column.
fn row_value(encoded: &[Encoded], order: Option<&arrow_row::Rows>, r: usize, out: &mut Vec<u8>) {
    out.clear();
    if let Some(rows) = order {
        put_bytes(out, rows.row(r).as_ref());
    }
    for e in encoded {
        match e {
            Encoded::Int(a) => put_sum(out, a.is_valid(r), a.value(r) as u64),
            Encoded::Float(a) => put_sum(out, a.is_valid(r), a.value(r).to_bits()),
            // min and max skip nulls: no value yet
            Encoded::Rows(_, Some(col)) if col.is_null(r) => put_bytes(out, &[]),
            Encoded::Rows(rows, _) => put_bytes(out, rows.row(r).as_ref()),
        }
    }
}

fn put_sum(out: &mut Vec<u8>, valid: bool, bits: u64) {
    out.push(u8::from(valid));
    out.extend_from_slice(&if valid { bits } else { 0 }.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (a, b) = rest.split_at(n);
    *rest = b;
    Some(a)
}

fn take_bytes<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = u32::from_le_bytes(take(rest, 4)?.try_into().ok()?) as usize;
    take(rest, n)
}

/// Combine the value bytes `old` (held) with `new` (a later row) into `out`. Values that do
/// not parse (they are the host's own bytes, so only a bug makes them) keep `old`.
fn combine(values: &[Value], ordered: bool, old: &[u8], new: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let (mut a, mut b) = (old, new);
    let mut later_wins = true;
    if ordered {
        let (Some(oa), Some(ob)) = (take_bytes(&mut a), take_bytes(&mut b)) else {
            out.extend_from_slice(old);
            return;
        };
        // ties go to the later row
        later_wins = ob >= oa;
        put_bytes(out, if later_wins { ob } else { oa });
    }
    for v in values {
        match v.slot {
            Slot::SumInt | Slot::SumFloat => {
                let (Some(x), Some(y)) = (take(&mut a, 9), take(&mut b, 9)) else {
                    out.clear();
                    out.extend_from_slice(old);
                    return;
                };
                let bits = |f: &[u8]| u64::from_le_bytes(f[1..9].try_into().unwrap_or_default());
                let (xv, yv) = (x[0] == 1, y[0] == 1);
                let sum = match (v.slot, xv, yv) {
                    (_, false, false) => 0,
                    (_, true, false) => bits(x),
                    (_, false, true) => bits(y),
                    (Slot::SumInt, true, true) => (bits(x) as i64).wrapping_add(bits(y) as i64) as u64,
                    _ => (f64::from_bits(bits(x)) + f64::from_bits(bits(y))).to_bits(),
                };
                put_sum(out, xv || yv, sum);
            }
            Slot::Bytes(m) => {
                let (Some(x), Some(y)) = (take_bytes(&mut a), take_bytes(&mut b)) else {
                    out.clear();
                    out.extend_from_slice(old);
                    return;
                };
                let keep = match m {
                    Combine::First => x,
                    Combine::Last => {
                        if later_wins {
                            y
                        } else {
                            x
                        }
                    }
                    Combine::Min if x.is_empty() || (!y.is_empty() && y < x) => y,
                    Combine::Max if x.is_empty() || (!y.is_empty() && y > x) => y,
                    _ => x,
                };
                put_bytes(out, keep);
            }
        }
    }
}

/// A deterministic hash of key bytes (partitions must be the same after a restart).
fn partition_of(key: &[u8]) -> usize {
    (keyrun::mix(key).wrapping_mul(0xC4CE_B9FE_1A85_EC53) >> 58) as usize % PARTITIONS
}

fn run_number(file: &str) -> Option<u64> {
    let n = file.strip_prefix("run-").and_then(|f| f.strip_suffix(".bin"));
    n.or_else(|| file.strip_prefix("keys-")?.strip_suffix(".run"))?.parse().ok()
}

/// A set's int64 key as run and log bytes: eight little-endian bytes, or none for null
/// (on the stack: it is built per row).
struct IntKey {
    bytes: [u8; 8],
    len: usize,
}

impl std::ops::Deref for IntKey {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn int_key(id: Option<i64>) -> IntKey {
    match id {
        Some(v) => IntKey { bytes: v.to_le_bytes(), len: 8 },
        None => IntKey { bytes: [0; 8], len: 0 },
    }
}

/// Write entries grouped by partition: magic, entries, the partitions' start offsets and
/// the end, magic. Returns the file's length.
fn write_run<'a>(path: &Path, entries: impl Iterator<Item = (u64, &'a [u8], &'a [u8])>) -> std::io::Result<u64> {
    let mut by_part: Vec<(u8, u64, &[u8], &[u8])> =
        entries.map(|(seq, k, v)| (partition_of(k) as u8, seq, k, v)).collect();
    // stable: a sorted partition keeps its arrival order
    by_part.sort_by_key(|e| e.0);
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    w.write_all(RUN_MAGIC)?;
    let mut offset = RUN_MAGIC.len() as u64;
    let mut starts = vec![0u64; PARTITIONS + 1];
    let mut next = 0usize;
    for (p, seq, key, value) in &by_part {
        while next <= *p as usize {
            starts[next] = offset;
            next += 1;
        }
        w.write_all(&(key.len() as u32).to_le_bytes())?;
        w.write_all(key)?;
        w.write_all(&seq.to_le_bytes())?;
        w.write_all(&(value.len() as u32).to_le_bytes())?;
        w.write_all(value)?;
        offset += 4 + key.len() as u64 + 8 + 4 + value.len() as u64;
    }
    while next <= PARTITIONS {
        starts[next] = offset;
        next += 1;
    }
    for s in &starts {
        w.write_all(&s.to_le_bytes())?;
    }
    w.write_all(RUN_MAGIC)?;
    w.flush()?;
    Ok(offset + (PARTITIONS as u64 + 1) * 8 + RUN_MAGIC.len() as u64)
}

/// A run file opened for reading partition by partition.
struct RunFile {
    file: File,
    starts: Vec<u64>,
}

impl RunFile {
    fn open(path: &Path) -> std::result::Result<RunFile, String> {
        let shown = path.display();
        let mut file = File::open(path).map_err(|e| format!("{shown}: {e}"))?;
        let len = file.metadata().map_err(|e| format!("{shown}: {e}"))?.len();
        let footer = (PARTITIONS as u64 + 1) * 8 + RUN_MAGIC.len() as u64;
        if len < footer + RUN_MAGIC.len() as u64 {
            return Err(format!("{shown} is too short to be a run"));
        }
        file.seek(SeekFrom::Start(len - footer)).map_err(|e| format!("{shown}: {e}"))?;
        let mut buf = vec![0u8; footer as usize];
        file.read_exact(&mut buf).map_err(|e| format!("{shown}: {e}"))?;
        if &buf[buf.len() - 8..] != RUN_MAGIC {
            return Err(format!("{shown} does not end as a run does"));
        }
        let starts: Vec<u64> = buf
            .chunks_exact(8)
            .take(PARTITIONS + 1)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if starts.windows(2).any(|w| w[0] > w[1]) || starts[PARTITIONS] > len - footer {
            return Err(format!("{shown} has a damaged index"));
        }
        Ok(RunFile { file, starts })
    }

    /// The bytes of partition `p`'s entries.
    fn partition(&mut self, p: usize) -> std::result::Result<Vec<u8>, String> {
        let (from, to) = (self.starts[p], self.starts[p + 1]);
        self.file.seek(SeekFrom::Start(from)).map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity((to - from) as usize);
        (&mut self.file).take(to - from).read_to_end(&mut buf).map_err(|e| e.to_string())?;
        if buf.len() as u64 != to - from {
            return Err("a run is cut short".into());
        }
        Ok(buf)
    }
}

/// The entries in a run's bytes: key, first arrival, value.
fn parse_entries(mut buf: &[u8]) -> std::result::Result<Vec<Borrowed<'_>>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let cut = || "an entry is cut short".to_string();
        let key = take_bytes(&mut buf).ok_or_else(cut)?;
        let seq = u64::from_le_bytes(take(&mut buf, 8).ok_or_else(cut)?.try_into().map_err(|_| cut())?);
        let value = take_bytes(&mut buf).ok_or_else(cut)?;
        out.push((key, seq, value));
    }
    Ok(out)
}

/// One entry, or none at the end of the reader.
fn read_entry(r: &mut impl Read) -> std::result::Result<Option<Stored>, String> {
    let mut n = [0u8; 4];
    match r.read_exact(&mut n) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let short = |e: std::io::Error| format!("an entry is cut short: {e}");
    let read_n = |r: &mut dyn Read, n: usize| -> std::result::Result<Box<[u8]>, String> {
        // lengths come from our own files; a damaged one still cannot ask for more than 1 GiB
        if n > 1 << 30 {
            return Err(format!("an entry claims {n} bytes"));
        }
        let mut b = vec![0u8; n];
        r.read_exact(&mut b).map_err(short)?;
        Ok(b.into_boxed_slice())
    };
    let key = read_n(r, u32::from_le_bytes(n) as usize)?;
    let mut seq = [0u8; 8];
    r.read_exact(&mut seq).map_err(short)?;
    r.read_exact(&mut n).map_err(short)?;
    let value = read_n(r, u32::from_le_bytes(n) as usize)?;
    Ok(Some((key, u64::from_le_bytes(seq), value)))
}

/// A scan in progress.
enum Scan {
    /// Everything fitted in memory: the table and its slots by arrival.
    Memory {
        table: Table,
        order: Vec<Place>,
        pos: usize,
    },
    Merge(Box<SortedMerge>),
}

/// The sorted partition files, merged by arrival.
struct SortedMerge {
    readers: Vec<BufReader<std::io::Take<File>>>,
    heads: Vec<Option<Stored>>,
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    paths: Vec<PathBuf>,
}

impl SortedMerge {
    /// Each file holds one partition (`p`), its entries in arrival order.
    fn new(files: Vec<(PathBuf, usize)>) -> std::result::Result<Self, String> {
        let mut m = SortedMerge { readers: Vec::new(), heads: Vec::new(), heap: BinaryHeap::new(), paths: Vec::new() };
        for (i, (path, p)) in files.into_iter().enumerate() {
            let mut run = RunFile::open(&path)?;
            let (from, to) = (run.starts[p], run.starts[p + 1]);
            run.file.seek(SeekFrom::Start(from)).map_err(|e| format!("{}: {e}", path.display()))?;
            m.readers.push(BufReader::with_capacity(1 << 16, run.file.take(to - from)));
            m.heads.push(None);
            m.paths.push(path);
            m.advance(i)?;
        }
        Ok(m)
    }

    fn advance(&mut self, i: usize) -> std::result::Result<(), String> {
        let entry = read_entry(&mut self.readers[i])?;
        if let Some(e) = &entry {
            self.heap.push(Reverse((e.1, i)));
        }
        self.heads[i] = entry;
        Ok(())
    }

    fn next(&mut self) -> std::result::Result<Option<Stored>, String> {
        let Some(Reverse((_, i))) = self.heap.pop() else {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
            return Ok(None);
        };
        let e = self.heads[i].take();
        self.advance(i)?;
        Ok(e)
    }
}

mod keyrun;
#[cfg(test)]
mod tests;
