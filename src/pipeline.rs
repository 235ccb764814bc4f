//! The compile pipeline, phase by phase, with the verifier after every phase.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use fusec_ir::hardware::{gpu, gpu_names, GpuSpec};
use fusec_ir::shape::Bindings;
use fusec_ir::step;
use fusec_ir::DType;
use fusec_ir::{verify, Graph};
use fusec_model::blocks::StepDims;
use fusec_model::frontend::Precision;
use fusec_model::{
    Architecture, BuildError, ConfigError, ModelSpec, Registry, UnknownArchitecture,
};
use fusec_rewrite::precision::{
    lower_fp8, lower_int, lower_int_by, Fp8Options, IntFormat, OpClass, PrecisionError,
};
use fusec_rewrite::{FuseReport, Limits, RuleError, RuleFileError, RuleSet};

/// What can go wrong when compiling. Everything but `Internal` is the user's input
/// (exit code 2); `Internal` is fusec's own (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Input(#[from] ConfigError),
    #[error(transparent)]
    UnknownArchitecture(#[from] UnknownArchitecture),
    #[error(transparent)]
    RuleFile(#[from] RuleFileError),
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}a user rule was rejected: {error}", location.as_ref().map(|l| format!("{l}: ")).unwrap_or_default())]
    BadRule {
        error: RuleError,
        /// Where the rule is defined (`file:line`).
        location: Option<String>,
    },
    #[error("{}unknown GPU `{name}` (known: {})", at.as_ref().map(|a| format!("{a}: ")).unwrap_or_default(), gpu_names().join(", "))]
    UnknownGpu {
        name: String,
        /// Where the model description names it, if it does.
        at: Option<String>,
    },
    #[error("{gpu} has no FP8 tensor cores: use --precision bf16, or a GPU with FP8 (h100-sxm, h200-sxm, l40s, l4)")]
    NoFp8 { gpu: String },
    /// A precision the model's shapes do not allow (an integer format's blocks).
    #[error("{0}")]
    Precision(String),
    /// A family whose step builder has no paged KV cache (the builder's reason).
    #[error("no paged step: {0}")]
    NoPagedStep(String),
    #[error("{phase}: {message}")]
    Internal {
        phase: &'static str,
        message: String,
    },
}

impl PipelineError {
    pub fn is_input_error(&self) -> bool {
        !matches!(self, PipelineError::Internal { .. })
    }
}

/// Runs the verifier after a named phase.
pub fn verified(phase: &'static str, graph: Graph) -> Result<Graph, PipelineError> {
    verify(&graph).map_err(|e| PipelineError::Internal {
        phase,
        message: format!("verifier: {e}"),
    })?;
    Ok(graph)
}

/// Loads a model description and applies command-line overrides of the decode shape.
pub fn load(
    path: &Path,
    batch: Option<u64>,
    context: Option<u64>,
) -> Result<ModelSpec, PipelineError> {
    load_with(Registry::builtin(), path, batch, context)
}

/// [`load`] with the architectures of `registry` (a library user's own among them).
pub fn load_with(
    registry: &Registry,
    path: &Path,
    batch: Option<u64>,
    context: Option<u64>,
) -> Result<ModelSpec, PipelineError> {
    let mut spec = registry.load_model(path)?;
    spec.set_decode(batch, context)?;
    Ok(spec)
}

/// The eager decode graph of a model, built by its (built-in) architecture, verified.
pub fn eager(spec: &ModelSpec) -> Result<Graph, PipelineError> {
    eager_with(Registry::builtin(), spec)
}

/// [`eager`] with the architecture `registry` holds for the spec.
pub fn eager_with(registry: &Registry, spec: &ModelSpec) -> Result<Graph, PipelineError> {
    eager_by(registry.architecture(&spec.architecture)?, spec)
}

/// The eager decode graph of `spec` built by `arch`, verified.
pub fn eager_by(arch: &dyn Architecture, spec: &ModelSpec) -> Result<Graph, PipelineError> {
    let graph = arch
        .build(&spec.model)
        .map_err(|e| PipelineError::Internal {
            phase: "build",
            message: e.to_string(),
        })?;
    verified("build", graph)
}

/// The eager prefill graph of a model over `dims` (`T` tokens per sequence, the
/// logits of the last position or of every one), verified.
pub fn eager_prefill(spec: &ModelSpec, dims: &StepDims) -> Result<Graph, PipelineError> {
    let arch = Registry::builtin().architecture(&spec.architecture)?;
    let graph = arch
        .build_step(&spec.model, dims)
        .map_err(|e| PipelineError::Internal {
            phase: "build",
            message: e.to_string(),
        })?;
    verified("build", graph)
}

/// Values of the graph's symbols for the spec's decode shape: `B` sequences with
/// `context - 1` positions cached before the step.
pub fn bindings(spec: &ModelSpec) -> Bindings {
    step::bindings_for_context(spec.decode.batch, spec.decode.context)
}

