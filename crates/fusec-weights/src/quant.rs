//! FP8 weights of a lowered graph, made from the weights of the unlowered one.
//!
//! The FP8 lowering (`fusec_rewrite::precision`) names weights that no checkpoint
//! holds, after the weight they come from (the suffixes are
//! [`fusec_ir::step::FP8_SUFFIX`] and [`fusec_ir::step::SCALE_SUFFIX`]):
//!
//! - `W.fp8 : fp8e4m3[o, i]` and `W.scale : f32[o]` (or `f32[]`), the operands of a
//!   `dequant{to=T}` that stands for the weight `W : T[o, i]`. They are made from `W` as
//!   the compute-precision graph holds it (rounded to `T`): per output channel (or per
//!   tensor for an `f32[]` scale) `s = absmax / 448` (`numerics::scale_for`; 1 for an
//!   all-zero row) and `q = e4m3(w / s)`, IEEE division then round to nearest even with
//!   saturation, exactly as a CUDA kernel converting with `__NV_SATFINITE` would.
//! - `W.q8_0 : i8[o, i]` or `W.q4_0 : i4[o, i]` with `W.scale : f16[o, i / 32]`, or
//!   `W.q4_1 : u4[o, i]` with `W.scale : f16[o, i / 32, 2]` (scale, minimum): the
//!   integer lowering's blocks of 32 along the input dimension
//!   ([`fusec_ir::quant::IntFormat`]), made exactly as llama.cpp's
//!   `quantize_row_q8_0_ref`, `quantize_row_q4_0_ref` and `quantize_row_q4_1_ref`
//!   (ggml-quants.c) make GGUF's blocks (see [`quantize_blocks`]).
//! - `past.L.key.scale` and `past.L.value.scale : f32[]`, the static scales of an FP8
//!   KV cache (operands 9 and 10 of `fused.decode_attention`). They depend on the
//!   activations, not on the weights, so a run calibrates them (`fusec_exec::calibrate`)
//!   and [`lower_weights`] takes them as [`KvScales`].
//!
//! [`crate::save::save_weights`] writes such weights as safetensors, which
//! [`crate::Weights::load`] reads back into the same graph bit for bit.

use std::collections::{BTreeMap, HashMap};

use std::sync::Arc;

use fusec_ir::quant::IntFormat;
use fusec_ir::step::FP8_SUFFIX;
use fusec_ir::{numerics, DType, Graph, InputKind, NodeId, Op, OperandRole, TensorType};

use crate::error::Error;
use crate::rounding;
use crate::tensor::{Storage, WeightTensor, I4_BLOCK};
use crate::weights::{fixed_shape, WeightSource, Weights};

/// How a weight of a lowered graph is made when no checkpoint holds it.
#[derive(Clone, Debug, PartialEq)]
pub enum Derived {
    /// The values (`values`) or scales (`scale`) of the quantized weight `base`.
    Gemv {
        base: String,
        values: String,
        scale: String,
        /// The FP8 format of the values, or the dtype of integer codes.
        format: DType,
        /// The integer format, for integer codes.
        int: Option<IntFormat>,
        /// The dtype the compute-precision graph holds `base` in.
        to: DType,
        /// `[out, in]`.
        shape: Vec<usize>,
        /// One scale per output channel, else one per tensor.
        per_channel: bool,
    },
    /// The scale of the FP8 KV cache `state`, calibrated by a run.
    KvScale { state: String },
}

