//! Model frontends: a `model.toml`, a Hugging Face `config.json` or a GGUF file's
//! metadata (mapped onto `config.json` keys) read into a
//! validated [`ModelSpec`], and a user's GPU file read into extra GPU specs.
//!
//! The frontends know no architecture: `model.toml` names one (checked against the
//! names the caller passes), and an architecture reads its own `config.json` keys
//! through [`HfConfig`]. [`crate::arch::Registry`] ties the two together.

mod config;
mod error;
mod gguf;
mod gpu_file;
mod hf;
mod model_toml;

pub use config::{
    model_name_from, valid_model_name, DecodeConfig, GemmaParams, LayerType, Limits, ModelConfig,
    ModelSpec, Multipliers, Precision, RopeScaling, TargetConfig, DEFAULT_ARCHITECTURE,
    DEFAULT_GPU,
};
pub(crate) use error::english_list;
pub use error::ConfigError;
pub use gguf::{gguf_config, GgufConfig};
pub use gpu_file::{load_gpu_file, parse_gpu_file};
pub use hf::{decoder_config, rope_dict, spec_from_hf, HfConfig};
pub use model_toml::parse as parse_model_toml_with;
