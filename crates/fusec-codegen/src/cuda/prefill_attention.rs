//! Causal prefill attention: `fused.decode_attention` (and its soft-capped variant)
//! with `T > 1` new positions per sequence, as a prefill step's graph has it: q `[B, H,
//! T, hd]`, the new k and v `[B, KV, T, hd]` (RoPE applied here, to q and k), the caches
//! `[B, KV, S, hd]` appended in place to `S + T`, and the additive mask `[B, 1, T, S + T]`.
//!
//! The FlashAttention-2 scheme (Dao, "FlashAttention-2: Faster Attention with Better
//! Parallelism and Work Partitioning", 2023, algorithm 1 and section 3.2): a block takes
//! `BQ` query rows of one head of one sequence (the grid is query tiles x heads x
//! batch, FlashAttention-2's parallelisation over the sequence as well as the heads);
//! the keys and values pass through shared memory in tiles of `BKV` positions, and each
//! row keeps a running max, sum and unnormalised output (the online softmax,
//! Milakov and Gimelshein 2018), rescaled once per tile. No `T x (S + T)` score matrix is
//! ever stored. Each warp owns `BQ / 4` rows; a lane scores one position of the tile
//! per row, the warp's shuffles give the row's max and sum, and each lane accumulates
//! the output dimensions `lane + 32 e`. GQA: query head `h` reads KV head `h / G`.
//!
//! Causality: the graph's mask is the causal one by construction (`fusec_ir::step`: a
//! prefill step's mask is `[B, 1, T, S + T]` with row `t` seeing positions `..= S + t`),
//! so a block stops at the last position its last row sees, and each row skips the
//! positions past its own (whose mask entries are `-inf`); the mask is still added to
//! every position a row sees, so a padding mask over the visible positions is honoured.
//!
//! The new entries: the blocks of a KV group's first query head write their rows' new
//! keys (rotated) and values into the cache at `S + t`; every block reads positions
//! below `S` from the cache and the new ones from the inputs (rotated and rounded as
//! the cache stores them), so no block reads what another block of the launch writes
//! and the op stays one launch. An FP8 cache stores `x / scale` and reads `q * scale`,
//! as the decode kernel.
//!
//! Roundings follow the decode kernel (`super::attention`), so the eager graph's: the
//! rotated q and k, and the scores (`q k`, times the scale, plus the mask) in the
//! compute dtype, the softmax and the output sums in f32, the output rounded on store.
//! Products and sums are f32 on the CUDA cores; FlashAttention-2's tensor-core `q k^T`
//! and `p v` are not done here. Sliding-window rings have no prefill kernel yet.

use std::fmt::Write;

use super::attention::{fixed, table};
use super::{at, ctype, flit, load, KernelCode, Operand, Params};
use crate::emit::Attention;
use crate::layout::Extent;
use crate::plan::Access;

/// Threads per block: four warps.
const THREADS: u64 = 128;
/// The static shared memory a block may use.
const SHARED_LIMIT: u64 = 48 * 1024;

/// Whether `a` is a prefill's attention: a decode attention with more than one query.
pub(crate) fn applies(a: &Attention<'_>) -> bool {
    a.decode.is_some() && a.paged.is_none() && a.q.rank() == 4 && a.q.dims[2].fixed() != Some(1)
}

/// Query rows and key positions per tile: the largest that fit the shared memory (the
/// queries, and the keys and values of a tile, in f32; keys padded by one so that the
/// lanes' rows fall on distinct banks).
fn tiles(hd: u64) -> Result<(u64, u64), String> {
    [(16, 32), (16, 16), (8, 16), (4, 16), (4, 8)]
        .into_iter()
        .find(|&(bq, bkv)| 4 * (bq * hd + bkv * (hd + 1) + bkv * hd) <= SHARED_LIMIT)
        .ok_or_else(|| format!("head_dim {hd} is too large for the prefill attention's tiles"))
}

