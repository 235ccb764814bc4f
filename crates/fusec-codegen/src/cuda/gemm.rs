//! The tensor-core GEMM: the GEMV family (`linear`, `fused.rms_norm_linear`,
//! `fused.multi_linear`, `fused.swiglu`, `fused.rms_norm_swiglu`, `fused.linear_add`,
//! `fused.linear_scale_add` and Gemma's offset-norm variants) when the activations have
//! a token axis of more than one row, as a prefill step's `[B, T, K]` do, in a graph
//! that computes in bf16 with bf16 or FP8 weights.
//!
//! Where the GEMV template stages every activation row in shared memory and streams
//! each weight row once (right for the one to sixteen rows of decode), a prefill reads
//! `B * T` rows, so the weights must be reused across rows from shared memory: the
//! classic tiled GEMM (CUTLASS's threadblock tiles, as its `gemm::threadblock::MmaPipelined`
//! names them), with warp-wide tensor-core products (PTX ISA,
//! `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, the prelude's
//! `fu_mma_bf16_16x8x16`).
//!
//! A block computes a `BM x BN` = 64 x 64 tile of the output for each weight of its
//! group (gate and up together for the gated MLPs, whose epilogue needs both): four
//! warps of 16 rows, each with eight 16 x 8 accumulator tiles per weight. The K axis
//! runs in steps of `BK` = 32: the block stages the activation tile and each weight
//! tile in shared memory as bf16 (two `k16` products per step), converting as it stages:
//!
//! - the activations through the op's prologue: the RMSNorm (its statistic per row from
//!   a pass of the block's warps over the rows first) and, for FP8 weights, the dynamic
//!   FP8 quantization the GEMV applies, per block of 32 inputs (`x / s` rounded to
//!   E4M3, `s` the block's scale, `fu_act_block_scale`): a K step is exactly one such
//!   block of each row, so the step's products go into partial sums that are scaled
//!   by their rows' block scales and added to the accumulators (the promotion of FP8
//!   partial sums in DeepSeek-V3, arXiv:2412.19437 §3.3). Each staged value is exact
//!   in bf16: the compute dtype is bf16, and every E4M3 value is a bf16 value (3
//!   mantissa bits of bf16's 7, its exponents within bf16's);
//! - the weights: bf16 as they are, E4M3 codes to their (exact) bf16 values; the
//!   per-channel (or per-tensor) FP8 scale is applied in the epilogue, as the GEMV does.
//!
//! So the products are exactly the GEMV's (FP8's before its block scale, which the
//! GEMV applies to each activation and the GEMM to each step's partial sum); only the
//! order of the f32 sums and of FP8's scaling differs (the tensor cores' order is
//! unspecified), which is why the tests compare with tolerances.
//! The epilogue runs on the accumulators in registers (each lane knows the row and
//! column of its four, per the PTX fragment table) through the GEMV's own `store`.
//!
//! Not done: `cp.async` double buffering of the tiles (Ampere's asynchronous copies),
//! `ldmatrix`, and Hopper's `wgmma`; integer weights (refused before this module) and
//! the post-norm epilogues (which need whole rows; they stay with the GEMV template).

use std::fmt::Write;

use fusec_ir::numerics::FP8_ACT_BLOCK;
use fusec_ir::DType;

use super::gemv::{fp8_max, norm_expr_with, out_dtype, row_offset, store, Epilogue, Gemv, Weight};
use super::{ctype, flit, KernelCode, Operand, Params};
use crate::plan::Access;

/// Output rows per block: four warps of one 16-row mma tile each.
const BM: u64 = 64;
/// Output columns per block: eight 8-column mma tiles per warp.
const BN: u64 = 64;
/// The K step staged per round: two `k16` products.
const BK: u64 = 32;
/// Threads per block.
const THREADS: u32 = 128;

