//! How kernels split work across cores.
//!
//! Every parallel loop of a kernel goes through [`for_each_chunk_mut`]: the output is
//! cut into chunks of a fixed length, and each chunk is computed by one thread in a
//! fixed order, so results never depend on the thread count or the schedule.
//!
//! **Why a team of its own.** A decode step is a chain of about seventy kernels, each a
//! fraction of a millisecond, with serial work (norms, attention setup, sampling)
//! between them. Run as rayon fork-joins, every kernel handed its work to threads that
//! had gone to sleep during the serial part and had to be woken by the kernel (a futex
//! wake and a context switch each), and the calling thread, which is not one of
//! rayon's, slept and was woken once per kernel too: `perf` put about 15% of an FP8
//! step of the 125M model in the scheduler. So an executor step runs as a *region*
//! ([`region`]): the calling thread drives the step, and `threads() - 1` persistent
//! worker threads spin for the whole region, taking chunks of each parallel loop the
//! moment it is published. Handing out a loop is then one atomic store, and its chunks
//! are claimed with one compare-and-swap each. A worker idle for longer than the
//! usual gap between kernels sleeps until the next loop, so that on a machine with
//! more busy threads than cores the spinning does not take the driver's core.
//! Between regions the workers park, so an idle executor costs nothing; a region costs one wake-up per worker, at its first
//! parallel loop (none for a step whose loops are all too small to split).
//!
//! Outside a region (a kernel called on its own, a test), parallel loops use rayon.
//! Only one region uses the workers at a time; a region started while another runs (a
//! second executor on another thread) runs its loops on its own thread, with the same
//! results.
//!
//! **The protocol.** A loop is published as a *job*: the chunk count, a pointer to the
//! chunk function (which lives on the driving thread's stack), and a 64-bit ticket
//! holding the job's generation (high half) and the next unclaimed chunk (low half).
//! A thread claims chunk `i` of generation `g` by a compare-and-swap of the ticket
//! from `(g, i)` to `(g, i + 1)`. The driver returns from the loop only after every
//! chunk is done, and a chunk cannot be claimed after that (its ticket is gone), so a
//! successful claim proves the chunk function it read is still alive. The generation
//! makes a stale read harmless: a worker that read the job fields of a newer job
//! together with an older ticket fails its compare-and-swap, because the driver moves
//! the ticket to the new generation (closed, with no chunk to claim) before it
//! changes the job's fields, and opens it only after.
//!
//! `unsafe` is confined to this module: reading the published chunk function, and
//! cutting the output into the disjoint chunks that threads write.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle worker spins inside a region before it sleeps until the next
/// job: long enough to cover the serial work between most kernels of a step, short
/// enough that a worker does not take a core from the driver or from another process
/// for long when the machine has more threads than cores.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(100);

/// Spins between two looks at the clock.
const SPINS_PER_CLOCK_READ: u32 = 64;

/// The state a region's driver shares with the workers.
struct Shared {
    /// `(generation << 32) | next unclaimed chunk` of the current job.
    ticket: AtomicU64,
    /// Chunks in the current job.
    chunks: AtomicUsize,
    /// The current job's chunk function: a `*const &(dyn Fn(usize) + Sync)`.
    func: AtomicPtr<()>,
    /// Chunks of the current job finished.
    done: AtomicUsize,
    /// Whether a region is running (workers spin) or not (workers park).
    active: AtomicBool,
    /// Whether a chunk of the current job panicked on a worker.
    panicked: AtomicBool,
    /// Workers asleep (or about to be) until the next job.
    sleepers: AtomicUsize,
}

static SHARED: Shared = Shared {
    ticket: AtomicU64::new(0),
    chunks: AtomicUsize::new(0),
    func: AtomicPtr::new(std::ptr::null_mut()),
    done: AtomicUsize::new(0),
    active: AtomicBool::new(false),
    panicked: AtomicBool::new(false),
    sleepers: AtomicUsize::new(0),
};

/// Held by the thread driving the current region.
static DRIVER: Mutex<()> = Mutex::new(());

