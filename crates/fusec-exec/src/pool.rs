//! Per-thread pools of buffers, so that a steady-state decode step reuses the buffers
//! of the steps before it instead of asking the allocator again.
//!
//! Large allocations are fresh memory maps whose page faults cost more than the kernels
//! that fill them (measured: a KV-cache `cat` ran at ~3 GB/s on fresh buffers and
//! ~13 GB/s on reused ones). Kernels take output buffers from here, and the executor
//! returns every buffer it drops that nothing else shares. Pooled buffers are rounded
//! up to a power of two, so that a KV cache, which grows by one position per step,
//! keeps fitting in the buffers of earlier steps until its size doubles.
//!
//! Every allocation counts against a step that should allocate nothing, so small
//! buffers are pooled as well as large ones, for `f32` values and for `i32` ids, and
//! so are the emptied `Arc`s of recycled buffers ([`wrap`]); `crate::recycle` gives
//! the buffers of dropped tensors back. A kernel's scratch vector is
//! taken here and given back before the kernel returns.

use std::cell::RefCell;
use std::sync::Arc;
use std::thread::LocalKey;

/// Size classes: class `k` holds buffers with a capacity in `[2^k, 2^(k+1))`.
const CLASSES: usize = usize::BITS as usize;

/// At most this many buffers are kept per size class and thread.
const MAX_PER_CLASS: usize = 64;

/// At most this many emptied `Arc`s are kept per element type and thread.
const MAX_SHELLS: usize = 1024;

/// One element type's free buffers and emptied `Arc`s on one thread.
pub(crate) struct Pool<T> {
    /// Free buffers by size class. Every buffer, however small, is kept: a decode
    /// step of a small model makes hundreds of small tensors, and reusing them is what
    /// lets a steady-state step allocate nothing.
    free: Vec<Vec<Vec<T>>>,
    /// Emptied, unshared `Arc`s of recycled tensors: wrapping a kernel's result in
    /// one of these instead of a new `Arc` saves an allocation per tensor.
    shells: Vec<Arc<Vec<T>>>,
}

impl<T> Pool<T> {
    const fn new() -> Pool<T> {
        Pool {
            free: Vec::new(),
            shells: Vec::new(),
        }
    }
}

/// An element type the pool keeps buffers of.
pub(crate) trait Pooled: Copy + Default + 'static {
    /// This thread's pool of buffers of `Self`.
    fn pool() -> &'static LocalKey<RefCell<Pool<Self>>>;
}

thread_local! {
    static F32: RefCell<Pool<f32>> = const { RefCell::new(Pool::new()) };
    static I32: RefCell<Pool<i32>> = const { RefCell::new(Pool::new()) };
    static I8: RefCell<Pool<i8>> = const { RefCell::new(Pool::new()) };
}

/// The 8-bit codes of activations quantized for integer weights.
impl Pooled for i8 {
    fn pool() -> &'static LocalKey<RefCell<Pool<i8>>> {
        &I8
    }
}

impl Pooled for f32 {
    fn pool() -> &'static LocalKey<RefCell<Pool<f32>>> {
        &F32
    }
}

impl Pooled for i32 {
    fn pool() -> &'static LocalKey<RefCell<Pool<i32>>> {
        &I32
    }
}

/// Runs `f` on this thread's pool of `T`; `None` while the thread is being torn down
/// (a buffer dropped then is simply freed, and a request allocates).
fn with<T: Pooled, R>(f: impl FnOnce(&mut Pool<T>) -> R) -> Option<R> {
    T::pool().try_with(|p| f(&mut p.borrow_mut())).ok()
}

/// The size class of a capacity (`floor(log2(capacity))`; 0 for 0).
fn class_of(capacity: usize) -> usize {
    capacity.checked_ilog2().unwrap_or(0) as usize
}

/// An empty vector with room for at least `n` values.
pub(crate) fn take<T: Pooled>(n: usize) -> Vec<T> {
    if n == 0 {
        return Vec::new();
    }
    // The class of the next power of two holds buffers of at least `n` and under
    // `4 n` values, so a small request never pins a big buffer. Finding one is a
    // constant-time pop.
    let rounded = n.checked_next_power_of_two().unwrap_or(n);
    let reused = with::<T, _>(|p| p.free.get_mut(class_of(rounded)).and_then(Vec::pop)).flatten();
    match reused {
        Some(mut v) => {
            v.clear();
            v
        }
        None => Vec::with_capacity(rounded),
    }
}

/// A vector of `n` zeros.
pub(crate) fn zeros<T: Pooled>(n: usize) -> Vec<T> {
    let mut v = take(n);
    v.resize(n, T::default());
    v
}

/// Returns a buffer to the pool.
pub(crate) fn give<T: Pooled>(v: Vec<T>) {
    if v.capacity() == 0 {
        return;
    }
    with::<T, _>(|p| {
        if p.free.is_empty() {
            p.free.resize_with(CLASSES, Vec::new);
        }
        let class = &mut p.free[class_of(v.capacity())];
        if class.capacity() == 0 {
            // Full size at once: a list that grew by doubling would reallocate now and
            // then during decode, whenever a class gains buffers.
            class.reserve_exact(MAX_PER_CLASS);
        }
        if class.len() < MAX_PER_CLASS {
            class.push(v);
        }
    });
}

/// Gives an unshared `Arc`'s buffer back to the pool and keeps the emptied `Arc` for
/// [`wrap`]; a shared one is only dropped.
pub(crate) fn recycle_arc<T: Pooled>(mut arc: Arc<Vec<T>>) {
    if let Some(v) = Arc::get_mut(&mut arc) {
        give(std::mem::take(v));
        with::<T, _>(|p| {
            if p.shells.capacity() == 0 {
                // Full size at once, for the reason given in `give`.
                p.shells.reserve_exact(MAX_SHELLS);
            }
            if p.shells.len() < MAX_SHELLS {
                p.shells.push(arc);
            }
        });
    }
}

/// `data` in an `Arc`, reusing the `Arc` of a recycled tensor when there is one.
pub(crate) fn wrap<T: Pooled>(data: Vec<T>) -> Arc<Vec<T>> {
    match with::<T, _>(|p| p.shells.pop()).flatten() {
        Some(mut arc) => match Arc::get_mut(&mut arc) {
            Some(slot) => {
                *slot = data;
                arc
            }
            // Not reachable (only unshared `Arc`s are kept), but a new `Arc` is
            // always correct.
            None => Arc::new(data),
        },
        None => Arc::new(data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_a_fitting_buffer() {
        let v = take::<f32>(10_000);
        let (ptr, cap) = (v.as_ptr(), v.capacity());
        assert_eq!(cap, 16_384);
        give(v);
        let w = take::<f32>(10_001);
        assert_eq!((w.as_ptr(), w.capacity()), (ptr, cap));
        assert!(w.is_empty());
        give(w);
        // A request under half the buffer's size, or over it, allocates afresh.
        let small = take::<f32>(5_000);
        let large = take::<f32>(cap + 1);
        assert_ne!(small.as_ptr(), ptr);
        assert_ne!(large.as_ptr(), ptr);
        // Each element type has a pool of its own.
        let ids = take::<i32>(10_000);
        assert_eq!(ids.capacity(), 16_384);
    }
}
