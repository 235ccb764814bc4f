//! The Hugging Face `config.json` frontend, for both the transformers 4.x and 5.x
//! spellings (`rope_theta` or `rope_parameters.rope_theta`, `torch_dtype` or `dtype`).
//! Keys fusec does not use are ignored, as transformers ignores them; keys it uses are
//! type-checked, and settings an architecture cannot honour are rejected by it rather
//! than silently dropped.
//!
//! [`HfConfig`] is the parsed file with typed, positioned getters; an architecture
//! reads its keys through it ([`crate::arch::Architecture::parse_hf_config`]), usually
//! starting from [`decoder_config`], the keys every Llama-style decoder shares
//! (transformers' `LlamaConfig`). [`spec_from_hf`] completes the [`ModelSpec`].

use std::path::Path;

use fusec_ir::rope::Llama3Scaling;
use fusec_ir::DType;
use serde_json::{Map, Value};

use super::config::{
    check, model_name_from, DecodeConfig, LayerType, ModelConfig, ModelSpec, Precision,
    RopeScaling, TargetConfig, DEFAULT_GPU,
};
use super::error::ConfigError;

/// A `config.json`'s keys, with the source for pointing at them.
#[derive(Debug)]
pub struct HfConfig<'a> {
    path: &'a Path,
    src: &'a str,
    root: serde_json::Map<String, Value>,
    /// For a configuration mapped from another format (a GGUF file's metadata): the
    /// key each `config.json` key came from, named in messages.
    origin: std::collections::BTreeMap<String, String>,
}

impl<'a> HfConfig<'a> {
    /// Parses `src`, the text of `path`, which must be a JSON object.
    pub fn parse(path: &'a Path, src: &'a str) -> Result<Self, ConfigError> {
        let root = match serde_json::from_str::<Value>(src) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(ConfigError::new(path, "expected a JSON object")),
            Err(e) => {
                return Err(ConfigError {
                    path: path.to_path_buf(),
                    location: Some((e.line(), e.column())),
                    message: format!("invalid JSON: {e}"),
                })
            }
        };
        Ok(Self {
            path,
            src,
            root,
            origin: Default::default(),
        })
    }

    /// A configuration mapped from another format: `root` holds `config.json` keys,
    /// `origin` the key of `path` each came from (for messages).
    pub fn mapped(
        path: &'a Path,
        root: Map<String, Value>,
        origin: std::collections::BTreeMap<String, String>,
    ) -> Self {
        Self {
            path,
            src: "",
            root,
            origin,
        }
    }

    /// The file the config came from.
    pub fn path(&self) -> &Path {
        self.path
    }

    /// `model_type`, if the config gives one.
    pub fn model_type(&self) -> Result<Option<&str>, ConfigError> {
        self.string("model_type")
    }

    /// An error at the key's position in the source (its first occurrence). A dotted
    /// key (`rope_parameters.full_attention`) is found part by part, each after the
    /// one before.
    pub fn err_at(&self, key: &str, message: String) -> ConfigError {
        if let Some(from) = self.origin.get(key) {
            return ConfigError::new(self.path, format!("{message} (`{key}` is `{from}`)"));
        }
        let mut found = None;
        let mut from = 0;
        for part in key.split('.') {
            match self.src[from..].find(&format!("\"{part}\"")) {
                Some(i) => {
                    from += i;
                    found = Some(from);
                }
                None => break,
            }
        }
        match found {
            Some(at) => ConfigError::at(self.path, self.src, at, message),
            None => ConfigError::new(self.path, message),
        }
    }

    /// The value of `key`; `null` counts as absent, as transformers reads it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.root.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` is written out as `null` (which, for a key whose default is a
    /// value, turns the feature off: Gemma 2's soft-capping).
    pub fn is_null(&self, key: &str) -> bool {
        self.root.get(key).is_some_and(Value::is_null)
    }

    /// The raw value of `key`, `null` included.
    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.root.get(key)
    }

    /// A positive integer, if present.
    pub fn uint(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(x) if x > 0 => Ok(Some(x as u64)),
                Some(x) => Err(self.err_at(key, format!("`{key}` must be positive, got {x}"))),
                None => Err(self.err_at(key, format!("`{key}` must be an integer, got {v}"))),
            },
        }
    }

    /// A positive integer that must be present.
    pub fn required_uint(&self, key: &str) -> Result<u64, ConfigError> {
        self.uint(key)?
            .ok_or_else(|| self.err_at(key, format!("missing key `{key}`")))
    }

    /// `v`, the value of `key`, as a number.
    pub fn float_in(&self, key: &str, v: &Value) -> Result<f64, ConfigError> {
        v.as_f64()
            .ok_or_else(|| self.err_at(key, format!("`{key}` must be a number, got {v}")))
    }

    /// A string, if present.
    pub fn string(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err_at(key, format!("`{key}` must be a string, got {v}"))),
        }
    }

    /// `layer_types` (transformers 4.5x and 5.x): the attention of each layer,
    /// `full_attention` or `sliding_attention`; empty when absent.
    pub fn layer_types(&self) -> Result<Vec<LayerType>, ConfigError> {
        const KEY: &str = "layer_types";
        let Some(v) = self.get(KEY) else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = v else {
            return Err(self.err_at(KEY, format!("`{KEY}` must be a list of strings, got {v}")));
        };
        items
            .iter()
            .map(|item| {
                item.as_str().and_then(LayerType::parse).ok_or_else(|| {
                    self.err_at(
                        KEY,
                        format!(
                            "unsupported layer type {item} in `{KEY}` (expected \"full_attention\" or \"sliding_attention\")"
                        ),
                    )
                })
            })
            .collect()
    }

    /// A boolean, if present.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err_at(key, format!("`{key}` must be true or false, got {v}"))),
        }
    }
}

