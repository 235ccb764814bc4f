//! `fusec compile`: build the eager decode graph (or with `--paged` the paged step),
//! fuse it, write the dumps, print the summary of eager next to fused.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use fusec::codegen::{self, DecodeShape};
use fusec::cuda::nvrtc::{Nvrtc, Target};
use fusec::cuda::ptxas;
use fusec::output::{Outputs, Replace};
use fusec::pipeline::{self, PipelineError};
use fusec::summary::Summary;
use fusec_ir::{dot, text, Graph};
use fusec_model::blocks::{Logits, StepDims};
use fusec_model::frontend::{valid_model_name, ModelSpec};

use crate::cmd::options::{FusionArgs, PrecisionArgs};
use crate::Failure;

/// Compile one decode step of MODEL: fuse it, and report launches, bytes and time.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model.toml, a Hugging Face config.json, or a model directory holding one.
    pub model: PathBuf,
    /// Directory for the dumps [default: fusec-out/<model name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// What to write, comma-separated: `ir` (eager.fir, fused.fir), `dot` (eager.dot,
    /// fused.dot), `cuda` (kernels.cu and launch_plan.json for the fused graph,
    /// eager_kernels.cu and eager_launch_plan.json for the eager one), `ptx` (the same
    /// kernels compiled by NVRTC, kernels.sm_80.ptx and so on; needs libnvrtc).
    #[arg(long, value_delimiter = ',', default_value = "ir")]
    pub emit: Vec<Emit>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub report_json: Option<PathBuf>,
    /// KV length after the step (overrides [decode] context).
    #[arg(long)]
    pub context: Option<u64>,
    /// Sequences per step (overrides [decode] batch).
    #[arg(long)]
    pub batch: Option<u64>,
    /// Compile the paged decode step, its KV cache in blocks of BLOCK_SIZE positions
    /// read through a block table, instead of the dense one. Its costs count the
    /// positions the sequences hold: --context for each of --batch, or --lengths.
    #[arg(long, value_name = "BLOCK_SIZE")]
    pub paged: Option<u64>,
    /// With --paged, a ragged batch: the positions each sequence holds after the step,
    /// comma-separated (the batch is the list's length).
    #[arg(
        long,
        value_delimiter = ',',
        requires = "paged",
        conflicts_with_all = ["batch", "context"]
    )]
    pub lengths: Vec<u64>,
    /// Also compile the prefill step of TOKENS tokens per sequence (the last
    /// position's logits): its dumps are prefill_eager.* and prefill_fused.*, its CUDA
    /// (--emit cuda) prefill_eager_kernels.cu and prefill_fused_kernels.cu with their
    /// launch plans. Its bf16 projections run as tensor-core GEMMs, its attention as the
    /// causal prefill kernel. The summary stays the decode step's.
    #[arg(long, value_name = "TOKENS", conflicts_with = "paged")]
    pub prefill: Option<u64>,
    /// Target GPU for the cost model (overrides [target] gpu): h100-sxm, h200-sxm,
    /// a100-sxm, l40s, l4.
    #[arg(long)]
    pub gpu: Option<String>,
    #[command(flatten)]
    pub fusion: FusionArgs,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Replace an existing --report-json file (the dumps in the output directory are
    /// compile's own and always replaced).
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    Ir,
    Dot,
    Cuda,
    Ptx,
}

/// Writes one of compile's own dumps, which each compile replaces (see `Replace::Own`).
fn write(outputs: &Outputs, path: &Path, contents: String) -> Result<(), Failure> {
    Ok(outputs.write(path, contents.as_bytes(), Replace::Own)?)
}

fn dumps(
    outputs: &Outputs,
    out: &Path,
    stem: &str,
    graph: &Graph,
    shape: &DecodeShape,
    emit: &[Emit],
) -> Result<Vec<PathBuf>, Failure> {
    let internal = |e: fusec_ir::graph::CycleError| Failure::Internal(e.into());
    let mut written = Vec::new();
    for e in emit {
        let (ext, contents) = match e {
            Emit::Ir => ("fir", text::print(graph).map_err(internal)?),
            Emit::Dot => ("dot", dot::to_dot(graph).map_err(internal)?),
            Emit::Cuda | Emit::Ptx => {
                written.extend(cuda(outputs, out, stem, graph, shape, *e == Emit::Ptx)?);
                continue;
            }
        };
        let path = out.join(format!("{stem}.{ext}"));
        write(outputs, &path, contents)?;
        written.push(path);
    }
    Ok(written)
}

