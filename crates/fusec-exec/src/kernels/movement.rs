//! Data movement: concatenation and contiguous copies, for any dtype.

use std::sync::Arc;

use super::strided::walk;
use super::{check_axis, KernelError};
use crate::tensor::{contiguous_strides, Buffer, Tensor};

/// A contiguous copy into a new buffer (`.contiguous()`, or the copy inside a
/// `reshape` that cannot be a view).
pub fn copy(x: &Tensor) -> Result<Tensor, KernelError> {
    Ok(x.clone_contiguous())
}

/// Concatenation along `axis` into a new buffer. Operands share dtype and rank and
/// agree on every other axis.
pub fn cat(xs: &[&Tensor], axis: usize) -> Result<Tensor, KernelError> {
    let Some(first) = xs.first() else {
        return Err(KernelError::Invalid(
            "cat: needs at least one operand".into(),
        ));
    };
    check_axis(axis, first.rank(), "cat")?;
    let mut shape = first.shape().to_vec();
    shape[axis] = 0;
    for x in xs {
        let agrees = x.dtype() == first.dtype()
            && x.rank() == first.rank()
            && x.shape()
                .iter()
                .zip(first.shape())
                .enumerate()
                .all(|(i, (a, b))| i == axis || a == b);
        if !agrees {
            return Err(KernelError::Invalid(format!(
                "cat: operand {}{:?} does not match {}{:?} outside axis {axis}",
                x.dtype(),
                x.shape(),
                first.dtype(),
                first.shape()
            )));
        }
        shape[axis] += x.shape()[axis];
    }
    let strides = contiguous_strides(&shape);
    let numel = shape.iter().product();
    let buffer = match first.buffer() {
        Buffer::F32(_) => Buffer::F32(Arc::new(cat_into(
            xs,
            axis,
            &strides,
            numel,
            Tensor::f32_buffer,
            0.0,
        )?)),
        Buffer::I32(_) => Buffer::I32(Arc::new(cat_into(
            xs,
            axis,
            &strides,
            numel,
            Tensor::i32_buffer,
            0,
        )?)),
    };
    Ok(Tensor::contiguous(first.dtype(), shape, buffer))
}

/// Copies each operand into its block of a contiguous output of `numel` elements.
fn cat_into<T: Copy>(
    xs: &[&Tensor],
    axis: usize,
    out_strides: &[usize],
    numel: usize,
    buffer: fn(&Tensor) -> Option<&[T]>,
    zero: T,
) -> Result<Vec<T>, KernelError> {
    let mut out = vec![zero; numel];
    let mut start = 0;
    for x in xs {
        let src =
            buffer(x).ok_or_else(|| KernelError::Invalid("cat: operand dtypes differ".into()))?;
        let base = [x.offset(), start * out_strides[axis]];
        let rank = x.rank();
        if rank > 0 && x.strides()[rank - 1] == 1 {
            // Rows that are contiguous in the operand (and always in the output) are
            // copied whole; the KV cache append is such a copy.
            let inner = x.shape()[rank - 1];
            let (outer, in_strides, dst_strides) =
                (&x.shape()[..rank - 1], &x.strides()[..rank - 1], &out_strides[..rank - 1]);
            walk(outer, [in_strides, dst_strides], base, |[i, o]| {
                out[o..o + inner].copy_from_slice(&src[i..i + inner])
            });
        } else {
            walk(x.shape(), [x.strides(), out_strides], base, |[i, o]| out[o] = src[i]);
        }
        start += x.shape()[axis];
    }
    Ok(out)
}