/// The workers, started on the first region.
static WORKERS: OnceLock<Vec<Thread>> = OnceLock::new();

thread_local! {
    /// Whether this thread drives a region (its parallel loops go to the workers).
    static DRIVING: Cell<bool> = const { Cell::new(false) };
    /// Whether this thread is running a chunk (a loop inside it runs serially).
    static IN_CHUNK: Cell<bool> = const { Cell::new(false) };
}

/// Threads a parallel loop may use: rayon's thread count (`RAYON_NUM_THREADS`, or one
/// per core).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `f` as a region: its parallel loops are split between this thread and the
/// team's workers, which spin until `f` returns (see the module documentation).
pub fn region<R>(f: impl FnOnce() -> R) -> R {
    if threads() <= 1 || DRIVING.with(Cell::get) || IN_CHUNK.with(Cell::get) {
        return f();
    }
    let guard = match DRIVER.try_lock() {
        Ok(guard) => guard,
        // A poisoned lock only means an earlier driver panicked; the shared state is
        // reset below, so the team is usable.
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return f(),
    };
    DRIVING.with(|d| d.set(true));
    // The region ends (workers park, the flag clears) even if `f` panics.
    struct End;
    impl Drop for End {
        fn drop(&mut self) {
            DRIVING.with(|d| d.set(false));
            SHARED.active.store(false, Ordering::Release);
        }
    }
    let end = End;
    let result = f();
    drop(end);
    drop(guard);
    result
}

/// Starts `n` workers. A worker that cannot be started is left out: the region's
/// loops then have fewer helpers, with the same results.
fn spawn_workers(n: usize) -> Vec<Thread> {
    (0..n)
        .filter_map(|i| {
            thread::Builder::new()
                .name(format!("fusec-team-{i}"))
                .spawn(work)
                .ok()
                .map(|handle| handle.thread().clone())
        })
        .collect()
}

