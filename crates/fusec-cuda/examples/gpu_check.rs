//! The GPU check (run by `scripts/gpu-check.sh`; needs `--features cuda`):
//!
//! - `gpu_check fixture`: decodes the bundled tiny Llama checkpoint on the GPU (eager
//!   and fused graphs in f32 and bf16, and the fused FP8 graph) and compares every
//!   step's logits and tokens with the CPU executor running the same graph, and the
//!   f32 tokens with the Hugging Face reference; exits 1 on a mismatch.
//! - `gpu_check bench MODEL.toml VARIANT [--context N] [--batch N] [--steps N]`:
//!   times decode steps of `eager`, `fused` or `fused-fp8` with random weights and
//!   prints tokens/s, achieved GB/s and MBU (the memory floor over the step time,
//!   against the copy bandwidth measured in the same run).
//! - `gpu_check copy`: the device-to-device copy bandwidth.

#[path = "../tests/common/stages.rs"]
mod stages;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use fusec_codegen::{generate, DecodeShape, Options};
use fusec_cuda::gpu::CudaDevice;
use fusec_cuda::runtime::CheckpointWeights;
use fusec_cuda::runtime::{encode, Device, RunError, Runner, WeightSource};
use fusec_exec::{Executor, Session, Weights};
use fusec_ir::shape::Bindings;
use fusec_ir::{DType, Graph};
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_rewrite::precision::Fp8Options;

type Fail = String;

/// The repository: the working directory when it holds the examples (a binary built
/// elsewhere and run from a checkout), else the checkout it was built from.
fn root() -> PathBuf {
    let here = PathBuf::from(".");
    if here.join("examples/tiny.toml").is_file() {
        here
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }
}

fn fused_in(spec: &ModelSpec, p: Precision) -> Result<Graph, Fail> {
    let rules = stages::rules()?;
    stages::fused_in(spec, p, &rules, &Fp8Options::default())
}

const PROMPT: [i32; 5] = [1, 17, 42, 99, 7];
const NEW_TOKENS: usize = 16;

type Decode = Vec<(Vec<f32>, i32)>;

fn cpu(graph: &Graph, weights: &Weights) -> Result<Decode, Fail> {
    let exec = Executor::new(graph.clone(), weights).map_err(|e| e.to_string())?;
    let mut s = Session::new(exec, 1).map_err(|e| e.to_string())?;
    let g = s
        .generate(&[PROMPT.to_vec()], NEW_TOKENS)
        .map_err(|e| e.to_string())?;
    Ok(g.rows(0)
        .map(<[f32]>::to_vec)
        .zip(g.generated[0].iter().copied())
        .collect())
}

fn gpu(graph: &Graph, weights: &Weights, spec: &ModelSpec) -> Result<Decode, Fail> {
    let shape = DecodeShape::new(1, spec.model.max_seq_len);
    let out = generate(graph, &shape, &Options::default()).map_err(|e| e.to_string())?;
    let dev = CudaDevice::new(0).map_err(|e| e.to_string())?;
    let mut r = Runner::new(dev, &out, &CheckpointWeights(weights)).map_err(|e| e.to_string())?;
    let mut result = Vec::new();
    let mut token = PROMPT[0];
    for pos in 0..PROMPT.len() + NEW_TOKENS - 1 {
        // The prompt is fed token by token, then each step feeds the last greedy token.
        token = PROMPT.get(pos).copied().unwrap_or(token);
        let s = r.step(&[token]).map_err(|e| e.to_string())?;
        if pos + 1 >= PROMPT.len() {
            token = s.next[0];
            result.push((s.logits[0].clone(), token));
        }
    }
    Ok(result)
}

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

