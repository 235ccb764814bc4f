//! `fused.paged_attention`: decode attention over a paged KV cache (Kwon et al. 2023,
//! "Efficient Memory Management for Large Language Model Serving with PagedAttention",
//! section 4.1), with the step's new entries written in place into their blocks.
//!
//! Each layer's keys and values live in a pool `[P, KV, BS, hd]` of blocks of `BS`
//! positions. Sequence `b` of the batch, at position `p = positions[b]`, owns the
//! blocks `table[b, 0..]` in order: its position `j` is slot `j mod BS` of block
//! `table[b, j / BS]`. The kernel first writes each sequence's new key and value at
//! position `p`, then computes, for every query head, attention over the positions
//! `0 ..= p` (a sliding window of `W` keeps `p - W < j <= p`), reading the key and
//! value rows in place block by block. Sequences of one batch may have any lengths;
//! nothing is read past a sequence's own position, so no mask is needed.
//!
//! The arithmetic per query row is the dense decode attention's (see the module
//! documentation of `super`): scores as [`super::super::dot::dot`], rounded as the
//! eager graph rounds them (the all-zero mask of a dense decode step adds nothing),
//! the eager softmax (maximum, `exp` in `f32`, the sum in `f64`, the reciprocal
//! rounded to `f32`) and the weighted sum of the value rows in key order, skipping
//! probabilities of exactly 0. So a sequence gets the bits a dense cache of its own
//! length gives (its positions in the same order), whatever else shares the batch.
//! Rows are independent and each is computed by one thread, so results do not depend
//! on the thread count.

use fusec_ir::DType;

use super::super::dot::dot;
use super::super::{float_buffer, KernelError};
use super::plan::nan_max;
use crate::pool;
use crate::rounding::round;
use crate::team;
use crate::tensor::{Dims, Tensor};

/// Multiply-adds below which the rows run on the calling thread (as `full.rs`).
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// The new entries and the pools of [`paged_attention`].
#[derive(Debug)]
pub struct Pages<'a> {
    /// This step's rotated keys and values, `[B, KV, 1, hd]`.
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// The pools `[P, KV, BS, hd]`, written in place (copied first when shared).
    pub pool_k: &'a mut Tensor,
    pub pool_v: &'a mut Tensor,
    /// `[B, M]` i32: each sequence's blocks in order.
    pub table: &'a Tensor,
    /// `[B, 1]` i32: each sequence's position this step.
    pub positions: &'a Tensor,
}

/// The geometry of one call, checked.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    blocks: usize,
    block_size: usize,
    width: usize,
}

/// `(out [B,H,1,hd], bytes of pools copied, bytes of the pools read)`: see the module
/// documentation. `window` is a sliding window in positions.
pub fn paged_attention(
    q: &Tensor,
    pages: Pages<'_>,
    scale: f32,
    window: Option<usize>,
) -> Result<(Tensor, u64, u64), KernelError> {
    let op = "fused.paged_attention";
    let g = geometry(q, &pages, op)?;
    let table = int_values(pages.table, op, "block table")?;
    let positions = int_values(pages.positions, op, "positions")?;
    // The positions sequence `b` attends to, `start ..= p` (checked below).
    let span = |b: usize| {
        let p = positions[b].max(0) as usize;
        (window.map_or(0, |w| (p + 1).saturating_sub(w.max(1))), p)
    };
    // Every position a sequence reads or writes must be in a block of the pool.
    for b in 0..g.batch {
        let p = usize::try_from(positions[b]).map_err(|_| {
            KernelError::Invalid(format!(
                "{op}: sequence {b} has negative position {}",
                positions[b]
            ))
        })?;
        let (start, _) = span(b);
        if p / g.block_size >= g.width {
            return Err(KernelError::Invalid(format!(
                "{op}: position {p} of sequence {b} is past its {} blocks of {}",
                g.width, g.block_size
            )));
        }
        for i in start / g.block_size..=p / g.block_size {
            let block = table[b * g.width + i];
            if usize::try_from(block).map_or(true, |x| x >= g.blocks) {
                return Err(KernelError::Invalid(format!(
                    "{op}: block {block} of sequence {b} (its block {i}) is not in the pool of {}",
                    g.blocks
                )));
            }
        }
    }
    let mut copied = 0;
    for pool_t in [&mut *pages.pool_k, &mut *pages.pool_v] {
        if !pool_t.is_unique() || !pool_t.is_contiguous() || pool_t.offset() != 0 {
            copied += pool_t.bytes();
            *pool_t = pool_t.clone_contiguous();
        }
    }
    // The writes: each sequence's new entry at its position, every KV head.
    let row = |b: usize, kvh: usize| ((b * g.kv_heads + kvh) * g.block_size) * g.hd;
    for (new, pool_t) in [(pages.k, &mut *pages.pool_k), (pages.v, &mut *pages.pool_v)] {
        let src = float_buffer(new, op)?;
        let (o, s) = (new.offset(), new.strides());
        let buf = pool_t.unique_f32_mut().ok_or_else(|| {
            KernelError::Invalid(format!("{op}: the pool is shared after copying"))
        })?;
        for b in 0..g.batch {
            let p = positions[b] as usize;
            let block = table[b * g.width + p / g.block_size] as usize;
            for kvh in 0..g.kv_heads {
                let at = row(block, kvh) + (p % g.block_size) * g.hd;
                for (d, dst) in buf[at..at + g.hd].iter_mut().enumerate() {
                    *dst = src[o + b * s[0] + kvh * s[1] + d * s[3]];
                }
            }
        }
    }
    let (kbuf, vbuf) = (
        float_buffer(pages.pool_k, op)?,
        float_buffer(pages.pool_v, op)?,
    );
    let qbuf = float_buffer(q, op)?;
    let (qo, qs) = (q.offset(), q.strides());
    let (dtype, group) = (q.dtype(), g.heads / g.kv_heads);
    let keys: usize = (0..g.batch).map(|b| span(b).1 + 1 - span(b).0).sum();
    let parallel = keys * g.heads * g.hd >= PARALLEL_MIN_WORK;
    let mut out = pool::zeros(g.batch * g.heads * g.hd);
    team::for_each_chunk_mut(&mut out, g.hd.max(1), parallel, |r, o| {
        let (b, h) = (r / g.heads, r % g.heads);
        let kvh = h / group;
        let (start, p) = span(b);
        let len = p + 1 - start;
        let mut scratch = pool::take(g.hd + len);
        scratch.resize(g.hd + len, 0.0);
        let (qrow, scores) = scratch.split_at_mut(g.hd);
        for (d, x) in qrow.iter_mut().enumerate() {
            *x = qbuf[qo + b * qs[0] + h * qs[1] + d * qs[3]];
        }
        let at = |j: usize| {
            let block = table[b * g.width + j / g.block_size] as usize;
            row(block, kvh) + (j % g.block_size) * g.hd
        };
        for (i, s) in scores.iter_mut().enumerate() {
            let k = at(start + i);
            *s = dot(qrow, &kbuf[k..k + g.hd]);
        }
        softmax(scores, dtype, scale);
        for (i, &w) in scores.iter().enumerate() {
            if w != 0.0 {
                let v = at(start + i);
                for (a, &x) in o.iter_mut().zip(&vbuf[v..v + g.hd]) {
                    *a += w * x;
                }
            }
        }
        pool::give(scratch);
    });
    // Each sequence's blocks are read once per KV head's group (keys and values).
    let read = 2 * (keys * g.kv_heads * g.hd * 4) as u64;
    Ok((
        Tensor::from_kernel_f32(dtype, Dims::from([g.batch, g.heads, 1, g.hd]), out),
        copied,
        read,
    ))
}

