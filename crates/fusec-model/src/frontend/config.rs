//! The validated model description shared by both frontends.

use std::path::PathBuf;

use fusec_ir::DType;

use super::error::ConfigError;

/// The architecture hyper-parameters of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub name: String,
    pub hidden_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub intermediate_size: u64,
    pub vocab_size: u64,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_seq_len: u64,
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint is stored and run in eagerly.
    pub dtype: DType,
    /// The sliding attention window, if any (Mistral, Gemma 2/3): contexts beyond it
    /// are rejected, since the decode graph attends to the whole cache.
    pub sliding_window: Option<u64>,
    /// Which layers attend through the window (transformers' `layer_types`, Gemma 2
    /// and 3 alternate windowed and global layers); `None`: every layer does when
    /// `sliding_window` is set (Mistral).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<LayerType>>,
    /// A scaling of the RoPE inverse frequencies (none: the default RoPE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Granite's scalar multipliers (transformers' `GraniteConfig`); `None` for the
    /// families that have none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multipliers: Option<Multipliers>,
    /// Gemma 2/3's attention scale, soft-capping and local RoPE base; `None` for the
    /// families that have none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gemma: Option<GemmaParams>,
}

/// How a layer attends: transformers' `layer_types` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    /// `sliding_attention`: the last `sliding_window` positions.
    SlidingAttention,
    /// `full_attention`: the whole context.
    FullAttention,
}

impl LayerType {
    /// The type `name` spells in `layer_types`, if fusec knows it.
    pub fn parse(name: &str) -> Option<LayerType> {
        match name {
            "sliding_attention" => Some(LayerType::SlidingAttention),
            "full_attention" => Some(LayerType::FullAttention),
            _ => None,
        }
    }
}

/// What Gemma 2 (transformers' `Gemma2Config`, models/gemma2/modeling_gemma2.py) and
/// Gemma 3 (`Gemma3TextConfig`, models/gemma3/modeling_gemma3.py) add to the shared
/// decoder keys.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct GemmaParams {
    /// The attention scores are scaled by `query_pre_attn_scalar^-0.5` instead of
    /// `head_dim^-0.5` (`Gemma2Attention.scaling`).
    pub query_pre_attn_scalar: f64,
    /// `scores = tanh(scores / c) * c` before the mask (`eager_attention_forward`'s
    /// `softcap`); `None`: no capping.
    pub attn_logit_softcapping: Option<f64>,
    /// `logits = tanh(logits / c) * c` after the LM head; `None`: no capping.
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 3's RoPE base of the sliding layers (`rope_local_base_freq`, or
    /// `rope_parameters.sliding_attention.rope_theta`); `None`: one RoPE for every
    /// layer (Gemma 2).
    pub rope_local_theta: Option<f64>,
}

/// A RoPE type other than the default: how the inverse frequencies are scaled.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Llama 3.1's frequency bands (transformers' `_compute_llama3_parameters`).
    Llama3(fusec_ir::rope::Llama3Scaling),
}

/// The scalars transformers' `GraniteModel` and `GraniteForCausalLM` apply
/// (models/granite/modeling_granite.py): the embeddings times `embedding`, attention
/// scores times `attention` (instead of `head_dim^-0.5`), each sublayer's output times
/// `residual` before its residual add, the logits divided by `logits_scaling`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Multipliers {
    pub embedding: f64,
    pub attention: f64,
    pub residual: f64,
    pub logits_scaling: f64,
}

impl Default for Multipliers {
    /// `GraniteConfig`'s defaults: every multiplier 1.
    fn default() -> Self {
        Self {
            embedding: 1.0,
            attention: 1.0,
            residual: 1.0,
            logits_scaling: 1.0,
        }
    }
}

impl ModelConfig {
    /// How layer `layer` attends: its `layer_types` entry, or, without `layer_types`,
    /// through the window when there is one (Mistral).
    pub fn layer_type(&self, layer: u64) -> LayerType {
        match &self.layer_types {
            Some(types) => types
                .get(layer as usize)
                .copied()
                .unwrap_or(LayerType::FullAttention),
            None if self.sliding_window.is_some() => LayerType::SlidingAttention,
            None => LayerType::FullAttention,
        }
    }

    /// The window of layer `layer`'s attention: `sliding_window` for a windowed layer,
    /// `None` for a global one. This is what a windowed attention kernel would bound
    /// its keys by; the decode graph still attends to the whole cache (see
    /// [`ModelConfig::context_window`]).
    pub fn layer_window(&self, layer: u64) -> Option<u64> {
        let w = self.sliding_window?;
        match self.layer_type(layer) {
            LayerType::SlidingAttention => Some(w),
            LayerType::FullAttention => None,
        }
    }

    /// The longest context the decode graph computes exactly: the sliding window when
    /// any layer has one (its graph attends to the whole cache, which equals the
    /// windowed attention only while the context fits in the window).
    pub fn context_window(&self) -> Option<u64> {
        (0..self.num_layers).find_map(|l| self.layer_window(l))
    }

    /// Query heads per KV head (the GQA group size).
    pub fn group_size(&self) -> u64 {
        self.num_heads / self.num_kv_heads
    }

