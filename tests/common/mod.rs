//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub mod tiny_gguf;

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

/// The real SmolLM2-135M-Instruct GGUF, fetched by `scripts/fetch-smollm2.sh` into its
/// cache (outside the repository) when not there yet. `None` only outside CI, after
/// saying loudly that the real-model test did not run; in CI (`CI` set) a file that
/// cannot be fetched fails the test.
pub fn smollm2() -> Option<PathBuf> {
    let script = root().join("scripts/fetch-smollm2.sh");
    let out = std::process::Command::new("bash").arg(&script).output();
    let found = match &out {
        Ok(o) if o.status.success() => {
            let path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            path.is_file().then_some(path)
        }
        _ => None,
    };
    if found.is_none() {
        let why = match &out {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        let message = format!(
            "\n!!!! the real-model test could NOT fetch SmolLM2 (scripts/fetch-smollm2.sh): {why}\n"
        );
        // `.ci/run` sets FUSEC_REQUIRE_TOOLS: CI never passes without the real model.
        if std::env::var_os("CI").is_some() || std::env::var_os("FUSEC_REQUIRE_TOOLS").is_some() {
            panic!("{message}");
        }
        eprintln!("{message}!!!! NOT RUN: the real-model checks of this test were skipped\n");
    }
    found
}

/// A path as a command-line argument.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `fusec compile` of the Hugging Face `config.json` at `config` with `key` set to the
/// JSON `value`, written into `case` (created) with the compile's outputs: the exit
/// code and standard error.
pub fn compile_edited_config(
    config: &Path,
    key: &str,
    value: &str,
    case: &Path,
) -> (Option<i32>, String) {
    let text = std::fs::read_to_string(config).expect("config");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v[key] = serde_json::from_str(value).expect("a JSON value");
    std::fs::create_dir_all(case).expect("dir");
    let edited = case.join("config.json");
    std::fs::write(&edited, serde_json::to_string_pretty(&v).expect("prints")).expect("w");
    let out = fusec(&["compile", path_str(&edited), "--out", path_str(case)]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Largest top-2 margin (logits) of the f32 reference at which a lower precision's
/// teacher-forced run may pick another token. The tiny fixtures are random-weight
/// models whose top two logits often differ by hundredths, while FP8's per-product
/// error of up to 2^-4 moves a logit by about a tenth (their relative L2 errors are
/// 0.1 to 0.2), so a count of agreements measures where their near ties fall; a miss
/// at a clear margin is what a wrong kernel shows.
pub const NEAR_TIE: f64 = 0.25;

/// Asserts that every top-1 disagreement of a `fusec run --compare --json` accuracy
/// record is at a step whose reference margin is below [`NEAR_TIE`].
pub fn misses_only_near_ties(accuracy: &serde_json::Value, name: &str) {
    let steps = accuracy["steps"].as_array().expect("per-step records");
    assert!(!steps.is_empty(), "{name}: no steps");
    for s in steps {
        if s["top1_agree"].as_bool() == Some(false) {
            let margin = s["reference_margin"].as_f64().expect("a margin");
            assert!(
                margin < NEAR_TIE,
                "{name}: step {} picks {} over {} at a reference margin of {margin}",
                s["step"],
                s["top1"],
                s["reference_top1"]
            );
        }
    }
}
