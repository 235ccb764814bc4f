//! `fusec bench`: CPU decode throughput of the eager graph and of the fused graph in
//! f32, bf16 and FP8, on random weights, against the read bandwidth measured by the
//! same run, and fused f32 prefill against the FMA peak measured by the same run (see
//! `fusec::bench` for the method); with `--serve`, `fusec serve`'s scheduler and engine
//! driven in-process (see `fusec::serving`).

use std::path::PathBuf;

use anyhow::anyhow;
use fusec::bench::{self, BenchError, Options};
use fusec::output::{Outputs, Replace};
use fusec::pipeline;
use fusec::serving::{self, metered, ServingError, ServingOptions, ServingResult};
use fusec_model::frontend::ModelSpec;
use fusec_rewrite::precision::Fp8Options;
use fusec_serve::{Scheduler, SchedulerConfig};

use crate::cmd::serve::{self, EngineKind};
use crate::{say, Failure};

/// Benchmark CPU decode: eager, fused f32, fused bf16 and fused fp8, side by side
/// (and, with --serve, the serving engine under concurrent requests).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model.toml, a Hugging Face config.json, or a model directory holding one.
    pub model: PathBuf,
    /// Positions in the KV cache when timing starts.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Timed decode steps per variant and round.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Rounds the variants take in turn, each decoding the same steps from the same
    /// context.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run only this variant (repeatable): "eager f32", "fused f32", "fused bf16",
    /// "fused fp8", "fused int8", "fused int4", "fused q4_1" or "fused q4_k" [default: all; an integer variant that
    /// the model's shapes do not allow is skipped with the reason].
    #[arg(long = "variant", value_name = "NAME")]
    pub only: Vec<String>,
    /// The most memory the variants may hold (e.g. 8G) [default: what the machine
    /// can give].
    #[arg(long, value_name = "BYTES", value_parser = fusec::memory::parse_bytes)]
    pub max_memory: Option<u64>,
    /// Prompt lengths to time the fused f32 prefill at, comma-separated, beside the
    /// measured FMA peak [default: 128,512, those within the model's max_seq_len].
    #[arg(long, value_delimiter = ',', conflicts_with = "no_prefill")]
    pub prefill: Vec<usize>,
    /// Time decode only.
    #[arg(long)]
    pub no_prefill: bool,
    /// Batches to time fused f32 decode at, comma-separated (sequences per step, each
    /// with its own tokens), reported as tokens/s of all sequences and as the ratio to
    /// batch 1 of the same run [default: 1,4,8,16].
    #[arg(long = "batch", value_delimiter = ',', conflicts_with = "no_batch")]
    pub batches: Vec<usize>,
    /// Time no batched decode.
    #[arg(long)]
    pub no_batch: bool,
    /// Also write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    pub force: bool,
    /// Also run a serving benchmark of this many requests: `fusec serve`'s scheduler
    /// and engine driven in-process (no HTTP), --concurrency requests in flight, each
    /// a seeded random prompt of --prompt-len tokens generating --output-len tokens;
    /// reports throughput, time to first token, inter-token and end-to-end latency.
    #[arg(long, value_name = "REQUESTS")]
    pub serve: Option<usize>,
    /// Serving: requests in flight at once (also the scheduler's --max-running).
    #[arg(long, default_value_t = 8, requires = "serve")]
    pub concurrency: usize,
    /// Serving: prompt tokens of every request.
    #[arg(long, default_value_t = 128, requires = "serve")]
    pub prompt_len: usize,
    /// Serving: tokens every request generates (no stop id ends one early).
    #[arg(long, default_value_t = 128, requires = "serve")]
    pub output_len: usize,
    /// Serving: the engine, as `fusec serve --engine`: `paged` (one batched step over
    /// a paged KV cache), `sessions` (a batch-1 session per sequence) or `auto` (paged
    /// where the family has a paged step).
    #[arg(long, value_enum, default_value_t = EngineKind::Auto, requires = "serve")]
    pub engine: EngineKind,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let spec = pipeline::load(&args.model, None, None)?;
    let mut outputs = Outputs::new(args.force);
    outputs.reads(&args.model);
    // Checked before the run, so that a refused output costs no benchmark.
    if let Some(path) = &args.json {
        outputs.check(path, Replace::IfForced)?;
    }
    let opts = Options {
        context: args.context,
        steps: args.steps,
        rounds: args.rounds,
        seed: args.seed,
        only: args.only,
        max_memory: args.max_memory,
        prefill: match (args.no_prefill, args.prefill.is_empty()) {
            (true, _) => Vec::new(),
            (false, false) => args.prefill,
            (false, true) => [128, 512]
                .into_iter()
                .filter(|&t| t as u64 <= spec.model.max_seq_len)
                .collect(),
        },
        batches: match (args.no_batch, args.batches.is_empty()) {
            (true, _) => Vec::new(),
            (false, false) => args.batches,
            (false, true) => bench::DEFAULT_BATCHES.to_vec(),
        },
    };
    // The serving options are checked before any benchmark runs.
    let serving = match args.serve {
        Some(requests) => {
            let serving = ServingOptions {
                requests,
                concurrency: args.concurrency,
                prompt_len: args.prompt_len,
                output_len: args.output_len,
                seed: args.seed,
            };
            serving
                .check(spec.model.max_seq_len)
                .map_err(|m| Failure::Input(anyhow!(m)))?;
            let kv_blocks = serve_kv_blocks(&spec, &serving);
            serve::check_memory(&spec, kv_blocks, serve::DEFAULT_BLOCK_SIZE, args.max_memory)?;
            Some((serving, kv_blocks))
        }
        None => None,
    };
    let mut result = bench::run_model(&spec, &opts).map_err(|e| match e {
        BenchError::Pipeline(p) => Failure::from(p),
        BenchError::Invalid(m) => Failure::Input(anyhow!(m)),
        e @ (BenchError::Exec(_) | BenchError::Weights(_)) => Failure::Internal(e.into()),
    })?;
    if let Some((serving, kv_blocks)) = serving {
        result.serving = Some(run_serving(&spec, &serving, kv_blocks, args.engine)?);
    }
    say(&result.render());
    if let Some(path) = &args.json {
        outputs.write(
            path,
            (result.to_json() + "\n").as_bytes(),
            Replace::IfForced,
        )?;
    }
    if let Some(hwm) = bench::proc_status_bytes("VmHWM:") {
        say(&format!(
            "peak resident memory (VmHWM): {:.0} MB\n",
            hwm as f64 / 1e6
        ));
    }
    Ok(())
}

