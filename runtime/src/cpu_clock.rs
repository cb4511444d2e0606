//! The calling thread's CPU clock, for the time split of a run: stages run on their own
//! threads and share two cores, so wall time per stage would count time spent waiting for
//! a core. CPU time counts only the work.

use std::time::Duration;

/// A reading of the current thread's CPU clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CpuTime(Duration);

impl CpuTime {
    /// CPU time the current thread has used so far.
    #[cfg(unix)]
    pub fn now() -> CpuTime {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc != 0 {
            return CpuTime(Duration::ZERO);
        }
        CpuTime(Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32))
    }

    /// Without a thread CPU clock: monotonic wall time since the first call.
    #[cfg(not(unix))]
    pub fn now() -> CpuTime {
        use std::sync::OnceLock;
        use std::time::Instant;
        static START: OnceLock<Instant> = OnceLock::new();
        CpuTime(START.get_or_init(Instant::now).elapsed())
    }

    /// Seconds from `earlier` to `self` (zero if the clock did not advance).
    pub fn secs_since(self, earlier: CpuTime) -> f64 {
        self.0.saturating_sub(earlier.0).as_secs_f64()
    }

    /// Seconds used since this reading.
    pub fn elapsed_secs(self) -> f64 {
        CpuTime::now().secs_since(self)
    }
}

#[cfg(test)]
mod tests {
    use super::CpuTime;

    #[test]
    fn counts_work_not_sleep() {
        let t = CpuTime::now();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let slept = t.elapsed_secs();
        let t = CpuTime::now();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let worked = t.elapsed_secs();
        assert!(std::hint::black_box(x) != 1);
        assert!(slept < 0.02, "sleeping used {slept} s of CPU");
        assert!(worked > slept, "work {worked} s vs sleep {slept} s");
    }
}
