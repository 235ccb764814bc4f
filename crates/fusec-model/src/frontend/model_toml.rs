//! The `model.toml` frontend. See README.md for the format. `[model] architecture`
//! names the architecture that builds the graph (default `llama`); the caller says
//! which names exist.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use fusec_ir::DType;

use super::config::{
    check, model_name_from, DecodeConfig, GemmaParams, LayerType, ModelConfig, ModelSpec,
    Precision, RopeScaling, TargetConfig, DEFAULT_ARCHITECTURE, DEFAULT_GPU,
};
use super::error::{english_list, ConfigError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    model: RawModel,
    decode: Option<RawDecode>,
    weights: Option<RawWeights>,
    target: Option<RawTarget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<Spanned<String>>,
    architecture: Option<Spanned<String>>,
    hidden_size: Spanned<i64>,
    num_layers: Spanned<i64>,
    num_heads: Spanned<i64>,
    num_kv_heads: Option<Spanned<i64>>,
    head_dim: Option<Spanned<i64>>,
    intermediate_size: Spanned<i64>,
    vocab_size: Spanned<i64>,
    rope_theta: Spanned<f64>,
    rms_norm_eps: Spanned<f64>,
    max_seq_len: Spanned<i64>,
    #[serde(default)]
    tie_word_embeddings: bool,
    dtype: Option<Spanned<String>>,
    sliding_window: Option<Spanned<i64>>,
    /// `full_attention` or `sliding_attention` per layer, as in Hugging Face's
    /// `layer_types`.
    layer_types: Option<Spanned<Vec<String>>>,
    rope_scaling: Option<RawRopeScaling>,
    gemma: Option<RawGemma>,
}

/// `[model.gemma]`: Gemma 2/3's keys, as `Gemma2Config` and `Gemma3TextConfig` name
/// them (`rope_local_base_freq` is Gemma 3's RoPE base of the sliding layers).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGemma {
    query_pre_attn_scalar: Spanned<f64>,
    attn_logit_softcapping: Option<Spanned<f64>>,
    final_logit_softcapping: Option<Spanned<f64>>,
    rope_local_base_freq: Option<Spanned<f64>>,
}

