//! Gemma 2 (Gemma Team, 2024, "Gemma 2: Improving Open Language Models at a
//! Practical Size"; transformers' `Gemma2ForCausalLM`, models/gemma2/modeling_gemma2.py)
//! and Gemma 3's text decoder (Gemma Team, 2025, "Gemma 3 Technical Report";
//! `Gemma3ForCausalLM`, models/gemma3/modeling_gemma3.py), op for op as their eager
//! decode steps run.
//!
//! Both differ from Llama in:
//!
//! - the embeddings times `sqrt(hidden_size)`, rounded to the activations' dtype first
//!   (`Gemma2Model.forward`'s `normalizer`, `Gemma3TextScaledWordEmbedding`);
//! - `Gemma2RMSNorm`: `(x32 * rsqrt(mean(x32^2) + eps) * (1 + w32)).type_as(x)`, the
//!   weight an offset from 1 ([`RmsNorm::forward_offset_weight`]);
//! - four norms per layer: `input_layernorm` before attention, `post_attention_layernorm`
//!   on its output before the residual add, `pre_feedforward_layernorm` and
//!   `post_feedforward_layernorm` around the MLP;
//! - the gated MLP with GELU (tanh approximation), `hidden_activation`
//!   `gelu_pytorch_tanh`;
//! - the attention scores scaled by `query_pre_attn_scalar^-0.5`;
//! - `layer_types`: sliding-window and global layers, alternating;
//! - tied embeddings by default.
//!
//! Gemma 2 soft-caps the attention scores (`attn_logit_softcapping`, before the mask)
//! and the final logits (`final_logit_softcapping`): `tanh(x / c) * c`. Gemma 3 drops
//! the attention soft-cap (`Gemma3Attention.forward` does not pass `softcap` to the
//! attention function, so the eager reference ignores the key too), keeps the final
//! one when set (default none), and adds `q_norm` and `k_norm`, Gemma RMSNorms over
//! each head of q and k before RoPE, and a RoPE base per layer type: `rope_theta`
//! (with any scaling) for the global layers, `rope_local_base_freq` for the sliding
//! ones.

use fusec_ir::numerics::round_to;
use fusec_ir::{step, BinaryOp, Graph, NodeId, UnaryOp, WeightRole};
use serde_json::Value;

use super::architecture::Architecture;
use crate::blocks::{
    attend, greedy_outputs, soft_cap, split_heads, Attention, Embedding, GatedMlp, Heads, LmHead,
    RmsNorm, RopeTables, Scores, StepDims, StepInputs,
};
use crate::build::{BuildError, Builder};
use crate::frontend::{
    decoder_config, rope_dict, ConfigError, GemmaParams, HfConfig, LayerType, ModelConfig,
};

/// Which Gemma: the two share one graph builder, and differ in the keys they read and
/// in the blocks [`Generation::qk_norm`] and [`Generation::attn_softcap`] switch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// `model_type` `gemma2`.
    Gemma2,
    /// `model_type` `gemma3_text` (the text decoder of Gemma 3).
    Gemma3,
}

impl Generation {
    /// Gemma 3's per-head q/k RMSNorm.
    pub fn qk_norm(self) -> bool {
        self == Generation::Gemma3
    }

    /// Whether `attn_logit_softcapping` reaches the attention (Gemma 2 only).
    pub fn attn_softcap(self) -> bool {
        self == Generation::Gemma2
    }
}

/// The Gemma 2 architecture, `model_type` `gemma2`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gemma2;

/// The Gemma 3 text architecture, `model_type` `gemma3_text`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gemma3;

impl Architecture for Gemma2 {
    fn model_types(&self) -> &[&str] {
        &["gemma2"]
    }

    fn parse_hf_config(&self, config: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
        parse_hf_config(config, Generation::Gemma2)
    }

    fn build(&self, model: &ModelConfig) -> Result<Graph, BuildError> {
        build(model, Generation::Gemma2)
    }

    fn build_step(&self, model: &ModelConfig, dims: &StepDims) -> Result<Graph, BuildError> {
        build_with(model, Generation::Gemma2, dims)
    }
}

impl Architecture for Gemma3 {
    fn model_types(&self) -> &[&str] {
        &["gemma3_text"]
    }

