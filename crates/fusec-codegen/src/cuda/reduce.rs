//! Row kernels: reductions, argmax and softmax along one axis. One block per row (in
//! a grid-stride loop over rows), threads striding along the row, block reductions.
//! Sums accumulate in f32 in a fixed order, so results are deterministic.

use std::fmt::Write;

use fusec_ir::ReduceOp;

use super::{
    at, ctype, decompose, grid_for, load, numel, numel_capacity, row_threads, KernelCode, Params,
};
use crate::layout::{Extent, View};
use crate::options::{DecodeShape, Options};
use crate::plan::Access;

/// The loop over rows: the statements before the per-row code and the coordinates of
/// the row (with `j` along `axis`).
struct Rows {
    head: String,
    coords: Vec<String>,
    outer: Vec<String>,
    len: String,
    grid: u32,
    block: u32,
}

fn rows(x: &View, axis: usize, decode: &DecodeShape, opts: &Options) -> Rows {
    let mut outer: Vec<Extent> = x.dims.clone();
    outer.remove(axis);
    let (split, outer_coords) = decompose(&outer, "r", "c", "    ");
    let mut coords = outer_coords.clone();
    coords.insert(axis, "j".to_string());
    let mut head = String::new();
    let _ = writeln!(head, "  const long long rows = {};", numel(&outer));
    let _ = writeln!(head, "  const long long len = {};", x.dims[axis].c());
    let _ = writeln!(
        head,
        "  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {{"
    );
    head.push_str(&split);
    Rows {
        head,
        coords,
        outer: outer_coords,
        len: "len".into(),
        grid: grid_for(numel_capacity(&outer, decode), 1, opts),
        block: row_threads(x.dims[axis].capacity(decode), opts),
    }
}

/// The output coordinates of a reduction: the row's, with 0 at `axis` if kept.
fn reduced_coords(outer: &[String], axis: usize, keepdim: bool) -> Vec<String> {
    let mut c = outer.to_vec();
    if keepdim {
        c.insert(axis, "0LL".to_string());
    }
    c
}

/// `kind` along `along.0`, keeping it as a size-1 dimension when `along.1`.
pub(crate) fn reduce(
    kind: ReduceOp,
    x: &View,
    along: (usize, bool),
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let (axis, keepdim) = along;
    let r = rows(x, axis, decode, opts);
    let px = params.bind(x, Access::Read);
    let po = params.bind(out, Access::Write);
    let v = load(&px, x, &r.coords);
    let mut body = r.head.clone();
    let result = match kind {
        ReduceOp::Sum | ReduceOp::Mean => {
            let _ = writeln!(body, "    float acc = 0.0f;");
            let _ = writeln!(
                body,
                "    for (long long j = threadIdx.x; j < {}; j += blockDim.x) acc += {v};",
                r.len
            );
            let _ = writeln!(body, "    acc = fu_block_sum(acc);");
            if kind == ReduceOp::Mean {
                format!("acc / (float){}", r.len)
            } else {
                "acc".to_string()
            }
        }
        ReduceOp::Max => {
            let _ = writeln!(body, "    float acc = -FU_INF;");
            let _ = writeln!(body, "    for (long long j = threadIdx.x; j < {}; j += blockDim.x) acc = fu_max_nan(acc, {v});", r.len);
            let _ = writeln!(body, "    acc = fu_block_max(acc);");
            "acc".to_string()
        }
    };
    let oc = reduced_coords(&r.outer, axis, keepdim);
    let _ = writeln!(
        body,
        "    if (threadIdx.x == 0) {} = fu_from<{}>({result});",
        at(&po, out, &oc),
        ctype(out.dtype)
    );
    body.push_str("  }\n");
    Ok(KernelCode {
        family: kind.name(),
        body,
        grid: [r.grid, 1, 1],
        block: r.block,
        shared: 0,
    })
}

/// Independent candidates each argmax thread keeps: its loads of one round are issued
/// together instead of one dependent load-and-compare per element.
const ARGMAX_ILP: u64 = 4;