/// A worker: parks while no region runs; inside one it claims chunks of each job,
/// spins while there is none for up to [`SPIN_BEFORE_SLEEP`], and then sleeps until
/// the driver publishes the next job.
fn work() {
    let mut spins: u32 = 0;
    let mut idle_since: Option<Instant> = None;
    loop {
        if !SHARED.active.load(Ordering::Acquire) {
            thread::park();
            idle_since = None;
            continue;
        }
        if claim_and_run() {
            idle_since = None;
            continue;
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(SPINS_PER_CLOCK_READ) {
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SPIN_BEFORE_SLEEP {
            continue;
        }
        // Announce the sleep, then look for a job once more: the driver publishes a
        // job before it counts sleepers, and both sides use sequentially consistent
        // operations, so either this look sees the job or the driver sees this
        // sleeper and unparks it (an unpark before the park makes the park return).
        let seen = SHARED.ticket.load(Ordering::SeqCst);
        SHARED.sleepers.fetch_add(1, Ordering::SeqCst);
        if SHARED.ticket.load(Ordering::SeqCst) == seen && SHARED.active.load(Ordering::SeqCst) {
            thread::park();
        }
        SHARED.sleepers.fetch_sub(1, Ordering::SeqCst);
        idle_since = None;
    }
}

/// Claims one chunk of the current job and runs it; false if there was none.
fn claim_and_run() -> bool {
    let ticket = SHARED.ticket.load(Ordering::Acquire);
    let chunks = SHARED.chunks.load(Ordering::Acquire);
    let func = SHARED.func.load(Ordering::Acquire);
    let next = (ticket & u64::from(u32::MAX)) as usize;
    if next >= chunks || func.is_null() {
        return false;
    }
    if SHARED
        .ticket
        .compare_exchange(ticket, ticket + 1, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    // SAFETY: the claim succeeded, so chunk `next` of this generation was not yet
    // done and the driver is still inside `run_job`, keeping the chunk function that
    // `func` points to alive; `func` belongs to this generation, since a newer job
    // would have replaced the ticket and failed the claim.
    let f: &(dyn Fn(usize) + Sync) = unsafe { *func.cast::<&(dyn Fn(usize) + Sync)>() };
    let ok = run_chunk(f, next);
    if !ok {
        SHARED.panicked.store(true, Ordering::Release);
    }
    SHARED.done.fetch_add(1, Ordering::AcqRel);
    true
}

/// Runs chunk `i`, catching a panic (reported to the driver, which re-raises it) so
/// that a worker never dies holding a chunk the driver waits for.
fn run_chunk(f: &(dyn Fn(usize) + Sync), i: usize) -> bool {
    IN_CHUNK.with(|c| c.set(true));
    let ok = panic::catch_unwind(AssertUnwindSafe(|| f(i))).is_ok();
    IN_CHUNK.with(|c| c.set(false));
    ok
}

/// Publishes a job of `chunks` chunks to the workers, takes part in it, and returns
/// when every chunk is done.
fn run_job(chunks: usize, f: &(dyn Fn(usize) + Sync)) {
    // The workers are woken by the region's first job, not by the region itself: a
    // step of a small model may have no loop worth splitting, and then costs no
    // wake-up at all.
    if !SHARED.active.load(Ordering::Relaxed) {
        SHARED.active.store(true, Ordering::Release);
        for w in WORKERS.get_or_init(|| spawn_workers(threads() - 1)) {
            w.unpark();
        }
    }
    let func: *const &(dyn Fn(usize) + Sync) = &f;
    let generation = (SHARED.ticket.load(Ordering::Relaxed) >> 32) + 1;
    // Close the ticket under the new generation before changing the job's fields: a
    // worker that read the previous ticket, fully claimed, together with this job's
    // larger chunk count must fail its claim instead of taking a chunk past the end
    // of the previous job.
    SHARED
        .ticket
        .store((generation << 32) | u64::from(u32::MAX), Ordering::SeqCst);
    SHARED.done.store(0, Ordering::Relaxed);
    SHARED.panicked.store(false, Ordering::Relaxed);
    SHARED.chunks.store(chunks, Ordering::Relaxed);
    SHARED.func.store(func.cast_mut().cast(), Ordering::Relaxed);
    #[cfg(test)]
    tests::stall_before_opening();
    SHARED.ticket.store(generation << 32, Ordering::SeqCst);
    if SHARED.sleepers.load(Ordering::SeqCst) > 0 {
        for w in WORKERS.get().into_iter().flatten() {
            w.unpark();
        }
    }
    while claim_and_run() {}
    // The last chunks run on workers; a worker the OS took off its core can hold one
    // for a while, so the wait gives the core up after a short spin.
    let mut spins: u32 = 0;
    while SHARED.done.load(Ordering::Acquire) < chunks {
        if spins < 1 << 12 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            thread::yield_now();
        }
    }
    SHARED.func.store(std::ptr::null_mut(), Ordering::Relaxed);
    if SHARED.panicked.load(Ordering::Acquire) {
        panic!("a parallel kernel chunk panicked on a worker thread");
    }
}

/// A pointer that may cross threads: the base of the output a job's chunks write,
/// each chunk to its own disjoint part.
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: the pointer is only used to form disjoint chunks of a `&mut [T]` with
// `T: Send`, each touched by one thread.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Calls `f(index, chunk)` for every `chunk_len`-long chunk of `out` (the last one may
/// be shorter), in parallel when `parallel` is true, else in order on this thread.
pub fn for_each_chunk_mut<T: Send>(
    out: &mut [T],
    chunk_len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk_len = chunk_len.max(1);
    let chunks = out.len().div_ceil(chunk_len);
    let nested = IN_CHUNK.with(Cell::get);
    if !parallel || chunks <= 1 || nested || threads() <= 1 {
        out.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
        return;
    }
    if !DRIVING.with(Cell::get) || chunks >= u32::MAX as usize {
        out.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
        return;
    }
    let len = out.len();
    let base = SendPtr(out.as_mut_ptr());
    let chunk = move |i: usize| {
        let start = i * chunk_len;
        let end = (start + chunk_len).min(len);
        // SAFETY: chunk `i` is `out[start..end]`, inside `out`, disjoint from every
        // other chunk, and run by exactly one thread (one successful claim) while
        // `out` stays borrowed by this call, which waits for every chunk.
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, part);
    };
    run_job(chunks, &chunk);
}

/// `cols` consecutive columns of a row-major matrix, borrowed mutably: one thread's
/// block of [`for_each_column_block_mut`]. Its rows are `width()` long and `stride()`
/// apart in the matrix.
#[derive(Debug)]
pub struct ColumnsMut<'a, T> {
    base: *mut T,
    rows: usize,
    width: usize,
    stride: usize,
    _borrow: PhantomData<&'a mut T>,
}

