//! Fused kernels of one layer's norms, GEMVs and epilogues (see `fusec_ir::FusedOp`).
//!
//! Each computes what the primitive ops it replaces compute, with the same roundings:
//! every intermediate that the eager graph holds in a half dtype (`f16`, `bf16`) is
//! rounded to it here too, and everything else is `f32`. The GEMVs go through
//! [`super::gemv`], whose plain path is bit-identical to the eager `linear`; a kernel's
//! GEMVs over the same rows run as one batch ([`gemv::gemv_many`]), which quantizes
//! each activation row once for all of them and splits all of them across the threads
//! as one parallel loop.

use fusec_ir::DType;

use super::elementwise::gelu_tanh;
use super::gemv::{self, Epilogue, GemvWeight};
use super::strided::{broadcast_shape, broadcast_strides, walk};
use super::{float_buffer, KernelError};
use crate::pool;
use crate::recycle;
use crate::rounding::round;
use crate::tensor::{Buffer, Dims, Tensor};

/// `x / (1 + exp(-x))`, as the eager `unary.silu` computes it.
#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Hugging Face's `LlamaRMSNorm` over the rows of `x [..., D]`, row-major, rounded as
/// the eager graph rounds: `r = rsqrt(mean(x^2) + eps)` in `f32` (the mean summed in
/// `f64`, as the `reduce` kernel does), `n = to(x.dtype)(x * r)`, `y = to(x.dtype)(w * n)`.
fn norm_rows(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    op: &str,
) -> Result<(Vec<f32>, usize, usize), KernelError> {
    norm_rows_with(x, w, eps, None, op)
}

/// [`norm_rows`], or with an `offset` `c` Gemma's norm (transformers'
/// `Gemma2RMSNorm`): `y = to(x.dtype)((x * r) * (w + c))`, the weight and its offset in
/// f32 and one rounding.
fn norm_rows_with(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    offset: Option<f32>,
    op: &str,
) -> Result<(Vec<f32>, usize, usize), KernelError> {
    let (xs, rows, d) = gemv::rows_of(x, op)?;
    float_buffer(w, op)?;
    if w.shape() != [d] {
        return Err(KernelError::Invalid(format!(
            "{op}: norm weight {:?} does not match the last axis of {:?}",
            w.shape(),
            x.shape()
        )));
    }
    if w.dtype() != x.dtype() {
        return Err(KernelError::Invalid(format!(
            "{op}: dtype mismatch: x {}, norm weight {}",
            x.dtype(),
            w.dtype()
        )));
    }
    let ws = w.contiguous_f32().unwrap_or_default();
    let dtype = x.dtype();
    let mut out = pool::take(rows * d);
    for row in xs.chunks(d.max(1)).take(rows) {
        let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / d as f64) as f32;
        let r = 1.0 / (mean + eps).sqrt();
        match offset {
            None => out.extend(
                row.iter()
                    .zip(ws.iter())
                    .map(|(&v, &g)| round(dtype, g * round(dtype, v * r))),
            ),
            Some(c) => out.extend(
                row.iter()
                    .zip(ws.iter())
                    .map(|(&v, &g)| round(dtype, (v * r) * (g + c))),
            ),
        }
    }
    Ok((out, rows, d))
}

/// A kernel result whose values its epilogue already rounded to `dtype` (inside the
/// GEMVs' parallel loop), wrapped without rounding them a second time.
fn rounded(dtype: DType, shape: Dims, data: Vec<f32>) -> Tensor {
    Tensor::contiguous(dtype, shape, Buffer::F32(pool::wrap(data)))
}

/// `x`'s shape with the last axis replaced by `n`.
fn with_last(x: &Tensor, n: usize) -> Dims {
    let mut shape = x.dims();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    shape
}

/// `fused.rms_norm(x, w, eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor, KernelError> {
    let (out, _, _) = norm_rows(x, w, eps, "fused.rms_norm")?;
    Ok(Tensor::from_kernel_f32(x.dtype(), x.dims(), out))
}

/// `fused.post_rms_norm(x, w, eps[, r])`: `Olmo2RMSNorm` (the weight multiplied in
/// `f32`, then one rounding to the dtype: `y = to(x.dtype)(w * (x * r))`, with the
/// statistics of [`norm_rows`]), then `to(x.dtype)(r + y)` when there is a residual.
pub fn post_rms_norm(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    residual: Option<&Tensor>,
) -> Result<Tensor, KernelError> {
    norm_f32_weight("fused.post_rms_norm", x, w, eps, None, residual)
}

