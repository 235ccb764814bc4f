//! The compiled graphs run on the CPU executor against Hugging Face's reference on the
//! bundled fixture: the fused graph in f32 (within 1e-4, ids exact), and the lowered
//! graphs in bf16 and FP8 within tolerances measured on this fixture.
//!
//! Measured (and asserted with margin below), relative L2 error of the logits against
//! HF's f32 run, and greedy ids:
//!
//! | graph       | max rel err | ids                                          |
//! | ----------- | ----------- | -------------------------------------------- |
//! | fused f32   | 1e-6        | 16/16                                        |
//! | fused bf16  | 2.1e-2      | 16/16 (HF's own bf16 run scores 2.0e-2)      |
//! | fused fp8   | 0.17        | first 7, then a near tie (HF margin 0.151)   |
//!
//! Teacher-forced on HF's ids, the FP8 graph picks HF's top-1 token on 13 of 16 steps;
//! the three it misses are steps whose HF top-2 margin is 0.15, 0.64 and 0.59 (logit
//! units), below the FP8 run's largest absolute logit error (about 1.4 to 2.1 on this
//! random-weight model, whose logits have small margins).

mod common;

use std::path::PathBuf;

use fusec::exec::{accuracy, calibrate, Executor, Generation, Session};
use fusec::pipeline;
use fusec::weights::{self, KvScales, Weights};
use fusec_ir::Graph;
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_rewrite::precision::{Fp8Options, Granularity};

fn fixture() -> PathBuf {
    common::root().join("tests/fixtures/hf-tiny-llama-s0")
}

struct Expected {
    prompt: Vec<i32>,
    generated: Vec<i32>,
    logits: Vec<Vec<f64>>,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let ids = |v: &serde_json::Value| -> Vec<i32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_i64().expect("an id") as i32)
            .collect()
    };
    Expected {
        prompt: ids(&v["prompt"]),
        generated: ids(&v["generated"]),
        logits: v["logits"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                r.as_array()
                    .expect("a row")
                    .iter()
                    .map(|x| x.as_f64().expect("a number"))
                    .collect()
            })
            .collect(),
    }
}

fn spec() -> ModelSpec {
    pipeline::load(&fixture(), None, None).expect("fixture loads")
}

fn rel_err(actual: &[f32], expected: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (&a, &e) in actual.iter().zip(expected) {
        num += (f64::from(a) - e).powi(2);
        den += e * e;
    }
    (num / den).sqrt()
}

fn graph_in(spec: &ModelSpec, p: Precision, fp8: &Fp8Options) -> Graph {
    let rules = pipeline::rules(&[]).expect("built-in rules");
    pipeline::fused_in(spec, p, &rules, fp8)
        .expect("compiles")
        .0
}

fn decode(graph: Graph, weights: &Weights, prompt: &[i32], n: usize) -> Generation {
    let exec = Executor::new(graph, weights).expect("plans");
    Session::with_capacity(exec, 1, prompt.len() + n)
        .expect("session")
        .generate(&[prompt.to_vec()], n)
        .expect("decodes")
}

fn forced(graph: Graph, weights: &Weights, prompt: &[i32], tokens: &[i32]) -> Generation {
    let exec = Executor::new(graph, weights).expect("plans");
    Session::with_capacity(exec, 1, prompt.len() + tokens.len() + 1)
        .expect("session")
        .generate_forced(&[prompt.to_vec()], &[tokens.to_vec()])
        .expect("decodes")
}

/// The FP8 graph's weights: the checkpoint quantized at load, with the KV-cache scales
/// calibrated on the prompt through the bf16 graph.
fn fp8_weights(spec: &ModelSpec, fp8: &Graph, prompt: &[i32]) -> (Weights, KvScales) {
    let path = spec.weights.clone().expect("the fixture has weights");
    assert!(matches!(
        Weights::load(&path, fp8),
        Err(weights::Error::Uncalibrated { .. })
    ));
    let bf16 = graph_in(spec, Precision::Bf16, &Fp8Options::default());
    let base = Weights::load(&path, &bf16).expect("loads");
    let (scales, _) =
        calibrate::calibrate_kv_scales(fp8, &bf16, &base, &[prompt.to_vec()]).expect("calibrates");
    let weights = weights::lower_weights(&base, fp8, &scales).expect("quantizes");
    (weights, scales)
}