/// The CUDA kernels and launch plan of `graph` (fused: `kernels.cu`; eager:
/// `eager_kernels.cu`), or with `ptx` the kernels compiled by NVRTC for each target.
fn cuda(
    outputs: &Outputs,
    out: &Path,
    stem: &str,
    graph: &Graph,
    shape: &DecodeShape,
    ptx: bool,
) -> Result<Vec<PathBuf>, Failure> {
    let prefix = if stem == "fused" {
        String::new()
    } else {
        format!("{stem}_")
    };
    let options = codegen::Options::default();
    let code = codegen::generate(graph, shape, &options).map_err(|e| match e {
        codegen::Error::NoKernels { .. } | codegen::Error::NoPrefillKernels { .. } => {
            Failure::Input(anyhow::anyhow!("--emit cuda/ptx: {e}"))
        }
        _ => Failure::Internal(e.into()),
    })?;
    let mut written = Vec::new();
    if !ptx {
        let plan = code
            .plan
            .to_json()
            .map_err(|e| Failure::Internal(e.into()))?;
        for (name, contents) in [
            ("kernels.cu", code.source()),
            ("launch_plan.json", plan + "\n"),
        ] {
            let path = out.join(format!("{prefix}{name}"));
            write(outputs, &path, contents)?;
            written.push(path);
        }
        return Ok(written);
    }
    let nvrtc = Nvrtc::load()
        .map_err(|e| Failure::Input(anyhow::anyhow!("--emit ptx needs NVRTC: {e}")))?;
    let source = code.source();
    for arch in &options.archs {
        let ptx = nvrtc
            .compile(&source, Target::Ptx(*arch))
            .map_err(|e| Failure::Internal(e.into()))?;
        let path = out.join(format!("{prefix}kernels.{arch}.ptx"));
        write(
            outputs,
            &path,
            String::from_utf8_lossy(&ptx.image).into_owned(),
        )?;
        written.push(path);
        // Registers, spills, shared memory and occupancy per kernel, where ptxas is
        // installed; the file says so where it is not.
        let table = match ptxas::find() {
            Some(p) => {
                let version = ptxas::version(&p).map_err(|e| Failure::Internal(e.into()))?;
                let res = ptxas::resources(&p, &ptx.image, *arch)
                    .map_err(|e| Failure::Internal(e.into()))?;
                ptxas::table(&res, &code.plan, *arch, &version)
            }
            None => format!(
                "# {}: no register or occupancy figures\n",
                ptxas::PtxasError::NotFound
            ),
        };
        let path = out.join(format!("{prefix}kernels.{arch}.resources.txt"));
        write(outputs, &path, table)?;
        written.push(path);
    }
    Ok(written)
}

/// `--prefill TOKENS`: the prefill step's eager and fused graphs, dumped as the decode
/// step's are (stems `prefill_eager` and `prefill_fused`).
fn prefill_dumps(
    args: &Args,
    spec: &ModelSpec,
    fp8: &fusec_rewrite::precision::Fp8Options,
    tokens: u64,
    outputs: &Outputs,
    out: &Path,
    shape: &DecodeShape,
) -> Result<Vec<PathBuf>, Failure> {
    let max = spec.model.max_seq_len;
    if tokens == 0 || tokens > max {
        return Err(Failure::Input(anyhow::anyhow!(
            "--prefill: a step of {tokens} tokens; it takes 1 to the model's max_seq_len {max}"
        )));
    }
    let dims = StepDims::prefill(tokens, Logits::Last);
    let eager = pipeline::eager_prefill(spec, &dims)?;
    let mut written = dumps(outputs, out, "prefill_eager", &eager, shape, &args.emit)?;
    if !args.fusion.no_fuse {
        let rules = pipeline::rules(&args.fusion.rules)?;
        let (fused, _) =
            pipeline::fused_prefill_in(spec, spec.target.precision, &dims, &rules, fp8)?;
        written.extend(dumps(
            outputs,
            out,
            "prefill_fused",
            &fused,
            shape,
            &args.emit,
        )?);
    }
    Ok(written)
}

/// The paged step's block size and the positions each sequence holds after it, from
/// --paged and --lengths (or --context for each of --batch), checked against the
/// model; the spec's decode shape set to the batch and its longest sequence.
fn paged_lengths(args: &Args, spec: &mut ModelSpec) -> Result<Option<(u64, Vec<u64>)>, Failure> {
    let Some(block_size) = args.paged else {
        return Ok(None);
    };
    let bad = |m: String| Err(Failure::Input(anyhow::anyhow!(m)));
    let max = spec.model.max_seq_len;
    if block_size == 0 {
        return bad("--paged: a block holds at least 1 position, not 0".into());
    }
    if block_size > max {
        return bad(format!(
            "--paged: a block of {block_size} positions is longer than the model's max_seq_len {max}"
        ));
    }
    if args.lengths.is_empty() {
        let lengths = vec![spec.decode.context; spec.decode.batch as usize];
        return Ok(Some((block_size, lengths)));
    }
    for (i, &len) in args.lengths.iter().enumerate() {
        if len == 0 {
            return bad(format!(
                "--lengths: sequence {i} holds 0 positions; each holds at least its new token"
            ));
        }
        if len > max {
            return bad(format!(
                "--lengths: sequence {i} holds {len} positions, beyond the model's max_seq_len {max}"
            ));
        }
    }
    let longest = args.lengths.iter().copied().max().unwrap_or(1);
    spec.set_decode(Some(args.lengths.len() as u64), Some(longest))
        .map_err(|e| Failure::Input(anyhow::anyhow!("--lengths: {e}")))?;
    Ok(Some((block_size, args.lengths.clone())))
}

