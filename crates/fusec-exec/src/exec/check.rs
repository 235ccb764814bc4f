//! Checks of runtime values against their IR types: a mismatch is an executor bug.

use fusec_ir::shape::{Bindings, Shape};
use fusec_ir::{TensorType, Type};

use super::executor::{node_error, Planned};
use super::value::Value;
use crate::error::Error;
use crate::kernels::KernelError;
use crate::tensor::Tensor;

/// Checks a node's runtime value against its IR type: a mismatch is an executor bug.
pub(super) fn check_result(node: &Planned, value: &Value, b: &Bindings) -> Result<(), Error> {
    let ok = match (value, &node.ty) {
        (Value::Tensor(t), Type::Tensor(ty)) => matches_type(t, ty, b)?,
        (Value::Scalar(_), Type::Tensor(ty)) => {
            ty.dtype == fusec_ir::DType::F32 && ty.shape.rank() == 0
        }
        (Value::Tuple(ts), Type::Tuple(tys)) => {
            let mut ok = ts.len() == tys.len();
            for (t, ty) in ts.iter().zip(tys) {
                ok &= matches_type(t, ty, b)?;
            }
            ok
        }
        (Value::Quant(q), Type::Tensor(ty)) => {
            q.to == ty.dtype && shape_matches(q.shape(), &ty.shape, b)?
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        let got = match value {
            Value::Tensor(t) => describe(t),
            Value::Scalar(_) => "a scalar".into(),
            Value::Tuple(ts) => format!(
                "({})",
                ts.iter().map(describe).collect::<Vec<_>>().join(", ")
            ),
            Value::Quant(q) => format!("dequant of {}", describe(&q.values)),
        };
        Err(node_error(
            node,
            KernelError::Invalid(format!(
                "produced {got}, but the graph declares {}",
                node.ty
            )),
        ))
    }
}

/// Whether `t` has the dtype and shape of `ty` under `b`.
pub(super) fn matches_type(t: &Tensor, ty: &TensorType, b: &Bindings) -> Result<bool, Error> {
    Ok(t.dtype() == ty.dtype && shape_matches(t.shape(), &ty.shape, b)?)
}

/// Whether `actual` is `shape` under `b`, evaluated dimension by dimension: this runs
/// for every node of every step, so it builds no vector.
fn shape_matches(actual: &[usize], shape: &Shape, b: &Bindings) -> Result<bool, Error> {
    if actual.len() != shape.rank() {
        return Ok(false);
    }
    for (d, &n) in shape.dims().iter().zip(actual) {
        let v = d.eval(b).map_err(|e| Error::Unbound(e.0))?;
        if usize::try_from(v).ok() != Some(n) {
            return Ok(false);
        }
    }
    Ok(true)
}

pub(super) fn describe(t: &Tensor) -> String {
    format!("{}{:?}", t.dtype(), t.shape())
}

/// With the executor's finiteness check on: the first infinity or NaN in a node's
/// result fails the step, naming the node (integer values and quantized weights hold
/// none).
pub(super) fn check_finite(node: &Planned, value: &Value) -> Result<(), Error> {
    let tensors: &[Tensor] = match value {
        Value::Tensor(t) => std::slice::from_ref(t),
        Value::Tuple(ts) => ts,
        Value::Scalar(v) if !v.is_finite() => {
            return Err(node_error(
                node,
                KernelError::NonFinite {
                    index: 0,
                    value: *v,
                },
            ))
        }
        Value::Scalar(_) | Value::Quant(_) => return Ok(()),
    };
    for t in tensors {
        if t.dtype() == fusec_ir::DType::I32 {
            continue;
        }
        let found = match t.view_f32() {
            Some(view) => view
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite())
                .map(|(i, v)| (i, *v)),
            None => t
                .to_vec_f32()
                .into_iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite()),
        };
        if let Some((index, value)) = found {
            return Err(node_error(node, KernelError::NonFinite { index, value }));
        }
    }
    Ok(())
}
