//! The CUDA C renderer: the shared prelude, kernel parameters, index expressions, and
//! one module per kernel family.
//!
//! A kernel is generated from the node's operand and result [`View`]s. Shapes, view
//! offsets and strides, and scalar operands are baked into the source as constants;
//! buffers are pointer parameters in order of first use, and the cached length `S` is
//! always the last parameter. The source of a kernel never mentions a buffer id or an
//! arena offset, so the kernels of identical layers are identical text.

pub(crate) mod attention;
pub(crate) mod elementwise;
pub(crate) mod gemm;
pub(crate) mod gemv;
pub(crate) mod gemv_int;
pub(crate) mod matmul;
pub(crate) mod movement;
pub(crate) mod norm;
pub(crate) mod paged;
pub(crate) mod prefill_attention;
pub(crate) mod reduce;

use std::fmt::Write;

use fusec_ir::DType;

use crate::layout::{Extent, View};
use crate::options::{DecodeShape, Options};
use crate::plan::Access;

use crate::emit::{Attention, Ctx, Gemv, KernelEmitter};
pub(crate) use crate::emit::{KernelCode, Operand, Params, NAME};
use fusec_ir::{BinaryOp, ReduceOp, UnaryOp};

/// Helpers every kernel may use; emitted once at the top of the translation unit.
pub const PRELUDE: &str = include_str!("prelude.cu");

/// The C type that stores `dtype`.
pub fn ctype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float",
        DType::F16 => "__half",
        DType::Bf16 => "__nv_bfloat16",
        DType::Fp8E4M3 => "__nv_fp8_e4m3",
        DType::Fp8E5M2 => "__nv_fp8_e5m2",
        DType::I32 => "int",
        // Integer weight codes, read as bytes by the integer GEMV (`gemv_int`; `i4`
        // packs two a byte).
        DType::I8 => "signed char",
        DType::I4 | DType::U4 | DType::U8 => "unsigned char",
    }
}

/// An `f32` constant as a C expression that reads back as exactly the same value.
pub fn flit(v: f32) -> String {
    if v.is_nan() {
        "__int_as_float(0x7fc00000)".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "FU_INF" } else { "(-FU_INF)" }.to_string()
    } else {
        // Rust's shortest round-trip form, which C parses to the same f32.
        let s = format!("{v:?}");
        if s.contains(['.', 'e', 'E']) {
            format!("{s}f")
        } else {
            format!("{s}.0f")
        }
    }
}

/// The number of elements of `dims`, as a C expression.
pub(crate) fn numel(dims: &[Extent]) -> String {
    let fixed: u64 = dims.iter().filter_map(|d| d.fixed()).product();
    let mut terms = vec![format!("{fixed}LL")];
    terms.extend(dims.iter().filter(|d| d.fixed().is_none()).map(|d| d.c()));
    if terms.len() == 1 {
        terms.remove(0)
    } else {
        format!("({})", terms.join(" * "))
    }
}

/// The number of elements of `dims` when the cache is full.
pub(crate) fn numel_capacity(dims: &[Extent], decode: &DecodeShape) -> u64 {
    dims.iter().map(|d| d.capacity(decode)).product()
}

/// Statements that split the flat index `flat` (row-major over `dims`) into one
/// coordinate per dimension, named `{prefix}0..`; returns the statements and the
/// coordinate expressions (a size-1 dimension's coordinate is the constant 0).
pub(crate) fn decompose(
    dims: &[Extent],
    flat: &str,
    prefix: &str,
    indent: &str,
) -> (String, Vec<String>) {
    let mut code = String::new();
    let mut coords = vec![String::new(); dims.len()];
    let live: Vec<usize> = (0..dims.len()).filter(|&i| !dims[i].is_one()).collect();
    for i in 0..dims.len() {
        if dims[i].is_one() {
            coords[i] = "0LL".to_string();
        }
    }
    match live.as_slice() {
        [] => {}
        [only] => coords[*only] = format!("({flat})"),
        _ => {
            let _ = writeln!(code, "{indent}long long {prefix}r = {flat};");
            for (n, &i) in live.iter().enumerate().rev() {
                let name = format!("{prefix}{i}");
                if n == 0 {
                    let _ = writeln!(code, "{indent}const long long {name} = {prefix}r;");
                } else {
                    let e = dims[i].c();
                    let _ = writeln!(
                        code,
                        "{indent}const long long {name} = {prefix}r % {e}; {prefix}r /= {e};"
                    );
                }
                coords[i] = name;
            }
        }
    }
    (code, coords)
}

