//! The generated kernels, run on the CPU emulation of `tests/emulate`, decode the
//! fixture as the CPU executor does: eager and fused, f32, bf16 and FP8, with and
//! without split-KV attention. Needs a C++20 compiler (`$CXX` or `g++`); without one
//! the test says so loudly and passes.

mod common;
mod emulate;

use std::path::PathBuf;

use common::stages;
use fusec_codegen::{generate, DecodeShape, Options};
use fusec_cuda::runtime::{CheckpointWeights, Runner};
use fusec_exec::{Executor, Session, Weights};
use fusec_ir::Graph;
use fusec_model::frontend::Precision;
use fusec_rewrite::precision::Fp8Options;

fn fixture() -> PathBuf {
    common::root().join("tests/fixtures/hf-tiny-llama-s0")
}

const PROMPT: [i32; 5] = [1, 17, 42, 99, 7];

/// Logits and tokens of a greedy decode: one entry per step after the prompt's last.
type Decode = Vec<(Vec<f32>, i32)>;

fn cpu(graph: &Graph, weights: &Weights, new_tokens: usize) -> Decode {
    let exec = Executor::new(graph.clone(), weights).expect("executor");
    let mut s = Session::new(exec, 1).expect("session");
    let g = s.generate(&[PROMPT.to_vec()], new_tokens).expect("decode");
    g.rows(0)
        .map(<[f32]>::to_vec)
        .zip(g.generated[0].iter().copied())
        .collect()
}

