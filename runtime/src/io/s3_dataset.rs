//! Parquet folders on S3-compatible storage (`path = "s3://bucket/prefix"` without
//! `format = "delta"`). Object storage has no rename, so a folder cannot be switched; a run
//! publishes through a pointer instead:
//!
//! ```text
//!   prefix/data/r<RUN>-<TAG>/...parquet   the run's files, written once, never changed
//!   prefix/_weir/CURRENT.json             the pointer: every file of the dataset now
//! ```
//!
//! After the run's decision its files are uploaded under a prefix of their own, then the
//! pointer is replaced with one conditional PUT (`If-Match` the version read, or
//! `If-None-Match` when there is none), listing the files that make the dataset: the run's,
//! plus the earlier files the mode keeps (`overwrite_partitions` and `--partition` runs keep
//! the partitions the run did not write, `append` keeps all). A reader reads the pointer and
//! then exactly the files it lists: a PUT is atomic, so a reader polling the bucket sees the
//! dataset before a run or after it, never part of it. The pointer also records the last run
//! of each writer (`published`), which is how a run that died after replacing it is
//! recognised by recovery and not published twice. A writer that loses the race to another
//! reads the pointer again and retries.
//!
//! Files no pointer lists any more (replaced runs, uploads of a run that died before its
//! pointer) stay in the bucket until [`vacuum`] (`weir table vacuum s3://...`) removes them.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use delta_kernel::object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::delta::Mode;
use super::remote::{block_on, object_path, s3_store};
use crate::config::Remote;

type Res<T> = Result<T, String>;

/// Where the pointer lives, under the dataset's prefix.
pub const POINTER: &str = "_weir/CURRENT.json";

/// What a decided publish needs (it travels as the switch's token; nothing secret in it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PublishSpec {
    pub remote: Remote,
    /// `weir/PIPELINE/STEP[/PARTITION]`: the writer, as the pointer records it.
    pub writer: String,
    pub run: i64,
    /// Overwrite, overwrite_partitions or append.
    pub mode: Mode,
    pub partition_by: Option<String>,
}

/// The pointer's content.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Pointer {
    /// The files of the dataset, relative to its prefix.
    pub files: Vec<PointerFile>,
    /// The last run each writer published.
    pub published: BTreeMap<String, i64>,
    /// The run that wrote this pointer, and when (ms since 1970).
    pub run: i64,
    pub written_ms: i64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PointerFile {
    pub path: String,
    /// The file's partition folder (`day=2024-01-03`), if the dataset is partitioned.
    pub partition: Option<String>,
    pub size: u64,
}

