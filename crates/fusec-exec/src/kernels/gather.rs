//! Row gathers: the embedding lookup.

use super::strided::walk;
use super::{float_buffer, KernelError};
use crate::pool;
use crate::tensor::Tensor;

/// `table[ids]`: for `table [V, D]` and `i32` ids of any shape, the rows `[..., D]`.
/// An id outside `0..V` is an error, not a panic.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor, KernelError> {
    let data = float_buffer(table, "embedding")?;
    if table.rank() != 2 {
        return Err(KernelError::Invalid(format!(
            "embedding: table must be [vocab, dim], got {:?}",
            table.shape()
        )));
    }
    let id_values = ids.i32_buffer().ok_or_else(|| {
        KernelError::Invalid(format!("embedding: ids must be i32, got {}", ids.dtype()))
    })?;
    let mut shape = ids.dims();
    let (vocab, dim) = (table.shape()[0], table.shape()[1]);
    shape.push(dim)?;
    let (row_stride, col_stride) = (table.strides()[0], table.strides()[1]);
    let mut out = pool::take(ids.numel() * dim);
    // The ids are read through their view in place; the first one out of range stops
    // the gather.
    let mut bad = None;
    walk(ids.shape(), [ids.strides()], [ids.offset()], |[i]| {
        let id = id_values[i];
        if bad.is_some() {
            return;
        }
        let Some(row) = usize::try_from(id).ok().filter(|&r| r < vocab) else {
            bad = Some(id);
            return;
        };
        let start = table.offset() + row * row_stride;
        if col_stride == 1 {
            out.extend_from_slice(&data[start..start + dim]);
        } else {
            walk(&[dim], [&[col_stride]], [start], |[o]| out.push(data[o]));
        }
    });
    if let Some(id) = bad {
        pool::give(out);
        return Err(KernelError::TokenOutOfRange {
            id: i64::from(id),
            vocab,
        });
    }
    Ok(Tensor::from_kernel_f32(table.dtype(), shape, out))
}
