//! Contractions: batched `matmul` with broadcast batch axes, and `linear` (`x @ W^T`).
//!
//! Products accumulate in `f32` by fused multiply-adds over four accumulators of
//! eight lanes ([`super::dot::dot`]); each
//! output element is computed by one thread in a fixed order, so results do not depend
//! on the thread count.

use rayon::prelude::*;

use super::dot::dot;
use super::strided::{broadcast_shape, broadcast_strides};
use super::{float_buffer, same_dtype, KernelError};
use crate::pool;
use crate::tensor::Tensor;

/// Multiply-adds below which a contraction runs on the calling thread: splitting
/// smaller ones costs more in scheduling than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// `torch.matmul` for operands of rank >= 2: `[..., M, K] @ [..., K, N]` with the
/// batch axes broadcast.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor, KernelError> {
    let dtype = same_dtype(a, b, "matmul")?;
    let (da, db) = (float_buffer(a, "matmul")?, float_buffer(b, "matmul")?);
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || rb < 2 {
        return Err(KernelError::Invalid(format!(
            "matmul: operands must have rank >= 2, got {:?} and {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let (m, k, n) = (a.shape()[ra - 2], a.shape()[ra - 1], b.shape()[rb - 1]);
    if b.shape()[rb - 2] != k {
        return Err(KernelError::Invalid(format!(
            "matmul: contracted axes differ: {:?} @ {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let batch = broadcast_shape(&a.shape()[..ra - 2], &b.shape()[..rb - 2]).ok_or_else(|| {
        KernelError::Invalid(format!(
            "matmul: batch axes of {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        ))
    })?;
    let sa = broadcast_strides(&a.shape()[..ra - 2], &a.strides()[..ra - 2], &batch);
    let sb = broadcast_strides(&b.shape()[..rb - 2], &b.strides()[..rb - 2], &batch);
    let mut shape = batch;
    shape.push(m)?;
    shape.push(n)?;
    let batches: usize = batch.iter().product();

    let layout = Layout {
        k,
        n,
        a_strides: (a.strides()[ra - 2], a.strides()[ra - 1]),
        b_strides: (b.strides()[rb - 2], b.strides()[rb - 1]),
    };
    // Where product `i` starts in each operand: batch index `i` unravelled row-major
    // over the batch axes, O(rank) and nothing stored.
    let start = |i: usize| {
        let (mut oa, mut ob, mut rest) = (a.offset(), b.offset(), i);
        for d in (0..batch.len()).rev() {
            let j = rest % batch[d];
            rest /= batch[d];
            oa += j * sa[d];
            ob += j * sb[d];
        }
        (oa, ob)
    };
    let mut out = pool::zeros(batches * m * n);
    if m * n > 0 {
        let work = batches * m * n * k;
        let body = |(i, block): (usize, &mut [f32])| {
            let (oa, ob) = start(i);
            layout.run(da, oa, db, ob, block);
        };
        if work >= PARALLEL_MIN_WORK {
            out.par_chunks_mut(m * n).enumerate().for_each(body);
        } else {
            out.chunks_mut(m * n).enumerate().for_each(body);
        }
    }
    Ok(Tensor::from_kernel_f32(dtype, shape, out))
}

/// The geometry of one `[M, K] @ [K, N]` product of a batched matmul.
struct Layout {
    k: usize,
    n: usize,
    /// Strides of `a` along M and K.
    a_strides: (usize, usize),
    /// Strides of `b` along K and N.
    b_strides: (usize, usize),
}

impl Layout {
    /// Writes `a[oa..] @ b[ob..]` into `out` (`M * N`, row-major, zeroed).
    fn run(&self, a: &[f32], oa: usize, b: &[f32], ob: usize, out: &mut [f32]) {
        let (sam, sak) = self.a_strides;
        let (sbk, sbn) = self.b_strides;
        // The row of `a` is gathered into a contiguous scratch buffer from this
        // thread's pool, given back below.
        let mut row = pool::take(self.k);
        for (i, out_row) in out.chunks_mut(self.n).enumerate() {
            row.clear();
            row.extend((0..self.k).map(|p| a[oa + i * sam + p * sak]));
            if sbk == 1 || self.k == 1 {
                // Columns of b are contiguous (e.g. a transposed K cache): dot products.
                for (j, o) in out_row.iter_mut().enumerate() {
                    let col = ob + j * sbn;
                    *o = dot(&row, &b[col..col + self.k]);
                }
            } else if sbn == 1 {
                // Rows of b are contiguous (e.g. the V cache): accumulate scaled rows.
                for (p, &x) in row.iter().enumerate() {
                    let start = ob + p * sbk;
                    for (o, &y) in out_row.iter_mut().zip(&b[start..start + self.n]) {
                        *o += x * y;
                    }
                }
            } else {
                for (j, o) in out_row.iter_mut().enumerate() {
                    *o = (0..self.k)
                        .map(|p| row[p] * b[ob + p * sbk + j * sbn])
                        .sum();
                }
            }
        }
        pool::give(row);
    }
}

/// `torch.nn.functional.linear` without bias: `x [..., in] @ w^T` for `w [out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor, KernelError> {
    let dtype = same_dtype(x, w, "linear")?;
    float_buffer(x, "linear")?;
    float_buffer(w, "linear")?;
    if w.rank() != 2 || x.rank() == 0 || x.shape()[x.rank() - 1] != w.shape()[1] {
        return Err(KernelError::Invalid(format!(
            "linear: needs x [..., in] and w [out, in], got {:?} and {:?}",
            x.shape(),
            w.shape()
        )));
    }
    let (outs, ins) = (w.shape()[0], w.shape()[1]);
    let rows = x.numel() / ins.max(1);
    let xs = x.contiguous_f32().unwrap_or_default();
    let ws = w.contiguous_f32().unwrap_or_default();
    // A prefill step's rows run as a GEMM (its own summation order); a decode step's
    // as dot products in `dot`'s order, each output feature a dot product of one
    // weight row with every input row, computed feature-major so that each weight row
    // streams from memory once.
    let out = if rows >= super::gemv::GEMM_MIN_ROWS {
        super::gemm::gemm(
            &xs,
            rows,
            ins,
            super::rowdot::Rows::F32(&ws),
            outs,
            &|_, _, v| v,
        )
    } else {
        super::gemv::by_output_feature(outs, rows, ins, |o, r| {
            dot(&xs[r * ins..(r + 1) * ins], &ws[o * ins..(o + 1) * ins])
        })
    };
    let mut shape = x.dims();
    if let Some(last) = shape.last_mut() {
        *last = outs;
    }
    Ok(Tensor::from_kernel_f32(dtype, shape, out))
}
