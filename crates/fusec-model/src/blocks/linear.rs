//! A projection `y = x W^T (+ b)`, `nn.Linear(in_features, out_features, bias)`.

use fusec_ir::{BinaryOp, DType, NodeId, Shape, WeightRole};

use crate::build::{BuildError, Builder};

/// A weight `[out, in]` and an optional bias `[out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub weight: NodeId,
    pub bias: Option<NodeId>,
}

impl Linear {
    /// Declares the weight `name`, `[out_features, in_features]`, in `role`.
    pub fn new(
        b: &mut Builder,
        name: &str,
        role: WeightRole,
        dtype: DType,
        out_features: u64,
        in_features: u64,
    ) -> Result<Self, BuildError> {
        let weight = b.weight(
            name,
            role,
            dtype,
            Shape::fixed(&[out_features, in_features]),
        )?;
        Ok(Self { weight, bias: None })
    }

    /// Adds a bias `name`, `[out_features]`, in the weight's dtype.
    pub fn with_bias(mut self, b: &mut Builder, name: &str) -> Result<Self, BuildError> {
        let w = b.ty(self.weight);
        let out = w.shape.0[0].clone();
        let bias = b.weight(name, WeightRole::Bias, w.dtype, Shape(vec![out]))?;
        self.bias = Some(bias);
        Ok(self)
    }

    /// `x W^T`, then `+ bias` broadcast over the leading axes. PyTorch's `F.linear`
    /// adds the bias inside the GEMM (`addmm`); the IR keeps it a separate add.
    pub fn forward(&self, b: &mut Builder, x: NodeId) -> Result<NodeId, BuildError> {
        let y = b.linear(x, self.weight)?;
        match self.bias {
            Some(bias) => b.binary(BinaryOp::Add, y, bias),
            None => Ok(y),
        }
    }
}
