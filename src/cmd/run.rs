//! `fusec run`: greedy decoding of a prompt on the CPU executor, with the launches and
//! bytes it measures.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use fusec::exec::{Executor, Generation, Session, Weights};
use fusec::pipeline;
use serde::Serialize;

use crate::Failure;

/// Decode greedily from a prompt on the CPU and report tokens/s (and optionally logits).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model.toml, a Hugging Face config.json, or a model directory holding one.
    pub model: PathBuf,
    /// Safetensors weights: a file, a shard index, or a directory holding either
    /// [default: the model's weights; seeded random weights if it has none].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Prompt token ids, comma-separated, e.g. 1,17,42,99,7.
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        allow_negative_numbers = true
    )]
    pub prompt: Vec<i64>,
    /// Tokens to generate (greedy, no end-of-sequence stop).
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Write the prompt, generated ids, every step's logits and the stats as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Print launches, bytes, time and GB/s per op kind.
    #[arg(long)]
    pub profile: bool,
    /// Seed of the random weights used when there are no weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The `--json` file: the fields of the reference schema (`llm-reference/1`) that a
/// run produces, plus the measured stats.
#[derive(Serialize, Debug)]
struct Report<'a> {
    schema: &'static str,
    model: &'a str,
    weights: String,
    prompt: &'a [i32],
    new_tokens: usize,
    generated: &'a [i32],
    /// One full row per generated token: row 0 is the output at the last prompt
    /// position, row i the output of feeding generated token i - 1.
    logits: &'a [Vec<f32>],
    stats: Stats,
}

#[derive(Serialize, Debug)]
struct Stats {
    /// Graph runs: every prompt token and every generated token but the last.
    steps: u64,
    launches_per_step: u64,
    /// Bytes read and written per step, averaged over the steps (the KV cache grows).
    bytes_per_step: u64,
    /// Tokens processed per second over all steps.
    tokens_per_s: f64,
}

fn exec_failure(e: fusec::exec::Error) -> Failure {
    if e.is_input_error() {
        Failure::Input(e.into())
    } else {
        Failure::Internal(e.into())
    }
}

pub fn run(args: Args) -> Result<(), Failure> {
    let spec = pipeline::load(&args.model, None, None)?;
    let graph = pipeline::eager(&spec)?;
    let model = &spec.model;
    if args.tokens == 0 {
        return Err(Failure::Input(anyhow!("--tokens must be at least 1")));
    }
    let prompt = args
        .prompt
        .iter()
        .map(|&id| {
            i32::try_from(id)
                .ok()
                .filter(|&v| v >= 0 && (v as u64) < model.vocab_size)
                .ok_or_else(|| {
                    anyhow!(
                        "prompt id {id} is out of range for the vocabulary of {} tokens",
                        model.vocab_size
                    )
                })
        })
        .collect::<Result<Vec<i32>, _>>()
        .map_err(Failure::Input)?;
    let positions = (prompt.len() + args.tokens - 1) as u64;
    if positions > model.max_seq_len {
        return Err(Failure::Input(anyhow!(
            "{} prompt tokens and {} new tokens need {positions} positions, beyond max_seq_len {}",
            prompt.len(),
            args.tokens,
            model.max_seq_len
        )));
    }

    let (weights, source) = match args.weights.as_ref().or(spec.weights.as_ref()) {
        Some(path) => (
            Weights::load(path, &graph).map_err(exec_failure)?,
            path.display().to_string(),
        ),
        None => (
            Weights::random(&graph, args.seed).map_err(exec_failure)?,
            format!("random (seed {})", args.seed),
        ),
    };
    let exec = Executor::new(graph, &weights).map_err(exec_failure)?;
    let mut session = Session::new(exec, 1).map_err(exec_failure)?;
    let gen = session
        .generate(std::slice::from_ref(&prompt), args.tokens)
        .map_err(exec_failure)?;

    print_summary(&model.name, &source, &prompt, &gen);
    if args.profile {
        print!("{}", session.profile().render());
    }
    if let Some(path) = &args.json {
        let report = Report {
            schema: "llm-reference/1",
            model: &model.name,
            weights: source,
            prompt: &prompt,
            new_tokens: args.tokens,
            generated: &gen.generated[0],
            logits: &gen.logits[0],
            stats: Stats {
                steps: gen.steps,
                launches_per_step: gen.launches_per_step,
                bytes_per_step: gen.bytes_per_step().round() as u64,
                tokens_per_s: gen.tokens_per_s(),
            },
        };
        let json = serde_json::to_string(&report).map_err(|e| Failure::Internal(e.into()))?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
            .map_err(Failure::Input)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn ids(v: &[i32]) -> String {
    v.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

fn print_summary(model: &str, weights: &str, prompt: &[i32], gen: &Generation) {
    println!("model     {model}, weights {weights}");
    println!("prompt    {}", ids(prompt));
    println!("generated {}", ids(&gen.generated[0]));
    println!(
        "{} steps, {} launches/step, {:.3} MB/step, {:.1} tokens/s",
        gen.steps,
        gen.launches_per_step,
        gen.bytes_per_step() / 1e6,
        gen.tokens_per_s()
    );
}
