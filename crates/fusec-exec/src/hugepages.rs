//! Backing the weights with 2 MiB pages.
//!
//! Decode streams every weight once per token, so the weights' page-table walks are
//! on the critical path: with 4 KiB pages one TLB miss comes every 64 cache lines,
//! and in a virtual machine each miss walks two levels of page tables. On the 2-core
//! EPYC VM this executor was tuned on, the same `f32` GEMV streamed 20-21 GB/s from
//! 4 KiB pages and 28-29 GB/s from 2 MiB pages, and a plain parallel sum 19-23
//! against 25-33 GB/s. The executor therefore asks Linux to back each large bound
//! weight with transparent huge pages (`madvise` `MADV_HUGEPAGE`, then
//! `MADV_COLLAPSE`, which moves the already-written pages into huge pages
//! synchronously, Linux 6.1 and later). It is advice: where the kernel refuses
//! (another OS, an older kernel, no free huge pages) the weights stay where they are,
//! with the same values, and only the speed differs.
//!
//! `unsafe` is confined to the `madvise` calls, which read no memory of the process
//! and keep the contents of the range they move.

#![allow(unsafe_code)]

/// The huge page size the advice aligns to.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Asks for the 2 MiB-aligned interior of `data` to be backed by huge pages. Returns
/// whether the kernel did it; `data` keeps its values either way. Buffers smaller
/// than a huge page are left alone.
pub fn back_with_huge_pages<T>(data: &[T]) -> bool {
    let start = data.as_ptr() as usize;
    let end = start + std::mem::size_of_val(data);
    let (lo, hi) = (start.next_multiple_of(HUGE_PAGE), end & !(HUGE_PAGE - 1));
    if hi <= lo {
        return false;
    }
    advise(lo, hi - lo)
}

/// Asks for the 2 MiB-aligned interior of memory not written yet (a vector's spare
/// capacity) to be backed by huge pages as it is first written. Returns whether the
/// kernel took the advice.
pub fn advise_unwritten<T>(spare: &mut [std::mem::MaybeUninit<T>]) -> bool {
    let start = spare.as_ptr() as usize;
    let end = start + std::mem::size_of_val(spare);
    let (lo, hi) = (start.next_multiple_of(HUGE_PAGE), end & !(HUGE_PAGE - 1));
    hi > lo && hint(lo, hi - lo)
}

#[cfg(target_os = "linux")]
fn hint(addr: usize, len: usize) -> bool {
    // SAFETY: as in `advise`; `MADV_HUGEPAGE` only changes which pages future faults
    // in the range take.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn hint(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize) -> bool {
    /// `MADV_COLLAPSE` from `<linux/mman.h>` (Linux 6.1), which not every libc binding
    /// names yet.
    const MADV_COLLAPSE: libc::c_int = 25;
    // SAFETY: `addr..addr + len` lies inside a live allocation (the caller's slice)
    // and is page-aligned; both advices keep the range's contents and only change
    // which physical pages back it, so no Rust reference observes a change.
    unsafe {
        let hinted = libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) == 0;
        hinted && libc::madvise(addr as *mut libc::c_void, len, MADV_COLLAPSE) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_keeps_the_values_and_skips_small_buffers() {
        let small = vec![1.0f32; 1000];
        assert!(!back_with_huge_pages(&small));
        let big: Vec<f32> = (0..3 * HUGE_PAGE / 4).map(|i| i as f32).collect();
        // Whether the kernel agrees depends on the machine; the values must not move.
        back_with_huge_pages(&big);
        assert!(big.iter().enumerate().all(|(i, &v)| v == i as f32));
    }
}
