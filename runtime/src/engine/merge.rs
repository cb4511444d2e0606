//! `mode = "append"` and `mode = "merge"` on local Parquet datasets: the run's staged
//! output is completed with the published data before the switch, so the usual atomic
//! switch publishes the whole result (copy-on-write by file).
//!
//! - append: every published file of the unit (the dataset, or the partition a partition
//!   run writes) is hard-linked into the staging: nothing is copied.
//! - merge by `key`: the run's own rows are reduced to the last row of each key (a row
//!   matching `delete_when` removes its key and is not written); then each published file
//!   whose rows hold none of the run's keys is hard-linked, and each that does is rewritten
//!   without those rows. A key that moved to another partition leaves its old one.
//!
//! The keys of the run's rows are held in memory (about the key bytes plus 40 bytes each);
//! published files are read key columns first, and whole only when they must be rewritten.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow_row::{RowConverter, SortField};
use arrow_schema::{DataType, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::config::{Output, OutputMode};

/// The ordinal column a merge step's staged rows carry until the fold.
pub(crate) const SEQ: &str = "_weir_seq";

/// The schema a step's sink writes: a merge output's rows carry [`SEQ`]. The key and
/// `delete_when` columns are checked here, before any row is read.
pub(crate) fn staged_schema(out: Option<&Output>, schema: &SchemaRef) -> Res<SchemaRef> {
    let Some(out) = out.filter(|o| o.mode == OutputMode::Merge) else { return Ok(schema.clone()) };
    for k in &out.key {
        let f = schema.field_with_name(k).map_err(|_| {
            format!(
                "the merge key column `{k}` is not in the step's output (its columns: {})",
                weir_sdk::util::schema_text(schema)
            )
        })?;
        if f.data_type().is_nested() {
            return Err(format!("the merge key column `{k}` is a {}; a key is made of flat columns", f.data_type()));
        }
    }
    if let Some((column, _)) = &out.delete_when {
        schema
            .field_with_name(column)
            .map_err(|_| format!("the delete_when column `{column}` is not in the step's output"))?;
    }
    Ok(with_seq_field(schema))
}

/// `schema` with [`SEQ`] last.
fn with_seq_field(schema: &arrow_schema::Schema) -> SchemaRef {
    let mut fields: Vec<arrow_schema::FieldRef> = schema.fields().iter().cloned().collect();
    fields.push(Arc::new(arrow_schema::Field::new(SEQ, DataType::UInt64, false)));
    Arc::new(arrow_schema::Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Numbers a merge step's rows in the order they are written ([`SEQ`]); the schema with
/// the number is built once, on the first batch.
#[derive(Default)]
pub(crate) struct SeqNumbers {
    next: u64,
    schema: Option<SchemaRef>,
}

impl SeqNumbers {
    pub fn number(&mut self, batch: &RecordBatch) -> crate::Result<RecordBatch> {
        let rows = batch.num_rows() as u64;
        let seq: ArrayRef = Arc::new(arrow_array::UInt64Array::from_iter_values(self.next..self.next + rows));
        self.next += rows;
        let schema = self.schema.get_or_insert_with(|| with_seq_field(&batch.schema())).clone();
        let mut columns = batch.columns().to_vec();
        columns.push(seq);
        RecordBatch::try_new(schema, columns).map_err(|e| crate::Error::Internal(format!("numbering merge rows: {e}")))
    }
}

/// What folding the published data in did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Folded {
    /// Published files taken over as they are (hard links).
    pub linked: u64,
    /// Published files rewritten without the rows the run replaced or deleted.
    pub rewritten: u64,
    /// Published rows removed: replaced by the run's row of the same key, or deleted.
    pub replaced: u64,
    /// The run's `delete_when` rows (each removes its key and is not written).
    pub deleted: u64,
    /// The run's own rows dropped because a later row of the run had the same key.
    pub superseded: u64,
    /// The run's rows dropped because a published row or a remembered delete of their key
    /// is newer by `sequence_by`.
    pub outdated: u64,
}

impl std::ops::AddAssign for Folded {
    fn add_assign(&mut self, f: Folded) {
        self.linked += f.linked;
        self.rewritten += f.rewritten;
        self.replaced += f.replaced;
        self.deleted += f.deleted;
        self.superseded += f.superseded;
        self.outdated += f.outdated;
    }
}

type Res<T> = Result<T, String>;

/// A key or sequence value in arrow-row's comparable bytes.
type RowBytes = Box<[u8]>;

/// What a run does to a key: its winning row's `sequence_by` value (comparable bytes; none
/// without `sequence_by`), and whether that row deletes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mark {
    seq: Option<RowBytes>,
    deleting: bool,
}

/// Every key a run replaces or deletes.
type Touched = HashMap<RowBytes, Mark>;

/// Complete the staged unit `staged` with the published unit `target` as `out.mode` says.
pub(crate) fn fold(staged: &Path, target: &Path, out: &Output) -> Res<Folded> {
    let mut folded = Folded::default();
    let published = if target.is_dir() { crate::io::sink::parquet_files(target)? } else { Vec::new() };
    match out.mode {
        OutputMode::Overwrite | OutputMode::OverwritePartitions => {}
        OutputMode::Append => {
            for rel in &published {
                link(&target.join(rel), staged, rel)?;
                folded.linked += 1;
            }
        }
        OutputMode::Merge => {
            let abs: Vec<PathBuf> = published.iter().map(|r| target.join(r)).collect();
            let keys = reduce_run_rows(staged, out, &mut folded, &abs, Some(target))?;
            for rel in &published {
                fold_published(&target.join(rel), staged, rel, out, &keys, &mut folded, None, None)?;
            }
        }
    }
    Ok(folded)
}

/// A name in `dir` like `name` that no file has yet (`part-00000-k1.parquet`).
fn free_name(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    let stem = name.strip_suffix(".parquet").unwrap_or(name);
    (1..).map(|n| dir.join(format!("{stem}-k{n}.parquet"))).find(|p| !p.exists()).unwrap_or(first)
}

/// Hard-link the published file `from` into the staging at `rel`'s folder.
fn link(from: &Path, staged: &Path, rel: &Path) -> Res<()> {
    let dir = staged.join(rel.parent().unwrap_or(Path::new("")));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let to = free_name(&dir, &name);
    std::fs::hard_link(from, &to).map_err(|e| {
        format!(
            "cannot link {} into the staging (append and merge need the output's staging on its file system): {e}",
            from.display()
        )
    })
}

/// The key columns' converter, from the staged schema.
fn converter(schema: &SchemaRef, key: &[String]) -> Res<(RowConverter, Vec<usize>)> {
    let idx: Vec<usize> = key
        .iter()
        .map(|k| schema.index_of(k).map_err(|_| format!("the merge key column `{k}` is not in the step's output")))
        .collect::<Res<_>>()?;
    let fields = idx.iter().map(|&i| SortField::new(schema.field(i).data_type().clone())).collect();
    Ok((RowConverter::new(fields).map_err(|e| e.to_string())?, idx))
}

fn read(path: &Path, columns: Option<&[String]>) -> Res<(SchemaRef, Vec<RecordBatch>)> {
    let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(cols) = columns {
        let schema = b.schema().clone();
        let mut idx = Vec::new();
        for c in cols {
            idx.push(
                schema.index_of(c).map_err(|_| format!("{} has no column `{c}` (a merge needs it)", path.display()))?,
            );
        }
        let mask = ProjectionMask::roots(b.parquet_schema(), idx);
        b = b.with_projection(mask);
    }
    let schema = b.schema().clone();
    let reader = b.build().map_err(|e| format!("{}: {e}", path.display()))?;
    let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| format!("{}: {e}", path.display()))?;
    let schema = match columns {
        Some(_) => batches.first().map(|b| b.schema()).unwrap_or(schema),
        None => schema,
    };
    Ok((schema, batches))
}

