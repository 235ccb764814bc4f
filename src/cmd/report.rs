//! `fusec report`: what a decode step costs eager, fused and fused in FP8 on one GPU,
//! per kernel, per layer and per step, with cost per million tokens, context and batch
//! sweeps, the time to first token of prompts, and charts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use fusec::exec::{Executor, Session, Weights};
use fusec::model::blocks::{Logits, StepDims};
use fusec::output::{Outputs, Replace};
use fusec::pipeline;
use fusec::report::{
    self, CpuMeasurement, Format, MeasuredNode, Measurement, PrefillGraph, Variant,
};
use fusec_ir::hardware::{self, GpuSpec};
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_rewrite::precision::Fp8Options;

use crate::Failure;

/// Report what one decode step of MODEL costs in each compiled variant on a GPU: per
/// kernel (the eager ops it replaced, launches, bytes, FLOPs, roofline bound, time), per
/// layer and per step (savings, time per token, tokens/s, $ per million tokens, MBU),
/// and swept over context length and batch size; and the time to first token of
/// prompts, prefilled in chunks.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model.toml, a Hugging Face config.json, or a model directory holding one.
    pub model: PathBuf,
    /// The GPU to estimate for (overrides [target] gpu): a built-in one (h100-sxm,
    /// h200-sxm, a100-sxm, l40s, l4) or one from --gpu-file.
    #[arg(long)]
    pub gpu: Option<String>,
    /// A TOML file of extra GPUs (`[[gpu]]` tables; format in
    /// crates/fusec-report/README.md). Repeatable.
    #[arg(long = "gpu-file", value_name = "FILE")]
    pub gpu_file: Vec<PathBuf>,
    /// Precision of the compiled variants (overrides [target] precision): f32, f16 or
    /// bf16 report eager and fused in that dtype; fp8 adds fused+fp8 to bf16 eager and
    /// fused; an integer precision (int8, int4, q4_1, q4_k, gguf) adds fused+int8 (and
    /// so on) to f32 eager and fused.
    #[arg(long)]
    pub precision: Option<String>,
    /// Context lengths of the context sweep, comma-separated [default: powers of two up
    /// to max_seq_len].
    #[arg(long, value_delimiter = ',')]
    pub context: Vec<u64>,
    /// Batch sizes of the batch sweep, comma-separated [default: 1,2,4,...,1024].
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<u64>,
    /// Prompt lengths of the prefill sweep (time to first token), comma-separated
    /// [default: 128,512,2048, those shorter than max_seq_len].
    #[arg(long = "prompt-len", value_delimiter = ',')]
    pub prompt_len: Vec<u64>,
    /// The most tokens one prefill chunk feeds, as `fusec run --prefill-chunk`.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: u64,
    /// Leave out the prefill sweep (it compiles a prefill graph per chunk length).
    #[arg(long, conflicts_with = "prompt_len")]
    pub no_prefill: bool,
    /// Dollars per GPU-hour, for the cost per million tokens.
    #[arg(long, default_value_t = 2.5)]
    pub price_per_hour: f64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Text)]
    pub format: FormatArg,
    /// Write the report to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// GPU measurements to show next to the predictions [default: measurements.toml in
    /// the current directory, if there is one].
    #[arg(long, value_name = "FILE")]
    pub measurements: Option<PathBuf>,
    /// Also run one decode step of the eager graph on the CPU executor with seeded
    /// random weights, and show its measured counts and times next to the predicted
    /// ones (models of at most 1 B parameters, at a context of at most 128: fewer for
    /// larger models).
    #[arg(long)]
    pub measure_cpu: bool,
    /// Replace an existing --out file.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatArg {
    Text,
    Json,
    Md,
    Html,
}

impl FormatArg {
    fn format(self) -> Format {
        match self {
            FormatArg::Text => Format::Text,
            FormatArg::Json => Format::Json,
            FormatArg::Md => Format::Markdown,
            FormatArg::Html => Format::Html,
        }
    }
}

/// The measurements file read when `--measurements` is not given.
const DEFAULT_MEASUREMENTS: &str = "measurements.toml";

/// The longest context `--measure-cpu` decodes to: every position up to it is one
/// executor step.
const CPU_MAX_CONTEXT: u64 = 128;

/// The shortest context `--measure-cpu` decodes to, whatever the model's size.
const CPU_MIN_CONTEXT: u64 = 16;

