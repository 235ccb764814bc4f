//! Gemma 2 and Gemma 3 (text) through every stage:
//!
//! - their tiny Hugging Face references (`tests/fixtures/hf-tiny-gemma2-s0`,
//!   `hf-tiny-gemma3-s0`, made by `scripts/make_references.py` with transformers
//!   5.24.0) decoded on the CPU executor, eager and fused, in f32: ids exact, logits
//!   within 1e-4 relative, at all 5 prompt positions and all 16 generated steps: the
//!   fixtures' sliding window is 8, so their windowed layers decode past it through
//!   ring-buffer caches;
//! - `fusec run` decoding past the window as the reference does, and `compile` taking a
//!   context beyond it;
//! - the fused launches per layer and the memory floor of the published configuration
//!   (`examples/gemma-2-9b`) in every precision;
//! - FP8 compiled and run; the CUDA kernels emitted;
//! - config keys that would change the maths and are not implemented: exit 2, naming
//!   the key.

mod common;

use std::path::{Path, PathBuf};

use common::{fusec, path_str, root, scratch};
use fusec::exec::{Executor, Session, Weights};
use fusec::pipeline;
use fusec_ir::Graph;
use fusec_model::frontend::Precision;

const GEMMA2: &str = "tests/fixtures/hf-tiny-gemma2-s0";
const GEMMA3: &str = "tests/fixtures/hf-tiny-gemma3-s0";
const FIXTURES: [&str; 2] = [GEMMA2, GEMMA3];

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

/// A fixture's reference: the prompt, the greedy ids, the logits of every decode step
/// and of every prompt position.
struct Reference {
    prompt: Vec<i32>,
    generated: Vec<i32>,
    logits: Vec<Vec<f32>>,
    prefill_logits: Vec<Vec<f32>>,
    window: usize,
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("a row")
                .iter()
                .map(|x| x.as_f64().expect("a number") as f32)
                .collect()
        })
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<i32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_i64().expect("an id") as i32)
        .collect()
}

fn reference(fixture: &str) -> Reference {
    let dir = root().join(fixture);
    let e = read_json(&dir.join("expected.json"));
    let config = read_json(&dir.join("config.json"));
    Reference {
        prompt: ids(&e["prompt"]),
        generated: ids(&e["generated"]),
        logits: rows(&e["logits"]),
        prefill_logits: rows(&e["prefill_logits"]),
        window: config["sliding_window"].as_u64().expect("a window") as usize,
    }
}

impl Reference {
    /// The decode steps whose position is past the window: step 0 is the prefill's
    /// last position `P-1`, step `i` feeds `generated[i-1]` at position `P+i-1`.
    fn steps_past_the_window(&self) -> usize {
        (self.prompt.len() + self.generated.len()).saturating_sub(self.window + 1)
    }
}

/// `||a - e|| / ||e||`.
fn rel_l2(a: &[f32], e: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(e) {
        num += f64::from(x - y).powi(2);
        den += f64::from(*y).powi(2);
    }
    (num / den).sqrt()
}

/// Feeds the prompt one position at a time, then the greedy ids, for `steps` decode
/// steps; returns the logits at every prompt position and of every decode step, and
/// the ids chosen.
fn decode(graph: Graph, weights: &Weights, prompt: &[i32], steps: usize) -> Decoded {
    let exec = Executor::new(graph, weights).expect("plans");
    let mut s = Session::with_capacity(exec, 1, prompt.len() + steps).expect("session");
    let mut prefill = Vec::new();
    for &t in prompt {
        let out = s.step(&[t]).expect("steps");
        prefill.push(out.logits.row(0).to_vec());
    }
    let mut logits = vec![prefill.last().expect("a prompt").clone()];
    let argmax = |row: &[f32]| {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        best as i32
    };
    let mut generated = vec![argmax(&logits[0])];
    while generated.len() < steps {
        let out = s.step(&[*generated.last().expect("an id")]).expect("steps");
        let row = out.logits.row(0).to_vec();
        generated.push(argmax(&row));
        logits.push(row);
    }
    Decoded {
        prefill,
        logits,
        generated,
    }
}

