//! `fusec run`: greedy decoding of a prompt on the CPU executor, with the launches and
//! bytes it measures.
//!
//! It runs the fused graph by default (`--no-fuse`: the eager one), in the precision
//! `--precision` or the model's `[target] precision` asks for. An FP8 run makes its
//! quantized weights from the checkpoint when it loads them and calibrates the KV-cache
//! scales on the prompt (see `fusec_exec::calibrate`), unless the weights are FP8 weights
//! saved by `--save-weights`, which hold their scales. `--compare` also runs the f32
//! graph on the same weights and reports the accuracy of the run against it,
//! teacher-forced on the f32 run's tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use fusec::exec::accuracy::{self, Accuracy};
use fusec::exec::calibrate::KV_SCALE_MARGIN;
use fusec::exec::ndarray::Axis;
use fusec::exec::{Error as ExecError, Executor, Generation, Prefill, PrefillStats, Session};
use fusec::pipeline;
use fusec::text::{SamplingOptions, Tokenizer};
use fusec::weights::{self, KvScales, Weights};
use fusec_ir::Graph;
use fusec_model::frontend::{ModelSpec, Precision};
use serde::Serialize;

use fusec::output::{Outputs, Replace};

use crate::cmd::exec_failure;
use crate::cmd::generate;
use crate::cmd::options::{FusionArgs, PrecisionArgs};
use crate::cmd::runner::{fp8_from, load_reference, run_session, weights_for, Builder, Source};
use crate::Failure;

/// Decode greedily from a prompt on the CPU and report tokens/s (and optionally logits).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model.toml, a Hugging Face config.json, a model directory holding one, or a
    /// GGUF file.
    pub model: PathBuf,
    /// Weights: a .safetensors file, a shard index, a directory holding either, or a
    /// .gguf file [default: the model's weights; seeded random weights if it has none].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// The prompt as text, tokenized with the checkpoint's tokenizer; the answer is
    /// streamed as text and stops at an end-of-sequence token.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// The prompt as token ids, comma-separated, e.g. 1,17,42,99,7: greedy, exactly
    /// --tokens ids out, no end-of-sequence stop (for references and benchmarks).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub prompt_ids: Vec<i64>,
    /// With --prompt: render the prompt as a user message with the checkpoint's chat
    /// template (and open the assistant's turn).
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// With --prompt: a system message before the user's (--chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// With --prompt: keep generating past end-of-sequence tokens.
    #[arg(long, requires = "prompt")]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Tokens to generate (at most, with --prompt).
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Write the prompt, generated ids, every step's logits and the stats as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Print launches, bytes, time and GB/s per op kind.
    #[arg(long)]
    pub profile: bool,
    /// Seed of the sampler (with --temperature) and of the random weights used when
    /// there are no weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub fusion: FusionArgs,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Also run the f32 graph on the same weights, feed its tokens to this run
    /// (teacher forcing), and report per step the relative L2 error of the logits,
    /// top-1 agreement and KL(f32 || this run).
    #[arg(long)]
    pub compare: bool,
    /// Write the weights this run used (FP8 values as F8_E4M3 with their scales, KV-cache
    /// scales included) to DIR/model.safetensors, to load back with --weights DIR.
    #[arg(long, value_name = "DIR")]
    pub save_weights: Option<PathBuf>,
    /// Replace existing --json and --save-weights files.
    #[arg(long)]
    pub force: bool,
    /// Check the result of every op for infinities and NaNs, and stop at the first
    /// (the logits are always checked; a non-finite logit reruns the decode with this
    /// check to name the op).
    #[arg(long)]
    pub check_finite: bool,
    /// Prefill the prompt through a prefill graph in chunks of this many tokens (the
    /// last chunk shorter), then decode; 1 feeds the prompt token by token through
    /// the decode graph. FP8 runs and --compare prefill token by token.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub prefill_chunk: u64,
    /// The most memory the weights and KV cache may take (e.g. 8G) [default: what the
    /// machine can give].
    #[arg(long, value_name = "BYTES", value_parser = fusec::memory::parse_bytes)]
    pub max_memory: Option<u64>,
}