/// The weights of `graph` that are derived, by name.
pub fn derived_weights(graph: &Graph) -> Result<HashMap<String, Derived>, Error> {
    let weight_name = |id: NodeId| match graph.op(id) {
        Op::Weight { name } => Some(name.clone()),
        _ => None,
    };
    let mut out = HashMap::new();
    for id in graph.node_ids() {
        let operands = graph.operands(id);
        match graph.op(id) {
            Op::Dequant { to, .. } => {
                let (Some(values), Some(scale)) = (
                    operands.first().copied().and_then(weight_name),
                    operands.get(1).copied().and_then(weight_name),
                ) else {
                    continue;
                };
                let suffixes = IntFormat::ALL.map(IntFormat::suffix);
                let Some(base) = std::iter::once(FP8_SUFFIX)
                    .chain(suffixes)
                    .find_map(|suffix| values.strip_suffix(suffix))
                    .map(str::to_string)
                else {
                    continue;
                };
                let (Some(q), Some(s)) = (
                    graph.ty(operands[0]).tensor(),
                    graph.ty(operands[1]).tensor(),
                ) else {
                    continue;
                };
                let d = Derived::Gemv {
                    base,
                    values: values.clone(),
                    scale: scale.clone(),
                    format: q.dtype,
                    int: IntFormat::of(q.dtype, s.dtype),
                    to: *to,
                    shape: fixed_shape(&values, q)?,
                    per_channel: s.rank() == 1,
                };
                out.insert(values, d.clone());
                out.insert(scale, d);
            }
            op => {
                // An op reading FP8 caches takes their scales as trailing operands,
                // in the order of the caches (the op table's `CacheScale` role).
                let role = |i: usize| op.operand_role(i);
                let caches = (0..operands.len())
                    .filter(|&i| matches!(role(i), Some(OperandRole::Cache { .. })));
                let scales =
                    (0..operands.len()).filter(|&i| role(i) == Some(OperandRole::CacheScale));
                for (cache, scale) in caches.zip(scales) {
                    let Op::Input {
                        name,
                        kind: InputKind::State,
                    } = graph.op(operands[cache])
                    else {
                        continue;
                    };
                    if let Some(scale) = weight_name(operands[scale]) {
                        out.insert(
                            scale,
                            Derived::KvScale {
                                state: name.clone(),
                            },
                        );
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Quantizes `w [out, in]` to `format` with per-output-channel (or per-tensor) scales
/// `absmax / max(format)`: returns the values and the scales (see the module
/// documentation).
pub fn quantize(
    w: &WeightTensor,
    format: DType,
    per_channel: bool,
) -> Result<(WeightTensor, WeightTensor), Error> {
    let bad = |message: String| Error::InvalidGraph(format!("quantize: {message}"));
    let [o, i] = w.shape() else {
        return Err(bad(format!("needs a matrix, got {:?}", w.shape())));
    };
    let (o, i) = (*o, *i);
    if let Some(f) = IntFormat::of(format, DType::F16) {
        return quantize_format(w, f);
    }
    if !format.is_fp8() {
        return Err(bad(format!("{format} is not an FP8 or integer format")));
    }
    let values = w.to_vec_f32();
    let absmax = |xs: &[f32]| xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scales: Vec<f32> = if per_channel {
        values
            .chunks(i.max(1))
            .take(o)
            .map(|row| numerics::scale_for(absmax(row), format))
            .collect()
    } else {
        vec![numerics::scale_for(absmax(&values), format)]
    };
    let q: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            let s = if per_channel {
                scales[k / i.max(1)]
            } else {
                scales[0]
            };
            if format == DType::Fp8E4M3 {
                // Bit-identical to `round_to`, and several times faster on the ~10^8
                // weights of a real checkpoint.
                rounding::round_e4m3(v / s)
            } else {
                numerics::round_to(format, v / s)
            }
        })
        .collect();
    let scale_shape: &[usize] = if per_channel { &[o] } else { &[] };
    let q = WeightTensor::from_f32(format, &[o, i], q).map_err(|e| bad(e.to_string()))?;
    let s =
        WeightTensor::from_f32(DType::F32, scale_shape, scales).map_err(|e| bad(e.to_string()))?;
    Ok((q, s))
}

/// One block of 32 values quantized to Q8_0 as `quantize_row_q8_0_ref` does
/// (ggml-quants.c): `d = absmax / 127`, codes `roundf(x / d)` computed as `x * (1 / d)`
/// (`roundf` rounds half away from zero), and the scale stored as `f16`. Returns the
/// `f16` scale and fills `codes`.
pub fn q8_0_block(x: &[f32], codes: &mut [i8]) -> half::f16 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in codes.iter_mut().zip(x) {
        // In [-127, 127] (NaN, which a checked weight never holds, becomes 0).
        *q = (v * id).round() as i8;
    }
    half::f16::from_f32(d)
}

/// One block of 32 values quantized to Q4_0 as `quantize_row_q4_0_ref` does
/// (ggml-quants.c): the value of largest magnitude `max` (the first one on ties) gives
/// `d = max / -8`, each nibble is `min(15, trunc(x / d + 8.5))` computed as
/// `x * (1 / d)`, value `j` in the low nibble of byte `j` and value `j + 16` in its high
/// nibble, and the scale is stored as `f16`. Returns the `f16` scale and fills the 16
/// bytes of `packed`.
pub fn q4_0_block(x: &[f32], packed: &mut [u8]) -> half::f16 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let nibble = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
    for (j, byte) in packed.iter_mut().enumerate().take(16) {
        *byte = nibble(x[j]) | (nibble(x[j + 16]) << 4);
    }
    half::f16::from_f32(d)
}

/// One block of 32 values quantized to Q4_1 as `quantize_row_q4_1_ref` does
/// (ggml-quants.c): `d = (max - min) / 15`, each nibble `min(15, trunc((x - min) / d
/// + 0.5))` computed as `(x - min) * (1 / d)` with the `f32` minimum, value `j` in the
/// low nibble of byte `j` and value `j + 16` in its high nibble; the scale and the
/// minimum are stored as `f16`. Returns them and fills the 16 bytes of `packed`.
pub fn q4_1_block(x: &[f32], packed: &mut [u8]) -> (half::f16, half::f16) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // `(int8_t)` truncates toward zero; `x - min >= 0`, so this is a floor.
    let nibble = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    for (j, byte) in packed.iter_mut().enumerate().take(16) {
        *byte = nibble(x[j]) | (nibble(x[j + 16]) << 4);
    }
    (half::f16::from_f32(d), half::f16::from_f32(min))
}

/// `nearest_int` of ggml-quants.c: round to nearest, ties to even (its magic-number
/// addition does that for the magnitudes it is given).
#[inline]
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// `make_qkx2_quants` of ggml-quants.c: codes `0..=nmax` for `x` with a scale and a
/// minimum, the minimum at most 0, searching `nstep + 1` scales around
/// `nmax / (max - min)` for the least weighted squared error (`use_mad` false).
/// Returns the scale and `-min`, and fills `l`.
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    nmax: i32,
    (rmin, rdelta, nstep): (f32, f32, i32),
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_mad += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, lf) = (weights[i], q as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += weights[i] * (diff * diff);
            }
            if mad < best_mad {
                l[..n].copy_from_slice(&laux[..n]);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// One Q4_K super-block of `x` (256 values, or fewer whole sub-blocks of 32 for a
/// short last one, see `fusec_ir::quant`) as `quantize_row_q4_K_ref` (ggml-quants.c)
/// makes it: per sub-block a scale and minimum by [`make_qkx2_quants`] (weights
/// `sqrt(Σx²/32) + |x|`), those quantized to 6 bits against the largest (`d =
/// max_scale / 63`, `dmin = max_min / 63`, stored `f16`) and packed as
/// `get_scale_min_k4` reads them, then each code `nearest_int((x + dmin * m) / (d *
/// sc))` clamped to `0..=15`. Writes the 16 bytes of side data (`d`, `dmin`, the 12
/// packed bytes) and the codes in Q4_0's nibble order (`x.len() / 2` bytes).
pub fn q4_k_superblock(x: &[f32], side: &mut [u8], packed: &mut [u8]) {
    let subs = x.len() / I4_BLOCK;
    let mut l = [0u8; 256];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..subs {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().fold(0.0, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
        let (s, m) = make_qkx2_quants(
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            15,
            (-1.0, 0.1, 20),
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let q = &mut side[4..16];
    q.iter_mut().for_each(|b| *b = 0);
    for j in 0..subs {
        // `(uint8_t)nearest_int(...)` then `MIN(63, ...)`.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            q[j] = ls;
            q[j + 4] = lm;
        } else {
            q[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            q[j - 4] |= (ls >> 4) << 6;
            q[j] |= (lm >> 4) << 6;
        }
    }
    let d = half::f16::from_f32(max_scale / 63.0);
    let dmin = half::f16::from_f32(max_min / 63.0);
    side[0..2].copy_from_slice(&d.to_le_bytes());
    side[2..4].copy_from_slice(&dmin.to_le_bytes());
    for j in 0..subs {
        let (sc, m) = fusec_ir::quant::q4k_scale_min(j, &side[4..16]);
        let d = d.to_f32() * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m);
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, 15) as u8;
        }
    }
    for (j, block) in packed.chunks_exact_mut(I4_BLOCK / 2).take(subs).enumerate() {
        for (k, byte) in block.iter_mut().enumerate() {
            *byte = l[32 * j + k] | (l[32 * j + k + 16] << 4);
        }
    }
}

/// Q4_K's codes of the file's order (byte `l` of each 64 weights holding weight `l` in
/// its low nibble and `l + 32` in its high one, `dequantize_row_q4_K`) in Q4_0's block
/// order (see `fusec_ir::quant`); `qs` is whole 64-weight chunks.
pub fn q4_k_codes_to_block_order(qs: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(qs.len());
    for q in qs.chunks_exact(32) {
        out.extend((0..16).map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)));
        out.extend((0..16).map(|j| (q[j] >> 4) | (q[j + 16] & 0xF0)));
    }
    out
}

