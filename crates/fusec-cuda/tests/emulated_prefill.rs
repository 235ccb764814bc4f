//! The prefill kernels on the CPU emulation of `tests/emulate`: the tensor-core mma
//! itself against an f64 matrix product, then whole prefill steps (the tensor-core
//! GEMM and the FlashAttention-2-style prefill attention) against the CPU executor's
//! prefill of the same graph, over two chunks so that the second attends to the
//! first's cache. Needs a C++20 compiler (`$CXX` or `g++`); without one the test says
//! so loudly and passes. No GPU is involved: this checks the kernels' logic (fragment
//! layouts, tiling, masking, the online softmax, the in-place cache writes), not speed.

mod common;
mod emulate;

use std::path::PathBuf;

use common::stages;
use fusec_codegen::plan::LaunchPlan;
use fusec_codegen::{generate, DecodeShape, Kernel, Options, Output};
use fusec_cuda::runtime::{CheckpointWeights, Device, Runner};
use fusec_exec::prefill::Prefill;
use fusec_exec::{ndarray, Executor, Session, Weights};
use fusec_ir::Graph;
use fusec_model::blocks::{Logits, StepDims};
use fusec_model::frontend::Precision;
use fusec_rewrite::precision::{lower_fp8, Fp8Options};

fn compiler() -> Option<String> {
    emulate::compiler_or_report("the CUDA prefill kernels")
}

fn fixture() -> PathBuf {
    common::root().join("tests/fixtures/hf-tiny-llama-s0")
}

/// SplitMix64, for reproducible test data.
fn next(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A value in [-4, 4) with few mantissa bits, so that bf16 holds it exactly.
fn small(s: &mut u64) -> f32 {
    ((next(s) % 256) as f32 - 128.0) / 32.0
}

/// The kernel under test: four warps, each loading its own A (16 x 16, row-major),
/// B (16 x 8, row-major as k x n) and C (16 x 8) from global memory into the fragment
/// registers exactly as the PTX ISA's table for `mma.m16n8k16` (bf16) places them, one
/// `fu_mma_bf16_16x8x16`, and the accumulators back to D by the same table.
const MMA_TEST: &str = r#"
extern "C" __global__ void mma_test(const unsigned short* __restrict__ p0, const unsigned short* __restrict__ p1, const float* __restrict__ p2, float* __restrict__ p3, const int S) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const unsigned short* A = p0 + w * 256;
  const unsigned short* B = p1 + w * 128;
  const float* C = p2 + w * 128;
  float* D = p3 + w * 128;
  auto pa = [&](int r, int c) { return (unsigned)A[r * 16 + c] | ((unsigned)A[r * 16 + c + 1] << 16); };
  auto pb = [&](int k, int n) { return (unsigned)B[k * 8 + n] | ((unsigned)B[(k + 1) * 8 + n] << 16); };
  unsigned a[4] = {pa(g, 2 * t), pa(g + 8, 2 * t), pa(g, 2 * t + 8), pa(g + 8, 2 * t + 8)};
  unsigned b[2] = {pb(2 * t, g), pb(2 * t + 8, g)};
  float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  fu_mma_bf16_16x8x16(c, a, b);
  D[g * 8 + 2 * t] = c[0];
  D[g * 8 + 2 * t + 1] = c[1];
  D[(g + 8) * 8 + 2 * t] = c[2];
  D[(g + 8) * 8 + 2 * t + 1] = c[3];
}
"#;

