//! `fusec accuracy`: what each precision costs against the f32 run, over a set of
//! prompts. For every prompt the fused f32 graph decodes greedily; every other
//! precision is then teacher-forced on those tokens (`Session::generate_forced`), so
//! each step compares logits computed from the same inputs
//! (`fusec_exec::accuracy`). Per precision it reports top-1 agreement over all steps,
//! the mean and largest KL divergence and the largest relative L2 error, and the mean
//! KL per prompt. The default prompts are `examples/accuracy-prompts.txt`, built in.
//!
//! An FP8 graph's KV-cache scales are calibrated on each prompt, as `fusec run` does,
//! so each prompt's figure is what `fusec run --precision fp8 --compare` reports.

use std::path::PathBuf;

use anyhow::anyhow;
use fusec::exec::accuracy::{self, Accuracy};
use fusec::exec::ndarray::{Array2, Axis};
use fusec::exec::Executor;
use fusec::pipeline;
use fusec::text::Tokenizer;
use fusec::weights::Error as WeightError;
use fusec_model::frontend::Precision;
use serde::Serialize;

use fusec::output::{Outputs, Replace};

use crate::cmd::exec_failure;
use crate::cmd::options::{FusionArgs, PrecisionArgs};
use crate::cmd::runner::{fp8_from, load_reference, run_session, weights_for, Builder, Source};
use crate::Failure;

/// The built-in prompts (`examples/accuracy-prompts.txt`).
const DEFAULT_PROMPTS: &str = include_str!("../../examples/accuracy-prompts.txt");

/// Measure the accuracy of each precision against f32 over a set of prompts, teacher-forced.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model.toml, a Hugging Face config.json, a model directory holding one, or a
    /// GGUF file.
    pub model: PathBuf,
    /// Weights: a .safetensors file, a shard index, a directory holding either, or a
    /// .gguf file [default: the model's weights; seeded random weights if it has none].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Prompts as text, one per line (`#` starts a comment), tokenized with the
    /// checkpoint's tokenizer [default: examples/accuracy-prompts.txt, built in].
    #[arg(long, value_name = "FILE", conflicts_with = "prompt_ids")]
    pub prompts: Option<PathBuf>,
    /// A prompt as token ids, comma-separated (repeatable), for a model without a
    /// tokenizer.
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Vec<String>,
    /// The precisions to measure, comma-separated: f16, bf16, fp8, int8, int4, q4_1,
    /// q4_k, gguf (f32 is the reference).
    #[arg(long, value_delimiter = ',', default_value = "bf16,fp8,int8,int4")]
    pub precisions: Vec<String>,
    /// Tokens per prompt: the f32 run's greedy tokens, fed to every precision.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    pub force: bool,
    /// Seed of the random weights used when there are no weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The most memory the weights and KV cache may take (e.g. 8G) [default: what the
    /// machine can give].
    #[arg(long, value_name = "BYTES", value_parser = fusec::memory::parse_bytes)]
    pub max_memory: Option<u64>,
    #[command(flatten)]
    pub fusion: FusionArgs,
    /// `--keep`, `--quantize` and `--weight-scales` apply to every lowered precision
    /// (`--precision` is not taken: see --precisions).
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

/// One precision over every prompt.
#[derive(Serialize, Debug)]
struct PrecisionFigures {
    precision: &'static str,
    /// Why the precision was not measured (the model cannot take it: a width that is
    /// no multiple of a block, say); the figures are then empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
    /// Steps compared: prompts x tokens.
    steps: usize,
    top1_agreement: usize,
    mean_kl: f64,
    max_kl: f64,
    max_rel_l2: f64,
    /// Each prompt's own comparison, in prompt order.
    prompts: Vec<Accuracy>,
}

/// The `--json` file.
#[derive(Serialize, Debug)]
struct Report<'a> {
    schema: &'static str,
    model: &'a str,
    weights: String,
    reference: &'static str,
    teacher_forced: bool,
    tokens: usize,
    prompts: &'a [Vec<i32>],
    precisions: &'a [PrecisionFigures],
}