/// The index of the largest element (NaN largest, ties to the lowest index), as i32.
///
/// One block per row, as wide as the row needs up to 1024 threads (the greedy step's
/// single row of logits would otherwise be read 256 elements at a time, hundreds of
/// rounds of dependent loads); each thread keeps `ARGMAX_ILP` candidates fed by
/// independent loads, merged at the end. The merge is a total order (value, NaN
/// largest, then the lower index), so the result does not depend on the grouping.
pub(crate) fn argmax(
    x: &View,
    axis: usize,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let r = rows(x, axis, decode, opts);
    let px = params.bind(x, Access::Read);
    let po = params.bind(out, Access::Write);
    let mut coords = r.coords.clone();
    coords[axis] = "jj".to_string();
    let vj = load(&px, x, &coords);
    let u = ARGMAX_ILP;
    let mut body = r.head.clone();
    let _ = writeln!(body, "    float bv[{u}];");
    let _ = writeln!(body, "    int bi[{u}];");
    let _ = writeln!(body, "#pragma unroll");
    let _ = writeln!(
        body,
        "    for (int c = 0; c < {u}; ++c) {{ bv[c] = -FU_INF; bi[c] = FU_NO_INDEX; }}"
    );
    let _ = writeln!(body, "    long long j = threadIdx.x;");
    let _ = writeln!(
        body,
        "    for (; j + {}LL * blockDim.x < {}; j += {u}LL * blockDim.x) {{",
        u - 1,
        r.len
    );
    let _ = writeln!(body, "      float v[{u}];");
    let _ = writeln!(body, "#pragma unroll");
    let _ = writeln!(
        body,
        "      for (int c = 0; c < {u}; ++c) {{ const long long jj = j + (long long)c * blockDim.x; v[c] = {vj}; }}"
    );
    let _ = writeln!(body, "#pragma unroll");
    let _ = writeln!(
        body,
        "      for (int c = 0; c < {u}; ++c) fu_argmax_merge(bv[c], bi[c], v[c], (int)(j + (long long)c * blockDim.x));"
    );
    let _ = writeln!(body, "    }}");
    let _ = writeln!(
        body,
        "    for (; j < {}; j += blockDim.x) {{ const long long jj = j; fu_argmax_merge(bv[0], bi[0], {vj}, (int)j); }}",
        r.len
    );
    let _ = writeln!(body, "#pragma unroll");
    let _ = writeln!(
        body,
        "    for (int c = 1; c < {u}; ++c) fu_argmax_merge(bv[0], bi[0], bv[c], bi[c]);"
    );
    let _ = writeln!(
        body,
        "    const int best_i = fu_block_argmax(bv[0], bi[0]);"
    );
    let oc = reduced_coords(&r.outer, axis, false);
    let _ = writeln!(
        body,
        "    if (threadIdx.x == 0) {} = best_i;",
        at(&po, out, &oc)
    );
    body.push_str("  }\n");
    // Up to 1024 threads (CUDA's limit per block), fewer for short rows.
    let block = x.dims[axis]
        .capacity(decode)
        .next_power_of_two()
        .clamp(32, 1024) as u32;
    Ok(KernelCode {
        family: "argmax",
        body,
        grid: [r.grid, 1, 1],
        block,
        shared: 0,
    })
}

/// `exp(x - max) * (1 / sum exp(x - max))` along the axis, in f32.
pub(crate) fn softmax(
    x: &View,
    axis: usize,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let r = rows(x, axis, decode, opts);
    let px = params.bind(x, Access::Read);
    let po = params.bind(out, Access::Write);
    let v = load(&px, x, &r.coords);
    let mut body = r.head.clone();
    let _ = writeln!(body, "    float mx = -FU_INF;");
    let _ = writeln!(
        body,
        "    for (long long j = threadIdx.x; j < {}; j += blockDim.x) mx = fu_max_nan(mx, {v});",
        r.len
    );
    let _ = writeln!(body, "    mx = fu_block_max(mx);");
    let _ = writeln!(body, "    float sum = 0.0f;");
    let _ = writeln!(
        body,
        "    for (long long j = threadIdx.x; j < {}; j += blockDim.x) sum += expf({v} - mx);",
        r.len
    );
    let _ = writeln!(body, "    const float inv = 1.0f / fu_block_sum(sum);");
    let _ = writeln!(
        body,
        "    for (long long j = threadIdx.x; j < {}; j += blockDim.x) {} = fu_from<{}>(expf({v} - mx) * inv);",
        r.len,
        at(&po, out, &r.coords),
        ctype(out.dtype)
    );
    body.push_str("  }\n");
    Ok(KernelCode {
        family: "softmax",
        body,
        grid: [r.grid, 1, 1],
        block: r.block,
        shared: 0,
    })
}