/// The serving benchmark's KV capacity: `fusec serve`'s default for --concurrency
/// sequences of the model's context.
fn serve_kv_blocks(spec: &ModelSpec, opts: &ServingOptions) -> u64 {
    serve::default_kv_blocks(
        opts.concurrency as u64,
        spec.model.max_seq_len,
        serve::DEFAULT_BLOCK_SIZE,
    )
}

/// Builds `fusec serve`'s engine of `kind` for the spec (in its target precision, on
/// seeded random weights, as the decode variants), with `fusec serve`'s scheduler
/// settings but --concurrency sequences running, and runs the serving benchmark on it.
fn run_serving(
    spec: &ModelSpec,
    opts: &ServingOptions,
    kv_blocks: u64,
    kind: EngineKind,
) -> Result<ServingResult, Failure> {
    let precision = spec.target.precision;
    let rules = pipeline::rules(&[])?;
    let fp8 = Fp8Options {
        keep: pipeline::default_keep(precision),
        ..Fp8Options::default()
    };
    let built = serve::build_engine(
        spec,
        &serve::EngineSetup {
            kind,
            block_size: serve::DEFAULT_BLOCK_SIZE,
            kv_blocks,
            max_context: spec.model.max_seq_len,
            no_fuse: false,
            rules: &rules,
            fp8: &fp8,
            weights: None,
            seed: opts.seed,
        },
    )?;
    let defaults = SchedulerConfig::default();
    let config = SchedulerConfig {
        max_running: opts.concurrency,
        token_budget: defaults.token_budget.max(opts.concurrency),
        ..defaults
    };
    let scheduler = Scheduler::new(metered(built.engine), config)
        .map_err(|e| Failure::Input(anyhow!("{e} (--concurrency)")))?;
    let engine = if built.paged { "paged" } else { "sessions" };
    serving::run(scheduler, opts, engine, precision.name()).map_err(|e| match e {
        ServingError::Submit(e) => Failure::Input(anyhow!("--serve: {e}")),
        e => Failure::Internal(e.into()),
    })
}
