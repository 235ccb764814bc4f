//! OLMo 2 and Granite 3 through every stage, end to end through the binary:
//!
//! - their tiny Hugging Face references (`tests/fixtures/hf-tiny-olmo2-s0`,
//!   `hf-tiny-granite-s3`, made by `scripts/make_references.py`) decoded by
//!   `fusec run`, eager and fused, and accepted by the shipped
//!   `scripts/check_reference.py` (ids exact, logits within 1e-4 relative);
//! - the fused launches per layer and the memory floor of the published
//!   configurations (`examples/olmo-2-7b`, `examples/granite-3.1-8b`) in every
//!   precision;
//! - FP8 compiled and run; the CUDA kernels of every new variant emitted;
//! - the fused graph decoding as the eager one in bf16 on the CPU executor;
//! - config keys that would change the maths and are not implemented: exit 2, naming
//!   the key.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fusec, misses_only_near_ties, path_str, root, scratch};
use fusec::exec::{Executor, Session, Weights};
use fusec::pipeline;
use fusec_model::frontend::Precision;

const OLMO2: &str = "tests/fixtures/hf-tiny-olmo2-s0";
const GRANITE: &str = "tests/fixtures/hf-tiny-granite-s3";

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("readable")).expect("valid JSON")
}

/// Runs `fusec args`, which must succeed.
fn ok(args: &[&str]) {
    let out = fusec(args);
    assert!(
        out.status.success(),
        "fusec {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `fusec run` on the fixture with `extra` flags, then the shipped checker on the
/// result; returns the checker's last line.
fn checked(fixture: &str, name: &str, extra: &[&str]) -> String {
    let dir = root().join(fixture);
    let expected_path = dir.join("expected.json");
    let expected = read_json(&expected_path);
    let prompt: Vec<String> = expected["prompt"]
        .as_array()
        .expect("a prompt")
        .iter()
        .map(|t| t.to_string())
        .collect();
    let prompt = prompt.join(",");
    let tokens = expected["new_tokens"].to_string();
    let out = scratch(&format!("families-{name}")).join("out.json");
    let mut args = vec![
        "run",
        path_str(&dir),
        "--prompt-ids",
        &prompt,
        "--tokens",
        &tokens,
        "--json",
        path_str(&out),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    let check = Command::new("python3")
        .arg(root().join("scripts/check_reference.py"))
        .arg(&expected_path)
        .arg(&out)
        .output()
        .expect("python3 runs: the reference check needs it");
    let stdout = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success(),
        "{fixture} {extra:?}: check_reference.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    stdout.lines().last().unwrap_or_default().to_string()
}

#[test]
fn olmo2_matches_hugging_face_eager_and_fused() {
    for (name, extra) in [
        ("olmo2-eager", &["--no-fuse"][..]),
        ("olmo2-fused", &[][..]),
    ] {
        let last = checked(OLMO2, name, extra);
        assert!(last.starts_with("ok: 16/16"), "{name}: {last}");
    }
}

#[test]
fn granite_matches_hugging_face_eager_and_fused() {
    for (name, extra) in [
        ("granite-eager", &["--no-fuse"][..]),
        ("granite-fused", &[][..]),
    ] {
        let last = checked(GRANITE, name, extra);
        assert!(last.starts_with("ok: 16/16"), "{name}: {last}");
    }
}

/// `fusec compile MODEL --report-json` in `precision` (and `--emit cuda`); returns the
/// report and the dump directory.
fn compile(model: &str, precision: &str, tag: &str) -> (serde_json::Value, PathBuf) {
    let dir = scratch(&format!("families-compile-{tag}-{precision}"));
    let report = dir.join("report.json");
    let model = root().join(model);
    let mut args = vec![
        "compile",
        path_str(&model),
        "--out",
        path_str(&dir),
        "--emit",
        "ir,cuda",
        "--report-json",
        path_str(&report),
        // Each fixture compiles into the directory of its tag and precision in turn.
        "--force",
    ];
    if precision != "default" {
        args.extend(["--precision", precision]);
    }
    ok(&args);
    (read_json(&report), dir)
}

/// The published configurations compile in every precision, with the fused launches
/// per layer the README states and within 2% of their memory floor.
#[test]
fn the_published_configurations_fuse_to_their_launch_counts() {
    for (model, per_layer, layers) in [
        ("examples/olmo-2-7b", 7.0, 32),
        ("examples/granite-3.1-8b", 5.0, 40),
    ] {
        for precision in ["default", "f32", "bf16", "fp8"] {
            let (r, _) = compile(model, precision, "example");
            assert_eq!(r["layers"], layers, "{model}");
            let fused = &r["fused"];
            assert_eq!(
                fused["launches_per_layer"], per_layer,
                "{model} {precision}"
            );
            let ratio = fused["floor_ratio"].as_f64().expect("a ratio");
            assert!(ratio <= 1.02, "{model} {precision}: {ratio}x the floor");
        }
    }
}

/// The fixtures fuse to the same launches per layer; their floor ratio is higher than
/// the real models' because a 64-wide model's activations are not small next to its
/// weights (the Llama fixture's is 1.023 at its default context).
#[test]
fn the_fixtures_fuse_like_the_published_configurations() {
    for (fixture, per_layer, max_ratio) in [(OLMO2, 7.0, 1.03), (GRANITE, 5.0, 1.03)] {
        let (r, _) = compile(fixture, "default", "fixture");
        assert_eq!(r["fused"]["launches_per_layer"], per_layer, "{fixture}");
        let ratio = r["fused"]["floor_ratio"].as_f64().expect("a ratio");
        assert!(ratio <= max_ratio, "{fixture}: {ratio}");
    }
}

/// Every new kernel variant is emitted as CUDA, in f32, bf16 and FP8.
#[test]
fn cuda_codegen_emits_the_new_kernels() {
    for (fixture, families) in [
        (OLMO2, &["gemv_post_norm"][..]),
        (GRANITE, &["gemv_scale_add"][..]),
    ] {
        for precision in ["f32", "bf16", "fp8"] {
            let (_, dir) = compile(fixture, precision, "cuda");
            let cu = std::fs::read_to_string(dir.join("kernels.cu")).expect("kernels.cu");
            for family in families {
                let pattern = format!("_{family}(");
                let named = cu
                    .lines()
                    .any(|l| l.contains("__global__") && l.contains(&pattern));
                assert!(named, "{fixture} {precision}: no {family} kernel");
            }
            if fixture == OLMO2 && precision != "f32" {
                // The q and k norms in half precision: Olmo2RMSNorm's order.
                assert!(
                    cu.contains("_post_rms_norm("),
                    "{precision}: no post_rms_norm"
                );
            }
            assert!(dir.join("launch_plan.json").is_file());
        }
    }
}

/// FP8 compiles and runs for both families, close to the f32 reference.
#[test]
fn fp8_runs_both_families() {
    for (fixture, name) in [(OLMO2, "olmo2"), (GRANITE, "granite")] {
        let out = scratch(&format!("families-fp8-{name}")).join("fp8.json");
        let dir = root().join(fixture);
        ok(&[
            "run",
            path_str(&dir),
            "--prompt-ids",
            "1,17,42,99,7",
            "--tokens",
            "16",
            "--precision",
            "fp8",
            "--compare",
            "--json",
            path_str(&out),
        ]);
        let run = read_json(&out);
        assert_eq!(run["precision"], "fp8", "{name}");
        assert_eq!(run["generated"].as_array().map(Vec::len), Some(16));
        let acc = &run["accuracy"];
        misses_only_near_ties(acc, name);
        let kl = acc["mean_kl"].as_f64().expect("a number");
        assert!(kl < 0.05, "{name}: mean KL {kl}");
    }
}

/// In bf16 the fused graph decodes as the eager bf16 graph does (same ids, logits
/// within bf16 rounding: the fused attention keeps its probabilities in f32, so the
/// graphs are not bit-identical, for Llama either). The new kernels themselves are
/// bit-identical to their eager compositions (`crates/fusec-exec/tests/fused_families.rs`).
#[test]
fn bf16_fused_graphs_decode_like_eager() {
    for fixture in [OLMO2, GRANITE] {
        let spec = pipeline::load(&root().join(fixture), None, None).expect("loads");
        let spec = pipeline::in_precision(&spec, Precision::Bf16);
        let eager = pipeline::eager(&spec).expect("builds");
        let rules = pipeline::rules(&[]).expect("built-in rules");
        let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
        let path = spec.weights.clone().expect("the fixture has weights");
        let weights = Weights::load(&path, &eager).expect("loads in bf16");
        let decode = |g| {
            let exec = Executor::new(g, &weights).expect("plans");
            Session::with_capacity(exec, 1, 24)
                .expect("session")
                .generate(&[vec![1, 17, 42, 99, 7]], 12)
                .expect("decodes")
        };
        let (e, f) = (decode(eager), decode(fused));
        assert_eq!(e.generated, f.generated, "{fixture}");
        for (a, b) in e.rows(0).zip(f.rows(0)) {
            let (mut num, mut den) = (0f64, 0f64);
            for (x, y) in a.iter().zip(b) {
                num += f64::from(x - y).powi(2);
                den += f64::from(*x).powi(2);
            }
            let rel = (num / den).sqrt();
            assert!(rel < 2e-2, "{fixture}: relative L2 {rel}");
        }
    }
}

/// A config of these families that asks for maths fusec does not implement is refused
/// with exit 2, naming the key.
#[test]
fn unimplemented_keys_are_rejected_by_name() {
    let dir = scratch("families-reject");
    for (fixture, key, value) in [
        (OLMO2, "attention_bias", "true"),
        (OLMO2, "hidden_act", "\"gelu\""),
        (
            OLMO2,
            "rope_parameters",
            r#"{"rope_type": "yarn", "factor": 4.0}"#,
        ),
        (GRANITE, "mlp_bias", "true"),
        (GRANITE, "attention_bias", "true"),
        (GRANITE, "hidden_act", "\"relu\""),
        (
            GRANITE,
            "rope_scaling",
            r#"{"rope_type": "linear", "factor": 2.0}"#,
        ),
        (GRANITE, "logits_scaling", "0.0"),
        (GRANITE, "residual_multiplier", "\"x\""),
    ] {
        let case = dir.join(format!(
            "{}-{key}",
            fixture.rsplit('/').next().unwrap_or("m")
        ));
        let config = root().join(fixture).join("config.json");
        let (code, stderr) = common::compile_edited_config(&config, key, value, &case);
        assert_eq!(code, Some(2), "{fixture} {key}: {stderr}");
        assert!(stderr.contains(key), "{fixture} {key}: {stderr}");
    }
}

/// The published configurations print and parse back identically, eager and fused
/// (what `tests/roundtrip.rs` checks for the `.toml` examples).
#[test]
fn the_published_configurations_round_trip_through_the_text_form() {
    let rules = pipeline::rules(&[]).expect("built-in rules");
    for model in ["examples/olmo-2-7b", "examples/granite-3.1-8b"] {
        let spec = pipeline::load(&root().join(model), None, None).expect("valid model");
        let eager = pipeline::eager(&spec).expect("builds");
        let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
        for (what, g) in [("eager", eager), ("fused", fused)] {
            let printed = fusec_ir::text::print(&g).expect("acyclic");
            let parsed = fusec_ir::text::parse(&printed)
                .unwrap_or_else(|e| panic!("{model} {what}: reparse failed: {e}"));
            fusec_ir::verify(&parsed).unwrap_or_else(|e| panic!("{model} {what}: {e}"));
            let again = fusec_ir::text::print(&parsed).expect("acyclic");
            assert!(
                printed == again,
                "{model} {what}: print(parse(text)) != text"
            );
        }
    }
}

/// `fusec compile --context 11` predicts what `fusec run` measures over 21 steps (S =
/// 0..20 average to S = 10): launches and bytes per step, eager and fused, so the new
/// kernels are counted alike by the cost model and the CPU executor.
#[test]
fn compile_predicts_what_run_measures() {
    for (fixture, name) in [(OLMO2, "olmo2"), (GRANITE, "granite")] {
        let dir = scratch(&format!("families-predict-{name}"));
        let model = root().join(fixture);
        for (variant, extra) in [("eager", &["--no-fuse"][..]), ("fused", &[][..])] {
            let report = dir.join(format!("compile-{variant}.json"));
            ok(&[
                "compile",
                path_str(&model),
                "--context",
                "11",
                "--out",
                path_str(&dir),
                "--report-json",
                path_str(&report),
            ]);
            let p = &read_json(&report)[variant];
            let out = dir.join(format!("run-{variant}.json"));
            let mut args = vec![
                "run",
                path_str(&model),
                "--prompt-ids",
                "1,17,42,99,7",
                "--tokens",
                "17",
                "--json",
                path_str(&out),
                // Every step a decode step, as compile predicts them.
                "--prefill-chunk",
                "1",
            ];
            args.extend_from_slice(extra);
            ok(&args);
            let stats = &read_json(&out)["stats"];
            assert_eq!(stats["steps"], 21, "{name} {variant}");
            assert_eq!(
                stats["launches_per_step"], p["launches_total"],
                "{name} {variant}"
            );
            let bytes = p["bytes_read"].as_u64().expect("bytes")
                + p["bytes_written"].as_u64().expect("bytes");
            assert_eq!(stats["bytes_per_step"], bytes, "{name} {variant}");
        }
    }
}