/// Parameters times steps that `--measure-cpu` allows itself: a 125M-parameter model
/// then stops at context 32, which keeps the check within seconds in a release build.
const CPU_PARAMETER_STEPS: u64 = 4_000_000_000;

/// The most parameters `--measure-cpu` accepts: random weights for more take long to
/// generate and a CPU step of them is no longer quick.
const CPU_MAX_PARAMETERS: u64 = 1_000_000_000;

fn report_failure(e: report::ReportError) -> Failure {
    if e.is_input_error() {
        Failure::Input(e.into())
    } else {
        Failure::Internal(e.into())
    }
}

/// The built-in GPUs followed by the user's.
fn gpu_table(files: &[PathBuf]) -> Result<Vec<GpuSpec>, Failure> {
    let mut gpus: Vec<GpuSpec> = hardware::GPUS.to_vec();
    for f in files {
        for g in fusec_model::frontend::load_gpu_file(f).map_err(|e| Failure::Input(e.into()))? {
            if gpus.iter().any(|h| h.name == g.name) {
                return Err(Failure::Input(anyhow!(
                    "{}: GPU `{}` is defined in another --gpu-file too",
                    f.display(),
                    g.name
                )));
            }
            gpus.push(g);
        }
    }
    Ok(gpus)
}

/// The GPU measurements: the named file, else the default file if present.
fn measurements(arg: Option<&Path>) -> Result<(Vec<Measurement>, Option<String>), Failure> {
    let path = match arg {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_MEASUREMENTS).is_file() => PathBuf::from(DEFAULT_MEASUREMENTS),
        None => return Ok((Vec::new(), None)),
    };
    let src = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))
        .map_err(Failure::Input)?;
    let m = report::parse_measurements(&path, &src).map_err(report_failure)?;
    Ok((m, Some(path.display().to_string())))
}

/// The variants to report: eager and fused in the precision's compute dtype, plus
/// fused+fp8 for FP8 and fused+int8 (int4, q4_1, ...) for the integer precisions.
fn variants(spec: &ModelSpec, precision: Precision) -> Result<Vec<Variant>, Failure> {
    let rules = pipeline::rules(&[])?;
    let s = pipeline::in_precision(spec, precision);
    let dtype = s.model.dtype;
    let eager = pipeline::eager(&s)?;
    let (fused, _) = pipeline::fuse(&s, &eager, &rules)?;
    let mut out = vec![
        Variant {
            name: "eager".to_string(),
            description: format!(
                "the decode step op for op as Hugging Face transformers runs it eagerly in {dtype}"
            ),
            graph: eager,
        },
        Variant {
            name: "fused".to_string(),
            description: format!(
                "the eager graph fused by equality saturation with the built-in rules, in {dtype}"
            ),
            graph: fused,
        },
    ];
    if precision == Precision::Fp8 {
        let (fp8, _) = pipeline::fused_in(spec, precision, &rules, &Fp8Options::default())?;
        out.push(Variant {
            name: "fused+fp8".to_string(),
            description: format!(
                "the fused graph lowered to FP8: E4M3 weights with per-output-channel \
                 scales and an FP8 KV cache, other math in {dtype}"
            ),
            graph: fp8,
        });
    } else if precision.is_int() {
        let (lowered, _) = pipeline::fused_in(spec, precision, &rules, &Fp8Options::default())?;
        out.push(Variant {
            name: format!("fused+{}", precision.name()),
            description: format!(
                "the fused graph lowered to {} integer weights in blocks, activations \
                 quantized to 8 bits per block inside each GEMV, other math in {dtype}",
                precision.name()
            ),
            graph: lowered,
        });
    }
    Ok(out)
}

/// The prefill graphs of the variants `variants` builds, for every chunk length the
/// prompts are fed in: eager and fused in the precision's compute dtype, plus the
/// lowered variant of FP8 and the integer precisions.
fn prefill_graphs(
    spec: &ModelSpec,
    precision: Precision,
    prompts: &[u64],
    chunk: u64,
) -> Result<Vec<PrefillGraph>, Failure> {
    let rules = pipeline::rules(&[])?;
    let s = pipeline::in_precision(spec, precision);
    let lengths: BTreeSet<u64> = prompts
        .iter()
        .flat_map(|&p| report::prefill::chunks(p, chunk))
        .collect();
    let mut out = Vec::new();
    for tokens in lengths {
        let eager = pipeline::eager_prefill(&s, &StepDims::prefill(tokens, Logits::Last))?;
        let (fused, _) = pipeline::fuse(&s, &eager, &rules)?;
        if precision == Precision::Fp8 || precision.is_int() {
            let lowered = pipeline::lower(&s, fused.clone(), precision, &Fp8Options::default())?;
            out.push(PrefillGraph {
                variant: format!("fused+{}", precision.name()),
                tokens,
                graph: lowered,
            });
        }
        out.push(PrefillGraph {
            variant: "eager".to_string(),
            tokens,
            graph: eager,
        });
        out.push(PrefillGraph {
            variant: "fused".to_string(),
            tokens,
            graph: fused,
        });
    }
    Ok(out)
}