// SAFETY: a block is only ever reachable through one `ColumnsMut`, which holds the
// exclusive borrow of its elements; with `T: Send` it may move to another thread.
unsafe impl<T: Send> Send for ColumnsMut<'_, T> {}

impl<T> ColumnsMut<'_, T> {
    /// Rows of the block (the matrix's rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the block.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Elements from one row of the matrix to the next.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Row `r` of the block (panics past the last row).
    pub fn row_mut(&mut self, r: usize) -> &mut [T] {
        assert!(r < self.rows, "row {r} of a {}-row block", self.rows);
        // SAFETY: row `r` of the block is `width` elements inside the matrix, owned
        // by this block alone (see `for_each_column_block_mut`).
        unsafe { std::slice::from_raw_parts_mut(self.base.add(r * self.stride), self.width) }
    }

    /// A pointer to element `(r, c)` of the block, for a kernel that writes the
    /// `m x n` tile from there with this block's [`stride`](Self::stride): `None`
    /// unless the tile lies inside the block. Writing through it is the caller's
    /// `unsafe`; the block's exclusive borrow makes the tile its alone.
    pub fn tile_ptr(&mut self, r: usize, m: usize, c: usize, n: usize) -> Option<*mut T> {
        if m == 0 || n == 0 || r + m > self.rows || c + n > self.width {
            return None;
        }
        // SAFETY: `(r, c)` is inside the block (checked above), so inside the matrix.
        Some(unsafe { self.base.add(r * self.stride + c) })
    }
}

