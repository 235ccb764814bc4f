//! Architectures as plug-ins: the [`Architecture`] trait, the built-in [`Llama`] and
//! [`Mistral`], and the [`Registry`] that finds one by `model_type`.

mod architecture;
pub mod llama;
pub mod mistral;
mod registry;

pub use architecture::Architecture;
pub use llama::Llama;
pub use mistral::Mistral;
pub use registry::{
    load_model, parse_hf_config, parse_model_toml, ArchError, Registry, RegistryError,
    UnknownArchitecture,
};
