//! `fusec run` end to end: the Hugging Face fixture's greedy decode and logits, a run
//! on random weights with a profile, and bad weights or prompts giving exit code 2 with
//! a message that names the tensor.

mod common;

use common::{fusec, scratch};

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/hf-tiny-llama-s0")
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("readable");
    serde_json::from_str(&text).expect("valid JSON")
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

#[test]
fn the_fixture_decodes_like_hugging_face() {
    let out_path = scratch("fixture").join("out.json");
    let out = fusec(&[
        "run",
        fixture().to_str().expect("utf-8 path"),
        "--prompt-ids",
        "1,17,42,99,7",
        "--tokens",
        "16",
        "--json",
        out_path.to_str().expect("utf-8 path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("tokens/s"), "{stdout}");

    let expected = read_json(&fixture().join("expected.json"));
    let actual = read_json(&out_path);
    assert_eq!(actual["prompt"], expected["prompt"]);
    assert_eq!(actual["generated"], expected["generated"]);
    let (a_rows, e_rows) = (
        actual["logits"].as_array().expect("rows"),
        expected["logits"].as_array().expect("rows"),
    );
    assert_eq!(a_rows.len(), e_rows.len());
    for (step, (a, e)) in a_rows.iter().zip(e_rows).enumerate() {
        let (a, e) = (floats(a), floats(e));
        assert_eq!(a.len(), e.len());
        let num: f64 = a.iter().zip(&e).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f64 = e.iter().map(|y| y * y).sum();
        let err = (num / den).sqrt();
        assert!(err <= 1e-4, "step {step}: relative L2 error {err}");
    }
    let stats = &actual["stats"];
    assert!(stats["launches_per_step"].as_u64().expect("launches") > 0);
    assert!(stats["bytes_per_step"].as_u64().expect("bytes") > 0);
    assert!(stats["tokens_per_s"].as_f64().expect("rate") > 0.0);
}

#[test]
fn random_weights_run_with_a_profile() {
    let model = root().join("tests/in/tiny-bf16-tied.toml");
    let out = fusec(&[
        "run",
        model.to_str().expect("utf-8 path"),
        "--prompt-ids",
        "3,1,4",
        "--tokens",
        "4",
        "--seed",
        "7",
        "--profile",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("random (seed 7)"), "{stdout}");
    assert!(
        stdout.contains("GB/s") && stdout.contains("linear"),
        "{stdout}"
    );
}

/// Writes a safetensors file holding one tensor.
fn write_one(path: &Path, name: &str, shape: &[usize]) {
    let n: usize = shape.iter().product();
    let header = serde_json::json!({
        name: { "dtype": "F32", "shape": shape, "data_offsets": [0, 4 * n] }
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, 4 * n));
    std::fs::write(path, bytes).expect("writes");
}

fn run_with_weights(weights: &Path) -> (i32, String) {
    let out = fusec(&[
        "run",
        fixture().to_str().expect("utf-8 path"),
        "--weights",
        weights.to_str().expect("utf-8 path"),
        "--prompt-ids",
        "1,2",
        "--tokens",
        "2",
    ]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_weights_exit_2_naming_the_tensor() {
    let dir = scratch("bad-weights");
    let wrong = dir.join("wrong-shape.safetensors");
    write_one(&wrong, "model.embed_tokens.weight", &[3, 3]);
    let (code, stderr) = run_with_weights(&wrong);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("model.embed_tokens.weight"), "{stderr}");
    assert!(stderr.contains("wrong-shape.safetensors"), "{stderr}");

    let missing = dir.join("missing.safetensors");
    write_one(&missing, "something.else", &[2]);
    let (code, stderr) = run_with_weights(&missing);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("model.embed_tokens.weight") && stderr.contains("missing"),
        "{stderr}"
    );

    let truncated = dir.join("truncated.safetensors");
    let full = std::fs::read(fixture().join("model.safetensors")).expect("fixture weights");
    std::fs::write(&truncated, &full[..full.len() / 2]).expect("writes");
    let (code, stderr) = run_with_weights(&truncated);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("truncated.safetensors") && stderr.contains("model."),
        "{stderr}"
    );
}

#[test]
fn bad_prompts_exit_2() {
    for (prompt, tokens, needle) in [
        ("1,256", "2", "out of range"),
        ("-1", "2", "out of range"),
        ("1,2", "0", "--tokens"),
        ("1,2", "200", "max_seq_len"),
    ] {
        let out = fusec(&[
            "run",
            fixture().to_str().expect("utf-8 path"),
            "--prompt-ids",
            prompt,
            "--tokens",
            tokens,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{prompt}: {stderr}");
        assert!(stderr.contains(needle), "{prompt}: {stderr}");
    }
}