/// The pointer now and the version to replace it on (none: no pointer yet).
fn read_pointer(r: &Remote, url: &url::Url) -> Res<Option<(Pointer, UpdateVersion)>> {
    let store = s3_store(r)?;
    let at = object_path(url, POINTER)?;
    let name = format!("{}{POINTER}", r.url);
    block_on(Box::pin(async move {
        let got = match store.get(&at).await {
            Ok(g) => g,
            Err(delta_kernel::object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(format!("cannot read {name}: {e}")),
        };
        let version = UpdateVersion { e_tag: got.meta.e_tag.clone(), version: got.meta.version.clone() };
        let bytes = got.bytes().await.map_err(|e| format!("cannot read {name}: {e}"))?;
        let p: Pointer = serde_json::from_slice(&bytes).map_err(|e| format!("{name} is not weir's pointer: {e}"))?;
        Ok(Some((p, version)))
    }))?
}

/// The dataset's pointer, for readers and the tests (none: nothing published yet).
pub fn pointer(r: &Remote) -> Res<Option<Pointer>> {
    let url = url::Url::parse(&r.url).map_err(|e| format!("{}: {e}", r.url))?;
    Ok(read_pointer(r, &url)?.map(|(p, _)| p))
}

/// Whether `spec`'s run is published (whoever published it).
pub fn made(spec: &PublishSpec) -> Res<bool> {
    Ok(pointer(&spec.remote)?.is_some_and(|p| p.published.get(&spec.writer).is_some_and(|v| *v >= spec.run)))
}

/// Publish a run's staged files: upload them under the run's own prefix, then replace the
/// pointer (conditionally, retried when another writer replaced it first). Returns whether
/// this call published it (false: it had been).
pub fn publish(staged: &Path, spec: &PublishSpec) -> Res<bool> {
    let url = url::Url::parse(&spec.remote.url).map_err(|e| format!("{}: {e}", spec.remote.url))?;
    let tag = super::remote::writer_tag(&spec.writer);
    // (local file, key under the folder, partition folder)
    let mut placed: Vec<(std::path::PathBuf, String, Option<String>)> = Vec::new();
    for rel in super::sink::parquet_files(staged)? {
        let rel_s = rel.to_string_lossy().replace('\\', "/");
        let partition = rel_s.rsplit_once('/').map(|(d, _)| d.to_string());
        placed.push((staged.join(&rel), format!("data/r{}-{tag}/{rel_s}", spec.run), partition));
    }
    let written: HashSet<Option<String>> = placed.iter().map(|p| p.2.clone()).collect();
    let uploads: Vec<(std::path::PathBuf, String)> = placed.iter().map(|(f, k, _)| (f.clone(), k.clone())).collect();
    for _attempt in 0..10 {
        let current = read_pointer(&spec.remote, &url)?;
        if let Some((p, _)) = &current {
            if p.published.get(&spec.writer).is_some_and(|v| *v >= spec.run) {
                return Ok(false);
            }
        }
        super::remote::upload(&spec.remote, &uploads)?;
        let (old, version) = match current {
            Some((p, v)) => (p, Some(v)),
            None => (Pointer::default(), None),
        };
        let mut files: Vec<PointerFile> = old
            .files
            .into_iter()
            .filter(|f| match spec.mode {
                Mode::Append => true,
                // (a merge is refused when the run is planned)
                Mode::Overwrite | Mode::Merge => false,
                Mode::OverwritePartitions => !written.contains(&f.partition),
            })
            .collect();
        for (local, key, partition) in &placed {
            let size = std::fs::metadata(local).map(|m| m.len()).unwrap_or(0);
            files.push(PointerFile { path: key.clone(), partition: partition.clone(), size });
        }
        let mut published = old.published;
        published.insert(spec.writer.clone(), spec.run);
        let written_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let next = Pointer { files, published, run: spec.run, written_ms };
        let body = serde_json::to_vec_pretty(&next).map_err(|e| e.to_string())?;
        let store = s3_store(&spec.remote)?;
        let at = object_path(&url, POINTER)?;
        let name = format!("{}{POINTER}", spec.remote.url);
        let put = block_on(Box::pin(async move {
            let mode = match version {
                Some(v) => PutMode::Update(v),
                None => PutMode::Create,
            };
            match store.put_opts(&at, PutPayload::from(body), PutOptions { mode, ..Default::default() }).await {
                Ok(_) => Ok(true),
                // another writer replaced it first: read it again
                Err(
                    delta_kernel::object_store::Error::Precondition { .. }
                    | delta_kernel::object_store::Error::AlreadyExists { .. },
                ) => Ok(false),
                Err(e) => Err(format!("cannot write {name}: {e}")),
            }
        }))??;
        if put {
            return Ok(true);
        }
    }
    Err(format!(
        "another writer replaced {}{POINTER} 10 times while this run tried to; nothing of this run was published, rerun it",
        spec.remote.url
    ))
}

/// Copy a source's matching objects from the bucket to its local copy before a run reads
/// them: new and changed objects (by size and time) are downloaded (through a temporary
/// name), unchanged ones kept, and copies of objects no longer there removed. A key pattern
/// is a key, a prefix ending in `/` (everything under it), or a glob; `{partition}` is the
/// run's partition, or any when the run has none. The copies keep the objects' times, so
/// the run's fingerprint and `incremental = { modified = true }` see what changed.
pub fn sync_source(files: &crate::config::RemoteFiles, partition: Option<&str>) -> Res<usize> {
    let pattern = files.pattern.replace("{partition}", partition.unwrap_or("*"));
    let literal = pattern.find(['*', '?', '[']).map(|i| &pattern[..i]).unwrap_or(&pattern);
    let prefix = literal.rsplit_once('/').map(|(d, _)| format!("{d}/")).unwrap_or_default();
    let glob = if pattern.contains(['*', '?', '[']) {
        Some(glob::Pattern::new(&pattern).map_err(|e| format!("{}{pattern}: {e}", files.store.url))?)
    } else {
        None
    };
    let listed = super::remote::list(&files.store, &prefix)?;
    let wanted: Vec<_> = listed
        .into_iter()
        .filter(|m| {
            let key = m.location.as_ref();
            match &glob {
                Some(g) => g.matches(key),
                None => key == pattern || (pattern.ends_with('/') && key.starts_with(&pattern)),
            }
        })
        .collect();
    let mut present = HashSet::new();
    let mut fetched = 0;
    for m in &wanted {
        let key = m.location.as_ref().to_string();
        let local = files.cache.join(&key);
        present.insert(local.clone());
        let when =
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(m.last_modified.timestamp_millis().max(0) as u64);
        let same = std::fs::metadata(&local).is_ok_and(|l| l.len() == m.size && l.modified().ok() == Some(when));
        if same {
            continue;
        }
        let tmp = local.with_file_name(format!(
            ".{}.weir-download",
            local.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        super::remote::download(&files.store, &key, &tmp)?;
        let f = std::fs::File::options().write(true).open(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.set_modified(when).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &local).map_err(|e| format!("cannot write {}: {e}", local.display()))?;
        fetched += 1;
    }
    // copies of objects that are gone (under the pattern's folder only)
    let folder = files.cache.join(&prefix);
    remove_stale(&folder, glob.as_ref(), &files.cache, &present, &pattern);
    Ok(fetched)
}

/// Remove the local copies under `folder` that match the pattern but whose object is gone.
fn remove_stale(
    folder: &Path,
    glob: Option<&glob::Pattern>,
    cache: &Path,
    present: &HashSet<std::path::PathBuf>,
    pattern: &str,
) {
    let Ok(entries) = std::fs::read_dir(folder) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_stale(&p, glob, cache, present, pattern);
            continue;
        }
        let key = p.strip_prefix(cache).map(|k| k.to_string_lossy().replace('\\', "/")).unwrap_or_default();
        let matches = match glob {
            Some(g) => g.matches(&key),
            None => key == pattern || (pattern.ends_with('/') && key.starts_with(pattern)),
        };
        if matches && !present.contains(&p) {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Remove the objects under a folder's `data/` that its pointer no longer lists (files of
/// replaced runs, uploads of a run that died before its pointer), once older than
/// `retention`. A reader holding an older pointer may still be reading them: the retention
/// is how long a read may take.
pub fn vacuum(r: &Remote, retention: std::time::Duration, dry_run: bool) -> Res<super::delta::Vacuumed> {
    let Some(p) = pointer(r)? else {
        return Err(format!("{} has no {POINTER}: not a Parquet folder weir published", r.url));
    };
    let listed: HashSet<String> = p.files.iter().map(|f| f.path.clone()).collect();
    let url = url::Url::parse(&r.url).map_err(|e| format!("{}: {e}", r.url))?;
    let base = object_path(&url, "")?.as_ref().to_string();
    let objects = super::remote::list(r, "data/")?;
    let now = std::time::SystemTime::now();
    let mut out = super::delta::Vacuumed::default();
    let mut doomed = Vec::new();
    for m in objects {
        let key = m.location.as_ref();
        let rel = key.strip_prefix(&base).unwrap_or(key).trim_start_matches('/').to_string();
        if listed.contains(&rel) {
            continue;
        }
        let at =
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(m.last_modified.timestamp_millis().max(0) as u64);
        if now.duration_since(at).unwrap_or_default() < retention {
            out.kept_young += 1;
            continue;
        }
        out.bytes += m.size;
        out.removed.push(rel);
        doomed.push(m.location);
    }
    out.removed.sort();
    if !dry_run && !doomed.is_empty() {
        let store = s3_store(r)?;
        let name = r.url.clone();
        block_on(Box::pin(async move {
            for at in doomed {
                store.delete(&at).await.map_err(|e| format!("cannot remove {name}{}: {e}", at.as_ref()))?;
            }
            Ok::<(), String>(())
        }))??;
    }
    Ok(out)
}
