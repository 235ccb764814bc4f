//! Architectures as plug-ins: the [`Architecture`] trait, the built-in [`Llama`],
//! [`Mistral`], [`Qwen2`], [`Qwen3`], [`Olmo2`], [`Granite`], [`Phi3`], [`Gemma2`] and
//! [`Gemma3`], and the [`Registry`] that
//! finds one by `model_type`.

mod architecture;
pub mod gemma;
pub mod granite;
pub mod llama;
pub mod mistral;
pub mod olmo2;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
mod registry;

pub use architecture::Architecture;
pub use gemma::{Gemma2, Gemma3};
pub use granite::Granite;
pub use llama::Llama;
pub use mistral::Mistral;
pub use olmo2::Olmo2;
pub use phi3::Phi3;
pub use qwen2::Qwen2;
pub use qwen3::Qwen3;
pub use registry::{
    load_model, parse_hf_config, parse_model_toml, ArchError, Registry, RegistryError,
    UnknownArchitecture,
};