/// The inverse of [`q4_k_codes_to_block_order`]: codes in Q4_0's block order laid out
/// as a `block_q4_K`'s `qs` (whole 64-weight chunks), for writing GGUF files.
pub fn q4_k_codes_to_file_order(packed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(packed.len());
    for c in packed.chunks_exact(32) {
        let (a, b) = c.split_at(16);
        out.extend((0..16).map(|j| (a[j] & 0xF) | ((b[j] & 0xF) << 4)));
        out.extend((0..16).map(|j| (a[j] >> 4) | (b[j] & 0xF0)));
    }
    out
}

/// Quantizes `w [out, in]` to the integer format `format`: the block-of-32 formats by
/// [`quantize_blocks`], Q4_K by [`q4_k_superblock`] per super-block of each row (the
/// side data `u8 [out, ceil(in / 256), 16]`). `in` must be a multiple of 32.
pub fn quantize_format(
    w: &WeightTensor,
    format: IntFormat,
) -> Result<(WeightTensor, WeightTensor), Error> {
    if format != IntFormat::Q4K {
        return quantize_blocks(w, format.codes());
    }
    let bad = |message: String| Error::InvalidGraph(format!("quantize: {message}"));
    let [o, i] = *w.shape() else {
        return Err(bad(format!("needs a matrix, got {:?}", w.shape())));
    };
    format.check_width(i as u64).map_err(bad)?;
    let values = w.to_vec_f32();
    let supers = i.div_ceil(256);
    let mut side = vec![0u8; o * supers * 16];
    let mut packed = vec![0u8; o * i / 2];
    for r in 0..o {
        for s in 0..supers {
            let (a, b) = (r * i + 256 * s, r * i + (256 * (s + 1)).min(i));
            let at = (r * supers + s) * 16;
            q4_k_superblock(
                &values[a..b],
                &mut side[at..at + 16],
                &mut packed[a / 2..b / 2],
            );
        }
    }
    let q = WeightTensor::from_storage(DType::U4, &[o, i], Storage::U8(Arc::new(packed)))
        .map_err(|e| bad(e.to_string()))?;
    let s = WeightTensor::from_storage(DType::U8, &[o, supers, 16], Storage::U8(Arc::new(side)))
        .map_err(|e| bad(e.to_string()))?;
    Ok((q, s))
}