/// Calls `f(index, block)` for every block of `block_cols` consecutive columns of the
/// row-major matrix `out` (rows of `row_len`; the last block may be narrower), in
/// parallel when `parallel` is true, else in order on this thread. Each block, every
/// row's slice of its columns, is written by one thread: a kernel whose threads split
/// the output features (a GEMM) writes row-major results in place.
pub fn for_each_column_block_mut<T: Send>(
    out: &mut [T],
    row_len: usize,
    block_cols: usize,
    parallel: bool,
    f: impl Fn(usize, ColumnsMut<'_, T>) + Sync,
) {
    let row_len = row_len.max(1);
    let block_cols = block_cols.max(1);
    let rows = out.len() / row_len;
    let blocks = row_len.div_ceil(block_cols);
    let base = SendPtr(out.as_mut_ptr());
    let block = move |i: usize| {
        let c0 = i * block_cols;
        let width = block_cols.min(row_len - c0);
        // SAFETY: block `i` is columns `c0..c0 + width` of the `rows` full rows of
        // `out`, disjoint from every other block, and handed to one call of `f` while
        // `out` stays borrowed by this function, which returns after every block.
        f(
            i,
            ColumnsMut {
                base: unsafe { base.get().add(c0) },
                rows,
                width,
                stride: row_len,
                _borrow: PhantomData,
            },
        )
    };
    // The blocks as the chunks of a slice of `()` (which allocates nothing): the same
    // scheduling as every other parallel loop of a kernel.
    let mut units = vec![(); blocks];
    for_each_chunk_mut(&mut units, 1, parallel, |i, _| block(i));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes the driver pause between writing a job's fields and opening its ticket,
    /// the window in which a worker holding the previous job's spent ticket could
    /// claim a chunk if the ticket were not closed first.
    static STALL: AtomicBool = AtomicBool::new(false);

    pub(super) fn stall_before_opening() {
        if STALL.load(Ordering::Relaxed) {
            let start = Instant::now();
            while start.elapsed() < Duration::from_micros(20) {
                std::hint::spin_loop();
            }
        }
    }

    #[test]
    fn every_chunk_runs_once_inside_and_outside_a_region() {
        for inside in [false, true] {
            let mut out = vec![0usize; 1003];
            let fill = |out: &mut [usize]| {
                for_each_chunk_mut(out, 10, true, |i, c| {
                    for (k, v) in c.iter_mut().enumerate() {
                        *v += i * 10 + k + 1;
                    }
                })
            };
            if inside {
                region(|| {
                    for _ in 0..50 {
                        fill(&mut out)
                    }
                });
            } else {
                for _ in 0..50 {
                    fill(&mut out)
                }
            }
            for (j, v) in out.iter().enumerate() {
                assert_eq!(*v, 50 * (j + 1), "inside {inside}");
            }
        }
    }

    #[test]
    fn column_blocks_cover_each_element_once() {
        for inside in [false, true] {
            let (rows, row_len) = (7, 23);
            let mut out = vec![0usize; rows * row_len];
            let fill = |out: &mut [usize]| {
                for_each_column_block_mut(out, row_len, 5, true, |i, mut cols| {
                    assert_eq!(cols.width(), 5.min(row_len - i * 5));
                    assert!(cols.tile_ptr(0, rows + 1, 0, 1).is_none());
                    for r in 0..cols.rows() {
                        for (j, v) in cols.row_mut(r).iter_mut().enumerate() {
                            *v += r * row_len + i * 5 + j + 1;
                        }
                    }
                })
            };
            if inside {
                region(|| fill(&mut out));
            } else {
                fill(&mut out);
            }
            for (j, v) in out.iter().enumerate() {
                assert_eq!(*v, j + 1, "inside {inside}");
            }
        }
    }

    #[test]
    fn jobs_of_changing_sizes_run_each_chunk_exactly_once() {
        // A small job followed by a larger one is where a worker holding the small
        // job's spent ticket could claim a chunk past its end.
        let mut out = vec![0u32; 97];
        STALL.store(true, Ordering::Relaxed);
        region(|| {
            for iter in 0..2_000usize {
                let n = 1 + (iter * 7919) % out.len();
                let part = &mut out[..n];
                part.fill(0);
                for_each_chunk_mut(part, 1, true, |i, c| {
                    assert_eq!(c.len(), 1, "chunk {i} of {n}");
                    // A little work, so that the workers take part.
                    std::hint::black_box((0..50u32).fold(0u32, |a, b| a ^ b));
                    c[0] += 1;
                });
                assert!(part.iter().all(|&v| v == 1), "job {iter} of {n} chunks");
            }
        });
        STALL.store(false, Ordering::Relaxed);
    }

    #[test]
    fn concurrent_regions_and_nested_loops_give_the_same_results() {
        let run = || {
            region(|| {
                let mut out = vec![0u64; 4096];
                for_each_chunk_mut(&mut out, 64, true, |i, c| {
                    let mut inner = [0u64; 8];
                    // A loop inside a chunk runs serially on the chunk's thread.
                    for_each_chunk_mut(&mut inner, 2, true, |j, d| d.fill(j as u64));
                    c.iter_mut()
                        .for_each(|v| *v = i as u64 + inner.iter().sum::<u64>());
                });
                out
            })
        };
        let threads: Vec<_> = (0..4).map(|_| thread::spawn(run)).collect();
        let expected = run();
        for t in threads {
            assert_eq!(t.join().expect("no panic"), expected);
        }
    }

    #[test]
    fn a_panicking_chunk_reaches_the_driver_and_the_team_recovers() {
        let caught = panic::catch_unwind(|| {
            region(|| {
                let mut out = vec![0u8; 256];
                for_each_chunk_mut(&mut out, 1, true, |i, _| assert!(i != 200, "chunk 200"));
            })
        });
        assert!(caught.is_err());
        let mut out = vec![0u8; 256];
        region(|| for_each_chunk_mut(&mut out, 1, true, |_, c| c[0] = 1));
        assert!(out.iter().all(|&v| v == 1));
    }
}