/// Whether each row of `batch` is a `delete_when` marker.
fn delete_marks(batch: &RecordBatch, out: &Output) -> Res<Option<Vec<bool>>> {
    let Some((column, value)) = &out.delete_when else { return Ok(None) };
    let col = batch
        .column_by_name(column)
        .ok_or_else(|| format!("the delete_when column `{column}` is not in the step's output"))?;
    let text = arrow_cast::cast(col, &DataType::Utf8).map_err(|e| e.to_string())?;
    let text = text.as_any().downcast_ref::<arrow_array::StringArray>().ok_or("delete_when: not text")?;
    Ok(Some((0..text.len()).map(|i| text.is_valid(i) && text.value(i) == value).collect()))
}

/// A key's winning row of the run.
struct Winner {
    /// The `sequence_by` value, as comparable bytes (none without `sequence_by`).
    seq: Option<Box<[u8]>>,
    /// Its place in the run's order.
    n: u64,
    file: usize,
    row: usize,
    deleting: bool,
    /// A published row or a remembered delete of the key is newer: the run's row is dropped
    /// and the published data keeps what it has.
    stale: bool,
}

/// Where a merge with `sequence_by` remembers the deletes it applied (key and sequence),
/// in the dataset beside its files: a late or replayed row older than a delete of its key
/// does not bring the key back. Arrow IPC, so no Parquet reader takes it for data.
pub(crate) const TOMBSTONES: &str = "_weir_tombstones.arrow";