/// Sampling instead of greedy decoding, with transformers' logits processors (see
/// `fusec_text::sampling`). Only with --prompt.
#[derive(clap::Args, Debug)]
pub struct SamplingArgs {
    /// Sample at this temperature (greedy when absent).
    #[arg(long, requires = "prompt")]
    pub temperature: Option<f32>,
    /// With --temperature: keep the k most likely tokens.
    #[arg(long, requires = "temperature")]
    pub top_k: Option<usize>,
    /// With --temperature: keep the smallest set of tokens whose probability reaches p.
    #[arg(long, requires = "temperature")]
    pub top_p: Option<f32>,
    /// With --temperature: drop tokens less likely than min_p times the most likely.
    #[arg(long, requires = "temperature")]
    pub min_p: Option<f32>,
    /// Penalise the logits of tokens already in the sequence (1.0: none).
    #[arg(long, requires = "prompt")]
    pub repetition_penalty: Option<f32>,
}

/// The `--json` file: the fields of the reference schema (`llm-reference/1`) that a
/// run produces, plus the measured stats.
#[derive(Serialize, Debug)]
struct Report<'a> {
    schema: &'static str,
    model: &'a str,
    weights: String,
    /// `fused` or `eager`.
    graph: &'static str,
    precision: &'static str,
    prompt: &'a [i32],
    new_tokens: usize,
    generated: &'a [i32],
    /// One full row per generated token: row 0 is the output at the last prompt
    /// position, row i the output of feeding generated token i - 1.
    logits: &'a [Vec<f32>],
    stats: Stats,
    /// The calibrated KV-cache scales of an FP8 run, by weight name.
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_scales: Option<&'a KvScales>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy: Option<AccuracyReport<'a>>,
}

#[derive(Serialize, Debug)]
struct Stats {
    /// Graph runs: the prefill steps (one per prompt token with --prefill-chunk 1) and
    /// one per generated token but the last.
    steps: u64,
    launches_per_step: u64,
    /// Bytes read and written per step, averaged over the steps (the KV cache grows).
    bytes_per_step: u64,
    /// Tokens processed per second over all steps (prompt tokens and generated ones).
    tokens_per_s: f64,
    /// The prompt's part: chunk size, graph runs, time to first token, tokens/s.
    prefill: PrefillReport,
    /// Generated tokens per second over the decode steps after the prompt.
    decode_tokens_per_s: f64,
    /// The process's peak resident memory after the run (`VmHWM`), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_bytes: Option<u64>,
}

#[derive(Serialize, Debug)]
struct PrefillReport {
    /// Tokens per prefill step (1: token by token through the decode graph).
    chunk: u64,
    tokens: u64,
    steps: u64,
    time_to_first_token_ms: f64,
    tokens_per_s: f64,
}

/// `--compare` in the JSON: the run teacher-forced on the reference's tokens.
#[derive(Serialize, Debug)]
struct AccuracyReport<'a> {
    reference: &'static str,
    teacher_forced: bool,
    /// The tokens fed after the prompt: the reference run's greedy tokens.
    forced_tokens: &'a [i32],
    #[serde(flatten)]
    accuracy: &'a Accuracy,
}

/// [`run_session`] with the prompt prefilled through `prefills` (token by token when
/// there are none), and the prompt's statistics.
fn run_prefilled(
    mut exec: Executor,
    prefills: &mut [Prefill],
    prompt: &[i32],
    tokens: usize,
    check_finite: bool,
) -> Result<(Session, Generation, PrefillStats), Failure> {
    exec.set_check_finite(check_finite);
    // Prefill graphs read the caches as f32 values: compact FP8 storage only when
    // the prompt goes through the decode graph.
    let compact = prefills.is_empty();
    let mut session = Session::with_cache_storage(exec, 1, prompt.len() + tokens, compact)
        .map_err(exec_failure)?;
    let mut refs: Vec<&mut Prefill> = prefills.iter_mut().collect();
    let (gen, stats) = session
        .generate_prefilled(&mut refs, &[prompt.to_vec()], tokens)
        .map_err(exec_failure)?;
    Ok((session, gen, stats))
}