pub fn run(args: Args) -> Result<(), Failure> {
    let mut spec = pipeline::load(&args.model, args.batch, args.context)?;
    if let Some(g) = &args.gpu {
        spec.target.gpu = g.clone();
        spec.target.gpu_at = None;
    }
    args.precision.apply(&mut spec)?;
    let paged = paged_lengths(&args, &mut spec)?;
    let no_paged_step = |e: PipelineError| match e {
        PipelineError::NoPagedStep(_) => Failure::Input(anyhow::anyhow!("--paged: {e}")),
        e => e.into(),
    };
    let fp8 = args.precision.fp8(None, None, spec.target.precision)?;
    let gpu = pipeline::target_gpu(&spec)?;
    let eager = match &paged {
        Some((block_size, _)) => {
            pipeline::eager_paged(&spec, *block_size).map_err(no_paged_step)?
        }
        None => pipeline::eager(&spec)?,
    };
    let fused = if args.fusion.no_fuse {
        None
    } else {
        let rules = pipeline::rules(&args.fusion.rules)?;
        let start = Instant::now();
        let precision = spec.target.precision;
        let (graph, report) = match &paged {
            Some((block_size, _)) => {
                pipeline::fused_paged_in(&spec, precision, *block_size, &rules, &fp8)
                    .map_err(no_paged_step)?
            }
            None => pipeline::fused_in(&spec, precision, &rules, &fp8)?,
        };
        let elapsed = start.elapsed();
        crate::cmd::options::warn_fusion(&report);
        Some((graph, report, elapsed))
    };

    let mut outputs = Outputs::new(args.force);
    outputs.reads(&args.model);
    if let Some(w) = &spec.weights {
        outputs.reads(w);
    }
    for r in &args.fusion.rules {
        outputs.reads(r);
    }
    let out = match &args.out {
        Some(dir) => dir.clone(),
        // The frontends accept only plain names; a library architecture might not.
        None if valid_model_name(&spec.model.name) => {
            PathBuf::from("fusec-out").join(&spec.model.name)
        }
        None => {
            return Err(Failure::Input(anyhow::anyhow!(
                "model name `{}` cannot name a directory under fusec-out/: give --out",
                spec.model.name.escape_debug()
            )))
        }
    };
    outputs.check(&out.join("eager.fir"), Replace::Own)?;
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create {}", out.display()))
        .map_err(Failure::Input)?;
    let shape = DecodeShape::new(spec.decode.batch, spec.model.max_seq_len);
    let mut written = dumps(&outputs, &out, "eager", &eager, &shape, &args.emit)?;
    if let Some((graph, _, _)) = &fused {
        written.extend(dumps(&outputs, &out, "fused", graph, &shape, &args.emit)?);
    }

    if let Some(tokens) = args.prefill {
        written.extend(prefill_dumps(
            &args, &spec, &fp8, tokens, &outputs, &out, &shape,
        )?);
    }

    let fused_graph = fused.as_ref().map(|(g, _, _)| g);
    let summary = match paged {
        Some((block_size, lengths)) => {
            Summary::paged(&spec, gpu, &eager, fused_graph, block_size, lengths)
        }
        None => Summary::new(&spec, gpu, &eager, fused_graph),
    }
    .map_err(|e| Failure::Internal(e.into()))?;
    crate::say(&summary.render());
    if let Some((_, report, elapsed)) = &fused {
        crate::say(&format!(
            "fusion: {} after {} iterations ({} e-nodes, {} e-classes), {:.1} ms; {} near misses (fusec explain)\n",
            report.stop_reason,
            report.iterations,
            report.egraph_nodes,
            report.egraph_classes,
            elapsed.as_secs_f64() * 1e3,
            report.near_misses.len()
        ));
    }
    for p in &written {
        crate::say(&format!("wrote {}\n", p.display()));
    }
    if let Some(path) = &args.report_json {
        let json =
            serde_json::to_string_pretty(&summary).map_err(|e| Failure::Internal(e.into()))?;
        outputs.write(path, (json + "\n").as_bytes(), Replace::IfForced)?;
        crate::say(&format!("wrote {}\n", path.display()));
    }
    Ok(())
}