struct Decoded {
    prefill: Vec<Vec<f32>>,
    logits: Vec<Vec<f32>>,
    generated: Vec<i32>,
}

/// The eager and fused f32 graphs of a fixture, with its weights.
fn graphs(fixture: &str) -> (Graph, Graph, Weights) {
    let spec = pipeline::load(&root().join(fixture), None, None).expect("loads");
    assert_eq!(spec.target.precision, Precision::F32);
    let eager = pipeline::eager(&spec).expect("builds");
    let rules = pipeline::rules(&[]).expect("built-in rules");
    let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
    let path = spec.weights.clone().expect("the fixture has weights");
    let weights = Weights::load(&path, &eager).expect("loads");
    (eager, fused, weights)
}

/// Eager and fused, both Gemmas decode their references in f32 at every prompt
/// position and every step, past the window too: ids exact, logits within 1e-4.
#[test]
fn gemma_matches_hugging_face_past_the_window_eager_and_fused() {
    for fixture in FIXTURES {
        let r = reference(fixture);
        let steps = r.generated.len();
        assert_eq!(steps, 16, "{fixture}");
        assert_eq!(r.steps_past_the_window(), 12, "{fixture}: positions 9..=20");
        let (eager, fused, weights) = graphs(fixture);
        for (variant, graph) in [("eager", eager), ("fused", fused)] {
            let d = decode(graph, &weights, &r.prompt, steps);
            assert_eq!(
                d.generated,
                r.generated[..steps],
                "{fixture} {variant}: ids"
            );
            for (pos, (a, e)) in d.prefill.iter().zip(&r.prefill_logits).enumerate() {
                let rel = rel_l2(a, e);
                assert!(
                    rel <= 1e-4,
                    "{fixture} {variant}: prompt position {pos}: {rel}"
                );
            }
            for (step, (a, e)) in d.logits.iter().zip(&r.logits).enumerate() {
                let rel = rel_l2(a, e);
                assert!(rel <= 1e-4, "{fixture} {variant}: step {step}: {rel}");
            }
        }
    }
}

/// `fusec run` decodes past the window as the reference does, and `compile` takes a
/// context beyond it.
#[test]
fn run_decodes_past_the_window() {
    for fixture in FIXTURES {
        let dir = root().join(fixture);
        let out = scratch(&format!(
            "gemma-window-{}",
            fixture.rsplit('/').next().unwrap_or("m")
        ))
        .join("out.json");
        ok(&[
            "run",
            path_str(&dir),
            "--prompt-ids",
            "1,17,42,99,7",
            "--tokens",
            "16",
            "--json",
            path_str(&out),
        ]);
        let r = reference(fixture);
        assert_eq!(ids(&read_json(&out)["generated"]), r.generated);
        let compile = fusec(&[
            "compile",
            path_str(&dir),
            "--context",
            "21",
            "--out",
            path_str(out.parent().expect("a dir")),
        ]);
        assert!(
            compile.status.success(),
            "{fixture}: {}",
            String::from_utf8_lossy(&compile.stderr)
        );
    }
}

/// `fusec compile MODEL --report-json` in `precision` (and `--emit cuda`); returns the
/// report and the dump directory.
fn compile(model: &str, precision: &str, tag: &str) -> (serde_json::Value, PathBuf) {
    let dir = scratch(&format!("gemma-compile-{tag}-{precision}"));
    let report = dir.join("report.json");
    let model = root().join(model);
    let mut args = vec![
        "compile",
        path_str(&model),
        "--out",
        path_str(&dir),
        "--emit",
        "ir,cuda",
        "--force",
        "--report-json",
        path_str(&report),
    ];
    if precision != "default" {
        args.extend(["--precision", precision]);
    }
    ok(&args);
    (read_json(&report), dir)
}

/// The fused launches per layer of Gemma 2 (see README's table).
const GEMMA2_LAUNCHES_PER_LAYER: f64 = 5.0;