/// Keep each key's last row of the run (by `sequence_by`, then the run's order), drop the
/// rows a newer published row or remembered delete of their key outdates, and write the
/// staged files again with only those rows (markers dropped). `published` are the unit's
/// published files and `unit` its published folder (for the remembered deletes). Returns
/// every key whose published rows the run replaces or deletes.
fn reduce_run_rows(
    staged: &Path,
    out: &Output,
    folded: &mut Folded,
    published: &[PathBuf],
    unit: Option<&Path>,
) -> Res<Touched> {
    let files = crate::io::sink::parquet_files(staged)?;
    let mut last: HashMap<Box<[u8]>, Winner> = HashMap::new();
    let mut conv: Option<(RowConverter, Vec<usize>)> = None;
    let mut seq_conv: Option<(RowConverter, usize)> = None;
    // pass 1 reads only the key, the row numbers, the sequence and the delete marker
    let mut needed: Vec<String> = out.key.clone();
    needed.push(SEQ.to_string());
    needed.extend(out.delete_when.iter().map(|(c, _)| c.clone()));
    needed.extend(out.sequence_by.iter().cloned());
    needed.dedup();
    for (fi, rel) in files.iter().enumerate() {
        let (schema, batches) = read(&staged.join(rel), Some(&needed))?;
        if conv.is_none() {
            conv = Some(converter(&schema, &out.key)?);
            if let Some(col) = &out.sequence_by {
                seq_conv = Some(seq_converter(&schema, col)?);
            }
        }
        let (c, idx) = conv.as_ref().expect("set above");
        let seq_at = schema.index_of(SEQ).map_err(|_| format!("{} lacks its row numbers", rel.display()))?;
        let mut row = 0;
        for b in &batches {
            let cols: Vec<ArrayRef> = idx.iter().map(|&i| b.column(i).clone()).collect();
            let rows = c.convert_columns(&cols).map_err(|e| e.to_string())?;
            let seqs = match &seq_conv {
                Some((sc, at)) => Some(sc.convert_columns(&[b.column(*at).clone()]).map_err(|e| e.to_string())?),
                None => None,
            };
            let marks = delete_marks(b, out)?;
            let n = b.column(seq_at).as_any().downcast_ref::<arrow_array::UInt64Array>().ok_or("bad row numbers")?;
            for i in 0..b.num_rows() {
                let this = Winner {
                    seq: seqs.as_ref().map(|s| Box::from(s.row(i).as_ref())),
                    n: n.value(i),
                    file: fi,
                    row: row + i,
                    deleting: marks.as_ref().is_some_and(|m| m[i]),
                    stale: false,
                };
                match last.entry(Box::from(rows.row(i).as_ref())) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(this);
                    }
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        folded.superseded += 1;
                        if (&o.get().seq, o.get().n) < (&this.seq, this.n) {
                            o.insert(this);
                        }
                    }
                }
            }
            row += b.num_rows();
        }
    }
    if let (Some((kc, _)), Some((sc, _)), Some(col)) = (&conv, &seq_conv, &out.sequence_by) {
        outdate(&mut last, published, unit, out, col, kc, sc, folded)?;
    }
    // pass 2: rewrite the files holding rows that are not their key's winner, or markers
    let mut per_file: HashMap<usize, Vec<(usize, bool)>> = HashMap::new();
    for w in last.values().filter(|w| !w.stale) {
        per_file.entry(w.file).or_default().push((w.row, w.deleting));
    }
    for (fi, rel) in files.iter().enumerate() {
        let keep_rows = per_file.remove(&fi).unwrap_or_default();
        let total = parquet_rows(&staged.join(rel))?;
        let mut keep = vec![false; total];
        let mut markers = 0;
        for (r, del) in keep_rows {
            if del {
                markers += 1;
            } else if let Some(k) = keep.get_mut(r) {
                *k = true;
            }
        }
        folded.deleted += markers;
        // every staged file is written again, without its row numbers
        rewrite(&staged.join(rel), &staged.join(rel), &keep, out, Some(SEQ))?;
    }
    // as bytes, so published rows are looked up without a copy each
    let touched: Touched = last
        .into_iter()
        .filter(|(_, w)| !w.stale)
        .map(|(k, w)| (k, Mark { seq: w.seq, deleting: w.deleting }))
        .collect();
    if let (Some((kc, _)), Some((sc, _)), Some(unit)) = (&conv, &seq_conv, unit) {
        remember_deletes(staged, unit, &touched, out, kc, sc)?;
    }
    Ok(touched)
}

/// The rows of a Parquet file, from its footer.
fn parquet_rows(path: &Path) -> Res<usize> {
    let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(b.metadata().file_metadata().num_rows().max(0) as usize)
}

/// The `sequence_by` column's converter and place, from the staged schema.
fn seq_converter(schema: &SchemaRef, col: &str) -> Res<(RowConverter, usize)> {
    let at = schema.index_of(col).map_err(|_| format!("the sequence_by column `{col}` is not in the step's output"))?;
    let field = schema.field(at);
    if field.data_type().is_nested() {
        return Err(format!("the sequence_by column `{col}` is a {}; it must be a flat column", field.data_type()));
    }
    Ok((RowConverter::new(vec![SortField::new(field.data_type().clone())]).map_err(|e| e.to_string())?, at))
}

