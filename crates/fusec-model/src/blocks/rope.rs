//! Rotary position embeddings (Su et al., 2021, "RoFormer"), as transformers'
//! `LlamaRotaryEmbedding.forward` builds the tables once per step and
//! `apply_rotary_pos_emb` applies them with `rotate_half` (the halves layout, not
//! the interleaved one of the paper).

use fusec_ir::{BinaryOp, DType, Dim, NodeId, Op, Shape, UnaryOp, F64};

use super::step::StepDims;
use crate::build::{BuildError, Builder};
use crate::frontend::RopeScaling;

/// cos and sin `[B,1,head_dim]` for the step's positions (default RoPE: the
/// `attention_scaling` factor is 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeTables {
    pub cos: NodeId,
    pub sin: NodeId,
    pub head_dim: u64,
}

impl RopeTables {
    /// The tables for `position_ids` `[B,1]`, cast to `dtype` (the activations').
    pub fn new(
        b: &mut Builder,
        position_ids: NodeId,
        theta: f64,
        head_dim: u64,
        dims: &StepDims,
        dtype: DType,
    ) -> Result<Self, BuildError> {
        Self::scaled(b, position_ids, theta, None, head_dim, dims, dtype)
    }

    /// [`RopeTables::new`] with the inverse frequencies of `scaling` (`None`: the
    /// default RoPE). Llama 3's scaling changes only the `inv_freq` buffer, and its
    /// `attention_scaling` is 1 (transformers' `_compute_llama3_parameters`).
    pub fn scaled(
        b: &mut Builder,
        position_ids: NodeId,
        theta: f64,
        scaling: Option<RopeScaling>,
        head_dim: u64,
        dims: &StepDims,
        dtype: DType,
    ) -> Result<Self, BuildError> {
        let half = Dim::Fixed(head_dim / 2);
        let one = Dim::Fixed(1);
        let inv_freq = match scaling {
            None => Op::RopeInvFreq {
                theta: F64(theta),
                head_dim,
            },
            Some(RopeScaling::Llama3(s)) => Op::RopeInvFreqLlama3 {
                theta: F64(theta),
                head_dim,
                factor: F64(s.factor),
                low_freq_factor: F64(s.low_freq_factor),
                high_freq_factor: F64(s.high_freq_factor),
                original_max_position_embeddings: s.original_max_position_embeddings,
            },
        };
        let inv = b.op(inv_freq, &[])?;
        // inv_freq[None, :, None].expand(B, -1, 1)
        let inv = b.op(Op::Unsqueeze { axis: 0 }, &[inv])?;
        let inv = b.op(Op::Unsqueeze { axis: 2 }, &[inv])?;
        let inv = b.op(
            Op::Expand {
                shape: Shape(vec![dims.batch.clone(), half, one]),
            },
            &[inv],
        )?;
        // position_ids[:, None, :].float()
        let p = b.op(Op::Unsqueeze { axis: 1 }, &[position_ids])?;
        let p = b.to_dtype(p, DType::F32)?;
        // (inv_freq @ positions).transpose(1, 2)
        let freqs = b.op(Op::MatMul, &[inv, p])?;
        let freqs = b.transpose(freqs, 1, 2)?;
        let emb = b.op(Op::Cat { axis: -1 }, &[freqs, freqs])?;
        // cos() * attention_scaling (1.0 for the default RoPE), then .to(dtype)
        let cos = b.unary(UnaryOp::Cos, emb)?;
        let cos = b.binary_scalar(BinaryOp::Mul, cos, 1.0)?;
        let cos = b.to_dtype(cos, dtype)?;
        let sin = b.unary(UnaryOp::Sin, emb)?;
        let sin = b.binary_scalar(BinaryOp::Mul, sin, 1.0)?;
        let sin = b.to_dtype(sin, dtype)?;
        Ok(Self { cos, sin, head_dim })
    }

    /// `apply_rotary_pos_emb(q, k, cos, sin)` with `unsqueeze_dim=1`: q and k are
    /// `[B,heads,1,head_dim]`.
    pub fn apply(
        &self,
        b: &mut Builder,
        q: NodeId,
        k: NodeId,
    ) -> Result<(NodeId, NodeId), BuildError> {
        let cos = b.op(Op::Unsqueeze { axis: 1 }, &[self.cos])?;
        let sin = b.op(Op::Unsqueeze { axis: 1 }, &[self.sin])?;
        let q = rotate_half_apply(b, q, cos, sin, self.head_dim)?;
        let k = rotate_half_apply(b, k, cos, sin, self.head_dim)?;
        Ok((q, k))
    }
}

/// `x * cos + rotate_half(x) * sin`, where `rotate_half(x) = cat(-x2, x1)` over the
/// two halves of the last axis.
pub fn rotate_half_apply(
    b: &mut Builder,
    x: NodeId,
    cos: NodeId,
    sin: NodeId,
    head_dim: u64,
) -> Result<NodeId, BuildError> {
    let xc = b.binary(BinaryOp::Mul, x, cos)?;
    let x1 = b.op(
        Op::Slice {
            axis: -1,
            start: 0,
            end: head_dim / 2,
        },
        &[x],
    )?;
    let x2 = b.op(
        Op::Slice {
            axis: -1,
            start: head_dim / 2,
            end: head_dim,
        },
        &[x],
    )?;
    let nx2 = b.unary(UnaryOp::Neg, x2)?;
    let rot = b.op(Op::Cat { axis: -1 }, &[nx2, x1])?;
    let rs = b.binary(BinaryOp::Mul, rot, sin)?;
    b.binary(BinaryOp::Add, xc, rs)
}
