//! Heap settings for a process that runs pipelines.
//!
//! A run moves large buffers between threads: the reader allocates a batch, a plugin thread
//! frees it, the writer allocates page buffers of a few MiB and frees them when a column
//! chunk is done. With glibc's defaults, each free of such a buffer either unmaps it (the
//! mmap threshold starts at 128 KiB and only grows slowly) or trims the freed top of a
//! thread's heap back to the kernel, and the next allocation faults the same pages in
//! again. Measured on the W1 benchmark (10M rows, two cores), that was 0.7 CPU s of
//! system time out of 3.7 s and 0.35 s of wall time; with the settings below it is 0.4 s
//! of system time (file writes and fsync), for about 20 MiB more peak memory. Capping the
//! number of heaps and trimming above 16 MiB (below) keeps a long run's peak where a short
//! one's is.

/// Allocations up to this size come from the heap and are reused, not mapped and unmapped
/// each time (glibc's ceiling for the setting).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// A heap gives free memory at its top back to the kernel only above this much. (64 MiB
/// at first; but every thread heap keeps up to this much free, and a run's threads use
/// several heaps: W1's resident memory swung by 150 MB within a run, so a longer run met
/// higher peaks. 16 MiB keeps the reuse and W1's time, and lowers W1's and W2's peaks by
/// 15-20%.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 16 << 20;
/// At most this many heaps (glibc's default is eight per core): each thread that
/// allocates takes a heap of its own while one is free, and the writer starts new encoding
/// threads for every row group, so a long run spread its free memory over more of them.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: libc::c_int = 4;

/// Apply the settings above, once, before the process starts threads. Does nothing when
/// the user tunes malloc through `GLIBC_TUNABLES`, or on other C libraries.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc")) {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters; it is called before any
        // other thread exists, with documented parameters and values in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
        }
    }
}