    fn parse_hf_config(&self, config: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
        parse_hf_config(config, Generation::Gemma3)
    }

    fn build(&self, model: &ModelConfig) -> Result<Graph, BuildError> {
        build(model, Generation::Gemma3)
    }

    fn build_step(&self, model: &ModelConfig, dims: &StepDims) -> Result<Graph, BuildError> {
        build_with(model, Generation::Gemma3, dims)
    }
}

/// The activation both Gemmas use (transformers' `ACT2FN["gelu_pytorch_tanh"]`).
const ACTIVATION: &str = "gelu_pytorch_tanh";

/// `Gemma2Config`'s and `Gemma3TextConfig`'s keys, with their defaults where a key is
/// absent (a key written as `null` turns soft-capping off).
pub fn parse_hf_config(j: &HfConfig<'_>, gen: Generation) -> Result<ModelConfig, ConfigError> {
    for key in ["attention_bias", "mlp_bias"] {
        if j.bool(key)? == Some(true) {
            return Err(j.err_at(key, format!("`{key}` = true is not supported (no biases)")));
        }
    }
    for key in ["hidden_activation", "hidden_act"] {
        if let Some(act) = j.string(key)? {
            if act != ACTIVATION {
                return Err(j.err_at(
                    key,
                    format!("unsupported {key} `{act}` (expected {ACTIVATION})"),
                ));
            }
        }
    }
    if j.bool("use_bidirectional_attention")? == Some(true) {
        return Err(j.err_at(
            "use_bidirectional_attention",
            "`use_bidirectional_attention` = true is not supported (fusec decodes causally)".into(),
        ));
    }
    let mut model = decoder_config(j)?;
    // Gemma's defaults differ from Llama's where the key is absent.
    if j.get("head_dim").is_none() {
        model.head_dim = 256;
    }
    if j.get("tie_word_embeddings").is_none() {
        model.tie_word_embeddings = true;
    }
    if j.raw("sliding_window").is_none() {
        model.sliding_window = Some(4096);
    }
    if model.layer_types.is_empty() {
        // transformers fills `layer_types` from the pattern: Gemma 2 alternates from a
        // sliding layer; Gemma 3 has `sliding_window_pattern - 1` sliding layers per
        // global one (`Gemma3TextConfig.__init__`, default 6).
        let pattern = match gen {
            Generation::Gemma2 => 2,
            Generation::Gemma3 => match j.uint("sliding_window_pattern")? {
                Some(p) => p,
                None => j.uint("_sliding_window_pattern")?.unwrap_or(6),
            },
        };
        model.layer_types = (0..model.num_layers)
            .map(|i| {
                if (i + 1) % pattern != 0 {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect();
    }
    let positive = |key: &str, default: Option<f64>| -> Result<Option<f64>, ConfigError> {
        match j.get(key) {
            None if j.is_null(key) => Ok(None),
            None => Ok(default),
            Some(v) => {
                let x = j.float_in(key, v)?;
                if x.is_finite() && x > 0.0 {
                    Ok(Some(x))
                } else {
                    Err(j.err_at(key, format!("`{key}` must be a positive number, got {x}")))
                }
            }
        }
    };
    let query_pre_attn_scalar =
        positive("query_pre_attn_scalar", Some(256.0))?.ok_or_else(|| {
            j.err_at(
                "query_pre_attn_scalar",
                "`query_pre_attn_scalar` must be a positive number, got null".into(),
            )
        })?;
    let (attn_default, final_default) = match gen {
        Generation::Gemma2 => (Some(50.0), Some(30.0)),
        Generation::Gemma3 => (None, None),
    };
    let attn_logit_softcapping = positive("attn_logit_softcapping", attn_default)?;
    let final_logit_softcapping = positive("final_logit_softcapping", final_default)?;
    let rope_local_theta = match gen {
        Generation::Gemma2 => None,
        Generation::Gemma3 => Some(gemma3_rope(j, &mut model)?),
    };
    model.gemma = Some(GemmaParams {
        query_pre_attn_scalar,
        attn_logit_softcapping,
        final_logit_softcapping,
        rope_local_theta,
    });
    Ok(model)
}

/// Gemma 3's two RoPEs. transformers 5.x: `rope_parameters` holds one dict per layer
/// type; 4.x: `rope_theta` (default 1e6) and `rope_scaling` for the global layers,
/// `rope_local_base_freq` (default 1e4) for the sliding ones, which use the default
/// RoPE. Sets the global theta and scaling in `model`; returns the local theta.
fn gemma3_rope(j: &HfConfig<'_>, model: &mut ModelConfig) -> Result<f64, ConfigError> {
    let nested = match j.get("rope_parameters") {
        Some(Value::Object(p)) if p.contains_key("full_attention") => Some(p),
        _ => None,
    };
    let Some(p) = nested else {
        if j.get("rope_theta").is_none()
            && !matches!(j.get("rope_parameters"), Some(Value::Object(p)) if p.contains_key("rope_theta"))
        {
            model.rope_theta = 1_000_000.0;
        }
        return match j.get("rope_local_base_freq") {
            Some(v) => j.float_in("rope_local_base_freq", v),
            None => Ok(10_000.0),
        };
    };
    let mut local = 10_000.0;
    for (layer_type, global) in [("full_attention", true), ("sliding_attention", false)] {
        let key = format!("rope_parameters.{layer_type}");
        let (theta, scaling) = match p.get(layer_type) {
            None | Some(Value::Null) => (None, None),
            Some(Value::Object(d)) => rope_dict(j, &key, d)?,
            Some(v) => return Err(j.err_at(&key, format!("`{key}` must be an object, got {v}"))),
        };
        if global {
            model.rope_theta = theta.unwrap_or(1_000_000.0);
            model.rope_scaling = scaling;
        } else {
            if scaling.is_some() {
                return Err(j.err_at(
                    &key,
                    format!("`{key}`: a RoPE scaling on the sliding layers is not supported"),
                ));
            }
            local = theta.unwrap_or(10_000.0);
        }
    }
    if !(local.is_finite() && local > 0.0) {
        return Err(j.err_at(
            "rope_parameters.sliding_attention",
            "the sliding layers' `rope_theta` must be a positive number".into(),
        ));
    }
    Ok(local)
}

/// The Gemma parameters of `cfg`, or `GemmaParams`' values for a config that has none
/// (a `model.toml` without `[model.gemma]`): `query_pre_attn_scalar = head_dim`, no
/// soft-capping, one RoPE.
fn params(cfg: &ModelConfig) -> GemmaParams {
    cfg.gemma.unwrap_or(GemmaParams {
        query_pre_attn_scalar: cfg.head_dim as f64,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        rope_local_theta: None,
    })
}

/// The eager decode step of `cfg` in its checkpoint dtype.
pub fn build(cfg: &ModelConfig, gen: Generation) -> Result<Graph, BuildError> {
    build_with(cfg, gen, &StepDims::default())
}

/// The eager step of `cfg` over `dims` (decode, or prefill of `dims.query` tokens).
pub fn build_with(
    cfg: &ModelConfig,
    gen: Generation,
    dims: &StepDims,
) -> Result<Graph, BuildError> {
    let p = params(cfg);
    let dt = cfg.dtype;
    let mut b = Builder::new(&cfg.name);
    b.set_layer_count(cfg.num_layers);
    let inputs = StepInputs::new(&mut b, dims, dt)?;
    let embed = Embedding::new(&mut b, step::EMBED, cfg.vocab_size, cfg.hidden_size, dt)?;
    let x = embed.forward(&mut b, inputs.input_ids)?;
    // `torch.tensor(hidden_size**0.5, dtype=hidden_states.dtype)`: the factor is
    // rounded to the activations' dtype before the multiply (sqrt(3584) is 59.867 in
    // f32 and 59.75 in bf16).
    let normalizer = f64::from(round_to(dt, (cfg.hidden_size as f64).sqrt() as f32));
    let global = |b: &mut Builder| {
        RopeTables::scaled(
            b,
            inputs.position_ids,
            cfg.rope_theta,
            cfg.rope_scaling,
            cfg.head_dim,
            dims,
            dt,
        )
    };
    // Gemma 2 builds its one RoPE table before scaling the embeddings; Gemma 3 scales
    // in the embedding and builds a table per layer type, in the order of
    // `layer_types`.
    let (x, ropes) = match p.rope_local_theta {
        None => {
            let rope = global(&mut b)?;
            let x = b.binary_scalar(BinaryOp::Mul, x, normalizer)?;
            (
                x,
                LayerRopes {
                    global: rope,
                    local: rope,
                },
            )
        }
        Some(local_theta) => {
            let x = b.binary_scalar(BinaryOp::Mul, x, normalizer)?;
            let local = |b: &mut Builder| {
                RopeTables::new(b, inputs.position_ids, local_theta, cfg.head_dim, dims, dt)
            };
            let local_first = cfg.layer_type(0) == LayerType::Sliding;
            let ropes = if local_first {
                let l = local(&mut b)?;
                LayerRopes {
                    local: l,
                    global: global(&mut b)?,
                }
            } else {
                let g = global(&mut b)?;
                LayerRopes {
                    global: g,
                    local: local(&mut b)?,
                }
            };
            (x, ropes)
        }
    };
    let mut x = x;
    for layer in 0..cfg.num_layers {
        b.set_layer(Some(layer as u32));
        let window = cfg.layer_window(layer);
        // The RoPE follows the layer's type (`Gemma3TextModel.forward`), the window
        // the type and `sliding_window`.
        let rope = match cfg.layer_type(layer) {
            LayerType::Sliding => &ropes.local,
            LayerType::Full => &ropes.global,
        };
        let scores = Scores {
            scale: p.query_pre_attn_scalar.powf(-0.5),
            softcap: p.attn_logit_softcapping.filter(|_| gen.attn_softcap()),
            window,
        };
        x = decoder_layer(
            &mut b,
            cfg,
            gen,
            layer,
            x,
            rope,
            &scores,
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
    let h = norm.forward_offset_weight(&mut b, x)?;
    let h = dims.head_rows(&mut b, h)?;
    let head = LmHead::of_model(&mut b, &embed, cfg, dt)?;
    let mut logits = head.forward(&mut b, h)?;
    if let Some(c) = p.final_logit_softcapping {
        logits = soft_cap(&mut b, logits, c)?;
    }
    greedy_outputs(&mut b, logits)?;
    Ok(b.finish())
}

/// The RoPE tables of the global and the sliding layers (the same tables for Gemma 2).
struct LayerRopes {
    global: RopeTables,
    local: RopeTables,
}

/// A Gemma norm of this layer, `module`, over `dim`.
fn norm(
    b: &mut Builder,
    cfg: &ModelConfig,
    layer: u64,
    module: &str,
    dim: u64,
) -> Result<RmsNorm, BuildError> {
    let name = step::layer_weight(layer, module);
    RmsNorm::new(b, &name, dim, cfg.rms_norm_eps, cfg.dtype)
}

/// `Gemma2DecoderLayer.forward` (and Gemma 3's): norms before and after each
/// sublayer, the residual added after the post-norm.
#[allow(clippy::too_many_arguments)]
fn decoder_layer(
    b: &mut Builder,
    cfg: &ModelConfig,
    gen: Generation,
    layer: u64,
    x: NodeId,
    rope: &RopeTables,
    scores: &Scores,
    mask: NodeId,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let d = cfg.hidden_size;
    let n = norm(b, cfg, layer, "input_layernorm", d)?.forward_offset_weight(b, x)?;
    let o = attention(b, cfg, gen, layer, n, rope, scores, mask, dims)?;
    let o = norm(b, cfg, layer, "post_attention_layernorm", d)?.forward_offset_weight(b, o)?;
    let x = b.binary(BinaryOp::Add, x, o)?;
    let n = norm(b, cfg, layer, "pre_feedforward_layernorm", d)?.forward_offset_weight(b, x)?;
    let mlp = GatedMlp {
        activation: UnaryOp::GeluTanh,
        ..GatedMlp::llama(cfg, layer)
    };
    let m = mlp.forward(b, n)?;
    let m = norm(b, cfg, layer, "post_feedforward_layernorm", d)?.forward_offset_weight(b, m)?;
    b.binary(BinaryOp::Add, x, m)
}

/// `Gemma2Attention.forward` / `Gemma3Attention.forward`: the projections split into
/// heads, Gemma 3's per-head q/k norms, RoPE, the cache append, eager attention with
/// Gemma's scale (and Gemma 2's soft-cap), and `o_proj`.
#[allow(clippy::too_many_arguments)]
fn attention(
    b: &mut Builder,
    cfg: &ModelConfig,
    gen: Generation,
    layer: u64,
    x: NodeId,
    rope: &RopeTables,
    scores: &Scores,
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
    for (module, role, count) in [
        ("q_proj", WeightRole::Query, h),
        ("k_proj", WeightRole::Key, kv),
        ("v_proj", WeightRole::Value, kv),
    ] {
        let p = att.projection(b, module, role, count * hd, d, false)?;
        let y = p.forward(b, x)?;
        qkv.push(split_heads(b, y, count, hd, dims)?);
    }
    let (mut q, mut k) = (qkv[0], qkv[1]);
    if gen.qk_norm() {
        q = norm(b, cfg, layer, "self_attn.q_norm", hd)?.forward_offset_weight(b, q)?;
        k = norm(b, cfg, layer, "self_attn.k_norm", hd)?.forward_offset_weight(b, k)?;
    }
    let (q, k) = rope.apply(b, q, k)?;
    let o = attend(b, layer, (q, k, qkv[2]), mask, &att.heads, dims, scores)?;
    let o_proj = att.projection(b, "o_proj", WeightRole::AttnOut, d, h * hd, false)?;
    o_proj.forward(b, o)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fusec_ir::{verify, DType, WeightRole};

    use super::*;
    use crate::arch::parse_hf_config as parse;

    const GEMMA2: &str = r#"{"model_type": "gemma2", "hidden_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "intermediate_size": 48, "vocab_size": 64, "max_position_embeddings": 64,
        "sliding_window": 16, "query_pre_attn_scalar": 8}"#;

    const GEMMA3: &str = r#"{"model_type": "gemma3_text", "hidden_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "intermediate_size": 48, "vocab_size": 64, "max_position_embeddings": 64,
        "sliding_window": 16, "sliding_window_pattern": 2,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0}"#;

    fn expected_role(name: &str) -> Option<WeightRole> {
        let role = match name.rsplit('.').nth(1)? {
            "embed_tokens" => WeightRole::Embedding,
            "norm"
            | "q_norm"
            | "k_norm"
            | "input_layernorm"
            | "post_attention_layernorm"
            | "pre_feedforward_layernorm"
            | "post_feedforward_layernorm" => WeightRole::Norm,
            "q_proj" => WeightRole::Query,
            "k_proj" => WeightRole::Key,
            "v_proj" => WeightRole::Value,
            "o_proj" => WeightRole::AttnOut,
            "gate_proj" => WeightRole::Gate,
            "up_proj" => WeightRole::Up,
            "down_proj" => WeightRole::Down,
            _ => return None,
        };
        Some(role)
    }

    #[test]
    fn gemma2_defaults_and_every_weight_role() {
        let spec = parse(Path::new("g/config.json"), GEMMA2).expect("parses");
        assert_eq!(spec.architecture, "gemma2");
        let m = &spec.model;
        let g = m.gemma.expect("gemma params");
        assert_eq!(g.attn_logit_softcapping, Some(50.0));
        assert_eq!(g.final_logit_softcapping, Some(30.0));
        assert!(m.tie_word_embeddings);
        assert_eq!(m.layer_window(0), Some(16));
        assert_eq!(m.layer_window(1), None);
        assert_eq!(m.layer_window(2), Some(16));
        // The default context is not bounded by the window: windowed layers hold rings.
        assert_eq!(spec.decode.context, 64);
        for dtype in [DType::F32, DType::Bf16] {
            let cfg = ModelConfig { dtype, ..m.clone() };
            let graph = Gemma2.build(&cfg).expect("builds");
            verify(&graph).expect("verifies");
            // embed (tied), final norm, 11 per layer (7 projections, 4 norms).
            assert_eq!(graph.weights().len(), 2 + 11 * 4);
            for (_, name) in graph.weights() {
                assert_eq!(graph.weight_role(name), expected_role(name), "{name}");
            }
            let text = fusec_ir::text::print(&graph).expect("prints");
            // Attention soft-cap per layer, and the final one.
            assert_eq!(text.matches("unary.tanh").count(), 4 + 1, "{text}");
            assert_eq!(text.matches("unary.gelu_tanh").count(), 4);
        }
    }

    #[test]
    fn null_soft_caps_turn_them_off() {
        let json = GEMMA2.replace(
            "\"sliding_window\": 16",
            "\"sliding_window\": 16, \"attn_logit_softcapping\": null, \"final_logit_softcapping\": null",
        );
        let spec = parse(Path::new("g/config.json"), &json).expect("parses");
        let g = spec.model.gemma.expect("gemma params");
        assert_eq!(g.attn_logit_softcapping, None);
        assert_eq!(g.final_logit_softcapping, None);
        let text =
            fusec_ir::text::print(&Gemma2.build(&spec.model).expect("builds")).expect("prints");
        assert!(!text.contains("unary.tanh"), "{text}");
    }

    #[test]
    fn gemma3_q_k_norms_and_two_ropes() {
        let spec = parse(Path::new("g/config.json"), GEMMA3).expect("parses");
        assert_eq!(spec.architecture, "gemma3_text");
        let m = &spec.model;
        let g = m.gemma.expect("gemma params");
        assert_eq!(g.rope_local_theta, Some(10_000.0));
        assert_eq!(m.rope_theta, 1_000_000.0);
        assert_eq!(g.attn_logit_softcapping, None);
        let graph = Gemma3.build(m).expect("builds");
        verify(&graph).expect("verifies");
        assert_eq!(graph.weights().len(), 2 + 13 * 4);
        for (_, name) in graph.weights() {
            assert_eq!(graph.weight_role(name), expected_role(name), "{name}");
        }
        let text = fusec_ir::text::print(&graph).expect("prints");
        assert!(
            text.contains("rope.inv_freq{head_dim=8,theta=10000.0}"),
            "{text}"
        );
        assert!(
            text.contains("rope.inv_freq{head_dim=8,theta=1000000.0}"),
            "{text}"
        );
        assert!(!text.contains("unary.tanh"));
    }

    #[test]
    fn gemma3_nested_rope_parameters() {
        let json = GEMMA3.replace(
            "\"rope_theta\": 1000000.0, \"rope_local_base_freq\": 10000.0",
            r#""rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}"#,
        );
        let spec = parse(Path::new("g/config.json"), &json).expect("parses");
        assert_eq!(spec.model.rope_theta, 500_000.0);
        assert_eq!(
            spec.model.gemma.expect("params").rope_local_theta,
            Some(20_000.0)
        );
        let linear = json.replace(
            r#"{"rope_type": "default", "rope_theta": 500000.0}"#,
            r#"{"rope_type": "linear", "factor": 8.0, "rope_theta": 500000.0}"#,
        );
        let e = parse(Path::new("g/config.json"), &linear).expect_err("rejected");
        assert!(e.message.contains("rope_type `linear`"), "{e}");
        assert!(e.location.is_some(), "{e}");
    }

    #[test]
    fn unsupported_keys_are_rejected_by_name() {
        for (from, to, key) in [
            (
                "\"sliding_window\": 16",
                "\"sliding_window\": 16, \"hidden_activation\": \"gelu\"",
                "hidden_activation",
            ),
            (
                "\"sliding_window\": 16",
                "\"sliding_window\": 16, \"attention_bias\": true",
                "attention_bias",
            ),
            (
                "\"sliding_window\": 16",
                "\"sliding_window\": 16, \"use_bidirectional_attention\": true",
                "use_bidirectional_attention",
            ),
            (
                "\"sliding_window\": 16",
                "\"sliding_window\": 16, \"layer_types\": [\"sliding_attention\", \"chunked_attention\", \"full_attention\", \"full_attention\"]",
                "layer_types",
            ),
            (
                "\"sliding_window\": 16",
                "\"sliding_window\": 16, \"layer_types\": [\"sliding_attention\"]",
                "layer_types",
            ),
        ] {
            let json = GEMMA2.replace(from, to);
            let e = parse(Path::new("g/config.json"), &json).expect_err(key);
            assert!(e.message.contains(key), "{key}: {e}");
            assert!(e.location.is_some(), "{key}: {e}");
        }
    }
}
