//! The GEMV family over block-quantized integer weights (`i8` codes: GGUF's Q8_0;
//! `i4` codes: Q4_0; one `f16` scale per block of 32 inputs; `u4` codes with an `f16`
//! scale and minimum per block: Q4_1), as the CPU executor multiplies them: the activations quantized to 8 bits per block of 32
//! (`quantize_row_q8_0_ref` in ggml-quants.c: `d = amax / 127`, codes
//! `round(x / d)` computed as `x * (1 / d)`, `d` kept as `f16`), each block's integer
//! dot product exact in `i32` and scaled by both blocks' scales.
//!
//! The shape follows llama.cpp's `mul_mat_vec_q` (ggml-cuda's mmvq.cu with
//! `vec_dot_q8_0_q8_1` and `vec_dot_q4_0_q8_1` in vecdotq.cuh): `__dp4a` multiplies four
//! signed bytes and adds them to an `i32` in one instruction (sm_61 and later), so a
//! lane reads 16 bytes of a weight row (16 Q8_0 codes, or one whole Q4_0 or Q4_1 block
//! of 32 nibbles) and needs four (Q8_0), eight (Q4_0) or four (Q4_1) of them, plus one
//! scale load per block. A Q4_1 weight `d * q + m` adds `m` times the activation
//! block's sum `s = f16(d_x * Σ x_q)` (Q8_1's `s`, `vec_dot_q4_1_q8_1`), which the
//! prologue stages beside each block's scale. Where llama.cpp quantizes the activations in a kernel of its own
//! (`quantize_q8_1`), this prologue does it in shared memory, once per block of
//! threads, so the fused GEMV stays one launch: one warp per block of 32 values takes
//! the block's largest magnitude with warp shuffles.
//!
//! Only the float summation differs from the CPU executor's (which sums four-product
//! groups into 16 lanes), so results agree to rounding; the activation codes are the
//! same values when the normalised activations are.
//!
//! Rows of `i4` weights are addressed in bytes (two codes a byte, in Q4_0's block
//! order: value `j` of a block in the low nibble of byte `j`, value `j + 16` in its
//! high nibble; `fusec_weights::tensor::i4_code`).

use std::fmt::Write;

use fusec_ir::quant::IntFormat;
use fusec_ir::DType;

use crate::emit::Params;
use crate::layout::View;
use crate::plan::Access;

/// Values per quantization block (`QK8_0`, `QK4_0` in ggml-common.h).
pub(crate) const BLOCK: u64 = 32;

/// One integer weight of a GEMV: its codes `[rows, K]` and block scales `[rows, K/32]`.
pub(crate) struct IntWeight<'a> {
    pub values: &'a View,
    pub scale: &'a View,
}

