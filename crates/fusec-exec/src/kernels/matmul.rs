//! Contractions: batched `matmul` with broadcast batch axes, and `linear` (`x @ W^T`).
//!
//! Products accumulate in `f32` over four accumulators of eight lanes ([`dot`]); each
//! output element is computed by one thread in a fixed order, so results do not depend
//! on the thread count.

use rayon::prelude::*;

use super::strided::{broadcast_shape, broadcast_strides};
use super::{float_buffer, same_dtype, KernelError};
use crate::pool;
use crate::tensor::Tensor;

/// Multiply-adds below which a contraction runs on the calling thread: splitting
/// smaller ones costs more in scheduling than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Values per accumulator lane group: one AVX vector of `f32`.
pub const LANES: usize = 8;

/// Independent accumulators of [`LANES`] lanes in [`dot`]. One accumulator makes
/// every addition wait for the previous one (a dependency chain as long as the row,
/// paced by the add latency); four let a core keep four additions in flight, which is
/// what lets the fast row-dot kernels stream weights at memory speed.
pub const ACCUMULATORS: usize = 4;

/// The dot product of two equally long slices (the shorter length if they differ).
///
/// This is the one summation order that `linear`, every fused GEMV and the AVX2
/// row-dot kernels share, so that they all give bit-identical results:
///
/// 1. chunk `c` of [`LANES`] values (`c = 0, 1, ...`, full chunks only) adds its
///    products lane by lane into accumulator `c % ACCUMULATORS`, each product and sum
///    rounded separately;
/// 2. the four accumulators are combined lane by lane as `(a0 + a1) + (a2 + a3)`;
/// 3. the eight lanes `v` are reduced as `((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7))`;
/// 4. the products of the last `len % LANES` values are added in order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [[0.0f32; LANES]; ACCUMULATORS];
    let (ca, cb) = (
        a.chunks_exact(LANES * ACCUMULATORS),
        b.chunks_exact(LANES * ACCUMULATORS),
    );
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for (k, lanes) in acc.iter_mut().enumerate() {
            for (i, l) in lanes.iter_mut().enumerate() {
                *l += x[k * LANES + i] * y[k * LANES + i];
            }
        }
    }
    // The remaining full chunks (at most three) continue the round-robin at
    // accumulator 0, since the chunks before them filled whole rounds.
    let (ca, cb) = (ra.chunks_exact(LANES), rb.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for ((x, y), lanes) in ca.zip(cb).zip(acc.iter_mut()) {
        for (i, l) in lanes.iter_mut().enumerate() {
            *l += x[i] * y[i];
        }
    }
    let mut s = reduce_accumulators(&acc);
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// Steps 2 and 3 of [`dot`]'s order: the accumulators combined, then the lanes reduced.
#[inline]
pub fn reduce_accumulators(acc: &[[f32; LANES]; ACCUMULATORS]) -> f32 {
    let v: [f32; LANES] =
        std::array::from_fn(|i| (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]));
    ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
}

/// [`dot`]'s order over `n` products given by `product(i)`: the reference for dot
/// products whose second operand is decoded on the fly (compact weights).
#[inline]
pub fn dot_by(n: usize, product: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [[0.0f32; LANES]; ACCUMULATORS];
    let main = n - n % LANES;
    for j in (0..main).step_by(LANES) {
        let lanes = &mut acc[(j / LANES) % ACCUMULATORS];
        for (i, l) in lanes.iter_mut().enumerate() {
            *l += product(j + i);
        }
    }
    let mut s = reduce_accumulators(&acc);
    for j in main..n {
        s += product(j);
    }
    s
}

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
    // Each output feature is a dot product of one weight row with every input row;
    // computing feature-major streams each weight row from memory once.
    let out = super::gemv::by_output_feature(outs, rows, ins, |o, r| {
        dot(&xs[r * ins..(r + 1) * ins], &ws[o * ins..(o + 1) * ins])
    });
    let mut shape = x.dims();
    if let Some(last) = shape.last_mut() {
        *last = outs;
    }
    Ok(Tensor::from_kernel_f32(dtype, shape, out))
}
