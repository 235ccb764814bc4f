//! `fusec compile` end to end: the 8B example, and bad input giving exit code 2 with a
//! message that names the file, line and column.

mod common;

use common::{fusec, scratch};

use std::path::{Path, PathBuf};

const TINY: &str = r#"[model]
architecture = "llama"
hidden_size = 64
num_layers = 2
num_heads = 4
num_kv_heads = 2
intermediate_size = 176
vocab_size = 256
rope_theta = 10000.0
rms_norm_eps = 1e-5
max_seq_len = 128

[decode]
context = 64
"#;

/// Writes `TINY` with `from` replaced by `to`, compiles it, and returns (exit code,
/// stderr, file path).
fn compile_edited(name: &str, from: &str, to: &str) -> (i32, String, PathBuf) {
    assert!(TINY.contains(from), "{from}");
    let dir = scratch(name);
    let path = dir.join("model.toml");
    std::fs::write(&path, TINY.replacen(from, to, 1)).expect("write");
    let out = fusec(&[
        "compile",
        path.to_str().expect("utf8"),
        "--out",
        dir.to_str().expect("utf8"),
    ]);
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
    )
}

fn assert_error(name: &str, from: &str, to: &str, line: usize, needle: &str) {
    let (code, stderr, path) = compile_edited(name, from, to);
    assert_eq!(code, 2, "{name}: {stderr}");
    let at = format!("{}:{line}:", path.display());
    assert!(stderr.contains(&at), "{name}: expected `{at}` in: {stderr}");
    assert!(
        stderr.contains(needle),
        "{name}: expected `{needle}` in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
}

#[test]
fn bad_model_toml() {
    assert_error(
        "unknown-key",
        "vocab_size = 256",
        "vocab_size = 256\nvocab = 3",
        9,
        "unknown field `vocab`",
    );
    assert_error(
        "missing-key",
        "hidden_size = 64\n",
        "",
        1,
        "missing field `hidden_size`",
    );
    assert_error(
        "wrong-type",
        "hidden_size = 64",
        "hidden_size = \"64\"",
        3,
        "invalid type",
    );
    assert_error(
        "heads-divide",
        "num_heads = 4",
        "num_heads = 5",
        5,
        "not divisible by num_heads (5); give head_dim",
    );
    assert_error(
        "kv-multiple",
        "num_kv_heads = 2",
        "num_kv_heads = 3",
        6,
        "not a multiple of num_kv_heads (3)",
    );
    assert_error(
        "zero",
        "num_layers = 2",
        "num_layers = 0",
        4,
        "`num_layers` must be positive, got 0",
    );
    assert_error(
        "negative",
        "vocab_size = 256",
        "vocab_size = -5",
        8,
        "`vocab_size` must be positive, got -5",
    );
    assert_error(
        "context",
        "context = 64",
        "context = 4096",
        14,
        "context 4096 is beyond max_seq_len 128",
    );
    assert_error("syntax", "num_layers = 2", "num_layers = = 2", 4, "");
    assert_error(
        "arch",
        "\"llama\"",
        "\"gpt2\"",
        2,
        "unsupported architecture `gpt2`",
    );
    assert_error(
        "odd-head-dim",
        "num_kv_heads = 2",
        "num_kv_heads = 2\nhead_dim = 15",
        7,
        "head_dim (15) must be even",
    );
}

#[test]
fn bad_hf_config() {
    let dir = scratch("hf");
    let cfg =
        std::fs::read_to_string(common::root().join("tests/fixtures/hf-tiny-llama-s0/config.json"))
            .expect("fixture config");
    let cases = [
        (
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": 3",
            "not a multiple of num_kv_heads (3)",
        ),
        (
            "\"hidden_size\": 64",
            "\"hidden_size\": \"64\"",
            "`hidden_size` must be an integer",
        ),
        (
            "\"vocab_size\": 256",
            "\"vocab_size\": 256,,",
            "invalid JSON",
        ),
        (
            "\"model_type\": \"llama\"",
            "\"model_type\": \"gpt2\"",
            "unsupported model_type `gpt2`",
        ),
        (
            "\"rope_type\": \"default\"",
            "\"rope_type\": \"yarn\"",
            "rope_type `yarn` is not supported",
        ),
    ];
    for (from, to, needle) in cases {
        assert!(cfg.contains(from), "{from}");
        let path = dir.join("config.json");
        std::fs::write(&path, cfg.replacen(from, to, 1)).expect("write");
        let out = fusec(&[
            "compile",
            path.to_str().expect("utf8"),
            "--out",
            dir.to_str().expect("utf8"),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle), "expected `{needle}` in {stderr}");
        // Every JSON error points at a line of config.json.
        assert!(stderr.contains("config.json:"), "{stderr}");
    }
}

#[test]
fn missing_file_and_bad_flags() {
    let out = fusec(&["compile", "no/such/model.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/model.toml: cannot read"));
    let tiny = common::root().join("examples/tiny.toml");
    let out = fusec(&[
        "compile",
        tiny.to_str().expect("utf8"),
        "--context",
        "0",
        "--out",
        scratch("flags").to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`context` must be positive"));
    let out = fusec(&["compile", tiny.to_str().expect("utf8"), "--emit", "pdf"]);
    assert_eq!(out.status.code(), Some(2));
}

fn report(model: &Path, dir: &Path) -> serde_json::Value {
    let json = dir.join("r.json");
    let out = fusec(&[
        "compile",
        model.to_str().expect("utf8"),
        "--out",
        dir.to_str().expect("utf8"),
        "--emit",
        "ir,dot",
        "--report-json",
        json.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).expect("report written")).expect("json")
}

#[test]
fn llama_3_8b_eager_counts() {
    let dir = scratch("8b");
    let r = report(&common::root().join("examples/llama-3-8b.toml"), &dir);
    for key in ["model", "layers", "batch", "context", "precision"] {
        assert!(r.get(key).is_some(), "report has `{key}`");
    }
    let eager = &r["eager"];
    for key in [
        "launches_total",
        "launches_per_layer",
        "bytes_read",
        "bytes_written",
        "flops",
        "floor_bytes",
    ] {
        assert!(eager[key].is_number(), "eager.{key}");
    }
    let per_layer = eager["launches_per_layer"].as_f64().expect("number");
    assert!((36.0..=48.0).contains(&per_layer), "{per_layer}");
    assert_eq!(r["layers"], 32);
    assert!(dir.join("eager.fir").is_file() && dir.join("eager.dot").is_file());
    // The floor holds at least every layer weight once: 32 layers of bf16 weights.
    let floor = eager["floor_bytes"].as_u64().expect("number");
    assert!(floor > 13_000_000_000, "{floor}");
}

#[test]
fn explain_says_why_and_what() {
    let tiny = common::root().join("examples/tiny.toml");
    let tiny = tiny.to_str().expect("utf8");
    let out = fusec(&["explain", tiny]);
    assert!(out.status.success());
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("fused.decode_attention"), "{list}");
    // The first layer's attention in the fused dump of the tiny example.
    let at = list
        .lines()
        .find(|l| l.contains("fused.decode_attention"))
        .and_then(|l| {
            l.trim()
                .strip_prefix('%')?
                .split(' ')
                .next()
                .map(String::from)
        })
        .expect("a numbered attention line");
    let out = fusec(&["explain", tiny, "--node", &at]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "why: built by 5 rule(s)",
        "attention (attention.rules): softmax(q k^T * scale + mask) v",
        "absorb-kv-append (graph pass",
        "replaced 30 eager op(s):",
        "softmax{axis=-1}",
        "cat{axis=-2}",
    ] {
        assert!(text.contains(needle), "`{needle}` in {text}");
    }
    let out = fusec(&["explain", tiny, "--node", "%9999"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no value %9999"));
}