/// `[model.rope_scaling]`: the keys of Hugging Face's `rope_parameters` for a RoPE
/// type other than the default (only `llama3`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRopeScaling {
    rope_type: Spanned<String>,
    factor: Spanned<f64>,
    low_freq_factor: Spanned<f64>,
    high_freq_factor: Spanned<f64>,
    original_max_position_embeddings: Spanned<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDecode {
    batch: Option<Spanned<i64>>,
    context: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeights {
    path: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    gpu: Option<Spanned<String>>,
    precision: Option<Spanned<String>>,
}

/// Parses `model.toml` text; `path` is used for messages and relative weight paths.
/// `architectures` are the names `[model] architecture` may take.
pub fn parse(path: &Path, src: &str, architectures: &[&str]) -> Result<ModelSpec, ConfigError> {
    let raw: RawFile = toml::from_str(src).map_err(|e| match e.span() {
        Some(span) => ConfigError::at(path, src, span.start, e.message().trim()),
        None => ConfigError::new(path, e.message().trim()),
    })?;
    let m = raw.model;
    // Where each checked key's value is, so cross-field errors point at it.
    let mut spans: HashMap<&'static str, usize> = HashMap::new();
    let mut size = |key: &'static str, v: &Spanned<i64>| -> Result<u64, ConfigError> {
        spans.insert(key, v.span().start);
        u64::try_from(*v.get_ref())
            .ok()
            .filter(|&x| x > 0)
            .ok_or_else(|| {
                ConfigError::at(
                    path,
                    src,
                    v.span().start,
                    format!("`{key}` must be positive, got {}", v.get_ref()),
                )
            })
    };
    let architecture = match &m.architecture {
        Some(a) if !architectures.contains(&a.get_ref().as_str()) => {
            let known: Vec<String> = architectures.iter().map(|n| format!("\"{n}\"")).collect();
            return Err(ConfigError::at(
                path,
                src,
                a.span().start,
                format!(
                    "unsupported architecture `{}` (fusec compiles {})",
                    a.get_ref(),
                    english_list(&known)
                ),
            ));
        }
        Some(a) => a.get_ref().clone(),
        None => DEFAULT_ARCHITECTURE.to_string(),
    };
    let hidden_size = size("hidden_size", &m.hidden_size)?;
    let num_layers = size("num_layers", &m.num_layers)?;
    let num_heads = size("num_heads", &m.num_heads)?;
    let num_kv_heads = match &m.num_kv_heads {
        Some(v) => size("num_kv_heads", v)?,
        None => num_heads,
    };
    let head_dim = match &m.head_dim {
        Some(v) => size("head_dim", v)?,
        None => {
            if hidden_size % num_heads != 0 {
                return Err(ConfigError::at(
                    path,
                    src,
                    m.num_heads.span().start,
                    format!(
                        "hidden_size ({hidden_size}) is not divisible by num_heads ({num_heads}); give head_dim explicitly"
                    ),
                ));
            }
            hidden_size / num_heads
        }
    };
    let intermediate_size = size("intermediate_size", &m.intermediate_size)?;
    let vocab_size = size("vocab_size", &m.vocab_size)?;
    let max_seq_len = size("max_seq_len", &m.max_seq_len)?;
    let sliding_window = m
        .sliding_window
        .as_ref()
        .map(|v| size("sliding_window", v))
        .transpose()?;
    let layer_types = match &m.layer_types {
        None => Vec::new(),
        Some(types) => {
            types
                .get_ref()
                .iter()
                .map(|name| {
                    LayerType::parse(name).ok_or_else(|| {
                        ConfigError::at(
                            path,
                            src,
                            types.span().start,
                            format!(
                                "unsupported layer type `{name}` in `layer_types` (expected full_attention or sliding_attention)"
                            ),
                        )
                    })
                })
                .collect::<Result<_, _>>()?
        }
    };
    let rope_scaling = match &m.rope_scaling {
        None => None,
        Some(r) => Some(rope_scaling(path, src, r)?),
    };
    let dtype = match &m.dtype {
        Some(d) => d
            .get_ref()
            .parse::<DType>()
            .map_err(|e| ConfigError::at(path, src, d.span().start, e.to_string()))?,
        None => DType::F32,
    };

    let decode = raw.decode.unwrap_or(RawDecode {
        batch: None,
        context: None,
    });
    let batch = decode
        .batch
        .as_ref()
        .map(|v| size("batch", v))
        .transpose()?
        .unwrap_or(1);
    let context = decode
        .context
        .as_ref()
        .map(|v| size("context", v))
        .transpose()?
        .unwrap_or_else(|| max_seq_len.min(1024));

    let gemma = match &m.gemma {
        None => None,
        Some(g) => {
            let positive = |key: &str, v: &Spanned<f64>| -> Result<f64, ConfigError> {
                let x = *v.get_ref();
                if x.is_finite() && x > 0.0 {
                    Ok(x)
                } else {
                    Err(ConfigError::at(
                        path,
                        src,
                        v.span().start,
                        format!("`{key}` must be a positive number, got {x}"),
                    ))
                }
            };
            Some(GemmaParams {
                query_pre_attn_scalar: positive("query_pre_attn_scalar", &g.query_pre_attn_scalar)?,
                attn_logit_softcapping: g
                    .attn_logit_softcapping
                    .as_ref()
                    .map(|v| positive("attn_logit_softcapping", v))
                    .transpose()?,
                final_logit_softcapping: g
                    .final_logit_softcapping
                    .as_ref()
                    .map(|v| positive("final_logit_softcapping", v))
                    .transpose()?,
                rope_local_theta: g
                    .rope_local_base_freq
                    .as_ref()
                    .map(|v| positive("rope_local_base_freq", v))
                    .transpose()?,
            })
        }
    };
    spans.insert("rope_theta", m.rope_theta.span().start);
    if let Some(types) = &m.layer_types {
        spans.insert("layer_types", types.span().start);
    }
    spans.insert("rms_norm_eps", m.rms_norm_eps.span().start);
    if let Some(d) = &m.dtype {
        spans.insert("dtype", d.span().start);
    }

    let model = ModelConfig {
        name: match m.name {
            Some(n) => {
                spans.insert("name", n.span().start);
                n.into_inner()
            }
            None => path
                .file_stem()
                .map_or_else(|| "model".into(), |s| model_name_from(&s.to_string_lossy())),
        },
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size,
        vocab_size,
        rope_theta: *m.rope_theta.get_ref(),
        rms_norm_eps: *m.rms_norm_eps.get_ref(),
        max_seq_len,
        tie_word_embeddings: m.tie_word_embeddings,
        dtype,
        sliding_window,
        layer_types,
        rope_scaling,
        multipliers: None,
        gemma,
    };
    let decode = DecodeConfig { batch, context };
    check(&model, &decode).map_err(|(key, message)| match spans.get(key) {
        Some(&at) => ConfigError::at(path, src, at, message),
        None => ConfigError::new(path, message),
    })?;

    let mut target = TargetConfig {
        gpu: DEFAULT_GPU.to_string(),
        precision: Precision::of_dtype(dtype),
        gpu_at: None,
    };
    if let Some(t) = raw.target {
        if let Some(g) = t.gpu {
            let (line, column) = fusec_ir::text::line_col(src, g.span().start);
            target.gpu_at = Some(format!("{}:{line}:{column}", path.display()));
            target.gpu = g.into_inner();
        }
        if let Some(p) = t.precision {
            target.precision = Precision::parse(p.get_ref()).ok_or_else(|| {
                ConfigError::at(
                    path,
                    src,
                    p.span().start,
                    format!(
                        "unknown precision `{}` (expected one of {})",
                        p.get_ref(),
                        Precision::names()
                    ),
                )
            })?;
        }
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let weights = raw.weights.map(|w| base.join(w.path.get_ref()));
    Ok(ModelSpec {
        architecture,
        model,
        decode,
        target,
        weights,
        source: path.to_path_buf(),
    })
}

/// `[model.rope_scaling]` checked as the Hugging Face frontend checks `rope_parameters`
/// of type `llama3` (transformers' `_compute_llama3_parameters`).
fn rope_scaling(path: &Path, src: &str, r: &RawRopeScaling) -> Result<RopeScaling, ConfigError> {
    let at = |start: usize, message: String| ConfigError::at(path, src, start, message);
    let ty = r.rope_type.get_ref();
    if ty != "llama3" {
        return Err(at(
            r.rope_type.span().start,
            format!("rope_scaling.rope_type `{ty}` is not supported (fusec implements `llama3`; omit the table for the default RoPE)"),
        ));
    }
    let factor = *r.factor.get_ref();
    if !(factor.is_finite() && factor > 0.0) {
        return Err(at(
            r.factor.span().start,
            "`rope_scaling.factor` must be positive".into(),
        ));
    }
    let (low, high) = (*r.low_freq_factor.get_ref(), *r.high_freq_factor.get_ref());
    if !(low.is_finite() && low > 0.0 && high.is_finite() && high > low) {
        return Err(at(
            r.high_freq_factor.span().start,
            format!("`rope_scaling.high_freq_factor` ({high}) must exceed `low_freq_factor` ({low}) > 0"),
        ));
    }
    let original = *r.original_max_position_embeddings.get_ref();
    if original < 1 {
        return Err(at(
            r.original_max_position_embeddings.span().start,
            "`rope_scaling.original_max_position_embeddings` must be positive".into(),
        ));
    }
    Ok(RopeScaling::Llama3(fusec_ir::rope::Llama3Scaling {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: original as u64,
    }))
}
