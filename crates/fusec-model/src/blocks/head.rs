//! The LM head: `lm_head = nn.Linear(hidden_size, vocab_size, bias=False)`, or the
//! embedding table when `tie_word_embeddings` is set.

use fusec_ir::{step, DType, NodeId, Shape, WeightRole};

use super::embedding::Embedding;
use crate::build::{BuildError, Builder};
use crate::frontend::ModelConfig;

/// The output projection to vocabulary logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LmHead {
    pub weight: NodeId,
}

impl LmHead {
    /// The embedding's table when `tied`, else a new `lm_head.weight`.
    pub fn new(
        b: &mut Builder,
        embedding: &Embedding,
        tied: bool,
        vocab_size: u64,
        hidden_size: u64,
        dtype: DType,
    ) -> Result<Self, BuildError> {
        let weight = if tied {
            embedding.table
        } else {
            b.weight(
                step::LM_HEAD,
                WeightRole::LmHead,
                dtype,
                Shape::fixed(&[vocab_size, hidden_size]),
            )?
        };
        Ok(Self { weight })
    }

    /// The head a config asks for: tied to `embedding` when `tie_word_embeddings`.
    pub fn of_model(
        b: &mut Builder,
        embedding: &Embedding,
        cfg: &ModelConfig,
        dtype: DType,
    ) -> Result<Self, BuildError> {
        Self::new(
            b,
            embedding,
            cfg.tie_word_embeddings,
            cfg.vocab_size,
            cfg.hidden_size,
            dtype,
        )
    }

    /// Logits `[B,1,vocab]` of the final hidden state.
    pub fn forward(&self, b: &mut Builder, h: NodeId) -> Result<NodeId, BuildError> {
        b.linear(h, self.weight)
    }
}