#[test]
fn the_fused_graph_matches_hugging_face_on_the_fixture() {
    let spec = spec();
    let eager = pipeline::eager(&spec).expect("builds");
    let rules = pipeline::rules(&[]).expect("built-in rules");
    let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
    let weights = Weights::load(spec.weights.as_ref().expect("weights"), &fused).expect("loads");
    let want = expected();
    let gen = decode(fused, &weights, &want.prompt, want.generated.len());
    assert_eq!(gen.generated[0], want.generated);
    assert_eq!(
        gen.launches_per_step, 18,
        "5 per layer, embedding, lm_head, argmax"
    );
    for (step, (row, exp)) in gen.rows(0).zip(&want.logits).enumerate() {
        let err = rel_err(row, exp);
        assert!(err <= 1e-4, "step {step}: relative L2 error {err}");
    }
}

#[test]
fn the_bf16_graph_matches_hugging_face_within_bf16_error() {
    let spec = spec();
    let graph = graph_in(&spec, Precision::Bf16, &Fp8Options::default());
    let weights = Weights::load(spec.weights.as_ref().expect("weights"), &graph).expect("loads");
    let want = expected();
    let gen = decode(graph, &weights, &want.prompt, want.generated.len());
    assert_eq!(gen.generated[0], want.generated);
    let worst = gen
        .rows(0)
        .zip(&want.logits)
        .map(|(r, e)| rel_err(r, e))
        .fold(0.0, f64::max);
    // Measured 2.1e-2 (HF's own bf16 run: 2.0e-2).
    assert!(worst <= 3e-2, "max relative L2 error {worst}");
    assert!(worst > 1e-3, "the bf16 graph should round: {worst}");
}

#[test]
fn the_fp8_graph_matches_hugging_face_up_to_a_near_tie() {
    let spec = spec();
    let graph = graph_in(&spec, Precision::Fp8, &Fp8Options::default());
    let want = expected();
    let (weights, scales) = fp8_weights(&spec, &graph, &want.prompt);
    assert_eq!(
        scales.len(),
        4,
        "a key and a value scale per layer: {scales:?}"
    );
    let gen = decode(graph, &weights, &want.prompt, want.generated.len());
    // As check_reference.py --tie-margin: compare up to the first divergence, which
    // must be a near tie in HF's logits (measured: step 7, margin 0.151).
    let first = gen.generated[0]
        .iter()
        .zip(&want.generated)
        .position(|(a, b)| a != b)
        .unwrap_or(want.generated.len());
    assert!(first >= 5, "diverged at step {first}");
    if first < want.generated.len() {
        let row = &want.logits[first];
        let top = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let gap = top - row[gen.generated[0][first] as usize];
        assert!(
            gap <= 0.25,
            "step {first}: HF gap to the chosen token {gap}"
        );
    }
    for step in 0..(first + 1).min(want.generated.len()) {
        let err = rel_err(gen.row(0, step), &want.logits[step]);
        // Measured at most 0.17.
        assert!(err <= 0.25, "step {step}: relative L2 error {err}");
    }
}

#[test]
fn teacher_forced_fp8_agrees_with_hugging_face_on_most_steps() {
    let spec = spec();
    let graph = graph_in(&spec, Precision::Fp8, &Fp8Options::default());
    let want = expected();
    let (weights, _) = fp8_weights(&spec, &graph, &want.prompt);
    let n = want.generated.len();
    let gen = forced(graph, &weights, &want.prompt, &want.generated[..n - 1]);
    let mut agree = 0;
    let mut margins = Vec::new();
    for (step, row) in gen.rows(0).enumerate() {
        let hf: Vec<f32> = want.logits[step].iter().map(|&v| v as f32).collect();
        let s = accuracy::compare_step(step, &hf, row);
        assert_eq!(s.reference_top1 as i32, want.generated[step]);
        if s.top1_agree {
            agree += 1;
        } else {
            margins.push((step, s.reference_margin));
        }
    }
    println!("teacher-forced fp8 top-1 agreement with HF: {agree}/{n}; disagreements (step, HF top-2 margin): {margins:?}");
    // Measured 13/16, missing steps 7, 13 and 15 with margins 0.15, 0.64 and 0.59.
    assert!(agree >= 13, "{agree}/{n}: {margins:?}");
    assert!(
        margins.iter().all(|&(_, m)| m < 1.0),
        "only near ties may flip: {margins:?}"
    );
}

