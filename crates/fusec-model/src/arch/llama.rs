//! Llama (Touvron et al., 2023), op for op as transformers' `LlamaForCausalLM` runs
//! its decode step with eager attention:
//!
//! - the token embedding, and RoPE tables once per step;
//! - per layer: RMSNorm, attention (q/k/v projections, RoPE, the KV cache grown by
//!   `cat`, `repeat_kv` for GQA, scaled `QK^T`, additive mask, softmax in f32, `PV`,
//!   `o_proj`), the residual add, RMSNorm, the SwiGLU MLP, the residual add;
//! - the final norm, `lm_head` (or the tied embedding), and the greedy `argmax`.
//!
//! One token per sequence: `B` sequences, each with `S` cached positions. The additive
//! attention mask `[B,1,1,S+1]` is an input, built by the caller once per step. The
//! blocks are [`crate::blocks`]; this file only composes them.

use fusec_ir::{step, BinaryOp, Graph, NodeId};

use super::architecture::Architecture;
use crate::blocks::{decoder_step, Attention, FinalNorm, GatedMlp, RmsNorm, RopeTables, StepDims};
use crate::build::{BuildError, Builder};
use crate::frontend::{decoder_config, ConfigError, HfConfig, ModelConfig};

/// The Llama architecture, `model_type` `llama`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Llama;

impl Architecture for Llama {
    fn model_types(&self) -> &[&str] {
        &["llama"]
    }

    fn parse_hf_config(&self, config: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
        parse_hf_config(config)
    }

    fn build(&self, model: &ModelConfig) -> Result<Graph, BuildError> {
        build(model)
    }

    fn build_step(&self, model: &ModelConfig, dims: &StepDims) -> Result<Graph, BuildError> {
        build_with(model, dims)
    }
}

/// `LlamaConfig`'s keys: the shared decoder keys, without biases, with SiLU.
pub fn parse_hf_config(j: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
    for key in ["attention_bias", "mlp_bias"] {
        if j.bool(key)? == Some(true) {
            return Err(j.err_at(key, format!("`{key}` = true is not supported (no biases)")));
        }
    }
    if let Some(act) = j.string("hidden_act")? {
        if act != "silu" {
            return Err(j.err_at(
                "hidden_act",
                format!("unsupported hidden_act `{act}` (expected silu)"),
            ));
        }
    }
    decoder_config(j)
}

/// The eager decode step of `cfg` in its checkpoint dtype.
pub fn build(cfg: &ModelConfig) -> Result<Graph, BuildError> {
    build_with(cfg, &StepDims::default())
}

/// The eager step of `cfg` over `dims` (decode, or prefill of `dims.query` tokens).
pub fn build_with(cfg: &ModelConfig, dims: &StepDims) -> Result<Graph, BuildError> {
    decoder_step(
        cfg,
        dims,
        FinalNorm::Llama,
        &mut |b, layer, x, rope, mask| decoder_layer(b, cfg, layer, x, rope, mask, dims),
    )
}

/// `LlamaDecoderLayer.forward`: pre-norm attention and MLP, each with a residual add.
pub fn decoder_layer(
    b: &mut Builder,
    cfg: &ModelConfig,
    layer: u64,
    x: NodeId,
    rope: &RopeTables,
    mask: NodeId,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let (d, eps, dt) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype);
    let norm = RmsNorm::new(b, &step::layer_weight(layer, "input_layernorm"), d, eps, dt)?;
    let n = norm.forward(b, x)?;
    let o = Attention::llama(cfg, layer).forward(b, n, rope, mask, dims)?;
    let x = b.binary(BinaryOp::Add, x, o)?;

    let norm = RmsNorm::new(
        b,
        &step::layer_weight(layer, "post_attention_layernorm"),
        d,
        eps,
        dt,
    )?;
    let n = norm.forward(b, x)?;
    let m = GatedMlp::llama(cfg, layer).forward(b, n)?;
    b.binary(BinaryOp::Add, x, m)
}

#[cfg(test)]
mod tests {
    use fusec_ir::{verify, DType, WeightRole};

    use super::*;

    fn config(num_kv_heads: u64, tie_word_embeddings: bool, dtype: DType) -> ModelConfig {
        ModelConfig {
            name: "t".into(),
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads,
            head_dim: 8,
            intermediate_size: 48,
            vocab_size: 64,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_seq_len: 128,
            tie_word_embeddings,
            dtype,
            sliding_window: None,
            layer_types: Vec::new(),
            rope_scaling: None,
            multipliers: None,
            gemma: None,
        }
    }

    /// The role a weight of a Llama checkpoint has, by its Hugging Face name.
    fn expected_role(name: &str) -> Option<WeightRole> {
        let role = match name.rsplit('.').nth(1)? {
            "embed_tokens" => WeightRole::Embedding,
            "norm" | "input_layernorm" | "post_attention_layernorm" => WeightRole::Norm,
            "q_proj" => WeightRole::Query,
            "k_proj" => WeightRole::Key,
            "v_proj" => WeightRole::Value,
            "o_proj" => WeightRole::AttnOut,
            "gate_proj" => WeightRole::Gate,
            "up_proj" => WeightRole::Up,
            "down_proj" => WeightRole::Down,
            "lm_head" => WeightRole::LmHead,
            _ => return None,
        };
        Some(role)
    }

    #[test]
    fn every_weight_has_its_role() {
        for (kv, tied, dtype) in [
            (4, false, DType::F32),
            (2, true, DType::Bf16),
            (1, false, DType::F16),
        ] {
            let cfg = config(kv, tied, dtype);
            let g = build(&cfg).expect("builds");
            verify(&g).expect("verifies");
            let weights = g.weights();
            // embed, final norm, (lm_head), and 9 per layer.
            let expected = 2 + usize::from(!tied) + 9 * cfg.num_layers as usize;
            assert_eq!(weights.len(), expected, "{kv} {tied}");
            for (_, name) in weights {
                assert_eq!(
                    g.weight_role(name),
                    expected_role(name),
                    "{name} (kv {kv}, tied {tied})"
                );
                assert!(g.weight_role(name).is_some(), "{name} has no role");
            }
            assert_eq!(g.weight_roles().len(), g.weights().len());
            // A reordered copy (what passes that add nodes make) keeps them.
            let r = g.reordered();
            assert_eq!(r.weight_roles(), g.weight_roles());
        }
    }

    #[test]
    fn layers_and_step_interface() {
        let cfg = config(2, false, DType::Bf16);
        let g = build(&cfg).expect("builds");
        assert_eq!(g.layers(), 2);
        let outputs: Vec<&str> = g.outputs().iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            outputs,
            [
                "past.0.key",
                "past.0.value",
                "past.1.key",
                "past.1.value",
                step::LOGITS,
                step::NEXT_TOKEN
            ]
        );
    }

    #[test]
    fn mistral_builds_llamas_graph() {
        use crate::arch::Mistral;
        let cfg = config(2, false, DType::Bf16);
        let llama = fusec_ir::text::print(&Llama.build(&cfg).expect("builds")).expect("prints");
        let mistral = fusec_ir::text::print(&Mistral.build(&cfg).expect("builds")).expect("prints");
        assert_eq!(llama, mistral);
    }
}
