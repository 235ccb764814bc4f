//! RMSNorm (Zhang & Sennrich, 2019), as transformers' `LlamaRMSNorm.forward` runs it:
//! `to(f32)`, `pow 2`, `mean`, `add eps`, `rsqrt`, `mul`, `to(input dtype)`,
//! `weight *` (the casts vanish for an f32 model).

use fusec_ir::{BinaryOp, DType, NodeId, ReduceOp, Shape, UnaryOp, WeightRole};

use crate::build::{BuildError, Builder};

/// An RMSNorm over the last axis, with a learned scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsNorm {
    pub weight: NodeId,
    pub eps: f64,
}

impl RmsNorm {
    /// Declares the scale `name`, `[dim]`.
    pub fn new(
        b: &mut Builder,
        name: &str,
        dim: u64,
        eps: f64,
        dtype: DType,
    ) -> Result<Self, BuildError> {
        let weight = b.weight(name, WeightRole::Norm, dtype, Shape::fixed(&[dim]))?;
        Ok(Self { weight, eps })
    }

    pub fn forward(&self, b: &mut Builder, x: NodeId) -> Result<NodeId, BuildError> {
        let input_dtype = b.ty(x).dtype;
        let h = b.to_dtype(x, DType::F32)?;
        let sq = b.binary_scalar(BinaryOp::Pow, h, 2.0)?;
        let var = b.reduce(ReduceOp::Mean, sq, -1, true)?;
        let var = b.binary_scalar(BinaryOp::Add, var, self.eps)?;
        let r = b.unary(UnaryOp::Rsqrt, var)?;
        let h = b.binary(BinaryOp::Mul, h, r)?;
        let h = b.to_dtype(h, input_dtype)?;
        b.binary(BinaryOp::Mul, self.weight, h)
    }

    /// OLMo 2's order (transformers' models/olmo2/modeling_olmo2.py,
    /// `Olmo2RMSNorm.forward`): the weight multiplies the f32 normalised values, and
    /// the product is cast back, `(weight * x32 * rsqrt(...)).to(input_dtype)`. For an
    /// f32 input this is [`RmsNorm::forward`]'s graph.
    pub fn forward_weight_in_f32(&self, b: &mut Builder, x: NodeId) -> Result<NodeId, BuildError> {
        let input_dtype = b.ty(x).dtype;
        let h = b.to_dtype(x, DType::F32)?;
        let sq = b.binary_scalar(BinaryOp::Pow, h, 2.0)?;
        let var = b.reduce(ReduceOp::Mean, sq, -1, true)?;
        let var = b.binary_scalar(BinaryOp::Add, var, self.eps)?;
        let r = b.unary(UnaryOp::Rsqrt, var)?;
        let h = b.binary(BinaryOp::Mul, h, r)?;
        // PyTorch promotes the weight to f32 for the product (exactly).
        let w = b.to_dtype(self.weight, DType::F32)?;
        let h = b.binary(BinaryOp::Mul, w, h)?;
        b.to_dtype(h, input_dtype)
    }

    /// Gemma's order and offset (transformers' models/gemma2/modeling_gemma2.py
    /// `Gemma2RMSNorm.forward`, and Gemma 3's, which is the same): the weight is
    /// stored as an offset from 1 (initialised to zeros) and the f32 normalised values
    /// are multiplied by `1 + w` in f32 before the one cast back,
    /// `(x32 * rsqrt(...) * (1.0 + w.float())).type_as(x)`.
    pub fn forward_offset_weight(&self, b: &mut Builder, x: NodeId) -> Result<NodeId, BuildError> {
        let input_dtype = b.ty(x).dtype;
        let h = b.to_dtype(x, DType::F32)?;
        let sq = b.binary_scalar(BinaryOp::Pow, h, 2.0)?;
        let var = b.reduce(ReduceOp::Mean, sq, -1, true)?;
        let var = b.binary_scalar(BinaryOp::Add, var, self.eps)?;
        let r = b.unary(UnaryOp::Rsqrt, var)?;
        let h = b.binary(BinaryOp::Mul, h, r)?;
        let w = b.to_dtype(self.weight, DType::F32)?;
        // `1.0 + w` is PyTorch's add of a Python scalar, `w + 1.0`.
        let w = b.binary_scalar(BinaryOp::Add, w, 1.0)?;
        let h = b.binary(BinaryOp::Mul, h, w)?;
        b.to_dtype(h, input_dtype)
    }
}
