//! Dropped values back to the pool: a tensor's buffer and its emptied `Arc`
//! (`crate::pool`), and the lists that hold the results of a multi-result kernel.
//!
//! Separate from `crate::pool`, which keeps plain buffers and knows nothing of tensors,
//! so that tensors can take their buffers from the pool without a circle.

use std::cell::RefCell;

use crate::pool::recycle_arc;
use crate::tensor::{Buffer, Tensor};

/// At most this many empty result lists are kept per thread.
const MAX_LISTS: usize = 64;

thread_local! {
    /// Empty lists with room for a multi-result kernel's tensors.
    static LISTS: RefCell<Vec<Vec<Tensor>>> = const { RefCell::new(Vec::new()) };
}

/// Returns the tensor's buffer to the pool if no other tensor shares it, and keeps
/// its emptied `Arc` for `crate::pool::wrap`.
pub(crate) fn recycle(t: Tensor) {
    match t.into_buffer() {
        Buffer::F32(arc) => recycle_arc(arc),
        Buffer::I32(arc) => recycle_arc(arc),
        // Compact storage only ever holds bound weights, which live as long as the
        // executor.
        Buffer::U16(_) | Buffer::U8(_) => {}
    }
}

/// An empty list with room for at least `n` tensors: the results of a multi-result
/// kernel, which become a tuple value.
pub(crate) fn tensors(n: usize) -> Vec<Tensor> {
    let reused = LISTS
        .try_with(|lists| {
            let mut lists = lists.borrow_mut();
            // Lists are few, and the last one given back nearly always fits.
            let fits = lists.iter().rposition(|l| l.capacity() >= n)?;
            Some(lists.swap_remove(fits))
        })
        .ok()
        .flatten();
    reused.unwrap_or_else(|| Vec::with_capacity(n))
}

/// Recycles every tensor of `list` (see [`recycle`]) and keeps the emptied list for
/// [`tensors`].
pub(crate) fn give_tensors(mut list: Vec<Tensor>) {
    list.drain(..).for_each(recycle);
    if list.capacity() == 0 {
        return;
    }
    let _ = LISTS.try_with(|lists| {
        let mut lists = lists.borrow_mut();
        if lists.capacity() == 0 {
            // Full size at once, for the reason given in `crate::pool::give`.
            lists.reserve_exact(MAX_LISTS);
        }
        if lists.len() < MAX_LISTS {
            lists.push(list);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_result_lists() {
        let mut list = tensors(3);
        list.push(Tensor::scalar(1.0));
        let ptr = list.as_ptr();
        give_tensors(list);
        let again = tensors(2);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
    }
}
