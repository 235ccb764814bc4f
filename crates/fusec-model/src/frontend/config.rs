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
    /// The sliding attention window, in positions (transformers' `sliding_window`): a
    /// windowed layer's query at position `p` attends to the keys at `p - W < k <= p`
    /// only, and its KV cache is a ring of at most `W` positions.
    pub sliding_window: Option<u64>,
    /// Which layers the window applies to (transformers' `layer_types`); empty: every
    /// layer, when there is a window (Mistral). See [`ModelConfig::layer_window`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layer_types: Vec<LayerType>,
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

/// The attention of one decoder layer, as transformers' `layer_types` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum LayerType {
    /// `full_attention`: the whole cache.
    #[serde(rename = "full_attention")]
    Full,
    /// `sliding_attention`: the last `sliding_window` positions.
    #[serde(rename = "sliding_attention")]
    Sliding,
}

impl LayerType {
    /// The type of a `layer_types` entry, `None` for a name transformers does not use
    /// for decoder self-attention.
    pub fn parse(name: &str) -> Option<LayerType> {
        match name {
            "full_attention" => Some(LayerType::Full),
            "sliding_attention" => Some(LayerType::Sliding),
            _ => None,
        }
    }
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
        if self.layer_types.is_empty() {
            return match self.sliding_window {
                Some(_) => LayerType::Sliding,
                None => LayerType::Full,
            };
        }
        usize::try_from(layer)
            .ok()
            .and_then(|i| self.layer_types.get(i).copied())
            .unwrap_or(LayerType::Full)
    }

    /// The attention window of layer `layer`: `sliding_window` for a
    /// `sliding_attention` layer (every layer when `layer_types` is empty), `None` for
    /// a layer that attends to the whole cache.
    pub fn layer_window(&self, layer: u64) -> Option<u64> {
        let w = self.sliding_window?;
        match self.layer_type(layer) {
            LayerType::Sliding => Some(w),
            LayerType::Full => None,
        }
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
    /// 8-bit integer weights, one `f16` scale per block of 32 inputs (GGUF's Q8_0),
    /// in an `f32` graph.
    Int8,
    /// 4-bit integer weights, one `f16` scale per block of 32 inputs (GGUF's Q4_0),
    /// in an `f32` graph.
    Int4,
    /// 4-bit unsigned integer weights, an `f16` scale and an `f16` minimum per block
    /// of 32 inputs (GGUF's Q4_1), in an `f32` graph.
    Q4_1,
    /// 4-bit unsigned integer weights in super-blocks of 256 with 6-bit sub-block
    /// scales and minimums (GGUF's Q4_K), in an `f32` graph.
    Q4K,
    /// A GGUF file's tensors as they are: each GEMV weight in the file's own integer
    /// block format where fusec runs it natively (Q8_0, Q4_0, Q4_1, Q4_K), any other
    /// dequantized to `f32`; an `f32` graph.
    Gguf,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "f32" => Some(Precision::F32),
            "f16" => Some(Precision::F16),
            "bf16" => Some(Precision::Bf16),
            "fp8" => Some(Precision::Fp8),
            "int8" => Some(Precision::Int8),
            "int4" => Some(Precision::Int4),
            "q4_1" => Some(Precision::Q4_1),
            "q4_k" => Some(Precision::Q4K),
            "gguf" => Some(Precision::Gguf),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
            Precision::Q4_1 => "q4_1",
            Precision::Q4K => "q4_k",
            Precision::Gguf => "gguf",
        }
    }

    /// Every precision, in the order the CLI lists them.
    pub const ALL: [Precision; 9] = [
        Precision::F32,
        Precision::F16,
        Precision::Bf16,
        Precision::Fp8,
        Precision::Int8,
        Precision::Int4,
        Precision::Q4_1,
        Precision::Q4K,
        Precision::Gguf,
    ];

    /// The names of [`Precision::ALL`], comma-separated, for messages.
    pub fn names() -> String {
        Precision::ALL.map(Precision::name).join(", ")
    }

    /// Whether this precision stores GEMV weights as integer codes in blocks (a
    /// lowering of an `f32` graph).
    pub fn is_int(self) -> bool {
        matches!(
            self,
            Precision::Int8 | Precision::Int4 | Precision::Q4_1 | Precision::Q4K | Precision::Gguf
        )
    }

    /// The precision a checkpoint stored in `dtype` runs in by default.
    pub fn of_dtype(dtype: DType) -> Precision {
        // (Integer precisions are lowerings of an f32 graph, never a checkpoint's.)
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
    /// Where the description names `gpu` (`file:line:column`), for errors about it;
    /// `None` for the default or a GPU named on the command line.
    #[serde(skip)]
    pub gpu_at: Option<String>,
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

/// The largest sizes fusec accepts. Each bound is far above every published model
/// (Llama 3.1 405B: hidden 16384, 126 layers, 128 heads, vocabulary 128256, 131072
/// positions), and together with [`Limits::COUNT`] they keep every element, byte and
/// FLOP count the pipeline computes in 64-bit arithmetic clear of overflow: the
/// parameters, the KV cache, the attention scores and the FLOPs of a step each stay
/// within 2^53, so their bytes (at most 4 an element) fit in 2^55 and the step's totals,
/// sums of a few such, in 2^63.
#[derive(Debug, Clone, Copy)]
pub struct Limits;

impl Limits {
    pub const HIDDEN_SIZE: u64 = 1 << 20;
    pub const NUM_LAYERS: u64 = 1 << 12;
    pub const NUM_HEADS: u64 = 1 << 14;
    pub const HEAD_DIM: u64 = 1 << 14;
    pub const INTERMEDIATE_SIZE: u64 = 1 << 22;
    /// Token ids are `i32`.
    pub const VOCAB_SIZE: u64 = 1 << 24;
    /// `max_seq_len` and `context`.
    pub const POSITIONS: u64 = 1 << 24;
    /// Below CUDA's limit of 65535 blocks along a grid's y axis, where generated
    /// attention kernels put the sequences.
    pub const BATCH: u64 = 1 << 15;
    /// The most elements (or FLOPs) of any one derived quantity below.
    pub const COUNT: u128 = 1 << 53;

    /// The first derived count beyond [`Limits::COUNT`]: the key to lower, what the
    /// count is, and its value, computed in 128 bits so that it cannot wrap.
    pub fn derived(
        model: &ModelConfig,
        decode: &DecodeConfig,
    ) -> Option<(&'static str, &'static str, u128)> {
        let w = |v: u64| u128::from(v);
        let (d, l, h, kv, hd, i, v) = (
            w(model.hidden_size),
            w(model.num_layers),
            w(model.num_heads),
            w(model.num_kv_heads),
            w(model.head_dim),
            w(model.intermediate_size),
            w(model.vocab_size),
        );
        let (b, s) = (w(decode.batch), w(decode.context));
        let layer = d * (h + kv) * hd * 2 + 3 * d * i + 2 * d;
        let m = w(model.max_seq_len);
        let checks: [(&'static str, &'static str, u128); 8] = [
            ("vocab_size", "the embedding table's elements", v * d),
            ("num_layers", "the parameter count", l * layer + 2 * v * d),
            ("intermediate_size", "one layer's parameter count", layer),
            (
                "context",
                "the KV cache's elements",
                2 * l * b * s * kv * hd,
            ),
            // Generated kernels allocate each layer's cache at its capacity.
            (
                "max_seq_len",
                "one layer's KV cache at max_seq_len",
                b * m * kv * hd,
            ),
            ("context", "the attention scores' elements", l * b * h * s),
            (
                "batch",
                "the GEMV FLOPs of a step",
                2 * b * (l * layer + 2 * v * d),
            ),
            (
                "context",
                "the attention FLOPs of a step",
                4 * l * b * h * hd * s,
            ),
        ];
        checks.into_iter().find(|&(_, _, n)| n > Self::COUNT)
    }
}

/// Whether `name` can name a directory under an output root: one plain path
/// component, never `..` or an absolute path.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
}

