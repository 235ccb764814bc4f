//! Architectures by name, and the frontends that dispatch through them.

use std::path::Path;
use std::sync::{Arc, LazyLock};

use fusec_ir::Graph;

use super::architecture::Architecture;
use super::gemma::{Gemma2, Gemma3};
use super::granite::Granite;
use super::llama::Llama;
use super::mistral::Mistral;
use super::olmo2::Olmo2;
use super::phi3::Phi3;
use super::qwen2::Qwen2;
use super::qwen3::Qwen3;
use crate::build::BuildError;
use crate::frontend::{
    english_list, parse_model_toml_with, spec_from_hf, ConfigError, HfConfig, ModelSpec,
    DEFAULT_ARCHITECTURE,
};

/// The architectures fusec knows, by `model_type`. [`Registry::builtin`] holds Llama,
/// Mistral, Qwen2, Qwen3, OLMo 2, Granite, Phi-3, Gemma 2 and Gemma 3 (text); a library user extends [`Registry::with_builtins`] with
/// [`Registry::register`] and passes it to the frontends and the pipeline.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    architectures: Vec<Arc<dyn Architecture>>,
}

/// Why an architecture cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("model_type `{0}` is already registered")]
    Duplicate(String),
    #[error("an architecture must name at least one model_type")]
    NoModelType,
}

/// A spec names an architecture the registry does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture `{name}` (registered: {})", known.join(", "))]
pub struct UnknownArchitecture {
    pub name: String,
    pub known: Vec<String>,
}

