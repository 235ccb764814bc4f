//! Granite 3 (IBM, 2024; transformers' `GraniteForCausalLM`,
//! models/granite/modeling_granite.py), op for op as its eager decode step runs.
//!
//! The decoder is Llama's (RMSNorm, RoPE, GQA, SwiGLU, no biases) with four scalars
//! from the config ([`Multipliers`]):
//!
//! - `GraniteModel.forward`: `inputs_embeds * embedding_multiplier`;
//! - `GraniteAttention`: the scores scaled by `attention_multiplier` instead of
//!   `head_dim^-0.5` (`self.scaling`);
//! - `GraniteDecoderLayer.forward`: `residual + hidden_states * residual_multiplier`
//!   after attention and after the MLP;
//! - `GraniteForCausalLM.forward`: `logits / logits_scaling`.
//!
//! PyTorch runs every multiply even when the factor is 1; the graph does too, and the
//! exact rules `mul-one` and `div-one` remove them when fusing.

use fusec_ir::{step, BinaryOp, Graph, NodeId, WeightRole};

use super::architecture::Architecture;
use super::llama;
use crate::blocks::{
    attend, greedy_outputs, split_heads, Attention, Embedding, GatedMlp, Heads, LmHead, RmsNorm,
    RopeTables, Scores, StepDims, StepInputs,
};
use crate::build::{BuildError, Builder};
use crate::frontend::{ConfigError, HfConfig, ModelConfig, Multipliers};

/// The Granite architecture, `model_type` `granite`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Granite;