/// `fused.offset_rms_norm(x, w, eps, c[, r])`: `[r +] to(T)(x32 * rsqrt(mean(x32^2) +
/// eps) * (w32 + c))`, Gemma's RMSNorm (transformers' `Gemma2RMSNorm.forward`), each
/// step rounded as the eager graph rounds it: the offset weight in f32, the product in
/// f32, one rounding to `T`, then the residual add.
pub fn offset_rms_norm(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    offset: f32,
    residual: Option<&Tensor>,
) -> Result<Tensor, KernelError> {
    norm_f32_weight("fused.offset_rms_norm", x, w, eps, Some(offset), residual)
}

/// The RMSNorms whose weight multiplies in f32 before the one rounding: OLMo 2's
/// (`offset` `None`: `w32 * (x32 * r)`) and Gemma's (`(x32 * r) * (w32 + c)`).
fn norm_f32_weight(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    offset: Option<f32>,
    residual: Option<&Tensor>,
) -> Result<Tensor, KernelError> {
    let (xs, rows, d) = gemv::rows_of(x, op)?;
    float_buffer(w, op)?;
    if w.shape() != [d] || w.dtype() != x.dtype() {
        return Err(KernelError::Invalid(format!(
            "{op}: norm weight {}{:?} does not match x {}{:?}",
            w.dtype(),
            w.shape(),
            x.dtype(),
            x.shape()
        )));
    }
    let rs = match residual {
        None => None,
        Some(r) => {
            if r.shape() != x.shape() || r.dtype() != x.dtype() {
                return Err(KernelError::Invalid(format!(
                    "{op}: residual {}{:?} does not match x {}{:?}",
                    r.dtype(),
                    r.shape(),
                    x.dtype(),
                    x.shape()
                )));
            }
            let rs = r.contiguous_f32().ok_or_else(|| {
                KernelError::Invalid(format!("{op} needs a float residual, got {}", r.dtype()))
            })?;
            Some(rs)
        }
    };
    let ws = w.contiguous_f32().unwrap_or_default();
    let dtype = x.dtype();
    let mut out = pool::take(rows * d);
    for row in xs.chunks(d.max(1)).take(rows) {
        let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / d as f64) as f32;
        let r = 1.0 / (mean + eps).sqrt();
        match offset {
            None => out.extend(
                row.iter()
                    .zip(ws.iter())
                    .map(|(&v, &g)| round(dtype, g * (v * r))),
            ),
            Some(c) => out.extend(
                row.iter()
                    .zip(ws.iter())
                    .map(|(&v, &g)| round(dtype, (v * r) * (g + c))),
            ),
        }
    }
    if let Some(rs) = rs {
        for (y, &res) in out.iter_mut().zip(rs.iter()) {
            *y = round(dtype, res + *y);
        }
    }
    Ok(rounded(dtype, x.dims(), out))
}

/// `fused.linear_post_rms_norm(x, W, w, eps, r)`: the GEMV rounded to the dtype, as
/// `linear` gives it, then [`post_rms_norm`] with the residual.
pub fn linear_post_rms_norm(
    x: &Tensor,
    wt: GemvWeight<'_>,
    w: &Tensor,
    eps: f32,
    r: &Tensor,
) -> Result<Tensor, KernelError> {
    linear_then_norm("fused.linear_post_rms_norm", x, wt, w, eps, None, r)
}

/// `fused.linear_offset_rms_norm(x, W, w, eps, c, r)`: the GEMV rounded to the dtype,
/// as `linear` gives it, then [`offset_rms_norm`] with the residual.
pub fn linear_offset_rms_norm(
    x: &Tensor,
    wt: GemvWeight<'_>,
    w: &Tensor,
    eps: f32,
    offset: f32,
    r: &Tensor,
) -> Result<Tensor, KernelError> {
    linear_then_norm(
        "fused.linear_offset_rms_norm",
        x,
        wt,
        w,
        eps,
        Some(offset),
        r,
    )
}