pub fn run(args: Args) -> Result<(), Failure> {
    let mut spec = pipeline::load(&args.model, None, None)?;
    args.precision.apply(&mut spec)?;
    let precision = spec.target.precision;
    let model = &spec.model;
    if args.tokens == 0 {
        return Err(Failure::Input(anyhow!("--tokens must be at least 1")));
    }
    let sampling = &args.sampling;
    if args.prompt.is_none()
        && (sampling.temperature.is_some() || sampling.repetition_penalty.is_some())
    {
        return Err(Failure::Input(anyhow!(
            "sampling options need --prompt: a --prompt-ids run decodes greedily"
        )));
    }
    // Text: the checkpoint's tokenizer (the GGUF file's own, or tokenizer.json beside
    // the config).
    let text = match &args.prompt {
        Some(text) => {
            let tokenizer_path = match (&args.weights, args.model.extension()) {
                (Some(w), _) if w.extension().is_some_and(|e| e == "gguf") => w.clone(),
                _ => args.model.clone(),
            };
            let tokenizer =
                Tokenizer::for_model(&tokenizer_path).map_err(|e| Failure::Input(e.into()))?;
            let (rendered, ids) =
                generate::prompt_ids(&tokenizer, text, args.chat, args.system.as_deref())?;
            Some((tokenizer, rendered, ids))
        }
        None => None,
    };
    let prompt_ids: Vec<i64> = match &text {
        Some((_, _, ids)) => ids.iter().map(|&id| i64::from(id)).collect(),
        None => args.prompt_ids.clone(),
    };
    if prompt_ids.is_empty() {
        return Err(Failure::Input(anyhow!("the prompt is empty")));
    }
    let prompt = prompt_ids
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
    let positions = u64::try_from(prompt.len() + 1)
        .ok()
        .zip(u64::try_from(args.tokens).ok())
        .and_then(|(p, t)| p.checked_add(t))
        .map_or(u64::MAX, |n| n - 2);
    if positions > model.max_seq_len {
        return Err(Failure::Input(anyhow!(
            "{} prompt tokens and {} new tokens need {positions} positions, beyond max_seq_len {}",
            prompt.len(),
            args.tokens,
            model.max_seq_len
        )));
    }
    fusec::memory::check(
        fusec::memory::least_bytes(&spec, precision, 1, positions),
        &format!("decoding {}", model.name),
        args.max_memory,
    )
    .map_err(|m| Failure::Input(anyhow!(m)))?;

    let source = match args.weights.as_ref().or(spec.weights.as_ref()) {
        Some(path) => Source::File(path.clone()),
        None => Source::Random(args.seed),
    };
    let builder = Builder {
        spec: &spec,
        rules: pipeline::rules(&args.fusion.rules)?,
        fp8: fp8_from(&args.precision, &source, precision)?,
        fuse: !args.fusion.no_fuse,
    };
    let mut outputs = Outputs::new(args.force);
    outputs.reads(&args.model);
    if let Source::File(p) = &source {
        outputs.reads(p);
    }
    for r in &args.fusion.rules {
        outputs.reads(r);
    }
    // Checked before the run, so that a refused output costs no decode.
    if let Some(path) = &args.json {
        outputs.check(path, Replace::IfForced)?;
    }
    if let Some(dir) = &args.save_weights {
        outputs.check(&dir.join("model.safetensors"), Replace::IfForced)?;
    }
    let graph = builder.graph(precision)?;
    let (weights, kv_scales) = weights_for(&graph, precision, &source, &builder, &prompt)?;
    if let Some(dir) = &args.save_weights {
        save(
            &outputs, dir, &graph, &weights, &spec, precision, &builder, &source, &prompt,
        )?;
    }
    let exec = Executor::new(graph.clone(), &weights).map_err(exec_failure)?;
    // --compare teacher-forces token by token, and so prefills that way too.
    let chunk = match args.compare || precision == Precision::Fp8 {
        true => 1,
        false => args.prefill_chunk,
    };
    let mut prefills =
        builder.prefills(precision, &weights, prompt.len(), chunk, args.check_finite)?;
    let chunk = if prefills.is_empty() { 1 } else { chunk };
    if let Some((tokenizer, rendered, ids)) = &text {
        drop(weights);
        let prompt = TextPrompt {
            tokenizer,
            rendered,
            ids,
        };
        return run_text(&outputs, &args, &spec, exec, &mut prefills, &prompt);
    }
    // The executor holds what it reads (packed, compact copies of the GEMV weights):
    // the loaded values are only needed again to compare, and freeing them here keeps
    // a large checkpoint from being resident twice while it decodes.
    let weights = args.compare.then_some(weights);
    let run = run_prefilled(exec, &mut prefills, &prompt, args.tokens, args.check_finite);
    drop(prefills);
    let (session, gen, prefill) = match run {
        Err(Failure::Input(e))
            if !args.check_finite
                && matches!(e.downcast_ref(), Some(ExecError::NonFiniteLogits { .. })) =>
        {
            return Err(first_non_finite(
                e,
                &graph,
                precision,
                &source,
                &builder,
                &prompt,
                args.tokens,
            ))
        }
        other => other?,
    };

    let peak_rss_bytes = fusec::bench::proc_status_bytes("VmHWM:");
    let rates = Rates::of(&gen, &prefill);
    print_summary(
        &model.name,
        &source.describe(),
        &args,
        precision,
        &prompt,
        &gen,
        rates.all,
    );
    crate::say(&format!(
        "prefill   {} tokens in {} step(s) of up to {chunk}: time to first token {:.1} ms, {:.1} tokens/s; decode {:.1} tokens/s{}\n",
        prefill.tokens,
        prefill.steps,
        rates.ttft_ms,
        prefill.tokens_per_s(),
        rates.decode,
        peak_rss_bytes
            .map(|b| format!("; peak memory {:.1} MiB", b as f64 / (1u64 << 20) as f64))
            .unwrap_or_default()
    ));
    if args.profile {
        crate::say(&session.profile().render());
    }
    let compared = if args.compare {
        let reference_graph = builder.graph(Precision::F32)?;
        let reference_weights = load_reference(&source, &reference_graph)?;
        let reference_exec =
            Executor::new(reference_graph, &reference_weights).map_err(exec_failure)?;
        drop(reference_weights);
        let (_, reference) = run_session(
            reference_exec,
            &prompt,
            args.tokens,
            None,
            args.check_finite,
        )?;
        let forced = reference.generated[0][..args.tokens - 1].to_vec();
        let weights = weights.ok_or_else(|| {
            Failure::Internal(anyhow!("the weights were freed before --compare ran"))
        })?;
        let exec = Executor::new(graph, &weights).map_err(exec_failure)?;
        drop(weights);
        let (_, lowered) =
            run_session(exec, &prompt, args.tokens, Some(&forced), args.check_finite)?;
        let acc = accuracy::compare(
            reference.logits.index_axis(Axis(0), 0),
            lowered.logits.index_axis(Axis(0), 0),
        );
        crate::say(&accuracy::render(&acc, precision.name(), "f32"));
        Some((forced, acc))
    } else {
        None
    };
    if let Some(path) = &args.json {
        let first_logits: Vec<Vec<f32>> = gen
            .logits
            .index_axis(Axis(0), 0)
            .outer_iter()
            .map(|row| row.to_vec())
            .collect();
        let report = Report {
            schema: "llm-reference/1",
            model: &model.name,
            weights: source.describe(),
            graph: if args.fusion.no_fuse {
                "eager"
            } else {
                "fused"
            },
            precision: precision.name(),
            prompt: &prompt,
            new_tokens: args.tokens,
            generated: &gen.generated[0],
            logits: &first_logits,
            stats: Stats {
                steps: gen.steps,
                launches_per_step: gen.launches_per_step,
                bytes_per_step: gen.bytes_per_step().round() as u64,
                tokens_per_s: rates.all,
                prefill: PrefillReport {
                    chunk,
                    tokens: prefill.tokens,
                    steps: prefill.steps,
                    time_to_first_token_ms: rates.ttft_ms,
                    tokens_per_s: prefill.tokens_per_s(),
                },
                decode_tokens_per_s: rates.decode,
                peak_rss_bytes,
            },
            kv_scales: kv_scales.as_ref(),
            accuracy: compared.as_ref().map(|(forced, acc)| AccuracyReport {
                reference: "f32",
                teacher_forced: true,
                forced_tokens: forced,
                accuracy: acc,
            }),
        };
        let json = serde_json::to_string(&report).map_err(|e| Failure::Internal(e.into()))?;
        outputs.write(path, (json + "\n").as_bytes(), Replace::IfForced)?;
        crate::say(&format!("wrote {}\n", path.display()));
    }
    Ok(())
}

