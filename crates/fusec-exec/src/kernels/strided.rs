//! Iteration over strided views, and the shapes and strides of broadcasting, all
//! without allocating: they run inside kernels on every step.

use crate::dims::{Dims, MAX_RANK};

/// Calls `f` with the buffer offsets of `N` views for every index of `shape`, in
/// row-major order. View `k` has strides `strides[k]` (of the same rank as `shape`;
/// 0 on broadcast axes) and starts at `base[k]`. Amortized O(1) per element; the
/// index lives on the stack for any tensor's rank.
pub fn walk<const N: usize>(
    shape: &[usize],
    strides: [&[usize]; N],
    base: [usize; N],
    f: impl FnMut([usize; N]),
) {
    let rank = shape.len();
    if rank == 0 {
        let mut f = f;
        f(base);
        return;
    }
    if rank <= MAX_RANK {
        walk_with(&mut [0; MAX_RANK][..rank - 1], shape, strides, base, f);
    } else {
        // No tensor has a rank this high (`MAX_RANK`); a hand-made shape still walks.
        walk_with(&mut vec![0; rank - 1], shape, strides, base, f);
    }
}

/// [`walk`] over a shape of rank at least 1, with `index` (zeroed, one entry per axis
/// but the last) as the odometer.
fn walk_with<const N: usize>(
    index: &mut [usize],
    shape: &[usize],
    strides: [&[usize]; N],
    base: [usize; N],
    mut f: impl FnMut([usize; N]),
) {
    let rank = shape.len();
    if shape.contains(&0) {
        return;
    }
    let inner = shape[rank - 1];
    let inner_strides: [usize; N] = std::array::from_fn(|k| strides[k][rank - 1]);
    let mut off = base;
    loop {
        let mut o = off;
        for _ in 0..inner {
            f(o);
            for k in 0..N {
                o[k] += inner_strides[k];
            }
        }
        // Advance the outer index like an odometer.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            index[d] += 1;
            for k in 0..N {
                off[k] += strides[k][d];
            }
            if index[d] < shape[d] {
                break;
            }
            for k in 0..N {
                off[k] -= strides[k][d] * shape[d];
            }
            index[d] = 0;
        }
    }
}

/// Strides that read a view of `shape` and `strides` broadcast (numpy rules) to `out`
/// (of at least `shape`'s rank): missing leading axes and size-1 axes that grow get
/// stride 0.
pub fn broadcast_strides(shape: &[usize], strides: &[usize], out: &Dims) -> Dims {
    let pad = out.len().saturating_sub(shape.len());
    let mut st = *out;
    for (i, s) in st.iter_mut().enumerate() {
        *s = if i < pad || shape[i - pad] != out[i] {
            0
        } else {
            strides[i - pad]
        };
    }
    st
}

/// Numpy broadcasting of two shapes, or `None` where they do not broadcast (or the
/// result would exceed [`MAX_RANK`], which no two tensors' shapes can).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Dims> {
    let rank = a.len().max(b.len());
    let mut out = Dims::from_slice(if a.len() >= b.len() { a } else { b }).ok()?;
    for (i, d) in out.iter_mut().enumerate() {
        let da = (i + a.len()).checked_sub(rank).map(|j| a[j]);
        let db = (i + b.len()).checked_sub(rank).map(|j| b[j]);
        *d = match (da, db) {
            (Some(x), None) | (None, Some(x)) => x,
            (Some(x), Some(y)) if x == y || y == 1 => x,
            (Some(1), Some(y)) => y,
            _ => return None,
        };
    }
    Some(out)
}

/// `shape` and `strides` without `axis` (kept as they are when it is out of range).
pub fn without_axis(mut shape: Dims, mut strides: Dims, axis: usize) -> (Dims, Dims) {
    shape.remove(axis);
    strides.remove(axis);
    (shape, strides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_row_major_with_broadcast() {
        let mut seen = Vec::new();
        walk(&[2, 3], [&[3, 1], &[0, 1]], [0, 10], |[a, b]| {
            seen.push((a, b))
        });
        assert_eq!(seen, [(0, 10), (1, 11), (2, 12), (3, 10), (4, 11), (5, 12)]);
        let mut n = 0;
        walk(&[], [&[]], [7], |[o]| {
            assert_eq!(o, 7);
            n += 1;
        });
        assert_eq!(n, 1);
        walk(&[2, 0], [&[0, 1]], [0], |_| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn broadcasting() {
        assert_eq!(
            broadcast_shape(&[2, 1, 4], &[3, 1]),
            Some(Dims::from([2, 3, 4]))
        );
        assert_eq!(broadcast_shape(&[2], &[3]), None);
        assert_eq!(
            broadcast_strides(&[3, 1], &[1, 1], &Dims::from([2, 3, 4])),
            Dims::from([0, 1, 0])
        );
    }
}
