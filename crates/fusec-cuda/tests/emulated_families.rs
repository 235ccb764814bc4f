//! The generated kernels of OLMo 2, Granite 3, Gemma 2 and Gemma 3 (`fused.post_rms_norm`,
//! `fused.linear_scale_add`, `fused.offset_rms_norm`, `fused.geglu`, the soft-capped
//! `fused.attention` and the rest), run on the CPU emulation of
//! `tests/emulate`, decode their tiny Hugging Face references as the CPU executor does:
//! fused in f32 (ids exact, 1e-4), bf16 and FP8. Needs a C++20 compiler (`$CXX` or
//! `g++`); without one the test says so loudly and passes.

mod common;
mod emulate;

use std::io::Write as _;
use std::path::PathBuf;

use common::stages;
use fusec_codegen::{generate, DecodeShape, Options};
use fusec_cuda::runtime::{encode, RunError, Runner, WeightSource};
use fusec_exec::{Executor, Session, Weights};
use fusec_ir::{DType, Graph};
use fusec_model::frontend::Precision;
use fusec_rewrite::precision::Fp8Options;

struct Source<'a>(&'a Weights);

impl WeightSource for Source<'_> {
    fn bytes(&self, name: &str, dtype: DType, dims: &[u64]) -> Result<Vec<u8>, RunError> {
        let t = self.0.get(name).ok_or_else(|| RunError::Weight {
            name: name.into(),
            message: "missing".into(),
        })?;
        let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
        if shape != dims {
            return Err(RunError::Weight {
                name: name.into(),
                message: format!("shape {shape:?}, want {dims:?}"),
            });
        }
        Ok(encode(dtype, &t.to_vec_f32()))
    }
}

const PROMPT: [i32; 5] = [1, 17, 42, 99, 7];
/// The fixtures and the tokens each decodes: Gemma's stay within their sliding window
/// of 8 positions (5 prompt tokens and 4 new ones; the decode graph attends to the
/// whole cache, so `fusec` refuses longer contexts).
const FIXTURES: [(&str, usize); 4] = [
    ("hf-tiny-olmo2-s0", 8),
    ("hf-tiny-granite-s3", 8),
    ("hf-tiny-gemma2-s0", 4),
    ("hf-tiny-gemma3-s0", 4),
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
    let out = generate(graph, &DecodeShape::new(1, 128), &Options::default()).expect("generates");
    let dir = std::env::temp_dir().join(format!("fusec-emu-fam-{}-{label}", std::process::id()));
    let dev = emulate::Emulator::new(cxx.to_string(), &dir);
    let mut r = Runner::new(dev, &out, &Source(weights)).unwrap_or_else(|e| panic!("{label}: {e}"));
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
    let c = emulate::compiler();
    if c.is_none() {
        let line = "NO C++ COMPILER: the CUDA kernels were NOT run in emulation";
        let _ = writeln!(std::io::stderr(), "\n{line}\n");
    }
    c
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
