//! The step's symbolic dimensions, inputs and outputs (names and shapes in
//! [`fusec_ir::step`]): a decode step of one token per sequence, or a prefill step of
//! `T` tokens per sequence at positions `S .. S+T-1` (transformers' multi-token
//! forward: `input_ids` `[B,T]`, a causal 4-D mask `[B,1,T,S+T]`).

use fusec_ir::{step, DType, Dim, InputKind, NodeId, Op, OutputKind, Shape, TensorType};

use crate::build::{BuildError, Builder};

/// The symbolic dimensions of a step: `B` sequences with `S` positions cached, and
/// the `T` new tokens of each (1 for a decode step).
///
/// `T` is fixed when the graph is built (one graph per chunk length), so that the
/// caches after the step are `S+T` long, a dimension the IR's shapes can state (a
/// symbol plus a constant, or `min(S+T,W)` for a sliding window's ring).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepDims {
    pub batch: Dim,
    pub past: Dim,
    /// The new tokens per sequence, `T`.
    pub query: u64,
    /// Which positions get logits.
    pub logits: Logits,
    /// A paged KV cache of blocks of this many positions, in place of the dense
    /// caches (see [`StepDims::paged`]); `None`: dense caches.
    pub paged: Option<u64>,
}

/// The positions of a step whose logits the graph computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Logits {
    /// The last position only, `[B,1,V]`: what generation needs (transformers'
    /// `logits_to_keep=1`, which `generate` passes).
    #[default]
    Last,
    /// Every position, `[B,T,V]` (`logits_to_keep=0`): for checking a prefill
    /// against a reference position by position.
    All,
}

impl Default for StepDims {
    fn default() -> Self {
        Self {
            batch: Dim::sym(step::BATCH),
            past: Dim::sym(step::PAST),
            query: 1,
            logits: Logits::Last,
            paged: None,
        }
    }
}

impl StepDims {
    /// A prefill step of `tokens` tokens per sequence (a decode step for 1).
    pub fn prefill(tokens: u64, logits: Logits) -> Self {
        Self {
            query: tokens,
            logits,
            ..Self::default()
        }
    }

    /// A ragged decode step over a paged KV cache (Kwon et al. 2023, "Efficient Memory
    /// Management for Large Language Model Serving with PagedAttention"): each layer's
    /// keys and values live in a pool of blocks of `block_size` positions, state
    /// `[P,KV,block_size,hd]`, addressed through the step's block table `[B,M]`, and
    /// each sequence decodes its token at its own position (`position_ids` `[B,1]`),
    /// so sequences of one batch may have any lengths. There is no attention mask and
    /// no `S`: a sequence at position `p` sees its positions `0 ..= p` (the window's
    /// last `W` for a sliding-window layer, through that window's block table).
    pub fn paged(block_size: u64) -> Self {
        Self {
            paged: Some(block_size),
            ..Self::default()
        }
    }

    /// The new tokens' axis, `T`.
    pub fn query_len(&self) -> Dim {
        Dim::Fixed(self.query)
    }

    /// The KV length after the step's append, `S+T`.
    pub fn kv_len(&self) -> Dim {
        self.past.plus(self.query)
    }

    /// The rows of the final hidden state `[B,T,hidden]` the LM head reads: the last
    /// position's `[B,1,hidden]` for [`Logits::Last`] (`hidden_states[:, -1:, :]`, as
    /// transformers' `logits_to_keep` slices before `lm_head`), all of them for
    /// [`Logits::All`]. A decode step has one position and slices nothing.
    pub fn head_rows(&self, b: &mut Builder, h: NodeId) -> Result<NodeId, BuildError> {
        match self.logits {
            Logits::Last if self.query > 1 => b.op(
                Op::Slice {
                    axis: 1,
                    start: self.query - 1,
                    end: self.query,
                },
                &[h],
            ),
            _ => Ok(h),
        }
    }
}

/// The step's data inputs: token ids and positions `[B,T]` (i32), and the additive
/// attention mask `[B,1,T,S+T]` the caller builds once per step (a decode step's is
/// `[B,1,1,S+1]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepInputs {
    pub input_ids: NodeId,
    pub position_ids: NodeId,
    pub attention_mask: NodeId,
}

impl StepInputs {
    /// Declares the inputs; the mask is in `dtype`, the model's activation dtype. A
    /// paged step ([`StepDims::paged`]) has no mask: its `attention_mask` is the
    /// block table [`step::BLOCK_TABLE`] `[B,M]` i32, which says what each sequence
    /// sees in its place (layers with a sliding window declare their own table).
    pub fn new(b: &mut Builder, dims: &StepDims, dtype: DType) -> Result<Self, BuildError> {
        let (bd, one, t) = (dims.batch.clone(), Dim::Fixed(1), dims.query_len());
        let ids_ty = TensorType::new(DType::I32, Shape(vec![bd.clone(), t.clone()]));
        if dims.paged.is_some() && dims.query != 1 {
            return Err(BuildError::Unsupported(format!(
                "a paged step decodes one token per sequence, not {}",
                dims.query
            )));
        }
        let input_ids = b.input(step::INPUT_IDS, InputKind::Data, ids_ty.clone())?;
        let position_ids = b.input(step::POSITION_IDS, InputKind::Data, ids_ty)?;
        if dims.paged.is_some() {
            let attention_mask = b.input(
                step::BLOCK_TABLE,
                InputKind::Data,
                TensorType::new(DType::I32, paged_table_shape(dims)),
            )?;
            return Ok(Self {
                input_ids,
                position_ids,
                attention_mask,
            });
        }
        let attention_mask = b.input(
            step::ATTENTION_MASK,
            InputKind::Data,
            TensorType::new(dtype, Shape(vec![bd, one, t, dims.kv_len()])),
        )?;
        Ok(Self {
            input_ids,
            position_ids,
            attention_mask,
        })
    }
}

/// The shape of a paged step's block tables, `[B,M]`.
pub fn paged_table_shape(dims: &StepDims) -> Shape {
    Shape(vec![dims.batch.clone(), Dim::sym(step::MAX_BLOCKS)])
}

/// Returns `logits` `[B,1,V]` (`[B,T,V]` for [`Logits::All`]) and the greedy `next_token` (their argmax).
pub fn greedy_outputs(b: &mut Builder, logits: NodeId) -> Result<(), BuildError> {
    let next = b.op(Op::Argmax { axis: -1 }, &[logits])?;
    b.output(step::LOGITS, OutputKind::Data, logits);
    b.output(step::NEXT_TOKEN, OutputKind::Data, next);
    Ok(())
}
