//! GEMV kernels: `linear` and the fused GEMV family (`fused.rms_norm_linear`,
//! `fused.swiglu`, `fused.rms_norm_swiglu`, `fused.linear_add`), for f32, f16 and
//! bf16 weights, for FP8 weights with their scales (`dequant`), and for block-quantized
//! integer weights, whose prologue and dot products are [`super::gemv_int`]'s.
//!
//! One template: a prologue per activation row (the RMSNorm statistics, the dynamic
//! FP8 activation scales) stages the prepared activations in shared memory; then each
//! warp computes whole output rows, its lanes reading 16 bytes of the weight row at a
//! time (coalesced), accumulating in f32, reducing with warp shuffles; the epilogue
//! applies the scales and the op's rounding, SiLU-and-multiply or residual add. The
//! rows of several weights sharing the prologue (q, k, v) are one index space.
//!
//! FP8 activations are quantized per block of [`FP8_ACT_BLOCK`] inputs, as the
//! executor quantizes them (`gemv::quantize_rows`): a warp takes a block at a time,
//! its lanes one input each, and finds the block's scale with shuffles
//! (`fu_act_block_scale`) into `fu_as[m * NB + block]`; the staged activations are
//! the FP8 codes (exact in every staging type), and the value the dot products
//! multiply is `code * fu_as[..]` in `f32`, the executor's `round(x / s) * s` bit for
//! bit.

use std::fmt::Write;

use fusec_ir::numerics::FP8_ACT_BLOCK;
use fusec_ir::{DType, UnaryOp};

use super::elementwise::unary_expr;
use super::gemv_int::{self, IntWeight};
use super::{ctype, flit, KernelCode, Operand, Params};
pub(crate) use crate::emit::{Epilogue, Gemv};
use crate::layout::{Extent, View};
use crate::options::{DecodeShape, Options};
use crate::plan::Access;

/// One weight as the kernel (this GEMV's, or the prefill GEMM's) reads it.
pub(crate) struct Weight<'a> {
    pub(crate) values: &'a View,
    pub(crate) scale: Option<&'a View>,
    pub(crate) rows: u64,
}

impl<'a> Weight<'a> {
    /// `values` (with its FP8 or block `scale`), checked to be a static
    /// `[rows, k]` matrix.
    pub(crate) fn new(
        values: &'a View,
        scale: Option<&'a View>,
        k: u64,
    ) -> Result<Weight<'a>, String> {
        if values.rank() != 2 || values.dims[1] != Extent::Fixed(k) {
            return Err(format!(
                "weight {:?} does not match {k} features",
                values.dims
            ));
        }
        let rows = values.dims[0].fixed().ok_or("weight rows must be static")?;
        Ok(Weight {
            values,
            scale,
            rows,
        })
    }

    /// `acc`, the dot product of output row `n`, times that row's FP8 scale (per
    /// channel or per tensor) if the weight has one.
    pub(crate) fn scaled(&self, params: &mut Params, acc: &str) -> String {
        let Some(s) = self.scale else {
            return acc.to_string();
        };
        let ps = params.bind(s, Access::Read);
        let idx = if s.rank() == 0 {
            format!("{}LL", s.offset)
        } else {
            format!("{}LL + (long long)n * {}LL", s.offset, s.strides[0])
        };
        format!("{acc} * fu_f32({ps}[{idx}])")
    }
}

/// The largest finite value of an FP8 format.
pub(super) fn fp8_max(dtype: DType) -> f32 {
    match dtype {
        DType::Fp8E5M2 => 57344.0,
        _ => 448.0,
    }
}

/// The element offset of row `m` of a view whose last dimension is the row, with the
/// leading dimensions all static.
pub(super) fn row_offset(v: &View, m: &str) -> Result<String, String> {
    let r = v.rank();
    let mut terms = vec![format!("{}LL", v.offset)];
    let mut inner = 1u64;
    for i in (0..r.saturating_sub(1)).rev() {
        let d = v.dims[i].fixed().ok_or("GEMV rows must be static")?;
        if d != 1 && v.strides[i] != 0 {
            terms.push(format!("(({m} / {inner}) % {d}) * {}LL", v.strides[i]));
        }
        inner *= d;
    }
    Ok(format!("({})", terms.join(" + ")))
}

fn rows_of(v: &View) -> Result<u64, String> {
    let r = v.rank();
    v.dims[..r.saturating_sub(1)]
        .iter()
        .map(|d| {
            d.fixed()
                .ok_or_else(|| "GEMV rows must be static".to_string())
        })
        .product()
}

