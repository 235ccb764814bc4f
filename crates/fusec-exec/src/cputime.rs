//! The CPU time this process has used: what a benchmark on a shared machine divides by
//! when other tenants' load makes wall-clock rates meaningless (they take the cores,
//! not this process's CPU seconds).
//!
//! `unsafe` is confined to the one `clock_gettime` call, which writes only the
//! `timespec` it is given.

#![allow(unsafe_code)]

/// Seconds of CPU time of this process, every thread (`CLOCK_PROCESS_CPUTIME_ID`,
/// nanosecond resolution), or `None` where the clock is missing.
pub fn process_cpu_seconds() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_advances_with_work() {
        let a = process_cpu_seconds().expect("a process CPU clock");
        let mut x = 1.0f64;
        let start = std::time::Instant::now();
        while start.elapsed().as_millis() < 30 {
            x = std::hint::black_box(x * 1.000_000_1);
        }
        let b = process_cpu_seconds().expect("a process CPU clock");
        assert!(b - a >= 0.01, "{a} -> {b}");
    }
}
