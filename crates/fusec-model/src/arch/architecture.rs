//! The [`Architecture`] trait: what a model family provides to fusec.

use std::fmt;

use fusec_ir::Graph;

use crate::blocks::StepDims;
use crate::build::BuildError;
use crate::frontend::{ConfigError, HfConfig, ModelConfig};

/// A model family: it reads its Hugging Face `config.json` and builds the eager decode
/// step of a model, op for op as the reference implementation runs it.
///
/// The graph follows the interface of [`fusec_ir::step`] (inputs, KV-cache state and
/// outputs by name, symbols `B` and `S`), names its weights as the checkpoint does, and
/// records every weight's [`fusec_ir::WeightRole`]; the later stages rely on all
/// three. Build it from [`crate::blocks`]. Register it in a [`super::Registry`].
pub trait Architecture: fmt::Debug + Send + Sync {
    /// The names this architecture is registered under: the Hugging Face
    /// `model_type`s it reads, which `model.toml`'s `architecture` key also takes.
    fn model_types(&self) -> &[&str];

    /// Reads the keys of a `config.json` (its `model_type` already matched). Reject
    /// settings the graph would not honour rather than ignore them.
    fn parse_hf_config(&self, config: &HfConfig<'_>) -> Result<ModelConfig, ConfigError>;

    /// The eager decode step of `model`, in its checkpoint dtype.
    fn build(&self, model: &ModelConfig) -> Result<Graph, BuildError>;

    /// The eager step of `model` over `dims`: the decode step for one token, or a
    /// prefill step of `dims.query` tokens (transformers' multi-token forward, causal
    /// mask, RoPE per position, the caches appended by `T` entries).
    ///
    /// The built-in families build both from the same blocks. An architecture that
    /// only implements [`Architecture::build`] has no prefill step and no paged step
    /// ([`StepDims::paged`]): this refuses any `T` other than 1, and paging.
    fn build_step(&self, model: &ModelConfig, dims: &StepDims) -> Result<Graph, BuildError> {
        let name = self.model_types().first().copied().unwrap_or("?");
        if *dims == StepDims::default() {
            self.build(model)
        } else if let Some(block_size) = dims.paged {
            Err(BuildError::Unsupported(format!(
                "architecture `{name}` builds no paged step (blocks of {block_size})"
            )))
        } else {
            Err(BuildError::Unsupported(format!(
                "architecture `{name}` builds no prefill step ({} tokens)",
                dims.query
            )))
        }
    }
}