/// Runs the eager variant on the CPU executor with seeded random weights up to a
/// context of at most [`CPU_MAX_CONTEXT`], and returns the last step's measured nodes.
fn measure_cpu(spec: &ModelSpec, eager: &Variant) -> Result<CpuMeasurement, Failure> {
    let params = spec.model.parameter_count();
    if params > CPU_MAX_PARAMETERS {
        return Err(Failure::Input(anyhow!(
            "--measure-cpu runs small models only: {} has {params} parameters (at most {CPU_MAX_PARAMETERS})",
            spec.model.name
        )));
    }
    let exec_failure = |e: fusec::exec::Error| {
        if e.is_input_error() {
            Failure::Input(e.into())
        } else {
            Failure::Internal(e.into())
        }
    };
    let batch = spec.decode.batch;
    let budget = (CPU_PARAMETER_STEPS / params.max(1)).clamp(CPU_MIN_CONTEXT, CPU_MAX_CONTEXT);
    let context = spec.decode.context.min(budget);
    fusec::memory::check(
        fusec::memory::least_bytes(spec, Precision::F32, batch, context),
        &format!("--measure-cpu on {}", spec.model.name),
        None,
    )
    .map_err(|m| Failure::Input(anyhow!(m)))?;
    let weights = Weights::random(&eager.graph, 0).map_err(|e| exec_failure(e.into()))?;
    let exec = Executor::new(eager.graph.clone(), &weights).map_err(exec_failure)?;
    let batch_usize = usize::try_from(batch)
        .map_err(|_| Failure::Input(anyhow!("batch {batch} is too large for --measure-cpu")))?;
    let mut session = Session::new(exec, batch_usize).map_err(exec_failure)?;
    // Token 1 at every position: the values do not change the counts or, to first
    // order, the time of a dense step.
    let tokens = vec![1i32; batch_usize];
    let mut last = None;
    for _ in 0..context {
        last = Some(session.step(&tokens).map_err(exec_failure)?);
    }
    let step = last.ok_or_else(|| Failure::Internal(anyhow!("no CPU step ran")))?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    Ok(CpuMeasurement {
        variant: eager.name.clone(),
        batch,
        context,
        step_seconds: step.stats.time.as_secs_f64(),
        description: format!(
            "fusec-exec on this machine's CPU ({threads} hardware threads), seeded random weights"
        ),
        nodes: step
            .stats
            .nodes
            .iter()
            .map(|n| MeasuredNode {
                node: n.node,
                bytes_read: n.bytes_read,
                bytes_written: n.bytes_written,
                seconds: n.time.as_secs_f64(),
            })
            .collect(),
    })
}

