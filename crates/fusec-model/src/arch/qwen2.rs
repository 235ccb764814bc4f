//! Qwen2 and Qwen2.5 (Yang et al., 2024, "Qwen2 Technical Report"), op for op as
//! transformers' `Qwen2ForCausalLM` runs its decode step with eager attention
//! (models/qwen2/modeling_qwen2.py): Llama's decoder with a bias on the q, k and v
//! projections (`Qwen2Attention.__init__`: `bias=True` on `q_proj`, `k_proj` and
//! `v_proj`, `bias=False` on `o_proj`), implied by the model type rather than a key.
//!
//! The layer skeleton here is shared with [`super::qwen3`], whose attention adds a
//! per-head RMSNorm on q and k ([`QwenAttention::qk_norm`]).

use fusec_ir::{step, BinaryOp, Graph, NodeId, WeightRole};

use super::architecture::Architecture;
use crate::blocks::{
    attend, decoder_step, Attention, FinalNorm, GatedMlp, RmsNorm, RopeTables, Scores, StepDims,
};
use crate::build::{BuildError, Builder};
use crate::frontend::{decoder_config, ConfigError, HfConfig, LayerType, ModelConfig};

/// The Qwen2 architecture, `model_type` `qwen2` (Qwen2 and Qwen2.5).
#[derive(Clone, Copy, Debug, Default)]
pub struct Qwen2;

impl Architecture for Qwen2 {
    fn model_types(&self) -> &[&str] {
        &["qwen2"]
    }

    fn parse_hf_config(&self, config: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
        parse_qwen_config(config)
    }

    fn build(&self, model: &ModelConfig) -> Result<Graph, BuildError> {
        build(model, QwenAttentionKind::QKV_BIAS)
    }

    fn build_step(&self, model: &ModelConfig, dims: &StepDims) -> Result<Graph, BuildError> {
        build_with(model, QwenAttentionKind::QKV_BIAS, dims)
    }
}

/// The keys `Qwen2Config` and `Qwen3Config` share beyond Llama's: SiLU only, and the
/// sliding window as transformers' models/qwen2/configuration_qwen2.py reads it:
/// `sliding_window` only when `use_sliding_window` is true (`self.sliding_window =
/// sliding_window if self.use_sliding_window else None`), on the layers `layer_types`
/// names, by default those from `max_window_layers` on (`"sliding_attention" if
/// self.sliding_window is not None and i >= self.max_window_layers`).
pub fn parse_qwen_config(j: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
    if let Some(act) = j.string("hidden_act")? {
        if act != "silu" {
            return Err(j.err_at(
                "hidden_act",
                format!("unsupported hidden_act `{act}` (expected silu)"),
            ));
        }
    }
    // Qwen2-VL's multimodal RoPE (sections of the head rotated by different positions).
    if j.bool("use_mrope")? == Some(true) {
        return Err(j.err_at(
            "use_mrope",
            "`use_mrope` = true is not supported (fusec implements 1-D RoPE)".into(),
        ));
    }
    let mut model = decoder_config(j)?;
    if j.bool("use_sliding_window")? != Some(true) {
        model.sliding_window = None;
    } else if model.layer_types.is_empty() {
        // `Qwen2Config`'s default `max_window_layers`.
        let first_windowed = j.uint("max_window_layers")?.unwrap_or(28);
        model.layer_types = (0..model.num_layers)
            .map(|i| match i >= first_windowed {
                true => LayerType::Sliding,
                false => LayerType::Full,
            })
            .collect();
    }
    Ok(model)
}

/// What a Qwen attention adds to Llama's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QwenAttentionKind {
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// A bias on o.
    pub o_bias: bool,
    /// Qwen3's per-head RMSNorm on q and k, before RoPE.
    pub qk_norm: bool,
}

impl QwenAttentionKind {
    /// Qwen2's.
    pub const QKV_BIAS: Self = Self {
        qkv_bias: true,
        o_bias: false,
        qk_norm: false,
    };
}

/// A Qwen attention layer: [`Attention`]'s projections, optionally with Qwen3's
/// `q_norm` and `k_norm` (`Qwen3RMSNorm(head_dim)`) on each head of q and k, applied
/// after `view(hidden_shape)` and before `transpose(1, 2)` and RoPE
/// (`Qwen3Attention.forward`).
#[derive(Clone, Debug, PartialEq)]
pub struct QwenAttention {
    pub base: Attention,
    pub qk_norm: bool,
    pub eps: f64,
}

impl QwenAttention {
    pub fn new(cfg: &ModelConfig, layer: u64, kind: QwenAttentionKind) -> Self {
        let mut base = Attention::llama(cfg, layer);
        base.qkv_bias = kind.qkv_bias;
        base.o_bias = kind.o_bias;
        Self {
            base,
            qk_norm: kind.qk_norm,
            eps: cfg.rms_norm_eps,
        }
    }