/// Quantizes `w [out, in]` to the integer format whose codes are `format` (`i8`: Q8_0,
/// `i4`: Q4_0, `u4`: Q4_1) per block of 32 along `in` ([`q8_0_block`],
/// [`q4_0_block`], [`q4_1_block`]): returns the codes and the side data
/// (`IntFormat::scales`: `f16 [out, in / 32]`, or `[out, in / 32, 2]` scales and
/// minimums for Q4_1). `in` must be a multiple of 32.
pub fn quantize_blocks(
    w: &WeightTensor,
    format: DType,
) -> Result<(WeightTensor, WeightTensor), Error> {
    let bad = |message: String| Error::InvalidGraph(format!("quantize: {message}"));
    let [o, i] = *w.shape() else {
        return Err(bad(format!("needs a matrix, got {:?}", w.shape())));
    };
    if !i.is_multiple_of(I4_BLOCK) {
        return Err(bad(format!(
            "{format} blocks need an input dimension that is a multiple of {I4_BLOCK}, got {i}"
        )));
    }
    let values = w.to_vec_f32();
    let blocks = o * i / I4_BLOCK;
    let mut scales = Vec::with_capacity(blocks);
    let bytes = match format {
        DType::I8 => {
            let mut codes = vec![0i8; o * i];
            for (x, q) in values.chunks(I4_BLOCK).zip(codes.chunks_mut(I4_BLOCK)) {
                scales.push(q8_0_block(x, q).to_f32());
            }
            codes.into_iter().map(|c| c as u8).collect()
        }
        DType::I4 => {
            let mut packed = vec![0u8; o * i / 2];
            for (x, q) in values.chunks(I4_BLOCK).zip(packed.chunks_mut(I4_BLOCK / 2)) {
                scales.push(q4_0_block(x, q).to_f32());
            }
            packed
        }
        DType::U4 => {
            let mut packed = vec![0u8; o * i / 2];
            for (x, q) in values.chunks(I4_BLOCK).zip(packed.chunks_mut(I4_BLOCK / 2)) {
                let (d, m) = q4_1_block(x, q);
                scales.extend([d.to_f32(), m.to_f32()]);
            }
            packed
        }
        other => return Err(bad(format!("{other} is not an integer code format"))),
    };
    let q = WeightTensor::from_storage(format, &[o, i], Storage::U8(Arc::new(bytes)))
        .map_err(|e| bad(e.to_string()))?;
    let mut scale_shape = vec![o, i / I4_BLOCK];
    if let Some(f) = IntFormat::of(format, DType::F16).filter(|f| f.scales_per_block() > 1) {
        scale_shape.push(f.scales_per_block() as usize);
    }
    let s =
        WeightTensor::from_f32(DType::F16, &scale_shape, scales).map_err(|e| bad(e.to_string()))?;
    Ok((q, s))
}