/// The GEMV, rounded, then the norm whose weight multiplies in f32 (OLMo 2's without
/// an offset, Gemma's with one) and the residual add.
fn linear_then_norm(
    op: &str,
    x: &Tensor,
    wt: GemvWeight<'_>,
    w: &Tensor,
    eps: f32,
    offset: Option<f32>,
    r: &Tensor,
) -> Result<Tensor, KernelError> {
    let (xs, rows, ins) = gemv::rows_of(x, op)?;
    gemv::check(op, x.dtype(), ins, wt)?;
    let mut y = None;
    let round_to = Epilogue::Round(x.dtype());
    gemv::gemv_many(&xs, rows, &[wt], None, round_to, |_, out| {
        y = Some(out);
        Ok(())
    })?;
    let y = y.ok_or_else(|| KernelError::Invalid(format!("{op}: the GEMV gave no result")))?;
    let y = rounded(x.dtype(), with_last(x, wt.shape()[0]), y);
    norm_f32_weight(op, &y, w, eps, offset, Some(r))
}

/// `fused.rms_norm_linear(x, w, eps, W1, .., Wn)`: one result per weight.
pub fn rms_norm_linear(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    weights: &[GemvWeight<'_>],
) -> Result<Vec<Tensor>, KernelError> {
    norm_linear("fused.rms_norm_linear", x, w, eps, None, weights)
}

/// `fused.offset_rms_norm_linear(x, w, eps, c, W1, .., Wn)`: Gemma's norm in the
/// GEMVs' prologue; one result per weight.
pub fn offset_rms_norm_linear(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    offset: f32,
    weights: &[GemvWeight<'_>],
) -> Result<Vec<Tensor>, KernelError> {
    norm_linear(
        "fused.offset_rms_norm_linear",
        x,
        w,
        eps,
        Some(offset),
        weights,
    )
}

fn norm_linear(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    offset: Option<f32>,
    weights: &[GemvWeight<'_>],
) -> Result<Vec<Tensor>, KernelError> {
    let (n, rows, d) = norm_rows_with(x, w, eps, offset, op)?;
    for &wt in weights {
        gemv::check(op, x.dtype(), d, wt)?;
    }
    let mut outs = recycle::tensors(weights.len());
    let round_to = Epilogue::Round(x.dtype());
    gemv::gemv_many(&n, rows, weights, None, round_to, |i, y| {
        outs.push(rounded(x.dtype(), with_last(x, weights[i].shape()[0]), y));
        Ok(())
    })?;
    pool::give(n);
    Ok(outs)
}

/// `fused.multi_linear(x, W1, .., Wn)`: one result per weight, each what `linear`
/// gives.
pub fn multi_linear(x: &Tensor, weights: &[GemvWeight<'_>]) -> Result<Vec<Tensor>, KernelError> {
    let op = "fused.multi_linear";
    let (xs, rows, d) = gemv::rows_of(x, op)?;
    for &wt in weights {
        gemv::check(op, x.dtype(), d, wt)?;
    }
    let mut outs = recycle::tensors(weights.len());
    let round_to = Epilogue::Round(x.dtype());
    gemv::gemv_many(&xs, rows, weights, None, round_to, |i, y| {
        outs.push(rounded(x.dtype(), with_last(x, weights[i].shape()[0]), y));
        Ok(())
    })?;
    Ok(outs)
}

/// `act(round(g)) * round(u)` with the eager roundings, for the gated-MLP kernels
/// (SwiGLU with `silu`, GeGLU with `gelu_tanh`).
#[allow(clippy::too_many_arguments)]
fn gated_rows(
    xs: &[f32],
    rows: usize,
    ins: usize,
    dtype: DType,
    wg: GemvWeight<'_>,
    wu: GemvWeight<'_>,
    act: fn(f32) -> f32,
    op: &str,
) -> Result<Vec<f32>, KernelError> {
    gemv::check(op, dtype, ins, wg)?;
    gemv::check(op, dtype, ins, wu)?;
    if wg.shape() != wu.shape() {
        return Err(KernelError::Invalid(format!(
            "{op}: gate {:?} and up {:?} weights differ",
            wg.shape(),
            wu.shape()
        )));
    }
    // The eager roundings, on each chunk of gate and up results inside the GEMVs'
    // parallel loop (the `exp` of SiLU is most of this kernel's work outside them).
    let combine = |g: &mut [f32], u: &[f32]| {
        for (a, &b) in g.iter_mut().zip(u) {
            let s = round(dtype, act(round(dtype, *a)));
            *a = round(dtype, s * round(dtype, b));
        }
    };
    let mut out = None;
    gemv::gemv_many(
        xs,
        rows,
        &[wg, wu],
        None,
        Epilogue::Pair(&combine),
        |_, y| {
            out = Some(y);
            Ok(())
        },
    )?;
    out.ok_or_else(|| KernelError::Invalid(format!("{op}: the GEMVs gave no result")))
}

/// `fused.swiglu(x, Wg, Wu) = silu(x @ Wg^T) * (x @ Wu^T)`.
pub fn swiglu(x: &Tensor, wg: GemvWeight<'_>, wu: GemvWeight<'_>) -> Result<Tensor, KernelError> {
    let (xs, rows, ins) = gemv::rows_of(x, "fused.swiglu")?;
    let out = gated_rows(&xs, rows, ins, x.dtype(), wg, wu, silu, "fused.swiglu")?;
    Ok(rounded(x.dtype(), with_last(x, wg.shape()[0]), out))
}

/// `fused.geglu(x, Wg, Wu) = gelu_tanh(x @ Wg^T) * (x @ Wu^T)`, the GELU as the eager
/// `unary.gelu_tanh` computes it.
pub fn geglu(x: &Tensor, wg: GemvWeight<'_>, wu: GemvWeight<'_>) -> Result<Tensor, KernelError> {
    let (xs, rows, ins) = gemv::rows_of(x, "fused.geglu")?;
    let out = gated_rows(&xs, rows, ins, x.dtype(), wg, wu, gelu_tanh, "fused.geglu")?;
    Ok(rounded(x.dtype(), with_last(x, wg.shape()[0]), out))
}

/// `fused.offset_rms_norm_geglu(x, w, eps, c, Wg, Wu)`: Gemma's norm, then GeGLU.
pub fn offset_rms_norm_geglu(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    offset: f32,
    wg: GemvWeight<'_>,
    wu: GemvWeight<'_>,
) -> Result<Tensor, KernelError> {
    let op = "fused.offset_rms_norm_geglu";
    let (n, rows, d) = norm_rows_with(x, w, eps, Some(offset), op)?;
    let out = gated_rows(&n, rows, d, x.dtype(), wg, wu, gelu_tanh, op)?;
    pool::give(n);
    Ok(rounded(x.dtype(), with_last(x, wg.shape()[0]), out))
}

/// `fused.rms_norm_swiglu(x, w, eps, Wg, Wu)`.
pub fn rms_norm_swiglu(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    wg: GemvWeight<'_>,
    wu: GemvWeight<'_>,
) -> Result<Tensor, KernelError> {
    let op = "fused.rms_norm_swiglu";
    let (n, rows, d) = norm_rows(x, w, eps, op)?;
    let out = gated_rows(&n, rows, d, x.dtype(), wg, wu, silu, op)?;
    pool::give(n);
    Ok(rounded(x.dtype(), with_last(x, wg.shape()[0]), out))
}

/// `fused.linear_add(x, W, r) = r + round(x @ W^T)`.
pub fn linear_add(x: &Tensor, w: GemvWeight<'_>, r: &Tensor) -> Result<Tensor, KernelError> {
    residual_epilogue("fused.linear_add", x, w, None, r)
}

/// `fused.linear_scale_add(x, W, c, r) = r + c * (x W^T)`: the GEMV result rounded to
/// the dtype, times `c` rounded (the eager `binary.mul` by a scalar), plus `r` rounded
/// (the eager `binary.add`).
pub fn linear_scale_add(
    x: &Tensor,
    w: GemvWeight<'_>,
    c: f32,
    r: &Tensor,
) -> Result<Tensor, KernelError> {
    residual_epilogue("fused.linear_scale_add", x, w, Some(c), r)
}

/// A GEMV with a residual-add epilogue, its result optionally scaled before the add.
fn residual_epilogue(
    op: &str,
    x: &Tensor,
    w: GemvWeight<'_>,
    scale: Option<f32>,
    r: &Tensor,
) -> Result<Tensor, KernelError> {
    let (xs, rows, ins) = gemv::rows_of(x, op)?;
    gemv::check(op, x.dtype(), ins, w)?;
    let shape = with_last(x, w.shape()[0]);
    if r.shape() != shape.as_slice() || r.dtype() != x.dtype() {
        return Err(KernelError::Invalid(format!(
            "{op}: residual {}{:?} does not match the GEMV result {}{shape:?}",
            r.dtype(),
            r.shape(),
            x.dtype()
        )));
    }
    let rs = r.contiguous_f32().ok_or_else(|| {
        KernelError::Invalid(format!("{op} needs a float residual, got {}", r.dtype()))
    })?;
    let dtype = x.dtype();
    if rs.len() != rows * w.shape()[0] {
        return Err(KernelError::Invalid(format!(
            "{op}: {} residual values for {rows} rows of {}",
            rs.len(),
            w.shape()[0]
        )));
    }
    // The residual add, on each chunk of results inside the GEMV's parallel loop.
    let add = |first: usize, ys: &mut [f32]| match scale {
        None => {
            for (v, &res) in ys.iter_mut().zip(&rs[first..]) {
                *v = round(dtype, res + round(dtype, *v));
            }
        }
        Some(c) => {
            for (v, &res) in ys.iter_mut().zip(&rs[first..]) {
                *v = round(dtype, res + round(dtype, round(dtype, *v) * c));
            }
        }
    };
    let mut y = None;
    gemv::gemv_many(&xs, rows, &[w], None, Epilogue::Each(&add), |_, out| {
        y = Some(out);
        Ok(())
    })?;
    let y = y.ok_or_else(|| KernelError::Invalid(format!("{op}: the GEMV gave no result")))?;
    Ok(rounded(dtype, shape, y))
}

/// `fused.rope(x, cos, sin) = x * cos + rotate_half(x) * sin`, with `cos` and `sin`
/// broadcasting to `x` and `rotate_half(x) = cat(-x[.., h:], x[.., :h])` (the half-split
/// layout of Hugging Face's Llama). Each product and the sum round to x's dtype, as the
/// eager `binary.mul` and `binary.add` do.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, KernelError> {
    let op = "fused.rope";
    let xd = float_buffer(x, op)?;
    let (cd, sd) = (float_buffer(cos, op)?, float_buffer(sin, op)?);
    let rank = x.rank();
    let hd = x.shape().last().copied().unwrap_or(0);
    if rank == 0 || hd % 2 != 0 {
        return Err(KernelError::Invalid(format!(
            "{op}: needs an even last axis, got {:?}",
            x.shape()
        )));
    }
    for (name, t) in [("cos", cos), ("sin", sin)] {
        let fits =
            t.rank() <= rank && broadcast_shape(x.shape(), t.shape()).as_deref() == Some(x.shape());
        if !fits || t.dtype() != x.dtype() {
            return Err(KernelError::Invalid(format!(
                "{op}: {name} {}{:?} does not broadcast to x {}{:?}",
                t.dtype(),
                t.shape(),
                x.dtype(),
                x.shape()
            )));
        }
    }
    let dtype = x.dtype();
    // The strides of `cos` and `sin` broadcast to `x`, held inline.
    let shape = x.dims();
    let cs = broadcast_strides(cos.shape(), cos.strides(), &shape);
    let ss = broadcast_strides(sin.shape(), sin.strides(), &shape);
    let (xl, cl, sl) = (x.strides()[rank - 1], cs[rank - 1], ss[rank - 1]);
    let outer = &x.shape()[..rank - 1];
    let half = hd / 2;
    let mut out = pool::take(x.numel());
    walk(
        outer,
        [&x.strides()[..rank - 1], &cs[..rank - 1], &ss[..rank - 1]],
        [x.offset(), cos.offset(), sin.offset()],
        |[xo, co, so]| {
            for j in 0..hd {
                let v = xd[xo + j * xl];
                let rot = if j < half {
                    -xd[xo + (j + half) * xl]
                } else {
                    xd[xo + (j - half) * xl]
                };
                let a = round(dtype, v * cd[co + j * cl]);
                let b = round(dtype, rot * sd[so + j * sl]);
                out.push(round(dtype, a + b));
            }
        },
    );
    Ok(Tensor::from_kernel_f32(dtype, shape, out))
}
