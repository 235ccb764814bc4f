//! The decode step's symbolic dimensions, inputs and outputs (names and shapes in
//! [`fusec_ir::step`]).

use fusec_ir::{step, DType, Dim, InputKind, NodeId, Op, OutputKind, Shape, TensorType};

use crate::build::{BuildError, Builder};

/// The symbolic dimensions of a decode step: `B` sequences with `S` positions cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepDims {
    pub batch: Dim,
    pub past: Dim,
}

impl Default for StepDims {
    fn default() -> Self {
        Self {
            batch: Dim::sym(step::BATCH),
            past: Dim::sym(step::PAST),
        }
    }
}

impl StepDims {
    /// The KV length after the step's append, `S+1`.
    pub fn kv_len(&self) -> Dim {
        self.past.plus(1)
    }
}

/// The step's data inputs: token ids and positions `[B,1]` (i32), and the additive
/// attention mask `[B,1,1,S+1]` the caller builds once per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepInputs {
    pub input_ids: NodeId,
    pub position_ids: NodeId,
    pub attention_mask: NodeId,
}

impl StepInputs {
    /// Declares the inputs; the mask is in `dtype`, the model's activation dtype.
    pub fn new(b: &mut Builder, dims: &StepDims, dtype: DType) -> Result<Self, BuildError> {
        let (bd, one) = (dims.batch.clone(), Dim::Fixed(1));
        let ids_ty = TensorType::new(DType::I32, Shape(vec![bd.clone(), one.clone()]));
        let input_ids = b.input(step::INPUT_IDS, InputKind::Data, ids_ty.clone())?;
        let position_ids = b.input(step::POSITION_IDS, InputKind::Data, ids_ty)?;
        let attention_mask = b.input(
            step::ATTENTION_MASK,
            InputKind::Data,
            TensorType::new(dtype, Shape(vec![bd, one.clone(), one, dims.kv_len()])),
        )?;
        Ok(Self {
            input_ids,
            position_ids,
            attention_mask,
        })
    }
}

/// Returns `logits` `[B,1,V]` and the greedy `next_token` (their argmax).
pub fn greedy_outputs(b: &mut Builder, logits: NodeId) -> Result<(), BuildError> {
    let next = b.op(Op::Argmax { axis: -1 }, &[logits])?;
    b.output(step::LOGITS, OutputKind::Data, logits);
    b.output(step::NEXT_TOKEN, OutputKind::Data, next);
    Ok(())
}
