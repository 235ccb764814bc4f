//! Prefill: the time to the first token of a prompt, next to the time per output token
//! that follows it.
//!
//! A prompt of `P` tokens is prefilled in chunks of at most `chunk` tokens, as
//! `fusec run --prefill-chunk` feeds it: chunk `k` runs the prefill graph of
//! `T = min(chunk, P - k * chunk)` new tokens after `k * chunk` cached ones, and the
//! first output token comes with the last chunk's logits. The time to first token is
//! the sum of the chunks' estimated times, each kernel under the same model as a
//! decode step's ([`crate::kernel`]): a roofline bound, not a prediction. A prefill
//! GEMM reuses each weight `T` times, so where decode's GEMVs are memory-bound the
//! prefill's are usually compute-bound, at the math peak of their dtype.

use serde::Serialize;

use crate::error::ReportError;
use crate::eval::Eval;
use crate::inputs::{Inputs, PrefillGraph};
use crate::kernel::Bound;

/// The chunk lengths a prompt of `prompt` tokens is prefilled in, in order.
pub fn chunks(prompt: u64, chunk: u64) -> Vec<u64> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut done = 0;
    while done < prompt {
        let t = chunk.min(prompt - done);
        out.push(t);
        done += t;
    }
    out
}

/// The default prompt lengths: 128, 512 and 2048 tokens, those that leave room for a
/// generated token within `max_seq_len` (at least one point: `max_seq_len - 1`).
pub fn default_prompts(max_seq_len: u64) -> Vec<u64> {
    let v: Vec<u64> = [128, 512, 2048]
        .into_iter()
        .filter(|&p| p < max_seq_len)
        .collect();
    if v.is_empty() {
        vec![max_seq_len.saturating_sub(1).max(1)]
    } else {
        v
    }
}

/// One variant's prefill of one prompt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrefillResult {
    pub variant: String,
    /// Chunks the prompt is fed in.
    pub chunks: u64,
    /// The estimated time to the first token: every chunk, in order.
    pub ttft_us: f64,
    /// Prompt tokens per second over that time.
    pub prefill_tokens_per_s: f64,
    pub launches: u64,
    pub flops: u64,
    pub bytes: u64,
    /// The time split by what bounds each kernel (summed over the chunks).
    pub launch_us: f64,
    pub memory_us: f64,
    pub compute_us: f64,
    /// The largest of the three.
    pub bound: Bound,
    /// The decode step of the same variant after the prompt (KV length `P + 1`): the
    /// time per output token that follows the first.
    pub decode_us_per_token: f64,
}

/// One prompt length.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrefillPoint {
    pub prompt: u64,
    pub variants: Vec<PrefillResult>,
}

/// Time to first token against prompt length, one sequence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrefillSweep {
    pub chunk: u64,
    /// Sequences per step: one, the latency a single request sees.
    pub batch: u64,
    pub points: Vec<PrefillPoint>,
}

/// The prefill sweep over `inputs.prompts`, for every variant with prefill graphs
/// (in the order of `inputs.variants`); `None` when no prefill graphs were given.
pub fn prefill_sweep(inputs: &Inputs<'_>) -> Result<Option<PrefillSweep>, ReportError> {
    if inputs.prefill.is_empty() {
        return Ok(None);
    }
    let bad = |m: String| Err(ReportError::BadOption(m));
    let chunk = inputs.prefill_chunk;
    if chunk == 0 {
        return bad("--prefill-chunk must be at least 1 token".into());
    }
    if inputs.prompts.is_empty() {
        return bad("the prefill sweep needs at least one prompt length".into());
    }
    let max = inputs.spec.model.max_seq_len;
    for &p in inputs.prompts {
        if p == 0 || p >= max {
            return bad(format!(
                "--prompt-len: a prompt must be 1 to {} tokens (max_seq_len {max}, one position left for the first generated token), got {p}",
                max.saturating_sub(1)
            ));
        }
    }
    let gpu = inputs.gpu;
    let mut points = Vec::new();
    for &prompt in inputs.prompts {
        let mut variants = Vec::new();
        for v in inputs.variants {
            let graphs: Vec<&PrefillGraph> = inputs
                .prefill
                .iter()
                .filter(|g| g.variant == v.name)
                .collect();
            if graphs.is_empty() {
                continue;
            }
            let mut r = PrefillResult {
                variant: v.name.clone(),
                chunks: 0,
                ttft_us: 0.0,
                prefill_tokens_per_s: 0.0,
                launches: 0,
                flops: 0,
                bytes: 0,
                launch_us: 0.0,
                memory_us: 0.0,
                compute_us: 0.0,
                bound: Bound::Memory,
                decode_us_per_token: 0.0,
            };
            let mut past = 0;
            for t in chunks(prompt, chunk) {
                let g = graphs.iter().find(|g| g.tokens == t).ok_or_else(|| {
                    ReportError::BadOption(format!(
                        "variant `{}` has no prefill graph of {t} tokens (prompt {prompt}, chunks of {chunk})",
                        v.name
                    ))
                })?;
                // KV length after the chunk: `past + t`; the graph's `S` is `past`.
                let e = Eval::new(&g.graph, 1, past + 1, gpu)?;
                let parts = e.by_bound();
                r.chunks += 1;
                r.ttft_us += e.step_s * 1e6;
                r.launches += e.cost.total.launches;
                r.flops += e.cost.total.flops;
                r.bytes += e.cost.total.bytes();
                r.launch_us += parts.launch_us;
                r.memory_us += parts.memory_us;
                r.compute_us += parts.compute_us;
                past += t;
            }
            r.prefill_tokens_per_s = prompt as f64 / (r.ttft_us * 1e-6);
            r.bound = crate::eval::BoundTime {
                launch_us: r.launch_us,
                memory_us: r.memory_us,
                compute_us: r.compute_us,
            }
            .bound();
            r.decode_us_per_token = Eval::new(&v.graph, 1, prompt + 1, gpu)?.us_per_token();
            variants.push(r);
        }
        points.push(PrefillPoint { prompt, variants });
    }
    Ok(Some(PrefillSweep {
        chunk,
        batch: 1,
        points,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_split_into_full_chunks_then_the_rest() {
        assert_eq!(chunks(1300, 512), vec![512, 512, 276]);
        assert_eq!(chunks(512, 512), vec![512]);
        assert_eq!(chunks(7, 512), vec![7]);
        assert!(chunks(0, 512).is_empty());
    }

    #[test]
    fn default_prompts_leave_room_for_a_token() {
        assert_eq!(default_prompts(8192), vec![128, 512, 2048]);
        assert_eq!(default_prompts(2048), vec![128, 512]);
        assert_eq!(default_prompts(128), vec![127]);
    }
}