/// Mark the run's winners that a published row (with a higher sequence) or a remembered
/// delete (with a higher or equal one) of their key outdates.
#[allow(clippy::too_many_arguments)]
fn outdate(
    last: &mut HashMap<Box<[u8]>, Winner>,
    published: &[PathBuf],
    unit: Option<&Path>,
    out: &Output,
    col: &str,
    kc: &RowConverter,
    sc: &RowConverter,
    folded: &mut Folded,
) -> Res<()> {
    let mut outdated = 0;
    if let Some(unit) = unit {
        for (k, s) in read_tombstones(&unit.join(TOMBSTONES), out, col, kc, sc)? {
            if let Some(w) = last.get_mut(&k) {
                if !w.stale && w.seq.as_deref() <= Some(&s[..]) {
                    w.stale = true;
                    outdated += 1;
                }
            }
        }
    }
    for path in published {
        each_key_seq(path, out, col, None, kc, sc, |key, seq| {
            if let Some(w) = last.get_mut(key) {
                if !w.stale && w.seq.as_deref() < Some(seq) {
                    w.stale = true;
                    outdated += 1;
                }
            }
        })?;
    }
    folded.outdated += outdated;
    Ok(())
}

/// Each row of the Parquet file `path` as its key and `sequence_by` value (`col`), both as
/// comparable bytes; in the types of `types` when given (a file another writer made may
/// hold a column in a narrower type), else in the file's own.
fn each_key_seq(
    path: &Path,
    out: &Output,
    col: &str,
    types: Option<&SchemaRef>,
    kc: &RowConverter,
    sc: &RowConverter,
    mut row: impl FnMut(&[u8], &[u8]),
) -> Res<()> {
    let mut cols = out.key.clone();
    cols.push(col.to_string());
    let (schema, batches) = read(path, Some(&cols))?;
    let types = types.unwrap_or(&schema);
    let seq_col = [col.to_string()];
    for b in &batches {
        let keys = kc.convert_columns(&columns_as(b, &out.key, types, path)?).map_err(|e| e.to_string())?;
        let seqs = sc.convert_columns(&columns_as(b, &seq_col, types, path)?).map_err(|e| e.to_string())?;
        for i in 0..b.num_rows() {
            row(keys.row(i).as_ref(), seqs.row(i).as_ref());
        }
    }
    Ok(())
}

/// The remembered deletes in the file `path`, when there is one: (key, sequence) as
/// comparable bytes.
fn read_tombstones(
    path: &Path,
    out: &Output,
    col: &str,
    kc: &RowConverter,
    sc: &RowConverter,
) -> Res<Vec<(RowBytes, RowBytes)>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    let reader = arrow_ipc::reader::FileReader::try_new(f, None).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out_rows = Vec::new();
    for b in reader {
        let b = b.map_err(|e| format!("{}: {e}", path.display()))?;
        let kcols: Vec<ArrayRef> = out
            .key
            .iter()
            .map(|k| {
                b.column_by_name(k).cloned().ok_or_else(|| format!("{} lacks the key column `{k}`", path.display()))
            })
            .collect::<Res<_>>()?;
        let scol = b.column_by_name(col).cloned().ok_or_else(|| format!("{} lacks `{col}`", path.display()))?;
        let keys = kc.convert_columns(&kcols).map_err(|e| format!("{}: {e}", path.display()))?;
        let seqs = sc.convert_columns(&[scol]).map_err(|e| format!("{}: {e}", path.display()))?;
        for i in 0..b.num_rows() {
            out_rows.push((Box::from(keys.row(i).as_ref()), Box::from(seqs.row(i).as_ref())));
        }
    }
    Ok(out_rows)
}

/// The remembered deletes after a run: `old`, less the keys the run writes again, plus the
/// run's own deletes. Returns whether the run changed them.
fn apply_deletes(old: &mut HashMap<RowBytes, RowBytes>, touched: &Touched) -> bool {
    let mut changed = false;
    for (k, m) in touched {
        match (&m.seq, m.deleting) {
            (Some(s), true) => {
                old.insert(k.clone(), s.clone());
                changed = true;
            }
            _ => changed |= old.remove(k).is_some(),
        }
    }
    changed
}

