//! Attention kernels: `fused.decode_attention` (RoPE on q and k, the in-place KV
//! append, GQA attention) and `fused.attention`.
//!
//! A block serves one KV head of one sequence (and query position) together with its
//! group of query heads (query head `h` reads KV head `h / (H/KV)`), so each cached
//! entry is read once for the whole group. Threads form groups of `TPK` lanes; a group
//! reads one position's key and value in 16-byte loads (8 bytes for FP8) and keeps a
//! running max, sum and weighted value sum per head (online softmax, in f32). The
//! groups' partial results are combined through shared memory.
//!
//! For long contexts the positions are split over `SPLITS` blocks (flash-decoding):
//! each writes its partial (max, sum, unnormalised output) to a workspace, and the
//! block that finishes last, known by an atomic ticket, combines them and resets its
//! ticket, so one launch does the whole op and the workspace is left as it was found.
//!
//! Paged attention (`fused.paged_attention`, Kwon et al. 2023, "Efficient Memory
//! Management for Large Language Model Serving with PagedAttention", section 4.1) is
//! the same kernel reading its keys and values through the block table: row `b` at
//! position `p` reads position `j` from slot `j % BS` of block `table[b, j / BS]`, for
//! `j` in `start ..= p` (`start = p + 1 - W` for a sliding window, else 0), the split
//! count chosen from that row's own length. As vLLM's `paged_attention` kernel, a
//! thread group reads whole key rows of one block (consecutive `hd` elements), so the
//! loads stay 16-byte vectors; the table lookup is one cached `int` per position. The
//! new entries were written by `super::paged::write`, launched before this kernel.
//!
//! Roundings follow the eager graph: the rotated q and k, the scores (`q k`, times the
//! scale, plus the mask) are rounded to the compute dtype before the f32 softmax, and
//! the output on store. An FP8 cache stores `x / scale` and reads `q * scale`; the new
//! entry is used as the cache will hold it.

use std::fmt::Write;

use fusec_ir::DType;

use super::{at, ctype, flit, KernelCode, Operand, Params};
pub(crate) use crate::emit::{Attention, Paged};
use crate::layout::{Extent, View};
use crate::options::{DecodeShape, Options};
use crate::plan::Access;

/// How an attention kernel is laid out; computed before the workspace is allocated.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Shape {
    batch: u64,
    heads: u64,
    kv_heads: u64,
    queries: u64,
    hd: u64,
    /// Query heads per block, and blocks per KV head.
    hb: u64,
    hblk: u64,
    /// Lanes per position and elements per lane.
    tpk: u64,
    ve: u64,
    vector: bool,
    pub splits: u64,
    threads: u64,
}

impl Shape {
    /// Floats of split-KV workspace (partial outputs, maxima, sums).
    pub fn workspace_floats(&self) -> u64 {
        if self.splits == 1 {
            return 0;
        }
        let rows = self.batch * self.queries * self.heads * self.splits;
        rows * (self.hd + 2)
    }

    /// Tickets of the split-KV combine, one per block column.
    pub fn tickets(&self) -> u64 {
        if self.splits == 1 {
            0
        } else {
            self.batch * self.queries * self.kv_heads * self.hblk
        }
    }
}

pub(crate) fn fixed(e: Extent, what: &str) -> Result<u64, String> {
    e.fixed().ok_or_else(|| format!("{what} must be static"))
}

/// Whether a `[B, heads, len, hd]` view can be read `ve` elements at a time.
fn vectorizable(v: &View, ve: u64) -> bool {
    v.rank() == 4
        && v.strides[3] == 1
        && v.offset.is_multiple_of(ve)
        && v.strides[..3].iter().all(|s| s.is_multiple_of(ve))
}

