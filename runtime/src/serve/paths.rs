//! Keeping the API inside its roots: no request names, reads or makes a path elsewhere.

use std::path::{Component, Path, PathBuf};

use super::ApiError;
use crate::config::Pipeline;

/// `path` with `.` and `..` taken out lexically (absolute against the first root).
fn normalize(roots: &[PathBuf], path: &Path) -> PathBuf {
    let joined = if path.is_absolute() { path.to_path_buf() } else { roots[0].join(path) };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Where `path` really is: its longest existing ancestor with symbolic links resolved, and
/// the rest as written.
pub fn real(roots: &[PathBuf], path: &Path) -> PathBuf {
    let n = normalize(roots, path);
    let mut base = n.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(base) {
            let rest = n.strip_prefix(base).unwrap_or(Path::new(""));
            return if rest.as_os_str().is_empty() { c } else { c.join(rest) };
        }
        match base.parent() {
            Some(p) => base = p,
            None => return n,
        }
    }
}

/// Whether `path` lies under one of the roots.
pub fn within(roots: &[PathBuf], path: &Path) -> bool {
    let r = real(roots, path);
    roots.iter().any(|root| r.starts_with(root))
}

/// A file a request names: under a root (relative paths against the first), existing.
pub fn resolve(roots: &[PathBuf], file: &Path) -> Result<PathBuf, ApiError> {
    if !within(roots, file) {
        return Err(outside(file));
    }
    std::fs::canonicalize(normalize(roots, file)).map_err(|e| ApiError::new(404, format!("{}: {e}", file.display())))
}

fn outside(path: &Path) -> ApiError {
    ApiError::new(403, format!("{} is outside the server's roots (weir serve --root)", path.display()))
}

/// The fixed part of a source path pattern: up to its first wildcard or `{partition}`.
fn fixed_prefix(pattern: &str) -> &str {
    let cut = pattern.find(['*', '?', '[', '{']).unwrap_or(pattern.len());
    &pattern[..cut]
}

/// Every path the pipeline reads or writes must lie under a root: its sources, plugins,
/// outputs, run store and lineage file.
pub fn check_pipeline(roots: &[PathBuf], p: &Pipeline) -> Result<(), ApiError> {
    let mut used: Vec<(String, PathBuf)> = Vec::new();
    for s in p.sources.values() {
        used.push((format!("source `{}`", s.name), PathBuf::from(fixed_prefix(&s.path))));
    }
    for (name, plugin) in &p.plugins {
        used.push((format!("plugin `{name}`"), plugin.path.clone()));
    }
    for step in &p.steps {
        if let Some(o) = &step.output {
            used.push((format!("the output of step `{}`", step.name), o.path.clone()));
        }
    }
    used.push(("the run store".into(), p.state_path.clone()));
    if let Some(crate::lineage::Config { transport: crate::lineage::Transport::File(f), .. }) = &p.lineage {
        used.push(("the lineage file".into(), f.clone()));
    }
    for (what, path) in used {
        if !within(roots, &path) {
            return Err(ApiError::new(
                403,
                format!(
                    "pipeline `{}`: {what} is {}, outside the server's roots (weir serve --root)",
                    p.name,
                    path.display()
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
        && value != "."
        && value != ".."
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
        assert!(!within(&roots, Path::new("x/../../b")));
        assert!(!within(&roots, Path::new("/etc/passwd")));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&root, root.join("a/up")).unwrap();
            assert!(!within(&roots, Path::new("up/secret")), "a link out of the root is outside");
        }
        assert_eq!(fixed_prefix("in/{partition}/*.csv"), "in/");
        assert!(check_partition("2024-01-03").is_ok());
        assert!(check_partition("2024-01-03T04").is_ok());
        for bad in ["", "..", "../x", "a/b", "a..b", &"x".repeat(200), "a b"] {
            assert_eq!(check_partition(bad).unwrap_err().status, 400, "{bad}");
        }
    }
}
