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

/// `fusec compile examples/tiny.toml --paged 4` with `extra` flags, writing IR, CUDA
/// and the report into a scratch directory: (report, directory).
fn paged_report(name: &str, extra: &[&str]) -> (serde_json::Value, PathBuf) {
    let dir = scratch(name);
    let json = dir.join("r.json");
    let tiny = common::root().join("examples/tiny.toml");
    let mut args = vec![
        "compile",
        tiny.to_str().expect("utf8"),
        "--paged",
        "4",
        "--out",
        dir.to_str().expect("utf8"),
        "--emit",
        "ir,cuda",
        "--report-json",
        json.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    let out = fusec(&args);
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("paged KV cache: blocks of 4 positions"),
        "{stdout}"
    );
    let r = serde_json::from_str(&std::fs::read_to_string(json).expect("report written"))
        .expect("json");
    (r, dir)
}

// The tiny example: 2 layers, 2 KV heads of 16 dimensions, f32. One position of one
// layer's keys and values is 2 (K,V) x 2 x 16 x 4 bytes.
const TINY_LAYERS: u64 = 2;
const TINY_KV_POSITION: u64 = 2 * 2 * 16 * 4;

#[test]
fn paged_step_compiles_with_costs_from_the_real_lengths() {
    let (r, dir) = paged_report("paged-16", &["--context", "16", "--batch", "2"]);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect(f);
    // The IR reads the cache through the block table.
    for fir in ["eager.fir", "fused.fir"] {
        let ir = read(fir);
        assert!(ir.contains("block_table"), "{fir}");
        assert!(ir.contains("fused.paged"), "{fir}");
        assert!(!ir.contains("attention_mask"), "{fir}");
    }
    assert!(read("fused.fir").contains("fused.paged_decode_attention"));
    // CUDA: the write of the new entries, then the attention, for each layer.
    let cu = read("kernels.cu");
    assert!(cu.contains("_paged_write("), "no paged write kernel");
    assert!(
        cu.contains("_paged_attention("),
        "no paged attention kernel"
    );
    let plan: serde_json::Value = serde_json::from_str(&read("launch_plan.json")).expect("json");
    let launches = plan["launches"].as_array().expect("launches");
    let named = |k: &str| {
        launches
            .iter()
            .filter(|l| l["kernel"].as_str().is_some_and(|n| n.ends_with(k)))
            .count() as u64
    };
    assert_eq!(named("_paged_write"), TINY_LAYERS);
    assert_eq!(named("_paged_attention"), TINY_LAYERS);
    // The report counts the launches as CUDA makes them: two per paged attention.
    let fused = &r["fused"];
    assert_eq!(
        fused["launches_total"].as_u64(),
        Some(launches.len() as u64)
    );
    assert!(read("eager_kernels.cu").contains("_paged_write("));
    // The KV traffic, by hand: 2 sequences x 16 positions x every layer.
    assert_eq!(r["batch"], 2);
    assert_eq!(r["context"], 16);
    let paged = &r["paged"];
    assert_eq!(paged["block_size"], 4);
    assert_eq!(paged["lengths"], serde_json::json!([16, 16]));
    assert_eq!(
        paged["kv_read_bytes"].as_u64(),
        Some(2 * 16 * TINY_KV_POSITION * TINY_LAYERS)
    );
    assert_eq!(
        paged["kv_write_bytes"].as_u64(),
        Some(2 * TINY_KV_POSITION * TINY_LAYERS)
    );

    // Twice the context: twice the KV read, and nothing else read changes.
    let (r32, _) = paged_report("paged-32", &["--context", "32", "--batch", "2"]);
    let kv = |r: &serde_json::Value| r["paged"]["kv_read_bytes"].as_u64().expect("u64");
    assert_eq!(kv(&r32), 2 * kv(&r));
    for variant in ["eager", "fused"] {
        let bytes = |r: &serde_json::Value| r[variant]["bytes_read"].as_u64().expect("u64");
        assert_eq!(bytes(&r32) - bytes(&r), kv(&r32) - kv(&r), "{variant}");
        assert_eq!(r32[variant]["launches_total"], r[variant]["launches_total"]);
    }
}

#[test]
fn paged_step_of_a_ragged_batch() {
    let (r, _) = paged_report("paged-ragged", &["--lengths", "3,16,1"]);
    assert_eq!(r["batch"], 3);
    assert_eq!(r["context"], 16);
    assert_eq!(r["paged"]["lengths"], serde_json::json!([3, 16, 1]));
    assert_eq!(
        r["paged"]["kv_read_bytes"].as_u64(),
        Some((3 + 16 + 1) * TINY_KV_POSITION * TINY_LAYERS)
    );
}

#[test]
fn bad_paged_options() {
    let tiny = common::root().join("examples/tiny.toml");
    let tiny = tiny.to_str().expect("utf8");
    let dir = scratch("paged-bad");
    let dir = dir.to_str().expect("utf8");
    let gemma = common::root().join("examples/gemma-2-9b");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![tiny, "--paged", "0"], "--paged"),
        (vec![tiny, "--paged", "256"], "--paged"),
        (
            vec![tiny, "--paged", "4", "--lengths", "1,129"],
            "--lengths",
        ),
        (vec![tiny, "--paged", "4", "--lengths", "0"], "--lengths"),
        (vec![tiny, "--lengths", "3,4"], "--paged"),
        (
            vec![tiny, "--paged", "4", "--lengths", "3", "--batch", "2"],
            "--batch",
        ),
        (vec![tiny, "--paged", "4", "--context", "129"], "context"),
        (
            vec![gemma.to_str().expect("utf8"), "--paged", "16"],
            "--paged: no paged step",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["compile"];
        all.extend(args.iter().copied());
        all.extend(["--out", dir]);
        let out = fusec(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected `{needle}` in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
