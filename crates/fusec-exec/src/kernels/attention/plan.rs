//! One attention call's operands and geometry, and the three passes over one chunk of
//! query rows (see the module documentation of `super`).

use fusec_ir::DType;

use super::inner::Inner;
use super::portable::Portable;
use super::storage::{Kv, View4};
use crate::pool;
use crate::rounding::round;

/// Query rows that share one pass over their KV head's cache. A tile's query rows and
/// outputs (`ROW_TILE * head_dim` values each) stay in L1 while the key and value rows
/// stream past; eight covers the GQA groups of common models in one pass.
pub const ROW_TILE: usize = 8;

/// Value rows of a compact cache decoded at a time when several query rows share them
/// (16 KB of `f32` values at a `head_dim` of 128, which stay in L1 while every row of
/// the tile adds them).
pub(super) const VALUE_BLOCK: usize = 32;

/// Key rows of `f32` values that every query row of a tile scores before the next
/// block (8 KB at a `head_dim` of 64, which stay in L1 meanwhile).
const KEY_BLOCK: usize = 32;

/// The most negative finite value of `dtype`, the masked entries of an additive
/// mask (transformers fills them with `torch.finfo(dtype).min`). Attention skips the
/// keys a row's mask holds at or below it after the row's last visible key
/// ([`Plan::visible_end`]).
pub(crate) fn masked(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -65504.0,
        // 0xff7f: the largest finite bf16 magnitude, negative.
        DType::Bf16 => f32::from_bits(0xff7f_0000),
        _ => f32::MIN,
    }
}

/// One attention call's operands and geometry, shared by every chunk of rows.
pub(super) struct Plan<'a, T> {
    pub(super) q: View4<'a, f32>,
    /// The keys and values, both in the storage `T`.
    pub(super) k: View4<'a, T>,
    pub(super) v: View4<'a, T>,
    pub(super) mask: &'a [f32],
    pub(super) mask_offset: usize,
    /// The mask's strides broadcast to the scores `[batch, heads, tq, len]`.
    pub(super) mask_strides: [usize; 4],
    pub(super) dtype: DType,
    pub(super) scale: f32,
    /// Gemma 2's soft-cap `c` of the scaled scores, `tanh(s / c) * c`, if any.
    pub(super) softcap: Option<f32>,
    /// The scales of FP8 caches: keys, values.
    pub(super) k_scale: Option<f32>,
    pub(super) v_scale: Option<f32>,
    pub(super) heads: usize,
    pub(super) group: usize,
    pub(super) tq: usize,
    pub(super) len: usize,
    pub(super) hd: usize,
    /// Query rows per chunk: a divisor of `group * tq`, so that a chunk's rows share
    /// one KV head.
    pub(super) chunk_rows: usize,
    /// Positions the scores scratch has room for: the cache's capacity when the keys
    /// are a cache, so that its size does not change as the cache grows in place.
    pub(super) positions: usize,
}

