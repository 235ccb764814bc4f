//! `fusec run --prompt`: text in, text out. The prompt is tokenized with the
//! checkpoint's tokenizer (through its chat template with `--chat`), the executor's
//! logits go through the sampler, and each token's text is written as soon as it is
//! whole, until an end-of-sequence id (unless `--ignore-eos`) or `--tokens`.

use std::io::Write;
use std::time::Instant;

use anyhow::anyhow;
use fusec::exec::{Executor, Prefill, Session};
use fusec::text::{ChatTemplate, Message, Sampler, SamplingOptions, TextStream, Tokenizer};
use serde::Serialize;

use crate::Failure;

fn text_failure(e: fusec::text::Error) -> Failure {
    Failure::Input(e.into())
}

/// The prompt's ids: `text` encoded with the tokenizer's special tokens, or with
/// `chat`, rendered as a user message (after `system`, if given) by the chat template
/// with the assistant's turn opened, then encoded without adding special tokens, as
/// transformers' `apply_chat_template(..., tokenize=True)` does.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    text: &str,
    chat: bool,
    system: Option<&str>,
) -> Result<(String, Vec<u32>), Failure> {
    if !chat {
        let ids = tokenizer.encode(text, true).map_err(text_failure)?;
        return Ok((text.to_string(), ids));
    }
    let template = ChatTemplate::of(tokenizer).map_err(text_failure)?;
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", text));
    let rendered = template.render(&messages, true).map_err(text_failure)?;
    let ids = tokenizer.encode(&rendered, false).map_err(text_failure)?;
    Ok((rendered, ids))
}

/// What a text run produced (the `--json` of a text run).
#[derive(Serialize, Debug)]
pub struct TextRun {
    pub schema: &'static str,
    pub model: String,
    /// The text fed to the tokenizer (the rendered chat with --chat).
    pub prompt_text: String,
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    pub text: String,
    /// Whether generation ended at an end-of-sequence id (which `generated` holds).
    pub stopped_at_eos: bool,
    pub tokens_per_s: f64,
    /// Wall time from the start to the first generated token's logits.
    pub ttft_ms: f64,
}

/// What [`generate`] produced.
pub struct TextOutcome {
    pub generated: Vec<u32>,
    pub text: String,
    /// Whether generation ended at an end-of-sequence id (which `generated` holds).
    pub stopped_at_eos: bool,
    /// Prompt and generated tokens fed through the graphs per second.
    pub tokens_per_s: f64,
    /// Wall time from the start to the first generated token's logits.
    pub ttft_ms: f64,
}

/// Prefills `prompt` (in chunks through `prefills`, the longest first; token by
/// token through the decode graph where none fits) and generates up to `max_tokens`
/// ids, writing each one's text to `out` as it completes.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    exec: Executor,
    prefills: &mut [Prefill],
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_tokens: usize,
    stop_at_eos: bool,
    sampling: SamplingOptions,
    out: &mut dyn Write,
) -> Result<TextOutcome, Failure> {
    let mut sampler = Sampler::new(sampling).map_err(text_failure)?;
    // Prefill graphs read the caches as f32 values: compact FP8 storage only when
    // the prompt goes through the decode graph.
    let compact = prefills.is_empty();
    let mut session = Session::with_cache_storage(exec, 1, prompt.len() + max_tokens, compact)
        .map_err(crate::cmd::exec_failure)?;
    let ids: Vec<i32> = prompt.iter().map(|&id| id as i32).collect();
    let started = Instant::now();
    let mut refs: Vec<&mut Prefill> = prefills.iter_mut().collect();
    let fed = session
        .prefill_prompts(&mut refs, std::slice::from_ref(&ids))
        .map_err(crate::cmd::exec_failure)?;
    let ttft_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut logits: Vec<f32> = fed.last.logits.row(0).to_vec();
    finite(&logits, ids.len() - 1)?;
    let mut seen: Vec<u32> = prompt.to_vec();
    let mut generated = Vec::new();
    let mut text = String::new();
    let mut stream = TextStream::new(tokenizer, true);
    let mut stopped = false;
    let eos = tokenizer.eos_ids();
    if max_tokens == 0 {
        return Err(Failure::Internal(anyhow!("no token to generate")));
    }
    while generated.len() < max_tokens {
        let next = sampler.next(&logits, &seen);
        generated.push(next);
        seen.push(next);
        if stop_at_eos && eos.contains(&next) {
            stopped = true;
            break;
        }
        if let Some(piece) = stream.step(next).map_err(text_failure)? {
            text.push_str(&piece);
            stream_out(out, &piece);
        }
        if generated.len() == max_tokens {
            break;
        }
        let step = session
            .step(&[next as i32])
            .map_err(crate::cmd::exec_failure)?;
        logits.clear();
        logits.extend(step.logits.row(0).iter());
        finite(&logits, ids.len() + generated.len() - 1)?;
    }
    // Bytes held back for a character that never completed: written as the whole
    // decode writes them (U+FFFD), so that the text is the generated ids' decode.
    let shown: Vec<u32> = match stopped {
        true => generated[..generated.len() - 1].to_vec(),
        false => generated.clone(),
    };
    let whole = tokenizer.decode(&shown, true).map_err(text_failure)?;
    if let Some(rest) = whole.strip_prefix(text.as_str()) {
        if !rest.is_empty() {
            stream_out(out, rest);
            text.push_str(rest);
        }
    }
    stream_out(out, "\n");
    let steps = prompt.len() + generated.len().saturating_sub(1);
    let secs = started.elapsed().as_secs_f64();
    let tokens_per_s = if secs > 0.0 { steps as f64 / secs } else { 0.0 };
    Ok(TextOutcome {
        generated,
        text,
        stopped_at_eos: stopped,
        tokens_per_s,
        ttft_ms,
    })
}

/// Writes generated text as `crate::say` writes standard output: a closed pipe ends the
/// program quietly (exit 0), any other write error is the environment's (exit 2).
fn stream_out(out: &mut dyn Write, text: &str) {
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        crate::complain(&format!("error: cannot write to standard output: {e}\n"));
        std::process::exit(2);
    }
}

/// A non-finite logit makes sampling meaningless: the run stops with an error naming
/// the decode step (`--prompt-ids` with `--check-finite` names the op).
fn finite(logits: &[f32], step: usize) -> Result<(), Failure> {
    match logits.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        Some((index, value)) => Err(Failure::Input(anyhow!(
            "decode step {step}: logit {index} is {value}; the weights or the configuration \
             give non-finite values (run the prompt's ids with --prompt-ids and \
             --check-finite to name the op)"
        ))),
        None => Ok(()),
    }
}