/// The spec's target GPU, or the one named by `--gpu`.
pub fn target_gpu(spec: &ModelSpec) -> Result<&'static GpuSpec, PipelineError> {
    gpu(&spec.target.gpu).ok_or_else(|| PipelineError::UnknownGpu {
        name: spec.target.gpu.clone(),
        at: spec.target.gpu_at.clone(),
    })
}

/// The built-in rules plus the user's rule files, in order.
pub fn rules(user_files: &[PathBuf]) -> Result<RuleSet, PipelineError> {
    let mut set = RuleSet::builtin()?;
    for path in user_files {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Io {
            path: path.clone(),
            source,
        })?;
        set.add_file(&path.display().to_string(), &text)?;
    }
    Ok(set)
}

/// Fuses the eager graph for the spec's target. A rejected application of a user's
/// rule is an error; one of a built-in rule stays in the report.
pub fn fuse(
    spec: &ModelSpec,
    eager: &Graph,
    rules: &RuleSet,
) -> Result<(Graph, FuseReport), PipelineError> {
    let gpu = target_gpu(spec)?;
    let bindings = bindings(spec);
    let opts = fusec_rewrite::Options {
        rules,
        gpu,
        bindings: &bindings,
        limits: Limits::default(),
    };
    let (graph, report) =
        fusec_rewrite::fuse(eager, &opts).map_err(|e| PipelineError::Internal {
            phase: e.phase,
            message: e.message,
        })?;
    let builtin: Vec<&str> = fusec_rewrite::ruleset::BUILTIN_RULE_FILES
        .iter()
        .map(|(t, _)| *t)
        .collect();
    for bad in &report.rejected {
        if let Some(rule) = rules
            .rules()
            .iter()
            .find(|r| r.name == bad.rule && !builtin.contains(&r.topic.as_str()))
        {
            return Err(PipelineError::BadRule {
                error: bad.clone(),
                location: rule.location.clone(),
            });
        }
    }
    Ok((verified("fuse", graph)?, report))
}

/// The dtype a precision computes in: FP8 lowers the GEMV weights and the KV cache of
/// a graph that otherwise runs in bf16 (f16 for an f16 checkpoint).
pub fn compute_dtype(spec: &ModelSpec, precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::Bf16,
        Precision::Fp8 if spec.model.dtype == DType::F16 => DType::F16,
        Precision::Fp8 => DType::Bf16,
        // llama.cpp's integer GEMVs (Q8_0, Q4_0, Q4_1, Q4_K; and a GGUF file run as
        // it is) compute in f32 around the integer dots.
        Precision::Int8 | Precision::Int4 | Precision::Q4_1 | Precision::Q4K | Precision::Gguf => {
            DType::F32
        }
    }
}

/// The op classes a precision keeps at the compute precision unless told otherwise.
/// FP8 keeps the LM head, as NVIDIA's ModelOpt FP8 recipe does: measured on
/// SmolLM2-135M-Instruct (README's accuracy table), its E4M3 weights with per-channel
/// scales cost more accuracy than any other class. The integer formats quantize it
/// too, as llama.cpp's Q8_0 and Q4_0 files do: their block scales keep it accurate,
/// and it is a fifth of a small model's bytes.
pub fn default_keep(precision: Precision) -> BTreeSet<OpClass> {
    match precision {
        Precision::Fp8 => BTreeSet::from([OpClass::LmHead]),
        _ => BTreeSet::new(),
    }
}

/// The spec with its checkpoint run in `precision`'s compute dtype.
pub fn in_precision(spec: &ModelSpec, precision: Precision) -> ModelSpec {
    let mut s = spec.clone();
    s.model.dtype = compute_dtype(spec, precision);
    s.target.precision = precision;
    s
}

/// The fused graph of `spec` in `precision`: the eager graph Hugging Face would run in
/// that dtype, fused, and for FP8 lowered by [`lower_fp8`].
pub fn fused_in(
    spec: &ModelSpec,
    precision: Precision,
    rules: &RuleSet,
    fp8: &Fp8Options,
) -> Result<(Graph, FuseReport), PipelineError> {
    fused_in_with(Registry::builtin(), spec, precision, rules, fp8)
}

/// [`fused_in`] with the architecture `registry` holds for the spec.
pub fn fused_in_with(
    registry: &Registry,
    spec: &ModelSpec,
    precision: Precision,
    rules: &RuleSet,
    fp8: &Fp8Options,
) -> Result<(Graph, FuseReport), PipelineError> {
    fused_from(spec, precision, rules, fp8, |s| eager_with(registry, s))
}

