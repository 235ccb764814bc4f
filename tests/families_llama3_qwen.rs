//! Llama 3.x RoPE scaling, Qwen2/2.5 and Qwen3 through every stage, end to end:
//!
//! - the tiny random checkpoints of tests/fixtures (made by scripts/make_references.py
//!   with transformers 5.24.0) decoded greedily by `fusec run`, eager and fused, and
//!   checked by the shipped `scripts/check_reference.py` (ids exact, logits within
//!   1e-4 relative); FP8 lowering runs too;
//! - the published configurations under examples/ compiled (bf16 and FP8, the CUDA
//!   source emitted), with the fused graph at most 1.02x its memory floor;
//! - configurations fusec does not honour rejected with exit 2, naming the key.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fusec, path_str, root, scratch};

const FIXTURES: [&str; 3] = [
    "hf-tiny-llama3-rope-s0",
    "hf-tiny-qwen2-s0",
    "hf-tiny-qwen3-s0",
];

const EXAMPLES: [&str; 4] = ["llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b", "qwen3-8b"];

/// `fusec run` on a fixture with `extra` flags, then the checker; its last line.
fn checked(fixture: &str, name: &str, extra: &[&str]) -> String {
    let dir = root().join("tests/fixtures").join(fixture);
    let expected_path = dir.join("expected.json");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&expected_path).expect("the fixture's expected.json"),
    )
    .expect("valid JSON");
    let prompt: Vec<String> = expected["prompt"]
        .as_array()
        .expect("a prompt")
        .iter()
        .map(|t| t.to_string())
        .collect();
    let prompt = prompt.join(",");
    let tokens = expected["new_tokens"].to_string();
    let out_path = scratch(&format!("{fixture}-{name}")).join("out.json");
    let mut args = vec![
        "run",
        path_str(&dir),
        "--prompt-ids",
        &prompt,
        "--tokens",
        &tokens,
        "--json",
        path_str(&out_path),
    ];
    args.extend_from_slice(extra);
    let run = fusec(&args);
    assert!(
        run.status.success(),
        "fusec {args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let check = Command::new("python3")
        .arg(root().join("scripts/check_reference.py"))
        .arg(&expected_path)
        .arg(&out_path)
        .output()
        .expect("python3 runs: the reference check needs it");
    let stdout = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success(),
        "{fixture} {name}: check_reference.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    stdout.lines().last().unwrap_or_default().to_string()
}

#[test]
fn fixtures_match_transformers_eager_and_fused() {
    for fixture in FIXTURES {
        for (name, extra) in [("eager", &["--no-fuse"][..]), ("fused", &[][..])] {
            let last = checked(fixture, name, extra);
            assert!(last.starts_with("ok:"), "{fixture} {name}: {last}");
        }
    }
}

