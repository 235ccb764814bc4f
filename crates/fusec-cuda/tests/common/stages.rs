//! The compile pipeline's stages, called directly from the stage crates (the root
//! package's `fusec::pipeline` is a later stage than this crate): load a model, build
//! its eager graph in a precision, fuse it with the built-in rules, lower it to FP8 or
//! integer codes,
//! with the verifier after every phase. Shared by the tests and the `gpu_check`
//! example (included by path), so that both compile exactly what `fusec` compiles.

#![allow(dead_code)]

use std::path::Path;

use fusec_ir::{hardware, step, verify, DType, Graph};
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_model::{load_model, Registry};
use fusec_rewrite::precision::{lower_fp8, lower_int, Fp8Options, IntFormat};
use fusec_rewrite::{Limits, RuleSet};

/// Loads a model description with the decode shape overridden where given.
pub fn load(path: &Path, batch: Option<u64>, context: Option<u64>) -> Result<ModelSpec, String> {
    let mut spec = load_model(path).map_err(|e| e.to_string())?;
    spec.set_decode(batch, context).map_err(|e| e.to_string())?;
    Ok(spec)
}

fn verified(phase: &str, graph: Graph) -> Result<Graph, String> {
    verify(&graph).map_err(|e| format!("{phase}: verifier: {e}"))?;
    Ok(graph)
}

/// The spec with its checkpoint run in `precision`'s compute dtype: FP8 lowers the
/// GEMV weights and the KV cache of a graph that otherwise runs in bf16 (f16 for an
/// f16 checkpoint).
pub fn in_precision(spec: &ModelSpec, precision: Precision) -> ModelSpec {
    let mut s = spec.clone();
    s.model.dtype = match precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::Bf16,
        Precision::Fp8 if spec.model.dtype == DType::F16 => DType::F16,
        Precision::Fp8 => DType::Bf16,
        // Integer codes (Q8_0, Q4_0, Q4_1, Q4_K weights): their graphs compute in f32.
        Precision::Int8 | Precision::Int4 | Precision::Q4_1 | Precision::Q4K | Precision::Gguf => {
            DType::F32
        }
    };
    s.target.precision = precision;
    s
}

/// The eager decode graph, verified.
pub fn eager(spec: &ModelSpec) -> Result<Graph, String> {
    verified(
        "build",
        Registry::builtin().build(spec).map_err(|e| e.to_string())?,
    )
}

/// The built-in rules.
pub fn rules() -> Result<RuleSet, String> {
    RuleSet::builtin().map_err(|e| e.to_string())
}

/// `eager` fused by `rules` for the spec's target GPU and decode shape, verified.
pub fn fuse(spec: &ModelSpec, eager: &Graph, rules: &RuleSet) -> Result<Graph, String> {
    let gpu = hardware::gpu(&spec.target.gpu)
        .ok_or_else(|| format!("unknown GPU `{}`", spec.target.gpu))?;
    let bindings = step::bindings_for_context(spec.decode.batch, spec.decode.context);
    let opts = fusec_rewrite::Options {
        rules,
        gpu,
        bindings: &bindings,
        limits: Limits::default(),
    };
    let (graph, _) =
        fusec_rewrite::fuse(eager, &opts).map_err(|e| format!("{}: {}", e.phase, e.message))?;
    verified("fuse", graph)
}

/// The fused graph of `spec` in `precision`, lowered to FP8 for [`Precision::Fp8`]
/// and to Q8_0 or Q4_0 codes for [`Precision::Int8`] and [`Precision::Int4`] (as
/// `fusec::pipeline::lower` does).
pub fn fused_in(
    spec: &ModelSpec,
    precision: Precision,
    rules: &RuleSet,
    fp8: &Fp8Options,
) -> Result<Graph, String> {
    let s = in_precision(spec, precision);
    let fused = fuse(&s, &eager(&s)?, rules)?;
    let format = match precision {
        Precision::F32 | Precision::F16 | Precision::Bf16 => return Ok(fused),
        Precision::Fp8 => {
            return verified(
                "lower-fp8",
                lower_fp8(&fused, fp8).map_err(|e| e.to_string())?,
            )
        }
        Precision::Int8 => IntFormat::Q8_0,
        Precision::Int4 => IntFormat::Q4_0,
        Precision::Q4_1 => IntFormat::Q4_1,
        Precision::Q4K => IntFormat::Q4K,
        Precision::Gguf => {
            return Err(
                "gguf lowers each weight to its file's format: give a GGUF checkpoint".into(),
            )
        }
    };
    verified(
        "lower-int",
        lower_int(&fused, format, &fp8.keep).map_err(|e| e.to_string())?,
    )
}
