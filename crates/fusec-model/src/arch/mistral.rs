//! Mistral (Jiang et al., 2023, "Mistral 7B"; transformers' `MistralForCausalLM`).
//!
//! Its decoder is Llama's (RMSNorm, RoPE, GQA, SwiGLU, no biases) plus a sliding
//! attention window on every layer: a query attends to the last `sliding_window`
//! positions only, and each layer's KV cache is a ring of that many positions (see
//! [`crate::blocks::attention`]). The graph is Llama's with those caches.

use fusec_ir::Graph;

use super::architecture::Architecture;
use super::llama;
use crate::blocks::StepDims;
use crate::build::BuildError;
use crate::frontend::{ConfigError, HfConfig, ModelConfig};

/// The Mistral architecture, `model_type` `mistral`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mistral;

impl Architecture for Mistral {
    fn model_types(&self) -> &[&str] {
        &["mistral"]
    }

    fn parse_hf_config(&self, config: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
        llama::parse_hf_config(config)
    }

    fn build(&self, model: &ModelConfig) -> Result<Graph, BuildError> {
        llama::build(model)
    }

    fn build_step(&self, model: &ModelConfig, dims: &StepDims) -> Result<Graph, BuildError> {
        llama::build_with(model, dims)
    }
}