/// The layout of the kernel for `a`.
pub(crate) fn shape(
    a: &Attention<'_>,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<Shape, String> {
    let (q, k) = (a.q, a.k);
    if q.rank() != 4 || k.rank() != 4 || a.v.rank() != 4 {
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
    let (cache, len_cap) = match (&a.paged, &a.decode) {
        (Some(p), _) => {
            if queries != 1 || k.dims[2] != Extent::Fixed(1) {
                return Err("paged attention takes one new position per row".into());
            }
            if p.rope.is_some() && !hd.is_multiple_of(2) {
                return Err("RoPE needs an even head_dim".into());
            }
            let geo = paged_geometry(p)?;
            // The most positions one row reads: the table's reach, or the window.
            let reach = geo.block_size.saturating_mul(geo.max_blocks);
            (p.pool_k, p.window.map_or(reach, |w| w.min(reach)))
        }
        (None, Some(d)) => {
            if queries != 1 || k.dims[2] != Extent::Fixed(1) {
                return Err("decode attention takes one new position".into());
            }
            if !hd.is_multiple_of(2) {
                return Err("RoPE needs an even head_dim".into());
            }
            (d.past_k, d.past_k.dims[2].appended().capacity(decode))
        }
        (None, None) => (k, k.dims[2].capacity(decode)),
    };
    let es = cache.dtype.size_bytes();
    let mut ve = (16 / es).min(8);
    let mut tpk = hd / ve;
    let cache_views: Vec<&View> = match (&a.paged, &a.decode) {
        (Some(p), _) => vec![p.pool_k, p.pool_v],
        (None, Some(d)) => vec![d.past_k, d.past_v],
        (None, None) => vec![a.k, a.v],
    };
    let vector = hd.is_multiple_of(ve)
        && tpk.is_power_of_two()
        && tpk <= 32
        && cache_views.iter().all(|v| vectorizable(v, ve));
    if !vector {
        tpk = 32;
        ve = hd.div_ceil(32);
    }
    let group = heads / kv_heads;
    let mut hb = group;
    while hb * ve > 32 && hb.is_multiple_of(2) {
        hb /= 2;
    }
    let hblk = group / hb;
    let threads = u64::from(opts.attention_threads);
    let base_blocks = kv_heads * hblk * batch * queries;
    let mut splits = 1;
    if len_cap >= opts.split_kv_min_len {
        let want = u64::from(opts.target_blocks).div_ceil(base_blocks.max(1));
        splits = want
            .min(len_cap / opts.split_kv_min_chunk)
            .clamp(1, MAX_SPLITS);
    }
    Ok(Shape {
        batch,
        heads,
        kv_heads,
        queries,
        hd,
        hb,
        hblk,
        tpk,
        ve,
        vector,
        splits,
        threads,
    })
}

/// The most splits of one head: more than a GPU has SMs never helps a decode step, and
/// the combine's shared memory (three floats per split and head) stays small.
const MAX_SPLITS: u64 = 128;

/// The static sizes of a paged cache, from its views.
#[derive(Copy, Clone, Debug)]
pub(crate) struct PagedGeometry {
    /// `P`, `BS` and `M`.
    pub pool_blocks: u64,
    pub block_size: u64,
    pub max_blocks: u64,
}

/// Checks the pools `[P, KV, BS, hd]`, the table `[B, M]` and the positions `[B, 1]`.
pub(crate) fn paged_geometry(p: &Paged<'_>) -> Result<PagedGeometry, String> {
    let (pk, pv) = (p.pool_k, p.pool_v);
    if pk.rank() != 4 || pv.dims != pk.dims || pv.dtype != pk.dtype {
        return Err("the pools must be two [blocks, KV, block size, head_dim] tensors".into());
    }
    if p.table.rank() != 2 || p.positions.rank() != 2 {
        return Err("the block table and positions must be [batch, ..]".into());
    }
    if p.table.dtype != DType::I32 || p.positions.dtype != DType::I32 {
        return Err("the block table and positions must be i32".into());
    }
    let geo = PagedGeometry {
        pool_blocks: fixed(pk.dims[0], "the pool's blocks")?,
        block_size: fixed(pk.dims[2], "the block size")?,
        max_blocks: fixed(p.table.dims[1], "the block table's width")?,
    };
    // Block ids and positions are 32-bit in the table and in the kernels.
    let limit = i32::MAX as u64;
    if geo.block_size == 0
        || geo.pool_blocks > limit
        || geo.block_size.saturating_mul(geo.max_blocks) > limit
    {
        return Err(format!(
            "a pool of {} blocks of {} positions and tables of {} do not fit 32-bit indices",
            geo.pool_blocks, geo.block_size, geo.max_blocks
        ));
    }
    Ok(geo)
}

/// Positions each thread group has in flight in the main loop.
const IN_FLIGHT: u32 = 2;

/// The kernel. `workspace` holds the split-KV partials (f32) and tickets (i32) when
/// `sh.splits > 1`.
pub(crate) fn attention(
    a: &Attention<'_>,
    sh: &Shape,
    workspace: Option<(&View, &View)>,
    params: &mut Params,
    _decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let t = a.out.dtype;
    let tc = ctype(t);
    let hd = sh.hd;
    let len_ext = match &a.decode {
        Some(d) => d.past_k.dims[2].appended(),
        None => a.k.dims[2],
    };
    let score_dims = vec![
        Extent::Fixed(sh.batch),
        Extent::Fixed(sh.heads),
        Extent::Fixed(sh.queries),
        len_ext,
    ];
    let (cache_k, cache_v) = match (&a.paged, &a.decode) {
        (Some(p), _) => (p.pool_k, p.pool_v),
        (None, Some(d)) => (d.past_k, d.past_v),
        (None, None) => (a.k, a.v),
    };
    let ct = cache_k.dtype;
    if cache_v.dtype != ct {
        return Err("key and value caches differ in dtype".into());
    }
    if ct.is_fp8() != a.decode.as_ref().is_some_and(|d| d.scales.is_some()) {
        return Err("an FP8 cache needs its two scales, and only an FP8 cache has them".into());
    }
    let cc = ctype(ct);
    let pq = params.bind(a.q, Access::Read);
    let s = |v: &str| v.to_string();
    let mut b = String::new();
    let _ = writeln!(
        b,
        "  constexpr int HD = {hd}, G = {}, HB = {}, HBLK = {}, TPK = {}, VE = {}, NG = {} / TPK, SPLITS = {}, H = {}, T = {}, P = {IN_FLIGHT};",
        sh.heads / sh.kv_heads,
        sh.hb,
        sh.hblk,
        sh.tpk,
        sh.ve,
        sh.threads,
        sh.splits,
        sh.heads,
        sh.queries
    );
    let _ = writeln!(
        b,
        "  const int kvh = blockIdx.x / HBLK, hb = blockIdx.x % HBLK;"
    );
    let _ = writeln!(
        b,
        "  const int bt = blockIdx.y, b = bt / T, tq = bt % T, z = blockIdx.z;"
    );
    let _ = writeln!(
        b,
        "  const int gi = threadIdx.x / TPK, sub = threadIdx.x % TPK;"
    );
    let _ = writeln!(b, "  __shared__ float qs[HB][HD];");
    let _ = writeln!(b, "  __shared__ float part[NG][HD];");
    let _ = writeln!(b, "  __shared__ float pm[NG], pl[NG];");
    let bb = s("(long long)b");
    let tqc = s("(long long)tq");
    let hh = s("(long long)h");
    let kvc = s("(long long)kvh");
    let dd = s("(long long)d");
    let dpc = s("(long long)dp");
    // Queries, rotated for decode.
    let _ = writeln!(
        b,
        "  for (int i = threadIdx.x; i < HB * HD; i += blockDim.x) {{"
    );
    let _ = writeln!(
        b,
        "    const int j = i / HD, d = i % HD, h = kvh * G + hb * HB + j;"
    );
    let qd = super::load(&pq, a.q, &[bb.clone(), hh.clone(), tqc.clone(), dd.clone()]);
    let rope = match (&a.decode, &a.paged) {
        (Some(d), _) => Some((d.cos, d.sin)),
        (None, Some(p)) => p.rope,
        (None, None) => None,
    };
    match rope {
        Some((cos, sin)) => {
            let qdp = super::load(
                &pq,
                a.q,
                &[bb.clone(), hh.clone(), tqc.clone(), dpc.clone()],
            );
            let qdims = a.q.dims.clone();
            let (cq, sq) = (table(params, cos, &qdims)?, table(params, sin, &qdims)?);
            let c = [bb.clone(), hh.clone(), tqc.clone(), dd.clone()];
            let _ = writeln!(
                b,
                "    const int dp = d < HD / 2 ? d + HD / 2 : d - HD / 2;"
            );
            let _ = writeln!(b, "    const float rot = d < HD / 2 ? -{qdp} : {qdp};");
            let _ = writeln!(
                b,
                "    qs[j][d] = fu_round<{tc}>(fu_round<{tc}>({qd} * {}) + fu_round<{tc}>(rot * {}));",
                cq.at(&c),
                sq.at(&c)
            );
        }
        None => {
            let _ = writeln!(b, "    qs[j][d] = {qd};");
        }
    }
    let _ = writeln!(b, "  }}");
    // The new entry: rotated key and value, appended in place by one block at `slot`:
    // `S`, or `S mod W` of a sliding window's ring (whose entry there has left the
    // window; every block reads the new entry from shared memory, never from there).
    let mut ksc = String::new();
    let mut vsc = String::new();
    if let Some(d) = &a.decode {
        let _ = writeln!(
            b,
            "  const long long slot = {};",
            d.past_k.dims[2].write_slot()
        );
        let _ = writeln!(b, "  __shared__ float ks[HD], vs[HD];");
        if let Some((sk, sv)) = d.scales {
            let (p1, p2) = (params.bind(sk, Access::Read), params.bind(sv, Access::Read));
            let _ = writeln!(
                b,
                "  const float ksc = fu_f32({p1}[{}LL]), vsc = fu_f32({p2}[{}LL]);",
                sk.offset, sv.offset
            );
            ksc = " * ksc".into();
            vsc = " * vsc".into();
        }
        let pk = params.bind(a.k, Access::Read);
        let pv = params.bind(a.v, Access::Read);
        let kdims = a.k.dims.clone();
        let (ck, sk) = (table(params, d.cos, &kdims)?, table(params, d.sin, &kdims)?);
        let ppk = params.bind(d.past_k, Access::ReadWrite);
        let ppv = params.bind(d.past_v, Access::ReadWrite);
        let c = [bb.clone(), kvc.clone(), s("0LL"), dd.clone()];
        let cp = [bb.clone(), kvc.clone(), s("0LL"), dpc.clone()];
        let mut whole_k = d.past_k.clone();
        whole_k.dims[2] = d.past_k.dims[2].appended();
        let mut whole_v = d.past_v.clone();
        whole_v.dims[2] = d.past_v.dims[2].appended();
        let cs = [bb.clone(), kvc.clone(), s("slot"), dd.clone()];
        let _ = writeln!(b, "  for (int d = threadIdx.x; d < HD; d += blockDim.x) {{");
        let _ = writeln!(
            b,
            "    const int dp = d < HD / 2 ? d + HD / 2 : d - HD / 2;"
        );
        let _ = writeln!(b, "    const float kp = {};", super::load(&pk, a.k, &cp));
        let _ = writeln!(b, "    const float rot = d < HD / 2 ? -kp : kp;");
        let _ = writeln!(
            b,
            "    const float kr = fu_round<{tc}>(fu_round<{tc}>({} * {}) + fu_round<{tc}>(rot * {}));",
            super::load(&pk, a.k, &c),
            ck.at(&c),
            sk.at(&c)
        );
        let _ = writeln!(b, "    const float vr = {};", super::load(&pv, a.v, &c));
        if ct.is_fp8() {
            let _ = writeln!(
                b,
                "    const {cc} kq = fu_from<{cc}>(kr / ksc), vq = fu_from<{cc}>(vr / vsc);"
            );
        } else {
            let _ = writeln!(
                b,
                "    const {cc} kq = fu_from<{cc}>(kr), vq = fu_from<{cc}>(vr);"
            );
        }
        let _ = writeln!(b, "    ks[d] = fu_f32(kq){ksc};");
        let _ = writeln!(b, "    vs[d] = fu_f32(vq){vsc};");
        let _ = writeln!(
            b,
            "    if (z == 0 && hb == 0) {{ {} = kq; {} = vq; }}",
            at(&ppk, &whole_k, &cs),
            at(&ppv, &whole_v, &cs)
        );
        let _ = writeln!(b, "  }}");
    }
    let _ = writeln!(b, "  __syncthreads();");

    // The positions of this split. The grid has room for SPLITS splits (sized for the
    // full cache); the splits in use are chosen from the length at run time, at least
    // `split_kv_min_chunk` positions each, so a short context is not cut into slivers
    // whose combine costs more than they save (flash-decoding, Dao et al. 2023, picks
    // the split count from the sequence length). The others leave at once.
    match &a.paged {
        // A paged row reads its positions `lo ..= pos`: `t` below counts from `lo`. A
        // position outside the table's reach reads nothing (the row's output is 0)
        // where the CPU executor refuses the step: a kernel has no error to return.
        Some(p) => {
            let geo = paged_geometry(p)?;
            let pp = params.bind(p.positions, Access::Read);
            let _ = writeln!(
                b,
                "  const long long pos = (long long){};",
                at(&pp, p.positions, &[bb.clone(), s("0LL")])
            );
            match p.window {
                Some(w) => {
                    let _ = writeln!(
                        b,
                        "  const long long lo = pos + 1 - {w}LL > 0 ? pos + 1 - {w}LL : 0;"
                    );
                }
                None => {
                    let _ = writeln!(b, "  const long long lo = 0;");
                }
            }
            let _ = writeln!(
                b,
                "  const long long L = pos >= 0 && pos < {}LL ? pos + 1 - lo : 0;",
                geo.block_size * geo.max_blocks
            );
        }
        None => {
            let _ = writeln!(b, "  const long long L = {};", len_ext.c());
        }
    }
    let _ = writeln!(
        b,
        "  const long long want = (L + {mc}LL - 1) / {mc}LL;",
        mc = opts.split_kv_min_chunk.max(1)
    );
    let _ = writeln!(
        b,
        "  const int NS = want < 1 ? 1 : want > SPLITS ? SPLITS : (int)want;"
    );
    let _ = writeln!(b, "  if (z >= NS) return;");
    let _ = writeln!(b, "  const long long chunk = (L + NS - 1) / NS;");
    let _ = writeln!(b, "  const long long start = (long long)z * chunk;");
    let _ = writeln!(
        b,
        "  const long long end = start + chunk < L ? start + chunk : L;"
    );
    let _ = writeln!(b, "  float q[HB][VE], acc[HB][VE], mx[HB], sm[HB];");
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "  for (int j = 0; j < HB; ++j) {{");
    let _ = writeln!(b, "    mx[j] = -FU_INF; sm[j] = 0.0f;");
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "    for (int e = 0; e < VE; ++e) {{ const int d = sub * VE + e; q[j][e] = d < HD ? qs[j][d] : 0.0f; acc[j][e] = 0.0f; }}");
    let _ = writeln!(b, "  }}");
    let pck = params.bind(cache_k, Access::Read);
    let pcv = params.bind(cache_v, Access::Read);
    let mask_view = match a.mask {
        Operand::View(m) => Some(m.broadcast_to(&score_dims)?),
        Operand::Scalar(_) => None,
        Operand::Dequant { .. } => return Err("the mask cannot be a quantized weight".into()),
    };
    // P positions in flight per thread group: all their key and value loads are issued
    // before any is used, so a group waits on memory once per P positions instead of
    // once per position (the pipelining of FlashAttention-2/3's K/V loads, done with
    // registers; `cp.async` staging is not used).
    let _ = writeln!(
        b,
        "  for (long long base = start; base < end; base += NG * P) {{"
    );
    let _ = writeln!(b, "    float kv[P][VE], vv[P][VE];");
    if a.paged.is_some() {
        let _ = writeln!(b, "    bool okv[P];");
    }
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "    for (int u = 0; u < P; ++u) {{");
    let _ = writeln!(b, "    const long long t = base + u * NG + gi;");
    match &a.paged {
        // Position `j`'s block, from the row's table; an id outside the pool (a bad
        // table) is skipped, never read (the CPU executor refuses the step).
        Some(p) => {
            let geo = paged_geometry(p)?;
            let pt = params.bind(p.table, Access::Read);
            let _ = writeln!(b, "    const long long j = lo + t;");
            let _ = writeln!(
                b,
                "    const int blk = t < end ? {} : -1;",
                at(
                    &pt,
                    p.table,
                    &[bb.clone(), format!("(j / {}LL)", geo.block_size)]
                )
            );
            let _ = writeln!(
                b,
                "    const bool valid = blk >= 0 && blk < {};",
                geo.pool_blocks
            );
            let _ = writeln!(b, "    okv[u] = valid;");
        }
        None => {
            let _ = writeln!(b, "    const bool valid = t < end;");
        }
    }
    let slot_of = match &a.paged {
        Some(p) => format!("(j % {}LL)", paged_geometry(p)?.block_size),
        None => s("t"),
    };
    let row_of = match &a.paged {
        Some(_) => s("(long long)blk"),
        None => bb.clone(),
    };
    let cache_at = |c: &str| [row_of.clone(), kvc.clone(), slot_of.clone(), s(c)];
    let load_entry = |b: &mut String,
                      name: &str,
                      ptr: &str,
                      view: &View,
                      shared: &str,
                      sc: &str| {
        let _ = writeln!(b, "    if (!valid) {{");
        let _ = writeln!(b, "#pragma unroll");
        let _ = writeln!(b, "      for (int e = 0; e < VE; ++e) {name}[e] = 0.0f;");
        if a.decode.is_some() {
            let _ = writeln!(b, "    }} else if (t == slot) {{");
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(b, "      for (int e = 0; e < VE; ++e) {name}[e] = sub * VE + e < HD ? {shared}[sub * VE + e] : 0.0f;");
        }
        let _ = writeln!(b, "    }} else {{");
        if sh.vector {
            let off = super::offset(view, &cache_at("(long long)(sub * VE)"));
            let _ = writeln!(b, "      fu_load<{cc}, VE>({ptr} + {off}, {name});");
            if !sc.is_empty() {
                let _ = writeln!(b, "#pragma unroll");
                let _ = writeln!(
                    b,
                    "      for (int e = 0; e < VE; ++e) {name}[e] = {name}[e]{sc};"
                );
            }
        } else {
            let el = super::load(ptr, view, &cache_at("(long long)(sub * VE + e)"));
            let _ = writeln!(b, "#pragma unroll");
            let _ = writeln!(b, "      for (int e = 0; e < VE; ++e) {name}[e] = sub * VE + e < HD ? {el}{sc} : 0.0f;");
        }
        let _ = writeln!(b, "    }}");
    };
    load_entry(&mut b, "kv[u]", &pck, cache_k, "ks", &ksc);
    load_entry(&mut b, "vv[u]", &pcv, cache_v, "vs", &vsc);
    let _ = writeln!(b, "    }}");
    // The mask: once per position when it is the same for every head (a decode or
    // causal mask broadcast over heads), not once per head.
    let mask_at = |p: &mut Params, m: &View| {
        let pm = p.bind(m, Access::Read);
        super::load(&pm, m, &[bb.clone(), hh.clone(), tqc.clone(), s("t")])
    };
    let head_invariant = mask_view
        .as_ref()
        .is_some_and(|m| m.dims[1].is_one() || m.strides[1] == 0);
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "    for (int u = 0; u < P; ++u) {{");
    let _ = writeln!(b, "    const long long t = base + u * NG + gi;");
    if a.paged.is_some() {
        let _ = writeln!(b, "    const bool valid = okv[u];");
    } else {
        let _ = writeln!(b, "    const bool valid = t < end;");
    }
    let mask = match &mask_view {
        Some(m) if head_invariant => {
            let e = mask_at(params, m);
            let _ = writeln!(b, "    const float mk = valid ? {e} : 0.0f;");
            "mk".to_string()
        }
        Some(m) => mask_at(params, m),
        None => flit(a.mask.scalar()?),
    };
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "    for (int j = 0; j < HB; ++j) {{");
    let _ = writeln!(b, "      float dot = 0.0f;");
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(
        b,
        "      for (int e = 0; e < VE; ++e) dot = fmaf(q[j][e], kv[u][e], dot);"
    );
    let _ = writeln!(b, "      dot = fu_group_sum<TPK>(dot);");
    let _ = writeln!(b, "      if (valid) {{");
    let _ = writeln!(b, "        const int h = kvh * G + hb * HB + j;");
    let scaled = format!("fu_round<{tc}>(fu_round<{tc}>(dot) * {})", flit(a.scale));
    // Gemma 2's soft-cap, rounded as the eager div, tanh and mul are.
    let scaled = match a.softcap {
        None => scaled,
        Some(c) => format!(
            "fu_round<{tc}>(fu_round<{tc}>(tanhf(fu_round<{tc}>({scaled} / {c}))) * {c})",
            c = flit(c)
        ),
    };
    let _ = writeln!(
        b,
        "        const float sc = fu_round<{tc}>({scaled} + {mask});"
    );
    let _ = writeln!(b, "        if (sc > -FU_INF) {{");
    let _ = writeln!(
        b,
        "          const float mn = fmaxf(mx[j], sc), corr = expf(mx[j] - mn), p = expf(sc - mn);"
    );
    let _ = writeln!(b, "          sm[j] = sm[j] * corr + p;");
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(
        b,
        "          for (int e = 0; e < VE; ++e) acc[j][e] = fmaf(p, vv[u][e], acc[j][e] * corr);"
    );
    let _ = writeln!(b, "          mx[j] = mn;");
    let _ = writeln!(b, "        }}");
    let _ = writeln!(b, "      }}");
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "    }}");
    let _ = writeln!(b, "  }}");

    // Combine the thread groups, head by head.
    let po = params.bind(a.out, Access::Write);
    let oc = [bb.clone(), hh.clone(), tqc.clone(), dd.clone()];
    let out_at = at(&po, a.out, &oc);
    let ws = match (sh.splits > 1, workspace) {
        (false, _) => None,
        (true, Some((f, c))) => Some((
            params.bind(f, Access::ReadWrite),
            params.bind(c, Access::ReadWrite),
        )),
        (true, None) => return Err("split-KV attention needs its workspace".into()),
    };
    if let Some((pw, _)) = &ws {
        let rows = sh.batch * sh.queries * sh.heads * sh.splits;
        let _ = writeln!(b, "  float* wo = {pw};");
        let _ = writeln!(b, "  float* wm = {pw} + {}LL;", rows * hd);
        let _ = writeln!(b, "  float* wl = {pw} + {}LL;", rows * hd + rows);
    }
    // Unrolled, so that the register arrays are indexed by constants.
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "  for (int j = 0; j < HB; ++j) {{");
    let _ = writeln!(b, "    const int h = kvh * G + hb * HB + j;");
    let _ = writeln!(b, "#pragma unroll");
    let _ = writeln!(b, "    for (int e = 0; e < VE; ++e) if (sub * VE + e < HD) part[gi][sub * VE + e] = acc[j][e];");
    let _ = writeln!(b, "    if (sub == 0) {{ pm[gi] = mx[j]; pl[gi] = sm[j]; }}");
    let _ = writeln!(b, "    __syncthreads();");
    let _ = writeln!(b, "    float M = -FU_INF;");
    let _ = writeln!(b, "    for (int g = 0; g < NG; ++g) M = fmaxf(M, pm[g]);");
    let _ = writeln!(b, "    float lsum = 0.0f;");
    let _ = writeln!(
        b,
        "    for (int g = 0; g < NG; ++g) if (pm[g] > -FU_INF) lsum += pl[g] * expf(pm[g] - M);"
    );
    let _ = writeln!(
        b,
        "    for (int d = threadIdx.x; d < HD; d += blockDim.x) {{"
    );
    let _ = writeln!(b, "      float o = 0.0f;");
    let _ = writeln!(b, "      for (int g = 0; g < NG; ++g) if (pm[g] > -FU_INF) o += part[g][d] * expf(pm[g] - M);");
    if ws.is_some() {
        let _ = writeln!(
            b,
            "      wo[((long long)(bt * H + h) * SPLITS + z) * HD + d] = o;"
        );
    } else {
        let _ = writeln!(
            b,
            "      {out_at} = fu_from<{tc}>(lsum > 0.0f ? o / lsum : 0.0f);"
        );
    }
    let _ = writeln!(b, "    }}");
    if ws.is_some() {
        let _ = writeln!(b, "    if (threadIdx.x == 0) {{ wm[(long long)(bt * H + h) * SPLITS + z] = M; wl[(long long)(bt * H + h) * SPLITS + z] = lsum; }}");
    }
    let _ = writeln!(b, "    __syncthreads();");
    let _ = writeln!(b, "  }}");

    // Split-KV: the last block of a column combines the splits.
    if let Some((_, pc)) = &ws {
        let _ = writeln!(b, "  __shared__ int fu_last;");
        let _ = writeln!(b, "  __threadfence();");
        let _ = writeln!(b, "  __syncthreads();");
        let _ = writeln!(
            b,
            "  const long long ticket = (long long)bt * gridDim.x + blockIdx.x;"
        );
        let _ = writeln!(
            b,
            "  if (threadIdx.x == 0) fu_last = atomicAdd({pc} + ticket, 1) == NS - 1;"
        );
        let _ = writeln!(b, "  __syncthreads();");
        let _ = writeln!(b, "  if (!fu_last) return;");
        let _ = writeln!(b, "  __threadfence();");
        // The splits' maxima and sums to shared memory, then each head's weights
        // exp(m_s - M) once, so that the output loop makes one independent load per
        // split (the reduction of flash-decoding, Dao et al. 2023).
        let _ = writeln!(
            b,
            "  __shared__ float fu_cm[HB][SPLITS], fu_cl[HB][SPLITS], fu_cw[HB][SPLITS];"
        );
        let _ = writeln!(
            b,
            "  for (int i = threadIdx.x; i < HB * NS; i += blockDim.x) {{"
        );
        let _ = writeln!(
            b,
            "    const int j = i / NS, sp = i % NS, h = kvh * G + hb * HB + j;"
        );
        let _ = writeln!(
            b,
            "    const long long row = (long long)(bt * H + h) * SPLITS;"
        );
        let _ = writeln!(
            b,
            "    fu_cm[j][sp] = __ldcg(wm + row + sp); fu_cl[j][sp] = __ldcg(wl + row + sp);"
        );
        let _ = writeln!(b, "  }}");
        let _ = writeln!(b, "  __syncthreads();");
        let _ = writeln!(
            b,
            "  for (int i = threadIdx.x; i < HB * NS; i += blockDim.x) {{"
        );
        let _ = writeln!(b, "    const int j = i / NS, sp = i % NS;");
        let _ = writeln!(b, "    float M = -FU_INF;");
        let _ = writeln!(
            b,
            "    for (int s2 = 0; s2 < NS; ++s2) M = fmaxf(M, fu_cm[j][s2]);"
        );
        let _ = writeln!(
            b,
            "    fu_cw[j][sp] = fu_cm[j][sp] > -FU_INF ? expf(fu_cm[j][sp] - M) : 0.0f;"
        );
        let _ = writeln!(b, "  }}");
        let _ = writeln!(b, "  __syncthreads();");
        let _ = writeln!(
            b,
            "  for (int i = threadIdx.x; i < HB * HD; i += blockDim.x) {{"
        );
        let _ = writeln!(
            b,
            "    const int j = i / HD, d = i % HD, h = kvh * G + hb * HB + j;"
        );
        let _ = writeln!(
            b,
            "    const long long row = (long long)(bt * H + h) * SPLITS;"
        );
        let _ = writeln!(b, "    float lsum = 0.0f, o = 0.0f;");
        let _ = writeln!(b, "#pragma unroll 8");
        let _ = writeln!(b, "    for (int sp = 0; sp < NS; ++sp) {{");
        let _ = writeln!(b, "      const float w = fu_cw[j][sp];");
        let _ = writeln!(
            b,
            "      lsum += fu_cl[j][sp] * w; o += __ldcg(wo + (row + sp) * HD + d) * w;"
        );
        let _ = writeln!(b, "    }}");
        let _ = writeln!(
            b,
            "    {out_at} = fu_from<{tc}>(lsum > 0.0f ? o / lsum : 0.0f);"
        );
        let _ = writeln!(b, "  }}");
        let _ = writeln!(b, "  if (threadIdx.x == 0) {pc}[ticket] = 0;");
    }
    let grid = [sh.kv_heads * sh.hblk, sh.batch * sh.queries, sh.splits];
    // CUDA allows 2^31 - 1 blocks along x and 65535 along y and z (CUDA C++
    // Programming Guide, "Compute capabilities", table of technical specifications).
    let limits = [(1u64 << 31) - 1, 65_535, 65_535];
    let g32 = |(v, max): (u64, u64)| {
        u32::try_from(v)
            .ok()
            .filter(|_| v <= max)
            .ok_or_else(|| format!("grid dimension {v} is beyond CUDA's limit of {max}"))
    };
    Ok(KernelCode {
        family: if a.paged.is_some() {
            "paged_attention"
        } else if a.decode.is_some() {
            "decode_attention"
        } else {
            "attention"
        },
        body: b,
        grid: [
            g32((grid[0], limits[0]))?,
            g32((grid[1], limits[1]))?,
            g32((grid[2], limits[2]))?,
        ],
        block: u32::try_from(sh.threads).map_err(|_| "too many threads".to_string())?,
        shared: 0,
    })
}

/// A RoPE table (cos or sin) broadcast to the rotated tensor's dims.
pub(crate) struct Table {
    ptr: String,
    view: Option<View>,
    literal: String,
}

impl Table {
    pub(crate) fn at(&self, c: &[String]) -> String {
        match &self.view {
            Some(v) => super::load(&self.ptr, v, c),
            None => self.literal.clone(),
        }
    }
}

pub(crate) fn table(params: &mut Params, x: &Operand, dims: &[Extent]) -> Result<Table, String> {
    match x {
        Operand::View(v) => {
            let b = v.broadcast_to(dims)?;
            Ok(Table {
                ptr: params.bind(&b, Access::Read),
                view: Some(b),
                literal: String::new(),
            })
        }
        Operand::Scalar(s) => Ok(Table {
            ptr: String::new(),
            view: None,
            literal: flit(*s),
        }),
        Operand::Dequant { .. } => Err("a RoPE table cannot be a quantized weight".into()),
    }
}

/// The dtype of the split-KV workspace.
pub(crate) const WORKSPACE_DTYPE: DType = DType::F32;