/// The element offset of `view` at `coords`, as a C expression.
pub(crate) fn offset(view: &View, coords: &[String]) -> String {
    let mut terms = Vec::new();
    if view.offset != 0 {
        terms.push(format!("{}LL", view.offset));
    }
    for ((d, s), c) in view.dims.iter().zip(&view.strides).zip(coords) {
        if *s == 0 || d.is_one() || c == "0LL" {
            continue;
        }
        if *s == 1 {
            terms.push(c.clone());
        } else {
            terms.push(format!("{c} * {s}LL"));
        }
    }
    if terms.is_empty() {
        "0LL".to_string()
    } else {
        terms.join(" + ")
    }
}

/// `ptr[offset]`, the element of `view` at `coords`.
pub(crate) fn at(ptr: &str, view: &View, coords: &[String]) -> String {
    format!("{ptr}[{}]", offset(view, coords))
}

/// The element at `coords` as an f32 expression.
pub(crate) fn load(ptr: &str, view: &View, coords: &[String]) -> String {
    format!("fu_f32({})", at(ptr, view, coords))
}

/// The grid of a grid-stride kernel over `work` items with `per_block` per block.
pub(crate) fn grid_for(work: u64, per_block: u64, opts: &Options) -> u32 {
    let blocks = work.div_ceil(per_block.max(1)).max(1);
    // Bounded by max_grid, which fits in u32.
    blocks.min(u64::from(opts.max_grid)) as u32
}

/// Threads for a block that reduces rows of up to `len` elements.
pub(crate) fn row_threads(len: u64, opts: &Options) -> u32 {
    let want = len
        .next_power_of_two()
        .clamp(32, u64::from(opts.block_size));
    // Clamped to block_size, a u32.
    want as u32
}

/// The parameter list: pointers (const where only read), then `int S`.
fn signature(params: &Params) -> String {
    let mut s = String::new();
    for (i, (_, dtype, access)) in params.list().iter().enumerate() {
        let konst = if *access == Access::Read {
            "const "
        } else {
            ""
        };
        let _ = write!(s, "{konst}{}* __restrict__ p{i}, ", Cuda.type_name(*dtype));
    }
    s.push_str("const int S");
    s
}

/// The whole `__global__` function, with [`NAME`] for its name.
fn function(code: &KernelCode, params: &Params) -> String {
    format!(
        "extern \"C\" __global__ void __launch_bounds__({}) {NAME}({}) {{\n{}}}\n",
        code.block,
        signature(params),
        code.body
    )
}

/// The CUDA C emitter: each family's module renders the kernel; this is the table the
/// backend-neutral lowering calls.
pub(crate) struct Cuda;