fn fixture() -> Result<bool, Fail> {
    let dir = root().join("tests/fixtures/hf-tiny-llama-s0");
    let spec =
        stages::load(&root().join("examples/tiny.toml"), None, None).map_err(|e| e.to_string())?;
    let expected: Vec<i32> = {
        let text = std::fs::read_to_string(dir.join("expected.json")).map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        v["generated"]
            .as_array()
            .ok_or("no generated ids")?
            .iter()
            .filter_map(|x| x.as_i64())
            .map(|x| x as i32)
            .collect()
    };
    let dev = CudaDevice::new(0).map_err(|e| e.to_string())?;
    println!(
        "fixture: {} ({}), tiny Llama, prompt {PROMPT:?}, {NEW_TOKENS} greedy tokens",
        dev.name(),
        dev.arch()
    );
    drop(dev);
    let mut ok = true;
    for (p, tol) in [
        (Precision::F32, 1e-3f32),
        (Precision::Bf16, 3e-2),
        (Precision::Fp8, 5e-2),
    ] {
        let s = stages::in_precision(&spec, p);
        let eager = stages::eager(&s).map_err(|e| e.to_string())?;
        let base = Weights::load(&dir, &eager).map_err(|e| e.to_string())?;
        let mut graphs = vec![("fused", fused_in(&spec, p)?)];
        if p != Precision::Fp8 {
            graphs.insert(0, ("eager", eager.clone()));
        }
        for (variant, graph) in &graphs {
            let weights = if p == Precision::Fp8 {
                let unlowered = fused_in(&spec, Precision::Bf16)?;
                let (kv, _) = fusec_exec::calibrate::calibrate_kv_scales(
                    graph,
                    &unlowered,
                    &base,
                    &[PROMPT.to_vec()],
                )
                .map_err(|e| e.to_string())?;
                fusec_weights::lower_weights(&base, graph, &kv).map_err(|e| e.to_string())?
            } else {
                base.clone()
            };
            let reference = cpu(graph, &weights)?;
            let got = gpu(graph, &weights, &spec)?;
            let rel = max_rel(&got, &reference);
            let same = tokens(&got) == tokens(&reference);
            let hf = p != Precision::F32 || tokens(&got) == expected;
            let pass = rel <= tol && (same || p == Precision::Fp8) && hf;
            ok &= pass;
            println!(
                "  {:5} {variant:6} max rel logit diff vs CPU {rel:.2e} (tol {tol:.0e}), tokens {} CPU{}  {}",
                p.name(),
                if same { "==" } else { "!=" },
                if p == Precision::F32 { if hf { ", == HF" } else { ", != HF" } } else { "" },
                if pass { "ok" } else { "FAIL" }
            );
        }
    }
    Ok(ok)
}

/// Random weights without materialising f32 copies: a block of uniform values is
/// encoded once per dtype and repeated. Matrices get values in ±0.05, vectors (norm
/// weights) values near 1, FP8 scales and KV-cache scales values that keep the
/// dequantized weights in the same range.
struct RandomWeights {
    blocks: std::cell::RefCell<std::collections::HashMap<(DType, bool), Vec<u8>>>,
}

impl RandomWeights {
    fn block(&self, dtype: DType, vector: bool) -> Vec<u8> {
        let mut cache = self.blocks.borrow_mut();
        cache
            .entry((dtype, vector))
            .or_insert_with(|| {
                let mut state = 0x9e37_79b9_7f4a_7c15u64;
                let values: Vec<f32> = (0..(1 << 20))
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let u = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                        match (dtype, vector) {
                            (DType::Fp8E4M3 | DType::Fp8E5M2, _) => u * 400.0,
                            (DType::I8, _) => (u * 127.0).round(),
                            (DType::I4, _) => (u * 7.5 - 0.5).round(),
                            (_, true) => 1.0 + 0.1 * u,
                            _ => 0.05 * u,
                        }
                    })
                    .collect();
                encode(dtype, &values)
            })
            .clone()
    }
}

impl WeightSource for RandomWeights {
    fn bytes(&self, name: &str, dtype: DType, dims: &[u64]) -> Result<Vec<u8>, RunError> {
        // Packed: `i4` codes two a byte.
        let n: u64 = dtype.bytes_for(dims.iter().product::<u64>());
        let n = usize::try_from(n).map_err(|_| RunError::Weight {
            name: name.into(),
            message: "too large".into(),
        })?;
        if name.ends_with(".scale") {
            // Weight scales: absmax/448 of rows of ±0.05 (integer codes' block scales
            // too: weights within about ±0.014, a sane range for a timing run);
            // KV-cache scales: 1/64.
            let v = if name.starts_with("past.") {
                1.0 / 64.0
            } else {
                0.05 / 448.0
            };
            return Ok(encode(dtype, &vec![v; n / dtype.size_bytes() as usize]));
        }
        let block = self.block(dtype, dims.len() == 1);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let take = (n - out.len()).min(block.len());
            out.extend_from_slice(&block[..take]);
        }
        Ok(out)
    }
}

