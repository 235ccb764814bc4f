//! Data movement: the embedding gather, concatenation, and the in-place KV append.

use std::fmt::Write;

use super::elementwise::{pointwise, Value};
use super::{at, ctype, decompose, grid_for, numel, numel_capacity, KernelCode, Params};
use crate::layout::{Extent, View};
use crate::options::{DecodeShape, Options};
use crate::plan::Access;

/// `out[..., d] = table[ids[...], d]`. An id outside the vocabulary gives a zero row:
/// the runner rejects such ids before it uploads them, so this only keeps the kernel
/// from reading out of bounds.
pub(crate) fn embedding(
    table: &View,
    ids: &View,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    if table.rank() != 2 || out.rank() != ids.rank() + 1 {
        return Err("embedding needs a [vocab, dim] table".into());
    }
    let vocab = table.dims[0]
        .fixed()
        .ok_or("the vocabulary must be static")?;
    pointwise("embedding", params, out, decode, opts, |p, c| {
        let pi = p.bind(ids, Access::Read);
        let pt = p.bind(table, Access::Read);
        let r = c.len() - 1;
        let id = at(&pi, ids, &c[..r]);
        let row = at(&pt, table, &["id".to_string(), c[r].clone()]);
        let pre = format!("    const long long id = (long long){id};\n");
        let v = format!(
            "(id >= 0 && id < {vocab}LL) ? {row} : fu_from<{}>(0.0f)",
            ctype(out.dtype)
        );
        Ok((pre, Value::Raw(v)))
    })
}

/// Concatenation along `axis` into a new buffer: each output element copies the
/// element of the operand its coordinate along `axis` falls in.
pub(crate) fn cat(
    parts: &[View],
    axis: usize,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    if parts
        .iter()
        .any(|v| v.dtype != out.dtype || v.rank() != out.rank())
    {
        return Err("cat operands must match the result's dtype and rank".into());
    }
    pointwise("cat", params, out, decode, opts, |p, c| {
        let mut coords = c.to_vec();
        coords[axis] = "ca".to_string();
        let mut pre = String::new();
        let _ = writeln!(pre, "    long long ca = {};", c[axis]);
        let _ = writeln!(pre, "    {} v;", ctype(out.dtype));
        let last = parts.len() - 1;
        for (i, v) in parts.iter().enumerate() {
            let ptr = p.bind(v, Access::Read);
            let src = at(&ptr, v, &coords);
            if i == last {
                let _ = writeln!(pre, "    v = {src};");
            } else {
                let e = v.dims[axis].c();
                let _ = writeln!(pre, "    if (ca < {e}) {{ v = {src}; }} else {{ ca -= {e};");
            }
        }
        let _ = writeln!(pre, "    {}", "}".repeat(last));
        Ok((pre, Value::Raw("v".into())))
    })
}

/// Writes `new` (`[.., 1, hd]`) at position `S` of the cache `past` (`[.., S, hd]`),
/// in place: the cached entries are neither read nor moved.
pub(crate) fn kv_append(
    past: &View,
    new: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let r = new.rank();
    if r < 2 || past.rank() != r || past.dtype != new.dtype {
        return Err("kv.append needs a cache and an entry of one rank and dtype".into());
    }
    let pn = params.bind(new, Access::Read);
    let pp = params.bind(past, Access::Write);
    let (split, coords) = decompose(&new.dims, "i", "c", "    ");
    let mut dst = coords.clone();
    // Slot `S`, or `S mod W` of a sliding window's ring. A prefill's `T` entries go to
    // `S + t` (a ring's are refused before codegen gets here: `lower.rs`'s
    // `prefill_refusal`).
    dst[r - 2] = if new.dims[r - 2].is_one() {
        past.dims[r - 2].write_slot()
    } else {
        if matches!(past.dims[r - 2], Extent::Window { .. }) {
            return Err("a ring cache takes one entry per step".into());
        }
        format!("({} + {})", past.dims[r - 2].write_slot(), coords[r - 2])
    };
    // The entry's extent along the sequence axis is 1, so its coordinate there is 0.
    let mut past_view = past.clone();
    past_view.dims[r - 2] = match (past.dims[r - 2], new.dims[r - 2]) {
        (Extent::Past(k), Extent::Fixed(t)) => Extent::Past(k + t),
        (d, _) => d.appended(),
    };
    let mut body = String::new();
    let _ = writeln!(body, "  const long long n = {};", numel(&new.dims));
    let _ = writeln!(
        body,
        "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {{"
    );
    body.push_str(&split);
    let _ = writeln!(
        body,
        "    {} = {};",
        at(&pp, &past_view, &dst),
        at(&pn, new, &coords)
    );
    body.push_str("  }\n");
    Ok(KernelCode {
        family: "kv_append",
        body,
        grid: [
            grid_for(
                numel_capacity(&new.dims, decode),
                u64::from(opts.block_size),
                opts,
            ),
            1,
            1,
        ],
        block: opts.block_size,
        shared: 0,
    })
}