/// A model name made from a file or directory name: every character
/// [`valid_model_name`] refuses becomes `_`, and leading dots go.
pub fn model_name_from(file_name: &str) -> String {
    let name: String = file_name
        .trim_start_matches('.')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if name.is_empty() {
        "model".into()
    } else {
        name
    }
}

/// Whether `v` is finite once rounded to f32, the widest precision the graph computes
/// in.
fn in_f32(v: f64) -> bool {
    v.is_finite() && v.abs() <= f64::from(f32::MAX)
}

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
    for (key, v, max) in [
        ("hidden_size", model.hidden_size, Limits::HIDDEN_SIZE),
        ("num_layers", model.num_layers, Limits::NUM_LAYERS),
        ("num_heads", model.num_heads, Limits::NUM_HEADS),
        ("num_kv_heads", model.num_kv_heads, Limits::NUM_HEADS),
        ("head_dim", model.head_dim, Limits::HEAD_DIM),
        (
            "intermediate_size",
            model.intermediate_size,
            Limits::INTERMEDIATE_SIZE,
        ),
        ("vocab_size", model.vocab_size, Limits::VOCAB_SIZE),
        ("max_seq_len", model.max_seq_len, Limits::POSITIONS),
        ("batch", decode.batch, Limits::BATCH),
        ("context", decode.context, Limits::POSITIONS),
    ] {
        if v > max {
            return Err((
                key,
                format!("`{key}` = {v} is beyond fusec's limit of {max}"),
            ));
        }
    }
    if let Some((key, what, count)) = Limits::derived(model, decode) {
        return Err((
            key,
            format!(
                "{what} would be {count}, beyond fusec's limit of {} (lower `{key}`)",
                Limits::COUNT
            ),
        ));
    }
    if !valid_model_name(&model.name) {
        return Err((
            "name",
            format!(
                "model name `{}` must be a plain name (letters, digits, `-`, `_`, `.` and `+`, not starting with `.`): it names the output directory",
                model.name.escape_debug()
            ),
        ));
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
    // RoPE's inverse frequencies are theta^(-2i/d) (Su et al., 2021, "RoFormer",
    // eq. 15): a base at or below 1 makes them grow with i, and a tiny one overflows
    // them to infinity, so the angles are no longer rotations the model was trained on.
    // The graph computes in f32 at most, so the base must be finite there too.
    if !(in_f32(model.rope_theta) && model.rope_theta > 1.0) {
        return Err((
            "rope_theta",
            format!(
                "`rope_theta` must be a number above 1 and finite in f32, got {:e}",
                model.rope_theta
            ),
        ));
    }
    // RMSNorm adds eps to the mean square (Zhang & Sennrich, 2019): a value of 1 or
    // more dominates it, and the published models use 1e-5 or 1e-6. It is added in
    // f32 (transformers' LlamaRMSNorm upcasts), where a value below the smallest
    // normal number rounds towards 0 and a zero input then divides by zero.
    if !(model.rms_norm_eps >= f64::from(f32::MIN_POSITIVE) && model.rms_norm_eps < 1.0) {
        return Err((
            "rms_norm_eps",
            format!(
                "`rms_norm_eps` must be a number in [1.2e-38, 1) (positive and normal in f32), got {:e}",
                model.rms_norm_eps
            ),
        ));
    }
    if let Some(m) = &model.multipliers {
        for (key, v) in [
            ("embedding_multiplier", m.embedding),
            ("attention_multiplier", m.attention),
            ("residual_multiplier", m.residual),
            ("logits_scaling", m.logits_scaling),
        ] {
            if !(in_f32(v) && v != 0.0) {
                return Err((
                    key,
                    format!("`{key}` must be a non-zero number, finite in f32, got {v:e}"),
                ));
            }
        }
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
    if !model.layer_types.is_empty() && model.layer_types.len() as u64 != model.num_layers {
        return Err((
            "layer_types",
            format!(
                "`layer_types` lists {} layer type(s) for {} layers",
                model.layer_types.len(),
                model.num_layers
            ),
        ));
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
