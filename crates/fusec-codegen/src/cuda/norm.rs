//! Fused normalisation and rotary kernels: `fused.rms_norm` and `fused.rope`, with the
//! roundings of the eager ops they replace.

use std::fmt::Write;

use super::elementwise::{pointwise, read, Value};
use super::{
    at, ctype, decompose, flit, grid_for, load, numel, numel_capacity, row_threads, KernelCode,
    Operand, Params,
};
use crate::layout::View;
use crate::options::{DecodeShape, Options};
use crate::plan::Access;

/// `w * to(T)(x * rsqrt(mean(x^2) + eps))`, one block per row, as Hugging Face's
/// `LlamaRMSNorm` with its f32 statistics.
pub(crate) fn rms_norm(
    x: &View,
    w: &View,
    eps: f32,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let r = x.rank();
    if r == 0 || w.rank() != 1 {
        return Err("rms_norm needs x [.., D] and w [D]".into());
    }
    let d = x.dims[r - 1];
    let t = ctype(out.dtype);
    let px = params.bind(x, Access::Read);
    let pw = params.bind(w, Access::Read);
    let po = params.bind(out, Access::Write);
    let outer = &x.dims[..r - 1];
    let (split, mut coords) = decompose(outer, "r", "c", "    ");
    coords.push("j".into());
    let xv = load(&px, x, &coords);
    let wv = load(&pw, w, &["j".to_string()]);
    let mut body = String::new();
    let _ = writeln!(body, "  const long long rows = {};", numel(outer));
    let _ = writeln!(body, "  const long long len = {};", d.c());
    let _ = writeln!(
        body,
        "  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {{"
    );
    body.push_str(&split);
    let _ = writeln!(body, "    float ss = 0.0f;");
    let _ = writeln!(body, "    for (long long j = threadIdx.x; j < len; j += blockDim.x) {{ const float v = {xv}; ss += v * v; }}");
    let _ = writeln!(
        body,
        "    const float inv = fu_rsqrt(fu_block_sum(ss) / (float)len + {});",
        flit(eps)
    );
    let _ = writeln!(
        body,
        "    for (long long j = threadIdx.x; j < len; j += blockDim.x) {} = fu_from<{t}>({wv} * fu_round<{t}>({xv} * inv));",
        at(&po, out, &coords)
    );
    body.push_str("  }\n");
    Ok(KernelCode {
        family: "rms_norm",
        body,
        grid: [grid_for(numel_capacity(outer, decode), 1, opts), 1, 1],
        block: row_threads(d.capacity(decode), opts),
        shared: 0,
    })
}

/// The scalars and residual of a norm whose weight multiplies in f32.
pub(crate) struct Norm<'a> {
    pub eps: f32,
    /// Gemma's weight offset `c` (the values times `w + c`); `None`: OLMo 2's `w`.
    pub offset: Option<f32>,
    pub residual: Option<&'a View>,
}

/// `[r +] to(T)(w * (x * rsqrt(mean(x^2) + eps)))`, one block per row, as transformers'
/// `Olmo2RMSNorm` (models/olmo2/modeling_olmo2.py) with the residual add of OLMo 2's
/// post-norm layer: the weight multiplies the f32 values, and the product is rounded
/// once. `__fmul_rn` keeps the product from contracting into the add. With an offset
/// `c`, Gemma's `Gemma2RMSNorm` (models/gemma2/modeling_gemma2.py):
/// `to(T)((x * rsqrt(..)) * (w + c))`, the offset added in f32 with `__fadd_rn`.
pub(crate) fn post_rms_norm(
    x: &View,
    w: &View,
    n: &Norm<'_>,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let r = x.rank();
    if r == 0 || w.rank() != 1 {
        return Err("post_rms_norm needs x [.., D] and w [D]".into());
    }
    let (eps, residual) = (n.eps, n.residual);
    let d = x.dims[r - 1];
    let t = ctype(out.dtype);
    let px = params.bind(x, Access::Read);
    let pw = params.bind(w, Access::Read);
    let pr = residual.map(|res| params.bind(res, Access::Read));
    let po = params.bind(out, Access::Write);
    let outer = &x.dims[..r - 1];
    let (split, mut coords) = decompose(outer, "r", "c", "    ");
    coords.push("j".into());
    let xv = load(&px, x, &coords);
    let wv = load(&pw, w, &["j".to_string()]);
    let normed = match n.offset {
        None => format!("fu_round<{t}>(__fmul_rn({wv}, {xv} * inv))"),
        Some(c) => format!(
            "fu_round<{t}>(__fmul_rn({xv} * inv, __fadd_rn({wv}, {})))",
            flit(c)
        ),
    };
    let value = match (residual, &pr) {
        (Some(res), Some(pr)) => format!("{} + {normed}", load(pr, res, &coords)),
        _ => normed,
    };
    let mut body = String::new();
    let _ = writeln!(body, "  const long long rows = {};", numel(outer));
    let _ = writeln!(body, "  const long long len = {};", d.c());
    let _ = writeln!(
        body,
        "  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {{"
    );
    body.push_str(&split);
    let _ = writeln!(body, "    float ss = 0.0f;");
    let _ = writeln!(body, "    for (long long j = threadIdx.x; j < len; j += blockDim.x) {{ const float v = {xv}; ss += v * v; }}");
    let _ = writeln!(
        body,
        "    const float inv = fu_rsqrt(fu_block_sum(ss) / (float)len + {});",
        flit(eps)
    );
    let _ = writeln!(
        body,
        "    for (long long j = threadIdx.x; j < len; j += blockDim.x) {} = fu_from<{t}>({value});",
        at(&po, out, &coords)
    );
    body.push_str("  }\n");
    Ok(KernelCode {
        family: match (n.offset, residual) {
            (None, Some(_)) => "post_rms_norm_add",
            (None, None) => "post_rms_norm",
            (Some(_), Some(_)) => "offset_rms_norm_add",
            (Some(_), None) => "offset_rms_norm",
        },
        body,
        grid: [grid_for(numel_capacity(outer, decode), 1, opts), 1, 1],
        block: row_threads(d.capacity(decode), opts),
        shared: 0,
    })
}

/// `x * cos + rotate_half(x) * sin` with the half-split layout, each product rounded
/// to the dtype as the eager `mul`s are.
pub(crate) fn rope(
    x: &View,
    cos: &Operand,
    sin: &Operand,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let r = x.rank();
    let hd = x
        .dims
        .last()
        .and_then(|d| d.fixed())
        .ok_or("rope needs a static last dimension")?;
    let half = hd / 2;
    let t = ctype(out.dtype);
    pointwise("rope", params, out, decode, opts, |p, c| {
        let px = p.bind(x, Access::Read);
        let last = c[r - 1].clone();
        let mut pc = c.to_vec();
        pc[r - 1] = "dp".into();
        let (vc, vs) = (read(p, cos, out, c)?, read(p, sin, out, c)?);
        let mut pre = String::new();
        let _ = writeln!(
            pre,
            "    const long long dp = {last} < {half}LL ? {last} + {half}LL : {last} - {half}LL;"
        );
        let _ = writeln!(
            pre,
            "    const float rot = {last} < {half}LL ? -{} : {};",
            load(&px, x, &pc),
            load(&px, x, &pc)
        );
        let v = format!(
            "fu_round<{t}>({} * {vc}) + fu_round<{t}>(rot * {vs})",
            load(&px, x, c)
        );
        Ok((pre, Value::Float(v)))
    })
}