/// A text prompt: its tokenizer, the rendered text and its ids.
struct TextPrompt<'a> {
    tokenizer: &'a Tokenizer,
    rendered: &'a str,
    ids: &'a [u32],
}

/// The text path of `run`: the prompt prefilled in chunks through `prefills`,
/// generation streamed to standard output, a summary on standard error, and with
/// `--json` the ids and text.
fn run_text(
    outputs: &Outputs,
    args: &Args,
    spec: &ModelSpec,
    exec: Executor,
    prefills: &mut [Prefill],
    prompt: &TextPrompt<'_>,
) -> Result<(), Failure> {
    let sampling = SamplingOptions {
        temperature: args.sampling.temperature,
        top_k: args.sampling.top_k,
        top_p: args.sampling.top_p,
        min_p: args.sampling.min_p,
        repetition_penalty: args.sampling.repetition_penalty,
        seed: args.seed,
    };
    let mut stdout = std::io::stdout();
    let outcome = generate::generate(
        exec,
        prefills,
        prompt.tokenizer,
        prompt.ids,
        args.tokens,
        !args.ignore_eos,
        sampling,
        &mut stdout,
    )?;
    crate::complain(&format!(
        "{} prompt tokens (time to first token {:.1} ms), {} generated{}, {:.1} tokens/s\n",
        prompt.ids.len(),
        outcome.ttft_ms,
        outcome.generated.len(),
        if outcome.stopped_at_eos {
            " (stopped at end of sequence)"
        } else {
            ""
        },
        outcome.tokens_per_s
    ));
    if let Some(path) = &args.json {
        let run = generate::TextRun {
            schema: "fusec-text-run/1",
            model: spec.model.name.clone(),
            prompt_text: prompt.rendered.to_string(),
            prompt: prompt.ids.to_vec(),
            generated: outcome.generated,
            text: outcome.text,
            stopped_at_eos: outcome.stopped_at_eos,
            tokens_per_s: outcome.tokens_per_s,
            ttft_ms: outcome.ttft_ms,
        };
        let json = serde_json::to_string(&run).map_err(|e| Failure::Internal(e.into()))?;
        outputs.write(path, (json + "\n").as_bytes(), Replace::IfForced)?;
        crate::complain(&format!("wrote {}\n", path.display()));
    }
    Ok(())
}

