//! The GGUF frontend: a llama.cpp checkpoint's metadata mapped onto the `config.json`
//! keys transformers' `LlamaConfig` reads, so that a GGUF file goes through the same
//! architecture code and checks as a Hugging Face directory.
//!
//! The mapping is llama.cpp's converter (`convert_hf_to_gguf.py`, `gguf-py`'s
//! `constants.py` key names) read backwards, as transformers' own GGUF loader does
//! (`integrations/gguf/gguf_config_mapping.py`): `{arch}.embedding_length` is
//! `hidden_size`, and so on. Weights are dequantized to float32 at load, as
//! transformers does, so the configuration's dtype is float32. Settings fusec cannot
//! honour are rejected by their GGUF key.

use std::collections::BTreeMap;
use std::path::Path;

use fusec_gguf::GgufFile;
use serde_json::{Map, Value};

use super::error::ConfigError;
use super::hf::HfConfig;

/// The GGUF architectures fusec reads, and the `model_type` each maps to.
const ARCHITECTURES: &[(&str, &str)] = &[("llama", "llama")];

/// `(config.json key, GGUF key after the architecture prefix)`, for the keys that map
/// one to one.
const KEYS: &[(&str, &str)] = &[
    ("hidden_size", "embedding_length"),
    ("num_hidden_layers", "block_count"),
    ("intermediate_size", "feed_forward_length"),
    ("num_attention_heads", "attention.head_count"),
    ("num_key_value_heads", "attention.head_count_kv"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
    ("rope_theta", "rope.freq_base"),
    ("max_position_embeddings", "context_length"),
    ("head_dim", "attention.key_length"),
];

/// A GGUF file's configuration as `config.json` keys, with the GGUF key of each.
#[derive(Debug)]
pub struct GgufConfig {
    pub root: Map<String, Value>,
    pub origin: BTreeMap<String, String>,
}

impl GgufConfig {
    /// The [`HfConfig`] view of the mapped keys, reporting errors against `path`.
    pub fn hf<'a>(&self, path: &'a Path) -> HfConfig<'a> {
        HfConfig::mapped(path, self.root.clone(), self.origin.clone())
    }
}

fn err(file: &GgufFile, message: String) -> ConfigError {
    ConfigError::new(file.path(), message)
}

/// A reader error as a configuration error (its message already names the file).
fn gguf_err(file: &GgufFile, e: fusec_gguf::Error) -> ConfigError {
    let message = e.to_string();
    let prefix = format!("{}: ", file.path().display());
    ConfigError::new(
        file.path(),
        message
            .strip_prefix(&prefix)
            .unwrap_or(&message)
            .to_string(),
    )
}

/// Maps the metadata of `file` onto `config.json` keys.
pub fn gguf_config(file: &GgufFile) -> Result<GgufConfig, ConfigError> {
    let arch = file.architecture().map_err(|e| gguf_err(file, e))?;
    let Some(&(_, model_type)) = ARCHITECTURES.iter().find(|(a, _)| *a == arch) else {
        return Err(err(
            file,
            format!(
                "unsupported GGUF architecture `{arch}` (`general.architecture`; fusec reads {})",
                ARCHITECTURES
                    .iter()
                    .map(|(a, _)| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    let mut root = Map::new();
    let mut origin = BTreeMap::new();
    root.insert("model_type".into(), Value::String(model_type.into()));
    origin.insert("model_type".into(), "general.architecture".into());
    for (hf, suffix) in KEYS {
        let key = format!("{arch}.{suffix}");
        let value = match file.get(&key) {
            None => continue,
            Some(v) => {
                if let Some(u) = v.as_u64() {
                    Value::from(u)
                } else if let Some(f) = v.as_f64() {
                    // GGUF stores these as float32: widen the value it holds exactly, as
                    // `torch` does reading the same number.
                    Value::from(f)
                } else {
                    return Err(err(
                        file,
                        format!(
                            "metadata key `{key}` is {}, expected a number",
                            v.type_name()
                        ),
                    ));
                }
            }
        };
        root.insert((*hf).into(), value);
        origin.insert((*hf).into(), key);
    }

    // The vocabulary: `{arch}.vocab_size`, else the tokenizer's token count, as
    // transformers' loader falls back.
    let vocab_key = format!("{arch}.vocab_size");
    let vocab = match file.uint(&vocab_key).map_err(|e| gguf_err(file, e))? {
        Some(v) => Some((v, vocab_key)),
        None => file
            .get("tokenizer.ggml.tokens")
            .and_then(|t| t.as_array())
            .map(|t| (t.len() as u64, "tokenizer.ggml.tokens".to_string())),
    };
    if let Some((v, key)) = vocab {
        root.insert("vocab_size".into(), Value::from(v));
        origin.insert("vocab_size".into(), key);
    }

    // Partial RoPE: the rotated dimensions must be the whole head.
    let rope_key = format!("{arch}.rope.dimension_count");
    if let Some(rot) = file.uint(&rope_key).map_err(|e| gguf_err(file, e))? {
        let heads = file
            .uint(&format!("{arch}.attention.head_count"))
            .ok()
            .flatten();
        let hidden = file
            .uint(&format!("{arch}.embedding_length"))
            .ok()
            .flatten();
        let head_dim = match file
            .uint(&format!("{arch}.attention.key_length"))
            .ok()
            .flatten()
        {
            Some(h) => Some(h),
            None => heads.zip(hidden).and_then(|(n, h)| h.checked_div(n)),
        };
        if head_dim.is_some_and(|h| h != rot) {
            return Err(err(
                file,
                format!(
                    "`{rope_key}` = {rot} rotates part of each head of {} dimensions: partial RoPE is not supported",
                    head_dim.unwrap_or_default()
                ),
            ));
        }
    }
    // RoPE scaling: llama.cpp writes a type (linear, yarn, ...) or, for Llama 3.1's
    // scaling, precomputed factors as the tensor `rope_freqs.weight`.
    let scaling_key = format!("{arch}.rope.scaling.type");
    if let Some(kind) = file.string(&scaling_key).map_err(|e| gguf_err(file, e))? {
        if kind != "none" {
            return Err(err(
                file,
                format!("`{scaling_key}` = `{kind}`: RoPE scaling from GGUF is not supported"),
            ));
        }
    }
    if file.tensor("rope_freqs.weight").is_some() {
        return Err(err(
            file,
            "tensor `rope_freqs.weight` (Llama 3.1-style RoPE scaling factors) is not supported from GGUF".into(),
        ));
    }
    let experts_key = format!("{arch}.expert_count");
    if file
        .uint(&experts_key)
        .ok()
        .flatten()
        .is_some_and(|n| n > 0)
    {
        return Err(err(
            file,
            format!("`{experts_key}`: mixture-of-experts models are not supported"),
        ));
    }
    // llama.cpp's converter leaves out `output.weight` when the head is tied to the
    // embedding; transformers' loader ties it then.
    root.insert(
        "tie_word_embeddings".into(),
        Value::Bool(file.tensor("output.weight").is_none()),
    );
    origin.insert(
        "tie_word_embeddings".into(),
        "the absence of tensor `output.weight`".into(),
    );
    root.insert("dtype".into(), Value::String("float32".into()));
    Ok(GgufConfig { root, origin })
}
