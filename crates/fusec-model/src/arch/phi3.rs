//! Phi-3 and Phi-3.5 mini (Abdin et al., 2024, "Phi-3 Technical Report"; transformers'
//! models/phi3/modeling_phi3.py, `Phi3ForCausalLM`).
//!
//! Its decoder computes what Llama's does: RMSNorm, RoPE, GQA attention with no
//! biases, a SiLU-gated MLP, residual adds, and a sliding window on every layer when
//! `sliding_window` is set (`Phi3Model` builds a sliding-window mask from
//! `config.sliding_window`). Two differences are in the checkpoint's layout only:
//! `Phi3Attention` computes q, k and v with one `qkv_proj` and slices its output, and
//! `Phi3MLP` computes gate and up with one `gate_up_proj` and `chunk(2, dim=-1)`s it
//! (`up * silu(gate)`, the same product). A slice of a projection's output is the
//! projection by the same rows of its weight, so the graph is Llama's, with Llama's
//! weight names, and the loader cuts `q_proj`, `k_proj`, `v_proj`, `gate_proj` and
//! `up_proj` out of the packed tensors (`fusec_weights::packed`). The fused graph is
//! Llama's: the merged GEMV reads q, k and v as the packed projection does.
//!
//! RoPE scalings other than Llama 3's are rejected by name (Phi-3's long-context
//! variants use `longrope`, earlier spelled `su`), and so is a
//! `partial_rotary_factor` other than 1.0 (Phi-4-mini).

use fusec_ir::Graph;

use super::architecture::Architecture;
use super::llama;
use crate::blocks::StepDims;
use crate::build::BuildError;
use crate::frontend::{ConfigError, HfConfig, ModelConfig};

/// The Phi-3 architecture, `model_type` `phi3`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phi3;

impl Architecture for Phi3 {
    fn model_types(&self) -> &[&str] {
        &["phi3"]
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::arch::parse_hf_config;

    const JSON: &str = r#"{"model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176,
        "vocab_size": 256, "hidden_act": "silu", "sliding_window": 2047,
        "rope_scaling": null, "max_position_embeddings": 4096}"#;

    #[test]
    fn phi3_is_llama_with_its_window() {
        let spec = parse_hf_config(Path::new("p/config.json"), JSON).expect("parses");
        assert_eq!(spec.architecture, "phi3");
        assert_eq!(spec.model.layer_window(1), Some(2047));
        let g = Phi3.build(&spec.model).expect("builds");
        assert!(g
            .weights()
            .iter()
            .any(|(_, n)| *n == "model.layers.0.self_attn.k_proj.weight"));
    }

    #[test]
    fn long_rope_is_rejected_by_name() {
        for ty in ["longrope", "su"] {
            let json = JSON.replace(
                "\"rope_scaling\": null",
                &format!(
                    "\"rope_scaling\": {{\"type\": \"{ty}\", \"long_factor\": [1.0], \"short_factor\": [1.0]}}"
                ),
            );
            let e = parse_hf_config(Path::new("p/config.json"), &json).expect_err("rejected");
            assert!(e.message.contains(&format!("`{ty}`")), "{ty}: {e}");
        }
    }
}