#[test]
fn emulated_mma_matches_an_f64_matrix_product() {
    let Some(cxx) = compiler() else { return };
    let plan = LaunchPlan {
        graph: "mma".into(),
        shape: DecodeShape::new(1, 1),
        arena_bytes: 0,
        buffers: Vec::new(),
        launches: Vec::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        states: Vec::new(),
    };
    let output = Output {
        prelude: fusec_codegen::cuda::PRELUDE,
        kernels: vec![Kernel {
            name: "mma_test".into(),
            family: "test".into(),
            function: MMA_TEST.into(),
            launches: 1,
        }],
        plan,
    };
    let dir = std::env::temp_dir().join(format!("fusec-emu-{}-mma", std::process::id()));
    let mut dev = emulate::Emulator::new(cxx, &dir);
    dev.load(&output).expect("compiles");
    const WARPS: usize = 4;
    let mut seed = 7u64;
    let a: Vec<f32> = (0..WARPS * 256).map(|_| small(&mut seed)).collect();
    let b: Vec<f32> = (0..WARPS * 128).map(|_| small(&mut seed)).collect();
    let c: Vec<f32> = (0..WARPS * 128)
        .map(|_| small(&mut seed) * 1.000_123)
        .collect();
    let bits = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect()
    };
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let pa = dev.alloc(a.len() as u64 * 2).expect("alloc");
    let pb = dev.alloc(b.len() as u64 * 2).expect("alloc");
    let pc = dev.alloc(c.len() as u64 * 4).expect("alloc");
    let pd = dev.alloc(c.len() as u64 * 4).expect("alloc");
    dev.write(pa, &bits(&a)).expect("write");
    dev.write(pb, &bits(&b)).expect("write");
    dev.write(pc, &f32s(&c)).expect("write");
    dev.launch(
        "mma_test",
        [1, 1, 1],
        [32 * WARPS as u32, 1, 1],
        0,
        &[pa, pb, pc, pd],
        0,
    )
    .expect("launches");
    let d: Vec<f32> = dev
        .read(pd, c.len() * 4)
        .expect("read")
        .chunks(4)
        .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
        .collect();
    for w in 0..WARPS {
        for i in 0..16 {
            for j in 0..8 {
                let mut exact = f64::from(c[w * 128 + i * 8 + j]);
                let mut mag = exact.abs();
                for k in 0..16 {
                    let p = f64::from(a[w * 256 + i * 16 + k]) * f64::from(b[w * 128 + k * 8 + j]);
                    exact += p;
                    mag += p.abs();
                }
                let got = f64::from(d[w * 128 + i * 8 + j]);
                // One f32 rounding of the sum: half an ulp of f32 relative to the
                // magnitudes summed (the inputs are exact in bf16).
                assert!(
                    (got - exact).abs() <= mag * f64::from(f32::EPSILON),
                    "warp {w} D[{i}][{j}] = {got}, expected {exact}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Tokens per chunk: with a batch of two, 80 GEMM rows (two row tiles of 64), three
/// query tiles of 16 per head (the last partial), and a second chunk that attends over
/// three key tiles of 32, the cache among them.
const T: u64 = 40;
const BATCH: u64 = 2;

/// Two chunks of `T` tokens for each of two sequences.
fn chunks() -> [Vec<i32>; 2] {
    let first: Vec<i32> = (0..BATCH * T)
        .map(|i| ((i * 37 + 5) % 250) as i32)
        .collect();
    let second: Vec<i32> = (0..BATCH * T)
        .map(|i| ((i * 53 + 11) % 250) as i32)
        .collect();
    [first, second]
}

struct Graphs {
    decode: Graph,
    prefill: Graph,
}

/// The decode and prefill graphs of the tiny model in `precision`: eager, or fused
/// (and for FP8 lowered).
fn graphs(precision: Precision, fused: bool) -> Graphs {
    let spec = common::spec(&common::root().join("examples/tiny.toml"));
    let s = stages::in_precision(&spec, precision);
    let arch = fusec_model::Registry::builtin()
        .architecture(&s.architecture)
        .expect("architecture");
    let eager_decode = stages::eager(&s).expect("decode graph");
    let eager_prefill = arch
        .build_step(&s.model, &StepDims::prefill(T, Logits::All))
        .expect("prefill graph");
    if !fused {
        return Graphs {
            decode: eager_decode,
            prefill: eager_prefill,
        };
    }
    let rules = stages::rules().expect("rules");
    let mut decode = stages::fuse(&s, &eager_decode, &rules).expect("fuses");
    let mut prefill = stages::fuse(&s, &eager_prefill, &rules).expect("fuses the prefill");
    if precision == Precision::Fp8 {
        decode = lower_fp8(&decode, &Fp8Options::default()).expect("lowers");
        prefill = lower_fp8(&prefill, &Fp8Options::default()).expect("lowers the prefill");
    }
    Graphs { decode, prefill }
}

/// Every position's logits of both chunks, per sequence, from the CPU executor.
fn cpu(g: &Graphs, weights: &Weights) -> Vec<Vec<f32>> {
    let mut s = Session::new(
        Executor::new(g.decode.clone(), weights).expect("decode executor"),
        BATCH as usize,
    )
    .expect("session");
    let mut p = Prefill::new(Executor::new(g.prefill.clone(), weights).expect("executor"))
        .expect("prefill");
    let mut out = Vec::new();
    for chunk in chunks() {
        let r = s.prefill(&mut p, &chunk).expect("prefills");
        for b in 0..BATCH as usize {
            out.push(
                r.logits
                    .index_axis(ndarray::Axis(0), b)
                    .iter()
                    .copied()
                    .collect(),
            );
        }
    }
    out
}

/// The same from the emulated kernels.
fn emulated(cxx: &str, label: &str, g: &Graphs, weights: &Weights) -> (Vec<Vec<f32>>, Output) {
    let shape = DecodeShape::new(BATCH, 2 * T + 16);
    let out = generate(&g.prefill, &shape, &Options::default()).expect("generates");
    let dir = std::env::temp_dir().join(format!("fusec-emu-{}-{label}", std::process::id()));
    let dev = emulate::Emulator::new(cxx.to_string(), &dir);
    let mut r = Runner::new(dev, &out, &CheckpointWeights(weights))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut logits = Vec::new();
    for chunk in chunks() {
        let s = r
            .step_prefill(&chunk)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        logits.extend(s.logits);
    }
    let _ = std::fs::remove_dir_all(&dir);
    (logits, out)
}

/// The largest difference relative to the reference row's largest magnitude.
fn max_rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale
        })
        .fold(0.0, f32::max)
}

fn families(out: &Output) -> Vec<String> {
    out.kernels.iter().map(|k| k.family.clone()).collect()
}

#[test]
fn bf16_prefill_kernels_follow_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let g = graphs(Precision::Bf16, true);
    let weights = Weights::load(&fixture(), &g.prefill).expect("fixture weights");
    let reference = cpu(&g, &weights);
    let (got, out) = emulated(&cxx, "prefill-bf16", &g, &weights);
    let fams = families(&out);
    assert!(fams.iter().any(|f| f.starts_with("gemm")), "{fams:?}");
    assert!(fams.iter().any(|f| f == "prefill_attention"), "{fams:?}");
    let r = max_rel(&got, &reference);
    println!("bf16 fused prefill: max relative logit difference {r:.2e}");
    // The products are the CPU's exactly (bf16 activations and weights, f32 sums), but
    // the tensor cores and the tiles sum in another order than the CPU's kernels; each
    // sum that lands near a bf16 rounding boundary can then round one bf16 ulp (2^-8
    // relative) the other way, and two layers carry a few such flips to the logits.
    assert!(r < 2e-2, "{r}");
}