/// The format of the weights `ws`, or why the integer GEMV cannot take them.
pub(crate) fn check(ws: &[IntWeight<'_>], k: u64) -> Result<IntFormat, String> {
    if !k.is_multiple_of(BLOCK) {
        return Err(format!(
            "an integer GEMV needs whole blocks of {BLOCK} inputs, got {k}"
        ));
    }
    let first = ws.first().ok_or("a GEMV needs a weight")?;
    let format = IntFormat::of(first.values.dtype, first.scale.dtype).ok_or_else(|| {
        format!(
            "{} codes with {} side data are no integer format",
            first.values.dtype, first.scale.dtype
        )
    })?;
    // Per block of 32: the scale, or the scale and the minimum.
    let side = match format {
        IntFormat::Q8_0 | IntFormat::Q4_0 => None,
        IntFormat::Q4_1 => Some(2),
        other => {
            return Err(format!(
                "{other} has no CUDA kernel yet: run it on the CPU (`fusec run`)"
            ))
        }
    };
    for w in ws {
        let v = w.values;
        if IntFormat::of(v.dtype, w.scale.dtype) != Some(format) {
            return Err("weights of one integer GEMV must share a format".into());
        }
        // Every row starts on a block, whole blocks are 16-byte aligned.
        if v.rank() != 2
            || v.strides[1] != 1
            || !v.strides[0].is_multiple_of(BLOCK)
            || !v.offset.is_multiple_of(BLOCK)
        {
            return Err(format!(
                "{} weight rows must be contiguous and start on a block of {BLOCK}",
                v.dtype
            ));
        }
        let sides_ok = match side {
            None => w.scale.rank() == 2,
            Some(n) => w.scale.rank() == 3 && w.scale.dims[2].fixed() == Some(n),
        };
        if !sides_ok || w.scale.dims[1].fixed() != Some(k / BLOCK) {
            return Err(format!(
                "{format} side data must be [rows, {}{}]",
                k / BLOCK,
                side.map_or(String::new(), |n| format!(", {n}"))
            ));
        }
    }
    Ok(format)
}

/// Shared memory the prologue stages for `m_rows` rows of `k` activations: the codes,
/// padded to 16 bytes, then one `f32` scale and one `f32` sum per block.
pub(crate) fn staged_bytes(m_rows: u64, k: u64) -> u64 {
    (m_rows * k).div_ceil(16) * 16 + 2 * m_rows * (k / BLOCK) * 4
}

/// Declares the staged codes `xq`, block scales `xd` and block sums `xs` in the dynamic
/// shared memory.
pub(crate) fn declare_staging(b: &mut String, m_rows: u64, k: u64) {
    let codes = (m_rows * k).div_ceil(16) * 16;
    let scales = m_rows * (k / BLOCK) * 4;
    let _ = writeln!(
        b,
        "  extern __shared__ __align__(16) unsigned char fu_dyn[];"
    );
    let _ = writeln!(
        b,
        "  signed char* xq = reinterpret_cast<signed char*>(fu_dyn);"
    );
    let _ = writeln!(
        b,
        "  float* xd = reinterpret_cast<float*>(fu_dyn + {codes});"
    );
    let _ = writeln!(
        b,
        "  float* xs = reinterpret_cast<float*>(fu_dyn + {});",
        codes + scales
    );
}

/// The prologue: per activation row `m`, the RMSNorm statistic if there is a norm
/// (`stat_pass` writes `fu_rs[m]`), then one warp per block of 32: each lane the
/// normalised value `value(k)` of its element, the block's scale and sum, the lane's
/// code.
pub(crate) fn prologue(
    b: &mut String,
    k: u64,
    stat_pass: &mut dyn FnMut(&mut String),
    value: &str,
) {
    let blocks = k / BLOCK;
    let _ = writeln!(b, "  for (int m = 0; m < M; ++m) {{");
    stat_pass(b);
    let _ = writeln!(
        b,
        "    for (int bk = warp; bk < {blocks}; bk += blockDim.x >> 5) {{"
    );
    let _ = writeln!(b, "      const int k = bk * {BLOCK} + lane;");
    let _ = writeln!(b, "      const float y = {value};");
    let _ = writeln!(b, "      float d, sum;");
    let _ = writeln!(b, "      xq[m * K + k] = fu_q8_block(y, &d, &sum);");
    let _ = writeln!(
        b,
        "      if (lane == 0) {{ xd[m * {blocks} + bk] = d; xs[m * {blocks} + bk] = sum; }}"
    );
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "  }}");
}

