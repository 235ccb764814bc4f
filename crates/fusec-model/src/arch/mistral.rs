//! Mistral (Jiang et al., 2023, "Mistral 7B"; transformers' `MistralForCausalLM`).
//!
//! Its decoder is Llama's (RMSNorm, RoPE, GQA, SwiGLU, no biases) plus a sliding
//! attention window. fusec's decode graph attends to the whole cache, so the frontend
//! rejects contexts beyond the window, and within it the graph is Llama's.

use fusec_ir::Graph;

use super::architecture::Architecture;
use super::llama;
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
}