#[test]
fn fixtures_lower_to_fp8_and_bf16_and_run() {
    for fixture in FIXTURES {
        let dir = root().join("tests/fixtures").join(fixture);
        for precision in ["fp8", "bf16"] {
            let run = fusec(&[
                "run",
                path_str(&dir),
                "--prompt-ids",
                "1,17,42",
                "--tokens",
                "4",
                "--precision",
                precision,
            ]);
            assert!(
                run.status.success(),
                "{fixture} {precision}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
        }
    }
}

/// The summary `fusec compile --report-json` writes for `model` with `extra` flags.
fn compile_report(model: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let out = scratch(&format!("families-{name}"));
    let json = out.join("report.json");
    let mut args = vec![
        "compile",
        path_str(model),
        "--out",
        path_str(&out),
        "--emit",
        "ir,cuda",
        "--report-json",
        path_str(&json),
        // A name may be compiled again with other flags.
        "--force",
    ];
    args.extend_from_slice(extra);
    let run = fusec(&args);
    assert!(
        run.status.success(),
        "fusec {args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    for file in ["kernels.cu", "launch_plan.json", "fused.fir"] {
        assert!(out.join(file).is_file(), "{name}: no {file}");
    }
    serde_json::from_str(&std::fs::read_to_string(&json).expect("report written"))
        .expect("valid JSON")
}

/// Fused launches per layer of each family: Llama 3's RoPE scaling changes only a
/// load-time constant; Qwen2's q/k/v biases and Qwen3's q/k norms are still
/// kernels of their own (3 and 2 more than Llama's 5).
fn launches_per_layer(name: &str) -> f64 {
    if name.starts_with("llama") {
        5.0
    } else if name.starts_with("qwen2") {
        8.0
    } else {
        7.0
    }
}

#[test]
fn published_configurations_compile_near_their_floor() {
    for example in EXAMPLES {
        let dir = root().join("examples").join(example);
        for precision in ["bf16", "fp8"] {
            let r = compile_report(
                &dir,
                &format!("{example}-{precision}"),
                &["--precision", precision],
            );
            let fused = &r["fused"];
            let ratio = fused["floor_ratio"].as_f64().expect("floor_ratio");
            assert!(ratio <= 1.02, "{example} {precision}: {ratio}x its floor");
            assert_eq!(
                fused["launches_per_layer"].as_f64(),
                Some(launches_per_layer(example)),
                "{example} {precision}"
            );
        }
    }
}

#[test]
fn fixtures_compile_with_cuda() {
    for fixture in FIXTURES {
        let dir = root().join("tests/fixtures").join(fixture);
        for precision in ["f32", "fp8"] {
            let r = compile_report(
                &dir,
                &format!("{fixture}-{precision}"),
                &["--precision", precision],
            );
            let name = fixture.trim_start_matches("hf-tiny-");
            assert_eq!(
                r["fused"]["launches_per_layer"].as_f64(),
                Some(launches_per_layer(name)),
                "{fixture} {precision}"
            );
        }
    }
    // Llama 3's scaled inverse frequencies are a load-time constant of the plan.
    let out = scratch("families-hf-tiny-llama3-rope-s0-f32");
    let plan = std::fs::read_to_string(out.join("launch_plan.json")).expect("plan");
    assert!(plan.contains("rope_inv_freq_llama3"), "{plan}");
    let fused = std::fs::read_to_string(out.join("fused.fir")).expect("dump");
    assert!(fused.contains("rope.inv_freq_llama3{factor=8.0"), "{fused}");
}

/// `fusec compile` of `base`'s config.json with `from` replaced by `to`: exit 2, and
/// stderr names `needle`.
fn rejected(base: &str, cases: &[(&str, &str, &str)]) {
    let cfg = std::fs::read_to_string(root().join(base).join("config.json")).expect("config");
    for (i, (from, to, needle)) in cases.iter().enumerate() {
        assert!(cfg.contains(from), "{from}");
        let dir = scratch(&format!("families-reject-{}-{i}", base.replace('/', "_")));
        let path = dir.join("config.json");
        std::fs::write(&path, cfg.replacen(from, to, 1)).expect("write");
        let out = fusec(&["compile", path_str(&path), "--out", path_str(&dir)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: {stderr}");
        assert!(stderr.contains(needle), "expected `{needle}` in {stderr}");
        assert!(stderr.contains("config.json:"), "{stderr}");
    }
}

#[test]
fn unsupported_rope_types_are_rejected_by_name() {
    // transformers 5.x spelling: `rope_parameters.rope_type`.
    let v5 = "\"rope_type\": \"llama3\"";
    let mut cases = Vec::new();
    for ty in ["linear", "dynamic", "yarn", "longrope", "su", "nope"] {
        cases.push((
            v5,
            format!("\"rope_type\": \"{ty}\""),
            format!("`rope_parameters.rope_type`: rope_type `{ty}` is not supported"),
        ));
    }
    cases.push((
        v5,
        "\"rope_type\": 3".into(),
        "`rope_parameters.rope_type` must be a string".into(),
    ));
    // A factor without a type.
    cases.push((
        "    \"rope_type\": \"llama3\"\n",
        "    \"rope_type\": null\n".into(),
        "`rope_parameters.factor` is given without a `rope_type`".into(),
    ));
    cases.push((
        "\"factor\": 8.0,",
        "\"factor\": 8.0, \"partial_rotary_factor\": 0.5,".into(),
        "`rope_parameters.partial_rotary_factor` other than 1.0 is not supported".into(),
    ));
    cases.push((
        "\"hidden_act\": \"silu\",",
        "\"hidden_act\": \"silu\", \"partial_rotary_factor\": 0.4,".into(),
        "`partial_rotary_factor` other than 1.0 is not supported".into(),
    ));
    // A missing llama3 key.
    cases.push((
        "\"low_freq_factor\": 1.0,",
        "".into(),
        "needs `low_freq_factor`".into(),
    ));
    let cases: Vec<(&str, &str, &str)> = cases
        .iter()
        .map(|(a, b, c)| (*a, b.as_str(), c.as_str()))
        .collect();
    rejected("tests/fixtures/hf-tiny-llama3-rope-s0", &cases);

    // transformers 4.x spelling: `rope_scaling.type` and `rope_scaling.rope_type`.
    let v4 = "\"rope_type\": \"llama3\"";
    rejected(
        "examples/llama-3.1-8b",
        &[
            (
                v4,
                "\"type\": \"yarn\"",
                "`rope_scaling.type`: rope_type `yarn` is not supported",
            ),
            (
                v4,
                "\"rope_type\": \"dynamic\"",
                "`rope_scaling.rope_type`: rope_type `dynamic` is not supported",
            ),
            (
                v4,
                "\"type\": \"linear\"",
                "`rope_scaling.type`: rope_type `linear` is not supported",
            ),
            (
                v4,
                "\"rope_type\": \"longrope\"",
                "rope_type `longrope` is not supported",
            ),
            (v4, "\"type\": 1", "`rope_scaling.type` must be a string"),
            (
                v4,
                "\"rope_typ\": \"llama3\"",
                "`rope_scaling.factor` is given without a `rope_type`",
            ),
        ],
    );
}

#[test]
fn unsupported_qwen_settings_are_rejected_by_name() {
    rejected(
        "tests/fixtures/hf-tiny-qwen2-s0",
        &[
            (
                "\"full_attention\",\n    \"full_attention\"",
                "\"chunked_attention\",\n    \"full_attention\"",
                "unsupported layer type \"chunked_attention\" in `layer_types`",
            ),
            (
                "\"model_type\": \"qwen2\"",
                "\"model_type\": \"qwen2_moe\"",
                "unsupported model_type `qwen2_moe`",
            ),
            (
                "\"rope_type\": \"default\"",
                "\"rope_type\": \"yarn\"",
                "rope_type `yarn` is not supported",
            ),
        ],
    );
    rejected(
        "examples/qwen2.5-7b",
        &[(
            "\"use_mrope\": false",
            "\"use_mrope\": true",
            "`use_mrope` = true is not supported",
        )],
    );
    rejected(
        "tests/fixtures/hf-tiny-qwen3-s0",
        &[
            (
                "\"attention_bias\": false",
                "\"attention_bias\": true",
                "`attention_bias` = true is not supported",
            ),
            (
                "\"hidden_act\": \"silu\"",
                "\"hidden_act\": \"gelu\"",
                "unsupported hidden_act `gelu`",
            ),
        ],
    );
}

/// `model.toml` takes the same keys: `[model.rope_scaling]` for Llama 3's RoPE and
/// `architecture = "qwen2"` / `"qwen3"`. Pointed at the fixtures' weights, each
/// decodes as transformers does.
#[test]
fn model_toml_spells_the_same_models() {
    let toml = |arch: &str, theta: &str, extra: &str, weights: &str| {
        format!(
            "[model]\narchitecture = \"{arch}\"\nhidden_size = 64\nnum_layers = 2\n\
             num_heads = 4\nnum_kv_heads = 2\nhead_dim = 16\nintermediate_size = 176\n\
             vocab_size = 256\nrope_theta = {theta}\nrms_norm_eps = 1e-5\nmax_seq_len = 128\n\
             {extra}\n[weights]\npath = \"{weights}\"\n"
        )
    };
    let llama3 = "[model.rope_scaling]\nrope_type = \"llama3\"\nfactor = 8.0\n\
                  low_freq_factor = 1.0\nhigh_freq_factor = 4.0\n\
                  original_max_position_embeddings = 16\n";
    for (fixture, arch, theta, extra) in [
        ("hf-tiny-llama3-rope-s0", "llama", "500000.0", llama3),
        ("hf-tiny-qwen2-s0", "qwen2", "1000000.0", ""),
        ("hf-tiny-qwen3-s0", "qwen3", "1000000.0", ""),
    ] {
        let dir = root().join("tests/fixtures").join(fixture);
        let expected_path = dir.join("expected.json");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&expected_path).expect("expected.json"))
                .expect("valid JSON");
        let prompt: Vec<String> = expected["prompt"]
            .as_array()
            .expect("a prompt")
            .iter()
            .map(|t| t.to_string())
            .collect();
        let out = scratch(&format!("families-toml-{fixture}"));
        let model = out.join("model.toml");
        std::fs::write(&model, toml(arch, theta, extra, path_str(&dir))).expect("write");
        let json = out.join("out.json");
        let tokens = expected["new_tokens"].to_string();
        let run = fusec(&[
            "run",
            path_str(&model),
            "--prompt-ids",
            &prompt.join(","),
            "--tokens",
            &tokens,
            "--json",
            path_str(&json),
        ]);
        assert!(
            run.status.success(),
            "{fixture}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let check = Command::new("python3")
            .arg(root().join("scripts/check_reference.py"))
            .arg(&expected_path)
            .arg(&json)
            .output()
            .expect("python3 runs");
        assert!(
            check.status.success(),
            "{fixture} from model.toml: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
    // Another rope type is rejected at its value.
    let out = scratch("families-toml-yarn");
    let model = out.join("model.toml");
    let bad = toml("llama", "500000.0", llama3, "none").replace("\"llama3\"", "\"yarn\"");
    std::fs::write(&model, bad).expect("write");
    let run = fusec(&["compile", path_str(&model), "--out", path_str(&out)]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("rope_scaling.rope_type `yarn` is not supported"),
        "{stderr}"
    );
    assert!(stderr.contains("model.toml:"), "{stderr}");
}