/// The published Gemma 2 9B configuration compiles in every precision, with the fused
/// launches per layer the README states and within 2% of its memory floor.
#[test]
fn the_published_configuration_fuses_to_its_launch_count() {
    for precision in ["default", "f32", "bf16", "fp8"] {
        let (r, _) = compile("examples/gemma-2-9b", precision, "example");
        assert_eq!(r["layers"], 42);
        let fused = &r["fused"];
        assert_eq!(
            fused["launches_per_layer"], GEMMA2_LAUNCHES_PER_LAYER,
            "{precision}"
        );
        let ratio = fused["floor_ratio"].as_f64().expect("a ratio");
        assert!(ratio <= 1.02, "{precision}: {ratio}x the floor");
    }
}

/// The fixtures fuse as the published configuration does (Gemma 2) and as Gemma 3's
/// maths allows; their floor ratio is higher than the real models' because a 64-wide
/// model's activations are not small next to its weights.
#[test]
fn the_fixtures_fuse_to_their_launch_counts() {
    for (fixture, per_layer, max_ratio) in [
        (GEMMA2, GEMMA2_LAUNCHES_PER_LAYER, 1.07),
        (GEMMA3, GEMMA3_LAUNCHES_PER_LAYER, 1.05),
    ] {
        let (r, _) = compile(fixture, "default", "fixture");
        assert_eq!(r["fused"]["launches_per_layer"], per_layer, "{fixture}");
        let ratio = r["fused"]["floor_ratio"].as_f64().expect("a ratio");
        assert!(ratio <= max_ratio, "{fixture}: {ratio}");
    }
}

/// The fused launches per layer of Gemma 3 (see README's table).
const GEMMA3_LAUNCHES_PER_LAYER: f64 = 7.0;

/// Every new kernel variant is emitted as CUDA, in f32, bf16 and FP8.
#[test]
fn cuda_codegen_emits_the_new_kernels() {
    for (fixture, families) in [
        (
            GEMMA2,
            &["gemv_geglu", "gemv_offset_post_norm", "attention"][..],
        ),
        (
            GEMMA3,
            &[
                "gemv_geglu",
                "gemv_offset_post_norm",
                "offset_rms_norm",
                "decode_attention",
            ][..],
        ),
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
            if fixture == GEMMA2 {
                // The soft-cap in the attention kernel's scores, and the final one.
                assert!(cu.contains("tanhf("), "{precision}: no soft-cap");
            }
            assert!(cu.contains("fu_gelu_tanh("), "{fixture} {precision}");
            // Gemma's (1 + w) in the norm prologues and epilogues.
            assert!(cu.contains("__fadd_rn("), "{fixture} {precision}");
            assert!(dir.join("launch_plan.json").is_file());
        }
    }
}

/// FP8 compiles and runs for both Gemmas, close to the f32 run.
#[test]
fn fp8_runs_both_gemmas() {
    for fixture in FIXTURES {
        let name = fixture.rsplit('/').next().unwrap_or("m");
        let out = scratch(&format!("gemma-fp8-{name}")).join("fp8.json");
        let dir = root().join(fixture);
        ok(&[
            "run",
            path_str(&dir),
            "--prompt-ids",
            "1,17,42,99,7",
            "--tokens",
            "4",
            "--precision",
            "fp8",
            "--compare",
            "--json",
            path_str(&out),
        ]);
        let run = read_json(&out);
        assert_eq!(run["precision"], "fp8", "{name}");
        assert_eq!(run["generated"].as_array().map(Vec::len), Some(4));
        let acc = &run["accuracy"];
        let agree = acc["top1_agreement"].as_u64().expect("a count");
        assert!(agree >= 3, "{name}: {agree}/4");
        let kl = acc["mean_kl"].as_f64().expect("a number");
        assert!(kl < 0.05, "{name}: mean KL {kl}");
    }
}

