//! The write half of paged attention: each row's new key and value (the key rotated
//! when the op carries RoPE's tables) into slot `p % BS` of block `table[b, p / BS]` of
//! each pool, where `p` is the row's position (Kwon et al. 2023, "Efficient Memory
//! Management for Large Language Model Serving with PagedAttention", section 4.1; vLLM's
//! `reshape_and_cache` kernel). The lowering launches it before the attention kernel
//! (`super::attention`), so that every row's entry is in its block before any row
//! reads: rows of one sequence at consecutive positions read each other's entries.
//!
//! One block per (KV head, row), one thread per element of the head. A position outside
//! the table's reach or a block id outside the pool writes nothing, where the CPU
//! executor refuses the step (a kernel has no error to return): no bad input writes out
//! of bounds. Two rows naming the same slot (a table the host got wrong) race; the CPU
//! executor keeps the later row's.
//!
//! Roundings follow the dense decode kernel: the rotated key is rounded to the compute
//! dtype term by term, as the eager RoPE rounds it.

use std::fmt::Write;

use super::attention::{paged_geometry, table, Attention};
use super::{at, ctype, KernelCode, Params};
use crate::options::{DecodeShape, Options};
use crate::plan::Access;

/// The kernel that writes `a.k` and `a.v` into the pools of `a.paged`.
pub(crate) fn write(
    a: &Attention<'_>,
    params: &mut Params,
    _decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let p = a
        .paged
        .as_ref()
        .ok_or("the paged write needs a paged attention")?;
    let geo = paged_geometry(p)?;
    let (k, v) = (a.k, a.v);
    if k.rank() != 4 || v.dims != k.dims {
        return Err("the new keys and values must be two [batch, KV, 1, head_dim] tensors".into());
    }
    let fixed = |i: usize, what: &str| {
        k.dims[i]
            .fixed()
            .ok_or_else(|| format!("{what} must be static"))
    };
    let (batch, kv_heads, hd) = (
        fixed(0, "the batch")?,
        fixed(1, "KV heads")?,
        fixed(3, "head_dim")?,
    );
    if k.dims[2].fixed() != Some(1) {
        return Err("paged attention writes one new position per row".into());
    }
    if p.pool_k.dims[1].fixed() != Some(kv_heads) || p.pool_k.dims[3].fixed() != Some(hd) {
        return Err("the pools' KV heads and head_dim differ from the new entries'".into());
    }
    if p.rope.is_some() && !hd.is_multiple_of(2) {
        return Err("RoPE needs an even head_dim".into());
    }
    let (tc, pc) = (ctype(a.out.dtype), ctype(p.pool_k.dtype));
    let s = |x: &str| x.to_string();
    let mut b = String::new();
    let _ = writeln!(b, "  constexpr int HD = {hd};");
    let _ = writeln!(b, "  const int kvh = blockIdx.x, b = blockIdx.y;");
    let pp = params.bind(p.positions, Access::Read);
    let pt = params.bind(p.table, Access::Read);
    let bb = s("(long long)b");
    let _ = writeln!(
        b,
        "  const long long pos = (long long){};",
        at(&pp, p.positions, &[bb.clone(), s("0LL")])
    );
    let _ = writeln!(
        b,
        "  if (pos < 0 || pos >= {}LL) return;",
        geo.block_size * geo.max_blocks
    );
    let _ = writeln!(
        b,
        "  const int blk = {};",
        at(
            &pt,
            p.table,
            &[bb.clone(), format!("(pos / {}LL)", geo.block_size)]
        )
    );
    let _ = writeln!(b, "  if (blk < 0 || blk >= {}) return;", geo.pool_blocks);
    let pk = params.bind(k, Access::Read);
    let pv = params.bind(v, Access::Read);
    let kvc = s("(long long)kvh");
    let c = [bb.clone(), kvc.clone(), s("0LL"), s("(long long)d")];
    let cp = [bb.clone(), kvc.clone(), s("0LL"), s("(long long)dp")];
    let (ck, sk) = match p.rope {
        Some((cos, sin)) => (
            Some(table(params, cos, &k.dims)?),
            Some(table(params, sin, &k.dims)?),
        ),
        None => (None, None),
    };
    let ppk = params.bind(p.pool_k, Access::ReadWrite);
    let ppv = params.bind(p.pool_v, Access::ReadWrite);
    let slot = [
        s("(long long)blk"),
        kvc,
        format!("(pos % {}LL)", geo.block_size),
        s("(long long)d"),
    ];
    let _ = writeln!(b, "  for (int d = threadIdx.x; d < HD; d += blockDim.x) {{");
    match (ck, sk) {
        (Some(ck), Some(sk)) => {
            let _ = writeln!(
                b,
                "    const int dp = d < HD / 2 ? d + HD / 2 : d - HD / 2;"
            );
            let _ = writeln!(b, "    const float kp = {};", super::load(&pk, k, &cp));
            let _ = writeln!(b, "    const float rot = d < HD / 2 ? -kp : kp;");
            let _ = writeln!(
                b,
                "    const float kr = fu_round<{tc}>(fu_round<{tc}>({} * {}) + fu_round<{tc}>(rot * {}));",
                super::load(&pk, k, &c),
                ck.at(&c),
                sk.at(&c)
            );
        }
        _ => {
            let _ = writeln!(b, "    const float kr = {};", super::load(&pk, k, &c));
        }
    }
    let _ = writeln!(b, "    {} = fu_from<{pc}>(kr);", at(&ppk, p.pool_k, &slot));
    let _ = writeln!(
        b,
        "    {} = fu_from<{pc}>({});",
        at(&ppv, p.pool_v, &slot),
        super::load(&pv, v, &c)
    );
    let _ = writeln!(b, "  }}");
    let threads = super::row_threads(hd, opts);
    let g32 = |x: u64, max: u64, what: &str| {
        u32::try_from(x)
            .ok()
            .filter(|_| x <= max)
            .ok_or_else(|| format!("{what} {x} is beyond CUDA's grid limit of {max}"))
    };
    Ok(KernelCode {
        family: "paged_write",
        body: b,
        // CUDA allows 2^31 - 1 blocks along x and 65535 along y (CUDA C++ Programming
        // Guide, "Compute capabilities").
        grid: [
            g32(kv_heads, (1 << 31) - 1, "KV heads")?,
            g32(batch, 65_535, "the batch")?,
            1,
        ],
        block: threads,
        shared: 0,
    })
}
