//! What the host lends a plugin: logging, counters and column hashing at native speed.
//!
//! Inside a component these call the `weir:plugin/host` imports. In a native `cargo test`
//! they go to the [`crate::testing`] harness, which keeps logs and counters for assertions
//! and hashes with the same code the host uses.

use arrow_array::{Array, StringArray};
use arrow_buffer::{Buffer, OffsetBuffer, ScalarBuffer};

use crate::error::{Error, Result};

/// Log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// How [`hash_strings`] hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashAlgorithm {
    /// Plain SHA-256.
    Sha256,
    /// HMAC-SHA256 keyed with the named secret (granted to the plugin in the pipeline file).
    HmacSha256(String),
}

/// Write a line to the run log.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// Add `delta` to a named counter, summed per step in the run summary.
pub fn counter_add(name: &str, delta: i64) {
    imp::counter_add(name, delta)
}

/// The counter name the SDK uses to mark where a call is (entry, input decoded, output
/// computed, exit); the host turns the marks into its time split and does not report them
/// as counters. Reserved: a plugin's own counters must not use it.
pub const PHASE_COUNTER: &str = "weir.phase";

/// Phases of one `process` / `finish` call, as [`phase`] marks them.
#[doc(hidden)]
pub mod phases {
    pub const ENTERED: i64 = 0;
    pub const DECODED: i64 = 1;
    pub const COMPUTED: i64 = 2;
    pub const LEAVING: i64 = 3;
}

/// Mark a phase of the current call for the host's time split (a no-op natively).
#[doc(hidden)]
pub fn phase(p: i64) {
    #[cfg(target_arch = "wasm32")]
    imp::counter_add(PHASE_COUNTER, p);
    #[cfg(not(target_arch = "wasm32"))]
    let _ = p;
}

/// Hash every value of a string column in the host; returns lowercase hex digests
/// (64 characters), nulls kept as nulls.
pub fn hash_strings(algorithm: &HashAlgorithm, column: &StringArray) -> Result<StringArray> {
    let offsets: &[i32] = column.value_offsets();
    // Arrow offsets are non-negative i32; the contract carries them as u32.
    let offsets_u32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    let hex = imp::hash_strings(algorithm, &offsets_u32, column.value_data())
        .map_err(|e| Error::internal(format!("host hashing failed: {e}")))?;
    let n = column.len();
    if hex.len() != n * 64 {
        return Err(Error::internal(format!("host hashing returned {} bytes for {n} values", hex.len())));
    }
    let offsets = OffsetBuffer::new(ScalarBuffer::from_iter((0..=n).map(|i| (i * 64) as i32)));
    StringArray::try_new(offsets, Buffer::from_vec(hex), column.nulls().cloned())
        .map_err(|e| Error::internal(format!("host hashing returned bad text: {e}")))
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::{HashAlgorithm, Level};
    use crate::__bindings::weir::plugin::host as h;

    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => h::Level::Trace,
            Level::Debug => h::Level::Debug,
            Level::Info => h::Level::Info,
            Level::Warn => h::Level::Warn,
            Level::Error => h::Level::Error,
        };
        h::log(level, message)
    }

    pub fn counter_add(name: &str, delta: i64) {
        h::counter_add(name, delta)
    }

    pub fn hash_strings(alg: &HashAlgorithm, offsets: &[u32], data: &[u8]) -> Result<Vec<u8>, String> {
        let alg = match alg {
            HashAlgorithm::Sha256 => h::HashAlgorithm::Sha256,
            HashAlgorithm::HmacSha256(s) => h::HashAlgorithm::HmacSha256(s.clone()),
        };
        h::hash_strings(&alg, offsets, data)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::{HashAlgorithm, Level};
    use crate::testing::NATIVE_HOST;

    pub fn log(level: Level, message: &str) {
        NATIVE_HOST.with(|h| h.borrow_mut().logs.push((level, message.to_string())));
    }

    pub fn counter_add(name: &str, delta: i64) {
        NATIVE_HOST.with(|h| *h.borrow_mut().counters.entry(name.to_string()).or_insert(0) += delta);
    }

    pub fn hash_strings(alg: &HashAlgorithm, offsets: &[u32], data: &[u8]) -> Result<Vec<u8>, String> {
        NATIVE_HOST.with(|h| {
            let h = h.borrow();
            let key = match alg {
                HashAlgorithm::Sha256 => None,
                HashAlgorithm::HmacSha256(name) => Some(
                    h.secrets
                        .get(name)
                        .ok_or_else(|| format!("secret `{name}` is not granted to this plugin"))?
                        .as_slice(),
                ),
            };
            crate::hashing::hash_strings(key, offsets, data)
        })
    }
}