impl Architecture for Granite {
    fn model_types(&self) -> &[&str] {
        &["granite"]
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

/// `GraniteConfig`'s keys: Llama's (no biases, SiLU) and the four multipliers, each
/// defaulting to 1 as in `GraniteConfig`.
pub fn parse_hf_config(j: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
    let mut model = llama::parse_hf_config(j)?;
    let mut m = Multipliers::default();
    for (key, slot) in [
        ("embedding_multiplier", &mut m.embedding),
        ("attention_multiplier", &mut m.attention),
        ("residual_multiplier", &mut m.residual),
        ("logits_scaling", &mut m.logits_scaling),
    ] {
        if let Some(v) = j.get(key) {
            let x = j.float_in(key, v)?;
            if !x.is_finite() || (key == "logits_scaling" && x == 0.0) {
                return Err(j.err_at(
                    key,
                    format!("`{key}` must be a finite number (non-zero for logits_scaling)"),
                ));
            }
            *slot = x;
        }
    }
    model.multipliers = Some(m);
    Ok(model)
}

/// The eager decode step of `cfg` in its checkpoint dtype (multipliers of 1 when the
/// config has none, as `GraniteConfig`'s defaults).
pub fn build(cfg: &ModelConfig) -> Result<Graph, BuildError> {
    build_with(cfg, &StepDims::default())
}

/// The eager step of `cfg` over `dims` (decode, or prefill of `dims.query` tokens).
pub fn build_with(cfg: &ModelConfig, dims: &StepDims) -> Result<Graph, BuildError> {
    let m = cfg.multipliers.unwrap_or_default();
    let dt = cfg.dtype;
    let mut b = Builder::new(&cfg.name);
    b.set_layer_count(cfg.num_layers);
    let inputs = StepInputs::new(&mut b, dims, dt)?;
    let embed = Embedding::new(&mut b, step::EMBED, cfg.vocab_size, cfg.hidden_size, dt)?;
    let x = embed.forward(&mut b, inputs.input_ids)?;
    let mut x = b.binary_scalar(BinaryOp::Mul, x, m.embedding)?;
    let rope = RopeTables::new(
        &mut b,
        inputs.position_ids,
        cfg.rope_theta,
        cfg.head_dim,
        dims,
        dt,
    )?;
    for layer in 0..cfg.num_layers {
        b.set_layer(Some(layer as u32));
        x = decoder_layer(
            &mut b,
            cfg,
            &m,
            layer,
            x,
            &rope,
            inputs.attention_mask,
            dims,
        )?;
    }
    b.set_layer(None);
    let norm = RmsNorm::new(
        &mut b,
        step::FINAL_NORM,
        cfg.hidden_size,
        cfg.rms_norm_eps,
        dt,
    )?;
    let h = norm.forward(&mut b, x)?;
    let h = dims.head_rows(&mut b, h)?;
    let head = LmHead::of_model(&mut b, &embed, cfg, dt)?;
    let logits = head.forward(&mut b, h)?;
    let logits = b.binary_scalar(BinaryOp::Div, logits, m.logits_scaling)?;
    greedy_outputs(&mut b, logits)?;
    Ok(b.finish())
}

/// `GraniteDecoderLayer.forward`: Llama's pre-norm layer with each sublayer's output
/// scaled by `residual_multiplier` before its residual add.
#[allow(clippy::too_many_arguments)]
fn decoder_layer(
    b: &mut Builder,
    cfg: &ModelConfig,
    m: &Multipliers,
    layer: u64,
    x: NodeId,
    rope: &RopeTables,
    mask: NodeId,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let (d, eps, dt) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype);
    let norm = RmsNorm::new(b, &step::layer_weight(layer, "input_layernorm"), d, eps, dt)?;
    let n = norm.forward(b, x)?;
    let o = attention(b, cfg, layer, n, rope, mask, dims, m.attention)?;
    let o = b.binary_scalar(BinaryOp::Mul, o, m.residual)?;
    let x = b.binary(BinaryOp::Add, x, o)?;

    let norm = RmsNorm::new(
        b,
        &step::layer_weight(layer, "post_attention_layernorm"),
        d,
        eps,
        dt,
    )?;
    let n = norm.forward(b, x)?;
    let h = GatedMlp::llama(cfg, layer).forward(b, n)?;
    let h = b.binary_scalar(BinaryOp::Mul, h, m.residual)?;
    b.binary(BinaryOp::Add, x, h)
}

/// `GraniteAttention.forward`: Llama's attention block (q/k/v projections, RoPE, the
/// cache append, GQA, `o_proj`) with the scores scaled by `scale`.
#[allow(clippy::too_many_arguments)]
fn attention(
    b: &mut Builder,
    cfg: &ModelConfig,
    layer: u64,
    x: NodeId,
    rope: &RopeTables,
    mask: NodeId,
    dims: &StepDims,
    scale: f64,
) -> Result<NodeId, BuildError> {
    let att = Attention::llama(cfg, layer);
    let Heads {
        num_heads: h,
        num_kv_heads: kv,
        head_dim: hd,
    } = att.heads;
    let d = att.hidden_size;
    let mut qkv = Vec::with_capacity(3);
    for (module, role, count) in [
        ("q_proj", WeightRole::Query, h),
        ("k_proj", WeightRole::Key, kv),
        ("v_proj", WeightRole::Value, kv),
    ] {
        let p = att.projection(b, module, role, count * hd, d, false)?;
        let y = p.forward(b, x)?;
        qkv.push(split_heads(b, y, count, hd, dims)?);
    }
    let (q, k) = rope.apply(b, qkv[0], qkv[1])?;
    let scores = Scores {
        scale,
        softcap: None,
        window: att.window,
    };
    let o = attend(b, layer, (q, k, qkv[2]), mask, &att.heads, dims, &scores)?;
    let o_proj = att.projection(b, "o_proj", WeightRole::AttnOut, d, h * hd, false)?;
    o_proj.forward(b, o)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fusec_ir::{verify, DType, Op};

    use super::*;

    const JSON: &str = r#"{"model_type": "granite", "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 48, "vocab_size": 64, "embedding_multiplier": 12.0,
        "attention_multiplier": 0.0078125, "residual_multiplier": 0.22,
        "logits_scaling": 16.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16"}"#;

    fn scalars(g: &Graph) -> Vec<f64> {
        g.node_ids()
            .filter_map(|n| match g.op(n) {
                Op::Scalar { value } => Some(value.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_multipliers_are_read_and_applied() {
        let j = HfConfig::parse(Path::new("m/config.json"), JSON).expect("parses");
        let cfg = parse_hf_config(&j).expect("valid");
        let m = cfg.multipliers.expect("granite has multipliers");
        assert_eq!(
            (m.embedding, m.attention, m.residual, m.logits_scaling),
            (12.0, 0.0078125, 0.22, 16.0)
        );
        assert_eq!(cfg.dtype, DType::Bf16);
        let g = build(&cfg).expect("builds");
        verify(&g).expect("verifies");
        let s = scalars(&g);
        for v in [12.0, 0.0078125, 16.0] {
            assert_eq!(
                s.iter().filter(|&&x| x == v).count(),
                1 + usize::from(v == 0.0078125),
                "{v}"
            );
        }
        // Two residual multiplies per layer.
        assert_eq!(s.iter().filter(|&&x| x == 0.22).count(), 4);
        // Llama's 1/sqrt(head_dim) does not appear.
        assert!(!s.contains(&(8f64).powf(-0.5)));
    }

    #[test]
    fn absent_multipliers_default_to_one() {
        let json = r#"{"model_type": "granite", "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 64}"#;
        let j = HfConfig::parse(Path::new("m/config.json"), json).expect("parses");
        let cfg = parse_hf_config(&j).expect("valid");
        assert_eq!(cfg.multipliers, Some(Multipliers::default()));
        let j = HfConfig::parse(
            Path::new("m/config.json"),
            r#"{"model_type": "granite", "logits_scaling": 0, "hidden_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48,
            "vocab_size": 64}"#,
        )
        .expect("parses");
        let e = parse_hf_config(&j).expect_err("a zero divisor");
        assert!(e.message.contains("logits_scaling"), "{e}");
    }
}