#[test]
fn per_tensor_weight_scales_run_too() {
    let spec = spec();
    let opts = Fp8Options {
        granularity: Granularity::PerTensor,
        ..Fp8Options::default()
    };
    let graph = graph_in(&spec, Precision::Fp8, &opts);
    let want = expected();
    let (weights, _) = fp8_weights(&spec, &graph, &want.prompt);
    let scale = weights
        .get("model.layers.0.self_attn.q_proj.weight.scale")
        .expect("a scale");
    assert_eq!(scale.shape(), &[] as &[usize]);
    let gen = decode(graph, &weights, &want.prompt, 4);
    let err = rel_err(gen.row(0, 0), &want.logits[0]);
    assert!(err <= 0.3, "relative L2 error {err}");
}

#[test]
fn saved_fp8_weights_load_back_and_give_identical_results() {
    let spec = spec();
    let graph = graph_in(&spec, Precision::Fp8, &Fp8Options::default());
    let want = expected();
    let (weights, scales) = fp8_weights(&spec, &graph, &want.prompt);
    let dir = std::env::temp_dir().join(format!("fusec-exec-fp8-save-{}", std::process::id()));
    let meta = [("fusec.precision".to_string(), "fp8".to_string())].into();
    let path = weights::save_weights(&dir, &graph, &weights, &meta).expect("saves");
    let reloaded = Weights::load(&dir, &graph).expect("loads back");
    for (_, name) in graph.weights() {
        let (a, b) = (weights.get(name), reloaded.get(name));
        assert_eq!(
            a.map(|t| (t.dtype(), t.to_vec_f32())),
            b.map(|t| (t.dtype(), t.to_vec_f32())),
            "{name}"
        );
    }
    for (name, s) in &scales {
        assert_eq!(reloaded.get(name).map(|t| t.to_vec_f32()), Some(vec![*s]));
    }
    let metadata = Weights::metadata(&path).expect("reads the header");
    assert_eq!(
        metadata.get("fusec.precision").map(String::as_str),
        Some("fp8")
    );
    // FP8 values are stored as F8_E4M3 bytes: the file is about a quarter of f32.
    let size = std::fs::metadata(&path).expect("written").len();
    let original = std::fs::metadata(fixture().join("model.safetensors"))
        .expect("fixture")
        .len();
    assert!(size * 3 < original, "{size} vs {original}");
    let a = decode(graph.clone(), &weights, &want.prompt, 6);
    let b = decode(graph, &reloaded, &want.prompt, 6);
    assert_eq!(a.logits, b.logits);
    assert_eq!(a.generated, b.generated);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_kv_range_after_the_prompt_covers_the_decode() {
    // The calibrated scales have a margin of 2 over the prompt's absmax: the caches'
    // range over the whole decode must stay within it.
    let spec = spec();
    let fp8 = graph_in(&spec, Precision::Fp8, &Fp8Options::default());
    let bf16 = graph_in(&spec, Precision::Bf16, &Fp8Options::default());
    let base = Weights::load(spec.weights.as_ref().expect("weights"), &bf16).expect("loads");
    let want = expected();
    let (_, prompt_max) =
        calibrate::calibrate_kv_scales(&fp8, &bf16, &base, std::slice::from_ref(&want.prompt))
            .expect("runs");
    let mut all = want.prompt.clone();
    all.extend(&want.generated);
    let (_, run_max) = calibrate::calibrate_kv_scales(&fp8, &bf16, &base, &[all]).expect("runs");
    for (state, m) in &prompt_max {
        let growth = run_max[state] / m;
        println!(
            "{state}: absmax over the prompt {m}, over the decode {}, growth {growth:.3}",
            run_max[state]
        );
        assert!(growth < calibrate::KV_SCALE_MARGIN, "{state}: {growth}");
    }
}

#[test]
fn the_weights_derive_every_weight_the_fp8_lowering_names() {
    // The lowering and the derivation read the suffixes from one place
    // (`fusec_ir::step`); this checks that what the lowering makes of them is what the
    // derivation expects: every weight the FP8 graph adds is derived.
    let spec = spec();
    let bf16 = graph_in(&spec, Precision::Bf16, &Fp8Options::default());
    let fp8 = graph_in(&spec, Precision::Fp8, &Fp8Options::default());
    let derived = weights::derived_weights(&fp8).expect("derives");
    let base: std::collections::HashSet<&str> =
        bf16.weights().into_iter().map(|(_, n)| n).collect();
    let added: Vec<&str> = fp8
        .weights()
        .into_iter()
        .map(|(_, n)| n)
        .filter(|n| !base.contains(n))
        .collect();
    assert!(!added.is_empty(), "the FP8 graph adds quantized weights");
    for name in added {
        assert!(derived.contains_key(name), "`{name}` is not derived");
    }
}