/// Static KV-cache scales by weight name (`past.0.key.scale`).
pub type KvScales = BTreeMap<String, f32>;

/// The weights of the lowered `graph` made from `base` (weights of the unlowered graph,
/// or any set holding the bases): a weight `base` holds is taken as it is; a quantized
/// weight is made from its base; a KV-cache scale comes from `kv`.
pub fn lower_weights(base: &Weights, graph: &Graph, kv: &KvScales) -> Result<Weights, Error> {
    let derived = derived_weights(graph)?;
    let mut out = Weights::new(base.origin().clone());
    for (id, name) in graph.weights() {
        let ty = graph
            .ty(id)
            .tensor()
            .ok_or_else(|| Error::InvalidGraph(format!("weight `{name}` has a tuple type")))?;
        if out.get(name).is_some() {
            continue;
        }
        if let Some(t) = base.get(name) {
            let source = base.source(name).cloned().unwrap_or(WeightSource::Memory);
            out.insert(name.to_string(), t.clone(), source);
            continue;
        }
        match derived.get(name) {
            Some(Derived::Gemv {
                base: b,
                values,
                scale,
                format,
                int,
                to,
                shape,
                per_channel,
            }) => {
                let Some(w) = base.get(b) else {
                    return Err(Error::Underivable {
                        tensor: name.to_string(),
                        file: base.origin().path(),
                        reason: format!("its base weight `{b}` is not in the weights"),
                    });
                };
                if w.shape() != shape.as_slice() {
                    return Err(Error::WrongShape {
                        tensor: b.clone(),
                        file: base.source(b).unwrap_or(base.origin()).path(),
                        expected: shape.clone(),
                        found: w.shape().to_vec(),
                    });
                }
                // Quantize what the compute-precision graph would hold.
                let w = WeightTensor::from_f32(*to, w.shape(), w.to_vec_f32())
                    .map_err(|e| Error::InvalidGraph(format!("weight `{b}`: {e}")))?;
                let (q, s) = match int {
                    Some(f) => quantize_format(&w, *f)?,
                    None => quantize(&w, *format, *per_channel)?,
                };
                let source = base.source(b).cloned().unwrap_or(WeightSource::Memory);
                out.insert(values.clone(), q, source.clone());
                out.insert(scale.clone(), s, source);
            }
            Some(Derived::KvScale { .. }) => match kv.get(name) {
                Some(&s) if s > 0.0 && s.is_finite() => {
                    out.insert(
                        name.to_string(),
                        WeightTensor::scalar(s),
                        WeightSource::Memory,
                    );
                }
                Some(&s) => {
                    return Err(Error::Underivable {
                        tensor: name.to_string(),
                        file: base.origin().path(),
                        reason: format!("its calibrated value {s} is not a positive, finite scale"),
                    })
                }
                None => {
                    return Err(Error::Uncalibrated {
                        tensor: name.to_string(),
                    })
                }
            },
            None => {
                return Err(Error::MissingWeight {
                    tensor: name.to_string(),
                    file: base.origin().path(),
                })
            }
        }
        check_type(&out, name, ty)?;
    }
    Ok(out)
}

