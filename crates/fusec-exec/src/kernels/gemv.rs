//! The GEMV core shared by `linear` and every fused GEMV kernel, for plain weights
//! and for quantized (`dequant`) ones.
//!
//! A plain weight is multiplied exactly as [`super::matmul::linear`] does (the same
//! [`dot`] per output element), so a fused kernel gives bit-identical GEMV results to
//! the eager `linear` it replaces.
//!
//! A quantized weight `W = q * s_w` ([`QuantWeight`]) is never expanded into a
//! dequantized copy: each output reads the stored FP8 values of its row, and the scales
//! are applied once per output in the epilogue. With `act` an FP8 format the
//! activations are quantized too, per row (token), as CUDA would do it:
//!
//! 1. `s_x = absmax(x_row) / max(act)` (`numerics::scale_for`; 1 for an all-zero row);
//! 2. `x_q = act(x / s_x)`: IEEE division, then round to nearest even with saturation
//!    (a CUDA kernel must divide with `__fdiv_rn`, not multiply by `1 / s_x`, to match
//!    element by element);
//! 3. `acc = sum(x_q * q)` in `f32`: each product of two E4M3 values (4 significant bits
//!    each) is exact in `f32`, so only the accumulation order can differ from a GPU;
//! 4. `y = acc * (s_x * s_w[o])`, the scale product rounded once to `f32`.
//!
//! With `act` equal to the weight's compute dtype, activations stay as they are and
//! `y = acc * s_w[o]`.

use std::borrow::Cow;

use fusec_ir::{numerics, DType};
use rayon::prelude::*;

#[cfg(doc)]
use super::matmul::dot;
use super::rowdot::{self, Rows};
use super::{float_buffer, KernelError};
use crate::pool;
use crate::tensor::{Buffer, Tensor};

/// Multiply-adds below which a GEMV runs on the calling thread (as in `matmul`).
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// A quantized GEMV weight: the value of a `dequant` node. It launches nothing and is
/// read by the GEMV that consumes it.
#[derive(Clone, Debug)]
pub struct QuantWeight {
    /// The FP8 values `[out, in]` (an FP8 dtype, values exact in that format).
    pub values: Tensor,
    /// `f32[out]` (per output channel) or `f32[]` (per tensor).
    pub scale: Tensor,
    /// The compute dtype the weight stands for.
    pub to: DType,
    /// How the consuming GEMV treats its activations: an FP8 format quantizes them per
    /// row; `to` keeps them.
    pub act: DType,
}

impl QuantWeight {
    /// Checks the parts against each other, as the IR's type rule for `dequant` does.
    pub fn new(values: Tensor, scale: Tensor, to: DType, act: DType) -> Result<Self, KernelError> {
        if !values.dtype().is_fp8() || values.rank() != 2 {
            return Err(KernelError::Invalid(format!(
                "dequant: values must be an FP8 matrix, got {}{:?}",
                values.dtype(),
                values.shape()
            )));
        }
        let per_channel = scale.rank() == 1 && scale.shape()[0] == values.shape()[0];
        if scale.dtype() != DType::F32 || !(scale.rank() == 0 || per_channel) {
            return Err(KernelError::Invalid(format!(
                "dequant: scales must be f32[] or f32[{}], got {}{:?}",
                values.shape()[0],
                scale.dtype(),
                scale.shape()
            )));
        }
        if act != to && !act.is_fp8() {
            return Err(KernelError::Invalid(format!(
                "dequant: activations are {to} or FP8, not {act}"
            )));
        }
        Ok(QuantWeight {
            values,
            scale,
            to,
            act,
        })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> &[usize] {
        self.values.shape()
    }

    /// Bytes a GEMV reads: the stored values and the scales.
    pub fn read_bytes(&self) -> u64 {
        self.values.read_bytes() + self.scale.read_bytes()
    }

    /// The scale of output channel `o`.
    fn scale_of(scales: &[f32], o: usize) -> f32 {
        if scales.len() == 1 {
            scales[0]
        } else {
            scales[o]
        }
    }
}

/// A GEMV weight operand: a plain `[out, in]` tensor or a quantized one.
#[derive(Copy, Clone, Debug)]
pub enum GemvWeight<'a> {
    Dense(&'a Tensor),
    Quant(&'a QuantWeight),
}

impl GemvWeight<'_> {
    /// `[out, in]`.
    pub fn shape(&self) -> &[usize] {
        match self {
            GemvWeight::Dense(t) => t.shape(),
            GemvWeight::Quant(q) => q.shape(),
        }
    }

    /// The dtype of the weight as the graph sees it (the compute dtype of a quantized
    /// one).
    pub fn dtype(&self) -> DType {
        match self {
            GemvWeight::Dense(t) => t.dtype(),
            GemvWeight::Quant(q) => q.to,
        }
    }
}

/// Activations quantized per row: the FP8 values and each row's scale. The vectors
/// come from the buffer pool and go back to it when this is dropped.
#[derive(Debug)]
pub struct QuantRows {
    pub values: Vec<f32>,
    pub scales: Vec<f32>,
}

impl Drop for QuantRows {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.values));
        pool::give(std::mem::take(&mut self.scales));
    }
}

