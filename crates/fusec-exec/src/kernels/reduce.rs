//! Kernels that reduce along one axis: sum, mean, max, argmax, and softmax.
//!
//! Sums accumulate in `f64`, so that a long reduction does not drift from PyTorch's
//! pairwise `f32` sums by more than the final rounding.

use fusec_ir::ReduceOp;

use super::strided::{walk, without_axis};
use super::{check_axis, float_buffer, KernelError};
use crate::pool;
use crate::tensor::{contiguous_strides, Tensor};

fn non_empty(x: &Tensor, axis: usize, op: &str) -> Result<(), KernelError> {
    if x.shape()[axis] == 0 {
        Err(KernelError::Invalid(format!(
            "{op}: axis {axis} of {:?} is empty",
            x.shape()
        )))
    } else {
        Ok(())
    }
}

/// `kind` along `axis`, keeping the axis as size 1 when `keepdim`. The max propagates
/// NaN, as `torch.amax` does.
pub fn reduce(
    kind: ReduceOp,
    x: &Tensor,
    axis: usize,
    keepdim: bool,
) -> Result<Tensor, KernelError> {
    let name = kind.name();
    let src = float_buffer(x, name)?;
    check_axis(axis, x.rank(), name)?;
    if kind == ReduceOp::Max {
        non_empty(x, axis, name)?;
    }
    let (n, st) = (x.shape()[axis], x.strides()[axis]);
    let (outer, outer_strides) = without_axis(x.dims(), x.stride_dims(), axis);
    let mut out = pool::take(outer.iter().product());
    walk(&outer, [&outer_strides], [x.offset()], |[o]| {
        let lane = (0..n).map(|i| src[o + i * st]);
        let v = match kind {
            ReduceOp::Sum => lane.map(f64::from).sum::<f64>() as f32,
            ReduceOp::Mean => (lane.map(f64::from).sum::<f64>() / n as f64) as f32,
            ReduceOp::Max => lane.fold(
                f32::NEG_INFINITY,
                |m, v| if v > m || v.is_nan() { v } else { m },
            ),
        };
        out.push(v);
    });
    let mut shape = x.dims();
    if keepdim {
        shape[axis] = 1;
    } else {
        shape.remove(axis);
    }
    Ok(Tensor::from_kernel_f32(x.dtype(), shape, out))
}

/// The index of the largest element along `axis` as `i32`: ties go to the lowest
/// index, and a NaN counts as the largest value (as in `torch.argmax`).
pub fn argmax(x: &Tensor, axis: usize) -> Result<Tensor, KernelError> {
    let src = float_buffer(x, "argmax")?;
    check_axis(axis, x.rank(), "argmax")?;
    non_empty(x, axis, "argmax")?;
    let (n, st) = (x.shape()[axis], x.strides()[axis]);
    if i32::try_from(n).is_err() {
        return Err(KernelError::Invalid(format!(
            "argmax: axis of {n} elements overflows i32"
        )));
    }
    let (outer, outer_strides) = without_axis(x.dims(), x.stride_dims(), axis);
    let mut out = pool::take(outer.iter().product());
    walk(&outer, [&outer_strides], [x.offset()], |[o]| {
        let (mut best, mut best_v) = (0usize, src[o]);
        for i in 1..n {
            if best_v.is_nan() {
                break;
            }
            let v = src[o + i * st];
            if v > best_v || v.is_nan() {
                best = i;
                best_v = v;
            }
        }
        // In range: n fits in i32, checked above.
        out.push(best as i32);
    });
    Ok(Tensor::from_kernel_i32(outer, out))
}

/// `exp(x - max) / sum(exp(x - max))` along `axis`.
pub fn softmax(x: &Tensor, axis: usize) -> Result<Tensor, KernelError> {
    let src = float_buffer(x, "softmax")?;
    check_axis(axis, x.rank(), "softmax")?;
    let shape = x.dims();
    let out_strides = contiguous_strides(&shape);
    let (n, st, ost) = (shape[axis], x.strides()[axis], out_strides[axis]);
    let (outer, in_outer) = without_axis(shape, x.stride_dims(), axis);
    let (_, out_outer) = without_axis(shape, out_strides, axis);
    let mut out = pool::zeros(x.numel());
    walk(&outer, [&in_outer, &out_outer], [x.offset(), 0], |[i, o]| {
        let max = (0..n)
            .map(|k| src[i + k * st])
            .fold(
                f32::NEG_INFINITY,
                |m, v| if v > m || v.is_nan() { v } else { m },
            );
        let mut sum = 0.0f64;
        for k in 0..n {
            let e = (src[i + k * st] - max).exp();
            out[o + k * ost] = e;
            sum += f64::from(e);
        }
        let inv = (1.0 / sum) as f32;
        for k in 0..n {
            out[o + k * ost] *= inv;
        }
    });
    Ok(Tensor::from_kernel_f32(x.dtype(), shape, out))
}
