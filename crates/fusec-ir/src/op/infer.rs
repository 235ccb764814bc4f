//! Type rules: the result type of each op from its operand types (PyTorch's
//! semantics for the primitives: broadcasting, `torch.matmul`, `F.linear`).

use super::def::{resolve_axis, Op, TypeError};
use crate::dtype::DType;
use crate::quant::IntFormat;
use crate::shape::{Dim, Shape};
use crate::types::{TensorType, Type};

impl Op {
    /// The result type of this op applied to operands of the given types.
    ///
    /// `leaf_type` is the declared type of an `input`, `state` or `weight` leaf, whose
    /// type cannot be inferred; it is ignored for every other op.
    pub fn infer(&self, operands: &[&Type], leaf_type: Option<&Type>) -> Result<Type, TypeError> {
        let err = |message: String| TypeError {
            op: self.name().to_string(),
            message,
        };
        if !self.arity().accepts(operands.len()) {
            return Err(err(format!(
                "takes {} operand(s), got {}",
                self.arity(),
                operands.len()
            )));
        }
        if let Op::Get { index } = self {
            return match operands[0] {
                Type::Tuple(ts) => ts
                    .get(*index)
                    .cloned()
                    .map(Type::Tensor)
                    .ok_or_else(|| err(format!("index {index} out of a {}-tuple", ts.len()))),
                Type::Tensor(t) => Err(err(format!("operand is a tensor ({t}), not a tuple"))),
            };
        }
        let mut tensors = Vec::with_capacity(operands.len());
        for (i, t) in operands.iter().enumerate() {
            match t {
                Type::Tensor(t) => tensors.push(t),
                Type::Tuple(_) => {
                    return Err(err(format!(
                        "operand {i} is a tuple; read its elements with `get`"
                    )))
                }
            }
        }
        if let Op::Fused(f) = self {
            return super::infer_fused::infer(*f, &tensors).map_err(err);
        }
        infer_tensor(self, &tensors, leaf_type)
            .map(Type::Tensor)
            .map_err(err)
    }
}

