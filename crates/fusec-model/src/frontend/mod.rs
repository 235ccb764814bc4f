//! Model frontends: a `model.toml`, or a Hugging Face `config.json` (or a model
//! directory holding one), read into a validated [`ModelSpec`].

mod config;
mod hf;
mod model_toml;

use std::path::{Path, PathBuf};

pub use config::{DecodeConfig, ModelConfig, ModelSpec, Precision, TargetConfig};

/// A bad model description. Displays as `file:line:column: message` where the format
/// gives a position, else `file: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            location: None,
            message: message.into(),
        }
    }

    pub(crate) fn at(path: &Path, src: &str, offset: usize, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            location: Some(line_col(src, offset)),
            message: message.into(),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Reads a model description: a `model.toml`, a `config.json`, or a directory that
/// holds a `config.json` (whose safetensors then become the default weights).
pub fn load_model(path: &Path) -> Result<ModelSpec, ConfigError> {
    if path.is_dir() {
        let config = path.join("config.json");
        if !config.is_file() {
            return Err(ConfigError::new(
                path,
                "directory has no config.json (expected a Hugging Face model directory)",
            ));
        }
        return hf::load(&config);
    }
    let src = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => hf::parse(path, &src),
        Some("toml") => model_toml::parse(path, &src),
        _ => Err(ConfigError::new(
            path,
            "unknown model format: expected a .toml, a config.json, or a model directory",
        )),
    }
}

/// Parses `model.toml` text; `path` is used for messages and relative weight paths.
pub fn parse_model_toml(path: &Path, src: &str) -> Result<ModelSpec, ConfigError> {
    model_toml::parse(path, src)
}

/// Parses Hugging Face `config.json` text.
pub fn parse_hf_config(path: &Path, src: &str) -> Result<ModelSpec, ConfigError> {
    hf::parse(path, src)
}
