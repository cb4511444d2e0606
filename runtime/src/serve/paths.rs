//! Keeping the API inside its roots: no request names, reads or makes a path elsewhere.
//!
//! A path is inside when, with every symbolic link of its existing part resolved, it lies
//! under a root. Paths of served pipelines may not hold `..` (after a wildcard or
//! `{partition}` it could not be judged before the glob expands), and a dangling symbolic
//! link counts as outside (what it will point to is not known).

use std::path::{Component, Path, PathBuf};

use super::ApiError;
use crate::config::Pipeline;

/// The largest pipeline file the server reads.
const MAX_PIPELINE_FILE: u64 = 1 << 20;

/// Where `path` really is (relative paths against the first root): its longest existing
/// ancestor with symbolic links resolved, then the rest as written. None when it cannot be
/// judged: it holds `..`, or a dangling symbolic link.
pub fn real(roots: &[PathBuf], path: &Path) -> Option<PathBuf> {
    if path.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    let n = if path.is_absolute() { path.to_path_buf() } else { roots[0].join(path) };
    let mut base = n.as_path();
    loop {
        match std::fs::canonicalize(base) {
            Ok(c) => {
                let rest = n.strip_prefix(base).unwrap_or(Path::new(""));
                return Some(if rest.as_os_str().is_empty() { c } else { c.join(rest) });
            }
            // a link to nothing: where it would write is decided later, by whoever creates
            // its target
            Err(_) if std::fs::symlink_metadata(base).is_ok() => return None,
            Err(_) => base = base.parent()?,
        }
    }
}

/// Whether `path` lies under one of the roots.
pub fn within(roots: &[PathBuf], path: &Path) -> bool {
    real(roots, path).is_some_and(|r| roots.iter().any(|root| r.starts_with(root)))
}

/// Whether `path` and its parent directory lie under a root: an output's staging and
/// quarantine folders are made beside it.
fn below(roots: &[PathBuf], path: &Path) -> bool {
    let abs = if path.is_absolute() { path.to_path_buf() } else { roots[0].join(path) };
    within(roots, &abs) && abs.parent().is_some_and(|p| within(roots, p))
}

/// A pipeline file a request names: a regular file under a root (relative paths against
/// the first), of at most 1 MiB.
pub fn resolve(roots: &[PathBuf], file: &Path) -> Result<PathBuf, ApiError> {
    if !within(roots, file) {
        return Err(outside(file));
    }
    let abs = if file.is_absolute() { file.to_path_buf() } else { roots[0].join(file) };
    let real = std::fs::canonicalize(&abs).map_err(|e| ApiError::new(404, format!("{}: {e}", file.display())))?;
    let meta = std::fs::metadata(&real).map_err(|e| ApiError::new(404, format!("{}: {e}", file.display())))?;
    if !meta.is_file() {
        return Err(ApiError::new(422, format!("{} is not a regular file", file.display())));
    }
    if meta.len() > MAX_PIPELINE_FILE {
        return Err(ApiError::new(422, format!("{} is larger than a pipeline file may be (1 MiB)", file.display())));
    }
    Ok(real)
}

fn outside(path: &Path) -> ApiError {
    ApiError::new(
        403,
        format!(
            "{} is outside the server's roots (weir serve --root), or cannot be judged (`..`, a dangling link)",
            path.display()
        ),
    )
}

/// The fixed part of a source path pattern: up to its first wildcard or `{partition}`.
fn fixed_prefix(pattern: &str) -> &str {
    let cut = pattern.find(['*', '?', '[', '{']).unwrap_or(pattern.len());
    &pattern[..cut]
}

