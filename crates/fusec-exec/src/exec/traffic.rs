//! Traffic accounting: the bytes a launch reads from its operands and writes, computed
//! from the runtime tensors (see the module documentation of `crate::exec`).

use fusec_ir::{Op, OperandRole};

use super::dispatch::Operands;
use super::value::Value;
use crate::tensor::Tensor;

impl Value {
    /// Bytes a kernel reads when it reads this value once.
    pub(super) fn read_bytes(&self) -> u64 {
        match self {
            Value::Tensor(t) => t.read_bytes(),
            Value::Scalar(_) => 0,
            Value::Tuple(ts) => ts.iter().map(Tensor::read_bytes).sum(),
            Value::Quant(q) => q.read_bytes(),
        }
    }

    /// Bytes a kernel writes when it produces this value.
    pub(super) fn bytes(&self) -> u64 {
        match self {
            Value::Tensor(t) => t.bytes(),
            Value::Scalar(_) => 4,
            Value::Tuple(ts) => ts.iter().map(Tensor::bytes).sum(),
            Value::Quant(q) => q.values.bytes() + q.scale.bytes(),
        }
    }
}

/// Bytes a launched op reads from its operands (all present: ops that move an operand
/// into the kernel measure their own traffic).
pub(super) fn read_bytes(op: &Op, args: &[Option<&Value>]) -> u64 {
    let mut total = 0;
    for (i, arg) in args.iter().enumerate() {
        let Some(value) = arg else { continue };
        total += match (op.operand_role(i), value, args.get(1)) {
            // A gather reads one table row per id.
            (
                Some(OperandRole::EmbeddingTable),
                Value::Tensor(table),
                Some(Some(Value::Tensor(ids))),
            ) => {
                let row = table.shape().get(1).copied().unwrap_or(0) as u64;
                ids.numel() as u64 * row * table.dtype().size_bytes()
            }
            _ => value.read_bytes(),
        };
    }
    total
}

impl Operands<'_, '_> {
    /// Bytes read from the operands still in their slots.
    pub(super) fn borrowed_read_bytes(&self) -> u64 {
        self.args.iter().flatten().map(|v| v.read_bytes()).sum()
    }
}
