//! Elementwise kernels: unary functions, broadcasting binary ops, dtype casts.

use fusec_ir::{BinaryOp, DType, UnaryOp};

use super::strided::{broadcast_shape, broadcast_strides, walk};
use super::{float_buffer, KernelError};
use crate::tensor::{dense, gather_into, Buffer, Tensor};
use crate::{pool, rounding};

/// An operand of a binary op: a tensor, or a scalar kernel argument (which reads no
/// memory, broadcasts, and takes the other operand's dtype).
#[derive(Copy, Clone, Debug)]
pub enum Arg<'a> {
    Tensor(&'a Tensor),
    Scalar(f32),
}

fn unary_fn(op: UnaryOp) -> fn(f32) -> f32 {
    match op {
        UnaryOp::Neg => |x| -x,
        UnaryOp::Rsqrt => |x| 1.0 / x.sqrt(),
        UnaryOp::Sqrt => f32::sqrt,
        UnaryOp::Exp => f32::exp,
        UnaryOp::Silu => |x| x / (1.0 + (-x).exp()),
        UnaryOp::Cos => f32::cos,
        UnaryOp::Sin => f32::sin,
        UnaryOp::Tanh => f32::tanh,
        UnaryOp::GeluTanh => gelu_tanh,
    }
}

/// PyTorch's `gelu(x, approximate="tanh")` in f32, in the order its CPU kernel
/// computes it (aten/src/ATen/native/cpu/Activation.cpp, `GeluType::Tanh`):
/// `0.5 * x * (1 + tanh(kBeta * (x + kKappa * x^3)))`.
pub fn gelu_tanh(x: f32) -> f32 {
    const BETA: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
    const KAPPA: f32 = 0.044715;
    let cube = x * x * x;
    let inner = BETA * (x + KAPPA * cube);
    0.5 * x * (1.0 + inner.tanh())
}

/// `op(x)` elementwise.
pub fn unary(op: UnaryOp, x: &Tensor) -> Result<Tensor, KernelError> {
    let src = float_buffer(x, op.name())?;
    let f = unary_fn(op);
    let mut out = pool::take(x.numel());
    if x.is_contiguous() {
        out.extend(
            src[x.offset()..x.offset() + x.numel()]
                .iter()
                .map(|&v| f(v)),
        );
    } else {
        walk(x.shape(), [x.strides()], [x.offset()], |[o]| {
            out.push(f(src[o]))
        });
    }
    Ok(Tensor::from_kernel_f32(x.dtype(), x.dims(), out))
}

/// Which special case of `pow` a scalar exponent selects. PyTorch computes these
/// exponents with multiplications and square roots rather than `pow`, and so does this
/// kernel, so that `x ** 2` is exactly `x * x`.
fn pow_scalar_fn(exponent: f32) -> Option<fn(f32, f32) -> f32> {
    match exponent {
        2.0 => Some(|x, _| x * x),
        3.0 => Some(|x, _| x * x * x),
        0.5 => Some(|x, _| x.sqrt()),
        -0.5 => Some(|x, _| 1.0 / x.sqrt()),
        -1.0 => Some(|x, _| 1.0 / x),
        -2.0 => Some(|x, _| 1.0 / (x * x)),
        _ => None,
    }
}

fn binary_fn(op: BinaryOp) -> fn(f32, f32) -> f32 {
    match op {
        BinaryOp::Add => |a, b| a + b,
        BinaryOp::Sub => |a, b| a - b,
        BinaryOp::Mul => |a, b| a * b,
        BinaryOp::Div => |a, b| a / b,
        BinaryOp::Pow => f32::powf,
    }
}

/// A float operand seen as a strided view (a scalar is a rank-0 view of one value).
struct Src<'a> {
    data: &'a [f32],
    shape: &'a [usize],
    strides: &'a [usize],
    offset: usize,
}

/// An operand as a view; `scalar` holds a scalar argument's value.
fn src<'a>(arg: Arg<'a>, scalar: &'a f32, op: BinaryOp) -> Result<Src<'a>, KernelError> {
    Ok(match arg {
        Arg::Tensor(t) => Src {
            data: float_buffer(t, op.name())?,
            shape: t.shape(),
            strides: t.strides(),
            offset: t.offset(),
        },
        Arg::Scalar(_) => Src {
            data: std::slice::from_ref(scalar),
            shape: &[],
            strides: &[],
            offset: 0,
        },
    })
}