pub(crate) fn gemv(
    g: &Gemv<'_>,
    params: &mut Params,
    _decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let x = g.x;
    let r = x.rank();
    if r == 0 {
        return Err("GEMV input must have a feature axis".into());
    }
    let k = x.dims[r - 1]
        .fixed()
        .ok_or("GEMV features must be static")?;
    let m_rows = rows_of(x)?;
    let t = out_dtype(g)?;
    let tc = ctype(t);
    // The weights, their activation recipe, and their row ranges.
    let mut weights = Vec::new();
    let mut act: Option<DType> = None;
    for w in &g.weights {
        let (values, scale, a) = match w {
            Operand::View(v) => (v, None, t),
            Operand::Dequant {
                values, scale, act, ..
            } => (values, Some(scale), *act),
            Operand::Scalar(_) => return Err("a GEMV weight cannot be a scalar".into()),
        };
        if act.is_some_and(|prev| prev != a) {
            return Err("weights of one GEMV quantize their activations differently".into());
        }
        act = Some(a);
        weights.push(Weight::new(values, scale, k)?);
    }
    let act = act.ok_or("a GEMV needs a weight")?;
    let act_fp8 = act.is_fp8();
    // Integer codes: the scales are per block, applied inside the dot products.
    let int_weights: Vec<IntWeight<'_>> = if act.is_int_codes() {
        let ws = weights
            .iter_mut()
            .map(|w| {
                let scale = w.scale.take().ok_or("integer weights need their scales")?;
                Ok(IntWeight {
                    values: w.values,
                    scale,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        gemv_int::check(&ws, k)?;
        if gemv_int::staged_bytes(m_rows, k) > u64::from(opts.max_shared_bytes) {
            return Err(format!(
                "an integer GEMV of {m_rows} rows of {k} inputs needs {} bytes of shared memory for its quantized activations, more than the {} allowed",
                gemv_int::staged_bytes(m_rows, k),
                opts.max_shared_bytes
            ));
        }
        ws
    } else {
        Vec::new()
    };
    let int = !int_weights.is_empty();
    // The activations as the kernel stages them in shared memory, in the form the dot
    // products read: the compute dtype; for FP8 the quantized values as f32 (exact), so
    // that no row converts them again, while that stays within a bound, else as
    // f16 (every FP8 code is exact in f16: one conversion per element, not two), else
    // the FP8 codes themselves (`Options::fp8_f32_stage_bytes`).
    // FP8 activation scales, one per block of inputs of each row, in static shared
    // memory beside the staged values.
    let act_blocks = k.div_ceil(FP8_ACT_BLOCK as u64);
    let scale_bytes = if act_fp8 { m_rows * act_blocks * 4 } else { 0 };
    let fits = |ty: DType| {
        (m_rows * k * ty.size_bytes()).div_ceil(16) * 16 + scale_bytes
            <= u64::from(opts.max_shared_bytes)
    };
    let a_ty = if !act_fp8 {
        t
    } else if m_rows * k * 4 <= u64::from(opts.fp8_f32_stage_bytes) {
        DType::F32
    } else if fits(DType::F16) {
        DType::F16
    } else {
        act
    };
    let staged_bytes = m_rows * k * a_ty.size_bytes();
    let staged = !int && fits(a_ty);
    // FP8 activations staged as f32 are read 16 per lane (64 bytes, four 16-byte
    // shared loads) at a 64-byte stride between lanes: each quarter-warp's loads fall
    // on the same banks four ways over. Staged in warp order instead (`xs_index`), the
    // warp's k-th 16-byte loads are contiguous across lanes, conflict-free (CUDA C++
    // Programming Guide, "Shared memory" of compute capability 5.x and later).
    let permuted = act_fp8
        && a_ty == DType::F32
        && staged
        && k.is_multiple_of(PERMUTED_SPAN)
        && weights.iter().all(|w| vector_width(&[w], k) == Some(16));
    let staging = Staging {
        staged,
        ty: a_ty,
        permuted,
        fp8_codes: act_fp8,
    };
    let xs_at = |idx: &str| xs_index(permuted, idx);
    let warps = opts.gemv_warps;

    let px = params.bind(x, Access::Read);
    let mut b = String::new();
    let _ = writeln!(b, "  constexpr int M = {m_rows};");
    let _ = writeln!(b, "  constexpr int K = {k};");
    let _ = writeln!(
        b,
        "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;"
    );
    let _ = writeln!(b, "  __shared__ float fu_rs[M];");
    if act_fp8 {
        let _ = writeln!(b, "  constexpr int NB = {act_blocks};");
        let _ = writeln!(b, "  __shared__ float fu_as[M * NB];");
    }
    if int {
        gemv_int::declare_staging(&mut b, m_rows, k);
    } else if staged {
        let _ = writeln!(
            b,
            "  extern __shared__ __align__(16) unsigned char fu_dyn[];"
        );
        let _ = writeln!(
            b,
            "  {}* xs = reinterpret_cast<{}*>(fu_dyn);",
            ctype(a_ty),
            ctype(a_ty)
        );
    }
    let xrow = row_offset(x, "m")?;
    let sx = x.strides[r - 1];
    let xv = |kk: &str| format!("fu_f32({px}[{xrow} + (long long)({kk}) * {sx}LL])");
    // The normalised activation of the value `xe` at column `kk`.
    let norm_of = |p: &mut Params, xe: &str, kk: &str| -> String {
        match g.norm {
            Some(n) => {
                let w = n.weight;
                let pw = p.bind(w, Access::Read);
                let wk = format!(
                    "fu_f32({pw}[{}LL + (long long)({kk}) * {}LL])",
                    w.offset, w.strides[0]
                );
                norm_expr(n.offset, xe, &wk, tc)
            }
            None => xe.to_string(),
        }
    };
    // The normalised activation XN(m, k) and the value the GEMV multiplies, XQ(m, k).
    let xn = |p: &mut Params, kk: &str| -> String { norm_of(p, &xv(kk), kk) };
    let xq = |p: &mut Params, kk: &str| -> String {
        let n = xn(p, kk);
        if act_fp8 {
            let s = format!("fu_as[m * NB + ({kk}) / {FP8_ACT_BLOCK}]");
            format!("fu_round<{}>({n} / {s}) * {s}", ctype(act))
        } else {
            n
        }
    };

    // Rows: one index space over the weights (gate and up share rows).
    let swiglu = matches!(g.epilogue, Epilogue::Gated(_));
    if swiglu && (weights.len() != 2 || weights[0].rows != weights[1].rows) {
        return Err("swiglu needs two weights of one shape".into());
    }
    let total: u64 = if swiglu {
        weights[0].rows
    } else {
        weights.iter().map(|w| w.rows).sum()
    };
    let groups: Vec<Vec<usize>> = if swiglu {
        vec![vec![0, 1]]
    } else {
        (0..weights.len()).map(|i| vec![i]).collect()
    };
    prefetch_first_row(&mut b, params, &weights, &int_weights, &groups, k, warps);

    // Prologue.
    if int {
        let vec = rows_vectorizable(x, k, 16 / t.size_bytes());
        let norm = g.norm;
        let mut stat_pass = |b: &mut String| {
            if let Some(n) = norm {
                let _ = writeln!(b, "    float ss = 0.0f;");
                row_pass(b, &px, &xrow, sx, t, vec, "ss = fmaf(v, v, ss);");
                let _ = writeln!(b, "    ss = fu_block_sum(ss);");
                let _ = writeln!(
                    b,
                    "    if (threadIdx.x == 0) fu_rs[m] = fu_rsqrt(ss / (float)K + {});",
                    flit(n.eps)
                );
                let _ = writeln!(b, "    __syncthreads();");
            }
        };
        let value = xn(params, "k");
        gemv_int::prologue(&mut b, k, &mut stat_pass, &value);
    } else if staged && (a_ty == t || a_ty == DType::F32) {
        staged_prologue(&mut b, params, g, x, k, t, act, staging)?;
    } else {
        // The activations are not staged in a type that holds the raw row: the
        // statistics in passes over global memory (16 bytes per thread per load where
        // the row allows), then the quantized values staged, or nothing staged and every
        // row normalising (and quantizing) as it reads.
        let vec = rows_vectorizable(x, k, 16 / t.size_bytes());
        let pass = |b: &mut String, body: &str| row_pass(b, &px, &xrow, sx, t, vec, body);
        let _ = writeln!(b, "  for (int m = 0; m < M; ++m) {{");
        if let Some(n) = g.norm {
            let eps = n.eps;
            let _ = writeln!(b, "    float ss = 0.0f;");
            pass(&mut b, "ss = fmaf(v, v, ss);");
            let _ = writeln!(b, "    ss = fu_block_sum(ss);");
            let _ = writeln!(
                b,
                "    if (threadIdx.x == 0) fu_rs[m] = fu_rsqrt(ss / (float)K + {});",
                flit(eps)
            );
            let _ = writeln!(b, "    __syncthreads();");
        }
        if act_fp8 {
            // The block scales: a warp per block of inputs, a lane per input.
            let e = xn(params, "kk");
            let _ = writeln!(b, "    for (int c = warp; c < NB; c += blockDim.x >> 5) {{");
            let _ = writeln!(b, "      const int kk = c * {FP8_ACT_BLOCK} + lane;");
            let _ = writeln!(b, "      const float v = kk < K ? {e} : 0.0f;");
            let _ = writeln!(
                b,
                "      const float s = fu_act_block_scale(v, {});",
                flit(fp8_max(act))
            );
            let _ = writeln!(b, "      if (lane == 0) fu_as[m * NB + c] = s;");
            let _ = writeln!(b, "    }}");
            let _ = writeln!(b, "    __syncthreads();");
        }
        if staged {
            let e = norm_of(params, "v", "k");
            let raw = if act_fp8 {
                format!(
                    "fu_from<{}>(fu_round<{}>({e} / fu_as[m * NB + k / {FP8_ACT_BLOCK}]))",
                    ctype(a_ty),
                    ctype(act)
                )
            } else {
                format!("fu_from<{}>({e})", ctype(a_ty))
            };
            pass(&mut b, &format!("xs[{}] = {raw};", xs_at("k")));
        }
        let _ = writeln!(b, "  }}");
    }
    let _ = writeln!(b, "  __syncthreads();");

    let _ = writeln!(b, "  for (int row = blockIdx.x * {warps} + warp; row < {total}; row += gridDim.x * {warps}) {{");
    let mut base = 0u64;
    for (gi, group) in groups.iter().enumerate() {
        let rows = weights[group[0]].rows;
        let cond = if gi + 1 == groups.len() {
            String::new()
        } else {
            format!("if (row < {}) ", base + rows)
        };
        let opener = if gi == 0 {
            "    ".to_string()
        } else {
            "    else ".to_string()
        };
        let _ = writeln!(b, "{opener}{cond}{{");
        let _ = writeln!(b, "      const int n = row - {base};");
        let ws: Vec<&Weight<'_>> = group.iter().map(|&i| &weights[i]).collect();
        if int {
            let iws: Vec<IntWeight<'_>> = group
                .iter()
                .map(|&i| IntWeight {
                    values: int_weights[i].values,
                    scale: int_weights[i].scale,
                })
                .collect();
            gemv_int::row_body(&mut b, params, &iws, k)?;
        } else {
            row_body(&mut b, params, &ws, k, staging, &xq)?;
        }
        epilogue(&mut b, params, g, &ws, gi, t)?;
        let _ = writeln!(b, "    }}");
        base += rows;
    }
    let _ = writeln!(b, "  }}");
    if let Epilogue::PostNorm {
        weight,
        eps,
        offset,
        residual,
        ticket,
    } = g.epilogue
    {
        let norm = PostNormTail {
            weight,
            eps,
            offset,
            residual,
            ticket,
        };
        post_norm_tail(&mut b, params, g, &norm, total, t)?;
    }

    // As many rows per warp as keep the grid within target_blocks, then just enough
    // blocks that every warp gets that many: a partial last round of rows would leave
    // most warps idle while a few finish.
    let per_round = u64::from(warps) * u64::from(opts.target_blocks);
    let rows_per_warp = total.div_ceil(per_round).max(1);
    let blocks = total.div_ceil(u64::from(warps) * rows_per_warp).max(1);
    Ok(KernelCode {
        family: match g.epilogue {
            Epilogue::Gated(UnaryOp::Silu) => "gemv_swiglu",
            Epilogue::Gated(UnaryOp::GeluTanh) => "gemv_geglu",
            Epilogue::Gated(_) => "gemv_gated",
            Epilogue::Residual(_) => "gemv_add",
            Epilogue::ScaledResidual(..) => "gemv_scale_add",
            Epilogue::PostNorm { offset: None, .. } => "gemv_post_norm",
            Epilogue::PostNorm {
                offset: Some(_), ..
            } => "gemv_offset_post_norm",
            Epilogue::Plain => "gemv",
        },
        body: b,
        // At most target_blocks, a u32.
        grid: [blocks as u32, 1, 1],
        block: warps * 32,
        // Within max_shared_bytes, a u32.
        shared: if int {
            gemv_int::staged_bytes(m_rows, k) as u32
        } else if staged {
            (staged_bytes.div_ceil(16) * 16) as u32
        } else {
            0
        },
    })
}

/// The RMSNorm of the value `xe` with the weight value `we`, the statistic in `fu_rs[m]`:
/// Llama's (`w * to(T)(x * r)`, rounded twice) or Gemma's (`to(T)((x * r) * (w + c))`
/// in f32, rounded once).
fn norm_expr(offset: Option<f32>, xe: &str, we: &str, tc: &str) -> String {
    norm_expr_with(offset, xe, we, tc, "fu_rs[m]")
}

/// [`norm_expr`] with the row's statistic `1 / rms` in the expression `rs`.
pub(super) fn norm_expr_with(
    offset: Option<f32>,
    xe: &str,
    we: &str,
    tc: &str,
    rs: &str,
) -> String {
    match offset {
        None => format!("fu_round<{tc}>({we} * fu_round<{tc}>({xe} * {rs}))"),
        Some(c) => format!(
            "fu_round<{tc}>(__fmul_rn({xe} * {rs}, __fadd_rn({we}, {})))",
            flit(c)
        ),
    }
}

/// A loop over row `m` of the activations in which `body` sees the element `v` (f32)
/// at column `k`: 16 bytes per thread per load when `vec`, else one element, unrolled
/// so that several loads are in flight.
fn row_pass(b: &mut String, px: &str, xrow: &str, sx: u64, t: DType, vec: bool, body: &str) {
    let _ = writeln!(b, "#pragma unroll 4");
    if vec {
        let ve = 16 / t.size_bytes();
        let _ = writeln!(
            b,
            "    for (int k0 = threadIdx.x * {ve}; k0 < K; k0 += blockDim.x * {ve}) {{"
        );
        let _ = writeln!(b, "      float xv[{ve}];");
        let _ = writeln!(
            b,
            "      fu_load<{}, {ve}>({px} + {xrow} + k0, xv);",
            ctype(t)
        );
        let _ = writeln!(b, "#pragma unroll");
        let _ = writeln!(
            b,
            "      for (int e = 0; e < {ve}; ++e) {{ const int k = k0 + e; const float v = xv[e]; {body} }}"
        );
        let _ = writeln!(b, "    }}");
    } else {
        let _ = writeln!(
            b,
            "    for (int k = threadIdx.x; k < K; k += blockDim.x) {{ const float v = fu_f32({px}[{xrow} + (long long)k * {sx}LL]); {body} }}"
        );
    }
}

/// Whether the `[.., K]` view `v` can be read `ve` elements (one 16-byte load) at a time
/// from the start of every row: unit stride, every row start a multiple of `ve`.
fn rows_vectorizable(v: &View, k: u64, ve: u64) -> bool {
    let r = v.rank();
    r >= 1
        && v.strides[r - 1] == 1
        && k.is_multiple_of(ve)
        && v.offset.is_multiple_of(ve)
        && v.dims[..r - 1]
            .iter()
            .zip(&v.strides[..r - 1])
            .all(|(d, s)| d.is_one() || *s == 0 || s.is_multiple_of(ve))
}

/// The prologue when the activations fit in shared memory in a type that holds the
/// input exactly (the compute dtype, or f32 for FP8): one pass over global memory in
/// which every thread of the block reads 16 bytes at a time (unrolled, so several loads
/// are in flight) and stages the raw row while summing its squares (or, for FP8 with no
/// norm, its largest magnitude); then, in shared memory, the norm (reading its weight
/// 16 bytes at a time) and the FP8 quantization in place. The serial scalar passes it
/// replaces read the row from global memory two or three times, 2 bytes per thread per
/// iteration, while no weight byte moved (cf. llama.cpp's `mmv.cu`, which reads the
/// activation vectorised in the dot-product loop itself).
#[allow(clippy::too_many_arguments)]
fn staged_prologue(
    b: &mut String,
    params: &mut Params,
    g: &Gemv<'_>,
    x: &View,
    k: u64,
    t: DType,
    act: DType,
    staging: Staging,
) -> Result<(), String> {
    let Staging {
        ty: a_ty, permuted, ..
    } = staging;
    let xs_at = |idx: &str| xs_index(permuted, idx);
    let tc = ctype(t);
    let sc = ctype(a_ty);
    let act_fp8 = act.is_fp8();
    let px = params.bind(x, Access::Read);
    let xrow = row_offset(x, "m")?;
    let sx = x.strides[x.rank() - 1];
    let ve = 16 / t.size_bytes();
    let _ = writeln!(b, "  for (int m = 0; m < M; ++m) {{");
    let _ = writeln!(b, "    float ss = 0.0f;");
    // The statistic pass A accumulates: squares for the norm (the FP8 scales come
    // after, per block, in pass C).
    let stat = if g.norm.is_some() {
        "ss = fmaf(v, v, ss)"
    } else {
        ""
    };
    if rows_vectorizable(x, k, ve) {
        let _ = writeln!(b, "#pragma unroll 4");
        let _ = writeln!(
            b,
            "    for (int k = threadIdx.x * {ve}; k < K; k += blockDim.x * {ve}) {{"
        );
        let _ = writeln!(b, "      float xv[{ve}];");
        let _ = writeln!(b, "      fu_load<{tc}, {ve}>({px} + {xrow} + k, xv);");
        if !stat.is_empty() {
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(
                b,
                "      for (int e = 0; e < {ve}; ++e) {{ const float v = xv[e]; {stat}; }}"
            );
        }
        if !permuted {
            let _ = writeln!(b, "      fu_store_shared<{sc}, {ve}>(xs + m * K + k, xv);");
        } else {
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(
                b,
                "      for (int e = 0; e < {ve}; ++e) xs[{}] = fu_from<{sc}>(xv[e]);",
                xs_at("k + e")
            );
        }
        let _ = writeln!(b, "    }}");
    } else {
        let _ = writeln!(b, "#pragma unroll 4");
        let _ = writeln!(
            b,
            "    for (int k = threadIdx.x; k < K; k += blockDim.x) {{"
        );
        let _ = writeln!(
            b,
            "      const float v = fu_f32({px}[{xrow} + (long long)k * {sx}LL]);"
        );
        if !stat.is_empty() {
            let _ = writeln!(b, "      {stat};");
        }
        let _ = writeln!(b, "      xs[{}] = fu_from<{sc}>(v);", xs_at("k"));
        let _ = writeln!(b, "    }}");
    }
    if let Some(n) = g.norm {
        let _ = writeln!(b, "    ss = fu_block_sum(ss);");
        let _ = writeln!(
            b,
            "    if (threadIdx.x == 0) fu_rs[m] = fu_rsqrt(ss / (float)K + {});",
            flit(n.eps)
        );
        let _ = writeln!(b, "    __syncthreads();");
        // Pass B, in shared memory: the norm in place.
        let w = n.weight;
        let pw = params.bind(w, Access::Read);
        // An offset that is a multiple of `ve` aligns the load of `ve` weights (4 to
        // 32 bytes) to its size, which is what `fu_load` needs.
        let wvec = w.rank() == 1
            && w.strides[0] == 1
            && w.offset.is_multiple_of(ve)
            && k.is_multiple_of(ve);
        if wvec {
            let e = norm_expr(
                n.offset,
                &format!("fu_f32(xs[{}])", xs_at("k + e")),
                "wv[e]",
                tc,
            );
            let _ = writeln!(b, "#pragma unroll 4");
            let _ = writeln!(
                b,
                "    for (int k = threadIdx.x * {ve}; k < K; k += blockDim.x * {ve}) {{"
            );
            let _ = writeln!(b, "      float wv[{ve}];");
            let _ = writeln!(
                b,
                "      fu_load<{}, {ve}>({pw} + {}LL + k, wv);",
                ctype(w.dtype),
                w.offset
            );
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(
                b,
                "      for (int e = 0; e < {ve}; ++e) {{ const float y = {e}; xs[{}] = fu_from<{sc}>(y); }}",
                xs_at("k + e")
            );
            let _ = writeln!(b, "    }}");
        } else {
            let we = format!(
                "fu_f32({pw}[{}LL + (long long)k * {}LL])",
                w.offset, w.strides[0]
            );
            let e = norm_expr(n.offset, &format!("fu_f32(xs[{}])", xs_at("k")), &we, tc);
            let _ = writeln!(b, "#pragma unroll 4");
            let _ = writeln!(
                b,
                "    for (int k = threadIdx.x; k < K; k += blockDim.x) {{ const float y = {e}; xs[{}] = fu_from<{sc}>(y); }}",
                xs_at("k")
            );
        }
    }
    if act_fp8 {
        // Pass C: a warp per block of inputs finds the block's scale and puts the codes
        // in place (as f32, exact). The division is the executor's rounding.
        let _ = writeln!(b, "    __syncthreads();");
        let _ = writeln!(b, "    for (int c = warp; c < NB; c += blockDim.x >> 5) {{");
        let _ = writeln!(b, "      const int k = c * {FP8_ACT_BLOCK} + lane;");
        let _ = writeln!(
            b,
            "      const float v = k < K ? fu_f32(xs[{i}]) : 0.0f;",
            i = xs_at("k")
        );
        let _ = writeln!(
            b,
            "      const float s = fu_act_block_scale(v, {});",
            flit(fp8_max(act))
        );
        let _ = writeln!(b, "      if (lane == 0) fu_as[m * NB + c] = s;");
        let _ = writeln!(
            b,
            "      if (k < K) xs[{i}] = fu_round<{}>(v / s);",
            ctype(act),
            i = xs_at("k")
        );
        let _ = writeln!(b, "    }}");
    }
    let _ = writeln!(b, "  }}");
    Ok(())
}

/// The post-norm after the rows: every block has written its rounded results; the one
/// that finishes last (an atomic ticket, as split-KV attention combines its partials)
/// reads the whole rows back (`__ldcg`, past the L1 cache, as split-KV reads its
/// partials), normalises them as `Olmo2RMSNorm` does, adds the
/// residual, and resets the ticket, so one launch does the op and the workspace is
/// left as found.
#[allow(clippy::too_many_arguments)]
/// The post-norm a GEMV's last block applies: OLMo 2's, or Gemma's with an offset.
struct PostNormTail<'a> {
    weight: &'a View,
    eps: f32,
    offset: Option<f32>,
    residual: &'a View,
    ticket: &'a View,
}

fn post_norm_tail(
    b: &mut String,
    params: &mut Params,
    g: &Gemv<'_>,
    norm: &PostNormTail<'_>,
    n_out: u64,
    t: DType,
) -> Result<(), String> {
    let PostNormTail {
        weight,
        eps,
        offset,
        residual,
        ticket,
    } = *norm;
    let tc = ctype(t);
    let o = g.outs.first().ok_or("a GEMV output")?;
    let po = params.bind(o, Access::Write);
    let pr = params.bind(residual, Access::Read);
    let pw = params.bind(weight, Access::Read);
    let pt = params.bind(ticket, Access::ReadWrite);
    let at = |p: &str, v: &View| -> Result<String, String> {
        Ok(format!(
            "{p}[{} + (long long)n * {}LL]",
            row_offset(v, "m")?,
            v.strides[v.rank() - 1]
        ))
    };
    let (oy, rv) = (at(&po, o)?, at(&pr, residual)?);
    let wv = format!(
        "fu_f32({pw}[{}LL + (long long)n * {}LL])",
        weight.offset, weight.strides[0]
    );
    let _ = writeln!(b, "  __shared__ int fu_last;");
    let _ = writeln!(b, "  __threadfence();");
    let _ = writeln!(b, "  __syncthreads();");
    let _ = writeln!(
        b,
        "  if (threadIdx.x == 0) fu_last = atomicAdd({pt} + {}, 1) == (int)gridDim.x - 1;",
        ticket.offset
    );
    let _ = writeln!(b, "  __syncthreads();");
    let _ = writeln!(b, "  if (fu_last) {{");
    let _ = writeln!(b, "    __threadfence();");
    let _ = writeln!(b, "    for (int m = 0; m < M; ++m) {{");
    let _ = writeln!(b, "      float ss = 0.0f;");
    let _ = writeln!(
        b,
        "      for (int n = threadIdx.x; n < {n_out}; n += blockDim.x) {{ const float v = fu_f32(__ldcg(&{oy})); ss += v * v; }}"
    );
    let _ = writeln!(
        b,
        "      const float inv = fu_rsqrt(fu_block_sum(ss) / (float){n_out} + {});",
        flit(eps)
    );
    let _ = writeln!(
        b,
        "      for (int n = threadIdx.x; n < {n_out}; n += blockDim.x) {oy} = fu_from<{tc}>(fu_f32({rv}) + fu_round<{tc}>({}));",
        match offset {
            None => format!("__fmul_rn({wv}, fu_f32(__ldcg(&{oy})) * inv)"),
            Some(c) => format!(
                "__fmul_rn(fu_f32(__ldcg(&{oy})) * inv, __fadd_rn({wv}, {}))",
                flit(c)
            ),
        }
    );
    let _ = writeln!(b, "      __syncthreads();");
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "    if (threadIdx.x == 0) {pt}[{}] = 0;", ticket.offset);
    let _ = writeln!(b, "  }}");
    Ok(())
}

/// The dtype of the GEMV's results.
pub(super) fn out_dtype(g: &Gemv<'_>) -> Result<DType, String> {
    let t = g.outs.first().ok_or("a GEMV needs an output")?.dtype;
    if g.outs.iter().any(|o| o.dtype != t) || g.x.dtype != t {
        return Err("GEMV input and outputs must share a dtype".into());
    }
    Ok(t)
}

/// The dot products of row `n` of each weight in `ws` with every activation row,
/// into `acc{i}[m]`, reduced over the warp.
fn row_body(
    b: &mut String,
    params: &mut Params,
    ws: &[&Weight<'_>],
    k: u64,
    staging: Staging,
    xq: &dyn Fn(&mut Params, &str) -> String,
) -> Result<(), String> {
    let Staging {
        staged,
        ty: a_ty,
        permuted,
        fp8_codes,
    } = staging;
    let ac = ctype(a_ty);
    let wdt = ws[0].values.dtype;
    let v = 16 / wdt.size_bytes();
    let vector = vector_width(ws, k).is_some();
    let mut ptrs = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        let p = params.bind(w.values, Access::Read);
        let _ = writeln!(
            b,
            "      const {}* w{i} = {p} + {}LL + (long long)n * {}LL;",
            ctype(w.values.dtype),
            w.values.offset,
            w.values.strides[0]
        );
        let _ = writeln!(b, "      float acc{i}[M];");
        let _ = writeln!(b, "      for (int m = 0; m < M; ++m) acc{i}[m] = 0.0f;");
        ptrs.push(p);
    }
    if vector {
        let _ = writeln!(b, "#pragma unroll 4");
        let _ = writeln!(b, "      for (int k = lane * {v}; k < K; k += 32 * {v}) {{");
        for (i, _) in ws.iter().enumerate() {
            let _ = writeln!(b, "        float wv{i}[{v}];");
            let _ = writeln!(b, "        fu_load<{}, {v}>(w{i} + k, wv{i});", ctype(wdt));
        }
        let _ = writeln!(b, "#pragma unroll");
        let _ = writeln!(b, "        for (int m = 0; m < M; ++m) {{");
        let _ = writeln!(b, "          float xv[{v}];");
        if permuted {
            // Chunk c of this lane's 16 values sits at c * 128 + lane * 4 of the
            // iteration's 512 (see `xs_index`).
            let _ = writeln!(
                b,
                "          const float* xp = xs + m * K + (k & ~{m}) + lane * 4;",
                m = PERMUTED_SPAN - 1
            );
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(b, "          for (int c = 0; c < 4; ++c) {{ float x4[4]; fu_load_shared<float, 4>(xp + c * 128, x4); for (int e = 0; e < 4; ++e) xv[c * 4 + e] = x4[e]; }}");
        } else if staged {
            let _ = writeln!(
                b,
                "          fu_load_shared<{ac}, {v}>(xs + m * K + k, xv);"
            );
        }
        if staged && fp8_codes {
            // Staged FP8 codes times their block's scale. `v` (4, 8 or 16) divides the
            // block and `k` is a multiple of `v`: the vector lies in one block.
            let _ = writeln!(
                b,
                "          const float sb = fu_as[m * NB + k / {FP8_ACT_BLOCK}];"
            );
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(b, "          for (int e = 0; e < {v}; ++e) xv[e] *= sb;");
        }
        if !staged {
            let e = xq(params, "k + e");
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(b, "          for (int e = 0; e < {v}; ++e) xv[e] = {e};");
        }
        let _ = writeln!(b, "#pragma unroll");
        let _ = writeln!(b, "          for (int e = 0; e < {v}; ++e) {{");
        for (i, _) in ws.iter().enumerate() {
            let _ = writeln!(
                b,
                "            acc{i}[m] = fmaf(xv[e], wv{i}[e], acc{i}[m]);"
            );
        }
        let _ = writeln!(b, "          }}");
        let _ = writeln!(b, "        }}");
        let _ = writeln!(b, "      }}");
    } else {
        let _ = writeln!(b, "      for (int k = lane; k < K; k += 32) {{");
        for (i, w) in ws.iter().enumerate() {
            let _ = writeln!(
                b,
                "        const float wv{i} = fu_f32(w{i}[(long long)k * {}LL]);",
                w.values.strides[1]
            );
        }
        let _ = writeln!(b, "        for (int m = 0; m < M; ++m) {{");
        let xe = if staged && fp8_codes {
            format!("fu_f32(xs[m * K + k]) * fu_as[m * NB + k / {FP8_ACT_BLOCK}]")
        } else if staged {
            "fu_f32(xs[m * K + k])".to_string()
        } else {
            xq(params, "k")
        };
        let _ = writeln!(b, "          const float xv = {xe};");
        for (i, _) in ws.iter().enumerate() {
            let _ = writeln!(b, "          acc{i}[m] = fmaf(xv, wv{i}, acc{i}[m]);");
        }
        let _ = writeln!(b, "        }}");
        let _ = writeln!(b, "      }}");
    }
    for (i, _) in ws.iter().enumerate() {
        let _ = writeln!(
            b,
            "      for (int m = 0; m < M; ++m) acc{i}[m] = fu_warp_sum(acc{i}[m]);"
        );
    }
    Ok(())
}

/// Each warp asks L2 for every line of its first row (of each weight of the row's
/// group) before the prologue, so that the first weight bytes are on their way while
/// the block stages and normalises the activations (no weight byte moved during the
/// prologue before; llama.cpp's `mmv.cu` overlaps the two by reading the activations
/// inside its dot-product loop, programmatic dependent launch by starting early).
fn prefetch_first_row(
    b: &mut String,
    params: &mut Params,
    weights: &[Weight<'_>],
    int_weights: &[IntWeight<'_>],
    groups: &[Vec<usize>],
    k: u64,
    warps: u32,
) {
    let _ = writeln!(b, "  {{");
    let _ = writeln!(b, "    const int n0 = blockIdx.x * {warps} + warp;");
    let mut base = 0u64;
    for group in groups {
        let rows = weights[group[0]].rows;
        let _ = writeln!(b, "    if (n0 >= {base} && n0 < {}) {{", base + rows);
        for &i in group {
            if let Some(iw) = int_weights.get(i) {
                gemv_int::prefetch_row(b, params, iw, i, k, base);
                continue;
            }
            let w = &weights[i];
            let p = params.bind(w.values, Access::Read);
            // Elements per 128-byte line.
            let line = (128 / w.values.dtype.size_bytes()).max(1);
            let _ = writeln!(
                b,
                "      const {}* pw{i} = {p} + {}LL + (long long)(n0 - {base}) * {}LL;",
                ctype(w.values.dtype),
                w.values.offset,
                w.values.strides[0]
            );
            let _ = writeln!(
                b,
                "      for (long long k = lane * {line}LL; k < {k}LL; k += 32 * {line}LL) fu_prefetch_l2(pw{i} + k * {}LL);",
                w.values.strides[1]
            );
        }
        let _ = writeln!(b, "    }}");
        base += rows;
    }
    let _ = writeln!(b, "  }}");
}

/// How a GEMV holds its activations for the rows to read.
#[derive(Copy, Clone)]
struct Staging {
    /// In shared memory (else every row reads them from global memory).
    staged: bool,
    /// The staged element type.
    ty: DType,
    /// In warp order (see [`xs_index`]).
    permuted: bool,
    /// FP8 codes, each to be multiplied by its block's scale (`fu_as`) when read.
    fp8_codes: bool,
}

/// The elements of one iteration of a warp over a row of FP8 weights (32 lanes of 16).
const PERMUTED_SPAN: u64 = 512;

/// The index in the staged activations of element `k` of row `m`. Permuted (FP8 as
/// f32), element `k` of each span of 512 (a warp's iteration: lane `k / 16`, chunk
/// `k % 16 / 4` of its four 16-byte loads) is stored at `chunk * 128 + lane * 4 +
/// k % 4`, so that the warp's c-th loads read 512 contiguous bytes.
fn xs_index(permuted: bool, k: &str) -> String {
    if permuted {
        let span = PERMUTED_SPAN;
        format!(
            "m * K + ((({k}) & ~{}) | ((({k}) & 15) >> 2 << 7) | (((({k}) >> 4) & 31) << 2) | (({k}) & 3))",
            span - 1
        )
    } else {
        format!("m * K + {k}")
    }
}

/// The elements of the 16-byte loads of the weights `ws` when every row starts
/// 16-byte aligned and is unit-stride, else `None`.
fn vector_width(ws: &[&Weight<'_>], k: u64) -> Option<u64> {
    let wdt = ws[0].values.dtype;
    let v = 16 / wdt.size_bytes();
    let vector = ws.iter().all(|w| {
        w.values.dtype == wdt
            && w.values.strides[1] == 1
            && w.values.offset.is_multiple_of(v)
            && w.values.strides[0].is_multiple_of(v)
    }) && k.is_multiple_of(v);
    vector.then_some(v)
}

/// Lane 0 scales the sums and stores the results of row `n`.
fn epilogue(
    b: &mut String,
    params: &mut Params,
    g: &Gemv<'_>,
    ws: &[&Weight<'_>],
    group: usize,
    t: DType,
) -> Result<(), String> {
    let _ = writeln!(b, "      if (lane == 0) {{");
    let _ = writeln!(b, "        for (int m = 0; m < M; ++m) {{");
    for (i, w) in ws.iter().enumerate() {
        let y = w.scaled(params, &format!("acc{i}[m]"));
        let _ = writeln!(b, "          const float y{i} = {y};");
    }
    store(b, params, g, group, t)?;
    let _ = writeln!(b, "        }}");
    let _ = writeln!(b, "      }}");
    Ok(())
}

/// The stores of a GEMV or GEMM epilogue: with the products of output row `m`, column
/// `n` (of weight group `group`) in `y0` (and the up projection's in `y1`), the op's
/// rounding, activation and residual add, and the store.
pub(super) fn store(
    b: &mut String,
    params: &mut Params,
    g: &Gemv<'_>,
    group: usize,
    t: DType,
) -> Result<(), String> {
    let tc = ctype(t);
    let out_at = |params: &mut Params, o: &View| -> Result<String, String> {
        let p = params.bind(o, Access::Write);
        let r = o.rank();
        Ok(format!(
            "{p}[{} + (long long)n * {}LL]",
            row_offset(o, "m")?,
            o.strides[r - 1]
        ))
    };
    match g.epilogue {
        Epilogue::Plain | Epilogue::PostNorm { .. } => {
            let o = g.outs.get(group).ok_or("a GEMV output per weight")?;
            let _ = writeln!(b, "          {} = fu_from<{tc}>(y0);", out_at(params, o)?);
        }
        Epilogue::Gated(act) => {
            let o = g.outs.first().ok_or("a gated-MLP output")?;
            let _ = writeln!(
                b,
                "          const float gt = fu_round<{tc}>(y0), up = fu_round<{tc}>(y1);"
            );
            let _ = writeln!(
                b,
                "          {} = fu_from<{tc}>(fu_round<{tc}>({}) * up);",
                out_at(params, o)?,
                unary_expr(act, "gt")
            );
        }
        Epilogue::Residual(res) => {
            let o = g.outs.first().ok_or("a GEMV output")?;
            let pr = params.bind(res, Access::Read);
            let rr = res.rank();
            let rv = format!(
                "fu_f32({pr}[{} + (long long)n * {}LL])",
                row_offset(res, "m")?,
                res.strides[rr - 1]
            );
            let _ = writeln!(
                b,
                "          {} = fu_from<{tc}>({rv} + fu_round<{tc}>(y0));",
                out_at(params, o)?
            );
        }
        Epilogue::ScaledResidual(res, c) => {
            let o = g.outs.first().ok_or("a GEMV output")?;
            let pr = params.bind(res, Access::Read);
            let rr = res.rank();
            let rv = format!(
                "fu_f32({pr}[{} + (long long)n * {}LL])",
                row_offset(res, "m")?,
                res.strides[rr - 1]
            );
            let c = flit(c);
            let _ = writeln!(
                b,
                "          {} = fu_from<{tc}>({rv} + fu_round<{tc}>(__fmul_rn(fu_round<{tc}>(y0), {c})));",
                out_at(params, o)?
            );
        }
    }
    Ok(())
}
