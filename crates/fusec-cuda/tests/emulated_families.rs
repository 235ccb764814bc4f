//! The generated kernels of OLMo 2, Granite 3, Gemma 2 and Gemma 3 (`fused.post_rms_norm`,
//! `fused.linear_scale_add`, `fused.offset_rms_norm`, `fused.geglu`, the soft-capped
//! `fused.attention` and the rest), run on the CPU emulation of
//! `tests/emulate`, decode their tiny Hugging Face references as the CPU executor does:
//! fused in f32 (ids exact, 1e-4), bf16 and FP8. Needs a C++20 compiler (`$CXX` or
//! `g++`); without one the test says so loudly and passes.

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

const PROMPT: [i32; 5] = [1, 17, 42, 99, 7];
/// The fixtures and the tokens each decodes. The Mistral fixture and both Gemmas have a
/// sliding window of 8 positions: prompt and generated tokens run past it, so the
/// kernels write and read ring-buffer caches. Phi-3's checkpoint holds packed
/// projections, split at load.
const FIXTURES: [(&str, usize); 6] = [
    ("hf-tiny-olmo2-s0", 8),
    ("hf-tiny-granite-s3", 8),
    ("hf-tiny-mistral-window-s0", 8),
    ("hf-tiny-phi3-s0", 8),
    ("hf-tiny-gemma2-s0", 8),
    ("hf-tiny-gemma3-s0", 8),
];

fn fixture(name: &str) -> PathBuf {
    common::root().join("tests/fixtures").join(name)
}

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

fn emulated(cxx: &str, label: &str, graph: &Graph, weights: &Weights, n: usize) -> Decode {
    emulated_with(cxx, label, graph, weights, n, &Options::default())
}

fn emulated_with(
    cxx: &str,
    label: &str,
    graph: &Graph,
    weights: &Weights,
    n: usize,
    options: &Options,
) -> Decode {
    let out = generate(graph, &DecodeShape::new(1, 128), options).expect("generates");
    let dir = std::env::temp_dir().join(format!("fusec-emu-fam-{}-{label}", std::process::id()));
    let dev = emulate::Emulator::new(cxx.to_string(), &dir);
    let mut r = Runner::new(dev, &out, &CheckpointWeights(weights))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut result = Vec::new();
    let mut token = PROMPT[0];
    for pos in 0..PROMPT.len() + n - 1 {
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

/// The largest logit difference relative to the reference's largest magnitude.
fn max_rel(a: &Decode, b: &Decode) -> f32 {
    a.iter()
        .zip(b)
        .map(|((x, _), (y, _))| {
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale
        })
        .fold(0.0, f32::max)
}

fn tokens(d: &Decode) -> Vec<i32> {
    d.iter().map(|(_, t)| *t).collect()
}

fn compiler() -> Option<String> {
    emulate::compiler_or_report("the families' CUDA kernels")
}

#[test]
fn f32_fused_kernels_decode_the_references() {
    let Some(cxx) = compiler() else { return };
    let rules = stages::rules().expect("rules");
    for (name, n) in FIXTURES {
        let spec = common::spec(&fixture(name));
        let eager = stages::eager(&stages::in_precision(&spec, Precision::F32)).expect("eager");
        let weights = Weights::load(&fixture(name), &eager).expect("fixture weights");
        let reference = cpu(&eager, &weights, n);
        let fused =
            stages::fused_in(&spec, Precision::F32, &rules, &Fp8Options::default()).expect("fused");
        let f = emulated(&cxx, &format!("{name}-f32"), &fused, &weights, n);
        assert_eq!(tokens(&f), tokens(&reference), "{name}");
        let r = max_rel(&f, &reference);
        assert!(r < 1e-4, "{name}: {r}");
    }
}

#[test]
fn bf16_and_fp8_fused_kernels_follow_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let rules = stages::rules().expect("rules");
    for (name, n) in FIXTURES {
        let n = n.min(6);
        let spec = common::spec(&fixture(name));
        let fused = stages::fused_in(&spec, Precision::Bf16, &rules, &Fp8Options::default())
            .expect("fused");
        let weights = Weights::load(&fixture(name), &fused).expect("fixture weights");
        let f = emulated(&cxx, &format!("{name}-bf16"), &fused, &weights, n);
        let r = max_rel(&f, &cpu(&fused, &weights, n));
        assert!(r < 5e-3, "{name} bf16: {r}");

        let lowered = stages::fused_in(&spec, Precision::Fp8, &rules, &Fp8Options::default())
            .expect("lowered");
        let (kv, _) = fusec_exec::calibrate::calibrate_kv_scales(
            &lowered,
            &fused,
            &weights,
            &[PROMPT.to_vec()],
        )
        .expect("calibrates");
        let w8 = fusec_weights::lower_weights(&weights, &lowered, &kv).expect("quantizes");
        let g8 = emulated(&cxx, &format!("{name}-fp8"), &lowered, &w8, n);
        let r = max_rel(&g8, &cpu(&lowered, &w8, n));
        assert!(r < 5e-3, "{name} fp8: {r}");
    }
}

/// Split-KV attention over a sliding window's ring: the splits cover the ring's
/// `min(S+1, W)` slots (two per split at most), past the window too, and decode as one
/// block per head does.
#[test]
fn split_kv_attention_over_a_ring_matches_one_block_per_head() {
    let Some(cxx) = compiler() else { return };
    let rules = stages::rules().expect("rules");
    let name = "hf-tiny-mistral-window-s0";
    let spec = common::spec(&fixture(name));
    let fused =
        stages::fused_in(&spec, Precision::F32, &rules, &Fp8Options::default()).expect("fused");
    let weights = Weights::load(&fixture(name), &fused).expect("fixture weights");
    let split = Options {
        split_kv_min_len: 4,
        split_kv_min_chunk: 2,
        target_blocks: 64,
        ..Options::default()
    };
    let out = generate(&fused, &DecodeShape::new(1, 128), &split).expect("generates");
    assert!(out.plan.launches.iter().any(|l| l.grid[2] > 1), "splits");
    let a = emulated_with(&cxx, "ring-split", &fused, &weights, 10, &split);
    let b = emulated(&cxx, "ring-nosplit", &fused, &weights, 10);
    assert_eq!(tokens(&a), tokens(&b));
    let r = max_rel(&a, &b);
    assert!(r < 1e-5, "{r}");
}
