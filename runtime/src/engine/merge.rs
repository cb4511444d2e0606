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
use arrow_row::{OwnedRow, RowConverter, SortField};
use arrow_schema::{DataType, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};

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
}

type Res<T> = Result<T, String>;

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
            let keys = reduce_run_rows(staged, out, &mut folded)?;
            for rel in &published {
                fold_published(&target.join(rel), staged, rel, out, &keys, &mut folded)?;
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

/// Keep each key's last row of the run (markers dropped); returns every key the run
/// touched, which published rows lose.
fn reduce_run_rows(staged: &Path, out: &Output, folded: &mut Folded) -> Res<HashSet<Box<[u8]>>> {
    let files = crate::io::sink::parquet_files(staged)?;
    // pass 1: where each key's last row is
    let mut last: HashMap<OwnedRow, (u64, usize, usize, bool)> = HashMap::new();
    let mut conv: Option<(RowConverter, Vec<usize>)> = None;
    // pass 1 reads only the key, the row numbers and the delete marker
    let mut needed: Vec<String> = out.key.clone();
    needed.push(SEQ.to_string());
    needed.extend(out.delete_when.iter().map(|(c, _)| c.clone()));
    for (fi, rel) in files.iter().enumerate() {
        let (schema, batches) = read(&staged.join(rel), Some(&needed))?;
        if conv.is_none() {
            conv = Some(converter(&schema, &out.key)?);
        }
        let (c, idx) = conv.as_ref().expect("set above");
        let seq_at = schema.index_of(SEQ).map_err(|_| format!("{} lacks its row numbers", rel.display()))?;
        let mut row = 0;
        for b in &batches {
            let cols: Vec<ArrayRef> = idx.iter().map(|&i| b.column(i).clone()).collect();
            let rows = c.convert_columns(&cols).map_err(|e| e.to_string())?;
            let marks = delete_marks(b, out)?;
            let seq = b.column(seq_at).as_any().downcast_ref::<arrow_array::UInt64Array>().ok_or("bad row numbers")?;
            for i in 0..b.num_rows() {
                let deleting = marks.as_ref().is_some_and(|m| m[i]);
                let this = (seq.value(i), fi, row + i, deleting);
                match last.entry(rows.row(i).owned()) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(this);
                    }
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        folded.superseded += 1;
                        if o.get().0 < this.0 {
                            o.insert(this);
                        }
                    }
                }
            }
            row += b.num_rows();
        }
    }
    // pass 2: rewrite the files holding rows that are not their key's last, or markers
    let mut per_file: HashMap<usize, Vec<(usize, bool)>> = HashMap::new();
    for (_, fi, r, del) in last.values() {
        per_file.entry(*fi).or_default().push((*r, *del));
    }
    for (fi, rel) in files.iter().enumerate() {
        let keep_rows = per_file.remove(&fi).unwrap_or_default();
        let (schema, batches) = read(&staged.join(rel), None)?;
        let total: usize = batches.iter().map(|b| b.num_rows()).sum();
        let mut keep = vec![false; total];
        let mut markers = 0;
        for (r, del) in keep_rows {
            if del {
                markers += 1;
            } else {
                keep[r] = true;
            }
        }
        folded.deleted += markers;
        // every staged file is written again, without its row numbers
        let seq_at = schema.index_of(SEQ).map_err(|e| e.to_string())?;
        let mut fields: Vec<arrow_schema::FieldRef> = schema.fields().iter().cloned().collect();
        fields.remove(seq_at);
        let plain = Arc::new(arrow_schema::Schema::new_with_metadata(fields, schema.metadata().clone()));
        let batches: Vec<RecordBatch> = batches
            .iter()
            .map(|b| {
                let mut cols = b.columns().to_vec();
                cols.remove(seq_at);
                RecordBatch::try_new(plain.clone(), cols).map_err(|e| e.to_string())
            })
            .collect::<Res<_>>()?;
        rewrite(&staged.join(rel), &staged.join(rel), plain, &batches, &keep, out)?;
    }
    // as bytes, so published rows are looked up without a copy each
    Ok(last.into_keys().map(|k| Box::from(k.row().as_ref())).collect())
}

/// Write `batches` without the rows `keep` drops to `to` (through a temporary file); no
/// file when no row is left.
fn rewrite(from: &Path, to: &Path, schema: SchemaRef, batches: &[RecordBatch], keep: &[bool], out: &Output) -> Res<()> {
    let dir = to.parent().ok_or("no folder")?;
    let tmp = dir.join(format!(".merge-{}.tmp", std::process::id()));
    let kept = keep.iter().filter(|k| **k).count();
    if kept > 0 {
        let f = File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        let props = crate::io::sink::writer_properties(out);
        let mut w = ArrowWriter::try_new(f, schema, Some(props)).map_err(|e| e.to_string())?;
        let mut at = 0;
        for b in batches {
            let mask = BooleanArray::from(keep[at..at + b.num_rows()].to_vec());
            at += b.num_rows();
            let part = arrow_select::filter::filter_record_batch(b, &mask).map_err(|e| e.to_string())?;
            if part.num_rows() > 0 {
                w.write(&part).map_err(|e| e.to_string())?;
            }
        }
        let f = w.into_inner().map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| format!("cannot sync {}: {e}", tmp.display()))?;
    }
    if from == to {
        std::fs::remove_file(from).map_err(|e| format!("cannot replace {}: {e}", from.display()))?;
    }
    if kept > 0 {
        std::fs::rename(&tmp, to).map_err(|e| format!("cannot write {}: {e}", to.display()))?;
    }
    Ok(())
}

/// One published file into the staging: linked when it holds none of the run's keys,
/// else rewritten without them.
fn fold_published(
    from: &Path,
    staged: &Path,
    rel: &Path,
    out: &Output,
    keys: &HashSet<Box<[u8]>>,
    folded: &mut Folded,
) -> Res<()> {
    let (kschema, kbatches) = read(from, Some(&out.key))?;
    let (c, _) = converter(&kschema, &out.key)?;
    let mut keep = Vec::new();
    for b in &kbatches {
        let rows = c.convert_columns(b.columns()).map_err(|e| e.to_string())?;
        keep.extend((0..b.num_rows()).map(|i| !keys.contains(rows.row(i).as_ref())));
    }
    let dropped = keep.iter().filter(|k| !**k).count() as u64;
    if dropped == 0 {
        folded.linked += 1;
        return link(from, staged, rel);
    }
    folded.replaced += dropped;
    folded.rewritten += 1;
    let (schema, batches) = read(from, None)?;
    let dir = staged.join(rel.parent().unwrap_or(Path::new("")));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let to = free_name(&dir, &name);
    rewrite(from, &to, schema, &batches, &keep, out)
}
