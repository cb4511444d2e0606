//! Publishing staged output with one atomic switch per dataset or partition.
//!
//! ```text
//!   staging (complete, fsync'd)      target (what readers see)
//!        .x.weir-staging-7/   <══ renameat2(RENAME_EXCHANGE) ══>   x/
//!   afterwards the staging path holds the old data, which is then removed
//! ```
//!
//! A reader opening `x/...` sees either the old directory or the new one, never a mix and
//! never nothing. A run without `--partition` switches each dataset whole; a run with
//! `--partition` on a partitioned output switches each partition directory it wrote. If the
//! process dies after a switch but before the old data is removed, the old data sits at the
//! run's staging path, which crash recovery removes.
//!
//! On a filesystem without `RENAME_EXCHANGE` the switch falls back to two renames (the old
//! directory moved aside, then the new one in) and says so in the log.

use std::path::{Path, PathBuf};

/// What one switch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    Created,
    Replaced,
}

impl Switch {
    pub fn as_str(self) -> &'static str {
        match self {
            Switch::Created => "created",
            Switch::Replaced => "replaced",
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Atomically exchange two paths (both must exist).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both paths are valid NUL-terminated strings for the duration of the call.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Put the complete directory `new` at `target`, atomically. `new` is gone afterwards.
pub fn switch_dir(new: &Path, target: &Path, log: &dyn Fn(&str)) -> Result<Switch, String> {
    let parent = target.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    sync_dir(new);
    if !target.exists() {
        std::fs::rename(new, target)
            .map_err(|e| format!("cannot move {} to {}: {e}", new.display(), target.display()))?;
        sync_dir(&parent);
        return Ok(Switch::Created);
    }
    match exchange(new, target) {
        Ok(()) => {
            sync_dir(&parent);
            // `new` now holds the previous data
            std::fs::remove_dir_all(new)
                .map_err(|e| format!("published, but cannot remove the old copy at {}: {e}", new.display()))?;
        }
        Err(e) => {
            log(&format!(
                "weir: warning: atomic exchange unavailable on this filesystem ({e}); publishing {} with two renames",
                target.display()
            ));
            let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let old = parent.join(format!(".{name}.weir-old-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(target, &old).map_err(|e| format!("cannot move {} aside: {e}", target.display()))?;
            if let Err(e) = std::fs::rename(new, target) {
                let _ = std::fs::rename(&old, target);
                return Err(format!("cannot move {} to {}: {e}", new.display(), target.display()));
            }
            sync_dir(&parent);
            let _ = std::fs::remove_dir_all(&old);
        }
    }
    Ok(Switch::Replaced)
}

/// One switch the publish made, reported as it happens.
pub struct Published<'a> {
    pub target: &'a Path,
    pub partition: Option<&'a str>,
    pub switch: Switch,
}

/// Publish `staging` as `target`: whole, or partition by partition for a partitioned output
/// in a partition run. `after` is called after each switch (to record it) and may stop the
/// publish by returning an error.
pub fn publish_output(
    staging: &Path,
    target: &Path,
    by_partition: bool,
    partitions: &[String],
    log: &dyn Fn(&str),
    after: &mut dyn FnMut(Published<'_>) -> Result<(), String>,
) -> Result<(), String> {
    if by_partition {
        std::fs::create_dir_all(target).map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        for p in partitions {
            let switch = switch_dir(&staging.join(p), &target.join(p), log)?;
            after(Published { target: &target.join(p), partition: Some(p), switch })?;
        }
        let _ = std::fs::remove_dir_all(staging);
        return Ok(());
    }
    let switch = switch_dir(staging, target, log)?;
    after(Published { target, partition: None, switch })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_creates_then_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("ds");
        for (i, content) in ["v1", "v2", "v3"].iter().enumerate() {
            let new = dir.path().join(format!(".ds.staging-{i}"));
            std::fs::create_dir_all(&new).unwrap();
            std::fs::write(new.join("part.txt"), content).unwrap();
            let s = switch_dir(&new, &target, &|_| {}).unwrap();
            assert_eq!(s, if i == 0 { Switch::Created } else { Switch::Replaced });
            assert_eq!(std::fs::read_to_string(target.join("part.txt")).unwrap(), *content);
            assert!(!new.exists(), "the old copy is removed");
        }
        let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        names.sort();
        assert_eq!(names, ["ds"]);
    }
}