/// Quantizes each row of `xs` (`rows x ins`, row-major) to `act` with a dynamic scale
/// `absmax / max(act)` (see the module documentation).
pub fn quantize_rows(xs: &[f32], ins: usize, act: DType) -> QuantRows {
    let rows = xs.len().checked_div(ins).unwrap_or(0);
    let mut values = pool::take(xs.len());
    let mut scales = pool::take(rows);
    for row in xs.chunks(ins.max(1)).take(rows) {
        let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = numerics::scale_for(absmax, act);
        if act == DType::Fp8E4M3 {
            values.extend(row.iter().map(|&v| round_e4m3(v / s)));
        } else {
            values.extend(row.iter().map(|&v| numerics::round_to(act, v / s)));
        }
        scales.push(s);
    }
    QuantRows { values, scales }
}

/// `numerics::round_to(Fp8E4M3, x)`, bit for bit, without its generic conversion
/// (which measured about a fifth of an FP8 decode step, in the activation quantization
/// every GEMV does): round to nearest even at 3 mantissa bits on the `f32` bits for
/// normal E4M3 values, and at the subnormal quantum `2^-9` below `2^-6`. Values
/// outside `[-448, 448]` and non-finite ones, which a row scaled by its own absolute
/// maximum only produces by rounding, take the generic path and its saturation.
#[inline]
pub fn round_e4m3(x: f32) -> f32 {
    let a = x.abs();
    if a.is_nan() || a > 448.0 {
        return numerics::round_to(DType::Fp8E4M3, x);
    }
    if a < 1.0 / 64.0 {
        // Scaling by a power of two is exact, so this rounds `x` to a multiple of
        // `2^-9`, ties to even, and keeps the sign of zero.
        return (x * 512.0).round_ties_even() * (1.0 / 512.0);
    }
    // Drop the low 20 of the 23 mantissa bits, rounding to nearest even; a carry into
    // the exponent is the correct next binade, and `a <= 448` keeps it in range.
    let bits = x.to_bits();
    let rounded = bits + 0x7_FFFF + ((bits >> 20) & 1);
    f32::from_bits(rounded & !0xF_FFFF)
}

/// Checks that `w` multiplies rows of `ins` features of `dtype`.
pub fn check(op: &str, dtype: DType, ins: usize, w: GemvWeight<'_>) -> Result<(), KernelError> {
    let shape = w.shape();
    if shape.len() != 2 || shape[1] != ins {
        return Err(KernelError::Invalid(format!(
            "{op}: weight {shape:?} does not take {ins} input features"
        )));
    }
    if w.dtype() != dtype {
        return Err(KernelError::Invalid(format!(
            "{op}: dtype mismatch: activations {dtype}, weight {}",
            w.dtype()
        )));
    }
    Ok(())
}

