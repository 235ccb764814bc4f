//! The token embedding, `nn.Embedding(vocab_size, hidden_size)`.

use fusec_ir::{DType, NodeId, Op, Shape, WeightRole};

use crate::build::{BuildError, Builder};

/// A `[vocab, hidden]` table looked up by token id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Embedding {
    /// The table (also the LM head's matrix when the embeddings are tied).
    pub table: NodeId,
}

impl Embedding {
    /// Declares the table `name`.
    pub fn new(
        b: &mut Builder,
        name: &str,
        vocab_size: u64,
        hidden_size: u64,
        dtype: DType,
    ) -> Result<Self, BuildError> {
        let table = b.weight(
            name,
            WeightRole::Embedding,
            dtype,
            Shape::fixed(&[vocab_size, hidden_size]),
        )?;
        Ok(Self { table })
    }

    /// The rows of `ids` `[B,1]`: `[B,1,hidden]`.
    pub fn forward(&self, b: &mut Builder, ids: NodeId) -> Result<NodeId, BuildError> {
        b.op(Op::Embedding, &[self.table, ids])
    }
}