/// The prefill step of `spec` over `dims` in `precision`, fused and lowered as
/// [`fused_in`] does the decode step.
pub fn fused_prefill_in(
    spec: &ModelSpec,
    precision: Precision,
    dims: &StepDims,
    rules: &RuleSet,
    fp8: &Fp8Options,
) -> Result<(Graph, FuseReport), PipelineError> {
    fused_from(spec, precision, rules, fp8, |s| eager_prefill(s, dims))
}

/// The graph `eager` builds from `spec` in `precision`, fused and lowered; FP8 only
/// for a target GPU with FP8 math.
fn fused_from(
    spec: &ModelSpec,
    precision: Precision,
    rules: &RuleSet,
    fp8: &Fp8Options,
    eager: impl FnOnce(&ModelSpec) -> Result<Graph, PipelineError>,
) -> Result<(Graph, FuseReport), PipelineError> {
    let gpu = target_gpu(spec)?;
    if precision == Precision::Fp8 && gpu.fp8_tflops.is_none() {
        return Err(PipelineError::NoFp8 {
            gpu: gpu.name.to_string(),
        });
    }
    let s = in_precision(spec, precision);
    let eager = eager(&s)?;
    let (fused, report) = fuse(&s, &eager, rules)?;
    Ok((lower(spec, fused, precision, fp8)?, report))
}

/// The eager paged decode step of `spec` (`StepDims::paged`, blocks of `block_size`
/// positions), verified. A family whose builder has no paged step (Gemma 2's
/// soft-capped attention says so) is [`PipelineError::NoPagedStep`]; any other build
/// failure is fusec's own.
pub fn eager_paged(spec: &ModelSpec, block_size: u64) -> Result<Graph, PipelineError> {
    let arch = Registry::builtin().architecture(&spec.architecture)?;
    let graph = arch
        .build_step(&spec.model, &StepDims::paged(block_size))
        .map_err(|e| match e {
            BuildError::Unsupported(reason) => PipelineError::NoPagedStep(reason),
            e => PipelineError::Internal {
                phase: "build",
                message: e.to_string(),
            },
        })?;
    verified("build", graph)
}

/// [`fused_in`] for the paged decode step of blocks of `block_size` positions.
pub fn fused_paged_in(
    spec: &ModelSpec,
    precision: Precision,
    block_size: u64,
    rules: &RuleSet,
    fp8: &Fp8Options,
) -> Result<(Graph, FuseReport), PipelineError> {
    fused_from(spec, precision, rules, fp8, |s| eager_paged(s, block_size))
}

/// The integer format of each GEMV weight of `graph` that `spec`'s GGUF file holds in
/// a format fusec runs natively: what the `gguf` precision lowers to. Any other
/// checkpoint is an error.
pub fn file_formats(
    spec: &ModelSpec,
    graph: &Graph,
) -> Result<HashMap<String, IntFormat>, PipelineError> {
    let Some(path) = spec
        .weights
        .as_deref()
        .filter(|p| fusec_weights::gguf::is_gguf(p))
    else {
        return Err(PipelineError::Precision(
            "--precision gguf runs a GGUF file's own blocks: the model's weights are not a .gguf file"
                .into(),
        ));
    };
    fusec_weights::gguf::int_formats(path, graph)
        .map_err(|e| PipelineError::Precision(format!("--precision gguf: {e}")))
}

/// A fused graph lowered to `precision`'s weight storage: FP8 weights and caches with
/// their scales, or integer codes in blocks (for `gguf`, each weight in `spec`'s GGUF
/// file's own format, see [`file_formats`]); a float precision's graph unchanged.
pub fn lower(
    spec: &ModelSpec,
    fused: Graph,
    precision: Precision,
    fp8: &Fp8Options,
) -> Result<Graph, PipelineError> {
    let format = match precision {
        Precision::Fp8 => None,
        Precision::Int8 => Some(IntFormat::Q8_0),
        Precision::Int4 => Some(IntFormat::Q4_0),
        Precision::Q4_1 => Some(IntFormat::Q4_1),
        Precision::Q4K => Some(IntFormat::Q4K),
        Precision::Gguf => None,
        Precision::F32 | Precision::F16 | Precision::Bf16 => return Ok(fused),
    };
    if precision.is_int() {
        let lowered = match format {
            Some(format) => lower_int(&fused, format, &fp8.keep),
            None => {
                let formats = file_formats(spec, &fused)?;
                lower_int_by(
                    &fused,
                    &|name| formats.get(name).copied(),
                    &fp8.keep,
                    precision.name(),
                )
            }
        };
        let lowered = lowered.map_err(|e| match e {
            PrecisionError::NotBlocks { .. } => PipelineError::Precision(e.to_string()),
            e => PipelineError::Internal {
                phase: "lower-int",
                message: e.to_string(),
            },
        })?;
        return verified("lower-int", lowered);
    }
    let lowered = lower_fp8(&fused, fp8).map_err(|e| PipelineError::Internal {
        phase: "lower-fp8",
        message: e.to_string(),
    })?;
    verified("lower-fp8", lowered)
}
