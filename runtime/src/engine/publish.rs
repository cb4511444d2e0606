//! Publishing staged output: renames, so a reader never sees a half-written file.
//!
//! A full run replaces the dataset directory; a run with `--partition` on a partitioned
//! output replaces only the partition directories it wrote. Each replacement moves the old
//! directory aside, moves the new one in, then deletes the old one. (The moment between the
//! two renames is not yet atomic for readers: the reliable-runs work swaps with
//! `renameat2(RENAME_EXCHANGE)` instead.)

use std::path::{Path, PathBuf};

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn replace_dir(new: &Path, target: &Path) -> Result<(), String> {
    let parent = target
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = parent.join(format!(".{name}.weir-old-{}", std::process::id()));
    let had_old = target.exists();
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(target, &old).map_err(|e| format!("cannot move {} aside: {e}", target.display()))?;
    }
    if let Err(e) = std::fs::rename(new, target) {
        if had_old {
            let _ = std::fs::rename(&old, target);
        }
        return Err(format!("cannot move {} to {}: {e}", new.display(), target.display()));
    }
    sync_dir(&parent);
    if had_old {
        std::fs::remove_dir_all(&old)
            .map_err(|e| format!("published, but cannot remove the old copy {}: {e}", old.display()))?;
    }
    Ok(())
}

/// Publish `staging` as `target`. Returns the partition directories published.
pub fn publish_output(
    staging: &Path,
    target: &Path,
    partitioned: bool,
    partial_run: bool,
    partitions: &[String],
) -> Result<Vec<String>, String> {
    if partitioned && partial_run {
        std::fs::create_dir_all(target).map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        for p in partitions {
            replace_dir(&staging.join(p), &target.join(p))?;
        }
        let _ = std::fs::remove_dir_all(staging);
        sync_dir(target);
        return Ok(partitions.to_vec());
    }
    replace_dir(staging, target)?;
    Ok(partitions.to_vec())
}
