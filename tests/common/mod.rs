//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every model input of the snapshot harness: `tests/in/*.toml` and the directories
/// `tests/in/*/` holding a `config.json`, sorted.
pub fn test_inputs() -> Vec<PathBuf> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(root().join("tests/in"))
        .expect("tests/in exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml") || p.join("config.json").is_file())
        .collect();
    inputs.sort();
    inputs
}

/// Every bundled example model.
pub fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .expect("examples exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

/// The file stem or directory name of an input.
pub fn input_name(p: &Path) -> String {
    p.file_stem()
        .expect("inputs have names")
        .to_string_lossy()
        .into_owned()
}
