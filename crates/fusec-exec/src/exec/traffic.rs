//! Traffic accounting: the bytes a launch reads from its operands and writes, computed
//! from the runtime tensors (see the module documentation of `crate::exec`).

use fusec_ir::Op;

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
    match (op, args) {
        (Op::Embedding, [Some(Value::Tensor(table)), Some(Value::Tensor(ids))]) => {
            // A gather reads one table row per id.
            let row = table.shape().get(1).copied().unwrap_or(0) as u64;
            ids.numel() as u64 * row * table.dtype().size_bytes() + ids.read_bytes()
        }
        _ => args.iter().flatten().map(|v| v.read_bytes()).sum(),
    }
}

impl Operands<'_, '_> {
    /// Bytes read from the operands still in their slots.
    pub(super) fn borrowed_read_bytes(&self) -> u64 {
        self.args.iter().flatten().map(|v| v.read_bytes()).sum()
    }
}