/// Why a spec's graph could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchError {
    #[error(transparent)]
    Unknown(#[from] UnknownArchitecture),
    #[error(transparent)]
    Build(#[from] BuildError),
}

static BUILTIN: LazyLock<Registry> = LazyLock::new(Registry::with_builtins);

impl Registry {
    /// A registry without architectures.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in architectures, shared.
    pub fn builtin() -> &'static Registry {
        &BUILTIN
    }

    /// A new registry holding the built-in architectures, to extend.
    pub fn with_builtins() -> Self {
        let architectures: Vec<Arc<dyn Architecture>> = vec![
            Arc::new(Llama),
            Arc::new(Mistral),
            Arc::new(Qwen2),
            Arc::new(Qwen3),
            Arc::new(Olmo2),
            Arc::new(Granite),
            Arc::new(Phi3),
            Arc::new(Gemma2),
            Arc::new(Gemma3),
        ];
        Self { architectures }
    }

    /// Adds `arch` under each of its model types, none of which may be taken.
    pub fn register(&mut self, arch: Arc<dyn Architecture>) -> Result<(), RegistryError> {
        if arch.model_types().is_empty() {
            return Err(RegistryError::NoModelType);
        }
        if let Some(taken) = arch
            .model_types()
            .iter()
            .find(|name| self.get(name).is_some())
        {
            return Err(RegistryError::Duplicate(taken.to_string()));
        }
        self.architectures.push(arch);
        Ok(())
    }

    /// The architecture registered as `model_type`.
    pub fn get(&self, model_type: &str) -> Option<&dyn Architecture> {
        self.architectures
            .iter()
            .find(|a| a.model_types().contains(&model_type))
            .map(|a| a.as_ref())
    }

    /// The architecture registered as `name`, or an error listing the known ones.
    pub fn architecture(&self, name: &str) -> Result<&dyn Architecture, UnknownArchitecture> {
        self.get(name).ok_or_else(|| UnknownArchitecture {
            name: name.to_string(),
            known: self.model_types().iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Every registered model type, in registration order.
    pub fn model_types(&self) -> Vec<&str> {
        self.architectures
            .iter()
            .flat_map(|a| a.model_types().iter().copied())
            .collect()
    }

    /// The eager decode graph of `spec`, built by its architecture.
    pub fn build(&self, spec: &ModelSpec) -> Result<Graph, ArchError> {
        Ok(self.architecture(&spec.architecture)?.build(&spec.model)?)
    }

    /// Reads a model description: a `model.toml`, a `config.json`, or a directory that
    /// holds a `config.json` (whose safetensors then become the default weights).
    pub fn load_model(&self, path: &Path) -> Result<ModelSpec, ConfigError> {
        if path.is_dir() {
            let config = path.join("config.json");
            if !config.is_file() {
                return Err(ConfigError::new(
                    path,
                    "directory has no config.json (expected a Hugging Face model directory)",
                ));
            }
            let src = std::fs::read_to_string(&config)
                .map_err(|e| ConfigError::new(&config, format!("cannot read: {e}")))?;
            return self.parse_hf_config(&config, &src);
        }
        if path.extension().is_some_and(|e| e == "gguf") {
            return self.load_gguf(path);
        }
        let src = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => self.parse_hf_config(path, &src),
            Some("toml") => self.parse_model_toml(path, &src),
            _ => Err(ConfigError::new(
                path,
                "unknown model format: expected a .toml, a config.json, a .gguf, or a model directory",
            )),
        }
    }

    /// Reads a GGUF checkpoint's metadata as the `config.json` it maps onto (see
    /// [`crate::frontend::gguf_config`]); the file itself is the default weights.
    pub fn load_gguf(&self, path: &Path) -> Result<ModelSpec, ConfigError> {
        let file = fusec_gguf::GgufFile::open(path).map_err(|e| {
            let message = e.to_string();
            let prefix = format!("{}: ", path.display());
            ConfigError::new(
                path,
                message
                    .strip_prefix(&prefix)
                    .unwrap_or(&message)
                    .to_string(),
            )
        })?;
        let config = crate::frontend::gguf_config(&file)?;
        let mut spec = self.parse_hf(&config.hf(path))?;
        spec.model.name = path
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
        spec.weights = Some(path.to_path_buf());
        Ok(spec)
    }

    /// Parses `model.toml` text; `path` is used for messages and relative weight paths.
    pub fn parse_model_toml(&self, path: &Path, src: &str) -> Result<ModelSpec, ConfigError> {
        parse_model_toml_with(path, src, &self.model_types())
    }

    /// Parses Hugging Face `config.json` text with the architecture its `model_type`
    /// names (Llama's when it names none).
    pub fn parse_hf_config(&self, path: &Path, src: &str) -> Result<ModelSpec, ConfigError> {
        self.parse_hf(&HfConfig::parse(path, src)?)
    }

    /// The spec of a parsed `config.json` (or a configuration mapped onto one).
    fn parse_hf(&self, j: &HfConfig<'_>) -> Result<ModelSpec, ConfigError> {
        let model_type = j.model_type()?.unwrap_or(DEFAULT_ARCHITECTURE);
        let Some(arch) = self.get(model_type) else {
            return Err(j.err_at(
                "model_type",
                format!(
                    "unsupported model_type `{model_type}` (fusec compiles {})",
                    english_list(&self.model_types())
                ),
            ));
        };
        let model = arch.parse_hf_config(j)?;
        spec_from_hf(j, model_type, model)
    }
}

/// [`Registry::load_model`] with the built-in architectures.
pub fn load_model(path: &Path) -> Result<ModelSpec, ConfigError> {
    Registry::builtin().load_model(path)
}

/// [`Registry::parse_model_toml`] with the built-in architectures.
pub fn parse_model_toml(path: &Path, src: &str) -> Result<ModelSpec, ConfigError> {
    Registry::builtin().parse_model_toml(path, src)
}

/// [`Registry::parse_hf_config`] with the built-in architectures.
pub fn parse_hf_config(path: &Path, src: &str) -> Result<ModelSpec, ConfigError> {
    Registry::builtin().parse_hf_config(path, src)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::frontend::{ConfigError, HfConfig, ModelConfig};

    const TOML: &str = "[model]\nhidden_size = 32\nnum_layers = 1\nnum_heads = 4\n\
                        intermediate_size = 48\nvocab_size = 64\nrope_theta = 10000.0\n\
                        rms_norm_eps = 1e-5\nmax_seq_len = 64\n";
    const JSON: &str = r#"{"model_type": "MT", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 64}"#;

    /// An architecture that reads `config.json` as Llama does and builds Llama's graph.
    #[derive(Debug)]
    struct Custom;

    impl Architecture for Custom {
        fn model_types(&self) -> &[&str] {
            &["custom", "custom2"]
        }
        fn parse_hf_config(&self, config: &HfConfig<'_>) -> Result<ModelConfig, ConfigError> {
            crate::frontend::decoder_config(config)
        }
        fn build(&self, model: &ModelConfig) -> Result<Graph, BuildError> {
            super::super::llama::build(model)
        }
    }

    #[test]
    fn builtins_are_the_families() {
        assert_eq!(
            Registry::builtin().model_types(),
            [
                "llama",
                "mistral",
                "qwen2",
                "qwen3",
                "olmo2",
                "granite",
                "phi3",
                "gemma2",
                "gemma3_text"
            ]
        );
        assert!(Registry::new().model_types().is_empty());
    }

    #[test]
    fn model_toml_names_the_architecture_default_llama() {
        let path = Path::new("m.toml");
        let spec = parse_model_toml(path, TOML).expect("parses");
        assert_eq!(spec.architecture, "llama");
        let with = TOML.replace("[model]\n", "[model]\narchitecture = \"mistral\"\n");
        let spec = parse_model_toml(path, &with).expect("parses");
        assert_eq!(spec.architecture, "mistral");
        let bad = TOML.replace("[model]\n", "[model]\narchitecture = \"gpt2\"\n");
        let e = parse_model_toml(path, &bad).expect_err("gpt2 is not registered");
        assert_eq!(
            e.message,
            "unsupported architecture `gpt2` (fusec compiles \"llama\", \"mistral\", \"qwen2\", \"qwen3\", \"olmo2\", \"granite\", \"phi3\", \"gemma2\" and \"gemma3_text\")"
        );
        assert_eq!(e.location, Some((2, 16)));
    }

    #[test]
    fn hf_model_type_picks_the_architecture() {
        let path = Path::new("m/config.json");
        let spec = parse_hf_config(path, &JSON.replace("MT", "mistral")).expect("parses");
        assert_eq!(spec.architecture, "mistral");
        let e = parse_hf_config(path, &JSON.replace("MT", "custom")).expect_err("unknown");
        assert_eq!(
            e.message,
            "unsupported model_type `custom` (fusec compiles llama, mistral, qwen2, qwen3, olmo2, granite, phi3, gemma2 and gemma3_text)"
        );

        let mut registry = Registry::with_builtins();
        registry.register(Arc::new(Custom)).expect("registers");
        assert_eq!(
            registry.model_types(),
            [
                "llama",
                "mistral",
                "qwen2",
                "qwen3",
                "olmo2",
                "granite",
                "phi3",
                "gemma2",
                "gemma3_text",
                "custom",
                "custom2"
            ]
        );
        let spec = registry
            .parse_hf_config(path, &JSON.replace("MT", "custom2"))
            .expect("parses");
        assert_eq!(spec.architecture, "custom2");
        let graph = registry.build(&spec).expect("builds");
        assert_eq!(graph.layers(), 1);
        let e = registry
            .parse_hf_config(path, &JSON.replace("MT", "gpt2"))
            .expect_err("unknown");
        assert!(
            e.message.ends_with(
                "(fusec compiles llama, mistral, qwen2, qwen3, olmo2, granite, phi3, gemma2, gemma3_text, custom and custom2)"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_model_type_is_registered_once() {
        let mut registry = Registry::with_builtins();
        registry.register(Arc::new(Custom)).expect("registers");
        assert_eq!(
            registry.register(Arc::new(Custom)),
            Err(RegistryError::Duplicate("custom".into()))
        );
        assert_eq!(
            registry.register(Arc::new(Llama)),
            Err(RegistryError::Duplicate("llama".into()))
        );
    }

    #[test]
    fn an_unregistered_spec_does_not_build() {
        let mut spec = parse_model_toml(Path::new("m.toml"), TOML).expect("parses");
        spec.architecture = "custom".into();
        let e = Registry::builtin().build(&spec).expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "unknown architecture `custom` (registered: llama, mistral, qwen2, qwen3, olmo2, granite, phi3, gemma2, gemma3_text)"
        );
    }
}
