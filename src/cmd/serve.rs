//! `fusec serve`: an OpenAI-compatible HTTP server over the CPU executor, with
//! continuous batching (see `fusec_serve`).
//!
//! It builds the decode graph as `fusec run` does (fused by default, in the precision
//! asked), binds the weights once, and serves every request from sessions that share
//! them. The tokenizer is the checkpoint's (a GGUF file's own, or `tokenizer.json`
//! beside the model), or `--tokenizer`; without one, prompts must be token ids.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use fusec::exec::Executor;
use fusec::exec::{PagedConfig, PagedSession};
use fusec::pipeline::{self, PipelineError};
use fusec::text::{Error as TextError, Tokenizer};
use fusec::weights::{Error as WeightError, Weights};
use fusec_ir::Graph;
use fusec_model::frontend::{ModelSpec, Precision};
use fusec_rewrite::precision::Fp8Options;
use fusec_serve::{
    Engine, Pace, Paced, PagedEngine, SchedulerConfig, Server, ServerConfig, SessionEngine,
    SessionEngineConfig,
};

use crate::cmd::exec_failure;
use crate::cmd::options::{FusionArgs, PrecisionArgs};
use crate::Failure;

/// Serve a model over HTTP: OpenAI-compatible /v1/completions and
/// /v1/chat/completions (streamed or whole), /v1/models, /health and /metrics.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model.toml, a Hugging Face config.json, a model directory holding one, or a
    /// GGUF file.
    pub model: PathBuf,
    /// Weights: a .safetensors file, a shard index, a directory holding either, or a
    /// .gguf file [default: the model's weights; seeded random weights if it has none].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// The tokenizer: a tokenizer.json's directory or a file beside it, or a .gguf file
    /// [default: the model's; without one, prompts must be token ids].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The model name clients send as `model` [default: the model's name].
    #[arg(long)]
    pub name: Option<String>,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Sequences decoded at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_running: u64,
    /// Tokens fed per step, prompt chunks and decodes together (at least
    /// --max-running).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub token_budget: u64,
    /// The most prompt tokens one sequence is fed per step.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub prefill_chunk: u64,
    /// Positions per KV block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub block_size: u64,
    /// KV blocks in all: the positions all sequences may hold together, in blocks
    /// [default: --max-running full contexts, at most 16384 positions].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    pub kv_blocks: Option<u64>,
    /// The most positions one sequence may hold [default: the model's max_seq_len].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    pub max_context: Option<u64>,
    /// The engine: `paged` runs the running sequences as one batch per step over a
    /// paged KV cache (the weights read once for all of them); `sessions` gives each
    /// sequence its own batch-1 session; `auto` takes `paged` where the family has a
    /// paged step (not Gemma 2's soft-capped attention) and says so otherwise.
    #[arg(long, value_enum, default_value_t = EngineKind::Auto)]
    pub engine: EngineKind,
    /// Seed of the random weights used when there are no weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub fusion: FusionArgs,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// The most memory the weights and KV cache may take (e.g. 8G) [default: what the
    /// machine can give].
    #[arg(long, value_name = "BYTES", value_parser = fusec::memory::parse_bytes)]
    pub max_memory: Option<u64>,
    /// Wait this long before every model step: a slower model's pace, for tests of
    /// what happens while requests run (scripts/serve-test.sh).
    #[arg(long, hide = true, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub step_delay_ms: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Auto,
    Paged,
    Sessions,
}

/// The default KV capacity, in positions, when --kv-blocks is not given.
const DEFAULT_KV_POSITIONS: u64 = 16384;

/// Positions per KV block when --block-size is not given.
pub const DEFAULT_BLOCK_SIZE: u64 = 16;

fn tokenizer(args: &Args) -> Result<Option<Tokenizer>, Failure> {
    if let Some(path) = &args.tokenizer {
        return Tokenizer::for_model(path)
            .map(Some)
            .map_err(|e| Failure::Input(e.into()));
    }
    let path = match (&args.weights, args.model.extension()) {
        (Some(w), _) if w.extension().is_some_and(|e| e == "gguf") => w.clone(),
        _ => args.model.clone(),
    };
    match Tokenizer::for_model(&path) {
        Ok(t) => Ok(Some(t)),
        Err(TextError::NoTokenizer { .. }) => {
            crate::complain(&format!(
                "warning: no tokenizer for {}: prompts must be token ids (--tokenizer gives one)\n",
                path.display()
            ));
            Ok(None)
        }
        Err(e) => Err(Failure::Input(e.into())),
    }
}