/// `--save-weights`: the weights with metadata that says how they were made.
#[allow(clippy::too_many_arguments)]
fn save(
    outputs: &Outputs,
    dir: &Path,
    graph: &Graph,
    weights: &Weights,
    spec: &ModelSpec,
    precision: Precision,
    builder: &Builder<'_>,
    source: &Source,
    prompt: &[i32],
) -> Result<(), Failure> {
    let granularity = match builder.fp8.granularity {
        fusec_rewrite::precision::Granularity::PerChannel => "per-channel",
        fusec_rewrite::precision::Granularity::PerTensor => "per-tensor",
    };
    let keep: Vec<&str> = builder.fp8.keep.iter().map(|c| c.name()).collect();
    let metadata: BTreeMap<String, String> = [
        ("fusec.model", spec.model.name.clone()),
        ("fusec.precision", precision.name().to_string()),
        (
            "fusec.graph",
            if builder.fuse { "fused" } else { "eager" }.to_string(),
        ),
        ("fusec.weight_scales", granularity.to_string()),
        ("fusec.keep", keep.join(",")),
        ("fusec.kv_scale_margin", KV_SCALE_MARGIN.to_string()),
        ("fusec.calibration_prompt", ids(prompt)),
        ("fusec.source", source.describe()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let path = dir.join("model.safetensors");
    outputs.check(&path, Replace::IfForced)?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
        .map_err(Failure::Input)?;
    outputs.write_with(&path, Replace::IfForced, |tmp| {
        weights::save_weights_to(tmp, graph, weights, &metadata)
    })?;
    crate::say(&format!("wrote {}\n", path.display()));
    Ok(())
}

/// After the logits of a step turned out non-finite: decodes again with every op's
/// result checked, to name the op that produced the first infinity or NaN (the
/// decode is deterministic, so it fails at the same step or earlier).
#[allow(clippy::too_many_arguments)]
fn first_non_finite(
    logits_error: anyhow::Error,
    graph: &Graph,
    precision: Precision,
    source: &Source,
    builder: &Builder<'_>,
    prompt: &[i32],
    tokens: usize,
) -> Failure {
    let diagnosis = weights_for(graph, precision, source, builder, prompt).and_then(|(w, _)| {
        let exec = Executor::new(graph.clone(), &w).map_err(exec_failure)?;
        drop(w);
        run_session(exec, prompt, tokens, None, true)
    });
    match diagnosis {
        Err(Failure::Input(op_error)) => Failure::Input(anyhow!(
            "{logits_error:#}; the first non-finite value came from {op_error}"
        )),
        _ => Failure::Input(logits_error),
    }
}

/// The rates of a run whose prompt `prefill` took the first graph runs of `gen`.
struct Rates {
    /// Tokens processed (prompt and generated but the last) per second.
    all: f64,
    /// Generated tokens per second after the first.
    decode: f64,
    ttft_ms: f64,
}

impl Rates {
    fn of(gen: &Generation, prefill: &PrefillStats) -> Rates {
        let per_s = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let decode_steps = gen.steps.saturating_sub(prefill.steps);
        let decode_secs = gen.elapsed.saturating_sub(prefill.elapsed).as_secs_f64();
        Rates {
            all: per_s(prefill.tokens + decode_steps, gen.elapsed.as_secs_f64()),
            decode: per_s(decode_steps, decode_secs),
            ttft_ms: prefill.elapsed.as_secs_f64() * 1e3,
        }
    }
}

fn ids(v: &[i32]) -> String {
    v.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

fn print_summary(
    model: &str,
    weights: &str,
    args: &Args,
    precision: Precision,
    prompt: &[i32],
    gen: &Generation,
    tokens_per_s: f64,
) {
    let graph = if args.fusion.no_fuse {
        "eager"
    } else {
        "fused"
    };
    crate::say(&format!(
        "model     {model}, weights {weights}, {graph} graph in {}\nprompt    {}\ngenerated {}\n{} steps, {} launches/step, {:.3} MB/step, {:.1} tokens/s\n",
        precision.name(),
        ids(prompt),
        ids(&gen.generated[0]),
        gen.steps,
        gen.launches_per_step,
        gen.bytes_per_step() / 1e6,
        tokens_per_s
    ));
}