/// The dot products of row `n` of each weight with every staged activation row, into
/// `acc{i}[m]`, already scaled, reduced over the warp.
pub(crate) fn row_body(
    b: &mut String,
    params: &mut Params,
    ws: &[IntWeight<'_>],
    k: u64,
) -> Result<(), String> {
    let blocks = k / BLOCK;
    let format = check(ws, k)?;
    let dtype = format.codes();
    for (i, w) in ws.iter().enumerate() {
        let p = params.bind(w.values, Access::Read);
        let s = params.bind(w.scale, Access::Read);
        let _ = writeln!(
            b,
            "      const unsigned char* w{i} = reinterpret_cast<const unsigned char*>({p}) + {}LL + (long long)n * {}LL;",
            byte_offset(dtype, w.values.offset),
            byte_offset(dtype, w.values.strides[0])
        );
        let _ = writeln!(
            b,
            "      const {}* s{i} = {s} + {}LL + (long long)n * {}LL;",
            super::ctype(w.scale.dtype),
            w.scale.offset,
            w.scale.strides[0]
        );
        let _ = writeln!(b, "      float acc{i}[M];");
        let _ = writeln!(b, "      for (int m = 0; m < M; ++m) acc{i}[m] = 0.0f;");
    }
    // Values per lane per iteration: 16 bytes of codes.
    let per = match dtype {
        DType::I8 => 16,
        _ => 32,
    };
    let _ = writeln!(b, "#pragma unroll 2");
    let _ = writeln!(
        b,
        "      for (int k = lane * {per}; k < K; k += 32 * {per}) {{"
    );
    let _ = writeln!(b, "        const int bk = k / {BLOCK};");
    for (i, w) in ws.iter().enumerate() {
        let at = if dtype == DType::I8 { "k" } else { "k >> 1" };
        let _ = writeln!(
            b,
            "        const uint4 wv{i} = __ldg(reinterpret_cast<const uint4*>(w{i} + ({at})));"
        );
        let _ = writeln!(
            b,
            "        const float sw{i} = fu_f32(s{i}[(long long)bk * {}LL]);",
            w.scale.strides[1]
        );
        if format == IntFormat::Q4_1 {
            let _ = writeln!(
                b,
                "        const float mw{i} = fu_f32(s{i}[(long long)bk * {}LL + {}LL]);",
                w.scale.strides[1], w.scale.strides[2]
            );
        }
    }
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "        for (int m = 0; m < M; ++m) {{");
    let _ = writeln!(
        b,
        "          const uint4* xp = reinterpret_cast<const uint4*>(xq + m * K + k);"
    );
    let _ = writeln!(b, "          const float dx = xd[m * {blocks} + bk];");
    for (i, _) in ws.iter().enumerate() {
        let dot = match format {
            IntFormat::Q8_0 => format!("fu_dot_q8(wv{i}, xp[0])"),
            IntFormat::Q4_0 => format!("fu_dot_q4(wv{i}, xp[0], xp[1])"),
            _ => format!("fu_dot_u4(wv{i}, xp[0], xp[1])"),
        };
        let _ = writeln!(
            b,
            "          acc{i}[m] = fmaf((float){dot}, sw{i} * dx, acc{i}[m]);"
        );
        if format == IntFormat::Q4_1 {
            let _ = writeln!(
                b,
                "          acc{i}[m] = fmaf(mw{i}, xs[m * {blocks} + bk], acc{i}[m]);"
            );
        }
    }
    let _ = writeln!(b, "        }}");
    let _ = writeln!(b, "      }}");
    for (i, _) in ws.iter().enumerate() {
        let _ = writeln!(
            b,
            "      for (int m = 0; m < M; ++m) acc{i}[m] = fu_warp_sum(acc{i}[m]);"
        );
    }
    Ok(())
}

/// Asks L2 for every 128-byte line of the first row of `w` (see the float GEMV's
/// `prefetch_first_row`), for the row `n0 - base`.
pub(crate) fn prefetch_row(
    b: &mut String,
    params: &mut Params,
    w: &IntWeight<'_>,
    i: usize,
    k: u64,
    base: u64,
) {
    let v = w.values;
    let p = params.bind(v, Access::Read);
    let row_bytes = v.dtype.bytes_for(k);
    let _ = writeln!(
        b,
        "      const unsigned char* pw{i} = reinterpret_cast<const unsigned char*>({p}) + {}LL + (long long)(n0 - {base}) * {}LL;",
        byte_offset(v.dtype, v.offset),
        byte_offset(v.dtype, v.strides[0])
    );
    let _ = writeln!(
        b,
        "      for (long long k = lane * 128LL; k < {row_bytes}LL; k += 32 * 128LL) fu_prefetch_l2(pw{i} + k);"
    );
}

/// The byte offset of element `e` of an integer-code buffer (`i4`: two a byte; `e` is
/// then even, a row or block start).
fn byte_offset(dtype: DType, e: u64) -> u64 {
    dtype.bytes_for(e)
}