/// `x @ W^T` for `rows` rows of `ins` values (`xs`, row-major), unrounded: the `f32`
/// results `[rows, out]`, row-major. `act` holds the rows already quantized for a
/// quantized weight with FP8 activations (computed once and shared by every GEMV that
/// reads the same rows); it is computed here when absent.
///
/// The weight is read in its stored format (`f32`, compact `bf16`/`f16` bits, or E4M3
/// bytes) by [`rowdot::dots`], which decodes in registers and sums in the order of
/// [`dot`], so every storage gives the results of the `f32` reference.
pub fn gemv(
    xs: &[f32],
    rows: usize,
    w: GemvWeight<'_>,
    act: Option<&QuantRows>,
) -> Result<Vec<f32>, KernelError> {
    let (outs, ins) = match w.shape() {
        [o, i] => (*o, *i),
        other => {
            return Err(KernelError::Invalid(format!(
                "gemv: weight must be [out, in], got {other:?}"
            )))
        }
    };
    if xs.len() != rows * ins {
        return Err(KernelError::Invalid(format!(
            "gemv: {} values are not {rows} rows of {ins}",
            xs.len()
        )));
    }
    let mut decoded = Vec::new();
    let owned;
    // The stored weight rows, the activations the products read, and for a quantized
    // weight the per-row activation scales (`None`: 1) and the weight scales.
    let (wrows, xq, sx, scales) = match w {
        GemvWeight::Dense(t) => (stored(t, &mut decoded, "gemv")?, xs, None, None),
        GemvWeight::Quant(q) => {
            let wrows = stored(&q.values, &mut decoded, "gemv")?;
            let scales = q.scale.contiguous_f32().unwrap_or_default();
            if q.act == q.to {
                (wrows, xs, None, Some(scales))
            } else {
                let rows_q = match act {
                    Some(a) if a.values.len() == xs.len() && a.scales.len() == rows => a,
                    _ => {
                        owned = quantize_rows(xs, ins, q.act);
                        &owned
                    }
                };
                (
                    wrows,
                    rows_q.values.as_slice(),
                    Some(rows_q.scales.as_slice()),
                    Some(scales),
                )
            }
        }
    };
    if wrows.len() != outs * ins {
        return Err(KernelError::Invalid(format!(
            "gemv: {} stored weight values are not [{outs}, {ins}]",
            wrows.len()
        )));
    }
    let epilogue = |acc: f32, o: usize, r: usize| match &scales {
        Some(s) => acc * (sx.map_or(1.0, |sx| sx[r]) * QuantWeight::scale_of(s, o)),
        None => acc,
    };
    if rows == 1 {
        // Decode: one activation row, the output features split across threads.
        let mut out = pool::zeros(outs);
        parallel_dots(xq, wrows, ins, &mut out);
        if scales.is_some() {
            for (o, y) in out.iter_mut().enumerate() {
                *y = epilogue(*y, o, 0);
            }
        }
        return Ok(out);
    }
    Ok(by_output_feature(outs, rows, ins, |o, r| {
        let mut y = [0.0f32];
        rowdot::dots(
            &xq[r * ins..(r + 1) * ins],
            wrows.range(o * ins, (o + 1) * ins),
            &mut y,
        );
        epilogue(y[0], o, r)
    }))
}

/// The stored values of a weight tensor as rows for [`rowdot::dots`]: its own buffer
/// when it is contiguous (the case of every bound weight), else its values gathered
/// into `decoded` as `f32`.
fn stored<'a>(t: &'a Tensor, decoded: &'a mut Vec<f32>, op: &str) -> Result<Rows<'a>, KernelError> {
    let (start, end) = (t.offset(), t.offset() + t.numel());
    if t.is_contiguous() && end <= t.storage_len() {
        match t.buffer() {
            Buffer::F32(b) => return Ok(Rows::F32(&b[start..end])),
            Buffer::U16(b) if t.dtype() == DType::F16 => return Ok(Rows::F16(&b[start..end])),
            Buffer::U16(b) => return Ok(Rows::Bf16(&b[start..end])),
            Buffer::U8(b) if t.dtype() == DType::Fp8E4M3 => return Ok(Rows::E4M3(&b[start..end])),
            Buffer::U8(_) | Buffer::I32(_) => {}
        }
    }
    *decoded = match t.buffer() {
        Buffer::I32(_) => {
            return Err(KernelError::Invalid(format!(
                "{op} needs a float weight, got {}",
                t.dtype()
            )))
        }
        _ => t.to_vec_f32(),
    };
    Ok(Rows::F32(decoded))
}

/// Blocks of output features per thread in a decode GEMV.
const CHUNKS_PER_THREAD: usize = 2;

/// `out[o] = dot(x, row o)` with the output features split into a few contiguous
/// blocks per thread (`CHUNKS_PER_THREAD`), each block a multiple of the four rows the
/// vector kernel handles at once: each task streams megabytes of weights, so the
/// scheduling cost of a handful of tasks is negligible, and a second block per thread
/// lets work stealing even out a core that another process slows down.
fn parallel_dots(x: &[f32], w: Rows<'_>, ins: usize, out: &mut [f32]) {
    let outs = out.len();
    let threads = rayon::current_num_threads();
    if outs * ins < PARALLEL_MIN_WORK || threads <= 1 {
        rowdot::dots(x, w, out);
        return;
    }
    let per = outs
        .div_ceil(threads * CHUNKS_PER_THREAD)
        .next_multiple_of(4);
    out.par_chunks_mut(per).enumerate().for_each(|(c, block)| {
        let start = c * per;
        rowdot::dots(x, w.range(start * ins, (start + block.len()) * ins), block);
    });
}

