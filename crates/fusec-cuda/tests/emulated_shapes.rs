//! The generated kernels at shapes the bundled models never take: every width not a
//! multiple of any kernel's vector width (so GEMVs, norms and attention run their
//! scalar tails and fallback loops), two sequences per step, and every dtype (f32,
//! f16, bf16 and FP8), eager and fused, run on the CPU emulation of `tests/emulate`
//! against the CPU executor on the same graph and weights. Blocks run in a shuffled
//! order on several threads (see `emu.h`), so inter-block protocols such as the
//! split-KV combine are exercised as on a GPU.
//!
//! Both sides are fed the same tokens at every step (no greedy feedback), so one
//! differing step cannot hide the others. Needs a C++20 compiler; without one the test
//! says so loudly, and fails when `FUSEC_REQUIRE_TOOLS` is set (as `.ci/run` sets it).

mod common;
mod emulate;

use common::stages;
use fusec_codegen::{generate, DecodeShape, Options};
use fusec_cuda::runtime::{CheckpointWeights, Runner};
use fusec_exec::{Executor, Session, Weights};
use fusec_ir::Graph;
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_rewrite::precision::Fp8Options;

/// Hidden 42 (3 heads of 14, one KV head), intermediate 90, vocabulary 97: no width is
/// a multiple of 4 `f32`s, 8 halves or 16 FP8 bytes, the 16-byte vectors the kernels
/// load.
const AWKWARD: &str = r#"
[model]
name = "awkward"
hidden_size = 42
num_layers = 2
num_heads = 3
num_kv_heads = 1
head_dim = 14
intermediate_size = 90
vocab_size = 97
rope_theta = 10000.0
rms_norm_eps = 1e-5
max_seq_len = 32
dtype = "f32"

[decode]
batch = 2
context = 32
"#;

/// Hidden 512 and intermediate 1024: whole spans of a warp's 16-byte FP8 weight loads
/// (32 lanes of 16), the widths at which the FP8 GEMV stages its activations in warp
/// order (see `xs_index` in the GEMV emitter); tokens stay below the vocabulary of 97.
const WIDE: &str = r#"
[model]
name = "wide"
hidden_size = 512
num_layers = 1
num_heads = 4
num_kv_heads = 2
head_dim = 128
intermediate_size = 1024
vocab_size = 97
rope_theta = 10000.0
rms_norm_eps = 1e-5
max_seq_len = 32
dtype = "f32"

[decode]
batch = 2
context = 32
"#;

const BATCH: usize = 2;
const STEPS: usize = 7;

/// The tokens of sequence `seq` at step `step`: fixed, different per sequence.
fn token(seq: usize, step: usize) -> i32 {
    ((seq * 31 + step * 17 + 5) % 97) as i32
}

/// Logits per step, per sequence.
type Logits = Vec<Vec<Vec<f32>>>;

fn cpu(graph: &Graph, weights: &Weights) -> Logits {
    let exec = Executor::new(graph.clone(), weights).expect("executor");
    let mut s = Session::new(exec, BATCH).expect("session");
    (0..STEPS)
        .map(|step| {
            let tokens: Vec<i32> = (0..BATCH).map(|q| token(q, step)).collect();
            let out = s.step(&tokens).expect("step");
            out.logits.outer_iter().map(|row| row.to_vec()).collect()
        })
        .collect()
}

