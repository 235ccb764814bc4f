//! OLMo 2 (OLMo et al., 2024, "2 OLMo 2 Furious"; transformers' `Olmo2ForCausalLM`,
//! models/olmo2/modeling_olmo2.py), op for op as its eager decode step runs.
//!
//! It differs from Llama in two places:
//!
//! - `Olmo2DecoderLayer.forward` normalises each sublayer's *output* before the
//!   residual add (`post_attention_layernorm`, `post_feedforward_layernorm`) and has
//!   no pre-norms: `x = x + norm(attn(x))`, `x = x + norm(mlp(x))`;
//! - `Olmo2Attention.forward` normalises the q and k projections over all heads
//!   (`q_norm` over `num_heads * head_dim`, `k_norm` over `num_kv_heads * head_dim`)
//!   before the reshape into heads and RoPE.
//!
//! `Olmo2RMSNorm` multiplies by the weight in f32 and casts after
//! ([`RmsNorm::forward_weight_in_f32`]); for an f32 checkpoint that is Llama's norm.

use fusec_ir::{step, BinaryOp, Graph, NodeId, WeightRole};

use super::architecture::Architecture;
use super::llama;
use crate::blocks::{
    attend, decoder_step, split_heads, Attention, FinalNorm, GatedMlp, Heads, RmsNorm, RopeTables,
    Scores, StepDims,
};
use crate::build::{BuildError, Builder};
use crate::frontend::{ConfigError, HfConfig, ModelConfig};

/// The OLMo 2 architecture, `model_type` `olmo2`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Olmo2;

impl Architecture for Olmo2 {
    fn model_types(&self) -> &[&str] {
        &["olmo2"]
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

/// `Olmo2Config`'s keys: Llama's shared decoder keys, without biases
/// (`attention_bias`), with SiLU. The q/k norms and post-norms come with the model
/// type.
pub fn parse_hf_config(j: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
    llama::parse_hf_config(j)
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
        FinalNorm::WeightInF32,
        &mut |b, layer, x, rope, mask| decoder_layer(b, cfg, layer, x, rope, mask, dims),
    )
}

/// `Olmo2DecoderLayer.forward`: attention and MLP on the residual stream itself, each
/// output normalised before its residual add.
fn decoder_layer(
    b: &mut Builder,
    cfg: &ModelConfig,
    layer: u64,
    x: NodeId,
    rope: &RopeTables,
    mask: NodeId,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let o = attention(b, cfg, layer, x, rope, mask, dims)?;
    let x = post_norm_residual(b, cfg, layer, "post_attention_layernorm", x, o)?;
    let h = GatedMlp::llama(cfg, layer).forward(b, x)?;
    post_norm_residual(b, cfg, layer, "post_feedforward_layernorm", x, h)
}

/// `residual + norm(h)` with the layer's norm `module`.
fn post_norm_residual(
    b: &mut Builder,
    cfg: &ModelConfig,
    layer: u64,
    module: &str,
    residual: NodeId,
    h: NodeId,
) -> Result<NodeId, BuildError> {
    let norm = RmsNorm::new(
        b,
        &step::layer_weight(layer, module),
        cfg.hidden_size,
        cfg.rms_norm_eps,
        cfg.dtype,
    )?;
    let h = norm.forward_weight_in_f32(b, h)?;
    b.binary(BinaryOp::Add, residual, h)
}

/// `Olmo2Attention.forward`: `q_norm(q_proj(x))`, `k_norm(k_proj(x))`, `v_proj(x)`,
/// then the heads, RoPE, the cache append, eager attention and `o_proj`.
fn attention(
    b: &mut Builder,
    cfg: &ModelConfig,
    layer: u64,
    x: NodeId,
    rope: &RopeTables,
    mask: NodeId,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let att = Attention::llama(cfg, layer);
    let Heads {
        num_heads: h,
        num_kv_heads: kv,
        head_dim: hd,
    } = att.heads;
    let d = att.hidden_size;
    let mut qkv = Vec::with_capacity(3);
    for (module, role, count, norm) in [
        ("q_proj", WeightRole::Query, h, Some("self_attn.q_norm")),
        ("k_proj", WeightRole::Key, kv, Some("self_attn.k_norm")),
        ("v_proj", WeightRole::Value, kv, None),
    ] {
        let p = att.projection(b, module, role, count * hd, d, false)?;
        let mut y = p.forward(b, x)?;
        if let Some(norm) = norm {
            let name = step::layer_weight(layer, norm);
            let norm = RmsNorm::new(b, &name, count * hd, cfg.rms_norm_eps, cfg.dtype)?;
            y = norm.forward_weight_in_f32(b, y)?;
        }
        qkv.push(split_heads(b, y, count, hd, dims)?);
    }
    let (q, k) = rope.apply(b, qkv[0], qkv[1])?;
    let scores = Scores {
        scale: (att.heads.head_dim as f64).powf(-0.5),
        softcap: None,
        window: att.window,
    };
    let o = attend(b, layer, (q, k, qkv[2]), mask, &att.heads, dims, &scores)?;
    let o_proj = att.projection(b, "o_proj", WeightRole::AttnOut, d, h * hd, false)?;
    o_proj.forward(b, o)
}

#[cfg(test)]
mod tests {
    use fusec_ir::{verify, DType, WeightRole};