fn check_axis(axis: usize, rank: usize) -> Result<(), String> {
    if axis < rank {
        Ok(())
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

fn infer_tensor(
    op: &Op,
    t: &[&TensorType],
    leaf_type: Option<&Type>,
) -> Result<TensorType, String> {
    let same_dtype = |a: &TensorType, b: &TensorType| {
        if a.dtype == b.dtype {
            Ok(())
        } else {
            Err(format!("dtype mismatch: {} vs {}", a.dtype, b.dtype))
        }
    };
    match op {
        Op::Input { .. } | Op::Weight { .. } => match leaf_type {
            Some(Type::Tensor(t)) => Ok(t.clone()),
            Some(Type::Tuple(_)) => Err("a leaf must have a tensor type".into()),
            None => Err("a leaf needs a declared type".into()),
        },
        Op::Scalar { .. } => Ok(TensorType::new(DType::F32, Shape::scalar())),
        Op::RopeInvFreq { head_dim, .. } | Op::RopeInvFreqLlama3 { head_dim, .. } => {
            if *head_dim == 0 || head_dim % 2 != 0 {
                return Err(format!("head_dim {head_dim} must be even and positive"));
            }
            Ok(TensorType::new(DType::F32, Shape::fixed(&[head_dim / 2])))
        }
        Op::Unary(_) | Op::Copy => {
            if !t[0].dtype.is_float() && !matches!(op, Op::Copy) {
                return Err(format!("needs a float operand, got {}", t[0].dtype));
            }
            Ok(t[0].clone())
        }
        Op::Cast { to } => Ok(TensorType::new(*to, t[0].shape.clone())),
        Op::Binary(_) => {
            let (a, b) = (t[0], t[1]);
            let dtype = if a.rank() == 0 {
                b.dtype
            } else if b.rank() == 0 {
                a.dtype
            } else {
                same_dtype(a, b)?;
                a.dtype
            };
            let shape = Shape::broadcast(&a.shape, &b.shape)
                .ok_or_else(|| format!("shapes {} and {} do not broadcast", a.shape, b.shape))?;
            Ok(TensorType::new(dtype, shape))
        }
        Op::Reduce { axis, keepdim, .. } => {
            let axis = resolve_axis(*axis, t[0].rank()).map_err(|e| e.to_string())?;
            let mut dims = t[0].shape.0.clone();
            if *keepdim {
                dims[axis] = Dim::Fixed(1);
            } else {
                dims.remove(axis);
            }
            Ok(TensorType::new(t[0].dtype, Shape(dims)))
        }
        Op::Argmax { axis } => {
            let axis = resolve_axis(*axis, t[0].rank()).map_err(|e| e.to_string())?;
            let mut dims = t[0].shape.0.clone();
            dims.remove(axis);
            Ok(TensorType::new(DType::I32, Shape(dims)))
        }
        Op::Softmax { axis } => {
            resolve_axis(*axis, t[0].rank()).map_err(|e| e.to_string())?;
            Ok(t[0].clone())
        }
        Op::MatMul => {
            let (a, b) = (t[0], t[1]);
            same_dtype(a, b)?;
            if a.rank() < 2 || b.rank() < 2 {
                return Err(format!(
                    "operands must have rank >= 2, got {} and {}",
                    a.shape, b.shape
                ));
            }
            let (ra, rb) = (a.rank(), b.rank());
            if a.shape.0[ra - 1] != b.shape.0[rb - 2] {
                return Err(format!(
                    "contracted dimensions differ: {} @ {}",
                    a.shape, b.shape
                ));
            }
            let batch = Shape::broadcast(
                &Shape(a.shape.0[..ra - 2].to_vec()),
                &Shape(b.shape.0[..rb - 2].to_vec()),
            )
            .ok_or_else(|| {
                format!(
                    "batch dimensions of {} and {} do not broadcast",
                    a.shape, b.shape
                )
            })?;
            let mut dims = batch.0;
            dims.push(a.shape.0[ra - 2].clone());
            dims.push(b.shape.0[rb - 1].clone());
            Ok(TensorType::new(a.dtype, Shape(dims)))
        }
        Op::Linear => {
            let (x, w) = (t[0], t[1]);
            same_dtype(x, w)?;
            if w.rank() != 2 || x.rank() == 0 {
                return Err(format!(
                    "needs x [..., in] and w [out, in], got {} and {}",
                    x.shape, w.shape
                ));
            }
            if x.shape.last() != Some(&w.shape.0[1]) {
                return Err(format!(
                    "input features differ: x {} vs w {}",
                    x.shape, w.shape
                ));
            }
            let mut dims = x.shape.0.clone();
            *dims.last_mut().expect("rank checked above") = w.shape.0[0].clone();
            Ok(TensorType::new(x.dtype, Shape(dims)))
        }
        Op::Embedding => {
            let (table, ids) = (t[0], t[1]);
            if table.rank() != 2 {
                return Err(format!("table must be [vocab, dim], got {}", table.shape));
            }
            if ids.dtype != DType::I32 {
                return Err(format!("ids must be i32, got {}", ids.dtype));
            }
            let mut dims = ids.shape.0.clone();
            dims.push(table.shape.0[1].clone());
            Ok(TensorType::new(table.dtype, Shape(dims)))
        }
        Op::Cat { axis } => {
            let first = t[0];
            let axis = resolve_axis(*axis, first.rank()).map_err(|e| e.to_string())?;
            let mut along = first.shape.0[axis].clone();
            for other in &t[1..] {
                same_dtype(first, other)?;
                if other.rank() != first.rank() {
                    return Err(format!("ranks differ: {} vs {}", first.shape, other.shape));
                }
                for (i, (a, b)) in first.shape.0.iter().zip(&other.shape.0).enumerate() {
                    if i != axis && a != b {
                        return Err(format!(
                            "dimension {i} differs: {} vs {}",
                            first.shape, other.shape
                        ));
                    }
                }
                along = match (&along, &other.shape.0[axis]) {
                    (x, Dim::Fixed(n)) => x.plus(*n),
                    (Dim::Fixed(n), y) => y.plus(*n),
                    (x, y) => {
                        return Err(format!(
                            "cannot add two symbolic dimensions {x} and {y} along axis {axis}"
                        ))
                    }
                };
            }
            let mut dims = first.shape.0.clone();
            dims[axis] = along;
            Ok(TensorType::new(first.dtype, Shape(dims)))
        }
        Op::Reshape { shape } => {
            if t[0].shape.symbolic_numel() != shape.symbolic_numel() {
                return Err(format!(
                    "cannot reshape {} to {}: element counts differ",
                    t[0].shape, shape
                ));
            }
            Ok(TensorType::new(t[0].dtype, shape.clone()))
        }
        Op::Transpose { a, b } => {
            check_axis(*a, t[0].rank())?;
            check_axis(*b, t[0].rank())?;
            let mut dims = t[0].shape.0.clone();
            dims.swap(*a, *b);
            Ok(TensorType::new(t[0].dtype, Shape(dims)))
        }
        Op::Slice { axis, start, end } => {
            let axis = resolve_axis(*axis, t[0].rank()).map_err(|e| e.to_string())?;
            let Some(n) = t[0].shape.0[axis].as_fixed() else {
                return Err(format!("axis {axis} of {} is symbolic", t[0].shape));
            };
            if start >= end || *end > n {
                return Err(format!("range {start}..{end} out of 0..{n}"));
            }
            let mut dims = t[0].shape.0.clone();
            dims[axis] = Dim::Fixed(end - start);
            Ok(TensorType::new(t[0].dtype, Shape(dims)))
        }
        Op::Unsqueeze { axis } => {
            check_axis(*axis, t[0].rank() + 1)?;
            let mut dims = t[0].shape.0.clone();
            dims.insert(*axis, Dim::Fixed(1));
            Ok(TensorType::new(t[0].dtype, Shape(dims)))
        }
        Op::Expand { shape } => {
            if shape.rank() != t[0].rank() {
                return Err(format!(
                    "cannot expand {} to {}: ranks differ",
                    t[0].shape, shape
                ));
            }
            for (a, b) in t[0].shape.0.iter().zip(&shape.0) {
                if a != b && !a.is_one() {
                    return Err(format!(
                        "cannot expand {} to {}: only size-1 dimensions expand",
                        t[0].shape, shape
                    ));
                }
            }
            Ok(TensorType::new(t[0].dtype, shape.clone()))
        }
        Op::Dequant { to, act } => {
            let (q, scale) = (t[0], t[1]);
            if !matches!(to, DType::F32 | DType::F16 | DType::Bf16) {
                return Err(format!("dequantizes to f32, f16 or bf16, not {to}"));
            }
            if q.dtype.is_int_codes() {
                return infer_int_dequant(q, scale, *to, *act);
            }
            if !q.dtype.is_fp8() {
                return Err(format!(
                    "quantized values must be fp8, i8 or i4, got {}",
                    q.dtype
                ));
            }
            if act != to && !act.is_fp8() {
                return Err(format!("activations are {to} or fp8, not {act}"));
            }
            if scale.dtype != DType::F32 {
                return Err(format!("scales must be f32, got {}", scale.dtype));
            }
            let per_channel = Shape(q.shape.0[..q.rank().saturating_sub(1)].to_vec());
            if scale.rank() != 0 && scale.shape != per_channel {
                return Err(format!(
                    "scales {} must be per tensor [] or per output channel {per_channel}",
                    scale.shape
                ));
            }
            Ok(TensorType::new(*to, q.shape.clone()))
        }
        Op::Get { .. } | Op::Fused(_) => Err(format!("{} is typed by Op::infer", op.name())),
    }
}

/// Elements along the input dimension that share one scale of integer codes
/// ([`crate::quant::BLOCK`]).
pub use crate::quant::BLOCK as INT_BLOCK;

/// `dequant` of integer codes `[o, i]` with their per-block side data, of the type
/// [`IntFormat::scales`] says for the format of the codes' dtype: GGUF's Q8_0, Q4_0
/// and Q4_1 split into their codes and their scales (and minimums). Such a weight is
/// multiplied as llama.cpp multiplies it, with the activations quantized to 8 bits
/// per block (`act = i8`).
fn infer_int_dequant(
    q: &TensorType,
    scale: &TensorType,
    to: DType,
    act: DType,
) -> Result<TensorType, String> {
    let Some(format) = IntFormat::of(q.dtype, scale.dtype) else {
        return Err(format!(
            "{} codes with {} side data are no block format",
            q.dtype, scale.dtype
        ));
    };
    if act != DType::I8 {
        return Err(format!(
            "{} codes multiply activations quantized to i8 blocks (act=i8), not {act}",
            q.dtype
        ));
    }
    let [o, i] = q.shape.dims() else {
        return Err(format!(
            "{} codes must be a matrix, got {}",
            q.dtype, q.shape
        ));
    };
    let Some(ins) = i.as_fixed() else {
        return Err(format!(
            "{} codes need a fixed input dimension, got {i}",
            q.dtype
        ));
    };
    format
        .check_width(ins)
        .map_err(|e| format!("{} codes: {e}", q.dtype))?;
    let want = format.scales(o.clone(), ins);
    if scale.dtype != want.dtype {
        return Err(format!(
            "scales of {} codes must be {}, got {}",
            q.dtype, want.dtype, scale.dtype
        ));
    }
    if scale.shape != want.shape {
        return Err(format!(
            "scales {} of {format} codes must be {}",
            scale.shape, want.shape
        ));
    }
    Ok(TensorType::new(to, q.shape.clone()))
}