    /// `x` `[B,1,hidden]` to the attention output `[B,1,hidden]`.
    pub fn forward(
        &self,
        b: &mut Builder,
        x: NodeId,
        rope: &RopeTables,
        mask: NodeId,
        dims: &StepDims,
    ) -> Result<NodeId, BuildError> {
        let a = &self.base;
        let (h, kv, hd) = (a.heads.num_heads, a.heads.num_kv_heads, a.heads.head_dim);
        let d = a.hidden_size;
        let mut qkv = Vec::with_capacity(3);
        for (module, norm, role, count) in [
            ("q_proj", Some("q_norm"), WeightRole::Query, h),
            ("k_proj", Some("k_norm"), WeightRole::Key, kv),
            ("v_proj", None, WeightRole::Value, kv),
        ] {
            let p = a.projection(b, module, role, count * hd, d, a.qkv_bias)?;
            let y = p.forward(b, x)?;
            // .view(B, T, heads, head_dim)
            let y = b.reshape(
                y,
                fusec_ir::Shape(vec![
                    dims.batch.clone(),
                    dims.query_len(),
                    fusec_ir::Dim::Fixed(count),
                    fusec_ir::Dim::Fixed(hd),
                ]),
            )?;
            let y = match norm.filter(|_| self.qk_norm) {
                Some(norm) => {
                    let name = step::layer_weight(a.layer, &format!("self_attn.{norm}"));
                    RmsNorm::new(b, &name, hd, self.eps, a.dtype)?.forward(b, y)?
                }
                None => y,
            };
            qkv.push(b.transpose(y, 1, 2)?);
        }
        let (q, k, v) = (qkv[0], qkv[1], qkv[2]);
        let (q, k) = rope.apply(b, q, k)?;
        let scores = Scores {
            scale: (a.heads.head_dim as f64).powf(-0.5),
            softcap: None,
            window: a.window,
        };
        let o = attend(b, a.layer, (q, k, v), mask, &a.heads, dims, &scores)?;
        let o_proj = a.projection(b, "o_proj", WeightRole::AttnOut, d, h * hd, a.o_bias)?;
        o_proj.forward(b, o)
    }
}

/// The eager decode step of a Qwen model in its checkpoint dtype: Llama's skeleton
/// (`Qwen2Model.forward`, `Qwen2DecoderLayer.forward`) with `kind`'s attention.
pub fn build(cfg: &ModelConfig, kind: QwenAttentionKind) -> Result<Graph, BuildError> {
    build_with(cfg, kind, &StepDims::default())
}

/// The eager step of `cfg` over `dims` (decode, or prefill of `dims.query` tokens).
pub fn build_with(
    cfg: &ModelConfig,
    kind: QwenAttentionKind,
    dims: &StepDims,
) -> Result<Graph, BuildError> {
    let (d, eps, dt) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype);
    decoder_step(
        cfg,
        dims,
        FinalNorm::Llama,
        &mut |b, layer, x, rope, mask| {
            let norm = RmsNorm::new(b, &step::layer_weight(layer, "input_layernorm"), d, eps, dt)?;
            let n = norm.forward(b, x)?;
            let o = QwenAttention::new(cfg, layer, kind).forward(b, n, rope, mask, dims)?;
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
        },
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fusec_ir::{verify, WeightRole};

    use super::*;
    use crate::arch::parse_hf_config;

    const JSON: &str = r#"{"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
        "vocab_size": 64, "use_sliding_window": false, "sliding_window": 131072,
        "max_window_layers": 28, "hidden_act": "silu"}"#;

    #[test]
    fn biases_on_q_k_v_not_o() {
        let spec = parse_hf_config(Path::new("q/config.json"), JSON).expect("parses");
        assert_eq!(spec.architecture, "qwen2");
        assert_eq!(spec.model.sliding_window, None);
        let g = Qwen2.build(&spec.model).expect("builds");
        verify(&g).expect("verifies");
        // embed, final norm, lm_head, and 9 weights + 3 biases per layer.
        assert_eq!(g.weights().len(), 3 + 12 * 2);
        for (_, name) in g.weights() {
            let role = g.weight_role(name).expect("a role");
            if name.ends_with(".bias") {
                assert_eq!(role, WeightRole::Bias, "{name}");
                assert!(!name.contains("o_proj"), "{name}");
            }
        }
    }

    #[test]
    fn use_sliding_window_windows_the_layers_from_max_window_layers_on() {
        let path = Path::new("q/config.json");
        let on = JSON
            .replace(
                "\"use_sliding_window\": false",
                "\"use_sliding_window\": true",
            )
            .replace("\"sliding_window\": 131072", "\"sliding_window\": 16")
            .replace("\"max_window_layers\": 28", "\"max_window_layers\": 1");
        let spec = parse_hf_config(path, &on).expect("parses");
        assert_eq!(spec.model.layer_window(0), None);
        assert_eq!(spec.model.layer_window(1), Some(16));
        let g = Qwen2.build(&spec.model).expect("builds");
        verify(&g).expect("verifies");
        let key = |layer: u64| {
            let (id, _, _) = g
                .inputs()
                .into_iter()
                .find(|(_, n, _)| *n == step::past_key(layer))
                .expect("a key cache");
            g.ty(id).to_string()
        };
        assert_eq!(key(0), "f32[B,2,S,8]");
        assert_eq!(key(1), "f32[B,2,min(S,16),8]");
        // Without `use_sliding_window`, no layer is windowed.
        let spec = parse_hf_config(path, JSON).expect("parses");
        assert!((0..2).all(|l| spec.model.layer_window(l).is_none()));
        let bad = JSON.replace(
            "\"hidden_act\"",
            "\"layer_types\": [\"chunked_attention\", \"full_attention\"], \"hidden_act\"",
        );
        let e = parse_hf_config(path, &bad).expect_err("rejected");
        assert!(e.message.contains("`layer_types`"), "{e}");
    }
}