/// `a op b` with numpy broadcasting. Both tensor operands must share a dtype, which the
/// result has; a scalar takes the other operand's dtype (two scalars give `f32`).
pub fn binary(op: BinaryOp, a: Arg<'_>, b: Arg<'_>) -> Result<Tensor, KernelError> {
    let scalars = [
        match a {
            Arg::Scalar(v) => v,
            Arg::Tensor(_) => 0.0,
        },
        match b {
            Arg::Scalar(v) => v,
            Arg::Tensor(_) => 0.0,
        },
    ];
    let (sa, sb) = (src(a, &scalars[0], op)?, src(b, &scalars[1], op)?);
    let dtype = match (a, b) {
        (Arg::Tensor(x), Arg::Tensor(y)) => super::same_dtype(x, y, op.name())?,
        (Arg::Tensor(t), Arg::Scalar(_)) | (Arg::Scalar(_), Arg::Tensor(t)) => t.dtype(),
        (Arg::Scalar(_), Arg::Scalar(_)) => DType::F32,
    };
    let shape = broadcast_shape(sa.shape, sb.shape).ok_or_else(|| {
        KernelError::Invalid(format!(
            "{}: shapes {:?} and {:?} do not broadcast",
            op.name(),
            sa.shape,
            sb.shape
        ))
    })?;
    let f = match (op, b) {
        (BinaryOp::Pow, Arg::Scalar(e)) => pow_scalar_fn(e).unwrap_or(binary_fn(op)),
        _ => binary_fn(op),
    };
    let n = shape.iter().product();
    let mut out = pool::take(n);
    let same_layout = |s: &Src<'_>| s.shape == shape.as_slice() && dense(s.shape, s.strides);
    if same_layout(&sa) && same_layout(&sb) {
        // The common case of two dense operands of one shape: a plain zip.
        let (xa, xb) = (
            &sa.data[sa.offset..sa.offset + n],
            &sb.data[sb.offset..sb.offset + n],
        );
        out.extend(xa.iter().zip(xb).map(|(&x, &y)| f(x, y)));
    } else if same_layout(&sa) && sb.shape.is_empty() {
        let y = sb.data[sb.offset];
        out.extend(sa.data[sa.offset..sa.offset + n].iter().map(|&x| f(x, y)));
    } else {
        let st_a = broadcast_strides(sa.shape, sa.strides, &shape);
        let st_b = broadcast_strides(sb.shape, sb.strides, &shape);
        walk(&shape, [&st_a, &st_b], [sa.offset, sb.offset], |[i, j]| {
            out.push(f(sa.data[i], sb.data[j]))
        });
    }
    Ok(Tensor::from_kernel_f32(dtype, shape, out))
}

/// Elementwise conversion to `to`: floats are rounded to the target format, floats to
/// `i32` truncate toward zero (saturating, NaN to 0), ids convert exactly or round.
pub fn cast(x: &Tensor, to: DType) -> Result<Tensor, KernelError> {
    if !rounding::is_supported(to) {
        return Err(KernelError::Invalid(format!(
            "cast to {to} is not supported by the CPU executor"
        )));
    }
    if x.dtype() == DType::I32 && to == DType::I32 {
        return Ok(x.clone_contiguous());
    }
    let shape = x.dims();
    let mut values = pool::take(x.numel());
    match x.buffer() {
        Buffer::I32(b) => walk(x.shape(), [x.strides()], [x.offset()], |[o]| {
            values.push(b[o] as f32)
        }),
        Buffer::F32(b) => gather_into(b, x.shape(), x.strides(), x.offset(), &mut values),
        // Compact storage holds only GEMV weights, which no cast reads.
        Buffer::U16(_) | Buffer::U8(_) => values.extend(x.to_vec_f32()),
    }
    if to == DType::I32 {
        let mut ids = pool::take(values.len());
        ids.extend(values.iter().map(|&f| f as i32));
        pool::give(values);
        Ok(Tensor::from_kernel_i32(shape, ids))
    } else {
        // Ids convert to the nearest float; floats round to the target format.
        Ok(Tensor::from_kernel_f32(to, shape, values))
    }
}