/// The row-major `[rows, outs]` result whose element `(r, o)` is `f(o, r)`, computed
/// feature-major (see [`feature_major`]) and laid out row-major after.
pub(crate) fn by_output_feature(
    outs: usize,
    rows: usize,
    ins: usize,
    f: impl Fn(usize, usize) -> f32 + Sync,
) -> Vec<f32> {
    let mut by_feature = pool::zeros(outs * rows);
    feature_major(&mut by_feature, rows, ins, f);
    if rows == 1 {
        return by_feature;
    }
    let mut out = pool::zeros(outs * rows);
    for (o, col) in by_feature.chunks(rows.max(1)).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            out[r * outs + o] = v;
        }
    }
    pool::give(by_feature);
    out
}

/// Fills `by_feature` (`[out, rows]`) with `f(o, r)`; computing feature-major streams
/// each weight row from memory once, and each value is computed by one thread in a
/// fixed order, so results do not depend on the thread count.
fn feature_major(
    by_feature: &mut [f32],
    rows: usize,
    ins: usize,
    f: impl Fn(usize, usize) -> f32 + Sync,
) {
    if rows == 0 {
        return;
    }
    let feature = |(o, col): (usize, &mut [f32])| {
        for (r, c) in col.iter_mut().enumerate() {
            *c = f(o, r);
        }
    };
    if by_feature.len() * ins >= PARALLEL_MIN_WORK {
        by_feature
            .par_chunks_mut(rows)
            .enumerate()
            .with_min_len(16)
            .for_each(feature);
    } else {
        by_feature.chunks_mut(rows).enumerate().for_each(feature);
    }
}

/// The rows of `x [..., in]` as one row-major slice, with the row count.
pub fn rows_of<'a>(x: &'a Tensor, op: &str) -> Result<(Cow<'a, [f32]>, usize, usize), KernelError> {
    float_buffer(x, op)?;
    if x.rank() == 0 {
        return Err(KernelError::Invalid(format!(
            "{op}: needs x [..., features], got a scalar"
        )));
    }
    let ins = x.shape()[x.rank() - 1];
    let rows = x.numel().checked_div(ins).unwrap_or(0);
    Ok((x.contiguous_f32().unwrap_or_default(), rows, ins))
}

/// `linear` with a plain or quantized weight: `x [..., in] @ W^T`, rounded to x's dtype.
pub fn linear(x: &Tensor, w: GemvWeight<'_>) -> Result<Tensor, KernelError> {
    let (xs, rows, ins) = rows_of(x, "linear")?;
    check("linear", x.dtype(), ins, w)?;
    let out = gemv(&xs, rows, w, None)?;
    let mut shape = x.dims();
    if let Some(last) = shape.last_mut() {
        *last = w.shape()[0];
    }
    Ok(Tensor::from_kernel_f32(x.dtype(), shape, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(x: f32) {
        let fast = round_e4m3(x);
        let slow = numerics::round_to(DType::Fp8E4M3, x);
        assert!(
            fast.to_bits() == slow.to_bits() || (fast.is_nan() && slow.is_nan()),
            "{x:e} ({:#x}): {fast:e} against {slow:e}",
            x.to_bits()
        );
    }

    #[test]
    fn fast_e4m3_rounding_matches_the_generic_one() {
        // Every E4M3 value, the midpoints between neighbours (the ties) and the `f32`
        // values on either side of each midpoint.
        let mut values: Vec<f32> = (0..=255u8)
            .map(crate::dtype::e4m3_value)
            .filter(|v| v.is_finite() && *v >= 0.0)
            .collect();
        values.sort_by(f32::total_cmp);
        values.dedup();
        for pair in values.windows(2) {
            let mid = (pair[0] + pair[1]) / 2.0;
            for v in [pair[0], mid, pair[1]] {
                for x in [
                    v,
                    f32::from_bits(v.to_bits() + 1),
                    f32::from_bits(v.to_bits().max(1) - 1),
                ] {
                    same(x);
                    same(-x);
                }
            }
        }
        // A sweep over every magnitude up to past the saturation point, and the
        // special values.
        let top = 600.0f32.to_bits();
        for bits in (0..top).step_by(997) {
            let x = f32::from_bits(bits);
            same(x);
            same(-x);
        }
        for x in [0.0, -0.0, 448.0, 449.0, 464.0, 1e9, f32::INFINITY, f32::NAN] {
            same(x);
            same(-x);
        }
    }
}
