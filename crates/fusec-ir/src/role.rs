//! What each weight is in the model, as the builder that named it says.
//!
//! Later stages ask a weight's role instead of guessing from the graph's shape: FP8
//! lowering picks a GEMV's op class from the role of its weight (a query projection is
//! `qkv` however much of its layer has been fused around it), and the report names
//! kernels by what they multiply. Roles are recorded by name in [`crate::Graph`]; they
//! are not part of the text form, so a graph parsed from text has none.

use std::fmt;

/// The part a weight tensor plays in the model.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightRole {
    /// The token embedding table (also the LM head when the embeddings are tied).
    Embedding,
    /// A normalisation's scale (RMSNorm or LayerNorm weight).
    Norm,
    /// The query projection.
    Query,
    /// The key projection.
    Key,
    /// The value projection.
    Value,
    /// The attention output projection.
    AttnOut,
    /// The MLP's gate projection.
    Gate,
    /// The MLP's up projection.
    Up,
    /// The MLP's down projection.
    Down,
    /// The output head (untied).
    LmHead,
    /// A bias added after a projection.
    Bias,
    /// A quantization scale derived from another weight.
    Scale,
}

impl WeightRole {
    pub const ALL: [WeightRole; 12] = [
        WeightRole::Embedding,
        WeightRole::Norm,
        WeightRole::Query,
        WeightRole::Key,
        WeightRole::Value,
        WeightRole::AttnOut,
        WeightRole::Gate,
        WeightRole::Up,
        WeightRole::Down,
        WeightRole::LmHead,
        WeightRole::Bias,
        WeightRole::Scale,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            WeightRole::Embedding => "embedding",
            WeightRole::Norm => "norm",
            WeightRole::Query => "query",
            WeightRole::Key => "key",
            WeightRole::Value => "value",
            WeightRole::AttnOut => "attn-out",
            WeightRole::Gate => "gate",
            WeightRole::Up => "up",
            WeightRole::Down => "down",
            WeightRole::LmHead => "lm-head",
            WeightRole::Bias => "bias",
            WeightRole::Scale => "scale",
        }
    }

    /// Whether a weight of this role is multiplied as a GEMV matrix `[out, in]`.
    pub const fn is_matrix(self) -> bool {
        matches!(
            self,
            WeightRole::Embedding
                | WeightRole::Query
                | WeightRole::Key
                | WeightRole::Value
                | WeightRole::AttnOut
                | WeightRole::Gate
                | WeightRole::Up
                | WeightRole::Down
                | WeightRole::LmHead
        )
    }
}

impl fmt::Display for WeightRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
