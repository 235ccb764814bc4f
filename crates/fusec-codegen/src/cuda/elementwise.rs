//! Pointwise kernels: unary functions, broadcasting binary ops, casts, copies. One
//! thread per output element in a grid-stride loop, indices through the views.

use std::fmt::Write;

use fusec_ir::{BinaryOp, UnaryOp};

use super::{
    at, ctype, decompose, flit, grid_for, load, numel, numel_capacity, KernelCode, Operand, Params,
};
use crate::layout::View;
use crate::options::{DecodeShape, Options};
use crate::plan::Access;

/// The value a pointwise kernel stores at one output element.
pub(crate) enum Value {
    /// An f32 expression, rounded to the output's dtype on store.
    Float(String),
    /// An expression of the output's own type, stored as is.
    Raw(String),
}

/// A grid-stride loop over the elements of `out`; `value` gives, for the output's
/// coordinates, statements to run first and the value to store.
pub(crate) fn pointwise(
    family: &'static str,
    params: &mut Params,
    out: &View,
    decode: &DecodeShape,
    opts: &Options,
    value: impl FnOnce(&mut Params, &[String]) -> Result<(String, Value), String>,
) -> Result<KernelCode, String> {
    let o = params.bind(out, Access::Write);
    let (split, coords) = decompose(&out.dims, "i", "c", "    ");
    let (pre, v) = value(params, &coords)?;
    let store = match v {
        Value::Float(e) => format!("fu_from<{}>({e})", ctype(out.dtype)),
        Value::Raw(e) => e,
    };
    let mut body = String::new();
    let _ = writeln!(body, "  const long long n = {};", numel(&out.dims));
    let _ = writeln!(
        body,
        "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {{"
    );
    body.push_str(&split);
    body.push_str(&pre);
    let _ = writeln!(body, "    {} = {store};", at(&o, out, &coords));
    body.push_str("  }\n");
    Ok(KernelCode {
        family,
        body,
        grid: [
            grid_for(
                numel_capacity(&out.dims, decode),
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

/// An operand read at the output's coordinates (broadcast), as an f32 expression.
pub(crate) fn read(
    params: &mut Params,
    x: &Operand,
    out: &View,
    coords: &[String],
) -> Result<String, String> {
    match x {
        Operand::Scalar(v) => Ok(flit(*v)),
        Operand::View(v) => {
            let b = v.broadcast_to(&out.dims)?;
            let p = params.bind(&b, Access::Read);
            Ok(load(&p, &b, coords))
        }
        Operand::Dequant { .. } => Err("a quantized weight can only feed a GEMV".into()),
    }
}

pub(crate) fn unary_expr(op: UnaryOp, x: &str) -> String {
    match op {
        UnaryOp::Neg => format!("(-{x})"),
        UnaryOp::Rsqrt => format!("fu_rsqrt({x})"),
        UnaryOp::Sqrt => format!("sqrtf({x})"),
        UnaryOp::Exp => format!("expf({x})"),
        UnaryOp::Silu => format!("fu_silu({x})"),
        UnaryOp::Cos => format!("cosf({x})"),
        UnaryOp::Sin => format!("sinf({x})"),
        UnaryOp::Tanh => format!("tanhf({x})"),
        UnaryOp::GeluTanh => format!("fu_gelu_tanh({x})"),
    }
}

pub(crate) fn unary(
    op: UnaryOp,
    x: &Operand,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    pointwise(op.name(), params, out, decode, opts, |p, c| {
        let x = read(p, x, out, c)?;
        Ok((String::new(), Value::Float(unary_expr(op, &x))))
    })
}

/// `a op b`. A scalar exponent of `pow` that PyTorch computes with multiplications
/// and square roots is computed the same way, so that `x ** 2` is exactly `x * x`.
pub(crate) fn binary(
    op: BinaryOp,
    a: &Operand,
    b: &Operand,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    pointwise(op.name(), params, out, decode, opts, |p, c| {
        let (ea, eb) = (read(p, a, out, c)?, read(p, b, out, c)?);
        let pre = format!("    const float a = {ea};\n    const float b = {eb};\n");
        let e = match (op, b) {
            (BinaryOp::Pow, Operand::Scalar(e)) if *e == 2.0 => "a * a".to_string(),
            (BinaryOp::Pow, Operand::Scalar(e)) if *e == 3.0 => "a * a * a".to_string(),
            (BinaryOp::Pow, Operand::Scalar(e)) if *e == 0.5 => "sqrtf(a)".to_string(),
            (BinaryOp::Pow, Operand::Scalar(e)) if *e == -0.5 => "1.0f / sqrtf(a)".to_string(),
            (BinaryOp::Pow, Operand::Scalar(e)) if *e == -1.0 => "1.0f / a".to_string(),
            (BinaryOp::Pow, Operand::Scalar(e)) if *e == -2.0 => "1.0f / (a * a)".to_string(),
            (BinaryOp::Pow, _) => "powf(a, b)".to_string(),
            (BinaryOp::Add, _) => "a + b".to_string(),
            (BinaryOp::Sub, _) => "a - b".to_string(),
            (BinaryOp::Mul, _) => "a * b".to_string(),
            (BinaryOp::Div, _) => "a / b".to_string(),
        };
        Ok((pre, Value::Float(e)))
    })
}

/// A dtype conversion: floats round to nearest even, floats to `i32` truncate.
pub(crate) fn cast(
    x: &Operand,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let same = x.dtype() == out.dtype;
    pointwise("cast", params, out, decode, opts, |p, c| {
        if same {
            let v = x.view()?.broadcast_to(&out.dims)?;
            let ptr = p.bind(&v, Access::Read);
            return Ok((String::new(), Value::Raw(at(&ptr, &v, c))));
        }
        Ok((String::new(), Value::Float(read(p, x, out, c)?)))
    })
}

/// A contiguous copy of a (strided, possibly broadcast) view, bit for bit.
pub(crate) fn copy(
    x: &Operand,
    out: &View,
    params: &mut Params,
    decode: &DecodeShape,
    opts: &Options,
) -> Result<KernelCode, String> {
    let v = x.view()?.broadcast_to(&out.dims)?;
    if v.dtype != out.dtype {
        return Err(format!("copy from {} to {}", v.dtype, out.dtype));
    }
    pointwise("copy", params, out, decode, opts, |p, c| {
        let ptr = p.bind(&v, Access::Read);
        Ok((String::new(), Value::Raw(at(&ptr, &v, c))))
    })
}
