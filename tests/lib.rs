//! Helpers for the end-to-end tests: find the `weir` binary and the built plugins, run
//! pipelines in temporary directories, and read datasets back with the Parquet reader.

use std::path::{Path, PathBuf};
use std::process::Command;

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The `weir` binary of this build (`$WEIR_BIN` overrides). Built by `scripts/test.sh`.
pub fn weir_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEIR_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/weir
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("weir")).expect("target dir");
    assert!(bin.is_file(), "{} not found: build it first (cargo build -p weir), or run scripts/test.sh", bin.display());
    bin
}

/// A built plugin: `dist/plugins/<name>.wasm` (`$WEIR_PLUGIN_DIR` overrides the folder).
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WEIR_PLUGIN_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("dist/plugins"));
    let p = dir.join(format!("{name}.wasm"));
    assert!(p.is_file(), "{} not found: run scripts/build-plugins.sh first", p.display());
    p
}

/// One finished `weir` invocation.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// A `weir` command in `dir`, with the compile cache all tests share.
pub fn weir_command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(weir_bin());
    cmd.args(args).current_dir(dir).env("WEIR_CACHE_DIR", root().join("target").join("weir-test-cache"));
    cmd
}

/// Run `weir` with `args` in `dir` to completion.
pub fn weir(dir: &Path, args: &[&str]) -> Output {
    let out = weir_command(dir, args).output().expect("run weir");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every Parquet file under `dir`, sorted, with its hive `key=value` directories.
pub fn parquet_files(dir: &Path) -> Vec<(PathBuf, Vec<(String, String)>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, d: &Path, out: &mut Vec<(PathBuf, Vec<(String, String)>)>) {
        let Ok(entries) = std::fs::read_dir(d) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let hive = p
                    .strip_prefix(root)
                    .unwrap()
                    .parent()
                    .map(|rel| {
                        rel.components()
                            .filter_map(|c| {
                                c.as_os_str().to_str()?.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((p, hive));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Read one Parquet file.
pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(path).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap().map(|b| b.unwrap()).collect()
}

/// A snapshot of a directory tree: (relative path, bytes) of every file, sorted.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, d: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(d) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push((p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Names in `dir` (not recursive), sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Run `weir` with `args` in `dir` to completion; also returns its peak resident memory in
/// bytes (from the kernel's accounting of that one child process).
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its rusage
pub fn weir_with_peak_rss(dir: &Path, args: &[&str]) -> (Output, u64) {
    use std::io::Read;
    let mut child = weir_command(dir, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run weir");
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let mut stderr = Vec::new();
    let _ = err_pipe.read_to_end(&mut stderr);
    let stdout = out_thread.join().expect("stdout reader");
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills in; the pid is our own child, reaped here.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert!(pid > 0, "wait4 failed: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    let output = Output {
        code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    (output, usage.ru_maxrss as u64 * 1024)
}