#[test]
fn fp8_prefill_kernels_follow_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let g = graphs(Precision::Fp8, true);
    let base = graphs(Precision::Bf16, true);
    let weights = Weights::load(&fixture(), &base.prefill).expect("fixture weights");
    // The FP8 KV cache's scales, calibrated on the decode graphs (as `fusec run` does).
    let prompt: Vec<i32> = chunks()[0][..T as usize].to_vec();
    let (kv, _) =
        fusec_exec::calibrate::calibrate_kv_scales(&g.decode, &base.decode, &weights, &[prompt])
            .expect("calibrates");
    let fp8 = fusec_weights::lower_weights(&weights, &g.prefill, &kv).expect("quantizes");
    let reference = cpu(&g, &fp8);
    let (got, out) = emulated(&cxx, "prefill-fp8", &g, &fp8);
    let fams = families(&out);
    assert!(fams.iter().any(|f| f.starts_with("gemm")), "{fams:?}");
    let r = max_rel(&got, &reference);
    println!("fp8 fused prefill: max relative logit difference {r:.2e}");
    // As bf16, and an activation whose f32 sum moved can also land on the other side
    // of an E4M3 rounding boundary (2^-4 relative) in the next GEMM's quantization.
    // The GEMM also applies each FP8 block scale to a K step's partial sum where the
    // executor applies it to each activation: the same products, summed and scaled
    // in another order, so more sums move (5.0e-2 seen). A 1% error in the
    // activation scales gives 2.1e-1.
    assert!(r < 1e-1, "{r}");
}