fn emulated(
    cxx: &str,
    label: &str,
    graph: &Graph,
    weights: &Weights,
    options: &Options,
    new_tokens: usize,
) -> Decode {
    let shape = DecodeShape::new(1, 128);
    let out = generate(graph, &shape, options).expect("generates");
    let dir = std::env::temp_dir().join(format!("fusec-emu-{}-{label}", std::process::id()));
    let dev = emulate::Emulator::new(cxx.to_string(), &dir);
    let mut r = Runner::new(dev, &out, &CheckpointWeights(weights))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut result = Vec::new();
    let mut token = PROMPT[0];
    for pos in 0..PROMPT.len() + new_tokens - 1 {
        // The prompt is fed token by token, then each step feeds the last greedy token.
        token = PROMPT.get(pos).copied().unwrap_or(token);
        let s = r
            .step(&[token])
            .unwrap_or_else(|e| panic!("{label}: step {pos}: {e}"));
        if pos + 1 >= PROMPT.len() {
            token = s.next[0];
            result.push((s.logits[0].clone(), token));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The largest difference of two logit vectors relative to the reference's largest
/// magnitude, over all steps.
fn max_rel(a: &Decode, b: &Decode) -> f32 {
    a.iter()
        .zip(b)
        .map(|((x, _), (y, _))| {
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale
        })
        .fold(0.0, f32::max)
}

fn report(label: &str, a: &Decode, b: &Decode) -> f32 {
    let r = max_rel(a, b);
    println!(
        "{label}: max relative logit difference {r:.2e}, tokens {:?} vs {:?}",
        tokens(a),
        tokens(b)
    );
    r
}

fn tokens(d: &Decode) -> Vec<i32> {
    d.iter().map(|(_, t)| *t).collect()
}

struct Model {
    spec: fusec_model::frontend::ModelSpec,
    rules: fusec_rewrite::RuleSet,
}

impl Model {
    fn new() -> Model {
        Model {
            spec: common::spec(&common::root().join("examples/tiny.toml")),
            rules: stages::rules().expect("rules"),
        }
    }

    fn eager(&self, p: Precision) -> Graph {
        stages::eager(&stages::in_precision(&self.spec, p)).expect("eager")
    }

    fn fused(&self, p: Precision) -> Graph {
        stages::fused_in(&self.spec, p, &self.rules, &Fp8Options::default()).expect("fused")
    }
}

fn compiler() -> Option<String> {
    emulate::compiler_or_report("the CUDA kernels")
}

#[test]
fn f32_kernels_decode_the_fixture_like_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let m = Model::new();
    let eager = m.eager(Precision::F32);
    let weights = Weights::load(&fixture(), &eager).expect("fixture weights");
    let reference = cpu(&eager, &weights, 16);
    let expected: Vec<i32> = {
        let text = std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["generated"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_i64().unwrap_or(-1) as i32)
            .collect()
    };
    assert_eq!(
        tokens(&reference),
        expected,
        "the CPU executor reproduces the fixture"
    );
    let options = Options::default();
    let e = emulated(&cxx, "f32-eager", &eager, &weights, &options, 16);
    assert_eq!(tokens(&e), expected, "eager kernels");
    assert!(report("f32 eager", &e, &reference) < 1e-4);
    let f = emulated(
        &cxx,
        "f32-fused",
        &m.fused(Precision::F32),
        &weights,
        &options,
        16,
    );
    assert_eq!(tokens(&f), expected, "fused kernels");
    assert!(report("f32 fused", &f, &reference) < 1e-4);
}

#[test]
fn split_kv_attention_matches_one_block_per_head() {
    let Some(cxx) = compiler() else { return };
    let m = Model::new();
    let fused = m.fused(Precision::F32);
    let weights = Weights::load(&fixture(), &m.eager(Precision::F32)).expect("fixture weights");
    // Four positions per split at full capacity: every step spreads over the splits,
    // and most steps leave some splits empty.
    let split = Options {
        split_kv_min_len: 16,
        split_kv_min_chunk: 4,
        target_blocks: 64,
        ..Options::default()
    };
    let out = generate(&fused, &DecodeShape::new(1, 128), &split).expect("generates");
    assert!(out.plan.launches.iter().any(|l| l.grid[2] > 1), "splits");
    let a = emulated(&cxx, "split", &fused, &weights, &split, 8);
    let b = emulated(&cxx, "nosplit", &fused, &weights, &Options::default(), 8);
    assert_eq!(tokens(&a), tokens(&b));
    assert!(report("split-KV", &a, &b) < 1e-5);
}

#[test]
fn bf16_and_fp8_kernels_follow_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let m = Model::new();
    let options = Options::default();
    let eager = m.eager(Precision::Bf16);
    let weights = Weights::load(&fixture(), &eager).expect("fixture weights");
    let reference = cpu(&eager, &weights, 6);
    let e = emulated(&cxx, "bf16-eager", &eager, &weights, &options, 6);
    assert!(report("bf16 eager", &e, &reference) < 5e-3);
    let fused = m.fused(Precision::Bf16);
    let f = emulated(&cxx, "bf16-fused", &fused, &weights, &options, 6);
    assert!(report("bf16 fused vs eager", &f, &reference) < 3e-2);
    let cpu_fused = cpu(&fused, &weights, 6);
    assert!(report("bf16 fused", &f, &cpu_fused) < 5e-3);
    assert_eq!(tokens(&f)[..3], tokens(&reference)[..3]);

    let lowered = m.fused(Precision::Fp8);
    let (kv, _) =
        fusec_exec::calibrate::calibrate_kv_scales(&lowered, &fused, &weights, &[PROMPT.to_vec()])
            .expect("calibrates");
    let fp8_weights = fusec_weights::lower_weights(&weights, &lowered, &kv).expect("quantizes");
    let cpu8 = cpu(&lowered, &fp8_weights, 6);
    let g8 = emulated(&cxx, "fp8-fused", &lowered, &fp8_weights, &options, 6);
    assert!(report("fp8 fused", &g8, &cpu8) < 5e-3);
    // The FP8 GEMV's activations staged as f16 rather than f32 (hidden 64: the 16-byte
    // prologue loads), the form for rows too long for f32 staging.
    let f16_staged = Options {
        fp8_f32_stage_bytes: 0,
        ..Options::default()
    };
    let g = emulated(
        &cxx,
        "fp8-f16-staged",
        &lowered,
        &fp8_weights,
        &f16_staged,
        6,
    );
    assert!(report("fp8 fused, f16-staged", &g, &cpu8) < 5e-3);
}

#[test]
fn each_fused_op_alone_matches_the_eager_graph() {
    let Some(cxx) = compiler() else { return };
    let eager = Model::new().eager(Precision::F32);
    let weights = Weights::load(&fixture(), &eager).expect("fixture weights");
    let reference = cpu(&eager, &weights, 4);
    // Between them these fusions hold every fused op but the lone rms_norm, each
    // next to the eager ops it did not replace.
    let wanted = [
        "only rope",
        "only kv",
        "only attention",
        "only mlp",
        "all but rope",
        "all but kv",
    ];
    let options = Options::default();
    for (label, graph) in common::partial_fusions(Precision::F32) {
        if !wanted.contains(&label.as_str()) {
            continue;
        }
        let got = emulated(
            &cxx,
            &label.replace(' ', "-"),
            &graph,
            &weights,
            &options,
            4,
        );
        assert_eq!(tokens(&got), tokens(&reference), "{label}");
        assert!(report(&label, &got, &reference) < 1e-5, "{label}");
    }
}

/// The families of tests/fixtures beyond Llama's (Llama 3's scaled RoPE frequencies,
/// Qwen2's q/k/v biases, Qwen3's per-head q/k norms): their generated kernels, eager
/// and fused, decode as the CPU executor does.
#[test]
fn llama3_and_qwen_kernels_decode_like_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let rules = stages::rules().expect("rules");
    let options = Options::default();
    for name in [
        "hf-tiny-llama3-rope-s0",
        "hf-tiny-qwen2-s0",
        "hf-tiny-qwen3-s0",
    ] {
        let dir = common::root().join("tests/fixtures").join(name);
        let spec = common::spec(&dir);
        let eager = stages::eager(&stages::in_precision(&spec, Precision::F32)).expect("eager");
        let weights = Weights::load(&dir, &eager).expect("fixture weights");
        let reference = cpu(&eager, &weights, 8);
        let fused =
            stages::fused_in(&spec, Precision::F32, &rules, &Fp8Options::default()).expect("fused");
        for (label, graph) in [("eager", &eager), ("fused", &fused)] {
            let label = format!("{name}-{label}");
            let e = emulated(&cxx, &label, graph, &weights, &options, 8);
            assert_eq!(tokens(&e), tokens(&reference), "{label}");
            assert!(report(&label, &e, &reference) < 1e-5, "{label}");
        }
    }
}