/// Write the remembered deletes `tomb` to `path` (Arrow IPC, one batch, sorted by key).
fn write_tombstones(
    path: &Path,
    tomb: &HashMap<RowBytes, RowBytes>,
    out: &Output,
    kc: &RowConverter,
    sc: &RowConverter,
) -> Res<()> {
    let col = out.sequence_by.as_deref().unwrap_or_default();
    let (kp, sp) = (kc.parser(), sc.parser());
    let mut entries: Vec<(&RowBytes, &RowBytes)> = tomb.iter().collect();
    entries.sort();
    let mut columns = kc.convert_rows(entries.iter().map(|(k, _)| kp.parse(k))).map_err(|e| e.to_string())?;
    columns.extend(sc.convert_rows(entries.iter().map(|(_, s)| sp.parse(s))).map_err(|e| e.to_string())?);
    let mut names = out.key.clone();
    names.push(col.to_string());
    let fields: Vec<arrow_schema::Field> =
        names.iter().zip(&columns).map(|(n, c)| arrow_schema::Field::new(n, c.data_type().clone(), true)).collect();
    let batch =
        RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), columns).map_err(|e| e.to_string())?;
    let f = File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut w = arrow_ipc::writer::FileWriter::try_new(f, &batch.schema()).map_err(|e| e.to_string())?;
    w.write(&batch).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())?;
    w.into_inner().map_err(|e| e.to_string())?.sync_all().map_err(|e| format!("cannot sync {}: {e}", path.display()))
}

/// The unit's remembered deletes after the run, into the staging (none when there are none).
fn remember_deletes(
    staged: &Path,
    unit: &Path,
    touched: &Touched,
    out: &Output,
    kc: &RowConverter,
    sc: &RowConverter,
) -> Res<()> {
    let col = out.sequence_by.as_deref().unwrap_or_default();
    let mut tomb: HashMap<RowBytes, RowBytes> =
        read_tombstones(&unit.join(TOMBSTONES), out, col, kc, sc)?.into_iter().collect();
    apply_deletes(&mut tomb, touched);
    if tomb.is_empty() {
        return Ok(());
    }
    write_tombstones(&staged.join(TOMBSTONES), &tomb, out, kc, sc)
}

/// Write the file `from` again to `to` (through a temporary file) without the rows `keep`
/// drops and without the column `drop`, batch by batch, encoded on all cores by the sink's
/// writer; no file when no row is left.
fn rewrite(from: &Path, to: &Path, keep: &[bool], out: &Output, drop: Option<&str>) -> Res<()> {
    let dir = to.parent().ok_or("no folder")?;
    let tmp = dir.join(format!(".merge-{}.tmp", std::process::id()));
    let kept = keep.iter().filter(|k| **k).count();
    if kept > 0 {
        let f = File::open(from).map_err(|e| format!("cannot open {}: {e}", from.display()))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| format!("{}: {e}", from.display()))?;
        let schema = b.schema().clone();
        let drop_at = drop.and_then(|c| schema.index_of(c).ok());
        let fields: Vec<arrow_schema::FieldRef> =
            schema.fields().iter().enumerate().filter(|(i, _)| Some(*i) != drop_at).map(|(_, f)| f.clone()).collect();
        let plain = Arc::new(arrow_schema::Schema::new_with_metadata(fields, schema.metadata().clone()));
        let reader = b.with_batch_size(64 * 1024).build().map_err(|e| format!("{}: {e}", from.display()))?;
        let mut w = crate::io::sink::FileWriter::create(&tmp, plain.clone(), out).map_err(|e| e.to_string())?;
        let mut at = 0;
        for batch in reader {
            let batch = batch.map_err(|e| format!("{}: {e}", from.display()))?;
            let rows = batch.num_rows();
            let mask =
                keep.get(at..at + rows).ok_or_else(|| format!("{} changed while it was merged", from.display()))?;
            at += rows;
            let mut cols = batch.columns().to_vec();
            if let Some(i) = drop_at {
                cols.remove(i);
            }
            let batch = RecordBatch::try_new(plain.clone(), cols).map_err(|e| e.to_string())?;
            let part = if mask.iter().all(|k| *k) {
                batch
            } else {
                arrow_select::filter::filter_record_batch(&batch, &BooleanArray::from(mask.to_vec()))
                    .map_err(|e| e.to_string())?
            };
            if part.num_rows() > 0 {
                w.write(&part).map_err(|e| e.to_string())?;
            }
        }
        w.finish().map_err(|e| e.to_string())?;
    }
    if from == to {
        std::fs::remove_file(from).map_err(|e| format!("cannot replace {}: {e}", from.display()))?;
    }
    if kept > 0 {
        std::fs::rename(&tmp, to).map_err(|e| format!("cannot write {}: {e}", to.display()))?;
    }
    Ok(())
}