pub fn run(args: Args) -> Result<(), Failure> {
    let input = |m: String| Failure::Input(anyhow!(m));
    if args.precision.precision.is_some() {
        return Err(input(
            "fusec accuracy measures the precisions of --precisions, not --precision".into(),
        ));
    }
    let precisions = args
        .precisions
        .iter()
        .map(|p| match Precision::parse(p) {
            Some(Precision::F32) => Err(input(
                "f32 is the reference: leave it out of --precisions".into(),
            )),
            Some(p) => Ok(p),
            None => Err(input(format!(
                "unknown precision `{p}` in --precisions (expected one of {} but f32)",
                Precision::names()
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if args.tokens == 0 {
        return Err(input("--tokens must be at least 1".into()));
    }
    let spec = pipeline::load(&args.model, None, None)?;
    let model = &spec.model;
    let source = match args.weights.as_ref().or(spec.weights.as_ref()) {
        Some(path) => Source::File(path.clone()),
        None => Source::Random(args.seed),
    };
    let prompts = prompts(&args, &source)?;
    for (i, p) in prompts.iter().enumerate() {
        if let Some(&id) = p
            .iter()
            .find(|&&id| id < 0 || id as u64 >= model.vocab_size)
        {
            return Err(input(format!(
                "prompt {}: id {id} is out of range for the vocabulary of {} tokens",
                i + 1,
                model.vocab_size
            )));
        }
        if p.len().saturating_add(args.tokens) as u64 > model.max_seq_len {
            return Err(input(format!(
                "prompt {}: {} tokens and {} new ones are beyond max_seq_len {}",
                i + 1,
                p.len(),
                args.tokens,
                model.max_seq_len
            )));
        }
    }
    // The f32 reference is the largest run: checked before anything is allocated.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let longest = longest.saturating_add(args.tokens);
    fusec::memory::check(
        fusec::memory::least_bytes(&spec, Precision::F32, 1, longest as u64),
        &format!("the f32 reference of {}", model.name),
        args.max_memory,
    )
    .map_err(input)?;
    let mut outputs = Outputs::new(args.force);
    outputs.reads(&args.model);
    if let Source::File(p) = &source {
        outputs.reads(p);
    }
    if let Some(p) = &args.prompts {
        outputs.reads(p);
    }
    for r in &args.fusion.rules {
        outputs.reads(r);
    }
    if let Some(path) = &args.json {
        outputs.check(path, Replace::IfForced)?;
    }
    let rules = pipeline::rules(&args.fusion.rules)?;
    let builder = |precision| -> Result<Builder<'_>, Failure> {
        Ok(Builder {
            spec: &spec,
            rules: rules.clone(),
            fp8: fp8_from(&args.precision, &source, precision)?,
            fuse: !args.fusion.no_fuse,
        })
    };

    // The reference: the f32 graph's greedy run of every prompt.
    let reference = {
        let b = builder(Precision::F32)?;
        let graph = b.graph(Precision::F32)?;
        let weights = load_reference(&source, &graph)?;
        let exec = Executor::new(graph, &weights).map_err(exec_failure)?;
        drop(weights);
        prompts
            .iter()
            .map(|p| {
                let (_, gen) = run_session(exec.fork(), p, args.tokens, None, false)?;
                let logits = gen.logits.index_axis(Axis(0), 0).to_owned();
                Ok((gen.generated[0][..args.tokens - 1].to_vec(), logits))
            })
            .collect::<Result<Vec<(Vec<i32>, Array2<f32>)>, Failure>>()?
    };

    let mut figures = Vec::new();
    for &precision in &precisions {
        let measured = (|| -> Result<Vec<Accuracy>, Failure> {
            let b = builder(precision)?;
            let graph = b.graph(precision)?;
            // Weights that need no calibration are loaded once for every prompt.
            let shared = match source.load(&graph) {
                Ok(w) => Some(Executor::new(graph.clone(), &w).map_err(exec_failure)?),
                Err(WeightError::Uncalibrated { .. }) => None,
                Err(e) => return Err(exec_failure(e)),
            };
            let mut per_prompt = Vec::new();
            for (prompt, (forced, reference_logits)) in prompts.iter().zip(&reference) {
                let exec = match &shared {
                    Some(exec) => exec.fork(),
                    None => {
                        let (w, _) = weights_for(&graph, precision, &source, &b, prompt)?;
                        Executor::new(graph.clone(), &w).map_err(exec_failure)?
                    }
                };
                let (_, gen) = run_session(exec, prompt, args.tokens, Some(forced), false)?;
                per_prompt.push(accuracy::compare(
                    reference_logits.view(),
                    gen.logits.index_axis(Axis(0), 0),
                ));
            }
            Ok(per_prompt)
        })();
        figures.push(match measured {
            Ok(per_prompt) => totals(precision, per_prompt),
            // The model cannot take this precision: say why, and go on with the others.
            Err(Failure::Input(e)) => {
                crate::complain(&format!("warning: {} skipped: {e:#}\n", precision.name()));
                PrecisionFigures {
                    skipped: Some(format!("{e:#}")),
                    ..totals(precision, Vec::new())
                }
            }
            Err(e) => return Err(e),
        });
    }
    if figures.iter().all(|f| f.skipped.is_some()) {
        return Err(input(
            "no precision of --precisions could be measured".into(),
        ));
    }

    crate::say(&render(
        &model.name,
        &source.describe(),
        &prompts,
        args.tokens,
        &figures,
    ));
    if let Some(path) = &args.json {
        let report = Report {
            schema: "fusec-accuracy/1",
            model: &model.name,
            weights: source.describe(),
            reference: "f32",
            teacher_forced: true,
            tokens: args.tokens,
            prompts: &prompts,
            precisions: &figures,
        };
        let json = serde_json::to_string(&report).map_err(|e| Failure::Internal(e.into()))?;
        outputs.write(path, (json + "\n").as_bytes(), Replace::IfForced)?;
        crate::say(&format!("wrote {}\n", path.display()));
    }
    Ok(())
}

/// The prompts as token ids: --prompt-ids, else the lines of --prompts (or the
/// built-in ones) through the checkpoint's tokenizer.
fn prompts(args: &Args, source: &Source) -> Result<Vec<Vec<i32>>, Failure> {
    let input = |m: String| Failure::Input(anyhow!(m));
    if !args.prompt_ids.is_empty() {
        return args
            .prompt_ids
            .iter()
            .enumerate()
            .map(|(i, list)| {
                let ids = list
                    .split(',')
                    .map(|t| t.trim().parse::<i32>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| input(format!("--prompt-ids {} (`{list}`): {e}", i + 1)))?;
                match ids.is_empty() {
                    true => Err(input(format!("--prompt-ids {} is empty", i + 1))),
                    false => Ok(ids),
                }
            })
            .collect();
    }
    let (name, text) = match &args.prompts {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path)
                .map_err(|e| input(format!("cannot read {}: {e}", path.display())))?,
        ),
        None => (
            "the built-in prompts".to_string(),
            DEFAULT_PROMPTS.to_string(),
        ),
    };
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if lines.is_empty() {
        return Err(input(format!(
            "{name}: no prompts (one per line; `#` starts a comment)"
        )));
    }
    let tokenizer_path = match (&args.weights, source) {
        (Some(w), _) if w.extension().is_some_and(|e| e == "gguf") => w.clone(),
        _ => args.model.clone(),
    };
    let tokenizer = Tokenizer::for_model(&tokenizer_path).map_err(|e| {
        input(format!(
            "{e}: text prompts need the checkpoint's tokenizer (or give --prompt-ids)"
        ))
    })?;
    lines
        .iter()
        .map(|line| {
            let ids = tokenizer
                .encode(line, true)
                .map_err(|e| input(e.to_string()))?;
            match ids.is_empty() {
                true => Err(input(format!("{name}: `{line}` encodes to no tokens"))),
                false => Ok(ids.into_iter().map(|id| id as i32).collect()),
            }
        })
        .collect()
}

/// A precision's totals over its prompts.
fn totals(precision: Precision, prompts: Vec<Accuracy>) -> PrecisionFigures {
    let steps: usize = prompts.iter().map(|a| a.steps.len()).sum();
    let kl: f64 = prompts.iter().flat_map(|a| &a.steps).map(|s| s.kl).sum();
    PrecisionFigures {
        precision: precision.name(),
        skipped: None,
        steps,
        top1_agreement: prompts.iter().map(|a| a.top1_agreement).sum(),
        mean_kl: kl / steps.max(1) as f64,
        max_kl: prompts.iter().fold(0.0, |m, a| m.max(a.max_kl)),
        max_rel_l2: prompts.iter().fold(0.0, |m, a| m.max(a.max_rel_l2)),
        prompts,
    }
}

/// The table `fusec accuracy` prints.
fn render(
    model: &str,
    weights: &str,
    prompts: &[Vec<i32>],
    tokens: usize,
    figures: &[PrecisionFigures],
) -> String {
    let mut out = format!(
        "accuracy of {model} ({weights}) against f32: {} prompts x {tokens} tokens, teacher-forced on the f32 run's tokens\n",
        prompts.len()
    );
    out += &format!(
        "{:<10} {:>16} {:>10} {:>10} {:>11}  mean KL per prompt\n",
        "precision", "top-1 agreement", "mean KL", "max KL", "max rel L2"
    );
    for f in figures {
        if let Some(why) = &f.skipped {
            out += &format!("{:<10} skipped: {why}\n", f.precision);
            continue;
        }
        let per: Vec<String> = f
            .prompts
            .iter()
            .map(|a| format!("{:.4}", a.mean_kl))
            .collect();
        out += &format!(
            "{:<10} {:>16} {:>10.4} {:>10.4} {:>11.3e}  {}\n",
            f.precision,
            format!("{}/{}", f.top1_agreement, f.steps),
            f.mean_kl,
            f.max_kl,
            f.max_rel_l2,
            per.join(" ")
        );
    }
    out
}