pub fn run(args: Args) -> Result<(), Failure> {
    let host: IpAddr = args
        .host
        .parse()
        .map_err(|_| Failure::Input(anyhow!("--host `{}` is not an IP address", args.host)))?;
    let mut spec = pipeline::load(&args.model, None, None)?;
    args.precision.apply(&mut spec)?;
    let precision = spec.target.precision;
    let max_context = args
        .max_context
        .unwrap_or(spec.model.max_seq_len)
        .min(spec.model.max_seq_len);
    let block_size = args.block_size;
    let kv_blocks = args
        .kv_blocks
        .unwrap_or_else(|| default_kv_blocks(args.max_running, max_context, block_size));
    let scheduler = SchedulerConfig {
        max_running: args.max_running as usize,
        token_budget: args.token_budget as usize,
        prefill_chunk: args.prefill_chunk as usize,
    };
    scheduler
        .validate()
        .map_err(|e| Failure::Input(anyhow!("{e} (--token-budget, --max-running)")))?;
    check_memory(&spec, kv_blocks, block_size, args.max_memory)?;
    let tokenizer = tokenizer(&args)?;
    if let Some(t) = &tokenizer {
        if t.vocab_size() as u64 > spec.model.vocab_size {
            crate::complain(&format!(
                "warning: the tokenizer has {} ids, the model {}: prompts with ids beyond the model's are refused\n",
                t.vocab_size(),
                spec.model.vocab_size
            ));
        }
    }

    let rules = pipeline::rules(&args.fusion.rules)?;
    let fp8 = args.precision.fp8(None, None, precision)?;
    let built = build_engine(
        &spec,
        &EngineSetup {
            kind: args.engine,
            block_size,
            kv_blocks,
            max_context,
            no_fuse: args.fusion.no_fuse,
            rules: &rules,
            fp8: &fp8,
            weights: args.weights.as_deref().or(spec.weights.as_deref()),
            seed: args.seed,
        },
    )?;
    let (engine, is_paged) = (built.engine, built.paged);
    let name = args.name.clone().unwrap_or_else(|| spec.model.name.clone());
    let config = ServerConfig {
        model: name.clone(),
        scheduler,
        http_threads: 2,
    };
    let addr = SocketAddr::new(host, args.port);
    let server = match args.step_delay_ms {
        0 => Server::start(addr, engine, tokenizer, config),
        ms => {
            let paced = Paced::new(engine, Pace(Duration::from_millis(ms)));
            Server::start(addr, paced, tokenizer, config)
        }
    }
    .map_err(|e| Failure::Input(e.into()))?;
    crate::say(&format!(
        "fusec serve: {name} on http://{} ({} in {}; {} engine, {kv_blocks} KV blocks of {block_size} positions, up to {} sequences, context {max_context})\n",
        server.local_addr(),
        spec.model.name,
        precision.name(),
        if is_paged { "paged" } else { "sessions" },
        args.max_running,
    ));
    server
        .run_until_signal()
        .map_err(|e| Failure::Internal(anyhow!("waiting for a signal: {e}")))?;
    crate::complain("fusec serve: stopping\n");
    Ok(())
}

/// The KV blocks of `block_size` positions that `max_running` full contexts of
/// `max_context` positions take, at most [`DEFAULT_KV_POSITIONS`] positions, and at
/// least one full context: the default of `--kv-blocks`.
pub fn default_kv_blocks(max_running: u64, max_context: u64, block_size: u64) -> u64 {
    let positions = (max_running.saturating_mul(max_context)).min(DEFAULT_KV_POSITIONS);
    positions
        .div_ceil(block_size)
        .max(max_context.div_ceil(block_size))
}

/// Refuses, as bad input, an engine whose weights and `kv_blocks` blocks of
/// `block_size` positions would not fit in the memory the machine can give (or
/// `max_memory`).
pub fn check_memory(
    spec: &ModelSpec,
    kv_blocks: u64,
    block_size: u64,
    max_memory: Option<u64>,
) -> Result<(), Failure> {
    fusec::memory::check(
        fusec::memory::least_bytes(
            spec,
            spec.target.precision,
            1,
            kv_blocks.saturating_mul(block_size),
        ),
        &format!("serving {} with {kv_blocks} KV blocks", spec.model.name),
        max_memory,
    )
    .map_err(|m| Failure::Input(anyhow!(m)))
}

/// What engine to build over a spec (in its target precision): `fusec serve`'s
/// settings, shared with `fusec bench --serve`.
#[derive(Debug)]
pub struct EngineSetup<'a> {
    pub kind: EngineKind,
    pub block_size: u64,
    pub kv_blocks: u64,
    pub max_context: u64,
    /// Serve the eager graph.
    pub no_fuse: bool,
    pub rules: &'a fusec_rewrite::RuleSet,
    pub fp8: &'a Fp8Options,
    /// Weights to load; `None`: seeded random weights.
    pub weights: Option<&'a Path>,
    pub seed: u64,
}