/// One published file into the staging: when it holds none of the run's keys, linked
/// (`link_kept`) or left where it is; else rewritten without them. Returns whether it was
/// rewritten.
#[allow(clippy::too_many_arguments)]
fn fold_published(
    from: &Path,
    staged: &Path,
    rel: &Path,
    out: &Output,
    keys: &Touched,
    folded: &mut Folded,
    rewritten_name: Option<&str>,
    types: Option<&SchemaRef>,
) -> Res<bool> {
    // a Delta table's file is left where it is when kept, and rewritten under its own name
    let link_kept = rewritten_name.is_none();
    let (kschema, kbatches) = read(from, Some(&out.key))?;
    // the key's columns in the key's order, in the run's types when they are known
    let schema = types.unwrap_or(&kschema);
    let (c, _) = converter(schema, &out.key)?;
    let mut keep = Vec::new();
    for b in &kbatches {
        let rows = c.convert_columns(&columns_as(b, &out.key, schema, from)?).map_err(|e| e.to_string())?;
        keep.extend((0..b.num_rows()).map(|i| !keys.contains_key(rows.row(i).as_ref())));
    }
    let dropped = keep.iter().filter(|k| !**k).count() as u64;
    if dropped == 0 {
        folded.linked += 1;
        if link_kept {
            link(from, staged, rel)?;
        }
        return Ok(false);
    }
    folded.replaced += dropped;
    folded.rewritten += 1;
    let dir = staged.join(rel.parent().unwrap_or(Path::new("")));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let name = match rewritten_name {
        Some(n) => n.to_string(),
        None => rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let to = free_name(&dir, &name);
    rewrite(from, &to, &keep, out, None)?;
    Ok(true)
}

/// A merge into a Delta table keeps what the run does to each key (the deleted ones too)
/// in its staging, for the commit.
const MERGE_KEYS: &str = "_weir_merge_keys.bin";
/// What that file starts with: its format's name and version.
const MERGE_KEYS_MAGIC: &[u8] = b"weir-merge-keys/2\n";

/// `mode = "merge"` into a Delta table, in the step: the run's rows reduced to each key's
/// last (markers dropped) and every key the run touched kept beside them, with its
/// sequence and whether it is deleted.
pub(crate) fn reduce_for_table(staged: &Path, out: &Output) -> Res<Folded> {
    use std::io::Write;
    let mut folded = Folded::default();
    let touched = reduce_run_rows(staged, out, &mut folded, &[], None)?;
    let at = staged.join(MERGE_KEYS);
    let f = File::create(&at).map_err(|e| format!("cannot write {}: {e}", at.display()))?;
    let mut w = std::io::BufWriter::new(f);
    w.write_all(MERGE_KEYS_MAGIC).map_err(|e| e.to_string())?;
    // per key: the key, a flag byte (1: it is deleted, 2: a sequence follows), the sequence
    let mut put = |bytes: &[u8]| -> Res<()> {
        w.write_all(&(bytes.len() as u32).to_le_bytes()).and_then(|()| w.write_all(bytes)).map_err(|e| e.to_string())
    };
    for (k, m) in &touched {
        put(k)?;
        put(&[u8::from(m.deleting) | if m.seq.is_some() { 2 } else { 0 }])?;
        if let Some(s) = &m.seq {
            put(s)?;
        }
    }
    let f = w.into_inner().map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| format!("cannot sync {}: {e}", at.display()))?;
    Ok(folded)
}

/// Length-prefixed fields, read one by one.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn next(&mut self) -> Res<&'a [u8]> {
        const TRUNCATED: &str = "the merge's keys are truncated";
        let (len, tail) = self.rest.split_at_checked(4).ok_or(TRUNCATED)?;
        let n = u32::from_le_bytes(len.try_into().map_err(|_| TRUNCATED)?) as usize;
        let (v, tail) = tail.split_at_checked(n).ok_or(TRUNCATED)?;
        self.rest = tail;
        Ok(v)
    }
}

fn load_keys(staged: &Path) -> Res<Touched> {
    let at = staged.join(MERGE_KEYS);
    let bytes = std::fs::read(&at).map_err(|e| format!("the merge's keys, {}: {e}", at.display()))?;
    let Some(rest) = bytes.strip_prefix(MERGE_KEYS_MAGIC) else {
        return Err(format!(
            "the merge's keys, {}, were written by another version of weir: run the step again (--force)",
            at.display()
        ));
    };
    let mut fields = Fields { rest };
    let mut keys = Touched::new();
    while !fields.rest.is_empty() {
        let k = fields.next()?;
        let flags = fields.next()?.first().copied().ok_or("the merge's keys are truncated")?;
        let seq = if flags & 2 != 0 { Some(Box::from(fields.next()?)) } else { None };
        keys.insert(Box::from(k), Mark { seq, deleting: flags & 1 != 0 });
    }
    Ok(keys)
}

/// Where a merge into a remote table keeps the copies of the table files it is reading.
const DOWNLOADS: &str = "_weir_downloads";