/// In bf16 the fused graph decodes as the eager bf16 graph does (same ids, logits
/// within bf16 rounding: the fused attention keeps its probabilities in f32).
#[test]
fn bf16_fused_graphs_decode_like_eager() {
    for fixture in FIXTURES {
        let spec = pipeline::load(&root().join(fixture), None, None).expect("loads");
        let spec = pipeline::in_precision(&spec, Precision::Bf16);
        let eager = pipeline::eager(&spec).expect("builds");
        let rules = pipeline::rules(&[]).expect("built-in rules");
        let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
        let path = spec.weights.clone().expect("the fixture has weights");
        let weights = Weights::load(&path, &eager).expect("loads in bf16");
        let prompt = [1, 17, 42, 99, 7];
        let (e, f) = (
            decode(eager, &weights, &prompt, 4),
            decode(fused, &weights, &prompt, 4),
        );
        assert_eq!(e.generated, f.generated, "{fixture}");
        for (a, b) in e.logits.iter().zip(&f.logits) {
            let rel = rel_l2(b, a);
            assert!(rel < 2e-2, "{fixture}: relative L2 {rel}");
        }
    }
}

/// A Gemma config that asks for maths fusec does not implement is refused with exit
/// 2, naming the key.
#[test]
fn unimplemented_keys_are_rejected_by_name() {
    let dir = scratch("gemma-reject");
    for (fixture, key, value) in [
        (GEMMA2, "hidden_activation", "\"gelu\""),
        (GEMMA2, "attention_bias", "true"),
        (
            GEMMA2,
            "rope_parameters",
            r#"{"rope_type": "yarn", "factor": 4.0}"#,
        ),
        (
            GEMMA2,
            "layer_types",
            r#"["sliding_attention", "chunked_attention"]"#,
        ),
        (GEMMA3, "use_bidirectional_attention", "true"),
        (
            GEMMA3,
            "rope_parameters",
            r#"{"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}"#,
        ),
        (GEMMA3, "query_pre_attn_scalar", "-1"),
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

/// The published configuration prints and parses back identically, eager and fused.
#[test]
fn the_published_configuration_round_trips_through_the_text_form() {
    let rules = pipeline::rules(&[]).expect("built-in rules");
    let spec = pipeline::load(&root().join("examples/gemma-2-9b"), None, None).expect("valid");
    let eager = pipeline::eager(&spec).expect("builds");
    let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
    for (what, g) in [("eager", eager), ("fused", fused)] {
        let printed = fusec_ir::text::print(&g).expect("acyclic");
        let parsed = fusec_ir::text::parse(&printed)
            .unwrap_or_else(|e| panic!("{what}: reparse failed: {e}"));
        fusec_ir::verify(&parsed).unwrap_or_else(|e| panic!("{what}: {e}"));
        let again = fusec_ir::text::print(&parsed).expect("acyclic");
        assert!(printed == again, "{what}: print(parse(text)) != text");
    }
}

/// `fusec compile` predicts the launches per step that `fusec run` measures over its 8
/// steps (5 prompt positions and 3 generated ones), eager and
/// fused: the new kernels are counted alike by the cost model and the CPU executor.
#[test]
fn compile_predicts_the_launches_run_measures() {
    for fixture in FIXTURES {
        let name = fixture.rsplit('/').next().unwrap_or("m");
        let dir = scratch(&format!("gemma-predict-{name}"));
        let model = root().join(fixture);
        let report = dir.join("compile.json");
        ok(&[
            "compile",
            path_str(&model),
            "--context",
            "8",
            "--out",
            path_str(&dir),
            "--report-json",
            path_str(&report),
        ]);
        let compiled = read_json(&report);
        for (variant, extra) in [("eager", &["--no-fuse"][..]), ("fused", &[][..])] {
            let out = dir.join(format!("run-{variant}.json"));
            let mut args = vec![
                "run",
                path_str(&model),
                "--prompt-ids",
                "1,17,42,99,7",
                "--tokens",
                "4",
                "--json",
                path_str(&out),
                // Every step a decode step, as compile predicts them.
                "--prefill-chunk",
                "1",
            ];
            args.extend_from_slice(extra);
            ok(&args);
            let stats = &read_json(&out)["stats"];
            assert_eq!(stats["steps"], 8, "{name} {variant}");
            assert_eq!(
                stats["launches_per_step"], compiled[variant]["launches_total"],
                "{name} {variant}"
            );
        }
    }
}
