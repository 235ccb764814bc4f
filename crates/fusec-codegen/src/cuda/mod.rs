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
pub(crate) mod gemv;
pub(crate) mod matmul;
pub(crate) mod movement;
pub(crate) mod norm;
pub(crate) mod reduce;

use std::fmt::Write;

use fusec_ir::DType;

use crate::layout::{Extent, View};
use crate::options::{DecodeShape, Options};
use crate::plan::{Access, Arg, BufferId};

/// Helpers every kernel may use; emitted once at the top of the translation unit.
pub const PRELUDE: &str = include_str!("prelude.cu");

/// The placeholder for the kernel's name in a generated body; the name is given once
/// identical kernels have been merged.
pub(crate) const NAME: &str = "FUSEC_KERNEL_NAME";

/// The C type that stores `dtype`.
pub fn ctype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float",
        DType::F16 => "__half",
        DType::Bf16 => "__nv_bfloat16",
        DType::Fp8E4M3 => "__nv_fp8_e4m3",
        DType::Fp8E5M2 => "__nv_fp8_e5m2",
        DType::I32 => "int",
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

/// The pointer parameters of a kernel, in order of first use.
#[derive(Debug, Default)]
pub(crate) struct Params {
    list: Vec<(BufferId, DType, Access)>,
}

impl Params {
    /// The parameter that points at `view`'s buffer, registering it on first use.
    pub fn bind(&mut self, view: &View, access: Access) -> String {
        self.bind_buffer(view.buffer, view.dtype, access)
    }

    pub fn bind_buffer(&mut self, buffer: BufferId, dtype: DType, access: Access) -> String {
        if let Some(i) = self.list.iter().position(|(b, _, _)| *b == buffer) {
            let a = &mut self.list[i].2;
            if *a != access {
                *a = Access::ReadWrite;
            }
            return format!("p{i}");
        }
        self.list.push((buffer, dtype, access));
        format!("p{}", self.list.len() - 1)
    }

    /// The parameter list: pointers (const where only read), then `int S`.
    pub fn signature(&self) -> String {
        let mut s = String::new();
        for (i, (_, dtype, access)) in self.list.iter().enumerate() {
            let konst = if *access == Access::Read {
                "const "
            } else {
                ""
            };
            let _ = write!(s, "{konst}{}* __restrict__ p{i}, ", ctype(*dtype));
        }
        s.push_str("const int S");
        s
    }

    /// The plan's arguments, in parameter order.
    pub fn args(&self) -> Vec<Arg> {
        let mut args: Vec<Arg> = self
            .list
            .iter()
            .map(|(b, _, a)| Arg::Buffer {
                buffer: *b,
                access: *a,
            })
            .collect();
        args.push(Arg::PastLen);
        args
    }
}

/// What a family generator returns: the function body and how to launch it.
#[derive(Debug)]
pub(crate) struct KernelCode {
    /// A short family name for the kernel's name (`gemv`, `softmax`).
    pub family: &'static str,
    /// The statements of the function body.
    pub body: String,
    pub grid: [u32; 3],
    pub block: u32,
    /// Dynamic shared memory bytes.
    pub shared: u32,
}

impl KernelCode {
    /// The whole `__global__` function, with [`NAME`] for its name.
    pub fn function(&self, params: &Params) -> String {
        format!(
            "extern \"C\" __global__ void __launch_bounds__({}) {NAME}({}) {{\n{}}}\n",
            self.block,
            params.signature(),
            self.body
        )
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

/// An operand of a kernel, as the lowering resolved it.
#[derive(Clone, Debug)]
pub(crate) enum Operand {
    /// A tensor in a buffer.
    View(View),
    /// A scalar kernel argument, baked in as a literal.
    Scalar(f32),
    /// A quantized weight: `values * scale` (per output channel, or one per tensor),
    /// read by GEMV kernels only. `act` is the recipe of the GEMV's activations.
    Dequant {
        values: View,
        scale: View,
        to: DType,
        act: DType,
    },
}

impl Operand {
    pub fn view(&self) -> Result<&View, String> {
        match self {
            Operand::View(v) => Ok(v),
            Operand::Scalar(_) => Err("expected a tensor operand, got a scalar".into()),
            Operand::Dequant { .. } => Err("a quantized weight can only feed a GEMV".into()),
        }
    }

    pub fn scalar(&self) -> Result<f32, String> {
        match self {
            Operand::Scalar(v) => Ok(*v),
            _ => Err("expected a scalar operand".into()),
        }
    }

    /// The dtype of the values the operand stands for.
    pub fn dtype(&self) -> DType {
        match self {
            Operand::View(v) => v.dtype,
            Operand::Scalar(_) => DType::F32,
            Operand::Dequant { to, .. } => *to,
        }
    }
}