/// A built engine, and whether it is the paged one.
pub struct BuiltEngine {
    pub engine: Box<dyn Engine + Send>,
    pub paged: bool,
}

impl std::fmt::Debug for BuiltEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltEngine")
            .field("paged", &self.paged)
            .finish_non_exhaustive()
    }
}

/// Builds the engine `setup` asks for: the paged step over a [`PagedSession`] where
/// the kind allows it and the family has one (`auto` says so when it has not, and
/// falls back), else a [`SessionEngine`] over the decode graph; the weights bound once.
pub fn build_engine(spec: &ModelSpec, setup: &EngineSetup) -> Result<BuiltEngine, Failure> {
    let precision = spec.target.precision;
    let (block_size, kv_blocks, max_context) =
        (setup.block_size, setup.kv_blocks, setup.max_context);
    let (rules, fp8) = (setup.rules, setup.fp8);
    let lowered = precision == Precision::Fp8 || precision.is_int();
    if setup.no_fuse && lowered {
        return Err(Failure::Input(anyhow!(
            "--no-fuse cannot serve {}: the weight lowering applies to the fused graph",
            precision.name()
        )));
    }
    let paged = match setup.kind {
        EngineKind::Sessions => None,
        kind => match paged_graph(spec, precision, block_size, setup.no_fuse, rules, fp8) {
            Ok(graph) => Some(graph),
            // Only a family without a paged step falls back; any other failure is one.
            Err(PipelineError::NoPagedStep(reason)) if kind == EngineKind::Auto => {
                crate::complain(&format!(
                    "note: {}: no paged step ({reason}); each sequence gets its own session\n",
                    spec.model.name
                ));
                None
            }
            Err(e @ PipelineError::NoPagedStep(_)) => {
                return Err(Failure::Input(anyhow!("--engine paged: {e}")))
            }
            Err(e) => return Err(e.into()),
        },
    };
    let graph = match paged {
        Some(graph) => graph,
        None if setup.no_fuse => pipeline::eager(&pipeline::in_precision(spec, precision))?,
        None => {
            let (graph, report) = pipeline::fused_in(spec, precision, rules, fp8)?;
            crate::cmd::options::warn_fusion(&report);
            graph
        }
    };
    let is_paged = graph
        .inputs()
        .into_iter()
        .any(|(_, name, _)| name.starts_with("block_table"));
    let weights = match setup.weights {
        Some(path) => Weights::load(path, &graph),
        None => Weights::random(&graph, setup.seed),
    }
    .map_err(|e| match e {
        WeightError::Uncalibrated { .. } => Failure::Input(anyhow!(
            "{e}: serving FP8 needs weights saved with their KV-cache scales (fusec run --precision fp8 --save-weights DIR, then --weights DIR)"
        )),
        other => exec_failure(other),
    })?;
    let exec = Executor::new(graph, &weights).map_err(exec_failure)?;
    // The executor holds what it reads: the loaded values are not needed again.
    drop(weights);
    let engine: Box<dyn Engine + Send> = if is_paged {
        let config = PagedConfig {
            pool_blocks: kv_blocks as usize,
            max_len: max_context as usize,
        };
        let session = PagedSession::new(exec, config).map_err(|e| Failure::Input(e.into()))?;
        Box::new(PagedEngine::new(session))
    } else {
        Box::new(
            SessionEngine::new(
                exec,
                SessionEngineConfig {
                    block_size: block_size as usize,
                    total_blocks: kv_blocks as usize,
                    max_context: max_context as usize,
                },
            )
            .map_err(|e| Failure::Internal(e.into()))?,
        )
    };
    Ok(BuiltEngine {
        engine,
        paged: is_paged,
    })
}

/// The paged step of the spec (`StepDims::paged`), fused and lowered like the decode
/// graph unless `no_fuse`.
fn paged_graph(
    spec: &ModelSpec,
    precision: Precision,
    block_size: u64,
    no_fuse: bool,
    rules: &fusec_rewrite::RuleSet,
    fp8: &Fp8Options,
) -> Result<Graph, PipelineError> {
    if no_fuse {
        return pipeline::eager_paged(&pipeline::in_precision(spec, precision), block_size);
    }
    let (graph, report) = pipeline::fused_paged_in(spec, precision, block_size, rules, fp8)?;
    crate::cmd::options::warn_fusion(&report);
    Ok(graph)
}
