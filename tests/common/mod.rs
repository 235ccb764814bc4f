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

/// Every bundled example model: a `model.toml`, or a directory holding a published
/// `config.json`.
pub fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .expect("examples exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml") || p.join("config.json").is_file())
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

/// Runs the `fusec` binary from the repository root.
pub fn fusec(args: &[&str]) -> std::process::Output {
    fusec_in(&root(), args)
}

/// Runs the `fusec` binary in `dir`.
pub fn fusec_in(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fusec"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("fusec runs")
}

/// A scratch directory for one test (the process id keeps test binaries apart). The
/// first call for a name in this process empties what an earlier process of the same
/// id left there, since fusec refuses to replace existing outputs without `--force`.
pub fn scratch(name: &str) -> PathBuf {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join(format!("fusec-test-{}-{name}", std::process::id()));
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|n| n == name) {
        let _ = std::fs::remove_dir_all(&dir);
        seen.push(name.to_string());
    }
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