fn hf_dtype(name: &str) -> Option<DType> {
    match name {
        "float32" | "float" => Some(DType::F32),
        "float16" | "half" => Some(DType::F16),
        "bfloat16" => Some(DType::Bf16),
        _ => None,
    }
}

/// The keys every Llama-style decoder shares, as transformers' `LlamaConfig` reads
/// them: sizes, RoPE (the default type or `llama3`), RMSNorm epsilon, dtype, context length,
/// tied embeddings and Mistral's sliding window. Checks an architecture adds (biases,
/// activations) come before it, so that errors are reported in the file's terms.
pub fn decoder_config(j: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
    let path = j.path;
    let hidden_size = j.required_uint("hidden_size")?;
    let num_layers = j.required_uint("num_hidden_layers")?;
    let num_heads = j.required_uint("num_attention_heads")?;
    let num_kv_heads = j.uint("num_key_value_heads")?.unwrap_or(num_heads);
    let head_dim = match j.uint("head_dim")? {
        Some(h) => h,
        None => {
            if hidden_size % num_heads != 0 {
                return Err(j.err_at(
                    "num_attention_heads",
                    format!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) and head_dim is absent"),
                ));
            }
            hidden_size / num_heads
        }
    };

    // RoPE: 5.x nests theta and type in `rope_parameters`; 4.x has `rope_theta` and an
    // optional `rope_scaling`.
    let (rope_theta, rope_scaling) = rope_config(j)?;

    let rms_norm_eps = match j.get("rms_norm_eps") {
        Some(v) => j.float_in("rms_norm_eps", v)?,
        None => 1e-6,
    };
    let dtype_key = if j.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    let dtype = match j.string(dtype_key)? {
        Some(name) => hf_dtype(name).ok_or_else(|| {
            j.err_at(
                dtype_key,
                format!("unsupported {dtype_key} `{name}` (expected float32, float16 or bfloat16)"),
            )
        })?,
        None => DType::F32,
    };
    let max_seq_len = j.uint("max_position_embeddings")?.unwrap_or(2048);

    let model = ModelConfig {
        name: path
            .parent()
            .and_then(|p| p.file_name())
            .map_or_else(|| "model".into(), |s| model_name_from(&s.to_string_lossy())),
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: j.required_uint("intermediate_size")?,
        vocab_size: j.required_uint("vocab_size")?,
        rope_theta,
        rms_norm_eps,
        max_seq_len,
        tie_word_embeddings: j.bool("tie_word_embeddings")?.unwrap_or(false),
        dtype,
        sliding_window: j.uint("sliding_window")?,
        layer_types: j.layer_types()?,
        rope_scaling,
        multipliers: None,
        gemma: None,
    };
    Ok(model)
}

