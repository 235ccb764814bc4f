//! Qwen3 (Qwen Team, 2025, "Qwen3 Technical Report"), op for op as transformers'
//! `Qwen3ForCausalLM` runs its decode step with eager attention
//! (models/qwen3/modeling_qwen3.py): Qwen2's decoder without the implied q/k/v
//! biases (`attention_bias`, default false, puts a bias on all four projections),
//! plus `q_norm` and `k_norm`, an RMSNorm over `head_dim` on each head of q and k
//! before RoPE (`Qwen3Attention.forward`).

use fusec_ir::Graph;

use super::architecture::Architecture;
use super::qwen2::{self, QwenAttentionKind};
use crate::blocks::StepDims;
use crate::build::BuildError;
use crate::frontend::{ConfigError, HfConfig, ModelConfig};

/// The Qwen3 architecture, `model_type` `qwen3`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Qwen3;

impl Architecture for Qwen3 {
    fn model_types(&self) -> &[&str] {
        &["qwen3"]
    }

    fn parse_hf_config(&self, config: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
        if config.bool("attention_bias")? == Some(true) {
            return Err(config.err_at(
                "attention_bias",
                "`attention_bias` = true is not supported for qwen3".into(),
            ));
        }
        qwen2::parse_qwen_config(config)
    }

    fn build(&self, model: &ModelConfig) -> Result<Graph, BuildError> {
        self.build_step(model, &StepDims::default())
    }

    fn build_step(&self, model: &ModelConfig, dims: &StepDims) -> Result<Graph, BuildError> {
        qwen2::build_with(
            model,
            QwenAttentionKind {
                qkv_bias: false,
                o_bias: false,
                qk_norm: true,
            },
            dims,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fusec_ir::{verify, WeightRole};

    use super::*;
    use crate::arch::parse_hf_config;

    const JSON: &str = r#"{"model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 48, "vocab_size": 64, "attention_bias": false,
        "use_sliding_window": false, "sliding_window": null, "max_window_layers": 28}"#;

    #[test]
    fn q_and_k_norms_per_head() {
        let spec = parse_hf_config(Path::new("q/config.json"), JSON).expect("parses");
        assert_eq!(spec.architecture, "qwen3");
        let g = Qwen3.build(&spec.model).expect("builds");
        verify(&g).expect("verifies");
        // embed, final norm, lm_head, and 9 weights + 2 norms per layer; no biases.
        assert_eq!(g.weights().len(), 3 + 11 * 2);
        let q_norm = "model.layers.1.self_attn.q_norm.weight";
        assert_eq!(g.weight_role(q_norm), Some(WeightRole::Norm));
        assert!(g.weights().iter().all(|(_, n)| !n.ends_with(".bias")));
    }

    #[test]
    fn attention_bias_is_rejected_by_name() {
        let on = JSON.replace("\"attention_bias\": false", "\"attention_bias\": true");
        let e = parse_hf_config(Path::new("q/config.json"), &on).expect_err("rejected");
        assert!(e.message.contains("`attention_bias`"), "{e}");
    }
}
