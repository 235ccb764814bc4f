//! fusec's model side, on top of the IR (`fusec-ir`) and below every later stage.
//!
//! - [`frontend`]: `model.toml` and Hugging Face `config.json` read into a validated
//!   [`ModelSpec`]; a user's GPU file read into extra GPU specs;
//! - [`build`]: the [`Builder`] graphs are appended to;
//! - [`blocks`]: the reusable building blocks (RMSNorm, RoPE, linear with an optional
//!   bias, attention with its KV cache, gated MLP, embedding, LM head);
//! - [`arch`]: the [`Architecture`] trait, Llama and Mistral built from the blocks, and
//!   the [`Registry`] that finds an architecture by `model_type`.
//!
//! Adding an architecture: implement [`Architecture`] (parse its `config.json` through
//! [`frontend::HfConfig`], build its graph from [`blocks`], record every weight's role),
//! then register it: in [`Registry::with_builtins`] for a built-in one, or at run time
//! with [`Registry::register`] and the pipeline's `*_with` functions.

pub mod arch;
pub mod blocks;
pub mod build;
pub mod frontend;

pub use arch::{
    load_model, parse_hf_config, parse_model_toml, ArchError, Architecture, Llama, Mistral,
    Registry, RegistryError, UnknownArchitecture,
};
pub use build::{BuildError, Builder};
pub use frontend::{ConfigError, ModelConfig, ModelSpec, Precision};
