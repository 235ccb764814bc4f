//! Iteration over strided views.

/// Calls `f` with the buffer offsets of `N` views for every index of `shape`, in
/// row-major order. View `k` has strides `strides[k]` (of the same rank as `shape`;
/// 0 on broadcast axes) and starts at `base[k]`. Amortized O(1) per element, and one
/// small allocation per call.
pub fn walk<const N: usize>(
    shape: &[usize],
    strides: [&[usize]; N],
    base: [usize; N],
    mut f: impl FnMut([usize; N]),
) {
    let rank = shape.len();
    if rank == 0 {
        f(base);
        return;
    }
    if shape.contains(&0) {
        return;
    }
    let inner = shape[rank - 1];
    let inner_strides: [usize; N] = std::array::from_fn(|k| strides[k][rank - 1]);
    let mut index = vec![0usize; rank - 1];
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

/// Strides that read a view of `shape` and `strides` broadcast (numpy rules) to `out`:
/// missing leading axes and size-1 axes that grow get stride 0.
pub fn broadcast_strides(shape: &[usize], strides: &[usize], out: &[usize]) -> Vec<usize> {
    let pad = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < pad || shape[i - pad] != out[i] {
                0
            } else {
                strides[i - pad]
            }
        })
        .collect()
}

/// Numpy broadcasting of two shapes, or `None` where they do not broadcast.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = (i + a.len()).checked_sub(rank).map(|j| a[j]);
            let db = (i + b.len()).checked_sub(rank).map(|j| b[j]);
            match (da, db) {
                (Some(x), None) | (None, Some(x)) => Some(x),
                (Some(x), Some(y)) if x == y || y == 1 => Some(x),
                (Some(1), Some(y)) => Some(y),
                _ => None,
            }
        })
        .collect()
}

/// `shape` and `strides` without `axis`.
pub fn without_axis(shape: &[usize], strides: &[usize], axis: usize) -> (Vec<usize>, Vec<usize>) {
    let mut s = shape.to_vec();
    let mut st = strides.to_vec();
    s.remove(axis);
    st.remove(axis);
    (s, st)
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
        assert_eq!(broadcast_shape(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_shape(&[2], &[3]), None);
        assert_eq!(broadcast_strides(&[3, 1], &[1, 1], &[2, 3, 4]), [0, 1, 0]);
    }
}