/// Whether the GEMM (not the GEMV template) computes `g`: a token axis of more than one
/// row (`[.., T, K]` with `T > 1`), a bf16 graph, and an epilogue the GEMM has.
pub(crate) fn applies(g: &Gemv<'_>) -> bool {
    let x = g.x;
    let r = x.rank();
    let tokens = r >= 3 && x.dims[r - 2].fixed().is_some_and(|t| t > 1);
    tokens
        && x.dtype == DType::Bf16
        && !matches!(g.epilogue, Epilogue::PostNorm { .. })
        && g.weights.iter().all(|w| match w {
            Operand::View(v) => v.dtype == DType::Bf16,
            Operand::Dequant { values, act, .. } => values.dtype.is_fp8() && act.is_fp8(),
            Operand::Scalar(_) => false,
        })
}

pub(crate) fn gemm(g: &Gemv<'_>, params: &mut Params) -> Result<KernelCode, String> {
    let x = g.x;
    let r = x.rank();
    let k = x.dims[r - 1]
        .fixed()
        .ok_or("GEMM features must be static")?;
    let m_rows: u64 = x.dims[..r - 1]
        .iter()
        .map(|d| {
            d.fixed()
                .ok_or_else(|| "GEMM rows must be static".to_string())
        })
        .product::<Result<u64, String>>()?;
    let t = out_dtype(g)?;
    if t != DType::Bf16 {
        return Err(format!(
            "the tensor-core GEMM computes bf16 graphs, not {t}"
        ));
    }
    let tc = ctype(t);
    let mut weights = Vec::new();
    let mut act_fp8: Option<DType> = None;
    for w in &g.weights {
        let (values, scale) = match *w {
            Operand::View(v) => (v, None),
            Operand::Dequant {
                values, scale, act, ..
            } => {
                if !values.dtype.is_fp8() || !act.is_fp8() {
                    return Err(format!(
                        "the tensor-core GEMM reads bf16 or FP8 weights, not {} codes",
                        values.dtype
                    ));
                }
                act_fp8 = Some(*act);
                (values, Some(scale))
            }
            Operand::Scalar(_) => return Err("a GEMM weight cannot be a scalar".into()),
        };
        if scale.is_none() && values.dtype != DType::Bf16 {
            // f32 weights would be rounded to bf16 on staging, a precision the graph
            // does not have: refuse rather than compute something else.
            return Err(format!(
                "the tensor-core GEMM reads bf16 or FP8 weights, not {}",
                values.dtype
            ));
        }
        weights.push(Weight::new(values, scale, k)?);
    }
    if weights.is_empty() {
        return Err("a GEMM needs a weight".into());
    }
    if act_fp8.is_some() && weights.iter().any(|w| w.scale.is_none()) {
        return Err("weights of one GEMM quantize their activations differently".into());
    }
    let gated = matches!(g.epilogue, Epilogue::Gated(_));
    if gated && (weights.len() != 2 || weights[0].rows != weights[1].rows) {
        return Err("a gated MLP needs two weights of one shape".into());
    }
    let groups: Vec<Vec<usize>> = if gated {
        vec![vec![0, 1]]
    } else {
        (0..weights.len()).map(|i| vec![i]).collect()
    };
    let nw = groups.iter().map(Vec::len).max().unwrap_or(1);

    let px = params.bind(x, Access::Read);
    let xrow = row_offset(x, "m")?;
    let sx = x.strides[r - 1];
    let mut b = String::new();
    let _ = writeln!(
        b,
        "  constexpr int M = {m_rows}, K = {k}, BM = {BM}, BN = {BN}, BK = {BK}, LDS = BK + 8;"
    );
    let _ = writeln!(
        b,
        "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;"
    );
    let _ = writeln!(b, "  const int m0 = blockIdx.y * BM;");
    let _ = writeln!(b, "  __shared__ float fu_rs_t[BM], fu_as_t[BM];");
    // An FP8 activation block is one K step of each row (see the module documentation).
    const _: () = assert!(BK == FP8_ACT_BLOCK as u64);
    // Rows padded by 8 elements (16 bytes): the fragment loads of the eight row groups
    // of a warp then fall on distinct banks.
    let _ = writeln!(b, "  __align__(16) __shared__ {tc} As[BM][LDS];");
    for i in 0..nw {
        let _ = writeln!(b, "  __align__(16) __shared__ {tc} Bs{i}[BN][LDS];");
    }
    // The value of activation (m, kk) as the products read it, `r` its row in the tile.
    let xv = |kk: &str| format!("fu_f32({px}[{xrow} + (long long)({kk}) * {sx}LL])");
    let norm_of = |p: &mut Params, xe: &str, kk: &str, rs: &str| -> String {
        match g.norm {
            Some(n) => {
                let w = n.weight;
                let pw = p.bind(w, Access::Read);
                let wk = format!(
                    "fu_f32({pw}[{}LL + (long long)({kk}) * {}LL])",
                    w.offset, w.strides[0]
                );
                norm_expr_with(n.offset, xe, &wk, tc, rs)
            }
            None => xe.to_string(),
        }
    };

    // Prologue: each warp takes rows of the tile; its lanes stride over K.
    let _ = writeln!(b, "  for (int r = warp; r < BM; r += {}) {{", THREADS / 32);
    let _ = writeln!(b, "    const int m = m0 + r;");
    let _ = writeln!(b, "    float rs = 1.0f;");
    let _ = writeln!(b, "    if (m < M) {{");
    if let Some(n) = g.norm {
        let _ = writeln!(b, "      float ss = 0.0f;");
        let _ = writeln!(
            b,
            "      for (int k = lane; k < K; k += 32) {{ const float v = {}; ss = fmaf(v, v, ss); }}",
            xv("k")
        );
        let _ = writeln!(b, "      ss = fu_warp_sum(ss);");
        let _ = writeln!(b, "      rs = fu_rsqrt(ss / (float)K + {});", flit(n.eps));
    }
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "    if (lane == 0) fu_rs_t[r] = rs;");
    let _ = writeln!(b, "  }}");
    let _ = writeln!(b, "  __syncthreads();");

    // The activation tile's staged value: the normalised activation (FP8 quantizes it
    // after, per block, as it stages).
    let xn = norm_of(params, &xv("k"), "k", "fu_rs_t[r]");

    // Column tiles: each group's own run of blocks along x.
    let mut tile_base = 0u64;
    for (gi, group) in groups.iter().enumerate() {
        let rows = weights[group[0]].rows;
        let tiles = rows.div_ceil(BN);
        let opener = if gi == 0 { "  " } else { "  else " };
        let cond = if gi + 1 == groups.len() {
            String::new()
        } else {
            format!("if (blockIdx.x < {}) ", tile_base + tiles)
        };
        let _ = writeln!(b, "{opener}{cond}{{");
        let _ = writeln!(
            b,
            "    const int n0 = (blockIdx.x - {tile_base}) * BN, N = {rows};"
        );
        for (i, _) in group.iter().enumerate() {
            let _ = writeln!(b, "    float acc{i}[8][4];");
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(b, "    for (int j = 0; j < 8; ++j) {{ acc{i}[j][0] = 0.0f; acc{i}[j][1] = 0.0f; acc{i}[j][2] = 0.0f; acc{i}[j][3] = 0.0f; }}");
        }
        let _ = writeln!(b, "    for (int k0 = 0; k0 < K; k0 += BK) {{");
        // Stage the activations, converted.
        if let Some(act) = act_fp8 {
            // A warp per row, a lane per input: the step's 32 inputs of a row are one
            // FP8 activation block, its scale found with shuffles; the codes staged
            // (exact in bf16), the scale kept for the step's partial sums.
            let _ = writeln!(
                b,
                "      for (int r = warp; r < BM; r += {}) {{",
                THREADS / 32
            );
            let _ = writeln!(b, "        const int m = m0 + r, k = k0 + lane;");
            let _ = writeln!(b, "        const float v = m < M && k < K ? {xn} : 0.0f;");
            let _ = writeln!(
                b,
                "        const float s = fu_act_block_scale(v, {});",
                flit(fp8_max(act))
            );
            let _ = writeln!(
                b,
                "        As[r][lane] = fu_from<{tc}>(fu_round<{}>(v / s));",
                ctype(act)
            );
            let _ = writeln!(b, "        if (lane == 0) fu_as_t[r] = s;");
            let _ = writeln!(b, "      }}");
        } else {
            let _ = writeln!(
                b,
                "      for (int i = threadIdx.x; i < BM * BK; i += blockDim.x) {{"
            );
            let _ = writeln!(
                b,
                "        const int r = i / BK, c = i % BK, m = m0 + r, k = k0 + c;"
            );
            let _ = writeln!(
                b,
                "        As[r][c] = fu_from<{tc}>(m < M && k < K ? {xn} : 0.0f);"
            );
            let _ = writeln!(b, "      }}");
        }
        // Stage the weights, converted.
        for (i, &wi) in group.iter().enumerate() {
            let w = &weights[wi];
            let pw = params.bind(w.values, Access::Read);
            let _ = writeln!(
                b,
                "      for (int i = threadIdx.x; i < BN * BK; i += blockDim.x) {{"
            );
            let _ = writeln!(
                b,
                "        const int r = i / BK, c = i % BK, n = n0 + r, k = k0 + c;"
            );
            let _ = writeln!(
                b,
                "        Bs{i}[r][c] = fu_from<{tc}>(n < N && k < K ? fu_f32({pw}[{}LL + (long long)n * {}LL + (long long)k * {}LL]) : 0.0f);",
                w.values.offset, w.values.strides[0], w.values.strides[1]
            );
            let _ = writeln!(b, "      }}");
        }
        let _ = writeln!(b, "      __syncthreads();");
        // FP8: the step's products into partial sums of their own, scaled by the rows'
        // block scales after (DeepSeek-V3's promotion of FP8 partial sums,
        // arXiv:2412.19437 §3.3); otherwise straight into the accumulators.
        let into = if act_fp8.is_some() {
            for (i, _) in group.iter().enumerate() {
                let _ = writeln!(b, "      float part{i}[8][4] = {{}};");
            }
            "part"
        } else {
            "acc"
        };
        let _ = writeln!(b, "#pragma unroll");
        let _ = writeln!(b, "      for (int ks = 0; ks < BK; ks += 16) {{");
        let _ = writeln!(b, "        const int ra = warp * 16 + g;");
        let _ = writeln!(b, "        unsigned a[4];");
        let _ = writeln!(
            b,
            "        a[0] = *reinterpret_cast<const unsigned*>(&As[ra][ks + 2 * t4]);"
        );
        let _ = writeln!(
            b,
            "        a[1] = *reinterpret_cast<const unsigned*>(&As[ra + 8][ks + 2 * t4]);"
        );
        let _ = writeln!(
            b,
            "        a[2] = *reinterpret_cast<const unsigned*>(&As[ra][ks + 2 * t4 + 8]);"
        );
        let _ = writeln!(
            b,
            "        a[3] = *reinterpret_cast<const unsigned*>(&As[ra + 8][ks + 2 * t4 + 8]);"
        );
        let _ = writeln!(b, "#pragma unroll");
        let _ = writeln!(b, "        for (int j = 0; j < 8; ++j) {{");
        for (i, _) in group.iter().enumerate() {
            let _ = writeln!(b, "          {{");
            let _ = writeln!(b, "            unsigned bf[2];");
            let _ = writeln!(
                b,
                "            bf[0] = *reinterpret_cast<const unsigned*>(&Bs{i}[j * 8 + g][ks + 2 * t4]);"
            );
            let _ = writeln!(
                b,
                "            bf[1] = *reinterpret_cast<const unsigned*>(&Bs{i}[j * 8 + g][ks + 2 * t4 + 8]);"
            );
            let _ = writeln!(b, "            fu_mma_bf16_16x8x16({into}{i}[j], a, bf);");
            let _ = writeln!(b, "          }}");
        }
        let _ = writeln!(b, "        }}");
        let _ = writeln!(b, "      }}");
        if act_fp8.is_some() {
            // c[e] of tile j is row g (+8 for e >= 2) of the warp's 16.
            let _ = writeln!(
                b,
                "      const float s_lo = fu_as_t[warp * 16 + g], s_hi = fu_as_t[warp * 16 + g + 8];"
            );
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(b, "      for (int j = 0; j < 8; ++j) {{");
            for (i, _) in group.iter().enumerate() {
                let _ = writeln!(
                    b,
                    "        acc{i}[j][0] = fmaf(part{i}[j][0], s_lo, acc{i}[j][0]); acc{i}[j][1] = fmaf(part{i}[j][1], s_lo, acc{i}[j][1]);"
                );
                let _ = writeln!(
                    b,
                    "        acc{i}[j][2] = fmaf(part{i}[j][2], s_hi, acc{i}[j][2]); acc{i}[j][3] = fmaf(part{i}[j][3], s_hi, acc{i}[j][3]);"
                );
            }
            let _ = writeln!(b, "      }}");
        }
        let _ = writeln!(b, "      __syncthreads();");
        let _ = writeln!(b, "    }}");
        // The epilogue, from the accumulators: c[e] is row g (+8 for e >= 2), column
        // 2 t4 + e % 2 of tile j.
        let _ = writeln!(b, "#pragma unroll");
        let _ = writeln!(b, "    for (int j = 0; j < 8; ++j) {{");
        let _ = writeln!(b, "#pragma unroll");
        let _ = writeln!(b, "      for (int e = 0; e < 4; ++e) {{");
        let _ = writeln!(
            b,
            "        const int r = warp * 16 + g + (e >= 2 ? 8 : 0), m = m0 + r, n = n0 + j * 8 + 2 * t4 + (e & 1);"
        );
        let _ = writeln!(b, "        if (m < M && n < N) {{");
        for (i, &wi) in group.iter().enumerate() {
            let y = weights[wi].scaled(params, &format!("acc{i}[j][e]"));
            let _ = writeln!(b, "          const float y{i} = {y};");
        }
        store(&mut b, params, g, gi, t)?;
        let _ = writeln!(b, "        }}");
        let _ = writeln!(b, "      }}");
        let _ = writeln!(b, "    }}");
        let _ = writeln!(b, "  }}");
        tile_base += tiles;
    }
    let grid_y = m_rows.div_ceil(BM);
    let grid_x = tile_base;
    let grid = [
        u32::try_from(grid_x).map_err(|_| "too many GEMM column tiles")?,
        u32::try_from(grid_y).map_err(|_| "too many GEMM row tiles")?,
        1,
    ];
    if grid[1] > 65_535 {
        return Err(format!(
            "{m_rows} GEMM rows exceed the grid's 65535 row tiles"
        ));
    }
    Ok(KernelCode {
        family: match g.epilogue {
            Epilogue::Gated(fusec_ir::UnaryOp::Silu) => "gemm_swiglu",
            Epilogue::Gated(fusec_ir::UnaryOp::GeluTanh) => "gemm_geglu",
            Epilogue::Gated(_) => "gemm_gated",
            Epilogue::Residual(_) => "gemm_add",
            Epilogue::ScaledResidual(..) => "gemm_scale_add",
            Epilogue::PostNorm { .. } | Epilogue::Plain => "gemm",
        },
        body: b,
        grid,
        block: THREADS,
        shared: 0,
    })
}