fn emulated(cxx: &str, label: &str, graph: &Graph, weights: &Weights, options: &Options) -> Logits {
    let out = generate(graph, &DecodeShape::new(BATCH as u64, 32), options)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let dir = std::env::temp_dir().join(format!("fusec-emu-{}-{label}", std::process::id()));
    let dev = emulate::Emulator::new(cxx.to_string(), &dir);
    let mut r = Runner::new(dev, &out, &CheckpointWeights(weights))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let logits = (0..STEPS)
        .map(|step| {
            let tokens: Vec<i32> = (0..BATCH).map(|q| token(q, step)).collect();
            r.step(&tokens)
                .unwrap_or_else(|e| panic!("{label}: step {step}: {e}"))
                .logits
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    logits
}

/// The largest difference over all steps and sequences, relative to the reference
/// row's largest magnitude; panics naming the first step and sequence over `tol`.
fn check(label: &str, got: &Logits, want: &Logits, tol: f32) {
    assert_eq!(got.len(), want.len(), "{label}: steps");
    let mut worst = 0f32;
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{label}: sequences at step {step}");
        for (seq, (a, b)) in g.iter().zip(w).enumerate() {
            assert_eq!(a.len(), b.len(), "{label}: vocabulary");
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let d = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
            assert!(
                d <= tol,
                "{label}: step {step}, sequence {seq}: relative difference {d:.2e} > {tol:.0e}"
            );
            worst = worst.max(d);
        }
    }
    println!("{label}: max relative logit difference {worst:.2e}");
}

fn spec(dir: &std::path::Path) -> ModelSpec {
    spec_of(dir, AWKWARD)
}

fn spec_of(dir: &std::path::Path, toml: &str) -> ModelSpec {
    let path = dir.join("model.toml");
    std::fs::write(&path, toml).expect("writes the model");
    common::spec(&path)
}

/// The fused bf16 graph lowered to FP8 with its derived weights and calibrated KV
/// scales, as `fusec run --precision fp8` makes them, and the CPU executor's logits.
fn fp8_lowered(spec: &ModelSpec) -> (Graph, Weights, Logits) {
    let rules = stages::rules().expect("rules");
    let bf16 = stages::fused_in(spec, Precision::Bf16, &rules, &Fp8Options::default())
        .expect("fused bf16");
    let lowered =
        stages::fused_in(spec, Precision::Fp8, &rules, &Fp8Options::default()).expect("fp8");
    let base = Weights::random(&bf16, 11).expect("random weights");
    let prompt: Vec<i32> = (0..STEPS).map(|s| token(0, s)).collect();
    let (kv, _) = fusec_exec::calibrate::calibrate_kv_scales(&lowered, &bf16, &base, &[prompt])
        .expect("calibrates");
    let w8 = fusec_weights::lower_weights(&base, &lowered, &kv).expect("quantizes");
    let want = cpu(&lowered, &w8);
    (lowered, w8, want)
}

fn compiler() -> Option<String> {
    emulate::compiler_or_report("the awkward-shape kernels")
}

/// Tolerance of the emulated kernels against the CPU executor on the same graph:
/// f32 differs only in summation order; the narrower dtypes round intermediates at
/// different points (an FP8 activation one code apart moves a logit by a few 1e-3).
fn tolerance(p: Precision) -> f32 {
    match p {
        Precision::F32 => 1e-5,
        Precision::F16 => 2e-3,
        Precision::Bf16 => 1e-2,
        Precision::Fp8 => 2e-2,
        // Not emulated here: integer codes need whole blocks of 32, which these
        // awkward widths are not (`emulated.rs` runs them on whole blocks).
        Precision::Int8 | Precision::Int4 | Precision::Q4_1 | Precision::Q4K | Precision::Gguf => {
            0.0
        }
    }
}

#[test]
fn awkward_widths_two_sequences_every_dtype() {
    let Some(cxx) = compiler() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = spec(dir.path());
    let rules = stages::rules().expect("rules");
    let options = Options::default();
    for p in [Precision::F32, Precision::F16, Precision::Bf16] {
        let eager = stages::eager(&stages::in_precision(&spec, p)).expect("eager");
        let fused = stages::fused_in(&spec, p, &rules, &Fp8Options::default()).expect("fused");
        let weights = Weights::random(&eager, 11).expect("random weights");
        for (kind, graph) in [("eager", &eager), ("fused", &fused)] {
            let label = format!("{}-{kind}", p.name());
            let want = cpu(graph, &weights);
            let got = emulated(&cxx, &label, graph, &weights, &options);
            check(&label, &got, &want, tolerance(p));
        }
    }
    let (lowered, w8, want) = fp8_lowered(&spec);
    let got = emulated(&cxx, "fp8-fused", &lowered, &w8, &options);
    check("fp8-fused", &got, &want, tolerance(Precision::Fp8));
    // The FP8 GEMV's activations staged as f16 rather than f32 (the form for rows too
    // long for f32 staging).
    let f16_staged = Options {
        fp8_f32_stage_bytes: 0,
        ..Options::default()
    };
    let got = emulated(&cxx, "fp8-fused-f16-staged", &lowered, &w8, &f16_staged);
    check(
        "fp8-fused-f16-staged",
        &got,
        &want,
        tolerance(Precision::Fp8),
    );
}

#[test]
fn fp8_gemv_staged_in_warp_order_at_whole_spans() {
    let Some(cxx) = compiler() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (lowered, w8, want) = fp8_lowered(&spec_of(dir.path(), WIDE));
    let options = Options::default();
    let out = generate(&lowered, &DecodeShape::new(BATCH as u64, 32), &options).expect("generates");
    let permuted = out
        .kernels
        .iter()
        .filter(|k| k.family.starts_with("gemv") && k.function.contains("(k & ~511) + lane * 4"))
        .count();
    assert!(
        permuted >= 3,
        "{permuted} FP8 GEMVs read warp-ordered activations"
    );
    let got = emulated(&cxx, "fp8-wide", &lowered, &w8, &options);
    check("fp8-wide", &got, &want, tolerance(Precision::Fp8));
}

#[test]
fn split_kv_at_awkward_widths_matches_one_block_per_head() {
    let Some(cxx) = compiler() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = spec(dir.path());
    let rules = stages::rules().expect("rules");
    let fused =
        stages::fused_in(&spec, Precision::F32, &rules, &Fp8Options::default()).expect("fused");
    let weights = Weights::random(&fused, 3).expect("random weights");
    // Two positions per split: every step past the second spreads over several
    // blocks per head, whose partial results the last block to finish combines.
    let split = Options {
        split_kv_min_len: 2,
        split_kv_min_chunk: 2,
        target_blocks: 64,
        ..Options::default()
    };
    let out = generate(&fused, &DecodeShape::new(BATCH as u64, 32), &split).expect("generates");
    assert!(out.plan.launches.iter().any(|l| l.grid[2] > 1), "splits");
    let want = cpu(&fused, &weights);
    let got = emulated(&cxx, "split-awkward", &fused, &weights, &split);
    check("split-KV awkward", &got, &want, tolerance(Precision::F32));
    // One warp per block: head_dim 14 takes all 32 lanes per position, so one thread
    // group walks every position, two at a time (the positions in flight), through
    // several rounds of the main loop; with 128 threads the 7 positions of this test
    // would all fall in the first round.
    let one_group = Options {
        attention_threads: 32,
        ..Options::default()
    };
    let got = emulated(&cxx, "one-group-awkward", &fused, &weights, &one_group);
    check(
        "one thread group awkward",
        &got,
        &want,
        tolerance(Precision::F32),
    );
}