/// One row's scores to probabilities, as the dense decode attention computes them
/// (`Plan::softmax` with an all-zero mask; see the module documentation of `super`).
fn softmax(row: &mut [f32], dtype: DType, scale: f32) {
    for s in row.iter_mut() {
        *s = match dtype {
            DType::F32 => *s * scale + 0.0,
            _ => round(dtype, round(dtype, round(dtype, *s) * scale) + 0.0),
        };
    }
    let max = nan_max(row);
    for s in row.iter_mut() {
        *s = (*s - max).exp();
    }
    let sum = row.iter().fold(0.0f64, |a, &e| a + f64::from(e));
    let inv = (1.0 / sum) as f32;
    for s in row.iter_mut() {
        *s *= inv;
    }
}

/// The contiguous `i32` values of a small index tensor.
fn int_values<'a>(t: &'a Tensor, op: &str, what: &str) -> Result<&'a [i32], KernelError> {
    match (t.i32_buffer(), t.is_contiguous()) {
        (Some(buf), true) => Ok(&buf[t.offset()..t.offset() + t.numel()]),
        _ => Err(KernelError::Invalid(format!(
            "{op}: the {what} must be contiguous i32 values"
        ))),
    }
}

fn geometry(q: &Tensor, pages: &Pages<'_>, op: &str) -> Result<Geometry, KernelError> {
    let (qs, ks, ps) = (q.shape(), pages.k.shape(), pages.pool_k.shape());
    let bad = || {
        KernelError::Invalid(format!(
            "{op}: q {qs:?}, k {ks:?}, v {:?}, pools {ps:?} and {:?}, table {:?}, positions {:?} do not agree",
            pages.v.shape(),
            pages.pool_v.shape(),
            pages.table.shape(),
            pages.positions.shape()
        ))
    };
    if qs.len() != 4 || ks.len() != 4 || ps.len() != 4 || pages.table.rank() != 2 {
        return Err(bad());
    }
    let g = Geometry {
        batch: qs[0],
        heads: qs[1],
        kv_heads: ks[1],
        hd: qs[3],
        blocks: ps[0],
        block_size: ps[2],
        width: pages.table.shape()[1],
    };
    let agree = qs[2] == 1
        && ks == [g.batch, g.kv_heads, 1, g.hd]
        && pages.v.shape() == ks
        && ps[1] == g.kv_heads
        && ps[3] == g.hd
        && pages.pool_v.shape() == ps
        && g.block_size > 0
        && g.kv_heads > 0
        && g.heads.is_multiple_of(g.kv_heads)
        && pages.table.shape()[0] == g.batch
        && pages.positions.numel() == g.batch;
    if !agree {
        return Err(bad());
    }
    let dtypes = [pages.k, pages.v, &*pages.pool_k, &*pages.pool_v]
        .iter()
        .all(|t| t.dtype() == q.dtype());
    if !dtypes {
        return Err(KernelError::Invalid(format!(
            "{op}: q, k, v and the pools must share the dtype {}",
            q.dtype()
        )));
    }
    Ok(g)
}