/// Every path the pipeline reads or writes must lie under a root: its sources, plugins,
/// secret files, relationship targets, outputs (and the folders beside them), run store
/// and lineage file; and none may be one of the server's own files (`protected`).
pub fn check_pipeline(roots: &[PathBuf], protected: &[PathBuf], p: &Pipeline) -> Result<(), ApiError> {
    let mut read: Vec<(String, PathBuf)> = Vec::new();
    let mut written: Vec<(String, PathBuf)> = Vec::new();
    for s in p.sources.values().filter(|s| s.reads_files()) {
        if Path::new(&s.path).components().any(|c| c == Component::ParentDir) {
            return Err(ApiError::new(
                403,
                format!("pipeline `{}`: source `{}` has `..` in its path; a served pipeline may not", p.name, s.name),
            ));
        }
        read.push((format!("source `{}`", s.name), PathBuf::from(fixed_prefix(&s.path))));
    }
    for s in p.sources.values() {
        if let Some(crate::config::Postgres { url: crate::config::SecretRef::File(f), .. }) = &s.postgres {
            read.push((format!("the url file of source `{}`", s.name), f.clone()));
        }
    }
    for (name, plugin) in &p.plugins {
        read.push((format!("plugin `{name}`"), plugin.path.clone()));
        for f in &plugin.files {
            read.push((format!("a folder granted to plugin `{name}`"), f.host.clone()));
        }
    }
    for (name, secret) in &p.secrets {
        if let crate::config::SecretRef::File(f) = secret {
            read.push((format!("secret `{name}`"), f.clone()));
        }
    }
    for step in &p.steps {
        for c in &step.checks {
            if let crate::quality::Kind::Relationships { target: crate::quality::RelTarget::Path(t), .. } = &c.kind {
                read.push((format!("a relationships check of step `{}`", step.name), t.clone()));
            }
        }
        if let Some(o) = &step.output {
            written.push((format!("the output of step `{}`", step.name), o.path.clone()));
        }
    }
    written.push(("the run store".into(), p.state_path.clone()));
    if let Some(crate::lineage::Config { transport: crate::lineage::Transport::File(f), .. }) = &p.lineage {
        written.push(("the lineage file".into(), f.clone()));
    }
    let refuse = |what: &str, path: &Path, why: &str| {
        Err(ApiError::new(403, format!("pipeline `{}`: {what} is {}, {why}", p.name, path.display())))
    };
    for (what, path) in &read {
        if !within(roots, path) {
            return refuse(what, path, "outside the server's roots (weir serve --root)");
        }
    }
    for (what, path) in &written {
        if !below(roots, path) {
            return refuse(what, path, "not inside the server's roots (weir serve --root; outputs go below a root)");
        }
    }
    for (what, path) in read.iter().chain(&written) {
        let Some(real) = real(roots, path) else { continue };
        if protected.iter().any(|f| real.starts_with(f) || f.starts_with(&real)) {
            return refuse(what, path, "one of the server's own files");
        }
    }
    Ok(())
}

/// The files a run of `partition` would read: each must be under a root (a file inside
/// may be a link out).
pub fn check_inputs(roots: &[PathBuf], p: &Pipeline, partition: Option<&str>) -> Result<(), ApiError> {
    for s in p.sources.values().filter(|s| s.reads_files()) {
        // a source whose files are not there yet fails the run as it would from the CLI
        let Ok(files) = crate::io::source::expand_paths(&s.path, partition, s.format) else { continue };
        if let Some(f) = files.iter().find(|f| !within(roots, f)) {
            let to = std::fs::canonicalize(f).map(|t| format!(" (it leads to {})", t.display())).unwrap_or_default();
            return Err(ApiError::new(
                403,
                format!(
                    "pipeline `{}`: source `{}` reads {}{to}, outside the server's roots",
                    p.name,
                    s.name,
                    f.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A partition value from a request: it is put into source paths, so it cannot be a path.
pub fn check_partition(value: &str) -> Result<(), ApiError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && !value.contains("..")
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '=' | '+'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            400,
            format!(
                "partition `{}`: a partition is 1 to 128 letters, digits and - _ . : = + (no `..`, no `/`)",
                value.chars().take(140).collect::<String>()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        let roots = vec![root.join("a")];
        assert!(within(&roots, Path::new("x/y.csv")));
        assert!(within(&roots, &root.join("a/new/dir")));
        assert!(!within(&roots, Path::new("../b")));
        assert!(!within(&roots, Path::new("x/../../b")), "`..` cannot be judged");
        assert!(!within(&roots, Path::new("/etc/passwd")));
        assert!(!below(&roots, &root.join("a")), "a root itself: its staging would be outside");
        assert!(below(&roots, &root.join("a/out")));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&root, root.join("a/up")).unwrap();
            assert!(!within(&roots, Path::new("up/secret")), "a link out of the root is outside");
            std::os::unix::fs::symlink(root.join("nothing/yet"), root.join("a/dangling")).unwrap();
            assert!(!within(&roots, Path::new("dangling")), "a dangling link is outside");
            assert!(!within(&roots, Path::new("dangling/x")));
        }
        assert_eq!(fixed_prefix("in/{partition}/*.csv"), "in/");
        assert!(check_partition("2024-01-03").is_ok());
        assert!(check_partition("2024-01-03T04").is_ok());
        for bad in ["", "..", "../x", "a/b", "a..b", &"x".repeat(200), "a b"] {
            assert_eq!(check_partition(bad).unwrap_err().status, 400, "{bad}");
        }
        std::fs::write(root.join("a/big.toml"), vec![b'#'; 2 << 20]).unwrap();
        assert_eq!(resolve(&roots, Path::new("big.toml")).unwrap_err().status, 422);
        assert_eq!(resolve(&roots, Path::new("new")).unwrap_err().status, 404);
    }
}
