//! How kernels split work across cores.
//!
//! Every parallel loop of a kernel goes through [`for_each_chunk_mut`]: the output is
//! cut into chunks of a fixed length, and each chunk is computed by one thread in a
//! fixed order, so results never depend on the thread count or the schedule.

use rayon::prelude::*;

/// Calls `f(index, chunk)` for every `chunk_len`-long chunk of `out` (the last one may
/// be shorter), in parallel when `parallel` is true, else in order on this thread.
pub fn for_each_chunk_mut<T: Send>(
    out: &mut [T],
    chunk_len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk_len = chunk_len.max(1);
    if parallel && rayon::current_num_threads() > 1 && out.len() > chunk_len {
        out.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// Threads a parallel loop may use.
pub fn threads() -> usize {
    rayon::current_num_threads()
}