impl KernelEmitter for Cuda {
    fn prelude(&self) -> &'static str {
        PRELUDE
    }

    fn type_name(&self, dtype: DType) -> &'static str {
        ctype(dtype)
    }

    fn function(&self, code: &KernelCode, params: &Params) -> String {
        function(code, params)
    }

    fn unary(
        &self,
        op: UnaryOp,
        x: &Operand,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        elementwise::unary(op, x, out, cx.params, cx.decode, cx.opts)
    }

    fn binary(
        &self,
        op: BinaryOp,
        a: &Operand,
        b: &Operand,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        elementwise::binary(op, a, b, out, cx.params, cx.decode, cx.opts)
    }

    fn cast(&self, x: &Operand, out: &View, cx: Ctx<'_, '_>) -> Result<KernelCode, String> {
        elementwise::cast(x, out, cx.params, cx.decode, cx.opts)
    }

    fn copy(&self, x: &Operand, out: &View, cx: Ctx<'_, '_>) -> Result<KernelCode, String> {
        elementwise::copy(x, out, cx.params, cx.decode, cx.opts)
    }

    fn reduce(
        &self,
        kind: ReduceOp,
        x: &View,
        axis: (usize, bool),
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        reduce::reduce(kind, x, axis, out, cx.params, cx.decode, cx.opts)
    }

    fn argmax(
        &self,
        x: &View,
        axis: usize,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        reduce::argmax(x, axis, out, cx.params, cx.decode, cx.opts)
    }

    fn softmax(
        &self,
        x: &View,
        axis: usize,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        reduce::softmax(x, axis, out, cx.params, cx.decode, cx.opts)
    }

    fn matmul(
        &self,
        a: &View,
        b: &View,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        matmul::matmul(a, b, out, cx.params, cx.decode, cx.opts)
    }

    fn embedding(
        &self,
        table: &View,
        ids: &View,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        movement::embedding(table, ids, out, cx.params, cx.decode, cx.opts)
    }

    fn cat(
        &self,
        parts: &[View],
        axis: usize,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        movement::cat(parts, axis, out, cx.params, cx.decode, cx.opts)
    }

    fn kv_append(&self, past: &View, new: &View, cx: Ctx<'_, '_>) -> Result<KernelCode, String> {
        movement::kv_append(past, new, cx.params, cx.decode, cx.opts)
    }

    fn rms_norm(
        &self,
        x: &View,
        weight: &View,
        eps: f32,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        norm::rms_norm(x, weight, eps, out, cx.params, cx.decode, cx.opts)
    }

    fn post_rms_norm(
        &self,
        x: &View,
        weight: &View,
        eps: f32,
        offset: Option<f32>,
        residual: Option<&View>,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        let n = norm::Norm {
            eps,
            offset,
            residual,
        };
        norm::post_rms_norm(x, weight, &n, out, cx.params, cx.decode, cx.opts)
    }

    fn rope(
        &self,
        x: &View,
        cos: &Operand,
        sin: &Operand,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        norm::rope(x, cos, sin, out, cx.params, cx.decode, cx.opts)
    }

    fn gemv(&self, g: &Gemv<'_>, cx: Ctx<'_, '_>) -> Result<KernelCode, String> {
        // A prefill's many rows in bf16: the tensor-core GEMM; decode's few rows (and
        // the prefill cases it does not take) the GEMV template.
        if gemm::applies(g) {
            return gemm::gemm(g, cx.params);
        }
        gemv::gemv(g, cx.params, cx.decode, cx.opts)
    }

    fn attention_workspace(
        &self,
        a: &Attention<'_>,
        decode: &DecodeShape,
        opts: &Options,
    ) -> Result<Option<(u64, u64)>, String> {
        // A prefill's attention splits over query tiles, never over the cache.
        if prefill_attention::applies(a) {
            return Ok(None);
        }
        let sh = attention::shape(a, decode, opts)?;
        Ok((sh.splits > 1).then(|| (sh.workspace_floats(), sh.tickets())))
    }

    fn paged_write(&self, a: &Attention<'_>, cx: Ctx<'_, '_>) -> Result<KernelCode, String> {
        paged::write(a, cx.params, cx.decode, cx.opts)
    }

    fn workspace_dtype(&self) -> DType {
        attention::WORKSPACE_DTYPE
    }

    fn attention(
        &self,
        a: &Attention<'_>,
        workspace: Option<(&View, &View)>,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String> {
        if prefill_attention::applies(a) {
            return prefill_attention::attention(a, cx.params);
        }
        // The layout is a pure function of the operands, so recomputing it here gives
        // the one `attention_workspace` sized the workspace for.
        let sh = attention::shape(a, cx.decode, cx.opts)?;
        attention::attention(a, &sh, workspace, cx.params, cx.decode, cx.opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_round_trip() {
        assert_eq!(flit(1e-5), "1e-5f");
        assert_eq!(flit(2.0), "2.0f");
        assert_eq!(flit(0.25), "0.25f");
        assert_eq!(flit(f32::NEG_INFINITY), "(-FU_INF)");
    }

    #[test]
    fn decompose_skips_unit_dims() {
        let dims = [Extent::Fixed(1), Extent::Fixed(4), Extent::Past(1)];
        let (code, coords) = decompose(&dims, "i", "c", "");
        assert_eq!(coords[0], "0LL");
        assert!(code.contains("cr % ((long long)S + 1LL)"), "{code}");
        assert_eq!(coords[1], "c1");
    }
}