/// Checks a derived weight against the graph's type, as binding will.
fn check_type(w: &Weights, name: &str, ty: &TensorType) -> Result<(), Error> {
    let Some(t) = w.get(name) else {
        return Ok(());
    };
    if t.dtype() != ty.dtype || t.shape() != fixed_shape(name, ty)?.as_slice() {
        return Err(Error::InvalidGraph(format!(
            "derived weight `{name}` is {}{:?}, the graph declares {ty}",
            t.dtype(),
            t.shape()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_is_per_channel_and_saturating() {
        let w = WeightTensor::from_f32(DType::F32, &[2, 3], vec![1.0, -448.0, 0.5, 0.0, 0.0, 0.0])
            .expect("sizes match");
        let (q, s) = quantize(&w, DType::Fp8E4M3, true).expect("quantizes");
        assert_eq!(
            s.to_vec_f32(),
            [1.0, 1.0],
            "absmax 448 gives 1; zeros keep 1"
        );
        assert_eq!(q.to_vec_f32(), [1.0, -448.0, 0.5, 0.0, 0.0, 0.0]);
        let w = WeightTensor::from_f32(DType::F32, &[1, 2], vec![0.1, 3.0]).expect("sizes match");
        let (q, s) = quantize(&w, DType::Fp8E4M3, false).expect("quantizes");
        assert_eq!(s.shape(), &[] as &[usize]);
        assert_eq!(s.to_vec_f32(), [3.0 / 448.0]);
        assert_eq!(q.to_vec_f32()[1], 448.0);
        // 0.1 / (3 / 448) = 14.93..., between the E4M3 values 14 and 15: nearest is 15.
        assert_eq!(q.to_vec_f32()[0], 15.0);
        assert!(quantize(&w, DType::Bf16, true).is_err());
    }

    /// The blocks follow ggml's reference quantizers: checked against GGUF's own
    /// dequantization (fusec-gguf, bit-exact with gguf-py) of the same bytes laid out
    /// as Q8_0 and Q4_0 blocks.
    #[test]
    fn blocks_dequantize_as_gguf_does() {
        let mut rng = crate::SplitMix64::new(3);
        let (o, i) = (3, 64);
        let w: Vec<f32> = (0..o * i).map(|_| rng.normal() as f32).collect();
        let w = WeightTensor::from_f32(DType::F32, &[o, i], w).expect("sizes");
        for (format, ty) in [
            (DType::I8, fusec_gguf::GgmlType::Q8_0),
            (DType::I4, fusec_gguf::GgmlType::Q4_0),
            (DType::U4, fusec_gguf::GgmlType::Q4_1),
        ] {
            let f = IntFormat::of(format, DType::F16).expect("a format");
            let per_block = f.scales_per_block() as usize;
            let (q, s) = quantize(&w, format, true).expect("quantizes");
            assert_eq!(q.shape(), &[o, i]);
            assert_eq!(s.shape()[..2], [o, i / 32]);
            assert_eq!(s.numel(), o * i / 32 * per_block);
            let Storage::U8(codes) = q.storage() else {
                panic!("codes are bytes")
            };
            let per = f.block_bytes() as usize - 2 * per_block;
            let mut gguf = Vec::new();
            let sv = s.to_vec_f32();
            for (b, side) in sv.chunks(per_block).enumerate() {
                for v in side {
                    gguf.extend(half::f16::from_f32(*v).to_le_bytes());
                }
                gguf.extend(&codes[b * per..(b + 1) * per]);
            }
            let mut want = vec![0.0f32; o * i];
            fusec_gguf::dequant::dequantize(ty, &gguf, &mut want);
            let qv = q.to_vec_f32();
            let got: Vec<f32> = qv
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    let side = &sv[k / 32 * per_block..];
                    match per_block {
                        1 => c * side[0],
                        _ => c * side[0] + side[1],
                    }
                })
                .collect();
            assert_eq!(got, want, "{format}");
            // The error is at most half a step of each block's scale (a full step for
            // Q4_0's clamped top code; Q4_1's f16 minimum adds its own rounding).
            for (k, (&a, &b)) in w.to_vec_f32().iter().zip(&got).enumerate() {
                let d = sv[k / 32 * per_block].abs();
                assert!((a - b).abs() <= d * 1.01, "{format} {k}: {a} {b}");
            }
        }
        // Q4_K: the side data and the codes laid out as `block_q4_K`s dequantize as
        // GGUF does to `d * sc * q - dmin * m`, within a sub-block's step of `w`.
        let (o, i) = (3, 512);
        let w: Vec<f32> = (0..o * i).map(|_| rng.normal() as f32).collect();
        let w = WeightTensor::from_f32(DType::F32, &[o, i], w).expect("sizes");
        let (q, s) = quantize_format(&w, IntFormat::Q4K).expect("quantizes");
        assert_eq!(
            (q.dtype(), s.dtype(), s.shape()),
            (DType::U4, DType::U8, &[o, 2, 16][..])
        );
        let (Storage::U8(codes), Storage::U8(side)) = (q.storage(), s.storage()) else {
            panic!("bytes")
        };
        assert_eq!(
            q4_k_codes_to_block_order(&q4_k_codes_to_file_order(codes)),
            **codes
        );
        let mut gguf = Vec::new();
        for (b, h) in side.chunks(16).enumerate() {
            gguf.extend_from_slice(h);
            gguf.extend(q4_k_codes_to_file_order(&codes[b * 128..(b + 1) * 128]));
        }
        let mut want = vec![0.0f32; o * i];
        fusec_gguf::dequant::dequantize(fusec_gguf::GgmlType::Q4_K, &gguf, &mut want);
        let qv = q.to_vec_f32();
        for (k, (&x, &y)) in w.to_vec_f32().iter().zip(&want).enumerate() {
            let h = &side[k / 256 * 16..][..16];
            let f = |at: usize| half::f16::from_le_bytes([h[at], h[at + 1]]).to_f32();
            let (sc, m) = fusec_ir::quant::q4k_scale_min(k % 256 / 32, &h[4..]);
            let meant = f(0) * f32::from(sc) * qv[k] - f(2) * f32::from(m);
            assert!(
                (meant - y).abs() <= 1e-6 * y.abs().max(1.0),
                "{k}: {meant} {y}"
            );
            let step = f(0) * f32::from(sc);
            assert!((x - y).abs() <= step.max(1e-3), "{k}: {x} {y} step {step}");
        }
        // A short last super-block: 96 inputs, three sub-blocks.
        let w96 = WeightTensor::from_f32(DType::F32, &[2, 96], vec![0.25; 192]).expect("sizes");
        let (q, s) = quantize_format(&w96, IntFormat::Q4K).expect("quantizes");
        assert_eq!((q.shape(), s.shape()), (&[2, 96][..], &[2, 1, 16][..]));
        let odd = WeightTensor::from_f32(DType::F32, &[1, 40], vec![0.5; 40]).expect("sizes");
        let err = quantize_format(&odd, IntFormat::Q4K)
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiple of 32"), "{err}");
        let err = quantize(&odd, DType::I8, true).unwrap_err().to_string();
        assert!(err.contains("multiple of 32"), "{err}");
    }
}
