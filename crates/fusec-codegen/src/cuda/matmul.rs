//! Batched matrix products with broadcast batch dimensions (`torch.matmul`), as the
//! eager graph uses them for the RoPE tables and for attention's `q k^T` and `p v`.
//!
//! The strategy follows the strides, which are static: where the right operand is
//! contiguous along the contracted axis (`q k^T`) a warp computes one output element
//! with its lanes along K, so loads coalesce; otherwise (`p v`) a thread computes one
//! output element and neighbouring threads read neighbouring columns.

use std::fmt::Write;

use super::{at, ctype, decompose, grid_for, load, numel, numel_capacity, KernelCode, Params};
use crate::layout::View;
use crate::options::{DecodeShape, Options};
use crate::plan::Access;

pub(crate) fn matmul(
    a: &View,
    b: &View,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let (ra, rb, ro) = (a.rank(), b.rank(), out.rank());
    if ra < 2 || rb < 2 || ro < 2 {
        return Err("matmul operands must have rank >= 2".into());
    }
    let batch = &out.dims[..ro - 2];
    let mut a_dims = batch.to_vec();
    a_dims.extend_from_slice(&a.dims[ra - 2..]);
    let mut b_dims = batch.to_vec();
    b_dims.extend_from_slice(&b.dims[rb - 2..]);
    let a = a.broadcast_to(&a_dims)?;
    let b = b.broadcast_to(&b_dims)?;
    let k_ext = a.dims[ro - 1];
    let pa = params.bind(&a, Access::Read);
    let pb = params.bind(&b, Access::Read);
    let po = params.bind(out, Access::Write);
    let (split, coords) = decompose(&out.dims, "o", "c", "    ");
    let (m, n) = (coords[ro - 2].clone(), coords[ro - 1].clone());
    let mut ca = coords[..ro - 2].to_vec();
    ca.push(m);
    ca.push("k".into());
    let mut cb = coords[..ro - 2].to_vec();
    cb.push("k".into());
    cb.push(n);
    let (va, vb) = (load(&pa, &a, &ca), load(&pb, &b, &cb));
    let store = format!(
        "{} = fu_from<{}>(acc);",
        at(&po, out, &coords),
        ctype(out.dtype)
    );
    let warp_per_output = b.strides[ro - 2] == 1 && k_ext.capacity(decode) >= 16;
    let mut body = String::new();
    let _ = writeln!(body, "  const long long total = {};", numel(&out.dims));
    let _ = writeln!(body, "  const long long K = {};", k_ext.c());
    let total_cap = numel_capacity(&out.dims, decode);
    let per_block = u64::from(opts.block_size);
    let grid = if warp_per_output {
        let _ = writeln!(body, "  const int lane = threadIdx.x & 31;");
        let _ = writeln!(
            body,
            "  const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;"
        );
        let _ = writeln!(
            body,
            "  for (long long o = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; o < total; o += warps) {{"
        );
        body.push_str(&split);
        let _ = writeln!(body, "    float acc = 0.0f;");
        let _ = writeln!(
            body,
            "    for (long long k = lane; k < K; k += 32) acc = fmaf({va}, {vb}, acc);"
        );
        let _ = writeln!(body, "    acc = fu_warp_sum(acc);");
        let _ = writeln!(body, "    if (lane == 0) {store}");
        grid_for(total_cap, per_block / 32, opts)
    } else {
        let _ = writeln!(
            body,
            "  for (long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += (long long)gridDim.x * blockDim.x) {{"
        );
        body.push_str(&split);
        let _ = writeln!(body, "    float acc = 0.0f;");
        let _ = writeln!(
            body,
            "    for (long long k = 0; k < K; ++k) acc = fmaf({va}, {vb}, acc);"
        );
        let _ = writeln!(body, "    {store}");
        grid_for(total_cap, per_block, opts)
    };
    body.push_str("  }\n");
    Ok(KernelCode {
        family: "matmul",
        body,
        grid: [grid, 1, 1],
        block: opts.block_size,
        shared: 0,
    })
}
