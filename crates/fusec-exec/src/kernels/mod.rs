//! Reference CPU kernels, one module per op family.
//!
//! Every kernel takes its operands as [`Tensor`]s (any strides), computes in `f32`,
//! and returns a new contiguous tensor rounded to its dtype. Its buffer, and any
//! scratch the kernel needs, come from the executor's per-thread pool (`crate::pool`),
//! so that a steady-state decode step allocates nothing. Kernels check what the
//! IR verifier cannot know (token ids against the vocabulary) and what a hand-built
//! call may get wrong (shapes, dtypes), and return a [`KernelError`] instead of
//! panicking.

pub mod attention;
pub mod constant;
pub mod dot;
pub mod elementwise;
pub mod fused;
pub mod gather;
pub mod gemm;
pub mod gemv;
pub mod intdot;
pub mod kdot;
pub mod matmul;
pub mod movement;
pub mod reduce;
pub mod rowdot;
pub mod strided;

use fusec_ir::DType;

use crate::tensor::{Buffer, Tensor, TensorError};

/// Why a kernel could not run on its operands.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    #[error("token id {id} is out of range for a vocabulary of {vocab}")]
    TokenOutOfRange { id: i64, vocab: usize },
    /// With [`crate::Executor::set_check_finite`]: the first infinity or NaN a node
    /// produced.
    #[error("element {index} of its result is {value}")]
    NonFinite { index: usize, value: f32 },
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("{0}")]
    Invalid(String),
}

impl KernelError {
    /// Whether the error comes from the run's inputs rather than from the graph.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            KernelError::TokenOutOfRange { .. } | KernelError::NonFinite { .. }
        )
    }
}

/// The `f32` buffer of a float operand. A tensor in compact storage (a GEMV weight,
/// or an E4M3 KV cache, which only the attention kernels read) is refused with an
/// error that says so.
pub(crate) fn float_buffer<'a>(t: &'a Tensor, op: &str) -> Result<&'a [f32], KernelError> {
    t.f32_buffer().ok_or_else(|| {
        let what = match t.buffer() {
            Buffer::U16(_) | Buffer::U8(_) => "in compact storage",
            Buffer::F32(_) | Buffer::I32(_) => "values",
        };
        KernelError::Invalid(format!("{op} needs f32 values, got {} {what}", t.dtype()))
    })
}

/// Checks that two operands share a dtype.
pub(crate) fn same_dtype(a: &Tensor, b: &Tensor, op: &str) -> Result<DType, KernelError> {
    if a.dtype() == b.dtype() {
        Ok(a.dtype())
    } else {
        Err(KernelError::Invalid(format!(
            "{op}: dtype mismatch: {} vs {}",
            a.dtype(),
            b.dtype()
        )))
    }
}

/// Checks an axis against a rank.
pub(crate) fn check_axis(axis: usize, rank: usize, op: &str) -> Result<(), KernelError> {
    if axis < rank {
        Ok(())
    } else {
        Err(KernelError::Invalid(format!(
            "{op}: axis {axis} out of range for rank {rank}"
        )))
    }
}