    use super::*;

    fn config(dtype: DType) -> ModelConfig {
        ModelConfig {
            name: "t".into(),
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            intermediate_size: 48,
            vocab_size: 64,
            rope_theta: 500_000.0,
            rms_norm_eps: 1e-6,
            max_seq_len: 128,
            tie_word_embeddings: false,
            dtype,
            sliding_window: None,
            layer_types: Vec::new(),
            rope_scaling: None,
            multipliers: None,
            gemma: None,
        }
    }

    /// The role a weight of an OLMo 2 checkpoint has, by its Hugging Face name.
    fn expected_role(name: &str) -> Option<WeightRole> {
        let role = match name.rsplit('.').nth(1)? {
            "embed_tokens" => WeightRole::Embedding,
            "norm"
            | "q_norm"
            | "k_norm"
            | "post_attention_layernorm"
            | "post_feedforward_layernorm" => WeightRole::Norm,
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
        for dtype in [DType::F32, DType::Bf16] {
            let cfg = config(dtype);
            let g = build(&cfg).expect("builds");
            verify(&g).expect("verifies");
            let weights = g.weights();
            // embed, final norm, lm_head, and 11 per layer (7 projections, 4 norms).
            assert_eq!(weights.len(), 3 + 11 * cfg.num_layers as usize);
            for (_, name) in weights {
                assert_eq!(g.weight_role(name), expected_role(name), "{name}");
            }
            let names: Vec<&str> = g.weights().into_iter().map(|(_, n)| n).collect();
            for module in ["q_norm", "k_norm"] {
                let name = format!("model.layers.0.self_attn.{module}.weight");
                assert!(names.contains(&name.as_str()), "{name}");
            }
            assert!(names.contains(&"model.layers.1.post_feedforward_layernorm.weight"));
            assert!(!names.iter().any(|n| n.contains("input_layernorm")));
        }
    }

    #[test]
    fn the_bf16_norm_multiplies_the_weight_in_f32() {
        let f32_text =
            fusec_ir::text::print(&build(&config(DType::F32)).expect("builds")).expect("prints");
        let bf16 =
            fusec_ir::text::print(&build(&config(DType::Bf16)).expect("builds")).expect("prints");
        // Olmo2RMSNorm promotes the weight to f32 and casts the product back once; in
        // f32 the casts vanish.
        let q_norm = "weight@model.layers.0.self_attn.q_norm.weight : bf16[32]";
        assert!(bf16.contains(q_norm), "{bf16}");
        let casts = |t: &str| t.matches("cast{to=f32}").count();
        assert!(casts(&bf16) > casts(&f32_text) + 4 * 2 * 2);
    }
}