/// The columns `names` of `b`, cast to their types in `schema` (a file another writer
/// made may hold a column in a narrower type, whose comparable bytes would differ).
fn columns_as(b: &RecordBatch, names: &[String], schema: &arrow_schema::Schema, what: &Path) -> Res<Vec<ArrayRef>> {
    names
        .iter()
        .map(|n| {
            let c = b
                .column_by_name(n)
                .ok_or_else(|| format!("{} has no column `{n}` (a merge needs it)", what.display()))?;
            let want = schema.field_with_name(n).map_err(|e| e.to_string())?.data_type();
            if c.data_type() == want {
                Ok(c.clone())
            } else {
                arrow_cast::cast(c, want).map_err(|e| format!("{}: column `{n}` as {want}: {e}", what.display()))
            }
        })
        .collect()
}

/// At the commit of a merge into a Delta table, over the table version whose files are
/// `files` and whose remembered deletes are the file `tombstones` (a path in the table):
/// with `sequence_by`, the run's rows that a table row or a remembered delete of their key
/// outdates are dropped (their staged files rewritten under the staging's
/// `_weir_rewritten` and skipped) and the remembered deletes written anew when the run
/// changes them; then each table file that holds one of the run's remaining keys is
/// rewritten without them under `_weir_rewritten` (made anew on each attempt), for the
/// commit to remove. `schema` is the step's output schema, as decided.
pub(crate) fn fold_table_files(
    staged: &Path,
    table: &Path,
    files: &[crate::io::delta::TableFile],
    tombstones: Option<&str>,
    out: &Output,
    schema: &SchemaRef,
) -> Res<crate::io::delta::MergeFold> {
    let mut touched = load_keys(staged)?;
    let dir = staged.join(crate::io::delta::REWRITTEN);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if let Some(f) = files.iter().find(|f| f.deletion_vector) {
        return Err(format!(
            "the Delta table's file {} has a deletion vector, which weir's merge does not apply yet: \
             compact the table with the writer that made it, or write a new table",
            f.path
        ));
    }
    // a remote table's files are read from copies beside the staging
    let downloads = staged.join(DOWNLOADS);
    let fetch = |p: &str| -> Res<PathBuf> {
        let rel = crate::io::delta::decode_path(p);
        match &out.remote {
            None => Ok(table.join(rel)),
            Some(r) => {
                let local = downloads.join(&rel);
                crate::io::delta::download(r, p, &local)?;
                Ok(local)
            }
        }
    };
    let done_with = |p: &Path| {
        if out.remote.is_some() {
            let _ = std::fs::remove_file(p);
        }
    };
    let mut fold = crate::io::delta::MergeFold::default();
    let (kc, _) = converter(schema, &out.key)?;
    // files whose statistics show they cannot hold a key of the run are passed over
    let firsts = FirstColumn::of(&touched, &kc, &out.key)?;
    let candidates: Vec<&crate::io::delta::TableFile> = files.iter().filter(|f| firsts.may_hold(f)).collect();
    fold.pruned = (files.len() - candidates.len()) as u64;
    fold.files = files.len() as u64;
    // the table files to fold, with their local copy when one was made already
    let mut holding: Vec<(&crate::io::delta::TableFile, Option<PathBuf>)> = Vec::new();
    if let Some(col) = &out.sequence_by {
        let (sc, _) = seq_converter(schema, col)?;
        let mut stale: HashSet<RowBytes> = HashSet::new();
        let mut tomb: HashMap<RowBytes, RowBytes> = HashMap::new();
        if let Some(rel) = tombstones {
            let path = fetch(rel).map_err(|e| format!("the table's remembered deletes {rel} cannot be read: {e}"))?;
            if !path.is_file() {
                return Err(format!(
                    "the table's remembered deletes {rel} are missing (removed by hand?): \
                     without them a replayed change could bring a deleted row back"
                ));
            }
            tomb = read_tombstones(&path, out, col, &kc, &sc)?.into_iter().collect();
            done_with(&path);
            for (k, s) in &tomb {
                if touched.get(k).is_some_and(|m| m.seq.as_deref() <= Some(&s[..])) {
                    stale.insert(k.clone());
                }
            }
        }
        for f in candidates {
            let path = fetch(&f.path)?;
            let mut holds = false;
            each_key_seq(&path, out, col, Some(schema), &kc, &sc, |key, seq| {
                if let Some(m) = touched.get(key) {
                    holds = true;
                    if m.seq.as_deref() < Some(seq) {
                        stale.insert(Box::from(key));
                    }
                }
            })?;
            if holds {
                holding.push((f, Some(path)));
            } else {
                done_with(&path);
            }
        }
        fold.outdated = stale.len() as u64;
        for k in &stale {
            touched.remove(k);
        }
        if !stale.is_empty() {
            fold.skip = drop_run_rows(staged, &dir, &stale, out, schema, &kc)?;
        }
        if apply_deletes(&mut tomb, &touched) {
            let path = dir.join("_tombstones.arrow");
            write_tombstones(&path, &tomb, out, &kc, &sc)?;
            fold.tombstones = Some(path);
        }
    } else {
        holding = candidates.into_iter().map(|f| (f, None)).collect();
    }
    let mut folded = Folded::default();
    for (f, local) in holding {
        let from = match local {
            Some(p) => p,
            None => fetch(&f.path)?,
        };
        let rel = PathBuf::from(crate::io::delta::decode_path(&f.path));
        let name = format!("rw-{:05}.parquet", fold.removes.len());
        let rewritten = fold_published(&from, &dir, &rel, out, &touched, &mut folded, Some(&name), Some(schema))?;
        done_with(&from);
        if rewritten {
            fold.removes.insert(f.path.clone());
        }
    }
    if downloads.exists() {
        let _ = std::fs::remove_dir_all(&downloads);
    }
    fold.replaced = folded.replaced;
    Ok(fold)
}