pub fn run(args: Args) -> Result<(), Failure> {
    let mut spec = pipeline::load(&args.model, None, None)?;
    let gpus = gpu_table(&args.gpu_file)?;
    let gpu_name = args.gpu.clone().unwrap_or_else(|| spec.target.gpu.clone());
    let gpu = gpus
        .iter()
        .find(|g| g.name == gpu_name.as_str())
        .ok_or_else(|| {
            let known: Vec<&str> = gpus.iter().map(|g| g.name.as_ref()).collect();
            let at = match (&args.gpu, &spec.target.gpu_at) {
                (None, Some(at)) => format!("{at}: "),
                _ => String::new(),
            };
            Failure::Input(anyhow!(
                "{at}unknown GPU `{gpu_name}` (known: {}; add one with --gpu-file)",
                known.join(", ")
            ))
        })?
        .clone();
    let precision = match &args.precision {
        Some(p) => Precision::parse(p).ok_or_else(|| {
            Failure::Input(anyhow!(
                "unknown precision `{p}` (expected one of {})",
                Precision::names()
            ))
        })?,
        None => spec.target.precision,
    };
    if precision == Precision::Fp8 && gpu.fp8_tflops.is_none() {
        return Err(Failure::Input(anyhow!(
            "{} has no FP8 tensor cores: use --precision bf16, or a GPU with FP8",
            gpu.name
        )));
    }
    // Fusion chooses kernels with a built-in GPU's cost model; a GPU from a file has
    // none there, so its report is fused for the model's own target GPU (the default
    // one if that is unknown) and says so.
    let mut notes = Vec::new();
    if hardware::gpu(&gpu.name).is_some() {
        spec.target.gpu = gpu.name.to_string();
    } else {
        if hardware::gpu(&spec.target.gpu).is_none() {
            spec.target.gpu = hardware::GPUS
                .first()
                .map_or_else(String::new, |g| g.name.to_string());
        }
        notes.push(format!(
            "{} comes from a GPU file: fusion chose its kernels with the cost model of {}; \
             every estimate in this report uses {}'s figures.",
            gpu.name, spec.target.gpu, gpu.name
        ));
    }
    let variants = variants(&spec, precision)?;
    let contexts = if args.context.is_empty() {
        report::sweep::default_contexts(spec.model.max_seq_len)
    } else {
        args.context.clone()
    };
    let batches = if args.batch.is_empty() {
        report::sweep::default_batches()
    } else {
        args.batch.clone()
    };
    // Every point the user asks for is a decode shape the frontends' checks must
    // accept, limits included, like --context and --batch of `fusec compile` (a zero
    // is left to the report, which names the flag).
    for &c in args.context.iter().filter(|&&c| c > 0) {
        spec.clone()
            .set_decode(None, Some(c))
            .map_err(|e| Failure::Input(e.into()))?;
    }
    for &b in args.batch.iter().filter(|&&b| b > 0) {
        spec.clone()
            .set_decode(Some(b), None)
            .map_err(|e| Failure::Input(e.into()))?;
    }
    let max_len = spec.model.max_seq_len;
    let prompts = if args.prompt_len.is_empty() {
        report::prefill::default_prompts(max_len)
    } else {
        args.prompt_len.clone()
    };
    if let Some(&p) = prompts.iter().find(|&&p| p == 0 || p >= max_len) {
        return Err(Failure::Input(anyhow!(
            "--prompt-len: a prompt must be 1 to {} tokens (max_seq_len {max_len}, one position left for the first generated token), got {p}",
            max_len.saturating_sub(1)
        )));
    }
    if args.prefill_chunk == 0 {
        return Err(Failure::Input(anyhow!(
            "--prefill-chunk must be at least 1 token"
        )));
    }
    let prefill = if args.no_prefill {
        Vec::new()
    } else {
        prefill_graphs(&spec, precision, &prompts, args.prefill_chunk)?
    };
    let mut outputs = Outputs::new(args.force);
    outputs.reads(&args.model);
    if let Some(w) = &spec.weights {
        outputs.reads(w);
    }
    for f in args.gpu_file.iter().chain(&args.measurements) {
        outputs.reads(f);
    }
    // Read when --measurements is not given.
    outputs.reads(Path::new(DEFAULT_MEASUREMENTS));
    if let Some(path) = &args.out {
        outputs.check(path, Replace::IfForced)?;
    }
    let (measurements, measurements_file) = measurements(args.measurements.as_deref())?;
    let cpu = if args.measure_cpu {
        Some(measure_cpu(&spec, &variants[0])?)
    } else {
        None
    };
    let inputs = report::Inputs {
        spec: &spec,
        variants: &variants,
        precision: precision.name(),
        gpu: &gpu,
        gpus: &gpus,
        price_per_hour: args.price_per_hour,
        contexts: &contexts,
        batches: &batches,
        prefill: &prefill,
        prompts: &prompts,
        prefill_chunk: args.prefill_chunk,
        measurements: &measurements,
        measurements_file: measurements_file.as_deref(),
        cpu: cpu.as_ref(),
        notes: &notes,
    };
    let report = report::build(&inputs).map_err(report_failure)?;
    let text = report
        .render(args.format.format())
        .map_err(report_failure)?;
    match &args.out {
        Some(path) => {
            outputs.write(path, text.as_bytes(), Replace::IfForced)?;
            crate::say(&format!("wrote {}\n", path.display()));
        }
        None => crate::say(&text),
    }
    Ok(())
}