pub(crate) fn attention(a: &Attention<'_>, params: &mut Params) -> Result<KernelCode, String> {
    let d = a
        .decode
        .as_ref()
        .ok_or("prefill attention needs its caches")?;
    let (q, k, v) = (a.q, a.k, a.v);
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err("attention operands must be [batch, heads, len, head_dim]".into());
    }
    let batch = fixed(q.dims[0], "the batch")?;
    let heads = fixed(q.dims[1], "query heads")?;
    let queries = fixed(q.dims[2], "the query length")?;
    let hd = fixed(q.dims[3], "head_dim")?;
    let kv_heads = fixed(k.dims[1], "KV heads")?;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(format!(
            "{heads} query heads are not a multiple of {kv_heads} KV heads"
        ));
    }
    if k.dims[2] != Extent::Fixed(queries) || v.dims[2] != Extent::Fixed(queries) {
        return Err("a prefill's new keys and values must have one entry per query".into());
    }
    if !hd.is_multiple_of(2) {
        return Err("RoPE needs an even head_dim".into());
    }
    let past = match d.past_k.dims[2] {
        Extent::Past(p) => p,
        Extent::Window { .. } => {
            return Err(
                "a sliding window's ring cache has no CUDA prefill attention yet: prefill it token by token (decode steps)"
                    .into(),
            )
        }
        Extent::Fixed(_) => return Err("the cache length must be S".into()),
    };
    let ct = d.past_k.dtype;
    if d.past_v.dtype != ct {
        return Err("key and value caches differ in dtype".into());
    }
    if ct.is_fp8() != d.scales.is_some() {
        return Err("an FP8 cache needs its two scales, and only an FP8 cache has them".into());
    }
    let t = a.out.dtype;
    let (tc, cc) = (ctype(t), ctype(ct));
    let (bq, bkv) = tiles(hd)?;
    let rw = bq / (THREADS / 32);
    let s = |x: &str| x.to_string();

    let mut b = String::new();
    let _ = writeln!(
        b,
        "  constexpr int HD = {hd}, G = {}, T = {queries}, BQ = {bq}, BKV = {bkv}, RW = {rw}, DPL = (HD + 31) / 32;",
        heads / kv_heads
    );
    let _ = writeln!(
        b,
        "  const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z, kvh = h / G;"
    );
    let _ = writeln!(
        b,
        "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;"
    );
    let _ = writeln!(
        b,
        "  const int t0 = qt * BQ, t1 = t0 + BQ < T ? t0 + BQ : T;"
    );
    let _ = writeln!(b, "  __shared__ float Qs[BQ][HD];");
    let _ = writeln!(b, "  __shared__ float Ks[BKV][HD + 1];");
    let _ = writeln!(b, "  __shared__ float Vs[BKV][HD];");
    let (mut ksc, mut vsc, mut kdiv, mut vdiv) = (String::new(), String::new(), "", "");
    if let Some((sk, sv)) = d.scales {
        let (p1, p2) = (params.bind(sk, Access::Read), params.bind(sv, Access::Read));
        let _ = writeln!(
            b,
            "  const float ksc = fu_f32({p1}[{}LL]), vsc = fu_f32({p2}[{}LL]);",
            sk.offset, sv.offset
        );
        ksc = " * ksc".into();
        vsc = " * vsc".into();
        kdiv = " / ksc";
        vdiv = " / vsc";
    }
    let (bb, hh, kvc, dd, dpc) = (
        s("(long long)b"),
        s("(long long)h"),
        s("(long long)kvh"),
        s("(long long)d"),
        s("(long long)dp"),
    );

    // The queries of the tile, rotated.
    let pq = params.bind(q, Access::Read);
    let qdims = q.dims.clone();
    let (cq, sq) = (table(params, d.cos, &qdims)?, table(params, d.sin, &qdims)?);
    let tq = s("(long long)tq");
    let cqd = [bb.clone(), hh.clone(), tq.clone(), dd.clone()];
    let cqp = [bb.clone(), hh.clone(), tq.clone(), dpc.clone()];
    let _ = writeln!(
        b,
        "  for (int i = threadIdx.x; i < BQ * HD; i += blockDim.x) {{"
    );
    let _ = writeln!(
        b,
        "    const int r = i / HD, d = i % HD, tq = t0 + r, dp = d < HD / 2 ? d + HD / 2 : d - HD / 2;"
    );
    let _ = writeln!(b, "    float qv = 0.0f;");
    let _ = writeln!(b, "    if (tq < T) {{");
    let _ = writeln!(b, "      const float qp = {};", load(&pq, q, &cqp));
    let _ = writeln!(b, "      const float rot = d < HD / 2 ? -qp : qp;");
    let _ = writeln!(
        b,
        "      qv = fu_round<{tc}>(fu_round<{tc}>({} * {}) + fu_round<{tc}>(rot * {}));",
        load(&pq, q, &cqd),
        cq.at(&cqd),
        sq.at(&cqd)
    );
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "    Qs[r][d] = qv;");
    let _ = writeln!(b, "  }}");

    // The new key and value at (tn, d), as the cache holds them (`kq`, `vq`).
    let pk = params.bind(k, Access::Read);
    let pv = params.bind(v, Access::Read);
    let kdims = k.dims.clone();
    let (ck, sk) = (table(params, d.cos, &kdims)?, table(params, d.sin, &kdims)?);
    let tn = s("(long long)tn");
    let ckd = [bb.clone(), kvc.clone(), tn.clone(), dd.clone()];
    let ckp = [bb.clone(), kvc.clone(), tn.clone(), dpc.clone()];
    let new_entry = |b: &mut String, indent: &str| {
        let _ = writeln!(
            b,
            "{indent}const int dp = d < HD / 2 ? d + HD / 2 : d - HD / 2;"
        );
        let _ = writeln!(b, "{indent}const float kp = {};", load(&pk, k, &ckp));
        let _ = writeln!(b, "{indent}const float rot = d < HD / 2 ? -kp : kp;");
        let _ = writeln!(
            b,
            "{indent}const float kr = fu_round<{tc}>(fu_round<{tc}>({} * {}) + fu_round<{tc}>(rot * {}));",
            load(&pk, k, &ckd),
            ck.at(&ckd),
            sk.at(&ckd)
        );
        let _ = writeln!(b, "{indent}const float vr = {};", load(&pv, v, &ckd));
        let _ = writeln!(
            b,
            "{indent}const {cc} kq = fu_from<{cc}>(kr{kdiv}), vq = fu_from<{cc}>(vr{vdiv});"
        );
    };
    // The cache after the step: `S + past + T` positions, written at `S + tn`.
    let ppk = params.bind(d.past_k, Access::ReadWrite);
    let ppv = params.bind(d.past_v, Access::ReadWrite);
    let mut whole_k = d.past_k.clone();
    whole_k.dims[2] = Extent::Past(past + queries);
    let mut whole_v = d.past_v.clone();
    whole_v.dims[2] = Extent::Past(past + queries);
    let slot = if past == 0 {
        s("((long long)S + tn)")
    } else {
        format!("((long long)S + {past}LL + tn)")
    };
    let cs = [bb.clone(), kvc.clone(), slot, dd.clone()];
    let _ = writeln!(b, "  if (h % G == 0) {{");
    let _ = writeln!(
        b,
        "    for (int i = threadIdx.x; i < (t1 - t0) * HD; i += blockDim.x) {{"
    );
    let _ = writeln!(b, "      const int tn = t0 + i / HD, d = i % HD;");
    new_entry(&mut b, "      ");
    let _ = writeln!(
        b,
        "      {} = kq; {} = vq;",
        at(&ppk, &whole_k, &cs),
        at(&ppv, &whole_v, &cs)
    );
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "  }}");

    // The online softmax state of the warp's rows.
    let _ = writeln!(b, "  float mx[RW], sm[RW], acc[RW][DPL];");
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "  for (int i = 0; i < RW; ++i) {{");
    let _ = writeln!(b, "    mx[i] = -FU_INF; sm[i] = 0.0f;");
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "    for (int e = 0; e < DPL; ++e) acc[i][e] = 0.0f;");
    let _ = writeln!(b, "  }}");
    let cached = if past == 0 {
        s("(long long)S")
    } else {
        format!("((long long)S + {past}LL)")
    };
    let _ = writeln!(b, "  const long long P0 = {cached};");
    // The last position the tile's last row sees, plus one.
    let _ = writeln!(b, "  const long long L = P0 + t1;");
    let _ = writeln!(b, "  for (long long j0 = 0; j0 < L; j0 += BKV) {{");
    let _ = writeln!(b, "    __syncthreads();");
    let _ = writeln!(
        b,
        "    for (int i = threadIdx.x; i < BKV * HD; i += blockDim.x) {{"
    );
    let _ = writeln!(
        b,
        "      const int u = i / HD, d = i % HD; const long long j = j0 + u;"
    );
    let _ = writeln!(b, "      float kv = 0.0f, vv = 0.0f;");
    let cj = [bb.clone(), kvc.clone(), s("j"), dd.clone()];
    let _ = writeln!(b, "      if (j < P0) {{");
    let _ = writeln!(
        b,
        "        kv = {}{ksc}; vv = {}{vsc};",
        load(&ppk, d.past_k, &cj),
        load(&ppv, d.past_v, &cj)
    );
    let _ = writeln!(b, "      }} else if (j < L) {{");
    let _ = writeln!(b, "        const int tn = (int)(j - P0);");
    new_entry(&mut b, "        ");
    let _ = writeln!(b, "        kv = fu_f32(kq){ksc}; vv = fu_f32(vq){vsc};");
    let _ = writeln!(b, "      }}");
    let _ = writeln!(b, "      Ks[u][d] = kv; Vs[u][d] = vv;");
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "    __syncthreads();");
    // Scores: lane `u` of the warp scores position `j0 + u` for each of its rows.
    let len_ext = Extent::Past(past + queries);
    let score_dims = vec![
        Extent::Fixed(batch),
        Extent::Fixed(heads),
        Extent::Fixed(queries),
        len_ext,
    ];
    let mask = match a.mask {
        Operand::View(m) => {
            let mv = m.broadcast_to(&score_dims)?;
            let pm = params.bind(&mv, Access::Read);
            load(&pm, &mv, &[bb.clone(), hh.clone(), tq.clone(), s("j")])
        }
        Operand::Scalar(x) => flit(*x),
        Operand::Dequant { .. } => return Err("the mask cannot be a quantized weight".into()),
    };
    let scaled = format!("fu_round<{tc}>(fu_round<{tc}>(dot) * {})", flit(a.scale));
    let scaled = match a.softcap {
        None => scaled,
        Some(c) => format!(
            "fu_round<{tc}>(fu_round<{tc}>(tanhf(fu_round<{tc}>({scaled} / {c}))) * {c})",
            c = flit(c)
        ),
    };
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "    for (int i = 0; i < RW; ++i) {{");
    let _ = writeln!(b, "      const int r = warp * RW + i, tq = t0 + r;");
    let _ = writeln!(b, "      const long long j = j0 + lane;");
    let _ = writeln!(b, "      float sc = -FU_INF;");
    let _ = writeln!(b, "      if (tq < T && lane < BKV && j <= P0 + tq) {{");
    let _ = writeln!(b, "        float dot = 0.0f;");
    let _ = writeln!(
        b,
        "        for (int d = 0; d < HD; ++d) dot = fmaf(Qs[r][d], Ks[lane][d], dot);"
    );
    let _ = writeln!(b, "        sc = fu_round<{tc}>({scaled} + {mask});");
    let _ = writeln!(b, "      }}");
    let _ = writeln!(b, "      const float mn = fmaxf(mx[i], fu_warp_max(sc));");
    // `mn` is the warp's, so every lane takes the same branch.
    let _ = writeln!(b, "      if (mn > -FU_INF) {{");
    let _ = writeln!(
        b,
        "        const float corr = expf(mx[i] - mn), p = sc > -FU_INF ? expf(sc - mn) : 0.0f;"
    );
    let _ = writeln!(b, "        sm[i] = sm[i] * corr + fu_warp_sum(p);");
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(
        b,
        "        for (int e = 0; e < DPL; ++e) acc[i][e] *= corr;"
    );
    let _ = writeln!(b, "        for (int u = 0; u < BKV; ++u) {{");
    let _ = writeln!(
        b,
        "          const float pu = __shfl_sync(FU_FULL_MASK, p, u);"
    );
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(
        b,
        "          for (int e = 0; e < DPL; ++e) {{ const int d = lane + 32 * e; if (d < HD) acc[i][e] = fmaf(pu, Vs[u][d], acc[i][e]); }}"
    );
    let _ = writeln!(b, "        }}");
    let _ = writeln!(b, "        mx[i] = mn;");
    let _ = writeln!(b, "      }}");
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "  }}");
    // The output rows.
    let po = params.bind(a.out, Access::Write);
    let oc = [bb.clone(), hh.clone(), tq.clone(), dd.clone()];
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "  for (int i = 0; i < RW; ++i) {{");
    let _ = writeln!(b, "    const int tq = t0 + warp * RW + i;");
    let _ = writeln!(b, "    if (tq >= T) continue;");
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "    for (int e = 0; e < DPL; ++e) {{");
    let _ = writeln!(b, "      const int d = lane + 32 * e;");
    let _ = writeln!(
        b,
        "      if (d < HD) {} = fu_from<{tc}>(sm[i] > 0.0f ? acc[i][e] / sm[i] : 0.0f);",
        at(&po, a.out, &oc)
    );
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "  }}");
    let g32 = |v: u64, what: &str| u32::try_from(v).map_err(|_| format!("too many {what}"));
    let grid = [
        g32(queries.div_ceil(bq), "query tiles")?,
        g32(heads, "heads")?,
        g32(batch, "sequences")?,
    ];
    if grid[1] > 65_535 || grid[2] > 65_535 {
        return Err("too many heads or sequences for the grid".into());
    }
    Ok(KernelCode {
        family: if a.softcap.is_some() {
            "prefill_attention_capped"
        } else {
            "prefill_attention"
        },
        body: b,
        grid,
        block: THREADS as u32,
        shared: 0,
    })
}