    /// Parameters, counting the embedding table (and lm_head unless tied).
    pub fn parameter_count(&self) -> u64 {
        let (d, h, kv, hd, i, v) = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.vocab_size,
        );
        let attn = d * h * hd * 2 + d * kv * hd * 2;
        let mlp = 3 * d * i;
        let layer = attn + mlp + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        self.num_layers * layer + v * d + head + d
    }
}

/// The decode step costs are reported for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DecodeConfig {
    /// Sequences decoded together.
    pub batch: u64,
    /// KV length after the step (the cache held `context - 1` positions before it).
    pub context: u64,
}

/// Compute precision of the compiled step.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
    Fp8,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "f32" => Some(Precision::F32),
            "f16" => Some(Precision::F16),
            "bf16" => Some(Precision::Bf16),
            "fp8" => Some(Precision::Fp8),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }

    /// The precision a checkpoint stored in `dtype` runs in by default.
    pub fn of_dtype(dtype: DType) -> Precision {
        match dtype {
            DType::F16 => Precision::F16,
            DType::Bf16 => Precision::Bf16,
            _ => Precision::F32,
        }
    }
}

/// The hardware and precision to compile for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TargetConfig {
    pub gpu: String,
    pub precision: Precision,
}

/// Everything a frontend reads from a model description.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelSpec {
    /// The architecture that builds the graph: a `model_type` registered in
    /// [`crate::arch::Registry`] (`config.json`'s `model_type`, `model.toml`'s
    /// `architecture`).
    pub architecture: String,
    pub model: ModelConfig,
    pub decode: DecodeConfig,
    pub target: TargetConfig,
    /// A safetensors file or a Hugging Face model directory, resolved against the
    /// description's directory.
    pub weights: Option<PathBuf>,
    /// The file the description came from.
    pub source: PathBuf,
}

/// The default GPU for cost estimates.
pub const DEFAULT_GPU: &str = "h100-sxm";

/// The architecture of a description that names none (transformers' `LlamaConfig` is
/// the base every Llama-family config extends).
pub const DEFAULT_ARCHITECTURE: &str = "llama";

/// Cross-field checks shared by both frontends. Each error names the field at fault
/// (returned as its key, so the caller can point at it in the file).
pub(super) fn check(
    model: &ModelConfig,
    decode: &DecodeConfig,
) -> Result<(), (&'static str, String)> {
    for (key, v) in [
        ("hidden_size", model.hidden_size),
        ("num_layers", model.num_layers),
        ("num_heads", model.num_heads),
        ("num_kv_heads", model.num_kv_heads),
        ("head_dim", model.head_dim),
        ("intermediate_size", model.intermediate_size),
        ("vocab_size", model.vocab_size),
        ("max_seq_len", model.max_seq_len),
        ("batch", decode.batch),
        ("context", decode.context),
    ] {
        if v == 0 {
            return Err((key, format!("`{key}` must be positive")));
        }
    }
    if !model.num_heads.is_multiple_of(model.num_kv_heads) {
        return Err((
            "num_kv_heads",
            format!(
                "num_heads ({}) is not a multiple of num_kv_heads ({})",
                model.num_heads, model.num_kv_heads
            ),
        ));
    }
    if !model.head_dim.is_multiple_of(2) {
        return Err((
            "head_dim",
            format!(
                "head_dim ({}) must be even for rotary embeddings",
                model.head_dim
            ),
        ));
    }
    if !(model.rope_theta.is_finite() && model.rope_theta > 0.0) {
        return Err((
            "rope_theta",
            "`rope_theta` must be a positive number".into(),
        ));
    }
    if !(model.rms_norm_eps.is_finite() && model.rms_norm_eps > 0.0) {
        return Err((
            "rms_norm_eps",
            "`rms_norm_eps` must be a positive number".into(),
        ));
    }
    if !matches!(model.dtype, DType::F32 | DType::F16 | DType::Bf16) {
        return Err((
            "dtype",
            format!(
                "checkpoint dtype must be f32, f16 or bf16, got {}",
                model.dtype
            ),
        ));
    }
    if decode.context > model.max_seq_len {
        return Err((
            "context",
            format!(
                "context {} is beyond max_seq_len {}",
                decode.context, model.max_seq_len
            ),
        ));
    }
    if let Some(types) = &model.layer_types {
        if types.len() as u64 != model.num_layers {
            return Err((
                "layer_types",
                format!(
                    "`layer_types` has {} entries for {} layers",
                    types.len(),
                    model.num_layers
                ),
            ));
        }
    }
    if let Some(w) = model.context_window() {
        if decode.context > w {
            return Err((
                "context",
                format!(
                    "context {} is beyond the sliding window ({w}); fusec attends to the whole cache",
                    decode.context
                ),
            ));
        }
    }
    Ok(())
}

impl ModelSpec {
    /// Overrides the decode batch and/or context (from the command line) and checks
    /// the result as the frontends do.
    pub fn set_decode(
        &mut self,
        batch: Option<u64>,
        context: Option<u64>,
    ) -> Result<(), ConfigError> {
        if let Some(b) = batch {
            self.decode.batch = b;
        }
        if let Some(c) = context {
            self.decode.context = c;
        }
        check(&self.model, &self.decode).map_err(|(key, message)| {
            ConfigError::new(
                &self.source,
                format!("{message} (--{key} on the command line or in the file)"),
            )
        })
    }
}