impl<T: Kv> Plan<'_, T> {
    /// Chunk `index` of the output rows (`out`, zeroed, `rows * head_dim` long): every
    /// row shares one KV head, and rows are processed [`ROW_TILE`] at a time in the
    /// three passes of the module documentation, with the inner loops of `inner`.
    /// Inlined into the AVX2 path, so that the code around the inner loops is compiled
    /// for AVX2 too; the arithmetic is the same on every path.
    #[inline(always)]
    pub(super) fn chunk_body(&self, index: usize, out: &mut [f32], inner: &impl Inner) {
        let (hd, len) = (self.hd, self.len);
        let rows = out.len() / hd;
        let first = index * self.chunk_rows;
        let (b, h0) = (first / (self.heads * self.tq), first / self.tq % self.heads);
        let kvh = h0 / self.group;
        let tile = ROW_TILE.min(rows);
        // One scratch buffer, from this thread's pool, holds the tile's scores, its
        // query rows, and a key and a value row for views with strided rows. Its
        // capacity is asked for the cache's capacity, so that the pool hands back the
        // same buffer at every length the cache takes in place; only the part this
        // length uses is zeroed.
        // Compact values take a block of decoded value rows as well.
        let decoded = if T::COMPACT { VALUE_BLOCK * hd } else { 0 };
        let mut scratch = pool::take(tile * (self.positions + hd) + 2 * hd + decoded);
        scratch.resize(tile * (len + hd) + 2 * hd + decoded, 0.0);
        let (scores, rest) = scratch.split_at_mut(tile * len);
        let (queries, rest) = rest.split_at_mut(tile * hd);
        let (ktmp, rest) = rest.split_at_mut(hd);
        let (vtmp, vblock) = rest.split_at_mut(hd);
        // Whether this head's compact keys and values may hold a NaN code: one scan of
        // their bytes (which the passes then find in cache) lets the common case,
        // without any, decode without the per-value NaN fix-up.
        let k_nan = self.k.may_hold_nan(inner, b, kvh);
        let v_nan = self.v.may_hold_nan(inner, b, kvh);
        for start in (0..rows).step_by(tile) {
            let n = tile.min(rows - start);
            let at = |r: usize| {
                let g = first + start + r;
                (g / self.tq % self.heads, g % self.tq)
            };
            for (r, qrow) in queries.chunks_exact_mut(hd).take(n).enumerate() {
                let (h, t) = at(r);
                qrow.copy_from_slice(self.q.row(inner, (b, h, t), ktmp, false));
            }
            let mut ends = [len; ROW_TILE];
            for (r, end) in ends.iter_mut().take(n).enumerate() {
                let (h, t) = at(r);
                *end = self.visible_end(b, h, t);
            }
            let tile_end = ends[..n].iter().copied().max().unwrap_or(len);
            // Pass 1: every score of the tile, up to the last key a row sees (the
            // others' probabilities are set to 0 below). Key rows of `f32` values in
            // place are taken a block at a time, which every row of the tile scores
            // while the block is in L1, several keys at once (`Inner::dots`);
            // otherwise one key row is read per key (a compact row is decoded once,
            // into `ktmp`, for all the rows of the tile).
            match T::as_f32(self.k.data) {
                Some(keys) if self.k.strides[3] == 1 => {
                    let (base, stride) = (self.k.base(b, kvh, 0), self.k.strides[2]);
                    for from in (0..tile_end).step_by(KEY_BLOCK) {
                        for (r, qrow) in queries.chunks_exact(hd).take(n).enumerate() {
                            let to = ends[r].min(from + KEY_BLOCK);
                            if from < to {
                                let out = &mut scores[r * len + from..r * len + to];
                                inner.dots(qrow, keys, base + from * stride, stride, out);
                            }
                        }
                    }
                }
                _ => {
                    for j in 0..tile_end {
                        let krow = self.k.row(inner, (b, kvh, j), ktmp, k_nan);
                        for (r, qrow) in queries.chunks_exact(hd).take(n).enumerate() {
                            if j < ends[r] {
                                scores[r * len + j] = inner.dot(qrow, krow);
                            }
                        }
                    }
                }
            }
            // Pass 2: each row's softmax, in place, over its visible keys: a masked
            // key's `exp(mask - max)` is 0 and adds nothing to the sum.
            for r in 0..n {
                let (h, t) = at(r);
                let ms = self.mask_strides;
                let mask_base = self.mask_offset + b * ms[0] + h * ms[1] + t * ms[2];
                let row = &mut scores[r * len..(r + 1) * len];
                let (visible, hidden) = row.split_at_mut(ends[r]);
                self.softmax(visible, mask_base);
                hidden.fill(0.0);
            }
            // Pass 3: the weighted sum of the value rows.
            let outs = &mut out[start * hd..(start + n) * hd];
            if T::COMPACT && n > 1 && self.v.strides[3] == 1 {
                // Compact rows shared by several output rows: each block of value rows
                // is decoded once, then every output row of the tile adds it. Each
                // output value still sums its keys in key order, so the blocks change
                // no bit.
                let (base, stride) = (self.v.base(b, kvh, 0), self.v.strides[2]);
                for first in (0..tile_end).step_by(VALUE_BLOCK) {
                    let keys = VALUE_BLOCK.min(tile_end - first);
                    for (i, dst) in vblock.chunks_exact_mut(hd).take(keys).enumerate() {
                        let at = base + (first + i) * stride;
                        T::values(inner, &self.v.data[at..at + hd], dst, v_nan);
                    }
                    for (r, o) in outs.chunks_exact_mut(hd).enumerate() {
                        let probs = &scores[r * len + first..r * len + first + keys];
                        inner.accumulate(o, probs, vblock, 0, hd);
                    }
                }
            } else if self.v.strides[3] == 1 {
                // Rows in place: each output row accumulates in registers over all keys
                // (the value rows it reads again for the next row of the tile are in
                // L1 or L2 by then).
                let base = self.v.base(b, kvh, 0);
                for (r, o) in outs.chunks_exact_mut(hd).enumerate() {
                    let probs = &scores[r * len..r * len + ends[r]];
                    let stride = self.v.strides[2];
                    T::accumulate(inner, o, probs, self.v.data, base, stride, v_nan);
                }
            } else {
                for j in 0..tile_end {
                    let vrow = self.v.row(inner, (b, kvh, j), vtmp, true);
                    for (r, o) in outs.chunks_exact_mut(hd).enumerate() {
                        Portable.accumulate(o, &scores[r * len + j..][..1], vrow, 0, 0);
                    }
                }
            }
        }
        pool::give(scratch);
    }

    /// One past the last key that query row `(b, h, t)` can see: the keys after it
    /// are masked (the mask at or below [`masked`] of the dtype, a causal
    /// mask's future positions), and a row with no visible key sees them all. Their
    /// eager probability is `exp(s * scale + mask - max)` with a mask of -65504 or
    /// less and a maximum from a visible key: exactly 0, whatever the score, so the
    /// passes skip their dot products and value rows (the causal skipping of
    /// FlashAttention-2, Dao 2023) and every bit of the result stays. Only a non-finite
    /// score differs: eager turns a NaN or infinite product with a masked key into a
    /// NaN row, the skip does not look at it.
    #[inline(always)]
    fn visible_end(&self, b: usize, h: usize, t: usize) -> usize {
        let ms = self.mask_strides;
        let base = self.mask_offset + b * ms[0] + h * ms[1] + t * ms[2];
        let floor = masked(self.dtype);
        let mut end = self.len;
        while end > 0 && self.mask[base + (end - 1) * ms[3]] <= floor {
            end -= 1;
        }
        if end == 0 {
            self.len
        } else {
            end
        }
    }

    /// Turns one row's raw dot products into probabilities, in place: the scores
    /// rounded as the eager graph rounds them, then the eager softmax's arithmetic (see
    /// the module documentation), with an FP8 cache's scales applied.
    #[inline(always)]
    pub(super) fn softmax(&self, row: &mut [f32], mask_base: usize) {
        let (dtype, scale, step) = (self.dtype, self.scale, self.mask_strides[3]);
        let ks = self.k_scale.unwrap_or(1.0);
        let fp8 = self.k_scale.is_some();
        let mask = |j: usize| self.mask[mask_base + j * step];
        if let Some(c) = self.softcap {
            // The eager graph's roundings: the scaled score, the division, tanh, the
            // product and the masked sum, each to the dtype (no-ops in f32).
            for (j, s) in row.iter_mut().enumerate() {
                let raw = if fp8 { *s * ks } else { *s };
                let scaled = round(dtype, round(dtype, raw) * scale);
                let capped = round(dtype, round(dtype, round(dtype, scaled / c).tanh()) * c);
                *s = round(dtype, capped + mask(j));
            }
        } else if dtype == DType::F32 {
            // Rounding to f32 changes nothing; a loop without it vectorizes.
            match (fp8, step) {
                (false, 1) => {
                    let m = &self.mask[mask_base..mask_base + row.len()];
                    for (s, &m) in row.iter_mut().zip(m) {
                        *s = *s * scale + m;
                    }
                }
                (false, _) => {
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = *s * scale + mask(j);
                    }
                }
                (true, _) => {
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = *s * ks * scale + mask(j);
                    }
                }
            }
        } else {
            for (j, s) in row.iter_mut().enumerate() {
                let raw = if fp8 { *s * ks } else { *s };
                *s = round(dtype, round(dtype, round(dtype, raw) * scale) + mask(j));
            }
        }
        let max = nan_max(row);
        for s in row.iter_mut() {
            *s = (*s - max).exp();
        }
        // Summed in order in f64, as the eager softmax sums.
        let sum = row.iter().fold(0.0f64, |a, &e| a + f64::from(e));
        let inv = (1.0 / sum) as f32;
        let norm = match self.v_scale {
            Some(vs) => inv * vs,
            None => inv,
        };
        for s in row.iter_mut() {
            *s *= norm;
        }
    }
}

/// The largest value, or NaN if any value is NaN: the eager softmax's maximum (a fold
/// that keeps the first NaN), computed over eight lanes so that it vectorizes. Which
/// of two equal values, or of `0.0` and `-0.0`, it picks does not matter to
/// `exp(s - max)`.
#[inline(always)]
pub(super) fn nan_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut nan = false;
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
            nan |= x.is_nan();
        }
    }
    let mut max = lanes
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for &x in tail {
        max = if x > max { x } else { max };
        nan |= x.is_nan();
    }
    if nan {
        f32::NAN
    } else {
        max
    }
}