/// Integer weights (Q8_0 and Q4_0 codes with an `f16` scale per block of 32, Q4_1's
/// with a scale and a minimum): the integer GEMV's kernels (activations quantized per block in the prologue, `__dp4a`
/// over the codes) decode as the CPU executor's integer GEMV does. The two sum in
/// different orders, and nothing else differs.
#[test]
fn int8_and_int4_kernels_follow_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let mut m = Model::new();
    // The example's MLP width, 176, is not whole blocks of 32; its checkpoint has that
    // width, so the weights are random.
    m.spec.model.intermediate_size = 128;
    m.spec.weights = None;
    let weights = Weights::random(&m.eager(Precision::F32), 11).expect("random weights");
    for precision in [Precision::Int8, Precision::Int4, Precision::Q4_1] {
        let lowered = m.fused(precision);
        let codes = fusec_weights::lower_weights(&weights, &lowered, &Default::default())
            .expect("quantizes");
        let reference = cpu(&lowered, &codes, 6);
        let label = format!("{} fused", precision.name());
        let g = emulated(
            &cxx,
            precision.name(),
            &lowered,
            &codes,
            &Options::default(),
            6,
        );
        assert!(report(&label, &g, &reference) < 1e-5, "{label}");
        assert_eq!(tokens(&g), tokens(&reference), "{label}");
    }
}
