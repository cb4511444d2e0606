//! Upkeep of the compiled-plugin cache: its size, which entries were used last, pruning.
//!
//! Every plugin version a weir process loads leaves its compiled code in the cache
//! directory (`<sha256>-<engine>.cwasm`, 2-25 MB each). Left alone the directory only
//! grows: a team that rebuilds its plugins daily, or a host that runs many tenants'
//! plugins, fills the disk with code nobody loads any more. The cache therefore keeps to a
//! size limit: when a new entry is written, the entries used longest ago are removed until
//! the cache fits (the new entry always stays). A load from the cache marks its entry as
//! used by setting the file's modification time.
//!
//! Only compiled entries are ever removed: the directory may hold other things (the
//! remembered plugin digests in `digests/`, or whatever else a user keeps beside them).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The cache's size limit when `WEIR_CACHE_MAX_MB` is not set: 2 GiB, room for about a
/// hundred compiled plugins of the sizes weir's own take.
pub const DEFAULT_LIMIT_BYTES: u64 = 2 << 30;

/// The environment variable that sets the limit, in MB (0 keeps only the newest entry).
pub const LIMIT_ENV: &str = "WEIR_CACHE_MAX_MB";

/// The suffix of a compiled entry's file name.
const EXTENSION: &str = "cwasm";

/// A compiled plugin in the cache.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    pub bytes: u64,
    /// When it was last written or loaded.
    pub used: SystemTime,
}

/// The size limit: `WEIR_CACHE_MAX_MB` if it is a whole number of MB, else the default
/// (with the reason when the variable is set but unusable).
pub fn limit_bytes() -> (u64, Option<String>) {
    let Some(v) = std::env::var_os(LIMIT_ENV) else { return (DEFAULT_LIMIT_BYTES, None) };
    match v.to_str().and_then(|t| t.trim().parse::<u64>().ok()) {
        Some(mb) => (mb.saturating_mul(1 << 20), None),
        None => (
            DEFAULT_LIMIT_BYTES,
            Some(format!(
                "{LIMIT_ENV}={v:?} is not a whole number of MB; the cache keeps to {} MB",
                DEFAULT_LIMIT_BYTES >> 20
            )),
        ),
    }
}

/// The compiled entries in `dir`, least recently used first (none if it does not exist).
pub fn entries(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in read {
        let e = e?;
        let path = e.path();
        if path.extension().is_none_or(|x| x != EXTENSION) {
            continue;
        }
        // (an entry another process removed meanwhile is simply not listed)
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        out.push(Entry { path, bytes: meta.len(), used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH) });
    }
    out.sort_by(|a, b| a.used.cmp(&b.used).then_with(|| a.path.cmp(&b.path)));
    Ok(out)
}

/// Note that the entry at `path` was just used (errors are ignored: a read-only cache is
/// still a cache).
pub fn mark_used(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// What a prune or a clear removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub entries: usize,
    pub bytes: u64,
}

/// Remove the least recently used entries of `dir` until it holds at most `limit` bytes,
/// never `keep` (the entry just written). Entries another process removes meanwhile are
/// skipped; an entry that cannot be removed is left for the next prune.
pub fn prune(dir: &Path, limit: u64, keep: &Path) -> std::io::Result<Removed> {
    let all = entries(dir)?;
    let mut total: u64 = all.iter().map(|e| e.bytes).sum();
    let mut removed = Removed::default();
    for e in all {
        if total <= limit {
            break;
        }
        if e.path == keep {
            continue;
        }
        if std::fs::remove_file(&e.path).is_ok() {
            removed.entries += 1;
            removed.bytes += e.bytes;
        }
        total = total.saturating_sub(e.bytes);
    }
    Ok(removed)
}

/// Remove every compiled entry of `dir`.
pub fn clear(dir: &Path) -> std::io::Result<Removed> {
    let mut removed = Removed::default();
    for e in entries(dir)? {
        match std::fs::remove_file(&e.path) {
            Ok(()) => {
                removed.entries += 1;
                removed.bytes += e.bytes;
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(std::io::Error::new(err.kind(), format!("{}: {err}", e.path.display()))),
        }
    }
    Ok(removed)
}
