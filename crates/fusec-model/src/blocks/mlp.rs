//! The gated MLP, `down(act(gate(x)) * up(x))`, as transformers' `LlamaMLP` runs it;
//! with SiLU it is SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer").

use fusec_ir::{step, BinaryOp, DType, NodeId, UnaryOp, WeightRole};

use super::linear::Linear;
use crate::build::{BuildError, Builder};
use crate::frontend::ModelConfig;

/// One layer's MLP block, `mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatedMlp {
    pub layer: u64,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    /// The weights' dtype (the checkpoint's).
    pub dtype: DType,
    /// The gate's activation (`hidden_act`): SiLU for Llama and Mistral.
    pub activation: UnaryOp,
}

impl GatedMlp {
    /// Llama's MLP at `layer`: SwiGLU, no biases.
    pub fn llama(cfg: &ModelConfig, layer: u64) -> Self {
        Self {
            layer,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            dtype: cfg.dtype,
            activation: UnaryOp::Silu,
        }
    }

    fn projection(
        &self,
        b: &mut Builder,
        module: &str,
        role: WeightRole,
        out_features: u64,
        in_features: u64,
    ) -> Result<Linear, BuildError> {
        Linear::new(
            b,
            &step::layer_weight(self.layer, &format!("mlp.{module}")),
            role,
            self.dtype,
            out_features,
            in_features,
        )
    }

    /// `x` `[B,1,hidden]` to the MLP output `[B,1,hidden]` (the caller adds the
    /// residual).
    pub fn forward(&self, b: &mut Builder, x: NodeId) -> Result<NodeId, BuildError> {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        let gate = self.projection(b, "gate_proj", WeightRole::Gate, i, d)?;
        let up = self.projection(b, "up_proj", WeightRole::Up, i, d)?;
        let g = gate.forward(b, x)?;
        let u = up.forward(b, x)?;
        let g = b.unary(self.activation, g)?;
        let a = b.binary(BinaryOp::Mul, g, u)?;
        let down = self.projection(b, "down_proj", WeightRole::Down, d, i)?;
        down.forward(b, a)
    }
}
