//! Architectures as plug-ins: the [`Architecture`] trait, the built-in [`Llama`],
//! [`Mistral`], [`Olmo2`] and [`Granite`], and the [`Registry`] that finds one by `model_type`.

mod architecture;
pub mod granite;
pub mod llama;
pub mod mistral;
pub mod olmo2;
mod registry;

pub use architecture::Architecture;
pub use granite::Granite;
pub use llama::Llama;
pub use mistral::Mistral;
pub use olmo2::Olmo2;
pub use registry::{
    load_model, parse_hf_config, parse_model_toml, ArchError, Registry, RegistryError,
    UnknownArchitecture,
};