/// The spec of an HF model whose config `j` an architecture read into `model`: the
/// default decode shape, the cross-field checks (pointing at the HF key at fault),
/// and the directory's safetensors as the default weights.
pub fn spec_from_hf(
    j: &HfConfig<'_>,
    architecture: &str,
    model: ModelConfig,
) -> Result<ModelSpec, ConfigError> {
    let path = j.path;
    let dtype_key = if j.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    let max_seq_len = model.max_seq_len;
    let dtype = model.dtype;
    let decode = DecodeConfig {
        batch: 1,
        context: max_seq_len.min(1024),
    };
    check(&model, &decode).map_err(|(key, message)| {
        let hf_key = match key {
            "num_layers" => "num_hidden_layers",
            "num_heads" => "num_attention_heads",
            "num_kv_heads" => "num_key_value_heads",
            "max_seq_len" => "max_position_embeddings",
            "dtype" => dtype_key,
            other => other,
        };
        j.err_at(hf_key, message)
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let has_weights = dir.join("model.safetensors").is_file()
        || dir.join("model.safetensors.index.json").is_file();
    Ok(ModelSpec {
        architecture: architecture.to_string(),
        model,
        decode,
        target: TargetConfig {
            gpu: DEFAULT_GPU.to_string(),
            precision: Precision::of_dtype(dtype),
            gpu_at: None,
        },
        weights: has_weights.then(|| dir.to_path_buf()),
        source: path.to_path_buf(),
    })
}

// ---- RoPE ------------------------------------------------------------------------
// `rope_theta` and `rope_scaling` (4.x; its `type` is the older spelling of
// `rope_type`) or `rope_parameters` (5.x, which also holds `rope_theta`). fusec
// implements the `default` type and `llama3` (transformers'
// `_compute_llama3_parameters`, modeling_rope_utils.py); every other type, and a
// scaling key without a type, is rejected by name.

/// The RoPE types fusec computes.
const SUPPORTED: &str = "`default` and `llama3`";

/// `rope_theta` (default 10000) and the scaling of the inverse frequencies, if any.
fn rope_config(j: &HfConfig<'_>) -> Result<(f64, Option<RopeScaling>), ConfigError> {
    let mut rope_theta = 10_000.0;
    if let Some(v) = j.get("rope_theta") {
        rope_theta = j.float_in("rope_theta", v)?;
    }
    // RoPE on a fraction of each head (transformers' `partial_rotary_factor`, at the
    // top level or in the RoPE dict) is not implemented: fusec rotates the whole head.
    let partial = |v: &Value| v.as_f64() != Some(1.0);
    if j.get("partial_rotary_factor").is_some_and(partial) {
        return Err(j.err_at(
            "partial_rotary_factor",
            "`partial_rotary_factor` other than 1.0 is not supported".into(),
        ));
    }
    let mut scaling = None;
    for key in ["rope_parameters", "rope_scaling"] {
        match j.get(key) {
            None => {}
            Some(Value::Object(p)) => {
                if let Some(t) = p.get("rope_theta").filter(|v| !v.is_null()) {
                    rope_theta = j.float_in("rope_theta", t)?;
                }
                if p.get("partial_rotary_factor")
                    .is_some_and(|v| !v.is_null() && partial(v))
                {
                    return Err(j.err_at(
                        key,
                        format!("`{key}.partial_rotary_factor` other than 1.0 is not supported"),
                    ));
                }
                if let Some(s) = parse_scaling(j, key, p)? {
                    scaling = Some(s);
                }
            }
            Some(v) => return Err(j.err_at(key, format!("`{key}` must be an object, got {v}"))),
        }
    }
    Ok((rope_theta, scaling))
}

/// One RoPE dict `p`, found under `key` (Gemma 3's `rope_parameters` in transformers
/// 5.x holds one per layer type, `rope_parameters.full_attention` and
/// `rope_parameters.sliding_attention`): its `rope_theta`, if given, and its scaling.
pub fn rope_dict(
    j: &HfConfig<'_>,
    key: &str,
    p: &Map<String, Value>,
) -> Result<(Option<f64>, Option<RopeScaling>), ConfigError> {
    let theta = match p.get("rope_theta").filter(|v| !v.is_null()) {
        Some(t) => Some(j.float_in(key, t)?),
        None => None,
    };
    if p.get("partial_rotary_factor")
        .is_some_and(|v| !v.is_null() && v.as_f64() != Some(1.0))
    {
        return Err(j.err_at(
            key,
            format!("`{key}.partial_rotary_factor` other than 1.0 is not supported"),
        ));
    }
    Ok((theta, parse_scaling(j, key, p)?))
}

/// The scaling `p` (the object under `key`) asks for.
fn parse_scaling(
    j: &HfConfig<'_>,
    key: &str,
    p: &Map<String, Value>,
) -> Result<Option<RopeScaling>, ConfigError> {
    let type_key = ["rope_type", "type"]
        .into_iter()
        .find(|k| p.get(*k).is_some_and(|v| !v.is_null()));
    let ty = match type_key {
        None => {
            // A scaling parameter without a type would be ignored by the default RoPE.
            if let Some(k) = ["factor", "low_freq_factor", "high_freq_factor"]
                .into_iter()
                .find(|k| p.get(*k).is_some_and(|v| !v.is_null()))
            {
                return Err(j.err_at(
                    key,
                    format!(
                        "`{key}.{k}` is given without a `rope_type`; fusec implements {SUPPORTED}"
                    ),
                ));
            }
            return Ok(None);
        }
        Some(t) => match &p[t] {
            Value::String(s) => s.as_str(),
            other => {
                return Err(j.err_at(key, format!("`{key}.{t}` must be a string, got {other}")))
            }
        },
    };
    match ty {
        "default" => Ok(None),
        "llama3" => {
            let num = |k: &str| -> Result<f64, ConfigError> {
                match p.get(k).filter(|v| !v.is_null()) {
                    Some(v) => v.as_f64().ok_or_else(|| {
                        j.err_at(key, format!("`{key}.{k}` must be a number, got {v}"))
                    }),
                    None => {
                        Err(j.err_at(key, format!("`{key}` of rope_type `llama3` needs `{k}`")))
                    }
                }
            };
            let factor = num("factor")?;
            let low_freq_factor = num("low_freq_factor")?;
            let high_freq_factor = num("high_freq_factor")?;
            let original = num("original_max_position_embeddings")?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(j.err_at(key, format!("`{key}.factor` must be positive")));
            }
            if !(low_freq_factor.is_finite()
                && low_freq_factor > 0.0
                && high_freq_factor.is_finite()
                && high_freq_factor > low_freq_factor)
            {
                return Err(j.err_at(
                    key,
                    format!(
                        "`{key}.high_freq_factor` ({high_freq_factor}) must exceed `low_freq_factor` ({low_freq_factor}) > 0"
                    ),
                ));
            }
            if !(original >= 1.0 && original.fract() == 0.0) {
                return Err(j.err_at(
                    key,
                    format!("`{key}.original_max_position_embeddings` must be a positive integer"),
                ));
            }
            Ok(Some(RopeScaling::Llama3(Llama3Scaling {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original as u64,
            })))
        }
        other => Err(j.err_at(
            key,
            format!(
                "`{key}.{}`: rope_type `{other}` is not supported (fusec implements {SUPPORTED})",
                type_key.unwrap_or("rope_type")
            ),
        )),
    }
}