/// The first column of the run's keys, each value once, sorted, as comparable bytes: a
/// table file whose range of that column holds none of them holds none of the run's keys.
struct FirstColumn {
    /// None: no pruning (the run has a null key).
    conv: Option<RowConverter>,
    data_type: DataType,
    values: Vec<RowBytes>,
}

impl FirstColumn {
    fn of(touched: &Touched, kc: &RowConverter, key: &[String]) -> Res<FirstColumn> {
        key.first().ok_or("a merge without a key")?;
        let parser = kc.parser();
        let columns = kc.convert_rows(touched.keys().map(|k| parser.parse(k))).map_err(|e| e.to_string())?;
        let Some(first) = columns.first() else {
            return Ok(FirstColumn { conv: None, data_type: DataType::Null, values: Vec::new() });
        };
        // the values as decoded (a dictionary column comes back as its values' type)
        let data_type = first.data_type().clone();
        // statistics leave nulls out of a file's range: a null key may be in any file
        if first.null_count() > 0 {
            return Ok(FirstColumn { conv: None, data_type, values: Vec::new() });
        }
        let conv = RowConverter::new(vec![SortField::new(data_type.clone())]).map_err(|e| e.to_string())?;
        let rows = conv.convert_columns(std::slice::from_ref(first)).map_err(|e| e.to_string())?;
        let mut values: Vec<RowBytes> = rows.iter().map(|r| Box::from(r.as_ref())).collect();
        values.sort_unstable();
        values.dedup();
        Ok(FirstColumn { conv: Some(conv), data_type, values })
    }

    /// Whether the file may hold one of the values (yes when its range is unknown or the
    /// run has a null key).
    fn may_hold(&self, f: &crate::io::delta::TableFile) -> bool {
        let (Some(conv), Some((min, max))) = (&self.conv, &f.range) else { return true };
        let bound = |a: &ArrayRef| -> Option<RowBytes> {
            let a =
                if a.data_type() == &self.data_type { a.clone() } else { arrow_cast::cast(a, &self.data_type).ok()? };
            // a bound the cast could not hold is unknown, not the smallest value
            if a.len() != 1 || a.is_null(0) {
                return None;
            }
            let rows = conv.convert_columns(&[a]).ok()?;
            Some(Box::from(rows.row(0).as_ref()))
        };
        let (Some(lo), Some(hi)) = (bound(min), bound(max)) else { return true };
        let at = self.values.partition_point(|v| *v < lo);
        self.values.get(at).is_some_and(|v| *v <= hi)
    }
}

/// The staged files holding rows whose key is in `stale`, rewritten without them under
/// `dir` (as `run-NAME`); returns the staged files (relative) the commit adds instead.
fn drop_run_rows(
    staged: &Path,
    dir: &Path,
    stale: &HashSet<RowBytes>,
    out: &Output,
    schema: &SchemaRef,
    kc: &RowConverter,
) -> Res<HashSet<PathBuf>> {
    let mut skip = HashSet::new();
    for rel in crate::io::sink::parquet_files(staged)? {
        let path = staged.join(&rel);
        let (_, batches) = read(&path, Some(&out.key))?;
        let mut keep = Vec::new();
        for b in &batches {
            let rows = kc.convert_columns(&columns_as(b, &out.key, schema, &path)?).map_err(|e| e.to_string())?;
            keep.extend((0..b.num_rows()).map(|i| !stale.contains(rows.row(i).as_ref())));
        }
        if keep.iter().all(|k| *k) {
            continue;
        }
        let to_dir = dir.join(rel.parent().unwrap_or(Path::new("")));
        std::fs::create_dir_all(&to_dir).map_err(|e| format!("cannot create {}: {e}", to_dir.display()))?;
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        rewrite(&path, &to_dir.join(format!("run-{name}")), &keep, out, None)?;
        skip.insert(rel);
    }
    Ok(skip)
}