#[test]
fn bf16_eager_prefill_kernels_follow_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let g = graphs(Precision::Bf16, false);
    let weights = Weights::load(&fixture(), &g.prefill).expect("fixture weights");
    let reference = cpu(&g, &weights);
    let (got, out) = emulated(&cxx, "prefill-bf16-eager", &g, &weights);
    assert!(families(&out).iter().any(|f| f.starts_with("gemm")));
    let r = max_rel(&got, &reference);
    println!("bf16 eager prefill: max relative logit difference {r:.2e}");
    // As the fused bf16 case.
    assert!(r < 2e-2, "{r}");
}

#[test]
fn f32_prefill_kernels_follow_the_cpu_executor() {
    let Some(cxx) = compiler() else { return };
    let g = graphs(Precision::F32, true);
    let weights = Weights::load(&fixture(), &g.prefill).expect("fixture weights");
    let reference = cpu(&g, &weights);
    let (got, out) = emulated(&cxx, "prefill-f32", &g, &weights);
    let fams = families(&out);
    // f32 graphs keep the exact-f32 GEMV template; the attention is the prefill one.
    assert!(!fams.iter().any(|f| f.starts_with("gemm")), "{fams:?}");
    assert!(fams.iter().any(|f| f == "prefill_attention"), "{fams:?}");
    let r = max_rel(&got, &reference);
    println!("f32 fused prefill: max relative logit difference {r:.2e}");
    // f32 throughout: only the order of the sums differs.
    assert!(r < 1e-4, "{r}");
}

/// Integer weights and sliding-window rings have no prefill kernels: codegen says so
/// with its typed error (the CLI's exit 2), never a panic or a wrong kernel.
#[test]
fn prefill_without_kernels_is_a_typed_error() {
    let spec = common::spec(&common::root().join("examples/llama-125m.toml"));
    let s = stages::in_precision(&spec, Precision::Int8);
    let arch = fusec_model::Registry::builtin()
        .architecture(&s.architecture)
        .expect("architecture");
    let eager = arch
        .build_step(&s.model, &StepDims::prefill(16, Logits::Last))
        .expect("prefill graph");
    let rules = stages::rules().expect("rules");
    let fused = stages::fuse(&s, &eager, &rules).expect("fuses");
    let lowered = fusec_rewrite::precision::lower_int(
        &fused,
        fusec_rewrite::precision::IntFormat::Q8_0,
        &Default::default(),
    )
    .expect("lowers to Q8_0");
    let shape = DecodeShape::new(1, 256);
    match generate(&lowered, &shape, &Options::default()) {
        Err(e @ fusec_codegen::Error::NoPrefillKernels { .. }) => {
            assert!(e.to_string().contains("integer weights"), "{e}");
        }
        other => panic!("expected NoPrefillKernels, got {other:?}"),
    }
    // Mistral's 4096-position window: a ring cache, eager and fused.
    for case in common::prefill_cases(
        &common::root().join("examples/mistral-7b.toml"),
        Precision::Bf16,
        16,
    ) {
        match generate(&case.graph, &case.shape, &Options::default()) {
            Err(e @ fusec_codegen::Error::NoPrefillKernels { .. }) => {
                assert!(e.to_string().contains("sliding-window"), "{e}");
            }
            other => panic!("{}: expected NoPrefillKernels, got {other:?}", case.label),
        }
    }
}
