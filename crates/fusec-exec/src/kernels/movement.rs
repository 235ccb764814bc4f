//! Data movement: concatenation and contiguous copies, for any dtype.

use super::{check_axis, KernelError};
use crate::pool;
use crate::tensor::{gather_into, Buffer, Tensor, MAX_RANK};

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
    let mut shape = first.dims();
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
    let numel = shape.iter().product();
    let buffer = match first.buffer() {
        Buffer::F32(_) => Buffer::F32(pool::wrap(cat_into(
            xs,
            axis,
            Tensor::f32_buffer,
            pool::take(numel),
        )?)),
        Buffer::I32(_) => Buffer::I32(pool::wrap(cat_into(
            xs,
            axis,
            Tensor::i32_buffer,
            pool::take(numel),
        )?)),
        Buffer::U16(_) | Buffer::U8(_) => {
            return Err(KernelError::Invalid(
                "cat: compact weight storage is only read by GEMVs".into(),
            ))
        }
    };
    Ok(Tensor::contiguous(first.dtype(), shape, buffer))
}

/// Appends the concatenation to `out` in output order: for each index of the axes
/// before `axis`, each operand's block of the remaining axes in turn. A block of a
/// contiguous operand (the whole cached KV of one head) is one slice copy.
fn cat_into<T: pool::Pooled>(
    xs: &[&Tensor],
    axis: usize,
    buffer: fn(&Tensor) -> Option<&[T]>,
    mut out: Vec<T>,
) -> Result<Vec<T>, KernelError> {
    if xs.iter().any(|x| buffer(x).is_none()) {
        pool::give(out);
        return Err(KernelError::Invalid("cat: operand dtypes differ".into()));
    }
    let outer = &xs[0].shape()[..axis];
    // `axis` is below the operands' rank, so the odometer fits.
    let mut index = [0usize; MAX_RANK];
    let index = &mut index[..axis];
    for _ in 0..outer.iter().product::<usize>() {
        for x in xs {
            let src = buffer(x).unwrap_or_default();
            let base = x.offset()
                + index
                    .iter()
                    .zip(x.strides())
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            gather_into(
                src,
                &x.shape()[axis..],
                &x.strides()[axis..],
                base,
                &mut out,
            );
        }
        // Advance the outer index like an odometer.
        for d in (0..axis).rev() {
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}