fn flag(args: &[String], name: &str) -> Option<u64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn bench(args: &[String]) -> Result<bool, Fail> {
    let (Some(model), Some(variant)) = (args.first(), args.get(1)) else {
        return Err("usage: gpu_check bench MODEL.toml eager|fused|fused-fp8|fused-int8|fused-int4 [--context N] [--batch N] [--steps N]".into());
    };
    let spec = stages::load(
        Path::new(model),
        flag(args, "--batch"),
        flag(args, "--context"),
    )
    .map_err(|e| e.to_string())?;
    let steps = flag(args, "--steps").unwrap_or(20).max(1);
    let (graph, label) = match variant.as_str() {
        "eager" => (
            stages::eager(&stages::in_precision(&spec, Precision::Bf16))
                .map_err(|e| e.to_string())?,
            "eager bf16",
        ),
        "fused" => (fused_in(&spec, Precision::Bf16)?, "fused bf16"),
        "fused-fp8" => (fused_in(&spec, Precision::Fp8)?, "fused fp8"),
        // Q8_0 and Q4_0 codes, computing in f32 (the CPU executor's integer recipe).
        "fused-int8" => (fused_in(&spec, Precision::Int8)?, "fused int8"),
        "fused-int4" => (fused_in(&spec, Precision::Int4)?, "fused int4"),
        other => return Err(format!("unknown variant `{other}`")),
    };
    let context = spec.decode.context;
    let batch = spec.decode.batch;
    let t0 = Instant::now();
    let out = generate(
        &graph,
        &DecodeShape::new(batch, spec.model.max_seq_len),
        &Options::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut dev = CudaDevice::new(0).map_err(|e| e.to_string())?;
    let copy = dev.copy_bandwidth(1 << 30, 5).map_err(|e| e.to_string())?;
    let name = dev.name();
    let weights = RandomWeights {
        blocks: Default::default(),
    };
    let mut r = Runner::new(dev, &out, &weights).map_err(|e| e.to_string())?;
    r.set_past(context - 1).map_err(|e| e.to_string())?;
    let setup = t0.elapsed().as_secs_f64();
    for _ in 0..3 {
        r.launch_all().map_err(|e| e.to_string())?;
    }
    r.device().sync().map_err(|e| e.to_string())?;
    let t = Instant::now();
    for _ in 0..steps {
        r.launch_all().map_err(|e| e.to_string())?;
    }
    r.device().sync().map_err(|e| e.to_string())?;
    let step = t.elapsed().as_secs_f64() / steps as f64;
    let b = Bindings::new().with("B", batch).with("S", context - 1);
    let cost = fusec_ir::cost::graph_cost(&graph, &b).map_err(|e| e.to_string())?;
    let moved = cost.total.bytes() as f64;
    let floor = cost.floor.total() as f64;
    println!(
        "{:<14} {:<11} B={batch} ctx={context}: {:>5} launches, {:>8.2} ms/step, {:>8.1} tok/s, moved {:>6.2} GB at {:>6.0} GB/s, floor {:>6.2} GB, MBU {:>5.1}% of {:.0} GB/s copy  [{name}, setup {setup:.1} s]",
        spec.model.name,
        label,
        out.plan.launches.len(),
        step * 1e3,
        batch as f64 / step,
        moved / 1e9,
        moved / step / 1e9,
        floor / 1e9,
        100.0 * floor / step / copy,
        copy / 1e9,
    );
    Ok(true)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("fixture") => fixture(),
        Some("bench") => bench(&args[1..]),
        Some("copy") => CudaDevice::new(0)
            .map_err(|e| e.to_string())
            .and_then(|mut d| {
                d.copy_bandwidth(1 << 30, 5)
                    .map_err(|e| e.to_string())
                    .map(|bw| (d.name(), bw))
            })
            .map(|(n, bw)| {
                println!("copy bandwidth: {:.0} GB/s on {n}", bw / 1e9);
                true
            }),
        _ => Err("usage: gpu_check fixture | bench MODEL.toml VARIANT [...] | copy".into()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("gpu_check: {e}");
            ExitCode::from(2)
        }
    }
}
