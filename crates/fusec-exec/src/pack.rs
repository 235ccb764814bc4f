//! The GEMV weights of an executor packed end to end, one buffer per storage format,
//! in the order a step reads them, on huge pages.
//!
//! Huge pages only back whole, aligned 2 MiB ranges (see [`hugepages`]). A weight in
//! its own allocation keeps the partial pages at both of its ends on 4 KiB pages, and
//! a matrix of a few megabytes (each attention projection of a 125M-parameter model is
//! 2.4 MB in `f32`) often holds no whole aligned huge page at all: measured, a quarter
//! of that model's `f32` weights stayed on small pages. Packed, every weight is on
//! huge pages but for the first and last megabytes of each format's buffer, and a step
//! streams each buffer from start to end. The packed weights are views of the buffer
//! with the shapes, dtypes and values they had.

use std::sync::Arc;

use fusec_ir::DType;

use crate::hugepages;
use crate::tensor::{Buffer, Dims, Tensor};

/// Packs every tensor of `weights` that is contiguous and alone in its buffer, by
/// storage format (`f32`, `bf16` bits, `f16` bits, E4M3 bytes), into one buffer each,
/// replacing it by a view of that buffer. Others are left as they are.
pub(crate) fn pack(weights: &mut [&mut Tensor]) {
    pack_format(
        weights,
        DType::F32,
        |b| match b {
            Buffer::F32(v) => Some(&v[..]),
            _ => None,
        },
        |v| Buffer::F32(Arc::new(v)),
    );
    for dtype in [DType::Bf16, DType::F16] {
        pack_format(
            weights,
            dtype,
            |b| match b {
                Buffer::U16(v) => Some(&v[..]),
                _ => None,
            },
            |v| Buffer::U16(Arc::new(v)),
        );
    }
    // `i8` codes too (one byte per element, as E4M3), and `i4`/`u4` codes, two elements a
    // byte: their views' offsets and lengths count elements, so they stay even.
    for dtype in [DType::Fp8E4M3, DType::I8, DType::I4, DType::U4] {
        pack_format(
            weights,
            dtype,
            |b| match b {
                Buffer::U8(v) => Some(&v[..]),
                _ => None,
            },
            |v| Buffer::U8(Arc::new(v)),
        );
    }
}

/// Elements of `dtype` one stored value holds.
fn per_value(dtype: DType) -> usize {
    if dtype.is_nibbles() {
        2
    } else {
        1
    }
}

/// Packs the tensors of `dtype` whose buffers `values` reads as `T`.
fn pack_format<T: Copy>(
    weights: &mut [&mut Tensor],
    dtype: DType,
    values: impl Fn(&Buffer) -> Option<&[T]>,
    wrap: impl Fn(Vec<T>) -> Buffer,
) {
    let per = per_value(dtype);
    let alone = |t: &Tensor| {
        t.dtype() == dtype
            && t.is_contiguous()
            && t.offset() == 0
            && t.numel().is_multiple_of(per)
            && values(t.buffer()).is_some_and(|v| v.len() * per == t.numel())
    };
    let total: usize = weights
        .iter()
        .filter(|t| alone(t))
        .map(|t| t.numel() / per)
        .sum();
    if total * std::mem::size_of::<T>() < hugepages::HUGE_PAGE {
        return;
    }
    let mut arena: Vec<T> = Vec::with_capacity(total);
    // Advised before the first write, so that the page faults of the copy below take
    // huge pages directly instead of small pages to be collapsed later.
    hugepages::advise_unwritten(arena.spare_capacity_mut());
    let mut ranges = Vec::new();
    for (i, t) in weights.iter().enumerate() {
        if alone(t) {
            let start = arena.len();
            arena.extend_from_slice(values(t.buffer()).unwrap_or_default());
            ranges.push((i, start, arena.len()));
        }
    }
    let Ok(shape) = Dims::from_slice(&[total * per]) else {
        return;
    };
    let whole = Tensor::contiguous(dtype, shape, wrap(arena));
    for (i, start, end) in ranges {
        let view = whole
            .slice(0, start * per, end * per)
            .and_then(|v| v.reshape(weights[i].shape()));
        // Slicing a 1-D buffer and reshaping the contiguous slice cannot fail; if it
        // did, the weight would simply stay in its own buffer.
        if let Ok(view) = view {
            *weights[i] = view;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_weights_keep_their_values_shapes_and_dtypes() {
        let n = 1 << 19; // 2 MiB of f32 in each of the two big weights
        let a = Tensor::from_f32(
            DType::F32,
            &[n / 512, 512],
            (0..n).map(|i| i as f32).collect(),
        )
        .expect("a");
        let b = Tensor::from_f32(
            DType::F32,
            &[512, n / 512],
            (0..n).map(|i| -(i as f32)).collect(),
        )
        .expect("b");
        let small = Tensor::from_f32(DType::F32, &[3], vec![1.0, 2.0, 3.0]).expect("small");
        let view = a.slice(0, 1, 3).expect("a view of part of a buffer");
        let (mut a2, mut b2, mut small2, mut view2) =
            (a.clone(), b.clone(), small.clone(), view.clone());
        pack(&mut [&mut a2, &mut view2, &mut b2, &mut small2]);
        for (before, after) in [(&a, &a2), (&b, &b2), (&small, &small2), (&view, &view2)] {
            assert_eq!(before.shape(), after.shape());
            assert_eq!(before.dtype(), after.dtype());
            assert_eq!(before.to_vec_f32(), after.to_vec_f32());
        }
        // The three whole tensors share one buffer, in order; the view is untouched.
        assert_eq!(a2.offset(), 0);
        assert_eq!(b2.offset(), n);
        assert_eq!(small2.offset(), 2 * n);
        assert_eq!(b2.storage_len(), 2 * n + 3);
        assert_eq!(view2.offset(), view.offset());
    }

    /// Packed `i4` codes (two a byte) keep their values, with offsets in elements.
    #[test]
    fn packed_i4_codes_keep_their_values() {
        let n = 1 << 22; // 2 MiB of bytes in each
        let codes = |seed: u8| {
            let bytes: Vec<u8> = (0..n / 2).map(|i| (i as u8).wrapping_mul(seed)).collect();
            Tensor::contiguous(
                DType::I4,
                Dims::from_slice(&[n / 64, 64]).expect("dims"),
                Buffer::U8(Arc::new(bytes)),
            )
        };
        let (a, b) = (codes(3), codes(7));
        let (mut a2, mut b2) = (a.clone(), b.clone());
        pack(&mut [&mut a2, &mut b2]);
        assert_eq!(b2.offset(), n, "offsets count elements");
        for (before, after) in [(&a, &a2), (&b, &b2)] {
            assert_eq!(before.shape(), after.shape());
            assert_eq!(before.to_vec_f32(), after.to_vec_f32());
        }
    }
}
